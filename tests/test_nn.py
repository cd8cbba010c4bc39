"""Parameters, modules and plain layers: registration, state, modes, dtypes, forward values."""

import numba
import numpy as np
import pytest

import sclref
from sclref import Tensor, kernels, nn, ops, threads
from sclref.errors import LimitError
from sclref.kernels import conv as conv_module
from sclref.kernels import tasks as tasks_module
from sclref.testing import check_grads


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


def test_load_state_dict_refuses_complex_values_instead_of_dropping_their_imaginary_part():
    m = TwoLayer()
    state = m.state_dict()
    state["fc1.bias"] = state["fc1.bias"] + 1j
    with pytest.raises(ValueError, match="fc1.bias: values of dtype complex128"):
        m.load_state_dict(state)


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


# -- batch normalization, buffers and global pooling ----------------------------------------


def batches(shape, count, seed=0):
    gen = np.random.default_rng(seed)
    return [gen.standard_normal(shape) * 2.0 + 1.5 for _ in range(count)]


def test_batch_norm2d_has_unit_scale_zero_shift_and_buffers_in_the_state():
    bn = nn.BatchNorm2d(3)
    assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]
    np.testing.assert_array_equal(bn.weight.data, np.ones(3))
    np.testing.assert_array_equal(bn.bias.data, np.zeros(3))
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert [n for n, _ in bn.named_buffers()] == ["running_mean", "running_var", "num_batches_tracked"]
    assert bn.num_batches_tracked.dtype == np.int64 and bn.num_batches_tracked.shape == ()
    net = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3))
    assert list(net.state_dict()) == ["0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                                      "1.num_batches_tracked"]


def test_batch_norm_normalizes_by_the_batch_in_training_and_by_the_running_statistics_in_eval():
    bn = nn.BatchNorm2d(2, momentum=0.25)
    bn.weight.data[:] = [2.0, 0.5]
    bn.bias.data[:] = [1.0, -1.0]
    xs = batches((4, 2, 3, 3), 3)
    expected_mean, expected_var = np.zeros(2), np.ones(2)
    for x in xs:
        y = bn(Tensor(x)).data
        np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), [1.0, -1.0], atol=1e-12)
        np.testing.assert_allclose(y.std(axis=(0, 2, 3)), [2.0, 0.5], rtol=1e-4)
        expected_mean = 0.75 * expected_mean + 0.25 * x.mean(axis=(0, 2, 3))
        expected_var = 0.75 * expected_var + 0.25 * x.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(bn.running_mean, expected_mean, rtol=1e-13)
    np.testing.assert_allclose(bn.running_var, expected_var, rtol=1e-13)
    assert int(bn.num_batches_tracked) == 3
    bn.eval()
    x = xs[0]
    y = bn(Tensor(x)).data
    scale = bn.weight.data / np.sqrt(expected_var + 1e-5)
    want = (x - expected_mean[:, None, None]) * scale[:, None, None] + bn.bias.data[:, None, None]
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.running_mean, expected_mean, rtol=1e-13)
    assert int(bn.num_batches_tracked) == 3


def test_momentum_none_keeps_the_cumulative_average_of_the_batch_statistics():
    bn = nn.BatchNorm1d(3, momentum=None)
    xs = batches((5, 3), 4, seed=1)
    for x in xs:
        bn(Tensor(x))
    np.testing.assert_allclose(bn.running_mean, np.mean([x.mean(axis=0) for x in xs], axis=0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, np.mean([x.var(axis=0, ddof=1) for x in xs], axis=0), rtol=1e-12)


def test_batch_norm1d_takes_two_and_three_dimensional_input_and_refuses_others():
    bn = nn.BatchNorm1d(3)
    x2, x3 = batches((6, 3), 1)[0], batches((2, 3, 4), 1)[0]
    np.testing.assert_allclose(bn(Tensor(x2)).data, (x2 - x2.mean(0)) / np.sqrt(x2.var(0) + 1e-5), rtol=1e-12)
    mean, var = x3.mean(axis=(0, 2), keepdims=True), x3.var(axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(bn(Tensor(x3)).data, (x3 - mean) / np.sqrt(var + 1e-5), rtol=1e-12)
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): expected input \(N, C\) or \(N, C, L\) with C = 3, "
                                         r"got shape \(6, 4\)"):
        bn(Tensor(np.ones((6, 4))))
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\): expected input \(N, C, H, W\)"):
        nn.BatchNorm2d(3)(Tensor(np.ones((6, 3))))
    assert int(bn.num_batches_tracked) == 2  # refused input leaves the state alone


def test_batch_norm_without_affine_or_running_statistics():
    bn = nn.BatchNorm2d(2, affine=False, track_running_stats=False)
    assert list(bn.parameters()) == [] and bn.state_dict() == {}
    assert bn.running_mean is None and bn.weight is None
    x = batches((3, 2, 2, 2), 1)[0]
    train_out = bn(Tensor(x)).data
    bn.eval()  # no running statistics: eval mode normalizes by the batch too
    np.testing.assert_array_equal(bn(Tensor(x)).data, train_out)
    np.testing.assert_allclose(train_out.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)


