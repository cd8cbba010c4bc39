"""Differentiable operations: one `Function` per op and the function users call.

Each op is a forward and a backward on raw ndarrays, written against NumPy and the entry
points of `sclref.kernels`; this module is the only caller of those kernels. Broadcasting
is undone in one place (`unbroadcast`). The public functions validate their inputs and
raise errors that name the op and the problem before any work is done.
"""

from __future__ import annotations

import numbers

import numpy as np

from sclref import kernels as K
from sclref import rng
from sclref.autograd import FLOAT_DTYPES, Function, Tensor

# -- helpers ----------------------------------------------------------------------------


def unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum `grad` over the axes along which an input of `shape` was broadcast."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad


def _contiguous(a: np.ndarray) -> np.ndarray:
    """`a` itself when C-contiguous (kernels need it), else a contiguous copy; keeps 0-d arrays 0-d."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _flat_split(kernel, *arrays) -> None:
    """kernel(*arrays) on same-sized C-contiguous arrays (inputs, then outputs), cut into ranges of their flat
    views that threads compute at once; for elementwise kernels, whose results do not depend on the cut."""
    flat = [a.reshape(-1) for a in arrays]
    K.run_ranges(flat[0].size, flat[0].nbytes * len(flat), lambda i, j: kernel(*(a[i:j] for a in flat)))


def _check_dtypes(op: str, *tensors: Tensor) -> None:
    dtypes = {t.data.dtype for t in tensors}
    if len(dtypes) > 1:
        names = " and ".join(sorted(d.name for d in dtypes))
        raise TypeError(f"{op}: mixed dtypes {names}; convert one side with .astype()")


def _as_tensor(x, like: Tensor, op: str) -> Tensor:
    """`x` as a constant tensor of `like`'s dtype; floats of another dtype are an error."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, numbers.Number):
        return Tensor._from_op(np.asarray(x, dtype=like.dtype), None)
    arr = np.asarray(x)
    if arr.dtype in FLOAT_DTYPES and arr.dtype != like.dtype:
        raise TypeError(f"{op}: mixed dtypes {like.dtype.name} and {arr.dtype.name}; convert one side first")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise TypeError(f"{op}: cannot combine a tensor with data of dtype {arr.dtype}")
    return Tensor._from_op(arr.astype(like.dtype, copy=False), None)


def _binary(op: str, a, b) -> tuple[Tensor, Tensor]:
    if isinstance(a, Tensor):
        b = _as_tensor(b, a, op)
    else:
        a = _as_tensor(a, b, op)
    _check_dtypes(op, a, b)
    if a.shape != b.shape:
        try:
            np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise ValueError(f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast together") from None
    return a, b


def _tensor_arg(op: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a Tensor, got {type(x).__name__}")
    return x


def _pair(op: str, name: str, v, minimum: int) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, numbers.Integral) else tuple(v)
    if len(pair) != 2 or not all(isinstance(i, numbers.Integral) and i >= minimum for i in pair):
        raise ValueError(f"{op}: {name} must be an integer >= {minimum} or a pair of them, got {v!r}")
    return int(pair[0]), int(pair[1])


def _normalize_axes(op: str, axis, ndim: int):
    if axis is None:
        return None
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{op}: axis {a} is out of range for a tensor with {ndim} dimensions")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{op}: repeated axis in {axis!r}")
    return tuple(sorted(out))


# -- elementwise arithmetic --------------------------------------------------------------


class Add(Function):
    """a + b"""

    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, g):
        sa, sb = self.shapes
        return unbroadcast(g, sa), unbroadcast(g, sb)


class Sub(Function):
    """a - b"""

    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, g):
        sa, sb = self.shapes
        return unbroadcast(g, sa), unbroadcast(-g, sb) if self.needs_grad[1] else None


class Mul(Function):
    """a * b"""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        a, b = self.a, self.b
        ga = unbroadcast(g * b, a.shape) if self.needs_grad[0] else None
        gb = unbroadcast(g * a, b.shape) if self.needs_grad[1] else None
        return ga, gb


class Div(Function):
    """a / b"""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, g):
        a, b = self.a, self.b
        ga = unbroadcast(g / b, a.shape) if self.needs_grad[0] else None
        gb = unbroadcast(-g * a / (b * b), b.shape) if self.needs_grad[1] else None
        return ga, gb


class Neg(Function):
    """-a"""

    def forward(self, a):
        return -a

    def backward(self, g):
        return (-g,)


class Pow(Function):
    """a ** p for a constant p"""

    def forward(self, a, exponent):
        self.a, self.p = a, exponent
        return a**exponent

    def backward(self, g):
        a, p = self.a, self.p
        return (g * (p * a ** (p - 1)),)


