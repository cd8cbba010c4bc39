"""The graph core: `Tensor`, `Function`, reverse-mode `backward`, and `no_grad`.

This module knows nothing of layers or kernels. A `Function` computes on raw ndarrays;
`Function.apply` wraps its result in a `Tensor` that remembers the function (its
context) when any input requires a gradient. `Tensor.backward` walks that graph in
reverse topological order without recursion, sums gradients on fan-out into fresh
arrays, and stores them only on leaves.

Dtype policy: a tensor holds float64 by default or float32 when asked; every op demands
that its floating inputs share one dtype, so a float32 model stays float32 end to end.
"""

from __future__ import annotations

import contextlib

import numpy as np

DEFAULT_DTYPE = np.float64
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_grad_enabled = True


class no_grad(contextlib.ContextDecorator):
    """Context manager (or decorator) under which no graph is recorded."""

    def __enter__(self):
        global _grad_enabled
        self._prev = _grad_enabled
        _grad_enabled = False
        return self

    def __exit__(self, *exc):
        global _grad_enabled
        _grad_enabled = self._prev
        return False


def is_grad_enabled() -> bool:
    """True unless inside a `no_grad` block."""
    return _grad_enabled


def as_float_array(data, dtype=None) -> np.ndarray:
    """`data` as a float32/float64 ndarray; integers and Python numbers become `DEFAULT_DTYPE`."""
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"sclref tensors hold float32 or float64, not {dtype}")
        return np.asarray(data, dtype=dtype)
    arr = np.asarray(data)
    if arr.dtype not in FLOAT_DTYPES:
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise TypeError(f"cannot make a tensor from data of dtype {arr.dtype}")
        arr = arr.astype(DEFAULT_DTYPE)
    return arr


class Function:
    """One differentiable operation.

    Subclasses implement ``forward(*arrays, **params) -> ndarray`` and
    ``backward(grad) -> tuple`` with one gradient (or None) per tensor input, both on raw
    ndarrays. ``forward`` may keep on ``self`` whatever ``backward`` needs; neither may
    modify its input arrays, and ``backward`` returns new arrays or views of its
    argument, never an array it keeps (a leaf may adopt a new array as its grad).
    Non-tensor parameters (axes, strides) are keyword arguments and are kept in
    ``self.params`` so the op can be re-run (see `sclref.testing`).
    """

    def __init__(self, parents, params):
        self.parents = parents
        self.needs_grad = tuple(p.requires_grad for p in parents)
        self.params = params

    def forward(self, *arrays, **params):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *tensors: "Tensor", **params) -> "Tensor":
        """Run the op on tensors and record it in the graph if a gradient is needed."""
        ctx = cls(tensors, params)
        out = ctx.forward(*[t.data for t in tensors], **params)
        requires = _grad_enabled and any(ctx.needs_grad)
        return Tensor._from_op(out, ctx if requires else None)

    @property
    def name(self) -> str:
        return type(self).__name__

    def release(self) -> None:
        """Drop saved arrays once backward has used them, so memory is freed early."""
        self.__dict__.clear()
        self.parents, self.needs_grad, self.params = (), (), None


