"""Tools for checking code against sclref: a gradient checker users can run on their own functions and ops.

`sclref.testing.strategies` adds public hypothesis strategies (layer geometries, weights
and scores kept off the step's kink, estimators, batches, SCL settings) for property
tests of an SCL implementation against `sclref.oracle`. It is a separate import, so only
code that imports it needs hypothesis.

`check_grads(f, *inputs)` compares backpropagation with central finite differences in
float64 along random directions (a random-projection check: one directional derivative
per input instead of one per entry, so it is cheap on large inputs yet sensitive to any
wrong entry). When the check fails it re-checks every op of the graph on its own, so
the error names the op whose backward is wrong, not just the function that contains it.
"""

from __future__ import annotations

import numpy as np

from sclref.autograd import Function, Tensor, _toposort


class GradientCheckError(AssertionError):
    """Backpropagation disagrees with finite differences."""


def _project(u: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(u * y, dtype=np.float64))


def _close(analytic: float, numeric: float, rtol: float, atol: float) -> bool:
    return abs(analytic - numeric) <= atol + rtol * max(abs(analytic), abs(numeric))


def _relative_error(analytic: float, numeric: float) -> float:
    return abs(analytic - numeric) / max(abs(analytic), abs(numeric), 1e-300)


def _describe(what: str, analytic: float, numeric: float) -> str:
    rel = _relative_error(analytic, numeric)
    return f"{what}: backprop {analytic:.10g}, finite differences {numeric:.10g} (relative error {rel:.2e})"


def check_grads(f, *inputs, eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-8, seed: int = 0,
                localize: bool = True) -> float:
    """Check the gradient of ``f(*inputs)`` against central finite differences.

    Parameters
    ----------
    f : callable
        Takes one `Tensor` per input and returns a `Tensor` (any shape).
    *inputs : array_like or Tensor
        Points at which to check; copied to float64 leaf tensors requiring grad.
    eps : float
        Finite-difference step along each random direction.
    rtol, atol : float
        A directional derivative passes when |backprop - numeric| <= atol + rtol * max(|.|).
    seed : int
        Seed of the random directions and output weights.
    localize : bool
        On failure, check each op of the graph separately and name the failing ones.

    Returns
    -------
    float
        The largest relative error seen over the inputs (for reports).

    Raises
    ------
    GradientCheckError
        Naming the input (and, with `localize`, the op) whose gradient is wrong.
    """
    gen = np.random.default_rng(seed)
    arrays = [np.array(x.data if isinstance(x, Tensor) else x, dtype=np.float64) for x in inputs]
    for i, a in enumerate(arrays):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"check_grads: input {i} has NaN or infinite entries")

    def run(*arrs, grad=False):
        ts = [Tensor(a, requires_grad=grad) for a in arrs]
        out = f(*ts)
        if not isinstance(out, Tensor):
            raise TypeError(f"check_grads: f must return a Tensor, got {type(out).__name__}")
        return ts, out

    leaves, out = run(*arrays, grad=True)
    u = gen.standard_normal(out.shape)
    if out.requires_grad:
        out.backward(u.astype(out.dtype), retain_graph=True)
    failures, worst = [], 0.0
    for i, a in enumerate(arrays):
        v = gen.standard_normal(a.shape)
        g = leaves[i].grad
        analytic = 0.0 if g is None else _project(g, v)
        plus = _project(u, run(*arrays[:i], a + eps * v, *arrays[i + 1:])[1].data)
        minus = _project(u, run(*arrays[:i], a - eps * v, *arrays[i + 1:])[1].data)
        numeric = (plus - minus) / (2 * eps)
        worst = max(worst, _relative_error(analytic, numeric))
        if not _close(analytic, numeric, rtol, atol):
            failures.append(_describe(f"input {i} (shape {a.shape})", analytic, numeric))
    if not failures:
        return worst
    message = "gradient check failed for " + "; ".join(failures)
    if localize and out.requires_grad:
        culprits = _check_each_op(out, gen, eps, rtol, atol)
        if culprits:
            message += "\nops whose backward disagrees with finite differences:\n  " + "\n  ".join(culprits)
        else:
            message += "\nevery op passes on its own; the error lies outside the recorded ops"
    raise GradientCheckError(message)


def _check_node(fn: Function, arrays, gen: np.random.Generator, eps: float, rtol: float, atol: float):
    """Check one op node's backward at its recorded inputs; return failure descriptions."""
    op, params = type(fn), fn.params
    parents = fn.parents
    needs = fn.needs_grad

    def forward(*arrs):
        return op(parents, params).forward(*arrs, **params)

    out = forward(*arrays)
    u = gen.standard_normal(out.shape).astype(out.dtype)
    ctx = op(parents, params)
    ctx.forward(*arrays, **params)
    grads = ctx.backward(u)
    failures = []
    for i, a in enumerate(arrays):
        if not needs[i]:
            continue
        v = gen.standard_normal(a.shape)
        analytic = 0.0 if grads[i] is None else _project(grads[i], v)
        plus = _project(u, forward(*arrays[:i], a + eps * v, *arrays[i + 1:]))
        minus = _project(u, forward(*arrays[:i], a - eps * v, *arrays[i + 1:]))
        numeric = (plus - minus) / (2 * eps)
        if not _close(analytic, numeric, rtol, atol):
            failures.append(_describe(f"{op.__name__} (input {i}, shape {a.shape})", analytic, numeric))
    return failures