class Exp(Function):
    """exp(a)"""

    def forward(self, a):
        self.out = np.exp(a)
        return self.out

    def backward(self, g):
        return (g * self.out,)


class Log(Function):
    """log(a), a > 0"""

    def forward(self, a):
        self.a = a
        return np.log(a)

    def backward(self, g):
        return (g / self.a,)


class Cast(Function):
    """a converted to another float dtype; the gradient is converted back"""

    def forward(self, a, dtype):
        self.src = a.dtype
        return a.astype(dtype)

    def backward(self, g):
        return (g.astype(self.src),)


def add(a, b) -> Tensor:
    """a + b with broadcasting."""
    return Add.apply(*_binary("add", a, b))


def sub(a, b) -> Tensor:
    """a - b with broadcasting."""
    return Sub.apply(*_binary("sub", a, b))


def mul(a, b) -> Tensor:
    """a * b with broadcasting."""
    return Mul.apply(*_binary("mul", a, b))


def div(a, b) -> Tensor:
    """a / b with broadcasting."""
    return Div.apply(*_binary("div", a, b))


def neg(a: Tensor) -> Tensor:
    """-a."""
    return Neg.apply(_tensor_arg("neg", a))


def pow(a: Tensor, exponent) -> Tensor:
    """a ** exponent for a constant real exponent."""
    a = _tensor_arg("pow", a)
    if isinstance(exponent, Tensor) or not isinstance(exponent, numbers.Real):
        raise TypeError(f"pow: the exponent must be a constant real number, got {type(exponent).__name__}")
    exponent = float(exponent)
    if not np.isfinite(exponent):
        raise ValueError(f"pow: the exponent must be finite, got {exponent}")
    if not exponent.is_integer() and np.any(a.data < 0):
        raise ValueError(f"pow: negative base with the non-integer exponent {exponent}")
    if exponent < 0 and np.any(a.data == 0):
        raise ValueError(f"pow: zero base with the negative exponent {exponent}")
    return Pow.apply(a, exponent=int(exponent) if exponent.is_integer() else exponent)


def exp(a: Tensor) -> Tensor:
    """Elementwise e ** a."""
    return Exp.apply(_tensor_arg("exp", a))


def log(a: Tensor) -> Tensor:
    """Elementwise natural logarithm; every entry must be positive."""
    a = _tensor_arg("log", a)
    if not np.all(a.data > 0):  # also false for NaN
        raise ValueError("log: input must be positive everywhere (found zero, negative or NaN entries)")
    return Log.apply(a)


def cast(a: Tensor, dtype) -> Tensor:
    """`a` as float32 or float64; differentiable."""
    a = _tensor_arg("cast", a)
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"cast: sclref tensors hold float32 or float64, not {dtype}")
    if dtype == a.dtype:
        return a
    return Cast.apply(a, dtype=dtype)


# -- linear algebra and shape ------------------------------------------------------------


class MatMul(Function):
    """a @ b (NumPy matmul semantics, batched and 1-D operands included)"""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a @ b

    def backward(self, g):
        a, b = self.a, self.b
        a2 = a if a.ndim > 1 else a[None, :]
        b2 = b if b.ndim > 1 else b[:, None]
        batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        g2 = g.reshape(batch + (a2.shape[-2], b2.shape[-1]))
        ga = gb = None
        if self.needs_grad[0]:
            ga = unbroadcast(g2 @ np.swapaxes(b2, -1, -2), a2.shape).reshape(a.shape)
        if self.needs_grad[1]:
            gb = unbroadcast(np.swapaxes(a2, -1, -2) @ g2, b2.shape).reshape(b.shape)
        return ga, gb