def test_batch_norm_refuses_bad_settings():
    with pytest.raises(ValueError, match="num_features must be a positive integer"):
        nn.BatchNorm2d(0)
    with pytest.raises(ValueError, match="eps must be a positive"):
        nn.BatchNorm2d(2, eps=-1.0)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\] or None"):
        nn.BatchNorm2d(2, momentum=2.0)
    with pytest.raises(TypeError, match="float32 or float64, not int64"):
        nn.BatchNorm2d(2, dtype=np.int64)


def test_batch_norm_refuses_a_channel_count_too_large_to_allocate(monkeypatch):
    monkeypatch.setenv("SCLREF_MAX_ALLOC_BYTES", "1000")
    with pytest.raises(LimitError, match=r"BatchNorm2d\(1000\) per-channel state"):
        nn.BatchNorm2d(1000)
    nn.BatchNorm2d(100)


def test_state_dict_round_trip_restores_the_running_statistics():
    a = nn.BatchNorm2d(2)
    for x in batches((3, 2, 2, 2), 3):
        a(Tensor(x))
    b = nn.BatchNorm2d(2)
    b.load_state_dict(a.state_dict())
    for (name, va), (_, vb) in zip(a.named_buffers(), b.named_buffers()):
        np.testing.assert_array_equal(va, vb, err_msg=name)
        assert not np.shares_memory(va, vb)
    assert int(b.num_batches_tracked) == 3 and b.num_batches_tracked.dtype == np.int64
    a.eval(), b.eval()
    x = Tensor(batches((2, 2, 2, 2), 1, seed=9)[0])
    np.testing.assert_array_equal(a(x).data, b(x).data)


def test_load_state_dict_checks_buffers_like_parameters():
    bn = nn.BatchNorm2d(2)
    before = bn.running_mean.copy()
    state = bn.state_dict()
    state["running_mean"] = np.zeros(3)
    state["num_batches_tracked"] = np.array(2.5)
    del state["running_var"]
    with pytest.raises(ValueError) as info:
        bn.load_state_dict(state)
    msg = str(info.value)
    assert "missing keys ['running_var']" in msg
    assert "running_mean: shape (3,) in the state, (2,) in the model" in msg
    assert "num_batches_tracked: int64 counter given values that are not whole numbers" in msg
    np.testing.assert_array_equal(bn.running_mean, before)
    state = bn.state_dict()
    state["num_batches_tracked"] = np.array(7.0)
    bn.load_state_dict(state)
    assert bn.num_batches_tracked.dtype == np.int64 and int(bn.num_batches_tracked) == 7
    state["num_batches_tracked"] = np.array(2.0**63)
    with pytest.raises(ValueError, match="not whole numbers in its range"):
        bn.load_state_dict(state)


def test_float_converts_running_statistics_but_not_the_counter():
    bn = nn.BatchNorm2d(2).float()
    assert bn.running_mean.dtype == bn.running_var.dtype == bn.weight.dtype == np.float32
    assert bn.num_batches_tracked.dtype == np.int64
    y = bn(Tensor(np.ones((2, 2, 2, 2), dtype=np.float32)))
    assert y.dtype == np.float32 and bn.running_mean.dtype == np.float32
    with pytest.raises(TypeError, match="mixed dtypes"):
        bn(Tensor(np.ones((2, 2, 2, 2))))
    assert bn.double().running_var.dtype == np.float64


def test_buffers_stay_buffers_and_are_not_parameters():
    bn = nn.BatchNorm2d(2)
    assert all(p is not bn.running_mean for p in bn.parameters())
    with pytest.raises(TypeError, match="running_mean is a buffer: assign an ndarray or None"):
        bn.running_mean = [0.0, 0.0]
    with pytest.raises(ValueError, match="already names a parameter"):
        bn.register_buffer("weight", np.zeros(2))
    bn.running_mean = np.full(2, 3.0)
    assert bn.state_dict()["running_mean"].tolist() == [3.0, 3.0]
    bn.running_mean = None  # a None buffer stays registered but holds no state
    assert "running_mean" not in bn.state_dict()
    with pytest.raises(TypeError, match="running_mean is a buffer"):
        bn.running_mean = nn.Parameter(np.zeros(2))
    del bn.running_var
    assert "running_var" not in bn.state_dict()


def test_global_avg_pool_layer_averages_each_channel():
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 5))
    np.testing.assert_allclose(nn.GlobalAvgPool2d()(Tensor(x)).data, x.mean(axis=(2, 3)), rtol=1e-14)


# -- a residual block built from the pieces, its gradients checked exactly --------------------


def option_a(x, planes):
    """The CIFAR ResNets' parameter-free shortcut: every other pixel, zero channels on both sides."""
    pad = (planes - x.shape[1]) // 2
    return ops.pad(ops.getitem(x, np.s_[:, :, ::2, ::2]), ((0, 0), (pad, pad), (0, 0), (0, 0)))


