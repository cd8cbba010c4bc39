"""Optimizers and schedules: update rules vs float64 references, groups, dtypes, resume, errors."""

import copy
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sclref.autograd import Tensor
from sclref.nn.module import Parameter
from sclref.optim import SGD, Adam, CosineAnnealingLR, StepLR
from tests.strategies import SEEDS

SHAPES = [(3, 4), (5,), ()]


# -- float64 references, written from the documented rules with fresh arrays -------------
def sgd_reference(p, grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    """torch.optim.SGD's documented rule; a None grad skips the step."""
    p, buf = np.array(p, dtype=np.float64), None
    for g in grads:
        if g is None:
            continue
        d = g + weight_decay * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
    return p


def adam_reference(p, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """Adam as in Kingma & Ba and torch.optim.Adam's docs: bias-corrected m_hat / (sqrt(v_hat) + eps)."""
    (b1, b2), p = betas, np.array(p, dtype=np.float64)
    m = v = np.zeros_like(p)
    t = 0
    for g in grads:
        if g is None:
            continue
        t += 1
        g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def random_problem(seed, steps, dtype=np.float64, none_rate=0.0):
    """Initial values of one parameter per SHAPE and `steps` rounds of grads (some None)."""
    gen = np.random.default_rng(seed)
    p0 = [gen.standard_normal(s).astype(dtype) for s in SHAPES]
    rounds = [[None if gen.random() < none_rate else gen.standard_normal(s).astype(dtype) for s in SHAPES]
              for _ in range(steps)]
    return p0, rounds


def run(make_opt, p0, rounds):
    params = [Parameter(p.copy()) for p in p0]
    opt = make_opt(params)
    feed(opt, params, rounds)
    return params, opt


def feed(opt, params, rounds):
    for grads in rounds:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.copy()
        opt.step()


def column(rounds, i):
    return [grads[i] for grads in rounds]


# -- update rules --------------------------------------------------------------------------
SGD_VARIANTS = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "dampening": {"momentum": 0.8, "dampening": 0.3},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "weight_decay": {"weight_decay": 0.05},
    "all": {"momentum": 0.7, "weight_decay": 0.02, "nesterov": True},
}


@pytest.mark.parametrize("variant", SGD_VARIANTS)
@settings(deadline=None)
@given(seed=SEEDS, lr=st.floats(1e-3, 1.0), steps=st.integers(1, 6))
def test_sgd_follows_the_documented_rule(variant, seed, lr, steps):
    hyper = dict(lr=lr, **SGD_VARIANTS[variant])
    p0, rounds = random_problem(seed, steps, none_rate=0.2)
    params, _ = run(lambda ps: SGD(ps, **hyper), p0, rounds)
    for i, p in enumerate(params):
        np.testing.assert_allclose(p.data, sgd_reference(p0[i], column(rounds, i), **hyper), rtol=1e-12, atol=1e-12)


@settings(deadline=None)
@given(seed=SEEDS, lr=st.floats(1e-4, 0.5), b1=st.floats(0.0, 0.99), b2=st.floats(0.0, 0.9999),
       eps=st.sampled_from([1e-8, 1e-3, 0.5]), wd=st.sampled_from([0.0, 0.01, 0.3]), steps=st.integers(1, 8))
def test_adam_follows_the_documented_rule(seed, lr, b1, b2, eps, wd, steps):
    hyper = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    p0, rounds = random_problem(seed, steps, none_rate=0.2)
    params, _ = run(lambda ps: Adam(ps, **hyper), p0, rounds)
    for i, p in enumerate(params):
        np.testing.assert_allclose(p.data, adam_reference(p0[i], column(rounds, i), **hyper), rtol=1e-12, atol=1e-12)


def test_first_momentum_buffer_is_the_undamped_gradient():
    # PyTorch's convention; the damped alternative would move p by lr * 0.5 * g1 instead.
    p = Parameter(np.array([1.0, -2.0]))
    opt = SGD([p], lr=0.5, momentum=0.25, dampening=0.5)
    g1, g2 = np.array([2.0, 4.0]), np.array([8.0, -16.0])
    p.grad = g1
    opt.step()
    np.testing.assert_array_equal(p.data, [0.0, -4.0])
    p.grad = g2
    opt.step()
    # buffer = 0.25 * g1 + 0.5 * g2 = [4.5, -7]; p -= 0.5 * buffer
    np.testing.assert_array_equal(p.data, [-2.25, -0.5])


def test_the_references_tell_the_variants_apart():
    # A test of the tests: each hyperparameter changes the reference trajectory, so the
    # comparisons above would catch an optimizer that ignored it.
    p0, rounds = random_problem(0, 4)
    grads = column(rounds, 0)
    trajectories = [sgd_reference(p0[0], grads, 0.1, **v) for v in SGD_VARIANTS.values()]
    trajectories += [adam_reference(p0[0], grads, 0.1), adam_reference(p0[0], grads, 0.1, betas=(0.5, 0.999)),
                     adam_reference(p0[0], grads, 0.1, eps=0.5), adam_reference(p0[0], grads, 0.1, weight_decay=0.3)]
    for i, a in enumerate(trajectories):
        for b in trajectories[i + 1:]:
            assert not np.allclose(a, b, rtol=1e-6)


# -- groups, skipped parameters, dtypes, in-place updates ----------------------------------
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_groups_update_with_their_own_hyperparameters(kind):
    p0, rounds = random_problem(1, 5)
    if kind == "sgd":
        make = lambda ps: SGD([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.5, "momentum": 0.0}],  # noqa: E731
                              lr=0.01, momentum=0.9)
        refs = [lambda p, g: sgd_reference(p, g, lr=0.01, momentum=0.9)] * 2 + [lambda p, g: sgd_reference(p, g, 0.5)]
    else:
        make = lambda ps: Adam([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.3, "betas": (0.5, 0.9)}],  # noqa: E731
                               lr=0.01)
        refs = [lambda p, g: adam_reference(p, g, lr=0.01)] * 2 + [lambda p, g: adam_reference(p, g, 0.3, (0.5, 0.9))]
    params, opt = run(make, p0, rounds)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1]
    for i, p in enumerate(params):
        np.testing.assert_allclose(p.data, refs[i](p0[i], column(rounds, i)), rtol=1e-12, atol=1e-12)