def matmul(a, b) -> Tensor:
    """Matrix product a @ b with NumPy's rules for 1-D and batched operands."""
    a, b = (x if isinstance(x, Tensor) else None for x in (a, b))
    if a is None or b is None:
        raise TypeError("matmul: both operands must be Tensors")
    _check_dtypes("matmul", a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError("matmul: operands must have at least one dimension")
    k_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if a.shape[-1] != k_b:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not align ({a.shape[-1]} != {k_b})")
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: batch dimensions of {a.shape} and {b.shape} cannot be broadcast") from None
    return MatMul.apply(a, b)


class Linear(Function):
    """x @ w.T (+ b): a dense layer's affine map, x of shape (..., K), w (F, K), b (F,)"""

    def forward(self, x, w, b=None):
        self.x, self.w = x, w
        y = x @ w.T
        if b is not None:
            y += b  # y is a fresh product: adding in place saves a pass
        return y

    def backward(self, g):
        x, w = self.x, self.w
        g2 = g.reshape(-1, g.shape[-1])
        gx = (g2 @ w).reshape(x.shape) if self.needs_grad[0] else None
        # (g2.T @ x2) is a fresh C-contiguous (F, K) array: the weight's gradient as is.
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if self.needs_grad[1] else None
        gb = g2.sum(axis=0) if len(self.needs_grad) > 2 and self.needs_grad[2] else None
        return gx, gw, gb


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``x @ w.T + b`` in one op (a dense layer): x (..., K), weight w (F, K), bias b (F,) or None."""
    tensors = [_tensor_arg("linear", x), _tensor_arg("linear", w)] + ([] if b is None else [_tensor_arg("linear", b)])
    _check_dtypes("linear", *tensors)
    if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: input {x.shape} and weight {w.shape} do not align "
                         f"(need input (..., K) and weight (F, K))")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"linear: bias shape {b.shape} != ({w.shape[0]},)")
    return Linear.apply(*tensors)


class Sum(Function):
    """sum of a over axes"""

    def forward(self, a, axis, keepdims):
        self.shape, self.axis, self.keepdims = a.shape, axis, keepdims
        return np.sum(a, axis=axis, keepdims=keepdims)

    def backward(self, g):
        if self.axis is not None and not self.keepdims:
            g = np.expand_dims(g, self.axis)
        return (np.broadcast_to(g, self.shape),)


class Mean(Sum):
    """mean of a over axes"""

    def forward(self, a, axis, keepdims):
        out = super().forward(a, axis, keepdims)
        self.count = a.size // max(out.size, 1) if a.size else 0
        return out / a.dtype.type(max(self.count, 1))

    def backward(self, g):
        return super().backward(g / g.dtype.type(max(self.count, 1)))


class Reshape(Function):
    """a with a new shape of the same size"""

    def forward(self, a, shape):
        self.shape = a.shape
        return a.reshape(shape)

    def backward(self, g):
        return (g.reshape(self.shape),)


class Transpose(Function):
    """a with its axes permuted"""

    def forward(self, a, axes):
        self.axes = axes
        return np.transpose(a, axes)

    def backward(self, g):
        inverse = None if self.axes is None else tuple(np.argsort(self.axes))
        return (np.transpose(g, inverse),)


def sum(a: Tensor, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - the name users expect
    """Sum over `axis` (int, tuple or None for all)."""
    a = _tensor_arg("sum", a)
    return Sum.apply(a, axis=_normalize_axes("sum", axis, a.ndim), keepdims=bool(keepdims))


def mean(a: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    """Mean over `axis` (int, tuple or None for all)."""
    a = _tensor_arg("mean", a)
    return Mean.apply(a, axis=_normalize_axes("mean", axis, a.ndim), keepdims=bool(keepdims))


def reshape(a: Tensor, shape) -> Tensor:
    """`a` with shape `shape` (one entry may be -1)."""
    a = _tensor_arg("reshape", a)
    shape = tuple(int(s) for s in shape)
    known = int(np.prod([s for s in shape if s != -1]))
    unknown = shape.count(-1)
    fits = (unknown == 0 and known == a.size) or (unknown == 1 and known > 0 and a.size % known == 0)
    if not fits or any(s < -1 for s in shape):
        raise ValueError(f"reshape: cannot reshape a tensor of shape {a.shape} into {shape}")
    return Reshape.apply(a, shape=shape)


def flatten(a: Tensor, start_dim: int = 0) -> Tensor:
    """Collapse dimensions `start_dim`... into one."""
    a = _tensor_arg("flatten", a)
    if not -a.ndim <= start_dim < max(a.ndim, 1):
        raise ValueError(f"flatten: start_dim {start_dim} is out of range for shape {a.shape}")
    start_dim %= max(a.ndim, 1)
    return Reshape.apply(a, shape=a.shape[:start_dim] + (-1,))


def transpose(a: Tensor, axes=None) -> Tensor:
    """Permute axes (reverse them when `axes` is None)."""
    a = _tensor_arg("transpose", a)
    if axes is not None:
        axes = tuple(int(x) % a.ndim if -a.ndim <= x < a.ndim else -1 for x in axes)
        if sorted(axes) != list(range(a.ndim)):
            raise ValueError(f"transpose: axes {axes} are not a permutation of {a.ndim} dimensions")
    return Transpose.apply(a, axes=axes)


class GetItem(Function):
    """a[key] for a basic index (integers, slices, Ellipsis); the gradient is g scattered into zeros"""

    def forward(self, a, key):
        self.shape = a.shape
        return a[key]

    def backward(self, g):
        # A basic index selects each entry at most once, so assignment (no accumulation) is exact.
        gx = np.zeros(self.shape, dtype=g.dtype)
        gx[self.params["key"]] = g
        return (gx,)


def _index_item(item, size: int, axis: int):
    """One entry of a basic index, normalized to Python ints; fancy entries are refused."""
    if item is Ellipsis:
        return item
    if isinstance(item, (bool, np.bool_)):
        raise TypeError("getitem: boolean indices are not supported (only integers, slices and ...)")
    if isinstance(item, numbers.Integral):
        if not -size <= item < size:
            raise ValueError(f"getitem: index {item} is out of range for axis {axis} of size {size}")
        return int(item)
    if isinstance(item, slice):
        fields = (item.start, item.stop, item.step)
        if not all(f is None or (isinstance(f, numbers.Integral) and not isinstance(f, (bool, np.bool_)))
                   for f in fields):
            raise TypeError(f"getitem: slice fields must be integers or None, got {item!r}")
        if item.step == 0:
            raise ValueError("getitem: slice step cannot be zero")
        return slice(*(None if f is None else int(f) for f in fields))
    raise TypeError(f"getitem: only integers, slices and ... can index a tensor (basic indexing), "
                    f"got {type(item).__name__}")


def getitem(a: Tensor, key) -> Tensor:
    """``a[key]`` for a basic index: integers, slices and at most one Ellipsis (a view, as in NumPy).

    ``getitem(x, np.s_[:, :, ::2, ::2])`` keeps every other row and column of an NCHW input.
    """
    a = _tensor_arg("getitem", a)
    items = key if isinstance(key, tuple) else (key,)
    ellipses = [i for i, item in enumerate(items) if item is Ellipsis]
    if len(ellipses) > 1:
        raise ValueError("getitem: an index can only have a single ellipsis ('...')")
    explicit = len(items) - len(ellipses)
    if explicit > a.ndim:
        raise ValueError(f"getitem: {explicit} indices for a tensor with {a.ndim} dimensions")
    # Entries before an ellipsis (or all, without one) index the first axes, entries after it the last.
    before = ellipses[0] if ellipses else len(items)
    after = explicit - before
    axes = list(range(before)) + [None] * len(ellipses) + list(range(a.ndim - after, a.ndim))
    key = tuple(item if axis is None else _index_item(item, a.shape[axis], axis) for item, axis in zip(items, axes))
    return GetItem.apply(a, key=key)


class Pad(Function):
    """a with zeros added before and after each axis (np.pad with a constant 0); the gradient is g's inner block"""

    def forward(self, a, pad_width):
        self.inner = tuple(slice(before, before + n) for (before, _), n in zip(pad_width, a.shape))
        out = np.zeros(tuple(n + before + after for (before, after), n in zip(pad_width, a.shape)), dtype=a.dtype)
        out[self.inner] = a
        return out

    def backward(self, g):
        return (g[self.inner],)


def pad(a: Tensor, pad_width) -> Tensor:
    """`a` with zeros around it; `pad_width` holds one (before, after) pair of counts per axis, as np.pad's.

    ``pad(x, ((0, 0), (2, 2), (0, 0), (0, 0)))`` adds two all-zero channels on each side of
    an NCHW input (the option-A shortcut of the CIFAR ResNets).
    """
    a = _tensor_arg("pad", a)
    try:
        pairs = [tuple(pair) for pair in pad_width]
    except TypeError:
        raise TypeError(f"pad: pad_width must be a sequence of (before, after) pairs, got {pad_width!r}") from None
    if len(pairs) != a.ndim or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"pad: pad_width needs one (before, after) pair for each of the {a.ndim} axes, "
                         f"got {pad_width!r}")
    if not all(isinstance(n, numbers.Integral) and not isinstance(n, (bool, np.bool_)) and n >= 0
               for pair in pairs for n in pair):
        raise ValueError(f"pad: widths must be integers >= 0, got {pad_width!r}")
    return Pad.apply(a, pad_width=tuple((int(b), int(e)) for b, e in pairs))