class Tensor:
    """An ndarray with an optional gradient and the op that produced it.

    Parameters
    ----------
    data : array_like
        Values; floating arrays keep their dtype, anything else becomes float64.
    requires_grad : bool
        Whether `backward` should compute a gradient for this tensor.
    dtype : float32 or float64, optional
        Convert `data` to this dtype.
    """

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "__weakref__")
    __array_priority__ = 1000  # make ndarray <op> Tensor defer to Tensor's reflected op

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        self.data = as_float_array(data, dtype)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx = None

    @classmethod
    def _from_op(cls, data: np.ndarray, ctx) -> "Tensor":
        t = cls.__new__(cls)
        t.data = data
        t.grad = None
        t.requires_grad = ctx is not None
        t._ctx = ctx
        return t

    # -- attributes ---------------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    @property
    def is_leaf(self) -> bool:
        """True for tensors made by the user rather than by an op."""
        return self._ctx is None

    def numpy(self) -> np.ndarray:
        """The underlying array (not a copy)."""
        return self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> "Tensor":
        """A tensor sharing this one's data, outside any graph."""
        return Tensor._from_op(self.data, None)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        body = np.array2string(self.data, precision=4, separator=", ", threshold=20)
        return f"Tensor({body}, dtype={self.dtype}{grad})"

    # -- backward ----------------------------------------------------------------
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf needing it.

        `grad` is the gradient flowing into this tensor; it may be omitted only for a
        single-element tensor (it is then 1). Unless `retain_graph`, the graph's saved
        arrays are released afterwards and a second backward through it is an error.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient needs a single-element tensor, got shape {self.shape}"
                )
            grad = np.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else np.asarray(grad)
            if grad.shape != self.shape:
                raise ValueError(f"backward(): gradient shape {grad.shape} != tensor shape {self.shape}")
            if grad.dtype != self.dtype:
                raise TypeError(f"backward(): gradient dtype {grad.dtype} != tensor dtype {self.dtype}")
        # The caller's array is never adopted as a leaf's grad.
        handed = {id(grad)}
        if self._ctx is None:
            _accumulate_leaf(self, grad, handed)
            return
        pending = {id(self): grad}
        for node in _toposort(self):
            g = pending.pop(id(node))
            ctx = node._ctx
            if ctx.params is None:
                raise RuntimeError(
                    f"backward through {ctx.name} a second time: its saved arrays were freed; "
                    "pass retain_graph=True to the first backward()"
                )
            parent_grads = ctx.backward(g)
            for parent, needs, pg in zip(ctx.parents, ctx.needs_grad, parent_grads):
                if not needs or pg is None:
                    continue
                if pg.shape != parent.shape:  # a wrong derivative rule, caught where it happens
                    raise RuntimeError(
                        f"{ctx.name}.backward returned a gradient of shape {pg.shape} "
                        f"for an input of shape {parent.shape}"
                    )
                if parent._ctx is None:
                    _accumulate_leaf(parent, pg, handed)
                else:
                    key = id(parent)
                    prev = pending.get(key)
                    pending[key] = pg if prev is None else prev + pg
            if not retain_graph:
                ctx.release()

    # -- operators (rules live in sclref.ops) ---------------------------------------
    def __add__(self, other):
        return _ops.add(self, other)

    def __radd__(self, other):
        return _ops.add(other, self)

    def __sub__(self, other):
        return _ops.sub(self, other)

    def __rsub__(self, other):
        return _ops.sub(other, self)

    def __mul__(self, other):
        return _ops.mul(self, other)

    def __rmul__(self, other):
        return _ops.mul(other, self)

    def __truediv__(self, other):
        return _ops.div(self, other)

    def __rtruediv__(self, other):
        return _ops.div(other, self)

    def __neg__(self):
        return _ops.neg(self)

    def __pow__(self, exponent):
        return _ops.pow(self, exponent)

    def __matmul__(self, other):
        return _ops.matmul(self, other)

    def __rmatmul__(self, other):
        return _ops.matmul(other, self)

    def sum(self, axis=None, keepdims=False):
        return _ops.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return _ops.mean(self, axis, keepdims)

    def reshape(self, *shape):
        return _ops.reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    def flatten(self, start_dim=0):
        return _ops.flatten(self, start_dim)

    def transpose(self, *axes):
        return _ops.transpose(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes or None)

    @property
    def T(self):
        return _ops.transpose(self, None)

    def exp(self):
        return _ops.exp(self)

    def log(self):
        return _ops.log(self)

    def relu(self):
        return _ops.relu(self)

    def sigmoid(self):
        return _ops.sigmoid(self)

    def astype(self, dtype):
        return _ops.cast(self, dtype)


def _accumulate_leaf(leaf: Tensor, g: np.ndarray, handed: set) -> None:
    # A rule may hand back its upstream array or a view of it (add, reshape), so a leaf
    # gets its own copy unless `g` is an array a rule just made: it owns its memory, is
    # writable and contiguous, and was not handed to another leaf or passed in by the
    # caller (ids in `handed`). Two leaves never share one grad buffer.
    if leaf.grad is None:
        own = (g.flags.owndata and g.flags.writeable and g.flags.c_contiguous and g.dtype == leaf.dtype
               and id(g) not in handed)
        leaf.grad = g if own else np.array(g, dtype=leaf.dtype, copy=True)
        handed.add(id(g))
    else:
        leaf.grad = leaf.grad + g


def _toposort(root: Tensor) -> list:
    """Non-leaf nodes reachable from `root`, each after every node that consumes it."""
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for parent, needs in zip(node._ctx.parents, node._ctx.needs_grad):
            if needs and parent._ctx is not None and id(parent) not in seen:
                stack.append((parent, False))
    order.reverse()
    return order


def tensor(data, requires_grad: bool = False, dtype=None) -> Tensor:
    """Make a leaf `Tensor` (same as the constructor)."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


# Tensor's operators dispatch to the op rules; imported last because sclref.ops builds on
# Function and Tensor defined above.
from sclref import ops as _ops  # noqa: E402