def test_add_param_group_takes_missing_hyperparameters_from_the_defaults():
    w, s = Parameter(np.ones(2)), Parameter(np.ones(3))
    opt = SGD([w], lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt.add_param_group({"params": s, "lr": 2.0})
    assert opt.param_groups[1]["params"] == [s]
    assert {k: v for k, v in opt.param_groups[1].items() if k != "params"} == {
        "lr": 2.0, "momentum": 0.9, "dampening": 0.0, "weight_decay": 1e-4, "nesterov": False}
    s.grad = np.ones(3)
    opt.step()
    np.testing.assert_array_equal(s.data, 1.0 - 2.0 * (1.0 + 1e-4))
    np.testing.assert_array_equal(w.data, 1.0)


OPTIMIZERS = {
    "sgd": lambda ps: SGD(ps, lr=0.1),
    "sgd_momentum_wd": lambda ps: SGD(ps, lr=0.05, momentum=0.9, dampening=0.2, weight_decay=1e-2),
    "sgd_nesterov": lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda ps: Adam(ps, lr=1e-2, weight_decay=1e-3),
    "adam_groups": lambda ps: Adam([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.1, "betas": (0.5, 0.9)}]),
}


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_parameters_without_grad_are_untouched(kind):
    gen = np.random.default_rng(2)
    moving, frozen = Parameter(gen.standard_normal(4)), Parameter(gen.standard_normal(3))
    later = Parameter(gen.standard_normal(5))
    before = frozen.data.copy()
    opt = OPTIMIZERS[kind]([moving, frozen, later])
    moving.grad, later.grad = gen.standard_normal(4), gen.standard_normal(5)
    opt.step()
    # A step with grad None must not move a parameter even if it has momentum.
    after_one = later.data.copy()
    later.grad = None
    moving.grad = gen.standard_normal(4)
    opt.step()
    np.testing.assert_array_equal(frozen.data, before)
    np.testing.assert_array_equal(later.data, after_one)
    assert id(frozen) not in opt.state
    assert 1 not in opt.state_dict()["state"]