# -- masked weight ------------------------------------------------------------------------


class MaskedWeight(Function):
    """theta * H(s), H the exact unit step; d/ds through the surrogate g'(s) (1 when None)"""

    def forward(self, theta, s, surrogate):
        self.theta, self.s, self.surrogate = _contiguous(theta), _contiguous(s), surrogate
        out = np.empty_like(self.theta)
        _flat_split(K.masked_weight_fwd, self.theta, self.s, out)
        return out

    def backward(self, g):
        g_theta, g_s = np.empty_like(self.theta), np.empty_like(self.theta)
        _flat_split(K.masked_weight_bwd, _contiguous(g), self.theta, self.s, g_theta, g_s)
        if self.surrogate is not None:
            g_s *= self.surrogate(self.s)
        return g_theta, g_s


def masked_weight(theta: Tensor, s: Tensor, surrogate=None) -> Tensor:
    """The SCL weight θ ⊙ H(s) in one op: the same values and gradients as
    ``theta * ste.step(s, ste)``, without the intermediate mask and surrogate arrays.

    `surrogate` maps s to the estimator's derivative g'(s) (an array like s); None means
    g' = 1, the identity estimator, and skips that product.
    """
    theta, s = _tensor_arg("masked_weight", theta), _tensor_arg("masked_weight", s)
    _check_dtypes("masked_weight", theta, s)
    if theta.shape != s.shape:
        raise ValueError(f"masked_weight: weight shape {theta.shape} != mask-variable shape {s.shape}")
    if surrogate is not None and not callable(surrogate):
        raise TypeError(f"masked_weight: surrogate must be callable or None, got {type(surrogate).__name__}")
    return MaskedWeight.apply(theta, s, surrogate=surrogate)


