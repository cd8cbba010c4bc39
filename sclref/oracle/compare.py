"""Compare someone's SCL step with sclref's: the earliest stage that disagrees, and the mistake behind it if known.

The user's tensors come in their own names and layout (those of the `StepResult`),
stage by stage: ``{"grad_s": {"fc1.score": ...}, "loss": 2.3}``, or flat
``{"grad_s/fc1.score": ..., "loss": 2.3}``; with several steps, a list of such mappings
or flat keys prefixed by the step (``"1/grad_s/fc1.score"``). Stages are checked in the
order a step computes them (`COMPARED_STAGES`), so the first one that disagrees is
where the two implementations part.

A tensor agrees when every entry satisfies ``|theirs - ours| <= atol·max|ours| +
rtol·|ours|``: atol is relative to the tensor's largest magnitude, so one tolerance
fits logits, gradients and parameters alike. The defaults depend on the precision of
the user's implementation (the lowest float precision among their arrays) and were
measured on float32 and float64 PyTorch implementations of LeNet-300-100 and LeNet-5
(docs/verify.md). Masks must be equal, except where sclref's updated s is itself within
that tolerance of the kink at 0.

When a stage disagrees, the step is re-run under cheap alternatives (another
estimator, normalization, feature axis, order of normalization and regularizer, λ = 0,
the regularizer's sign, weighting, a summed loss); an alternative that reproduces the
user's tensors becomes the diagnosis.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from sclref.errors import InputError
from sclref.oracle.diagnose import diagnose as explain
from sclref.oracle.state import as_array, flatten_names
from sclref.oracle.step import STAGE_TITLES, StepResult

__all__ = ["COMPARED_STAGES", "TOLERANCES", "Comparison", "TensorComparison", "Tolerance", "assert_step_matches",
           "compare"]

COMPARED_STAGES = ("mask_before", "logits", "loss", "penalty", "grad_theta", "grad_s", "s_normalized", "reg_grad",
                   "s_total", "theta", "buffers", "s", "mask", "flipped")
_TITLES = {**STAGE_TITLES, "mask_before": "masks before the step", "flipped": "masks that flipped"}
_SCALARS = ("loss", "penalty")
_SCORE_STAGES = ("grad_s", "s_normalized", "reg_grad", "s_total", "s", "mask", "mask_before", "flipped")
_MASK_STAGES = ("mask", "mask_before", "flipped")


@dataclass(frozen=True)
class Tolerance:
    """An entry agrees when ``|theirs - ours| <= atol * max|ours| + rtol * |ours|`` (max over the tensor)."""

    rtol: float
    atol: float

    def __post_init__(self):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (-1 < value < 1e300
                                                                                        and value >= 0):
                raise InputError(f"tolerance {name} must be a finite number >= 0, got {value!r:.40}")

    def allowed(self, ours: np.ndarray) -> np.ndarray:
        scale = float(np.abs(ours).max()) if np.size(ours) else 0.0
        return self.atol * scale + self.rtol * np.abs(ours)

    def __str__(self):
        return f"|theirs - ours| <= {self.atol:g}·max|ours| + {self.rtol:g}·|ours|"


# Measured (docs/verify.md): a float64 PyTorch step needed at most atol 7e-16 with rtol
# 1e-10, a float32 one at most atol 1.1e-6 with rtol 1e-4 (LeNet-300-100 and LeNet-5,
# batch 128, no max-pool near-ties); the defaults leave a factor of ten or more.
TOLERANCES = {"float64": Tolerance(rtol=1e-10, atol=1e-12), "float32": Tolerance(rtol=1e-4, atol=1e-5)}


@dataclass
class TensorComparison:
    """One of the user's tensors against sclref's.

    Attributes
    ----------
    step, stage, name : int, str, str
        Where it belongs; `name` is the user's (``"-"`` for logits and scalars).
    shape : tuple
        Its shape.
    max_abs, max_rel : float
        Largest absolute difference, and largest difference relative to sclref's entry
        (inf where sclref's entry is 0 and theirs is not).
    mismatched : int
        Entries outside the tolerance (for masks: entries that differ, not counting borderline ones).
    first_index : tuple or None
        The first such entry in C order.
    borderline : int
        Masks only: differing entries where sclref's s is within the tolerance of 0.
    """

    step: int
    stage: str
    name: str
    shape: tuple
    max_abs: float
    max_rel: float
    mismatched: int
    size: int
    first_index: tuple | None
    borderline: int = 0

    @property
    def ok(self) -> bool:
        return self.mismatched == 0

    def to_dict(self) -> dict:
        def num(v):
            return v if math.isfinite(v) else str(v)

        return {"step": self.step, "stage": self.stage, "name": self.name, "shape": list(self.shape),
                "max_abs": num(self.max_abs), "max_rel": num(self.max_rel), "mismatched": self.mismatched,
                "size": self.size, "first_index": None if self.first_index is None else list(self.first_index),
                "borderline": self.borderline, "ok": self.ok}


@dataclass
class Comparison:
    """The outcome of `compare`: every tensor's agreement, the earliest disagreeing stage, a diagnosis."""

    items: list
    dtype: str
    tolerance: Tolerance
    earliest: tuple | None = None
    diagnosis: list = field(default_factory=list)
    hints: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.earliest is None

    def summary(self) -> str:
        """One line: agreement, or the earliest stage that disagrees and the diagnosis."""
        if self.ok:
            steps = len({i.step for i in self.items})
            return (f"sclref oracle: all {len(self.items)} tensors agree over {steps} step(s) "
                    f"({self.dtype} implementation: {self.tolerance})")
        step, stage = self.earliest
        line = f"sclref oracle: step {step} disagrees first at stage {stage!r} ({_TITLES[stage]})"
        if self.diagnosis:
            line += "; diagnosis: " + "; ".join(self.diagnosis)
        return line

    def report(self) -> str:
        """The summary (with the diagnosis), hints, the tolerance and one line per tensor."""
        lines = [self.summary()]
        if not self.ok:
            for h in self.hints:
                lines.append(f"  hint: {h}")
        lines.append(f"tolerance ({self.dtype} implementation): {self.tolerance}")
        width = max([len(i.name) for i in self.items] + [4])
        lines.append(f"{'step':>4}  {'stage':<12}  {'name':<{width}}  {'shape':<16}  {'max abs':>9}  {'max rel':>9}  "
                     f"{'mismatched':>14}  first index")
        for i in self.items:
            flag = "ok" if i.ok else "DIFFERS"
            extra = f" (+{i.borderline} at the kink)" if i.borderline else ""
            first = "-" if i.first_index is None else str(i.first_index)
            lines.append(f"{i.step:>4}  {i.stage:<12}  {i.name:<{width}}  {str(i.shape):<16}  {i.max_abs:9.2e}  "
                         f"{i.max_rel:9.2e}  {f'{i.mismatched}/{i.size}':>14}  {first:<12} {flag}{extra}")
        return "\n".join(lines)

    __str__ = report

    def to_dict(self) -> dict:
        return {"ok": self.ok, "dtype": self.dtype,
                "tolerance": {"rtol": self.tolerance.rtol, "atol": self.tolerance.atol},
                "earliest": None if self.earliest is None else {"step": self.earliest[0], "stage": self.earliest[1]},
                "diagnosis": list(self.diagnosis), "hints": list(self.hints),
                "tensors": [i.to_dict() for i in self.items]}


# -- reading the user's tensors ----------------------------------------------------------------
def _split_steps(theirs, n_steps: int, step) -> dict[int, dict]:
    """The user's tensors as step -> {flat "stage/name": value}."""
    if isinstance(theirs, Sequence) and not isinstance(theirs, (str, bytes)):
        if not 1 <= len(theirs) <= n_steps:
            raise InputError(f"theirs: {len(theirs)} steps given, the result holds {n_steps}")
        if step is not None:
            raise InputError("theirs: give step= only with the tensors of one step")
        return {i: dict(flatten_names(t, what=f"theirs[{i}]")) for i, t in enumerate(theirs)}
    flat = flatten_names(theirs, what="theirs")
    numbered = [bool(re.fullmatch(r"\d+", k.split("/", 1)[0])) for k in flat]
    if any(numbered):
        if not all(numbered):
            raise InputError("theirs: either every name starts with a step number ('0/loss') or none does")
        if step is not None:
            raise InputError("theirs: names carry step numbers; step= is not needed")
        out: dict[int, dict] = {}
        for key, value in flat.items():
            head, _, rest = key.partition("/")
            if int(head) >= n_steps:
                raise InputError(f"theirs: {key!r} is for step {int(head)}, the result holds steps 0 to {n_steps - 1}")
            out.setdefault(int(head), {})[rest] = value
        return out
    if step is None:
        if n_steps != 1:
            raise InputError(f"theirs: the result holds {n_steps} steps; say which with step= or prefix the names "
                             "with step numbers")
        step = 0
    if isinstance(step, bool) or not isinstance(step, int) or not -n_steps <= step < n_steps:
        raise InputError(f"step must be an integer in [0, {n_steps}), got {step!r}")
    return {step % n_steps: dict(flat)}


def _implementation_dtype(steps: dict[int, dict], dtype) -> str:
    if dtype is not None:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = None
        if name not in TOLERANCES:
            raise InputError(f"dtype must be one of {', '.join(TOLERANCES)}, got {dtype!r}")
        return name
    found = set()
    for values in steps.values():
        for v in values.values():
            kind = getattr(getattr(v, "dtype", None), "kind", None)
            if kind == "f" or str(getattr(v, "dtype", "")).startswith(("torch.float", "float")):
                found.add(str(v.dtype).replace("torch.", ""))
    if any(d not in TOLERANCES for d in found):
        odd = sorted(d for d in found if d not in TOLERANCES)
        raise InputError(f"theirs: arrays of dtype {', '.join(odd)}; compare float32 or float64 tensors")
    return "float32" if "float32" in found else "float64"


class _Stages:
    """Which of sclref's names each stage holds, and the user's tensors parsed against them."""

    def __init__(self, result: StepResult):
        self.result = result
        record = result.steps[0]
        self.names = {"grad_theta": set(record.grad_theta), "theta": set(record.theta),
                      "buffers": set(record.buffers)}
        for stage in _SCORE_STAGES:
            self.names[stage] = set(record.grad_s)

    def parse(self, step: int, flat: dict) -> list[tuple[str, str, str | None, object]]:
        """(stage, their name, sclref name, value) for every entry, in `COMPARED_STAGES` order."""
        entries = []
        for key, value in flat.items():
            stage, _, name = key.partition("/")
            if stage not in COMPARED_STAGES:
                raise InputError(f"theirs: {key!r}: unknown stage {stage!r}; stages: {', '.join(COMPARED_STAGES)}")
            if stage in _SCALARS or stage == "logits":
                if name:
                    raise InputError(f"theirs: stage {stage!r} is one value; got {key!r}")
                entries.append((stage, "-", None, value))
                continue
            if not name:
                raise InputError(f"theirs: stage {stage!r} holds one tensor per name, e.g. {stage}/NAME; got {key!r}")
            ours = self.result.state_layout.resolve(name)
            if ours not in self.names[stage]:
                lay = self.result.state_layout
                expected = ", ".join(sorted(lay.their_name(n) for n in self.names[stage])) or "nothing"
                raise InputError(f"theirs: step {step}, stage {stage!r}: {name!r} is not one of its names; "
                                 f"expected one of: {expected}")
            entries.append((stage, name, ours, value))
        order = {s: i for i, s in enumerate(COMPARED_STAGES)}
        return sorted(entries, key=lambda e: order[e[0]])


def _ours(record, stage: str, sclref_name: str | None, result: StepResult):
    """sclref's value of one entry of `record`, in the user's layout."""
    if stage in ("loss", "penalty"):
        return np.float64(getattr(record, stage))
    if stage == "logits":
        return record.logits
    values = {"mask": record.mask_after}.get(stage, getattr(record, stage, None))
    return result.state_layout.slots[sclref_name].to_layout(values[sclref_name])


def _theirs_array(value, stage: str, name: str, step: int, expected_shape: tuple, result, sclref_name):
    arr = as_array(value, f"theirs: step {step}, {stage}/{name}")
    if arr.shape != expected_shape:
        hint = ""
        if sclref_name is not None:
            hint = result.state_layout.shape_hint(result.state_layout.slots[sclref_name], arr.shape)
        raise InputError(f"theirs: step {step}, {stage}/{name}: shape {arr.shape} given, {expected_shape} "
                         f"expected{hint}")
    if stage in _MASK_STAGES:
        if arr.dtype == np.bool_:
            return arr
        if arr.dtype.kind not in "iuf" or not np.all(np.isin(arr, (0, 1))):
            raise InputError(f"theirs: step {step}, {stage}/{name}: a mask holds booleans or 0/1")
        return arr != 0
    if arr.dtype.kind not in "iuf":
        raise InputError(f"theirs: step {step}, {stage}/{name}: dtype {arr.dtype}, numbers expected")
    # NaN or infinity is kept: it is a disagreement to report, not input to refuse.
    return arr.astype(np.float64)


def _kink(records, step: int, sclref_name: str, stage: str, result, tol: Tolerance) -> np.ndarray:
    """Where sclref's s (after the step; before it for mask_before) is within the tolerance of 0."""
    if stage != "mask_before":
        s = records[step].s[sclref_name]
    else:
        s = result.initial[sclref_name] if step == 0 else records[step - 1].s[sclref_name]
    s = result.state_layout.slots[sclref_name].to_layout(s)
    return np.abs(s) <= tol.allowed(s)


def _check(step: int, stage: str, name: str, theirs: np.ndarray, ours: np.ndarray, tol: Tolerance,
           kink: np.ndarray | None = None) -> TensorComparison:
    ours = np.asarray(ours)
    if stage in _MASK_STAGES:
        differ = theirs != ours
        border = differ & kink if kink is not None else np.zeros_like(differ)
        bad = differ & ~border
        d = differ.astype(np.float64)
        max_abs = float(d.max()) if d.size else 0.0
        return TensorComparison(step, stage, name, tuple(theirs.shape), max_abs, max_abs, int(bad.sum()),
                                int(bad.size), _first(bad), int(border.sum()))
    ours = ours.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.abs(theirs - ours)
        bad = ~(diff <= tol.allowed(ours))  # NaN in theirs counts as a mismatch
        rel = np.where(diff == 0, 0.0, diff / np.abs(ours))
    max_abs = float(np.nanmax(np.where(np.isnan(diff), np.inf, diff))) if diff.size else 0.0
    max_rel = float(np.nanmax(np.where(np.isnan(rel), np.inf, rel))) if rel.size else 0.0
    return TensorComparison(step, stage, name, tuple(theirs.shape), max_abs, max_rel, int(bad.sum()), int(bad.size),
                            _first(bad))


def _first(bad: np.ndarray) -> tuple | None:
    flat = np.flatnonzero(bad.reshape(-1))
    if flat.size == 0:
        return None
    return tuple(int(i) for i in np.unravel_index(int(flat[0]), bad.shape)) if bad.ndim else ()


def _compare_step(result, records, step: int, entries, tol: Tolerance) -> list[TensorComparison]:
    record = records[step]
    out = []
    for stage, name, sclref_name, value in entries:
        ours = _ours(record, stage, sclref_name, result)
        theirs = _theirs_array(value, stage, name, step, np.shape(ours), result, sclref_name)
        kink = _kink(records, step, sclref_name, stage, result, tol) if stage in _MASK_STAGES else None
        out.append(_check(step, stage, name, theirs, ours, tol, kink))
    return out


def _diagnose(result, comparison, parsed, tol: Tolerance, dtype: str) -> None:
    step, stage = comparison.earliest
    entries = [e for e in parsed[step] if e[0] == stage]

    def reproduces(records) -> bool:
        return all(i.ok for i in _compare_step(result, records, step, entries, tol))

    def scaled_by(n: int) -> bool:
        record = result.steps[step]
        for st, name, sclref_name, value in entries:
            ours = _ours(record, st, sclref_name, result) * n
            theirs = _theirs_array(value, st, name, step, np.shape(ours), result, sclref_name)
            if not _check(step, st, name, theirs, ours, tol).ok:
                return False
        return True

    comparison.diagnosis, comparison.hints = explain(result, stage, step, reproduces, scaled_by, dtype)


def compare(result: StepResult, theirs, *, step: int | None = None, dtype=None, rtol: float | None = None,
            atol: float | None = None, tolerances: Mapping | None = None, diagnose: bool = True) -> Comparison:
    """Compare the user's tensors of one or more SCL steps with sclref's `result`.

    Parameters
    ----------
    result : StepResult
        What `reference_step` computed.
    theirs : mapping or list of mappings
        The user's tensors in their names and layout (those `reference_step` was given):
        ``{stage: {name: array}}`` or flat ``{"stage/name": array}``; ``"logits"``,
        ``"loss"`` and ``"penalty"`` carry one value. Several steps: a list of such
        mappings, or flat names prefixed by the step number (``"1/s/fc1.score"``). Stages
        are those of `COMPARED_STAGES`; any subset may be given.
    step : int, optional
        Which step of `result` a one-step `theirs` belongs to (needed when `result`
        holds several).
    dtype : {"float32", "float64"}, optional
        The precision of the user's implementation; by default the lowest float
        precision among their arrays (float64 when there are none).
    rtol, atol : float, optional
        Override the tolerance of that precision (see `Tolerance`).
    tolerances : mapping, optional
        dtype name -> `Tolerance` or (rtol, atol), replacing entries of `TOLERANCES`.
    diagnose : bool
        Re-run the step under alternatives to explain the earliest disagreement.

    Returns
    -------
    Comparison
        Per tensor: max abs and rel error, mismatched entries, the first of them; the
        earliest (step, stage) that disagrees; the diagnosis and hints.

    Raises
    ------
    InputError
        For an unknown stage or name, a shape that does not fit, or a bad tolerance.
    """
    if not isinstance(result, StepResult):
        raise InputError(f"compare: result must be what reference_step returned, got a {type(result).__name__}")
    steps = _split_steps(theirs, len(result.steps), step)
    dtype = _implementation_dtype(steps, dtype)
    table = dict(TOLERANCES)
    for key, value in (tolerances or {}).items():
        table[key] = value if isinstance(value, Tolerance) else Tolerance(*value)
    tol = table[dtype]
    if rtol is not None or atol is not None:
        tol = Tolerance(tol.rtol if rtol is None else rtol, tol.atol if atol is None else atol)
    stages = _Stages(result)
    parsed = {i: stages.parse(i, flat) for i, flat in sorted(steps.items())}
    items = []
    for i, entries in parsed.items():
        items += _compare_step(result, result.steps, i, entries, tol)
    comparison = Comparison(items=items, dtype=dtype, tolerance=tol)
    failing = [it for it in items if not it.ok]
    if failing:
        order = {s: k for k, s in enumerate(COMPARED_STAGES)}
        first = min(failing, key=lambda it: (it.step, order[it.stage]))
        comparison.earliest = (first.step, first.stage)
        if diagnose:
            _diagnose(result, comparison, parsed, tol, dtype)
    return comparison


def assert_step_matches(result: StepResult, theirs, **options) -> Comparison:
    """`compare`, raising AssertionError with the full report when anything disagrees (for pytest).

    Takes the arguments of `compare`; returns the `Comparison` when everything agrees.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    comparison = compare(result, theirs, **options)
    if not comparison.ok:
        raise AssertionError(comparison.report())
    return comparison
