"""The `sclref` command line: parses arguments and dispatches to subcommands."""

from __future__ import annotations

import argparse
import functools
import platform
import sys

from sclref._version import __version__
from sclref.flags import add_shared, nonnegative_int


def _info(args: argparse.Namespace) -> int:
    """Print the versions and threading set-up that every benchmark report records."""
    from importlib.metadata import version

    from sclref import kernels

    print(f"sclref {__version__}")
    print(f"python {platform.python_version()} ({platform.machine()})")
    print(", ".join(f"{pkg} {version(pkg)}" for pkg in ("numpy", "scipy", "numba")))
    print(f"jit {'disabled' if kernels.JIT_DISABLED else 'enabled'}, {kernels.numba_threads()} numba threads")
    from sclref import provenance, threads

    for lib in provenance.numpy_blas():
        print(f"BLAS {lib.get('internal_api')} {lib.get('version')} ({lib.get('architecture')}), "
              f"{lib.get('num_threads')} threads; {threads.PINNED_THREADS} while sclref trains (sclref.threads)")
    # numba's parallel loops are off unless asked: a parallel call stalls when another process holds a core. Training
    # splits its own work into tasks instead, which the calling thread takes too, so it never waits for a late thread.
    print(f"training tasks (conv chunks, batch norm, pooling, elementwise): up to {kernels.numba_threads()} threads "
          f"(NUMBA_NUM_THREADS) while BLAS is pinned")
    print(f"training kernels: {'parallel' if kernels.num_threads() > 1 else 'serial'} (SCLREF_NUMBA_PARALLEL=1 "
          f"for parallel); sparse inference: CHWN convolutions of {kernels.sparse.SPLIT_MIN_WORK:,} multiply-adds "
          f"or more split over up to {kernels.numba_threads()} threads as tasks, other kernels on the caller's "
          f"thread; dense layers on {threads.PINNED_THREADS} BLAS thread")
    return 0


def _gradcheck(args: argparse.Namespace) -> int:
    """Check every built-in op's gradient against finite differences and print a table."""
    from sclref.testing import GradientCheckError, check_builtin_ops

    try:
        rows = check_builtin_ops(args.seed)
    except GradientCheckError as err:
        print(err, file=sys.stderr)
        return 1
    width = max(len(name) for name, _ in rows)
    print(f"{'op':<{width}}  relative error (backprop vs finite differences, float64)")
    for name, err in rows:
        print(f"{name:<{width}}  {err:.1e}")
    print(f"all {len(rows)} ops pass")
    return 0


def _add_info(subparsers) -> None:
    subparsers.add_parser("info", help="print versions, threads and JIT status").set_defaults(func=_info)


def _add_gradcheck(subparsers) -> None:
    p = subparsers.add_parser("gradcheck", help="check every op's gradient against finite differences")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the test points")
    p.set_defaults(func=_gradcheck)