# -- activations and losses --------------------------------------------------------------


class ReLU(Function):
    """max(a, 0)"""

    def forward(self, a):
        self.a = a = _contiguous(a)
        out = np.empty_like(a)
        _flat_split(K.relu_fwd, a, out)
        return out

    def backward(self, g):
        gx = np.empty_like(self.a)
        _flat_split(K.relu_bwd, self.a, _contiguous(g), gx)
        return (gx,)


class AddReLU(Function):
    """max(a + b, 0) for a and b of one shape, in one pass each way"""

    def forward(self, a, b):
        a, b = _contiguous(a), _contiguous(b)
        self.out = out = np.empty_like(a)
        _flat_split(K.add_relu_fwd, a, b, out)
        return out

    def backward(self, g):
        # out > 0 exactly where a + b > 0: the output gives relu's mask, and a sum passes it to both.
        gx = np.empty_like(self.out)
        _flat_split(K.relu_bwd, self.out, _contiguous(g), gx)
        return gx, gx


class LeakyReLU(Function):
    """a if a > 0 else alpha * a"""

    def forward(self, a, alpha):
        self.a = a = _contiguous(a)
        self.alpha = alpha
        out = np.empty_like(a)
        _flat_split(lambda x, y: K.leaky_relu_fwd(x, alpha, y), a, out)
        return out

    def backward(self, g):
        gx = np.empty_like(self.a)
        _flat_split(lambda x, gy, y: K.leaky_relu_bwd(x, gy, self.alpha, y), self.a, _contiguous(g), gx)
        return (gx,)


class Sigmoid(Function):
    """1 / (1 + exp(-a)), computed without overflow"""

    def forward(self, a):
        e = np.exp(-np.abs(a))
        self.out = np.where(a >= 0, 1 / (1 + e), e / (1 + e))
        return self.out

    def backward(self, g):
        return (g * self.out * (1 - self.out),)


class LogSoftmax(Function):
    """a - logsumexp(a) along an axis"""

    def forward(self, a, axis):
        self.axis = axis
        shifted = a - a.max(axis=axis, keepdims=True)
        self.out = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
        return self.out

    def backward(self, g):
        return (g - np.exp(self.out) * g.sum(axis=self.axis, keepdims=True),)


class CrossEntropy(Function):
    """-log softmax(logits)[label], reduced by mean, sum or not at all"""

    def forward(self, logits, labels, reduction):
        n = logits.shape[0]
        shifted = logits - logits.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        self.logp, self.labels, self.reduction = logp, labels, reduction
        losses = -logp[np.arange(n), labels]
        if reduction == "none":
            return losses
        total = losses.sum()
        return np.asarray(total / n if reduction == "mean" else total, dtype=logits.dtype)

    def backward(self, g):
        n = self.logp.shape[0]
        grad = np.exp(self.logp)
        grad[np.arange(n), self.labels] -= 1
        if self.reduction == "none":
            return (grad * g[:, None],)
        scale = g / n if self.reduction == "mean" else g
        return (grad * scale,)


def relu(a: Tensor) -> Tensor:
    """max(a, 0) elementwise."""
    return ReLU.apply(_tensor_arg("relu", a))


def add_relu(a: Tensor, b: Tensor) -> Tensor:
    """``relu(a + b)`` for tensors of one shape (a residual block's output) in one op: the same
    values and gradients as ``relu(add(a, b))`` without the intermediate sum."""
    a, b = _tensor_arg("add_relu", a), _tensor_arg("add_relu", b)
    _check_dtypes("add_relu", a, b)
    if a.shape != b.shape:
        raise ValueError(f"add_relu: shapes {a.shape} and {b.shape} differ (add_relu does not broadcast)")
    return AddReLU.apply(a, b)


def leaky_relu(a: Tensor, alpha: float = 0.01) -> Tensor:
    """a where a > 0, alpha * a elsewhere."""
    a = _tensor_arg("leaky_relu", a)
    if not np.isfinite(alpha):
        raise ValueError(f"leaky_relu: alpha must be finite, got {alpha}")
    return LeakyReLU.apply(a, alpha=float(alpha))


