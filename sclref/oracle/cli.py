"""The `sclref verify` subcommand: run the reference SCL step on files and compare someone's step with it.

``sclref verify --model lenet300 --state state.npz --batch batch.npz --settings
settings.json [--theirs theirs.npz] [--steps N] [--out result.npz] [--json]``

`state.npz` holds the model's arrays under the names of ``--layout`` (see
`sclref.oracle.load_state`); `batch.npz` holds ``x`` and ``y`` (used at every step) or
``x_0, y_0, x_1, y_1, ...`` (one batch per step); `settings.json` holds
`sclref.oracle.StepSettings` as `StepSettings.to_dict` writes it. `theirs.npz` holds
the user's tensors under flat names ``stage/name`` (``loss``, ``logits``,
``grad_s/fc1.score``, ...; prefixed by the step, ``1/s/fc1.score``, for several steps).
`--out` writes every stage of every step the same way. Exit status: 0 when everything
agrees (or nothing was compared), 1 when a stage disagrees, 2 for refused input (a
one-line message on stderr). `add_parser(subparsers)` registers the subcommand;
``python -m sclref.oracle.cli`` runs it on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

from sclref import storage
from sclref.data.npz import read_npz
from sclref.errors import InputError
from sclref.flags import nonnegative_int

__all__ = ["add_parser", "run_verify"]

_MAX_SETTINGS_BYTES = 1 << 20
_MAX_MEMBERS = 10_000


def _positive_steps(text: str) -> int:
    value = nonnegative_int(text)
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, 10000], got {value}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``verify`` on `subparsers` (from ``ArgumentParser.add_subparsers``); return its parser."""
    p = subparsers.add_parser("verify", help="check an SCL training step against sclref's reference step",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model of sclref.models.MODELS, e.g. lenet300 or lenet5")
    p.add_argument("--state", required=True, metavar="NPZ", help="the starting state: name -> array")
    p.add_argument("--batch", required=True, metavar="NPZ", help="x and y, or x_0, y_0, x_1, y_1, ... one per step")
    p.add_argument("--settings", required=True, metavar="JSON", help="the step settings (StepSettings.to_dict)")
    p.add_argument("--theirs", metavar="NPZ", help="your tensors as stage/name -> array, to compare")
    p.add_argument("--steps", type=_positive_steps, default=1, help="steps to run (default 1)")
    p.add_argument("--layout", default="torch", help="naming and array layout of the files: torch (default), "
                   "flax or sclref")
    p.add_argument("--num-classes", type=nonnegative_int, default=None,
                   help="outputs of the model (default: read from the state's last dense layer)")
    p.add_argument("--out", metavar="NPZ", help="write every stage of every step as step/stage/name -> array")
    p.add_argument("--json", action="store_true", help="print a JSON record instead of text")
    p.set_defaults(func=run_verify)
    return p


def _accept_numbers(name: str, dtype: np.dtype) -> str | None:
    return None if dtype.kind in "biuf" else "a numeric array"


def read_arrays(path, what: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at `path`, by name; anything unreadable is an InputError naming `what`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if len(infos) > _MAX_MEMBERS:
                raise InputError(f"{what} {path}: {len(infos)} members, more than the {_MAX_MEMBERS} read")
            names = [i.filename[:-4] if i.filename.endswith(".npy") else i.filename for i in infos]
    except InputError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as err:
        raise InputError(f"{what} {path}: not a readable .npz archive ({type(err).__name__}: {err})") from None
    try:
        return read_npz(path, names, (), _accept_numbers)
    except InputError as err:
        raise InputError(f"{what}: {err}") from None


def read_settings(path):
    """The `StepSettings` of a JSON file; anything wrong with it is an InputError naming the file."""
    from sclref.oracle import StepSettings

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"settings: no such file {path}")
    if path.stat().st_size > _MAX_SETTINGS_BYTES:
        raise InputError(f"settings {path}: larger than {_MAX_SETTINGS_BYTES:,} bytes")
    try:
        values = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"settings {path}: not valid JSON ({type(err).__name__})") from None
    try:
        return StepSettings.from_dict(values)
    except InputError as err:
        raise InputError(f"settings {path}: {err}") from None


def _batch(arrays: dict, path, steps: int):
    if "x" in arrays or "y" in arrays:
        extra = sorted(set(arrays) - {"x", "y"})
        if "x" not in arrays or "y" not in arrays or extra:
            raise InputError(f"batch {path}: expected arrays x and y (or x_0, y_0, ...), got {sorted(arrays)}")
        return arrays["x"], arrays["y"]
    wanted = {f"{k}_{i}" for i in range(steps) for k in ("x", "y")}
    if set(arrays) != wanted:
        raise InputError(f"batch {path}: expected x and y, or x_0, y_0, ..., x_{steps - 1}, y_{steps - 1} for "
                         f"{steps} step(s); got {sorted(arrays)[:12]}")
    return [(arrays[f"x_{i}"], arrays[f"y_{i}"]) for i in range(steps)]


def _theirs(arrays: dict, path):
    out = {}
    for key, value in arrays.items():
        if not re.fullmatch(r"[^\x00]{1,512}", key):
            raise InputError(f"theirs {path}: a member name must be 1 to 512 characters, got {key[:40]!r}")
        out[key] = value[()] if value.ndim == 0 else value
    return out


def _write(path, flat: dict) -> None:
    storage.atomic_write_bytes(path, storage.zip_bytes({f"{k}.npy": storage.npy_bytes(np.array(v, order="C"))
                                              for k, v in flat.items()}))


def _describe_steps(result) -> list[dict]:
    rows = []
    for record in result.steps:
        kept = sum(int(m.sum()) for m in record.mask_after.values())
        total = sum(m.size for m in record.mask_after.values())
        rows.append({"loss": record.loss, "penalty": record.penalty,
                     "flipped": sum(int(f.sum()) for f in record.flipped.values()),
                     "sparsity": 1 - kept / total if total else 0.0})
    return rows


def run_verify(args: argparse.Namespace) -> int:
    """The handler of ``sclref verify``; returns the exit status."""
    from sclref.oracle import compare, reference_step

    try:
        settings = read_settings(args.settings)
        state = read_arrays(args.state, "state")
        batch = _batch(read_arrays(args.batch, "batch"), args.batch, args.steps)
        theirs = _theirs(read_arrays(args.theirs, "theirs"), args.theirs) if args.theirs else None
        result = reference_step(args.model, state, batch, settings, steps=args.steps, layout=args.layout,
                                num_classes=args.num_classes or None)
        comparison = compare(result, theirs) if theirs is not None else None
        if args.out:
            _write(args.out, result.to_flat())
    except (InputError, FileNotFoundError) as err:
        message = " ".join(str(err).split())
        print(f"sclref verify: {message}", file=sys.stderr)
        return 2
    steps = _describe_steps(result)
    if args.json:
        record = {"model": args.model, "steps": steps, "out": args.out,
                  "comparison": None if comparison is None else comparison.to_dict()}
        print(json.dumps(record, indent=2, allow_nan=False, default=str))
    else:
        for i, row in enumerate(steps):
            print(f"step {i}: loss {row['loss']:.10g}  penalty {row['penalty']:.6g}  {row['flipped']} mask(s) "
                  f"flipped  sparsity {100 * row['sparsity']:.2f}%")
        if args.out:
            print(f"wrote every stage to {args.out}")
        if comparison is not None:
            print(comparison.report())
    return 0 if comparison is None or comparison.ok else 1
