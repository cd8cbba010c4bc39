"""The determinism matrix: does `sclref train` give the same bits whatever the thread settings
and whether numba's JIT is on?

For each model, ``sclref train`` runs in a fresh process for every combination of
OPENBLAS_NUM_THREADS (with OMP_NUM_THREADS) in {1, 2}, NUMBA_NUM_THREADS in {1, 2} and
NUMBA_DISABLE_JIT in {0, 1}, from the same seed, and each run is compared with the
group's reference (1, 1, JIT on): (a) the arrays of ``model.npz`` (loaded with
`sclref.storage.load_state`) and (b) the bytes of every file of the run directory, except
that ``metrics.json`` is compared as JSON without its top-level ``"timing"`` (wall
times). Two groups per model:

* ``full``: the given subset (default 2,000 training / 500 test images, 2 mask epochs
  + 1 fine-tune epoch), JIT on only, with the training kernels as ``sclref train`` runs
  them by default (serial);
* ``nojit``: all eight combinations on a much smaller subset and 1 + 1 epochs, because
  interpreted kernels are slow (LeNet-5 takes ~0.2 s per image with the JIT off), with
  SCLREF_NUMBA_PARALLEL=1 so that numba's thread count reaches the training kernels'
  parallel loops. Their compiled code is kept in a temporary numba cache shared by the
  runs, so each process does not compile the parallel kernels again.

    python benchmarks/determinism.py [--models lenet300 lenet5] [--groups full nojit]
                                     [--train-limit 2000] [--test-limit 500] [--epochs 2] [--finetune-epochs 1]

Prints a Markdown table, writes benchmarks/out/determinism.json and exits with 1 when some
run differs from its reference. About 6 minutes on two cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import numpy as np  # noqa: E402

from sclref import provenance  # noqa: E402
from sclref.storage import load_state  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = "/usr/share/datasets/fashion-mnist"
MODELS = ("lenet300", "lenet5")
# The nojit group's subsets: (train, test) images per model, 1 mask + 1 fine-tune epoch.
NOJIT_LIMITS = {"lenet300": (512, 256), "lenet5": (128, 64)}
METRICS = "metrics.json"
MODEL = "model.npz"

# (BLAS and OpenMP threads, numba threads, JIT disabled); the first is every group's reference.
COMBINATIONS = [(blas, nb, jit_off) for jit_off, blas, nb in itertools.product((0, 1), (1, 2), (1, 2))]
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
               "NUMBA_DISABLE_JIT", "SCLREF_NUMBA_PARALLEL", "SCLREF_NUMBA_CACHE", "NUMBA_CACHE_DIR")


def run_train(group: dict, combination: tuple, out: Path, cache_dir: Path) -> float:
    """Run ``sclref train`` for one group and combination into `out`; its wall time in seconds."""
    blas, nb, jit_off = combination
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(OPENBLAS_NUM_THREADS=str(blas), OMP_NUM_THREADS=str(blas), MKL_NUM_THREADS=str(blas),
               NUMBA_NUM_THREADS=str(nb), NUMBA_DISABLE_JIT=str(jit_off), SCLREF_NO_PROGRESS="1")
    if group["parallel"]:
        env.update(SCLREF_NUMBA_PARALLEL="1", SCLREF_NUMBA_CACHE="1", NUMBA_CACHE_DIR=str(cache_dir))
    cmd = [sys.executable, "-m", "sclref", "train", "--model", group["model"], "--data", group["data"],
           "--train-limit", str(group["train_limit"]), "--test-limit", str(group["test_limit"]),
           "--epochs", str(group["epochs"]), "--finetune-epochs", str(group["finetune_epochs"]),
           "--seed", "0", "--out", str(out), "--no-progress"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def _leaves(value, path=""):
    """(path, leaf) pairs of a nested structure of dicts, lists and arrays, in a fixed order."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _leaves(value[key], f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}/{i}")
    else:
        yield path, value


def compare_models(ref_path: Path, path: Path) -> dict:
    """Whether two model files hold the same arrays bit for bit, and where and by how much they differ."""
    ref, got = dict(_leaves(load_state(ref_path))), dict(_leaves(load_state(path)))
    differing, worst = [], 0.0
    for key in sorted(set(ref) | set(got)):
        a, b = ref.get(key), got.get(key)
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            same = a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            if not same and a.shape == b.shape:
                worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0)))
        else:  # a JSON scalar; NaN equals NaN here
            same = type(a) is type(b) and (a == b or (a != a and b != b))
        if not same:
            differing.append(key)
    return {"arrays_identical": not differing, "differing": differing, "max_abs_diff": worst}


def _without_timing(path: Path) -> bytes:
    doc = json.loads(path.read_bytes())
    if isinstance(doc, dict):
        doc.pop("timing", None)
    return json.dumps(doc, sort_keys=True).encode()