FLOAT32_CASES = {
    "sgd": (lambda ps: SGD(ps, lr=np.float64(0.1), momentum=np.float64(0.9), weight_decay=np.float64(1e-2),
                           nesterov=np.True_),
            lambda p, g: sgd_reference(p, g, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)),
    "sgd_dampening": (lambda ps: SGD(ps, lr=np.float64(0.1), momentum=np.float64(0.5), dampening=np.float64(0.1)),
                      lambda p, g: sgd_reference(p, g, lr=0.1, momentum=0.5, dampening=0.1)),
    "adam": (lambda ps: Adam(ps, lr=np.float64(1e-2), betas=np.array([0.9, 0.99]), eps=np.float64(1e-6),
                             weight_decay=np.float64(1e-2)),
             lambda p, g: adam_reference(p, g, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2)),
}


@pytest.mark.parametrize("kind", FLOAT32_CASES)
def test_float32_parameters_stay_float32(kind):
    # NumPy float64 hyperparameters are not "weak" scalars: they must not upcast the update.
    make, ref = FLOAT32_CASES[kind]
    p0, rounds = random_problem(3, 6, dtype=np.float32)
    params, opt = run(make, p0, rounds)
    for group in opt.param_groups:
        assert all(type(v) in (float, bool, tuple) for k, v in group.items() if k != "params")
    for i, p in enumerate(params):
        assert p.data.dtype == np.float32
        for value in opt.state[id(p)].values():
            assert not isinstance(value, np.ndarray) or value.dtype == np.float32
        grads64 = [g.astype(np.float64) for g in column(rounds, i)]
        np.testing.assert_allclose(p.data, ref(p0[i].astype(np.float64), grads64), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_updates_are_in_place_and_never_write_the_grad(kind):
    gen = np.random.default_rng(4)
    a, b = Parameter(gen.standard_normal((2, 3))), Parameter(gen.standard_normal((2, 3)))
    data, view = a.data, a.data[0]
    first_row = view.copy()
    shared = gen.standard_normal((2, 3))
    opt = OPTIMIZERS[kind]([a, b])
    for _ in range(3):
        a.grad = b.grad = shared  # one array behind two parameters
        saved = shared.copy()
        opt.step()
        np.testing.assert_array_equal(shared, saved)
    assert a.data is data
    assert not np.array_equal(view, first_row)  # the view sees the update
    for p in (a, b):
        for value in opt.state[id(p)].values():
            assert not (isinstance(value, np.ndarray) and np.shares_memory(value, shared))


# -- state dicts ---------------------------------------------------------------------------
def assert_plain(value):
    """Only NumPy arrays and plain Python values, all the way down."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert type(k) in (str, int)
            assert_plain(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            assert_plain(v)
    else:
        assert type(value) in (np.ndarray, int, float, bool), type(value)


def assert_same_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i, entry in a["state"].items():
        assert entry.keys() == b["state"][i].keys()
        for key, value in entry.items():
            np.testing.assert_array_equal(value, b["state"][i][key])


@pytest.mark.parametrize("kind", OPTIMIZERS)
@settings(deadline=None)
@given(seed=SEEDS, k=st.integers(0, 4), m=st.integers(1, 4), float32=st.booleans())
def test_resume_from_state_dict_is_bit_identical(kind, seed, k, m, float32):
    make = OPTIMIZERS[kind]
    p0, rounds = random_problem(seed, k + m, dtype=np.float32 if float32 else np.float64, none_rate=0.3)
    params, opt = run(make, p0, rounds[:k])
    saved = opt.state_dict()
    pristine = copy.deepcopy(saved)
    at_save = [p.data.copy() for p in params]
    feed(opt, params, rounds[k:])  # the saved dict must not see these steps

    resumed = [Parameter(a.copy()) for a in at_save]
    fresh = make(resumed)
    for group in fresh.param_groups:
        group["lr"] = 123.0  # overwritten by the load
    fresh.load_state_dict(saved)
    feed(fresh, resumed, rounds[k:])
    assert_plain(saved)
    assert_same_state(saved, pristine)  # neither optimizer kept references into the dict
    for p, q in zip(params, resumed):
        assert q.data.dtype == p.data.dtype
        np.testing.assert_array_equal(q.data, p.data)
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in opt.param_groups]


def test_state_dict_numbers_parameters_across_groups():
    a, b, c = (Parameter(np.zeros(2)) for _ in range(3))
    opt = Adam([{"params": [a, b]}, {"params": [c], "lr": 0.5}])
    c.grad = np.ones(2)
    opt.step()
    saved = opt.state_dict()
    assert [g["params"] for g in saved["param_groups"]] == [[0, 1], [2]]
    assert sorted(saved["state"]) == [2]
    assert saved["state"][2]["step"] == 1
    assert saved["param_groups"][1] == {"lr": 0.5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                                        "params": [2]}


def test_resume_of_optimizer_and_schedule_together_is_bit_identical():
    p0, rounds = random_problem(5, 12)

    def make(ps):
        opt = SGD([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.3}], lr=0.1, momentum=0.9)
        return opt, CosineAnnealingLR(opt, T_max=4, eta_min=1e-3)

    def train(opt, sched, params, epochs):
        for epoch in epochs:
            feed(opt, params, rounds[2 * epoch:2 * epoch + 2])
            sched.step()

    params = [Parameter(p.copy()) for p in p0]
    opt, sched = make(params)
    train(opt, sched, params, range(3))
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    at_save = [p.data.copy() for p in params]
    train(opt, sched, params, range(3, 6))

    resumed = [Parameter(a) for a in at_save]
    opt2, sched2 = make(resumed)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert_plain(saved_sched)
    train(opt2, sched2, resumed, range(3, 6))
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert sched2.last_epoch == sched.last_epoch == 6
    for p, q in zip(params, resumed):
        np.testing.assert_array_equal(q.data, p.data)


# -- schedules -----------------------------------------------------------------------------
def scheduled(make_sched, base_lrs, epochs):
    params = [Parameter(np.zeros(1)) for _ in base_lrs]
    opt = SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base_lrs)], lr=0.0)
    sched = make_sched(opt)
    values = [sched.get_last_lr()]
    for _ in range(epochs):
        sched.step()
        values.append(sched.get_last_lr())
        assert values[-1] == [g["lr"] for g in opt.param_groups]
    return values


@settings(deadline=None)
@given(step_size=st.integers(1, 5), gamma=st.floats(0.0, 2.0), base=st.lists(st.floats(0.0, 1.0), min_size=1,
       max_size=3), epochs=st.integers(0, 20))
def test_step_lr_is_its_closed_form(step_size, gamma, base, epochs):
    values = scheduled(lambda o: StepLR(o, step_size, gamma), base, epochs)
    for e, lrs in enumerate(values):
        assert lrs == [b * gamma ** (e // step_size) for b in base]


def test_step_lr_decays_every_step_size_epochs():
    assert scheduled(lambda o: StepLR(o, step_size=2, gamma=0.5), [1.0, 4.0], 5) == [
        [1.0, 4.0], [1.0, 4.0], [0.5, 2.0], [0.5, 2.0], [0.25, 1.0], [0.25, 1.0]]


@settings(deadline=None)
@given(T_max=st.integers(1, 10), eta_min=st.floats(0.0, 0.01), base=st.lists(st.floats(0.01, 1.0), min_size=1,
       max_size=3), epochs=st.integers(0, 30))
def test_cosine_annealing_is_its_closed_form(T_max, eta_min, base, epochs):
    values = scheduled(lambda o: CosineAnnealingLR(o, T_max, eta_min), base, epochs)
    assert values[0] == base
    for e, lrs in enumerate(values[1:], 1):
        assert lrs == [eta_min + (b - eta_min) * (1 + math.cos(math.pi * e / T_max)) / 2 for b in base]
    if epochs >= T_max:
        assert values[T_max] == [eta_min] * len(base)  # cos(pi) is exactly -1


def test_cosine_annealing_reaches_the_midpoint_and_the_floor():
    values = scheduled(lambda o: CosineAnnealingLR(o, T_max=4, eta_min=0.1), [0.5], 8)
    assert values[2][0] == pytest.approx(0.3, rel=1e-15)
    assert values[4] == [0.1]
    assert values[8][0] == pytest.approx(0.5, rel=1e-15)  # it rises again after T_max


@pytest.mark.parametrize("kind", ["step", "cosine"])
def test_schedules_match_torch(kind):
    torch = pytest.importorskip("torch")
    base = [0.1, 0.03]
    if kind == "step":
        ours = lambda o: StepLR(o, step_size=3, gamma=0.7)  # noqa: E731
        theirs = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.7)  # noqa: E731
    else:
        ours = lambda o: CosineAnnealingLR(o, T_max=7, eta_min=1e-3)  # noqa: E731
        theirs = lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7, eta_min=1e-3)  # noqa: E731
    expected = scheduled(ours, base, 25)
    tparams = [torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)) for _ in base]
    topt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(tparams, base)], lr=0.0)
    tsched = theirs(topt)
    got = [tsched.get_last_lr()]
    for _ in range(25):
        topt.step()
        tsched.step()
        got.append(tsched.get_last_lr())
    np.testing.assert_allclose(expected, got, rtol=1e-12, atol=1e-15)


def test_schedule_state_dict_round_trip_sets_the_lrs():
    params = [Parameter(np.zeros(1))]
    opt = SGD(params, lr=0.2)
    sched = StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        sched.step()
    saved = sched.state_dict()
    assert saved == {"last_epoch": 3, "base_lrs": [0.2], "last_lr": [0.1], "step_size": 2, "gamma": 0.5}
    opt2 = SGD([Parameter(np.zeros(1))], lr=0.2)
    sched2 = StepLR(opt2, step_size=5, gamma=0.9)
    sched2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 0.1
    assert (sched2.step_size, sched2.gamma, sched2.last_epoch) == (2, 0.5, 3)
    sched.step()
    sched2.step()
    assert sched2.get_last_lr() == sched.get_last_lr() == [0.05]


# -- PyTorch trajectories ------------------------------------------------------------------
TORCH_CASES = {
    "sgd": ("SGD", dict(lr=0.1)),
    "sgd_momentum": ("SGD", dict(lr=0.05, momentum=0.9)),
    "sgd_dampening_wd": ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.25, weight_decay=0.01)),
    "sgd_nesterov_wd": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": ("Adam", dict(lr=0.01)),
    "adam_wd": ("Adam", dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
}


@pytest.mark.parametrize("case", TORCH_CASES)
def test_trajectories_match_torch(case):
    torch = pytest.importorskip("torch")
    name, hyper = TORCH_CASES[case]
    p0, rounds = random_problem(6, 10, none_rate=0.1)
    ours = {"SGD": SGD, "Adam": Adam}[name]
    # Two groups, the second with its own lr, to cover group handling on both sides.
    params, _ = run(lambda ps: ours([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.3}], **hyper), p0, rounds)
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in p0]
    topt = getattr(torch.optim, name)([{"params": tparams[:2]}, {"params": tparams[2:], "lr": 0.3}],
                                      foreach=False, **hyper)
    for grads in rounds:
        for p, g in zip(tparams, grads):
            p.grad = None if g is None else torch.from_numpy(g.copy())
        topt.step()
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-12)


# -- errors ----------------------------------------------------------------------------------
def ps(n=1):
    return [Parameter(np.zeros(3)) for _ in range(n)]


_shared = Parameter(np.zeros(2))

BAD_ARGUMENTS = {
    "lr negative": (lambda: SGD(ps(), lr=-0.1), ValueError, "learning rate lr=-0.1 is negative"),
    "lr nan": (lambda: SGD(ps(), lr=float("nan")), ValueError, "learning rate lr=nan is not finite"),
    "lr inf": (lambda: Adam(ps(), lr=math.inf), ValueError, "learning rate lr=inf is not finite"),
    "lr string": (lambda: SGD(ps(), lr="0.1"), TypeError, "learning rate lr must be a real number"),
    "momentum negative": (lambda: SGD(ps(), lr=0.1, momentum=-0.5), ValueError, "momentum=-0.5 is negative"),
    "dampening above 1": (lambda: SGD(ps(), lr=0.1, momentum=0.9, dampening=1.5), ValueError, "dampening=1.5"),
    "nesterov without momentum": (lambda: SGD(ps(), lr=0.1, nesterov=True), ValueError,
                                  "nesterov momentum needs momentum > 0"),
    "nesterov with dampening": (lambda: SGD(ps(), lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError,
                                "nesterov momentum needs .* dampening == 0"),
    "nesterov not a bool": (lambda: SGD(ps(), lr=0.1, momentum=0.9, nesterov="yes"), TypeError,
                            "nesterov must be a bool"),
    "beta1 is 1": (lambda: Adam(ps(), betas=(1.0, 0.999)), ValueError, r"betas\[0\]=1.0 is outside \[0, 1\)"),
    "beta2 negative": (lambda: Adam(ps(), betas=(0.9, -0.1)), ValueError, r"betas\[1\]=-0.1 is outside"),
    "betas not a pair": (lambda: Adam(ps(), betas=(0.9,)), ValueError, "betas must be a pair"),
    "eps zero": (lambda: Adam(ps(), eps=0.0), ValueError, "eps=0.0 must be > 0"),
    "eps negative": (lambda: Adam(ps(), eps=-1e-8), ValueError, "eps=-1e-08 must be > 0"),
    "sgd weight_decay": (lambda: SGD(ps(), lr=0.1, weight_decay=-1e-4), ValueError, "weight_decay=-0.0001 is negative"),
    "adam weight_decay": (lambda: Adam(ps(), weight_decay=-1.0), ValueError, "weight_decay=-1.0 is negative"),
    "bad default, good groups": (lambda: SGD([{"params": ps(), "lr": 0.1}], lr=-1.0), ValueError, "learning rate"),
    "bad group override": (lambda: SGD([{"params": ps(), "lr": -1.0}], lr=0.1), ValueError,
                           "learning rate lr=-1.0 is negative"),
    "empty list": (lambda: SGD([], lr=0.1), ValueError, "empty parameter list"),
    "empty generator": (lambda: Adam(p for p in []), ValueError, "empty parameter list"),
    "only empty groups": (lambda: SGD([{"params": []}], lr=0.1), ValueError, "empty parameter list"),
    "parameter in two groups": (lambda: SGD([{"params": [_shared]}, {"params": [_shared]}], lr=0.1), ValueError,
                                "appears in more than one parameter group"),
    "parameter twice in a group": (lambda: Adam([_shared, _shared]), ValueError, "appears more than once"),
    "ndarray in params": (lambda: SGD([np.zeros(3)], lr=0.1), TypeError, r"params\[0\] is a ndarray, not a Parameter"),
    "tensor in params": (lambda: SGD(ps() + [Tensor(np.zeros(3), requires_grad=True)], lr=0.1), TypeError,
                         r"params\[1\] is a Tensor, not a Parameter"),
    "single parameter": (lambda: SGD(_shared, lr=0.1), TypeError, "not a single Parameter"),
    "set of parameters": (lambda: SGD({_shared}, lr=0.1), TypeError, "ordered iterable"),
    "groups mixed with parameters": (lambda: SGD([{"params": ps()}, _shared], lr=0.1), TypeError, "mixes"),
    "group without params": (lambda: SGD([{"lr": 0.1}], lr=0.1), TypeError, "'params' entry"),
    "unknown group key": (lambda: SGD([{"params": ps(), "learning_rate": 0.1}], lr=0.1), ValueError,
                          r"unknown hyperparameters \['learning_rate'\]"),
    "step_size zero": (lambda: StepLR(SGD(ps(), lr=0.1), step_size=0), ValueError,
                       "step_size must be a positive integer"),
    "step_size float": (lambda: StepLR(SGD(ps(), lr=0.1), step_size=2.5), ValueError,
                        "step_size must be a positive integer"),
    "gamma negative": (lambda: StepLR(SGD(ps(), lr=0.1), 2, gamma=-0.1), ValueError, "gamma=-0.1 is negative"),
    "T_max zero": (lambda: CosineAnnealingLR(SGD(ps(), lr=0.1), T_max=0), ValueError,
                   "T_max must be a positive integer"),
    "eta_min negative": (lambda: CosineAnnealingLR(SGD(ps(), lr=0.1), 5, eta_min=-1.0), ValueError,
                         "eta_min=-1.0 is negative"),
    "schedule of a non-optimizer": (lambda: StepLR(object(), 2), TypeError, "expected an Optimizer, got a object"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_arguments_are_named(case):
    make, error, message = BAD_ARGUMENTS[case]
    with pytest.raises(error, match=message):
        make()


def test_add_param_group_refuses_a_parameter_already_present():
    p, q = ps(2)
    opt = SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="appears in more than one parameter group"):
        opt.add_param_group({"params": [q, p]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("grad, error, message", [
    (np.zeros(4), ValueError, r"grad of parameter 0 in group 0 has shape \(4,\), the parameter has shape \(3,\)"),
    (np.zeros(3, np.float32), ValueError, "has dtype float32, the parameter has dtype float64"),
    ([0.0, 0.0, 0.0], TypeError, "is a list, not an ndarray"),
])
def test_bad_grads_are_named(grad, error, message):
    p = Parameter(np.ones(3))
    opt = Adam([p])
    p.grad = grad
    with pytest.raises(error, match=message):
        opt.step()
    np.testing.assert_array_equal(p.data, 1.0)


def test_hyperparameters_edited_between_steps_are_checked():
    p = Parameter(np.ones(3))
    opt = SGD([p], lr=0.1)
    opt.param_groups[0]["lr"] = -0.5
    p.grad = np.ones(3)
    with pytest.raises(ValueError, match="learning rate lr=-0.5 is negative"):
        opt.step()


def test_schedule_refuses_a_group_added_after_it():
    opt = SGD(ps(), lr=0.1)
    sched = StepLR(opt, 1)
    opt.add_param_group({"params": ps()})
    with pytest.raises(RuntimeError, match="2 param groups but the schedule was made for 1"):
        sched.step()


def trained(make, n=2):
    params = [Parameter(np.arange(3.0) + i) for i in range(n)]
    opt = make(params)
    for p in params:
        p.grad = np.ones(3)
    opt.step()
    return opt


def edit(saved, change):
    change(saved)
    return saved


SGD_M = lambda params: SGD(params, lr=0.1, momentum=0.9)  # noqa: E731
ADAM = lambda params: Adam(params)  # noqa: E731

BAD_STATES = {
    "unknown top-level key": (SGD_M, lambda s: s.update(extra=1), r"unknown keys \['extra'\]"),
    "missing state": (SGD_M, lambda s: s.pop("state"), r"missing keys \['state'\]"),
    "group count": (SGD_M, lambda s: s["param_groups"].append(dict(s["param_groups"][0])),
                    "the state has 2 parameter groups, the optimizer has 1"),
    "group size": (SGD_M, lambda s: s["param_groups"][0]["params"].append(2),
                   "group 0: size mismatch, 3 parameters in the state, 2 in the optimizer"),
    "unknown group key": (SGD_M, lambda s: s["param_groups"][0].update(foo=1), r"group 0: unknown keys \['foo'\]"),
    "missing group key": (SGD_M, lambda s: s["param_groups"][0].pop("lr"), r"group 0: missing keys \['lr'\]"),
    "bad group value": (ADAM, lambda s: s["param_groups"][0].update(eps=0.0), "group 0: .*eps=0.0 must be > 0"),
    "buffer shape": (SGD_M, lambda s: s["state"][1].update(momentum_buffer=np.zeros(5)),
                     r"state of parameter 1: momentum_buffer: size mismatch, shape \(5,\) in the state"),
    "unknown state key": (SGD_M, lambda s: s["state"][0].update(exp_avg=np.zeros(3)),
                          r"state of parameter 0: unknown keys \['exp_avg'\]"),
    "state of an unlisted parameter": (SGD_M, lambda s: s["state"].update({7: {}}),
                                       "state for parameter 7, which no parameter group lists"),
    "adam without step": (ADAM, lambda s: s["state"][0].pop("step"), r"missing keys \['step'\]"),
    "adam step zero": (ADAM, lambda s: s["state"][0].update(step=0), "step must be a positive integer"),
    "adam moment shape": (ADAM, lambda s: s["state"][1].update(exp_avg_sq=np.zeros((3, 1))), "exp_avg_sq: size"),
}


@pytest.mark.parametrize("case", BAD_STATES)
def test_bad_state_dicts_are_named_and_change_nothing(case):
    make, change, message = BAD_STATES[case]
    target = trained(make)
    target.param_groups[0]["lr"] = 0.5
    before = target.state_dict()
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(edit(trained(make).state_dict(), change))
    assert_same_state(target.state_dict(), before)


def test_bad_schedule_state_dicts_are_named():
    sched = CosineAnnealingLR(SGD(ps(), lr=0.1), T_max=3)
    good = sched.state_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['gamma'\]"):
        sched.load_state_dict({**good, "gamma": 0.1})
    with pytest.raises(ValueError, match="size mismatch, the state has lrs for 2 param groups, the optimizer has 1"):
        sched.load_state_dict({**good, "base_lrs": [0.1, 0.2], "last_lr": [0.1, 0.2]})
    with pytest.raises(ValueError, match="T_max must be a positive integer"):
        sched.load_state_dict({**good, "T_max": -1})
    assert sched.state_dict() == good


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_takes_the_same_steps_for_non_contiguous_gradients(momentum, nesterov):
    # Contiguous arrays take the fused kernel, others NumPy operations: the same numbers.
    gen = np.random.default_rng(0)
    start = gen.standard_normal((4, 5)).astype(np.float32)
    a, b = Parameter(start.copy()), Parameter(start.copy())
    opt_a = SGD([a], lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=0.01)
    opt_b = SGD([b], lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=0.01)
    for _ in range(3):
        g = gen.standard_normal((5, 4)).astype(np.float32)
        a.grad, b.grad = np.ascontiguousarray(g.T), g.T
        assert not b.grad.flags.c_contiguous
        opt_a.step()
        opt_b.step()
    np.testing.assert_array_equal(a.data, b.data)
