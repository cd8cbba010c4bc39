"""Why someone's SCL step disagrees with sclref's: known mistakes re-run, hints per stage, float32 near-ties.

`diagnose` takes the earliest stage that disagrees and re-runs sclref's step under the
alternatives that could produce it (`variants`: every other estimator, the other
normalizations, the feature axis transposed, normalization over the whole layer, the
other order of normalization and regularizer, λ = 0, the regularizer's sign, its
weighting, its surrogate factor); each alternative that reproduces the user's tensors is
a diagnosis. A loss summed over the batch is recognised without a re-run. When nothing
explains it, the hint says what the stage should compute, and for a float32
implementation how many max-pool windows and ReLU inputs of the batch sit within
rounding of a tie (`near_ties`).
"""

from __future__ import annotations

import numpy as np

from sclref import nn
from sclref import ste as ste_registry
from sclref.autograd import Tensor, no_grad
from sclref.errors import InputError
from sclref.oracle.state import sequential_leaves
from sclref.oracle.step import StepResult, VariantRule, build_model

__all__ = ["HINTS", "diagnose", "near_ties", "variants"]

_GRADIENT_STAGES = ("grad_theta", "grad_s", "s_normalized", "reg_grad", "s_total", "theta", "s", "mask", "flipped")


def _ste_phrase(name: str, options: dict) -> str:
    if name == "leaky_relu":
        alpha = options.get("alpha", ste_registry.get("leaky_relu").alpha)
        return f"{alpha:g} for s < 0 (leaky-ReLU-like)"
    phrases = {"identity": "1 everywhere (identity)", "relu": "zero for s < 0 (ReLU-like)",
               "clipped": "zero for |s| > 1 (clipped, hardtanh-like)", "softplus": "sigmoid(s) (softplus-like)"}
    return phrases.get(name, f"that of the {name!r} estimator")


_S_STAGES = ("s_normalized", "s_total", "s", "mask", "flipped")


def variants(result: StepResult, stage: str, step: int):
    """(message, settings, rule) alternatives that could explain a disagreement at `stage` of `step`."""
    st = result.settings
    anything = step > 0  # a wrong update of an earlier step moves every later stage
    out = []

    def want(*stages):
        return anything or stage in stages

    if want("grad_s", "reg_grad", *_S_STAGES):
        for name in ste_registry.available():
            if name == st.ste:
                continue
            try:
                ste_registry.get(name)
            except (TypeError, ValueError):  # a user's estimator that needs options
                continue
            out.append((f"the STE's surrogate is {_ste_phrase(name, {})}, settings say {st.ste}",
                        st.replace(ste=name, ste_options={}), None))
        if st.ste == "leaky_relu":
            default = ste_registry.get("leaky_relu").alpha
            if st.ste_options.get("alpha", default) != default:
                out.append((f"the STE's surrogate is {_ste_phrase('leaky_relu', {})}, settings say "
                            f"{_ste_phrase('leaky_relu', st.ste_options)}", st.replace(ste_options={}), None))
    if want(*_S_STAGES):
        objective = st.objective()
        out.append(("s gradient after normalization: feature axis looks transposed (normalized over inputs "
                    "instead of outputs)", st, VariantRule(objective, axis="input")))
        out.append(("s gradient after normalization: normalized over the whole layer instead of per feature "
                    "(output unit)", st, VariantRule(objective, axis="layer")))
        for mode in ("l2", "max", "none"):
            if mode != st.normalization:
                out.append((f"s gradient after normalization: looks like normalization={mode!r}, settings say "
                            f"{st.normalization!r}", st.replace(normalization=mode), None))
        if st.lam:
            if st.normalize == "task":
                message = "λ added before normalization (normalize='total'), settings say after (normalize='task')"
            else:
                message = "λ added after normalization (normalize='task'), settings say before (normalize='total')"
            out.append((message, st.replace(normalize="total" if st.normalize == "task" else "task"), None))
    if want("penalty", "reg_grad", "s_total", "s", "mask", "flipped") and st.lam:
        out.append((f"the regularizer is missing (looks like λ = 0), settings say λ = {st.lam:g}",
                    st.replace(lam=0.0), None))
        other = "flops" if st.weighting == "count" else "count"
        out.append((f"the regularizer looks weighted by {other!r}, settings say {st.weighting!r}",
                    st.replace(weighting=other), None))
    if want("reg_grad", "s_total", "s", "mask", "flipped") and st.lam:
        objective = st.objective()
        out.append(("the regularizer's gradient is subtracted (λ pushes s up), it should be added",
                    st, VariantRule(objective, reg_sign=-1)))
        if not st.estimator().unit_surrogate:
            out.append(("the regularizer's gradient is λ·w without the STE's surrogate g'(s)", st,
                        VariantRule(objective, reg_surrogate=False)))
    return out


