"""One float32 training step (forward, backward, SGD with momentum) at batch 128:
plain LeNet-300-100 and LeNet-5 in sclref against PyTorch CPU doing the same step.

    python benchmarks/train_step.py [--threads 2] [--reps 50] [--out benchmarks/out/train_step.json]

Each engine runs in its own process (so their thread pools do not fight) from the same
weights and batch; the first step's loss must agree, then the two take turns, one step
each, and the script reports medians, the sclref/PyTorch ratio, and the floor: the
step's FLOPs over NumPy's GEMM rate measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

THREADS = common.threads_from_argv()
common.set_threads(THREADS)

import numpy as np  # noqa: E402

import sclref  # noqa: E402
from sclref import ops  # noqa: E402


def step_flops(model, in_shape, batch: int) -> float:
    """Multiply-adds of the forward pass x 2 FLOPs x 3 (forward, input grad, weight grad)."""
    macs, shape = 0, in_shape
    for layer in model:
        if isinstance(layer, sclref.nn.Conv2d):
            c, h, w = shape
            f, _, kh, kw = layer.weight.shape
            shape = (f, h - kh + 1, w - kw + 1)
            macs += f * shape[1] * shape[2] * c * kh * kw
        elif isinstance(layer, sclref.nn.MaxPool2d):
            shape = (shape[0], shape[1] // 2, shape[2] // 2)
        elif isinstance(layer, sclref.nn.Flatten):
            shape = (int(np.prod(shape)),)
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


MODELS = {"LeNet-300-100": sclref.models.lenet_300_100, "LeNet-5": sclref.models.lenet5}


def _workload(model_name: str, batch: int):
    sclref.manual_seed(0)
    model = MODELS[model_name](masked=False, dtype=np.float32)
    gen = np.random.default_rng(0)
    x = gen.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    return model, x, gen.integers(0, 10, batch)


def build_sclref(model_name: str, batch: int):
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

    return step


def build_torch(model_name: str, batch: int, threads: int):
    """The same step in PyTorch, from the same weights and batch."""
    torch = common.torch_or_none(threads)
    model, x_np, y_np = _workload(model_name, batch)
    twin = torch_twin(torch, model)
    xt, yt = torch.from_numpy(x_np), torch.from_numpy(y_np)
    opt = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(twin(xt), yt)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def bench(model_name: str, batch: int, reps: int, threads: int, have_torch: bool) -> dict:
    builders = {"sclref": (build_sclref, (model_name, batch))}
    if have_torch:
        builders["torch"] = (build_torch, (model_name, batch, threads))
    medians, first = common.time_in_workers(builders, reps)
    row = {"model": model_name, "batch": batch, "loss_first_step": first}
    if have_torch and not np.isclose(first["sclref"], first["torch"], rtol=1e-4):
        raise SystemExit(f"{model_name}: sclref and PyTorch disagree on the first loss: {first}")
    row.update({f"{k}_ms": v * 1e3 for k, v in medians.items()})
    if have_torch:
        row["ratio"] = medians["sclref"] / medians["torch"]
    model, _, _ = _workload(model_name, batch)
    row["gflop"] = step_flops(model, (1, 28, 28), batch) / 1e9
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "train_step.json")
    args = parser.parse_args()
    have_torch = common.torch_or_none(args.threads) is not None
    gemm = common.gemm_gflops("float32")
    rows = [bench(name, args.batch, args.reps, args.threads, have_torch) for name in MODELS]
    for r in rows:
        r["floor_ms"] = r["gflop"] / gemm * 1e3
    table = common.markdown_table(
        ["model", "batch", "sclref ms", "PyTorch ms", "sclref/PyTorch", "GEMM floor ms"],
        [[r["model"], r["batch"], f"{r['sclref_ms']:.2f}", f"{r.get('torch_ms', float('nan')):.2f}",
          f"{r.get('ratio', float('nan')):.2f}", f"{r['floor_ms']:.2f}"] for r in rows],
    )
    print(f"float32, {args.threads} threads, median of {args.reps}; NumPy GEMM {gemm:.1f} GFLOP/s\n")
    print(table)
    common.write_json(args.out, {"machine": common.machine(), "threads": args.threads, "gemm_gflops": gemm,
                                 "reps": args.reps, "rows": rows})


if __name__ == "__main__":
    main()
