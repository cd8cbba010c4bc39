"""Parameters, modules and plain layers: registration, state, modes, dtypes, forward values."""

import numpy as np
import pytest

import sclref
from sclref import Tensor, nn


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_parameters_are_registered_in_order_with_dotted_names():
    names = [n for n, _ in TwoLayer().named_parameters()]
    assert names == ["fc1.weight", "fc1.bias", "fc2.weight"]


def test_shared_parameter_is_listed_once():
    m = TwoLayer()
    m.fc3 = m.fc1
    assert len(list(m.parameters())) == 3


def test_reassigning_an_attribute_unregisters_it():
    m = TwoLayer()
    m.fc2 = None
    assert [n for n, _ in m.named_parameters()] == ["fc1.weight", "fc1.bias"]


def test_module_without_super_init_gets_a_clear_error():
    class Bad(nn.Module):
        def __init__(self):
            self.w = nn.Parameter([1.0])

    with pytest.raises(RuntimeError, match="super"):
        Bad()


def test_train_eval_reaches_every_submodule():
    m = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(0.5)))
    m.eval()
    assert not any(mod.training for mod in m.modules())
    m.train()
    assert all(mod.training for mod in m.modules())


def test_state_dict_round_trip_copies_values():
    sclref.manual_seed(0)
    a = TwoLayer()
    sclref.manual_seed(1)
    b = TwoLayer()
    state = a.state_dict()
    b.load_state_dict(state)
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(pa.data, pb.data)
        assert not np.shares_memory(pa.data, pb.data)
    state["fc1.weight"][:] = 99.0
    assert not np.any(a.fc1.weight.data == 99.0)


def test_load_state_dict_reports_every_problem_and_changes_nothing():
    m = TwoLayer()
    before = m.fc1.bias.data.copy()
    state = m.state_dict()
    state["fc1.bias"] = np.zeros(3)
    state["fc1.weight"] = np.zeros((5, 5))
    del state["fc2.weight"]
    state["extra"] = np.zeros(1)
    with pytest.raises(ValueError) as info:
        m.load_state_dict(state)
    msg = str(info.value)
    assert "missing keys ['fc2.weight']" in msg and "unexpected keys ['extra']" in msg
    assert "fc1.weight: shape (5, 5) in the state, (3, 4) in the model" in msg
    np.testing.assert_array_equal(m.fc1.bias.data, before)


def test_to_float32_converts_every_parameter_and_the_forward_stays_float32():
    m = TwoLayer().float()
    assert all(p.dtype == np.float32 for p in m.parameters())
    y = m(Tensor(np.ones((2, 4), dtype=np.float32)))
    assert y.dtype == np.float32
    with pytest.raises(TypeError, match="mixed dtypes"):
        m(Tensor(np.ones((2, 4))))


def test_linear_matches_numpy_and_checks_its_input():
    lin = nn.Linear(4, 3)
    x = np.random.default_rng(0).standard_normal((5, 4))
    np.testing.assert_allclose(lin(Tensor(x)).data, x @ lin.weight.data.T + lin.bias.data, rtol=1e-14)
    with pytest.raises(ValueError, match="last dimension 4"):
        lin(Tensor(np.ones((5, 3))))


def test_default_init_bounds_follow_fan_in():
    conv = nn.Conv2d(3, 8, 5)
    bound = 1 / np.sqrt(3 * 25)
    assert np.abs(conv.weight.data).max() <= bound
    assert np.abs(conv.weight.data).max() > 0.9 * bound


def test_lenet5_shaped_stack_runs_forward_and_backward():
    net = nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
    )
    x = Tensor(np.random.default_rng(0).standard_normal((2, 1, 28, 28)))
    loss = sclref.ops.cross_entropy(net(x), np.array([3, 7]))
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in net.parameters())
    assert "Conv2d(1, 20" in repr(net)


def test_sequential_refuses_non_modules():
    with pytest.raises(TypeError, match="item 1 is a int, not a Module"):
        nn.Sequential(nn.ReLU(), 3)