def near_ties(result: StepResult, step: int) -> str | None:
    """Max-pool windows and ReLU inputs of the step's forward that float32 rounding could tip."""
    model = build_model(result.model_spec, result.in_shape, result.num_classes, result.settings.estimator())
    if not isinstance(model, nn.Sequential):
        return None
    if step == 0:
        model.load_state_dict(result.initial)
    else:
        prev = result.steps[step - 1]
        model.load_state_dict({**prev.theta, **prev.s, **prev.buffers}, strict=False)
    x = Tensor(result.batches[step][0])
    eps = 16 * float(np.finfo(np.float32).eps)
    pools = relus = 0
    with no_grad():
        for _, child in sequential_leaves(model):
            a = x.data
            scale = float(np.abs(a).max()) if a.size else 0.0
            if isinstance(child, nn.ReLU):
                relus += int(np.count_nonzero((np.abs(a) <= eps * scale) & (a != 0)))
            elif isinstance(child, nn.MaxPool2d) and a.ndim == 4:
                k = child.kernel_size if isinstance(child.kernel_size, tuple) else (child.kernel_size,) * 2
                s = child.stride or k
                s = s if isinstance(s, tuple) else (s, s)
                win = np.lib.stride_tricks.sliding_window_view(a, k, axis=(2, 3))[:, :, ::s[0], ::s[1]]
                win = np.sort(win.reshape(*win.shape[:4], -1), axis=-1)
                pools += int(np.count_nonzero(win[..., -1] - win[..., -2] <= eps * scale))
            x = child(x)
    if not pools and not relus:
        return None
    return (f"float32: in this batch {pools} max-pool window(s) and {relus} ReLU input(s) are within float32 "
            "rounding of a tie; there a float32 forward may route the gradient elsewhere than float64 does, "
            "which moves conv and dense gradients by up to one sample's share. Check the step in float64 "
            "(model.double()) to compare it exactly")


HINTS = {
    "mask_before": "the given state's masks differ: H(s) = [s > 0], strictly; check the state's layout and names",
    "logits": "the forward pass differs: check the state's layout and names (a Flax Dense kernel is [in, out]; "
              "after a conv stack Flax flattens (h, w, c)), the mask H(s) = [s > 0] and the architecture",
    "loss": "the logits agree but the loss does not: sclref's loss is the mean softmax cross-entropy",
    "penalty": "the regularizer's value is λ·Σ w·H(s) over every masked layer (w = 1 for weighting='count')",
    "grad_theta": "the forward agrees but θ's task gradient does not: it is (∂L/∂w)·H(s), zero where masked",
    "grad_s": "the task gradient of s is (∂L/∂w)·θ·g'(s) with the settings' surrogate g'",
    "s_normalized": "each output unit's s gradient is divided by its L2 norm + eps (normalization='l2'), "
                    "its largest |entry| + eps ('max'), or left alone ('none')",
    "reg_grad": "the regularizer's gradient is λ·w·g'(s)",
    "s_total": "the total s gradient is normalize(task) + λ·w·g'(s) (normalize='task') or "
               "normalize(task + λ·w·g'(s)) (normalize='total')",
    "theta": "the gradients agree but θ's update does not: check θ's optimizer (lr, momentum, weight decay; "
             "the first momentum step uses the gradient itself, as PyTorch)",
    "buffers": "batch-norm running statistics: momentum 0.1 and the unbiased batch variance, as PyTorch",
    "s": "the gradients agree but s's update does not: check s's optimizer (lr; sclref updates s before θ, "
         "which matters only if they share state)",
    "mask": "the updated s agree but the masks do not: the mask is H(s) = [s > 0], strictly",
    "flipped": "a flip is a mask that differs before and after the step",
}


def diagnose(result: StepResult, stage: str, step: int, reproduces, scaled_by, dtype: str) -> tuple[list, list]:
    """(diagnosis, hints) for a disagreement first seen at `stage` of `step`.

    Parameters
    ----------
    result : StepResult
        sclref's steps.
    stage, step : str, int
        Where the user's tensors first disagree.
    reproduces : callable
        ``reproduces(records)`` tells whether re-run `StepRecord`s give the user's
        tensors of that stage and step.
    scaled_by : callable
        ``scaled_by(n)`` tells whether the user's tensors of that stage are n times sclref's.
    dtype : str
        The precision of the user's implementation.
    """
    diagnosis, hints = [], []
    n = len(result.batches[step][0])
    if step == 0 and stage in ("loss", "grad_theta", "grad_s") and n > 1 and scaled_by(n):
        what = "the loss is" if stage == "loss" else "the gradients are"
        diagnosis.append(f"{what} {n} (the batch size) times sclref's: the loss looks summed over the batch "
                         "instead of averaged")
    for message, settings, rule in variants(result, stage, step):
        try:
            records = result.rerun(settings, rule)
        except InputError:  # the variant diverges on this state: it explains nothing
            continue
        if reproduces(records):
            diagnosis.append(message)
    if not diagnosis:
        hints.append(HINTS[stage])
        if dtype == "float32" and stage in _GRADIENT_STAGES:
            ties = near_ties(result, step)
            if ties:
                hints.append(ties)
    return diagnosis, hints
