"""`Parameter` and `Module`: trainable tensors and the containers that own them.

A `Module` registers the `Parameter`s and sub-`Module`s assigned to its attributes, in
assignment order, so that `named_parameters`, `state_dict` and `train`/`eval` walk the
model the same way every time. Buffers (`register_buffer`) are arrays of state that is
saved and restored with the parameters but never trained, such as running statistics.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import numpy as np

from sclref.autograd import FLOAT_DTYPES, Tensor


class Parameter(Tensor):
    """A leaf tensor that a `Module` owns and optimizers update (requires_grad=True)."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True, dtype=None):
        super().__init__(data, requires_grad=requires_grad, dtype=dtype)

    def __repr__(self):
        return "Parameter" + super().__repr__()[len("Tensor"):]


class Module:
    """Base class of layers and models: subclasses set attributes and define `forward`."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        if name in self._buffers:  # a registered buffer stays one: it takes a new array or None
            if value is not None and not isinstance(value, np.ndarray):
                raise TypeError(f"{type(self).__name__}.{name} is a buffer: assign an ndarray or None, "
                                f"not a {type(value).__name__}")
            self._buffers[name] = value
            object.__setattr__(self, name, value)
            return
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        self._buffers.pop(name, None)
        object.__delattr__(self, name)

    def register_buffer(self, name: str, value: np.ndarray | None) -> None:
        """Make attribute `name` a buffer: state kept in `state_dict` but not trained.

        Parameters
        ----------
        name : str
            Attribute name; it must not already name a parameter or sub-module.
        value : ndarray or None
            The array (None registers the name without state; it is left out of `state_dict`).
        """
        if "_buffers" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"register_buffer: {name!r} is not a valid attribute name")
        if name in self._parameters or name in self._modules:
            raise ValueError(f"register_buffer: {name!r} already names a parameter or sub-module")
        if value is not None and not isinstance(value, np.ndarray):
            raise TypeError(f"register_buffer: {name!r} must be an ndarray or None, not a {type(value).__name__}")
        self._buffers[name] = value
        object.__setattr__(self, name, value)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -- traversal ---------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """This module and every sub-module, depth first, with dotted names."""
        yield prefix, self
        for name, mod in self._modules.items():
            yield from mod.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        for _, mod in self.named_modules():
            yield mod

    def children(self) -> Iterator["Module"]:
        return iter(self._modules.values())

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Every parameter once, with its dotted name, in registration order."""
        seen = set()
        for mod_name, mod in self.named_modules(prefix):
            for name, p in mod._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        """Every buffer that holds an array once, with its dotted name, in registration order."""
        seen = set()
        for mod_name, mod in self.named_modules(prefix):
            for name, b in mod._buffers.items():
                if b is not None and id(b) not in seen:
                    seen.add(id(b))
                    yield (f"{mod_name}.{name}" if mod_name else name), b

    def buffers(self) -> Iterator[np.ndarray]:
        for _, b in self.named_buffers():
            yield b

    # -- modes and dtypes --------------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        """Set training mode (dropout active) on this module and all sub-modules."""
        for mod in self.modules():
            object.__setattr__(mod, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def to(self, dtype) -> "Module":
        """Convert every parameter and floating buffer to float32 or float64 in place (gradients are dropped).

        Integer buffers (counters) keep their dtype.
        """
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"Module.to: parameters are float32 or float64, not {dtype}")
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        for mod in self.modules():
            for name, b in list(mod._buffers.items()):
                if b is not None and np.issubdtype(b.dtype, np.floating):
                    setattr(mod, name, b.astype(dtype))
        return self

    def float(self) -> "Module":
        return self.to(np.float32)

    def double(self) -> "Module":
        return self.to(np.float64)

    # -- state -------------------------------------------------------------------------
    def _state_slots(self) -> "OrderedDict[str, tuple[Module, str, np.ndarray]]":
        """Dotted name -> (owning module, attribute, current array) of every parameter and buffer.

        Module by module, parameters before buffers (PyTorch's order); anything shared once,
        under its first name.
        """
        slots, seen = OrderedDict(), set()
        for mod_name, mod in self.named_modules():
            entries = list(mod._parameters.items()) + [(n, b) for n, b in mod._buffers.items() if b is not None]
            for name, value in entries:
                if id(value) not in seen:
                    seen.add(id(value))
                    arr = value.data if isinstance(value, Parameter) else value
                    slots[f"{mod_name}.{name}" if mod_name else name] = (mod, name, arr)
        return slots

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Copies of every parameter's and buffer's values, keyed by dotted name."""
        return OrderedDict((name, arr.copy()) for name, (_, _, arr) in self._state_slots().items())

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy values from `state` into the parameters and buffers; every problem is reported at once.

        With `strict`, missing and unexpected keys are errors. Shapes must match; values
        are converted to each parameter's or buffer's dtype, and an integer buffer only
        takes whole numbers. Nothing is changed unless all checks pass.
        """
        slots = self._state_slots()
        problems = []
        if strict:
            missing = [k for k in slots if k not in state]
            unexpected = [k for k in state if k not in slots]
            if missing:
                problems.append(f"missing keys {missing}")
            if unexpected:
                problems.append(f"unexpected keys {unexpected}")
        staged = {}
        for name, (_, _, current) in slots.items():
            if name not in state:
                continue
            value = np.asarray(state[name].data if isinstance(state[name], Tensor) else state[name])
            if value.shape != current.shape:
                problems.append(f"{name}: shape {value.shape} in the state, {current.shape} in the model")
            elif not np.issubdtype(value.dtype, np.number) or np.issubdtype(value.dtype, np.complexfloating):
                problems.append(f"{name}: values of dtype {value.dtype}")  # complex would lose its imaginary part
            elif np.issubdtype(current.dtype, np.integer) and not _fits_integer(value, current.dtype):
                problems.append(f"{name}: {current.dtype} counter given values that are not whole numbers "
                                f"in its range")
            else:
                staged[name] = value
        if problems:
            raise ValueError(f"load_state_dict into {type(self).__name__}: " + "; ".join(problems))
        for name, value in staged.items():
            mod, attr, current = slots[name]
            new = np.array(value, dtype=current.dtype, copy=True)
            if attr in mod._parameters:
                mod._parameters[attr].data = new
            else:
                setattr(mod, attr, new)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"  ({name}): " + repr(mod).replace("\n", "\n  ") for name, mod in self._modules.items()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + (")" if not lines else "\n" + "\n".join(lines) + "\n)")


def _fits_integer(value: np.ndarray, dtype: np.dtype) -> bool:
    """Whether every entry of `value` is a whole number that the integer `dtype` holds."""
    if value.size == 0:
        return True
    if not np.issubdtype(value.dtype, np.integer) and not np.all(np.isfinite(value) & (value == np.round(value))):
        return False
    info = np.iinfo(dtype)
    # Python compares ints with floats exactly, so float(2**63) > int64's maximum as it should.
    return info.min <= value.min().item() and value.max().item() <= info.max