def sigmoid(a: Tensor) -> Tensor:
    """The logistic function 1 / (1 + exp(-a))."""
    return Sigmoid.apply(_tensor_arg("sigmoid", a))


def log_softmax(a: Tensor, axis: int = -1) -> Tensor:
    """Log of the softmax along `axis`."""
    a = _tensor_arg("log_softmax", a)
    if a.ndim == 0:
        raise ValueError("log_softmax: input must have at least one dimension")
    (axis,) = _normalize_axes("log_softmax", axis, a.ndim)
    if not np.all(np.isfinite(a.data)):
        raise ValueError("log_softmax: input has NaN or infinite entries")
    return LogSoftmax.apply(a, axis=axis)


def cross_entropy(logits: Tensor, labels, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of (N, C) logits against N integer class labels.

    `reduction` is "mean" (default), "sum" or "none" (one loss per sample).
    """
    logits = _tensor_arg("cross_entropy", logits)
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (N, C), got shape {logits.shape}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    labels = labels.data if isinstance(labels, Tensor) else np.asarray(labels)
    n, c = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"cross_entropy: expected {n} labels of shape ({n},), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))):
            raise TypeError(f"cross_entropy: labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.intp, copy=False)
    if n and (labels.min() < 0 or labels.max() >= c):
        bad = labels[(labels < 0) | (labels >= c)][0]
        raise ValueError(f"cross_entropy: label {bad} is outside the class range [0, {c})")
    if n == 0:
        raise ValueError("cross_entropy: empty batch")
    if not np.all(np.isfinite(logits.data)):
        raise ValueError("cross_entropy: logits have NaN or infinite entries")
    return CrossEntropy.apply(logits, labels=labels, reduction=reduction)


# -- convolution, pooling, dropout -------------------------------------------------------


class Conv2d(Function):
    """cross-correlation of NCHW input with (F, C, KH, KW) filters, plus an optional bias"""

    def forward(self, x, w, b=None, *, stride, padding):
        self.x = x = _contiguous(x)
        self.w = w = _contiguous(w)
        (sh, sw), (ph, pw) = stride, padding
        n, _, h, wd = x.shape
        f, _, kh, kw = w.shape
        out = np.empty((n, f, (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1), dtype=x.dtype)
        K.conv2d_fwd(x, w, sh, sw, ph, pw, out)
        if b is not None:
            out += b.reshape(1, f, 1, 1)
        return out

    def backward(self, g):
        g = _contiguous(g)
        (sh, sw), (ph, pw) = self.params["stride"], self.params["padding"]
        gx = gw = gb = None
        if self.needs_grad[0]:
            gx = np.empty_like(self.x)
            K.conv2d_bwd_input(g, self.w, sh, sw, ph, pw, gx)
        if self.needs_grad[1]:
            gw = np.empty_like(self.w)
            K.conv2d_bwd_weight(self.x, g, sh, sw, ph, pw, gw)
        if len(self.needs_grad) == 3 and self.needs_grad[2]:
            gb = g.sum(axis=(0, 2, 3))
        return gx, gw, gb


class MaxPool2d(Function):
    """maximum over (KH, KW) windows of an NCHW input"""

    def forward(self, x, kernel_size, stride):
        x = _contiguous(x)
        (kh, kw), (sh, sw) = kernel_size, stride
        n, c, h, w = x.shape
        shape = (n, c, (h - kh) // sh + 1, (w - kw) // sw + 1)
        out = np.empty(shape, dtype=x.dtype)
        self.argmax = argmax = np.empty(shape, dtype=np.int64)
        self.in_shape = x.shape
        # Images are independent: threads take ranges of them.
        K.run_ranges(n, x.nbytes, lambda i, j: K.maxpool2d_fwd(x[i:j], kh, kw, sh, sw, out[i:j], argmax[i:j]))
        return out

    def backward(self, g):
        gx = np.empty(self.in_shape, dtype=g.dtype)
        g, argmax = _contiguous(g), self.argmax
        K.run_ranges(gx.shape[0], gx.nbytes, lambda i, j: K.maxpool2d_bwd(g[i:j], argmax[i:j], gx[i:j]))
        return (gx,)


class Dropout(Function):
    """a * mask, with the mask (already scaled by 1/(1-p)) drawn outside the op"""

    def forward(self, a, mask):
        self.mask = mask
        return a * mask

    def backward(self, g):
        return (g * self.mask,)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0) -> Tensor:
    """2-D cross-correlation (what deep-learning libraries call convolution), NCHW.

    `x` is (N, C, H, W), `weight` (F, C, KH, KW), `bias` (F,) or None; `stride` and
    `padding` (zeros) are ints or (h, w) pairs. Output: (N, F, OH, OW) with
    OH = (H + 2*ph - KH) // sh + 1.
    """
    x, weight = _tensor_arg("conv2d", x), _tensor_arg("conv2d", weight)
    tensors = (x, weight) if bias is None else (x, weight, _tensor_arg("conv2d", bias))
    _check_dtypes("conv2d", *tensors)
    if x.ndim != 4:
        raise ValueError(f"conv2d: input must be 4-D (N, C, H, W), got shape {x.shape}")
    if weight.ndim != 4:
        raise ValueError(f"conv2d: weight must be 4-D (F, C, KH, KW), got shape {weight.shape}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"conv2d: input has {x.shape[1]} channels but weight {weight.shape} expects {weight.shape[1]}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"conv2d: bias must have shape ({weight.shape[0]},), got {bias.shape}")
    stride = _pair("conv2d", "stride", stride, 1)
    padding = _pair("conv2d", "padding", padding, 0)
    for size, k, p in zip(x.shape[2:], weight.shape[2:], padding):
        if size + 2 * p < k:
            raise ValueError(
                f"conv2d: kernel {weight.shape[2:]} is larger than the padded input {x.shape[2:]} (padding {padding})"
            )
    return Conv2d.apply(*tensors, stride=stride, padding=padding)


def max_pool2d(x: Tensor, kernel_size, stride=None) -> Tensor:
    """Max pooling of an (N, C, H, W) input; `stride` defaults to `kernel_size`."""
    x = _tensor_arg("max_pool2d", x)
    if x.ndim != 4:
        raise ValueError(f"max_pool2d: input must be 4-D (N, C, H, W), got shape {x.shape}")
    kernel_size = _pair("max_pool2d", "kernel_size", kernel_size, 1)
    stride = kernel_size if stride is None else _pair("max_pool2d", "stride", stride, 1)
    if x.shape[2] < kernel_size[0] or x.shape[3] < kernel_size[1]:
        raise ValueError(f"max_pool2d: kernel {kernel_size} is larger than the input {x.shape[2:]}")
    if np.isnan(x.data).any():
        raise ValueError("max_pool2d: input has NaN entries (the maximum is undefined)")
    return MaxPool2d.apply(x, kernel_size=kernel_size, stride=stride)


def dropout(x: Tensor, p: float = 0.5, training: bool = True, generator: np.random.Generator | None = None) -> Tensor:
    """Zero each entry with probability `p` and scale the rest by 1/(1-p) (when training).

    The mask is drawn from `generator`, or from sclref's seeded default generator.
    """
    x = _tensor_arg("dropout", x)
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    gen = rng.default_generator() if generator is None else generator
    keep = gen.random(x.shape, dtype=x.dtype) >= p
    mask = keep.astype(x.dtype) * x.dtype.type(1 / (1 - p))
    return Dropout.apply(x, mask=mask)


# -- normalization and global pooling ------------------------------------------------------


class BatchNorm(Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias per channel (axis 1), with the batch's own mean
    and biased variance when `training` (written into `stats`, a (2, C) array), else with the mean and
    variance `stats` holds (eval)"""

    def forward(self, x, weight=None, bias=None, *, stats, training, eps):
        n, c = x.shape[:2]
        self.shape, self.training = x.shape, training
        self.x = x3 = _contiguous(x).reshape(n, c, -1)
        self.weight = np.ones(c, dtype=x.dtype) if weight is None else _contiguous(weight)
        bias = np.zeros(c, dtype=x.dtype) if bias is None else _contiguous(bias)
        self.inv_std = np.empty(c, dtype=x.dtype)
        y = np.empty_like(x3)
        K.batchnorm_fwd(x3, self.weight, bias, x.dtype.type(eps), training, stats[0], stats[1], self.inv_std, y)
        self.mean = stats[0].copy()  # a re-run of the op (check_grads) writes new batch statistics into `stats`
        return y.reshape(x.shape)

    def backward(self, g):
        # With batch statistics, mean and var depend on x, which adds two per-channel terms:
        # gx = weight * inv_std * (g - mean(g) - xhat * mean(g * xhat)), means over the batch axes.
        need_x, need_w, need_b = (self.needs_grad + (False, False))[:3]
        c = self.x.shape[1]
        g_sum, gxhat_sum = np.empty(c, dtype=g.dtype), np.empty(c, dtype=g.dtype)
        gx = np.empty_like(self.x) if need_x else self.x[:0]
        K.batchnorm_bwd(self.x, _contiguous(g).reshape(self.x.shape), self.mean, self.inv_std, self.weight,
                        self.training, need_x, g_sum, gxhat_sum, gx)
        gx = gx.reshape(self.shape) if need_x else None
        return (gx, gxhat_sum if need_w else None, g_sum if need_b else None)[:len(self.needs_grad)]


def _running_stat(name: str, value, x: Tensor) -> np.ndarray:
    """A running statistic as the (C,) array of x's dtype that batch_norm reads and updates in place."""
    arr = value.data if isinstance(value, Tensor) else value
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"batch_norm: {name} must be an ndarray (updated in place) or None, got {type(value).__name__}")
    if arr.shape != (x.shape[1],):
        raise ValueError(f"batch_norm: {name} must have shape ({x.shape[1]},), got {arr.shape}")
    if arr.dtype != x.dtype:
        raise TypeError(f"batch_norm: mixed dtypes {x.dtype.name} (input) and {arr.dtype.name} ({name})")
    return arr