def basic_block(x, w1, g1, b1, w2, g2, b2, stride, training, stats):
    """conv -> bn -> relu -> conv -> bn, plus the shortcut, then relu: the BasicBlock of the CIFAR ResNets."""
    (m1, v1), (m2, v2) = stats
    h = ops.conv2d(x, w1, None, stride, 1)
    h = ops.relu(ops.batch_norm(h, g1, b1, m1, v1, training=training))
    h = ops.batch_norm(ops.conv2d(h, w2, None, 1, 1), g2, b2, m2, v2, training=training)
    shortcut = x if stride == 1 else option_a(x, w1.shape[0])
    return ops.relu(h + shortcut)


class Block(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.planes = stride, planes

    def forward(self, x):
        h = ops.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return ops.relu(h + (x if self.stride == 1 else option_a(x, self.planes)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("in_planes,planes,stride", [(3, 3, 1), (2, 4, 2)], ids=["identity", "option-A"])
def test_residual_block_gradients_are_exact_and_the_layers_agree(in_planes, planes, stride, training):
    sclref.manual_seed(3)
    block = Block(in_planes, planes, stride)
    gen = np.random.default_rng(11)
    for bn in (block.bn1, block.bn2):  # away from the defaults, so scale and shift are exercised
        bn.weight.data[:] = gen.uniform(0.5, 1.5, planes)
        bn.bias.data[:] = gen.uniform(-0.5, 0.5, planes)
        bn.running_mean[:] = gen.uniform(-0.3, 0.3, planes)
        bn.running_var[:] = gen.uniform(0.5, 2.0, planes)
    block.train(training)
    x = gen.standard_normal((3, in_planes, 6, 6))
    params = [block.conv1.weight, block.bn1.weight, block.bn1.bias, block.conv2.weight, block.bn2.weight,
              block.bn2.bias]
    stats = [(bn.running_mean.copy(), bn.running_var.copy()) if not training else (None, None)
             for bn in (block.bn1, block.bn2)]

    def f(x_, *ps):
        return basic_block(x_, *ps, stride, training, stats)

    check_grads(f, x, *[p.data for p in params])

    xt = Tensor(x, requires_grad=True)
    y = block(xt)
    leaves = [Tensor(x, requires_grad=True)] + [Tensor(p.data, requires_grad=True) for p in params]
    want = f(*leaves)
    np.testing.assert_allclose(y.data, want.data, rtol=1e-13, atol=1e-13)
    u = gen.standard_normal(y.shape)
    y.backward(u)
    want.backward(u)
    np.testing.assert_allclose(xt.grad, leaves[0].grad, rtol=1e-12, atol=1e-13)
    for p, leaf in zip(params, leaves[1:]):
        np.testing.assert_allclose(p.grad, leaf.grad, rtol=1e-12, atol=1e-13)


# -- a training step on one and on two threads --------------------------------------------------


def _lenet5_step_inputs(gen):
    return sclref.models.lenet5(dtype=np.float32), gen.standard_normal((12, 1, 28, 28)).astype(np.float32)


def _resnet_step_inputs(gen):
    return sclref.models.resnet(8, in_shape=(3, 8, 8), dtype=np.float32), gen.standard_normal(
        (12, 3, 8, 8)).astype(np.float32)


@pytest.mark.skipif(kernels.JIT_DISABLED, reason="interpreted kernels run on one thread")
@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="numba has a single thread")
@pytest.mark.parametrize("build", [_lenet5_step_inputs, _resnet_step_inputs], ids=["lenet5", "resnet8"])
def test_a_training_step_gives_the_same_bits_on_one_and_two_numba_threads(build, monkeypatch):
    """Loss, every gradient and the running statistics, with BLAS pinned as in training and every split
    threshold lowered so that each kernel that can split its work does."""
    monkeypatch.setattr(conv_module, "CHUNK_BYTES", 16 << 10)
    monkeypatch.setattr(tasks_module, "SPLIT_BYTES", 0)  # split every elementwise, pooling and batch-norm call
    monkeypatch.setattr(tasks_module, "SERIAL_SECONDS", 0.0)  # and run them on threads however busy the machine
    monkeypatch.setattr(tasks_module, "_serial_until", 0.0)
    old = numba.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            numba.set_num_threads(count)
            sclref.manual_seed(0)
            gen = np.random.default_rng(0)
            model, x = build(gen)
            labels = gen.integers(0, 10, x.shape[0])
            with threads.pinned():
                assert tasks_module.threads_for(2, blas=True) == count
                loss = ops.cross_entropy(model(Tensor(x)), labels)
                loss.backward()
            state = [loss.data] + [p.grad for p in model.parameters()] + [b for _, b in model.named_buffers()]
            results.append(state)
    finally:
        numba.set_num_threads(old)
    first, second = results
    assert len(first) == len(second) > 2
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes()
