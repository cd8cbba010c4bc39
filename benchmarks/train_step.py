"""One float32 training step at batch 128, LeNet-300-100 and LeNet-5 (and with
``--resnet`` ResNet-20 on 3x32x32 input), sclref against PyTorch CPU doing the identical step:

- ``plain``: the unmasked network, forward, backward, SGD with momentum;
- ``scl``: the SCL step of `sclref.train.Trainer.step` (masked layers, identity STE,
  per-feature L2 normalization of the mask gradient, regularizer λ, SGD with momentum on
  θ and plain SGD on the mask variables, or with ``--optimizer adam`` Adam on both),
  written in PyTorch as its users would.

    python benchmarks/train_step.py [--kind plain|scl|both] [--threads 2] [--reps 50] [--resnet] [--pin]
        [--optimizer sgd|adam|both] [--load]

``--load`` times every step a second time beside two busy processes the benchmark starts
itself (a shared machine), in the same run, and with ``--threads`` above 1 also sclref's
scl step on one numba thread: the ratio to it says whether the default thread count loses
to one thread when the cores are busy.

``--pin`` runs sclref's step inside `sclref.threads.pinned` (BLAS on one thread), as
`sclref train` does during its epochs: sclref's kernels then split their work (conv
chunks with their matrix products, batch norm's channels, pooling and elementwise
ranges) over numba's ``--threads`` threads. Without it sclref's BLAS uses ``--threads``
and the conv chunks run one after the other.

Each engine runs in its own process (so their thread pools do not fight) from the same
weights and batch; the first step's loss must agree, then the two take turns in blocks
of steps. The script reports medians, the sclref/PyTorch ratio, the floor (the step's
FLOPs over NumPy's GEMM rate measured in the same run) and the memory each step adds on
top of the built model (peak resident size), with its ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

THREADS = common.threads_from_argv()
common.set_threads(THREADS)

import numpy as np  # noqa: E402

import sclref  # noqa: E402
from sclref import ops, threads  # noqa: E402


def step_flops(model, in_shape, batch: int) -> float:
    """Multiply-adds of the forward pass x 2 FLOPs x 3 (forward, input grad, weight grad).

    Layers are taken in the order `modules()` yields them, which is the order they run in
    for the LeNets and the ResNets with shortcut A (whose shortcuts have no conv).
    """
    macs, shape = 0, in_shape
    for layer in model.modules():
        if isinstance(layer, sclref.nn.Conv2d):
            c, h, w = shape
            f, _, kh, kw = layer.weight.shape
            (sh, sw), (ph, pw) = (v if isinstance(v, tuple) else (v, v) for v in (layer.stride, layer.padding))
            shape = (f, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
            macs += f * shape[1] * shape[2] * c * kh * kw
        elif isinstance(layer, sclref.nn.MaxPool2d):
            shape = (shape[0], shape[1] // 2, shape[2] // 2)
        elif isinstance(layer, (sclref.nn.Flatten, sclref.nn.GlobalAvgPool2d)):
            shape = (int(np.prod(shape)),) if isinstance(layer, sclref.nn.Flatten) else (shape[0],)
        elif isinstance(layer, sclref.nn.Linear):
            macs += layer.in_features * layer.out_features
            shape = (layer.out_features,)
    return 2.0 * 3.0 * macs * batch


def torch_twin(torch, model):
    """The same network in PyTorch, with sclref's weights copied in."""
    layers = []
    for layer in model:
        if isinstance(layer, sclref.nn.Conv2d):
            f, c, kh, kw = layer.weight.shape
            layers.append(torch.nn.Conv2d(c, f, (kh, kw)))
        elif isinstance(layer, sclref.nn.Linear):
            layers.append(torch.nn.Linear(layer.in_features, layer.out_features))
        elif isinstance(layer, sclref.nn.MaxPool2d):
            layers.append(torch.nn.MaxPool2d(layer.kernel_size))
        elif isinstance(layer, sclref.nn.ReLU):
            layers.append(torch.nn.ReLU())
        elif isinstance(layer, sclref.nn.Flatten):
            layers.append(torch.nn.Flatten())
    twin = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for p_t, p_s in zip(twin.parameters(), model.parameters()):
            p_t.copy_(torch.from_numpy(p_s.data.copy()))
    return twin