def _add_train(subparsers) -> None:
    from sclref import models
    from sclref.train import TrainConfig

    p = subparsers.add_parser("train", help="learn a sparse network with SCL (default: LeNet-300-100 on digits)")
    p.set_defaults(func=_train)
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help=f"one of {', '.join(models.MODELS)}")
    p.add_argument("--ste", default=d.ste, help="straight-through estimator, a name of the sclref.ste registry")
    p.add_argument("--alpha", type=float, default=d.ste_alpha, dest="ste_alpha", help="slope of the leaky_relu STE")
    add_shared(p, data=d.data, epochs=d.epochs, finetune_epochs=d.finetune_epochs, lam=d.lam)
    p.add_argument("--lam-per", default=d.lam_per, metavar="{epoch,step}",
                   help="λ is one epoch's push, spread over its steps (the same λ means the same pruning pressure "
                        "whatever the data size), or each step's")
    p.add_argument("--target-sparsity", type=float, default=None, metavar="PCT",
                   help="adjust λ during training to land at this overall sparsity in percent, e.g. 98")
    p.add_argument("--lam-gain", type=float, default=d.lam_gain,
                   help="with --target-sparsity: how fast λ follows the sparsity error")
    p.add_argument("--mask-grad-norm", default=d.normalization, dest="normalization", metavar="{l2,max,none}",
                   help="how each feature's mask gradient is normalized")
    p.add_argument("--lam-before-norm", action="store_const", const="total", default=d.normalize, dest="normalize",
                   help="add λ's gradient before normalizing the mask gradient (normalize task + λ together); "
                        "by default the task gradient is normalized, then λ's is added")
    p.add_argument("--weighting", default=d.weighting, metavar="{count,flops}",
                   help="what the regularizer counts: connections, or their multiply-adds")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per step")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate of the weights θ (SGD with momentum)")
    p.add_argument("--mask-lr", type=float, default=d.mask_lr, help="learning rate of the mask variables s (SGD)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="momentum of the weights' SGD")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay of θ")
    p.add_argument("--score-init", type=float, default=d.score_init, help="initial mask variables s (> 0: start dense)")
    p.add_argument("--dense", action="store_true", help="train the plain network without masks (a baseline)")
    p.add_argument("--dense-first", action="store_false", dest="mask_first",
                   help="keep the first weight layer dense (unmasked); by default every weight layer is masked")
    p.add_argument("--dense-last", action="store_false", dest="mask_last", help="keep the classifier dense (unmasked)")
    p.add_argument("--augment", action="store_true",
                   help="random crops (padding H // 8 pixels) and horizontal flips of the training images")
    p.add_argument("--dtype", default=d.dtype, metavar="{float32,float64}", help="floating-point type of the run")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the weights and of the data order")
    p.add_argument("--out", default=None, help="output directory (default: runs/MODEL-DATA-STE-seedN)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--replace", action="store_true",
                   help="start afresh in an --out that holds another run, deleting that run's files")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that states every option's default, unless the help already says it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        no_default = action.default is None or action.default == argparse.SUPPRESS
        if "default" in text or not action.option_strings or no_default or action.nargs == 0:  # nargs 0: a flag
            return text
        return f"{text} (default: %(default)s)"


# Every command's parser: help with defaults.
_Parser = functools.partial(argparse.ArgumentParser, formatter_class=_DefaultsFormatter)


def _train(args: argparse.Namespace) -> int:
    """Train with SCL, print one line per epoch and the per-layer table, write the run."""
    from pathlib import Path

    from sclref.train import METRICS, DivergedError, TrainConfig, format_layers, train

    values = {k: v for k, v in vars(args).items() if k not in ("func", "command", "out", "resume", "replace", "json",
                                                               "no_progress", "dense")}
    config = TrainConfig(masked=not args.dense, **values)
    data_name = Path(config.data).stem or config.data
    out = Path(args.out or f"runs/{config.model}-{data_name}-{config.ste if config.masked else 'dense'}"
                              f"-seed{config.seed}")
    if args.resume and args.replace:
        raise ValueError("--resume continues the run in --out, --replace deletes it: give one")
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    try:
        result = train(config, out, resume=args.resume, replace=args.replace, log=log,
                       progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\nsclref train: interrupted. {_resume_hint(out)}", file=sys.stderr)
        return 130
    except DivergedError as err:  # not refused input (exit 2, in `main`): the settings ran, the numbers blew up
        print(f"sclref train: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print((out / METRICS).read_text(), end="")
        return 0
    final = result.history[-1]
    if result.layers:
        print()
        print(format_layers(result.layers))
    print(f"\ntest error {100 * final['test_error']:.2f}%, sparsity {100 * final['sparsity']:.2f}%; "
          f"run written to {out}/")
    return 0


def _resume_hint(out) -> str:
    """Where the last checkpoint of an interrupted run is, and the command that continues it."""
    import shlex

    from sclref import storage
    from sclref.train import CHECKPOINT

    try:
        epoch = storage.load_state(out / CHECKPOINT)["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"No checkpoint was written to {out}/ yet; start again to train."
    argv = [a for a in sys.argv[1:] if a != "--replace"]
    command = shlex.join(["sclref", *argv, *([] if "--resume" in argv else ["--resume"])])
    return f"The last checkpoint is {out / CHECKPOINT} (after epoch {epoch}); continue with:\n  {command}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sclref",
        description="Sparse Connectivity Learning reference engine (NumPy + numba).",
    )
    parser.add_argument("--version", action="version", version=f"sclref {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    from sclref.experiments.cli import add_parser as add_reproduce
    from sclref.oracle.cli import add_parser as add_verify
    from sclref.sparse.cli import add_parsers as add_sparse
    from sclref.theory.cli import add_parser as add_theory

    # One pattern for every command: a function that registers it (and its handler) on `sub`.
    for register in (_add_info, _add_train, _add_gradcheck, add_theory, add_sparse, add_reproduce, add_verify):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except KeyboardInterrupt:  # train says more; every other command has nothing to resume
        print(f"\nsclref {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:  # refused input (InputError is a ValueError), unreadable or unwritable files
        print(f"sclref {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