def _check_each_op(out: Tensor, gen, eps, rtol, atol) -> list[str]:
    culprits = []
    for node in reversed(_toposort(out)):  # in execution order, so the first culprit comes first
        fn = node._ctx
        arrays = [np.array(p.data, dtype=np.float64) for p in fn.parents]
        culprits += _check_node(fn, arrays, gen, eps, rtol, atol)
    return culprits


def _op_cases(gen: np.random.Generator):
    """One representative call of every built-in op, at points away from kinks and ties."""
    from sclref import ops

    def away(shape, low=0.1, high=2.0):  # |x| in [low, high): no relu kink at 0
        return gen.uniform(low, high, shape) * gen.choice([-1.0, 1.0], shape)

    def distinct(shape):  # no ties inside a max-pool window
        return gen.permutation(np.arange(np.prod(shape)) * 0.01).reshape(shape)

    labels = gen.integers(0, 4, size=3)
    mask = (gen.random((3, 4)) > 0.5) / 0.5
    scores = Tensor(away((3, 4)))  # mask variables, held fixed: their gradient is an estimator's
    summand, total = away((3, 4)), away((3, 4))  # add_relu's inputs sum to `total`: no kink at 0
    cases = [
        ("add", lambda a, b: a + b, [away((3, 4)), away((4,))]),
        ("sub", lambda a, b: a - b, [away((3, 1)), away((3, 4))]),
        ("mul", lambda a, b: a * b, [away((2, 3)), away((2, 3))]),
        ("div", lambda a, b: a / b, [away((2, 3)), away((2, 3), 0.5)]),
        ("neg", ops.neg, [away((5,))]),
        ("pow", lambda a: a**3, [away((5,))]),
        ("exp", ops.exp, [away((5,))]),
        ("log", ops.log, [gen.uniform(0.2, 2.0, 5)]),
        ("matmul", ops.matmul, [away((3, 4)), away((4, 2))]),
        ("linear", ops.linear, [away((3, 4)), away((2, 4)), away((2,))]),
        ("masked_weight", lambda t: ops.masked_weight(t, scores), [away((3, 4))]),
        ("sum", lambda a: ops.sum(a, 1), [away((3, 4))]),
        ("mean", lambda a: ops.mean(a, (0, 2), keepdims=True), [away((2, 3, 4))]),
        ("reshape", lambda a: ops.reshape(a, (6, 2)), [away((3, 4))]),
        ("transpose", lambda a: ops.transpose(a, (2, 0, 1)), [away((2, 3, 4))]),
        ("relu", ops.relu, [away((4, 5))]),
        ("add_relu", ops.add_relu, [summand, total - summand]),
        ("leaky_relu", lambda a: ops.leaky_relu(a, 0.1), [away((4, 5))]),
        ("sigmoid", ops.sigmoid, [away((4, 5))]),
        ("log_softmax", ops.log_softmax, [away((3, 5))]),
        ("cross_entropy", lambda a: ops.cross_entropy(a, labels), [away((3, 4))]),
        ("conv2d", lambda x, w, b: ops.conv2d(x, w, b, stride=2, padding=1),
         [away((2, 3, 7, 6)), away((4, 3, 3, 2)), away((4,))]),
        ("max_pool2d", lambda x: ops.max_pool2d(x, 2), [distinct((2, 3, 6, 4))]),
        ("dropout", lambda a: ops.Dropout.apply(a, mask=mask), [away((3, 4))]),
    ]
    running_mean, running_var = away((3,)), gen.uniform(0.5, 2.0, 3)
    cases += [
        ("getitem", lambda a: ops.getitem(a, np.s_[:, 1:, ::2, ::-3]), [away((2, 3, 5, 7))]),
        ("pad", lambda a: ops.pad(a, ((0, 0), (1, 2), (0, 0), (2, 0))), [away((2, 3, 2, 2))]),
        ("batch_norm (training)", lambda x, w, b: ops.batch_norm(x, w, b, training=True),
         [away((4, 3, 3, 2)), away((3,)), away((3,))]),
        ("batch_norm (eval)", lambda x, w, b: ops.batch_norm(x, w, b, running_mean, running_var),
         [away((4, 3, 3, 2)), away((3,)), away((3,))]),
        ("global_avg_pool2d", ops.global_avg_pool2d, [away((2, 3, 4, 5))]),
    ]
    return cases


def check_builtin_ops(seed: int = 0) -> list[tuple[str, float]]:
    """Run `check_grads` on every built-in op; return (op, largest relative error) pairs.

    Raises `GradientCheckError` at the first op that fails.
    """
    gen = np.random.default_rng(seed)
    return [(name, check_grads(f, *inputs, seed=seed)) for name, f, inputs in _op_cases(gen)]