def compare_files(ref_dir: Path, run_dir: Path) -> dict:
    """For every file of either run directory: identical bytes (metrics.json without its timing)?"""
    names = sorted({p.name for p in ref_dir.iterdir()} | {p.name for p in run_dir.iterdir()})
    same = {}
    for name in names:
        a, b = ref_dir / name, run_dir / name
        if not (a.is_file() and b.is_file()):
            same[name] = None
        elif name == METRICS:
            same[name] = _without_timing(a) == _without_timing(b)
        else:
            same[name] = a.read_bytes() == b.read_bytes()
    return same


def groups(args) -> list[dict]:
    """The groups of runs of every model: `full` (JIT on) and `nojit` (all combinations, small)."""
    out = []
    for model in args.models:
        base = {"model": model, "data": args.data}
        out.append({**base, "name": "full", "train_limit": args.train_limit, "test_limit": args.test_limit,
                    "epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "parallel": False,
                    "combinations": [c for c in COMBINATIONS if not c[2]]})
        train, test = NOJIT_LIMITS[model]
        out.append({**base, "name": "nojit", "train_limit": train, "test_limit": test, "epochs": 1,
                    "finetune_epochs": 1, "parallel": True, "combinations": COMBINATIONS})
    return out


def run_group(group: dict, work: Path, cache_dir: Path) -> list[dict]:
    rows, ref_dir = [], None
    for combination in group["combinations"]:
        blas, nb, jit_off = combination
        out = work / f"{group['model']}-{group['name']}-blas{blas}-numba{nb}-jit{1 - jit_off}"
        seconds = run_train(group, combination, out, cache_dir)
        row = {"blas_threads": blas, "numba_threads": nb, "jit": not jit_off, "seconds": round(seconds, 1)}
        if ref_dir is None:
            ref_dir = out
            row["reference"] = True
        else:
            row.update(compare_models(ref_dir / MODEL, out / MODEL))
            row["files"] = compare_files(ref_dir, out)
        print(f"  {group['model']} {group['name']} blas={blas} numba={nb} jit={'on' if not jit_off else 'off'}: "
              f"{seconds:.1f}s" + ("" if row.get("reference") else
                                   f", arrays {'identical' if row['arrays_identical'] else 'DIFFER'}"),
              file=sys.stderr)
        rows.append(row)
    return rows


def table(results: list[dict]) -> str:
    files = sorted({name for g in results for r in g["runs"] for name in r.get("files", {})})

    def cell(value):
        return {True: "yes", False: "**no**", None: "missing"}[value]

    rows = []
    for g in results:
        setting = (f"{g['model']} {g['name']} ({g['train_limit']}/{g['test_limit']}, "
                   f"{g['epochs']}+{g['finetune_epochs']})")
        for r in g["runs"]:
            combo = [setting, r["blas_threads"], r["numba_threads"], "on" if r["jit"] else "off"]
            if r.get("reference"):
                rows.append(combo + ["reference"] + ["reference"] * len(files))
            else:
                arrays = cell(r["arrays_identical"])
                if not r["arrays_identical"]:
                    arrays += f" (max abs diff {r['max_abs_diff']:.2g})"
                rows.append(combo + [arrays] + [cell(r["files"].get(name)) for name in files])
    header = ["group (train/test, epochs)", "BLAS/OMP threads", "numba threads", "JIT", "model arrays identical"]
    return common.markdown_table(header + [f"{name} bytes identical" for name in files], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--groups", nargs="+", choices=("full", "nojit"), default=["full", "nojit"],
                   help="which groups of runs (default both)")
    p.add_argument("--data", default=DATA, help=f"a directory of MNIST-format IDX files (default {DATA})")
    p.add_argument("--train-limit", type=int, default=2000, help="training images of the full group (default 2000)")
    p.add_argument("--test-limit", type=int, default=500, help="test images of the full group (default 500)")
    p.add_argument("--epochs", type=int, default=2, help="mask epochs of the full group (default 2)")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tune epochs of the full group (default 1)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "determinism.json")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="sclref-determinism-") as tmp:
        work, cache_dir = Path(tmp) / "runs", Path(tmp) / "numba-cache"
        for group in (g for g in groups(args) if g["name"] in args.groups):
            runs = run_group(group, work, cache_dir)
            results.append({k: v for k, v in group.items() if k != "combinations"} | {"runs": runs})
    identical = all(r.get("reference") or (r["arrays_identical"] and all(r["files"].values()))
                    for g in results for r in g["runs"])
    print(table(results))
    print(f"\nevery run identical to its reference: {'yes' if identical else 'no'} "
          f"({time.perf_counter() - t0:.0f} s)")
    common.write_json(args.out, {"machine": common.machine(), "provenance": provenance.reproducibility(),
                                 "all_identical": identical, "groups": results})
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
