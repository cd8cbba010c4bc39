"""Optimizers and learning-rate schedules: update `Parameter.data` in place from `Parameter.grad`.

`SGD` and `Adam` follow PyTorch's update rules step for step (same order of operations,
same first-step conventions), so a trajectory can be checked against `torch.optim`.
Parameter groups carry their own hyperparameters: SCL trains the weights and the mask
scores with different learning rates. `state_dict` holds only NumPy arrays and Python
values, and a run resumed from it continues bit for bit.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from sclref import kernels
from sclref.kernels import reference
from sclref.nn.module import Parameter

__all__ = ["Adam", "CosineAnnealingLR", "LRScheduler", "Optimizer", "SGD", "StepLR"]


def _real(owner: str, name: str, value) -> float:
    """`value` as a finite Python float; a TypeError or ValueError naming `name` otherwise."""
    # bools are Integral, hence Real: refuse them, `momentum=True` is a bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
    # A Python float, never an np.float64: NumPy scalars are not "weak" under NEP 50 and
    # would silently upcast float32 parameters to float64.
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name}={value} is not finite")
    return value


def _nonnegative(owner: str, name: str, value) -> float:
    value = _real(owner, name, value)
    if value < 0:
        raise ValueError(f"{owner}: {name}={value} is negative")
    return value


def _positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return int(value)


class Optimizer:
    """Base class: parameter groups, per-parameter state, `zero_grad`, `step`, state dicts.

    Parameters
    ----------
    params : iterable of Parameter, or iterable of dict
        The parameters to update, or parameter groups: dicts with a ``"params"`` list and
        any hyperparameters that override `defaults` for that group.
    defaults : dict
        Hyperparameters of every group that does not override them.

    Attributes
    ----------
    param_groups : list of dict
        One dict per group: ``"params"`` (a list of Parameters) and every hyperparameter.
        Schedules and users may change the values (e.g. ``"lr"``) between steps.
    state : dict
        Per-parameter state (momentum buffers, moments, step counts), keyed by
        ``id(param)``; a parameter gets its state at its first step with a gradient.

    Notes
    -----
    Subclasses define `_validate` (check and normalise a group's hyperparameters),
    `_update` (one parameter's update) and `_state_keys` (what `_update` stores).
    """

    _state_keys: frozenset = frozenset()

    def __init__(self, params, defaults: dict):
        name = type(self).__name__
        if isinstance(params, Parameter):
            raise TypeError(f"{name}: params must be an iterable of Parameters or of dicts, not a single Parameter")
        if isinstance(params, (set, frozenset, dict)):
            # The order of parameters defines the indices of state_dict: it must be stable.
            raise TypeError(f"{name}: params must be an ordered iterable (a list), not a {type(params).__name__}")
        self.defaults = self._validate(dict(defaults))
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}
        # Scratch arrays reused by every step, keyed by (dtype, slot), not part of the state.
        self._scratch: dict = {}
        params = list(params)
        if not params:
            raise ValueError(f"{name}: got an empty parameter list")
        dicts = [isinstance(p, dict) for p in params]
        if any(dicts) and not all(dicts):
            raise TypeError(f"{name}: params mixes parameter-group dicts and bare Parameters")
        for group in params if all(dicts) else [{"params": params}]:
            self.add_param_group(group)
        if not any(group["params"] for group in self.param_groups):
            raise ValueError(f"{name}: got an empty parameter list (every parameter group is empty)")

    # -- groups ------------------------------------------------------------------------
    def add_param_group(self, group: dict) -> None:
        """Add a parameter group; hyperparameters it leaves out come from `defaults`.

        Raises if an entry is not a Parameter, a parameter is already in a group (or twice
        in this one), a key is not a hyperparameter of this optimizer, or a value is invalid.
        """
        name = type(self).__name__
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"{name}: a parameter group is a dict with a 'params' entry, got {group!r:.80}")
        unknown = sorted(set(group) - set(self.defaults) - {"params"})
        if unknown:
            raise ValueError(f"{name}: unknown hyperparameters {unknown} in a parameter group; "
                             f"known: {sorted(self.defaults)}")
        params = group["params"]
        if isinstance(params, Parameter):
            params = [params]
        elif isinstance(params, (set, frozenset, dict)):
            raise TypeError(f"{name}: a group's params must be an ordered iterable, not a {type(params).__name__}")
        params = list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        ids = set()
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"{name}: params[{i}] is a {type(p).__name__}, not a Parameter")
            if id(p) in seen:
                raise ValueError(f"{name}: params[{i}] appears in more than one parameter group")
            if id(p) in ids:
                raise ValueError(f"{name}: params[{i}] appears more than once in its parameter group")
            ids.add(id(p))
        hyper = self._validate({**self.defaults, **{k: v for k, v in group.items() if k != "params"}})
        self.param_groups.append({"params": params, **hyper})

    def zero_grad(self) -> None:
        """Set every parameter's gradient to None (the next backward allocates fresh ones)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    # -- the update --------------------------------------------------------------------
    def step(self) -> None:
        """Update every parameter that has a gradient; parameters whose grad is None are skipped."""
        for gi, group in enumerate(self.param_groups):
            # Re-validated each step: a schedule or a user may have edited the group.
            hyper = self._validate(group)
            for pi, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if not isinstance(grad, np.ndarray) or grad.shape != p.data.shape or grad.dtype != p.data.dtype:
                    self._bad_grad(gi, pi, p, grad)
                state = self.state.get(id(p))
                if state is None:
                    state = self.state[id(p)] = {}
                self._update(p.data, grad, state, hyper)

    def _bad_grad(self, gi: int, pi: int, p: Parameter, grad) -> None:
        where = f"{type(self).__name__}: the grad of parameter {pi} in group {gi}"
        if not isinstance(grad, np.ndarray):
            raise TypeError(f"{where} is a {type(grad).__name__}, not an ndarray")
        if grad.shape != p.data.shape:
            raise ValueError(f"{where} has shape {grad.shape}, the parameter has shape {p.data.shape}")
        raise ValueError(f"{where} has dtype {grad.dtype}, the parameter has dtype {p.data.dtype}")

    def _validate(self, group: dict) -> dict:
        """The group's hyperparameters checked and as Python values (no "params")."""
        raise NotImplementedError

    def _update(self, param: np.ndarray, grad: np.ndarray, state: dict, hyper: dict) -> None:
        """Update `param` in place; `grad` is read only (it may be shared with other code)."""
        raise NotImplementedError

    def _work(self, like: np.ndarray, slot: int) -> np.ndarray:
        """A scratch array shaped like `like`, shared by all parameters so steps do not allocate."""
        key = (like.dtype, slot)
        buf = self._scratch.get(key)
        if buf is None or buf.size < like.size:
            buf = self._scratch[key] = np.empty(like.size, like.dtype)
        return buf[:like.size].reshape(like.shape)

    def _decayed_grad(self, param: np.ndarray, grad: np.ndarray, weight_decay: float) -> np.ndarray:
        """grad + weight_decay * param, in a scratch array: p.grad itself is never written."""
        if not weight_decay:
            return grad
        out = self._work(param, 0)
        np.multiply(param, weight_decay, out=out)
        out += grad
        return out

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """A copy of all state: ``{"state": {index: {...}}, "param_groups": [{...}]}``.

        Parameters are numbered 0, 1, ... across the groups in order (as in PyTorch); the
        state holds copies of the arrays, so later steps do not change a saved dict.
        """
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            saved = {k: v for k, v in group.items() if k != "params"}
            saved["params"] = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append(saved)
        state = {}
        for group in self.param_groups:
            for p in group["params"]:
                entry = self.state.get(id(p))
                if entry:
                    state[index[id(p)]] = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in entry.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyperparameters and state saved by `state_dict`; every problem is reported at once.

        The saved groups must match this optimizer's groups in number and size; parameters
        are matched by position. Arrays are copied and converted to each parameter's dtype.
        Nothing changes unless all checks pass.
        """
        name = type(self).__name__
        if not isinstance(state_dict, dict):
            raise TypeError(f"{name}.load_state_dict: expected a dict, got a {type(state_dict).__name__}")
        problems = []
        extra = sorted(set(state_dict) - {"state", "param_groups"}, key=str)
        missing = sorted({"state", "param_groups"} - set(state_dict))
        if extra or missing:
            raise ValueError(f"{name}.load_state_dict: unknown keys {extra}, missing keys {missing}; "
                             "expected 'state' and 'param_groups'")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the state has {len(saved_groups)} parameter groups, "
                             f"the optimizer has {len(self.param_groups)}")
        by_index: dict = {}
        staged_groups = []
        known = set(self.defaults) | {"params"}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            unknown, absent = sorted(set(saved) - known, key=str), sorted(known - set(saved))
            if unknown:
                problems.append(f"group {gi}: unknown keys {unknown}")
            if absent:
                problems.append(f"group {gi}: missing keys {absent}")
            if "params" in saved and len(saved["params"]) != len(group["params"]):
                problems.append(f"group {gi}: size mismatch, {len(saved['params'])} parameters in the state, "
                                f"{len(group['params'])} in the optimizer")
            elif "params" in saved:
                for idx, p in zip(saved["params"], group["params"]):
                    if idx in by_index:
                        problems.append(f"group {gi}: parameter index {idx!r} is listed twice")
                    by_index[idx] = p
            if not unknown and not absent:
                try:
                    staged_groups.append(self._validate(saved))
                except (TypeError, ValueError) as err:
                    problems.append(f"group {gi}: {err}")
        staged_state = {}
        for idx, entry in saved_state.items():
            p = by_index.get(idx)
            if p is None:
                problems.append(f"state for parameter {idx!r}, which no parameter group lists")
                continue
            try:
                staged_state[id(p)] = self._load_entry(entry, p)
            except (TypeError, ValueError) as err:
                problems.append(f"state of parameter {idx}: {err}")
        if problems:
            raise ValueError(f"{name}.load_state_dict: " + "; ".join(problems))
        for group, hyper in zip(self.param_groups, staged_groups):
            group.update(hyper)
        self.state = staged_state

    def _load_entry(self, entry: dict, p: Parameter) -> dict:
        """One parameter's saved state, checked against `p` and copied to its dtype."""
        unknown = sorted(set(entry) - self._state_keys, key=str)
        if unknown:
            raise ValueError(f"unknown keys {unknown}; known: {sorted(self._state_keys)}")
        out = {}
        for key, value in entry.items():
            if key == "step":
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                    raise ValueError(f"step must be a positive integer, got {value!r}")
                out[key] = int(value)
                continue
            arr = np.asarray(value)
            if arr.shape != p.data.shape:
                raise ValueError(f"{key}: size mismatch, shape {arr.shape} in the state, "
                                 f"{p.data.shape} in the parameter")
            if arr.dtype.kind not in "fiu":
                raise ValueError(f"{key}: values of dtype {arr.dtype}")
            out[key] = np.array(arr, dtype=p.data.dtype, copy=True)
        return out


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay.

    With ``d = grad + weight_decay * p``, each step does (as PyTorch's ``torch.optim.SGD``)::

        b = d                                    (first step with momentum)
        b = momentum * b + (1 - dampening) * d   (later steps)
        d = d + momentum * b  if nesterov else  b
        p = p - lr * d

    Parameters
    ----------
    params : iterable of Parameter, or iterable of dict
        Parameters or parameter groups (see `Optimizer`).
    lr : float
        Learning rate, finite and >= 0.
    momentum : float, default 0
        Momentum factor, >= 0; 0 disables the momentum buffer.
    dampening : float, default 0
        Dampening of the gradient's contribution to the momentum buffer, in [0, 1].
    weight_decay : float, default 0
        L2 penalty coefficient, >= 0 (added to the gradient).
    nesterov : bool, default False
        Nesterov momentum; needs momentum > 0 and dampening == 0.
    """

    _state_keys = frozenset({"momentum_buffer"})

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def _validate(self, group: dict) -> dict:
        hyper = {
            "lr": _nonnegative("SGD", "learning rate lr", group["lr"]),
            "momentum": _nonnegative("SGD", "momentum", group["momentum"]),
            "dampening": _nonnegative("SGD", "dampening", group["dampening"]),
            "weight_decay": _nonnegative("SGD", "weight_decay", group["weight_decay"]),
            "nesterov": group["nesterov"],
        }
        if hyper["dampening"] > 1:
            raise ValueError(f"SGD: dampening={hyper['dampening']} is above 1")
        if not isinstance(hyper["nesterov"], (bool, np.bool_)):
            raise TypeError(f"SGD: nesterov must be a bool, got {hyper['nesterov']!r}")
        hyper["nesterov"] = bool(hyper["nesterov"])
        if hyper["nesterov"] and (hyper["momentum"] == 0 or hyper["dampening"] != 0):
            raise ValueError("SGD: nesterov momentum needs momentum > 0 and dampening == 0, got "
                             f"momentum={hyper['momentum']}, dampening={hyper['dampening']}")
        return hyper

    def _update(self, param, grad, state, hyper):
        momentum = hyper["momentum"]
        buf = state.get("momentum_buffer")
        first = momentum != 0 and buf is None
        if first:
            # PyTorch's convention: the first buffer is the gradient itself, undamped.
            buf = state["momentum_buffer"] = np.empty_like(param)
        # One fused pass when the arrays allow it; NumPy operations otherwise (same result).
        update = kernels.sgd_update if param.flags.c_contiguous and grad.flags.c_contiguous else reference.sgd_update
        update(param, grad, param.reshape(-1)[:0] if buf is None else buf, hyper["lr"], momentum, hyper["dampening"],
               hyper["weight_decay"], hyper["nesterov"], first)


class Adam(Optimizer):
    """Adam with bias correction and L2 weight decay (PyTorch's ``torch.optim.Adam``, no AMSGrad).

    With ``g = grad + weight_decay * p`` and t the parameter's step count (from 1)::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    Parameters
    ----------
    params : iterable of Parameter, or iterable of dict
        Parameters or parameter groups (see `Optimizer`).
    lr : float, default 1e-3
        Learning rate, finite and >= 0.
    betas : tuple of two floats, default (0.9, 0.999)
        Decay rates of the first and second moment estimates, each in [0, 1).
    eps : float, default 1e-8
        Added to the denominator, > 0.
    weight_decay : float, default 0
        L2 penalty coefficient, >= 0 (added to the gradient, not decoupled as in AdamW).
    """

    _state_keys = frozenset({"step", "exp_avg", "exp_avg_sq"})

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _validate(self, group: dict) -> dict:
        betas = group["betas"]
        if isinstance(betas, np.ndarray):
            betas = betas.tolist()
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Adam: betas must be a pair (beta1, beta2), got {betas!r}")
        betas = tuple(_real("Adam", f"betas[{i}]", b) for i, b in enumerate(betas))
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Adam: betas[{i}]={b} is outside [0, 1)")
        eps = _real("Adam", "eps", group["eps"])
        if eps <= 0:
            raise ValueError(f"Adam: eps={eps} must be > 0")
        return {
            "lr": _nonnegative("Adam", "learning rate lr", group["lr"]),
            "betas": betas,
            "eps": eps,
            "weight_decay": _nonnegative("Adam", "weight_decay", group["weight_decay"]),
        }

    def _load_entry(self, entry, p):
        missing = sorted(self._state_keys - set(entry))
        if entry and missing:
            raise ValueError(f"missing keys {missing}")
        return super()._load_entry(entry, p)

    def _update(self, param, grad, state, hyper):
        beta1, beta2 = hyper["betas"]
        g = self._decayed_grad(param, grad, hyper["weight_decay"])
        if not state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(param)
            state["exp_avg_sq"] = np.zeros_like(param)
        state["step"] += 1
        # One fused pass when the arrays allow it; NumPy operations otherwise (same result).
        contiguous = param.flags.c_contiguous and g.flags.c_contiguous
        update = kernels.adam_update if contiguous else reference.adam_update
        update(param, g, state["exp_avg"], state["exp_avg_sq"], hyper["lr"], beta1, beta2, hyper["eps"],
               state["step"])


class LRScheduler:
    """Base class of learning-rate schedules: sets each group's lr from a closed form of the epoch.

    Parameters
    ----------
    optimizer : Optimizer
        The optimizer whose groups' ``"lr"`` the schedule sets.

    Attributes
    ----------
    base_lrs : list of float
        Each group's lr when the schedule was made (epoch 0).
    last_epoch : int
        Number of `step` calls so far.

    Notes
    -----
    Call `step` once per epoch, after the epoch's optimizer steps. The lr at epoch e is
    ``_lr_at(e, base_lr)``, a closed form rather than a running product, so values do not
    drift and a resumed schedule gives the same floats as an uninterrupted one.
    """

    def __init__(self, optimizer: Optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: expected an Optimizer, got a {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_epoch = 0
        self._last_lr = list(self.base_lrs)

    def _lr_at(self, epoch: int, base_lr: float) -> float:
        raise NotImplementedError

    def _hyperparameters(self) -> dict:
        raise NotImplementedError

    def _set_hyperparameters(self, values: dict) -> None:
        """Check every value, then set them all (nothing is set if one is invalid)."""
        raise NotImplementedError

    def step(self) -> None:
        """Advance one epoch and set every group's lr to the schedule's value there."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self.base_lrs):
            raise RuntimeError(f"{type(self).__name__}: the optimizer has {len(groups)} param groups but the "
                               f"schedule was made for {len(self.base_lrs)}")
        self.last_epoch += 1
        self._last_lr = [self._lr_at(self.last_epoch, base) for base in self.base_lrs]
        for group, lr in zip(groups, self._last_lr):
            group["lr"] = lr

    def get_last_lr(self) -> list[float]:
        """The lr of each group set by the last `step` (the base lrs before any step)."""
        return list(self._last_lr)

    def state_dict(self) -> dict:
        """The epoch, base lrs, last lrs and the schedule's hyperparameters, as Python values."""
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs), "last_lr": list(self._last_lr),
                **self._hyperparameters()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a saved schedule and set each group's lr to the saved last lr."""
        name = type(self).__name__
        if not isinstance(state_dict, dict):
            raise TypeError(f"{name}.load_state_dict: expected a dict, got a {type(state_dict).__name__}")
        known = {"last_epoch", "base_lrs", "last_lr"} | set(self._hyperparameters())
        unknown, missing = sorted(set(state_dict) - known, key=str), sorted(known - set(state_dict))
        if unknown or missing:
            raise ValueError(f"{name}.load_state_dict: unknown keys {unknown}, missing keys {missing}")
        n = len(self.optimizer.param_groups)
        if len(state_dict["base_lrs"]) != n or len(state_dict["last_lr"]) != n:
            raise ValueError(f"{name}.load_state_dict: size mismatch, the state has lrs for "
                             f"{len(state_dict['base_lrs'])} param groups, the optimizer has {n}")
        epoch = state_dict["last_epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"{name}.load_state_dict: last_epoch must be an integer >= 0, got {epoch!r}")
        base_lrs = [_nonnegative(name, "base lr", lr) for lr in state_dict["base_lrs"]]
        last_lr = [_nonnegative(name, "last lr", lr) for lr in state_dict["last_lr"]]
        self._set_hyperparameters({k: state_dict[k] for k in self._hyperparameters()})
        self.last_epoch, self.base_lrs, self._last_lr = int(epoch), base_lrs, last_lr
        for group, lr in zip(self.optimizer.param_groups, last_lr):
            group["lr"] = lr


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (epoch // step_size): decay by `gamma` every `step_size` epochs.

    Parameters
    ----------
    optimizer : Optimizer
        The optimizer to schedule.
    step_size : int
        Epochs between decays, >= 1.
    gamma : float, default 0.1
        Multiplicative decay, finite and >= 0.
    """

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1):
        self._set_hyperparameters({"step_size": step_size, "gamma": gamma})
        super().__init__(optimizer)

    def _hyperparameters(self):
        return {"step_size": self.step_size, "gamma": self.gamma}

    def _set_hyperparameters(self, values):
        step_size = _positive_int("StepLR", "step_size", values["step_size"])
        self.gamma = _nonnegative("StepLR", "gamma", values["gamma"])
        self.step_size = step_size

    def _lr_at(self, epoch, base_lr):
        return base_lr * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2.

    The closed form of PyTorch's ``CosineAnnealingLR`` (SGDR without restarts): the lr falls
    from base_lr to eta_min over T_max epochs, then rises again if stepping continues.

    Parameters
    ----------
    optimizer : Optimizer
        The optimizer to schedule.
    T_max : int
        Epochs of the half cosine period, >= 1.
    eta_min : float, default 0.0
        The lowest lr, finite and >= 0.
    """

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0):
        self._set_hyperparameters({"T_max": T_max, "eta_min": eta_min})
        super().__init__(optimizer)

    def _hyperparameters(self):
        return {"T_max": self.T_max, "eta_min": self.eta_min}

    def _set_hyperparameters(self, values):
        T_max = _positive_int("CosineAnnealingLR", "T_max", values["T_max"])
        self.eta_min = _nonnegative("CosineAnnealingLR", "eta_min", values["eta_min"])
        self.T_max = T_max

    def _lr_at(self, epoch, base_lr):
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2