def batch_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, running_mean=None,
               running_var=None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch normalization over the channel axis 1 of an (N, C) or (N, C, H, W) input (any (N, C, ...)).

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, per channel. In training mode the
    mean and (biased) variance are the batch's own over every axis but 1, and the gradient
    flows through them; if `running_mean` and `running_var` are given they are then updated
    in place, as PyTorch does: ``running = (1 - momentum) * running + momentum * batch``,
    with the unbiased batch variance. In eval mode the running statistics are used instead.

    Parameters
    ----------
    x : Tensor
        Input of shape (N, C, ...).
    weight, bias : Tensor or None
        Per-channel scale and shift of shape (C,); None means 1 and 0.
    running_mean, running_var : ndarray or None
        Running statistics of shape (C,) and x's dtype; required in eval mode.
    training : bool
        Normalize by the batch statistics (and update the running ones) instead of the running ones.
    momentum : float
        Weight of the batch in the running statistics, in [0, 1].
    eps : float
        Positive number added to the variance.

    Returns
    -------
    Tensor
        The normalized input, shaped like `x`.
    """
    x = _tensor_arg("batch_norm", x)
    if x.ndim < 2:
        raise ValueError(f"batch_norm: input must be (N, C, ...), got shape {x.shape}")
    c = x.shape[1]
    if weight is None and bias is not None:  # a constant unit scale keeps the op's inputs positional
        weight = Tensor._from_op(np.ones(c, dtype=x.dtype), None)
    tensors = [x] + [_tensor_arg("batch_norm", t) for t in (weight, bias) if t is not None]
    _check_dtypes("batch_norm", *tensors)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (c,):
            raise ValueError(f"batch_norm: {name} must have shape ({c},) for {c} channels, got {t.shape}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm: give both running_mean and running_var, or neither")
    if running_mean is not None:
        running_mean = _running_stat("running_mean", running_mean, x)
        running_var = _running_stat("running_var", running_var, x)
    if not (isinstance(momentum, numbers.Real) and 0 <= momentum <= 1):
        raise ValueError(f"batch_norm: momentum must be a number in [0, 1], got {momentum!r}")
    if not (isinstance(eps, numbers.Real) and 0 < eps < np.inf):
        raise ValueError(f"batch_norm: eps must be a positive finite number, got {eps!r}")
    if training:
        if c == 0 or x.size // c < 2:
            raise ValueError(f"batch_norm: training needs more than one value per channel, got input of shape "
                             f"{x.shape}")
        stats = np.empty((2, c), dtype=x.dtype)
        out = BatchNorm.apply(*tensors, stats=stats, training=True, eps=float(eps))
    else:
        if running_mean is None:
            raise ValueError("batch_norm: eval mode needs running_mean and running_var")
        if not (np.all(np.isfinite(running_mean)) and np.all(running_var >= 0) and np.all(np.isfinite(running_var))):
            raise ValueError("batch_norm: running_mean must be finite and running_var finite and >= 0")
        # A copy: a recorded op must not see the running statistics change under it.
        out = BatchNorm.apply(*tensors, stats=np.stack([running_mean, running_var]), training=False, eps=float(eps))
    if training and running_mean is not None:
        # State is updated here, outside BatchNorm.forward, so the op stays a pure function of its
        # inputs that check_grads can re-run; the batch statistics come from its forward pass.
        m, count = x.dtype.type(momentum), x.size // c
        running_mean[...] = m * stats[0] + (1 - m) * running_mean
        running_var[...] = m * (stats[1] * x.dtype.type(count / (count - 1))) + (1 - m) * running_var
    return out


def global_avg_pool2d(x: Tensor) -> Tensor:
    """Mean over the spatial axes, (N, C, H, W) -> (N, C): adaptive average pooling to 1x1, flattened."""
    x = _tensor_arg("global_avg_pool2d", x)
    if x.ndim != 4:
        raise ValueError(f"global_avg_pool2d: input must be 4-D (N, C, H, W), got shape {x.shape}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"global_avg_pool2d: input has no pixels to average, shape {x.shape}")
    return Mean.apply(x, axis=(2, 3), keepdims=False)