def resnet_twin(torch, model):
    """ResNet-20 (shortcut A) in PyTorch, its parameters named and valued as `model`'s."""
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, block):
            super().__init__()
            conv1, conv2 = block.conv1, block.conv2
            self.conv1 = nn.Conv2d(conv1.weight.shape[1], conv1.weight.shape[0], 3, conv1.stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(conv1.weight.shape[0], eps=block.bn1.eps, momentum=block.bn1.momentum)
            self.conv2 = nn.Conv2d(conv2.weight.shape[1], conv2.weight.shape[0], 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(conv2.weight.shape[0], eps=block.bn2.eps, momentum=block.bn2.momentum)
            self.shortcut = block.downsample

        def forward(self, x):
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            sc = self.shortcut
            if sc is not None:
                x = x[:, :, ::sc.stride, ::sc.stride]
                extra = sc.out_channels - sc.in_channels
                x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
            return F.relu(out + x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(model.conv1.weight.shape[1], 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16, eps=model.bn1.eps, momentum=model.bn1.momentum)
            for stage in ("layer1", "layer2", "layer3"):
                setattr(self, stage, nn.Sequential(*(Block(b) for b in getattr(model, stage))))
            self.fc = nn.Linear(model.fc.in_features, model.fc.out_features)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(x.mean(dim=(2, 3)))

    twin = Net()
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            params[name].copy_(torch.from_numpy(p.data.copy()))
    return twin


MODELS = {"LeNet-300-100": sclref.models.lenet_300_100, "LeNet-5": sclref.models.lenet5,
          "ResNet-20": sclref.models.resnet20}
IN_SHAPES = {"LeNet-300-100": (1, 28, 28), "LeNet-5": (1, 28, 28), "ResNet-20": (3, 32, 32)}


def _workload(model_name: str, batch: int):
    sclref.manual_seed(0)
    model = MODELS[model_name](masked=False, dtype=np.float32)
    gen = np.random.default_rng(0)
    x = gen.standard_normal((batch, *IN_SHAPES[model_name])).astype(np.float32)
    return model, x, gen.integers(0, 10, batch)


def _pinned_step(step, pin: bool):
    """`step` itself, or `step` run inside `sclref.threads.pinned` when `pin`."""
    if not pin:
        return step

    def pinned_step():
        with threads.pinned():
            return step()

    return pinned_step


def build_sclref(model_name: str, batch: int, pin: bool = False):
    """One sclref SGD-momentum step on a fixed batch, as a zero-argument callable."""
    model, x_np, y_np = _workload(model_name, batch)
    x = sclref.Tensor(x_np)
    opt = sclref.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad()
        loss = ops.cross_entropy(model(x), y_np)
        loss.backward()
        opt.step()
        return loss.item()

    return _pinned_step(step, pin)


def build_torch(model_name: str, batch: int, threads: int):
    """The same step in PyTorch, from the same weights and batch."""
    torch = common.torch_or_none(threads)
    model, x_np, y_np = _workload(model_name, batch)
    twin = resnet_twin(torch, model) if model_name == "ResNet-20" else torch_twin(torch, model)
    xt, yt = torch.from_numpy(x_np), torch.from_numpy(y_np)
    opt = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(twin(xt), yt)
        loss.backward()
        opt.step()
        return loss.item()

    return step


SCL_MODELS = {"LeNet-300-100": "lenet300", "LeNet-5": "lenet5", "ResNet-20": "resnet20"}


ADAM_LR = 1e-3  # of θ and s with --optimizer adam


def _scl_trainer(model_name: str, batch: int, optimizer: str = "sgd"):
    """A `Trainer` with the default SCL settings in float32 on a random batch of the model's input shape.

    With `optimizer` "adam" its two optimizers are replaced by Adam (lr `ADAM_LR`) on θ and on s.
    """
    from sclref.data.datasets import Dataset
    from sclref.train import TrainConfig, Trainer

    gen = np.random.default_rng(0)
    x = gen.standard_normal((batch, *IN_SHAPES[model_name])).astype(np.float32)
    y = gen.integers(0, 10, batch)
    data = Dataset(x, y, x[:1], y[:1], name="random")
    trainer = Trainer(TrainConfig(model=SCL_MODELS[model_name], dtype="float32", seed=0), data)
    if optimizer == "adam":
        trainer.opt_w = sclref.optim.Adam([p for g in trainer.opt_w.param_groups for p in g["params"]], lr=ADAM_LR)
        trainer.opt_s = sclref.optim.Adam([p for g in trainer.opt_s.param_groups for p in g["params"]], lr=ADAM_LR)
    if model_name == "LeNet-300-100":
        x = x.reshape(batch, -1)
    return trainer, x, y


def build_sclref_scl(model_name: str, batch: int, pin: bool = False, optimizer: str = "sgd", threads=None):
    """One step of `Trainer.step`, the step `sclref train` takes; on `threads` numba threads when given."""
    if threads is not None:
        sclref.kernels.set_numba_threads(threads)
    trainer, x, y = _scl_trainer(model_name, batch, optimizer)
    return _pinned_step(lambda: trainer.step(x, y)[0], pin)


def build_torch_scl(model_name: str, batch: int, threads: int, optimizer: str = "sgd"):
    """The same SCL step in PyTorch: θ * step(s) with an identity STE, from the same weights."""
    from sclref.nn.masked import MaskedConv2d, MaskedLinear

    torch = common.torch_or_none(threads)
    F = torch.nn.functional
    trainer, x_np, y_np = _scl_trainer(model_name, batch, optimizer)
    cfg = trainer.config

    class StepSTE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s):
            return (s > 0).to(s.dtype)

        @staticmethod
        def backward(ctx, g):
            return g  # identity STE: g'(s) = 1

    def masked(layer):
        """θ and s of a masked layer as PyTorch parameters; the forward's weight is θ * step(s)."""
        theta, score = (torch.nn.Parameter(torch.from_numpy(p.data.copy())) for p in (layer.weight, layer.score))
        bias = None if layer.bias is None else torch.nn.Parameter(torch.from_numpy(layer.bias.data.copy()))
        weights.extend(p for p in (theta, bias) if p is not None)
        scores.append(score)
        return lambda: theta * StepSTE.apply(score), bias

    def conv(layer):
        weight, bias = masked(layer)
        return lambda h: F.conv2d(h, weight(), bias, layer.stride, layer.padding)

    def batch_norm(layer):
        weight, bias = (torch.nn.Parameter(torch.from_numpy(p.data.copy())) for p in (layer.weight, layer.bias))
        weights.extend((weight, bias))
        mean, var = torch.from_numpy(layer.running_mean.copy()), torch.from_numpy(layer.running_var.copy())
        return lambda h: F.batch_norm(h, mean, var, weight, bias, True, layer.momentum, layer.eps)

    def block(b):
        conv1, bn1, conv2, bn2, sc = conv(b.conv1), batch_norm(b.bn1), conv(b.conv2), batch_norm(b.bn2), b.downsample

        def run(h):
            out = bn2(conv2(F.relu(bn1(conv1(h)))))
            if sc is not None:
                h = h[:, :, ::sc.stride, ::sc.stride]
                extra = sc.out_channels - sc.in_channels
                h = F.pad(h, (0, 0, 0, 0, extra // 2, extra - extra // 2))
            return F.relu(out + h)

        return run

    def layer_fn(layer):
        if isinstance(layer, MaskedLinear):
            weight, bias = masked(layer)
            return lambda h: F.linear(h, weight(), bias)
        if isinstance(layer, MaskedConv2d):
            return conv(layer)
        if isinstance(layer, sclref.nn.BatchNorm2d):
            return batch_norm(layer)
        if isinstance(layer, sclref.models.BasicBlock):
            return block(layer)
        if isinstance(layer, sclref.nn.Sequential):
            fns = [layer_fn(sub) for sub in layer]
            return lambda h: functools.reduce(lambda acc, fn: fn(acc), fns, h)
        if isinstance(layer, sclref.nn.MaxPool2d):
            return lambda h: F.max_pool2d(h, layer.kernel_size)
        if isinstance(layer, sclref.nn.GlobalAvgPool2d):
            return lambda h: h.mean(dim=(2, 3))
        if isinstance(layer, sclref.nn.Flatten):
            return lambda h: h.flatten(1)
        if isinstance(layer, sclref.nn.ReLU):
            return F.relu
        raise TypeError(f"no PyTorch twin for {type(layer).__name__}")

    weights, scores = [], []
    forward = layer_fn(trainer.model)
    if optimizer == "adam":
        opt_w, opt_s = torch.optim.Adam(weights, lr=ADAM_LR), torch.optim.Adam(scores, lr=ADAM_LR)
    else:
        opt_w = torch.optim.SGD(weights, lr=cfg.lr, momentum=cfg.momentum)
        opt_s = torch.optim.SGD(scores, lr=cfg.mask_lr)
    xt, yt = torch.from_numpy(x_np), torch.from_numpy(y_np)

    def step():
        opt_w.zero_grad()
        opt_s.zero_grad()
        loss = F.cross_entropy(forward(xt), yt)
        loss.backward()
        with torch.no_grad():
            for s in scores:  # per-feature L2 normalization, then + λ g'(s) = λ
                g = s.grad.reshape(s.shape[0], -1)
                g /= g.norm(dim=1, keepdim=True) + 1e-12
                s.grad += cfg.lam
        opt_s.step()
        opt_w.step()
        return loss.item()

    return step


BUILDERS = {"plain": (build_sclref, build_torch), "scl": (build_sclref_scl, build_torch_scl)}


def bench(kind: str, model_name: str, batch: int, reps: int, threads: int, have_torch: bool,
          pin: bool = False, optimizer: str = "sgd", load: bool = False) -> list[dict]:
    """One row per phase ("quiet", and "load" beside two busy processes when `load`), timed in one run.

    With `load` and more than one thread, sclref's scl step also runs on one numba
    thread ("sclref 1 thread"), so that the rows say whether the default thread count
    loses to one thread on a busy machine.
    """
    ours, peer = BUILDERS[kind]
    extra = (optimizer,) if kind == "scl" else ()
    builders = {"sclref": (ours, (model_name, batch, pin, *extra))}
    if load and threads > 1 and kind == "scl":
        builders["sclref 1 thread"] = (ours, (model_name, batch, pin, *extra, 1))
    if have_torch:
        builders["torch"] = (peer, (model_name, batch, threads, *extra))
    phases = {"quiet": contextlib.nullcontext, **({"load": common.competing_load} if load else {})}
    samples, first, memory = common.samples_in_workers(builders, reps, block=5, pause=0.3, phases=phases, memory=True)
    if have_torch and not np.isclose(first["sclref"], first["torch"], rtol=1e-4):
        raise SystemExit(f"{model_name}: sclref and PyTorch disagree on the first loss: {first}")
    model, _, _ = _workload(model_name, batch)
    gflop = step_flops(model, IN_SHAPES[model_name], batch) / 1e9
    rows = []
    for phase, times in samples.items():
        medians = {name: float(np.median(t)) for name, t in times.items()}
        row = {"kind": kind if kind == "plain" else f"{kind} ({optimizer})", "model": model_name, "batch": batch,
               "phase": phase, "loss_first_step": first, "memory": memory, "gflop": gflop,
               **{f"{k}_ms": v * 1e3 for k, v in medians.items()}}
        if have_torch:
            row["ratio"] = medians["sclref"] / medians["torch"]
            if memory["sclref"] and memory["torch"]:
                row["memory_ratio"] = memory["sclref"]["step_peak_mib"] / max(memory["torch"]["step_peak_mib"], 1e-3)
        if "sclref 1 thread" in medians:
            row["threads_ratio"] = medians["sclref"] / medians["sclref 1 thread"]
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--kind", choices=("plain", "scl", "both"), default="both")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "train_step.json")
    parser.add_argument("--resnet", action="store_true", help="also time ResNet-20 (3x32x32 input)")
    parser.add_argument("--pin", action="store_true", help="run sclref's step inside sclref.threads.pinned()")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="time only these models")
    parser.add_argument("--load", action="store_true",
                        help="time every step also beside two busy processes the benchmark starts, in the same run; "
                             "with --threads above 1 also sclref's scl step on one thread")
    parser.add_argument("--optimizer", choices=("sgd", "adam", "both"), default="sgd",
                        help="of the scl step: SGD (the Trainer's) or Adam on θ and s")
    args = parser.parse_args()
    have_torch = common.torch_or_none(args.threads) is not None
    load_before = os.getloadavg()
    gemm = common.gemm_gflops("float32")
    kinds = ("plain", "scl") if args.kind == "both" else (args.kind,)
    names = args.models or [name for name in MODELS if args.resnet or name != "ResNet-20"]
    optimizers = ("sgd", "adam") if args.optimizer == "both" else (args.optimizer,)
    rows = [row for kind in kinds for optimizer in (optimizers if kind == "scl" else ("sgd",)) for name in names
            for row in bench(kind, name, args.batch, args.reps, args.threads, have_torch, args.pin, optimizer,
                             args.load)]
    nan = float("nan")
    for r in rows:
        r["floor_ms"] = r["gflop"] / gemm * 1e3
    table = common.markdown_table(
        ["step", "model", "phase", "sclref ms", "PyTorch ms", "sclref/PyTorch", "sclref / sclref on 1 thread",
         "GEMM floor ms", "step memory MiB (sclref / PyTorch)"],
        [[r["kind"], r["model"], r["phase"], f"{r['sclref_ms']:.2f}", f"{r.get('torch_ms', nan):.2f}",
          f"{r.get('ratio', nan):.2f}", f"{r.get('threads_ratio', nan):.2f}", f"{r['floor_ms']:.2f}", _memory_cell(r)]
         for r in rows],
    )
    load = {"before": load_before, "after": os.getloadavg()}
    pin = ", sclref pinned to 1 BLAS thread" if args.pin else ""
    print(f"float32, batch {args.batch}, {args.threads} threads{pin}, median of {args.reps}; "
          f"NumPy GEMM {gemm:.1f} GFLOP/s; load average (1, 5, 15 min) {_load(load['before'])} before, "
          f"{_load(load['after'])} after\n")
    print(table)
    common.write_json(args.out, {"machine": common.machine(), "threads": args.threads, "pin": args.pin,
                                 "gemm_gflops": gemm, "load_average": load,
                                 "reps": args.reps, "rows": rows})


def _load(triple) -> str:
    return "/".join(f"{v:.2f}" for v in triple)


def _memory_cell(row: dict) -> str:
    mem = row["memory"]
    if not mem.get("sclref"):
        return "n/a"
    if not mem.get("torch"):
        return f"{mem['sclref']['step_peak_mib']:.1f}"
    return (f"{mem['sclref']['step_peak_mib']:.1f} / {mem['torch']['step_peak_mib']:.1f} "
            f"({row['memory_ratio']:.2f})")


if __name__ == "__main__":
    main()
