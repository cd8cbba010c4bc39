"""The `sclref` command line: parses arguments and dispatches to subcommands."""

from __future__ import annotations

import argparse
import platform
import sys

from sclref._version import __version__


def _info(args: argparse.Namespace) -> int:
    """Print the versions and threading set-up that every benchmark report records."""
    from importlib.metadata import version

    from sclref import kernels

    print(f"sclref {__version__}")
    print(f"python {platform.python_version()} ({platform.machine()})")
    print(", ".join(f"{pkg} {version(pkg)}" for pkg in ("numpy", "scipy", "numba")))
    print(f"numba threads: {kernels.num_threads()}, jit {'disabled' if kernels.JIT_DISABLED else 'enabled'}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sclref",
        description="Sparse Connectivity Learning reference engine (NumPy + numba).",
    )
    parser.add_argument("--version", action="version", version=f"sclref {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="print versions, threads and JIT status")
    info.set_defaults(func=_info)
    check = sub.add_parser("gradcheck", help="check every op's gradient against finite differences")
    check.add_argument("--seed", type=int, default=0, help="seed of the test points (default 0)")
    check.set_defaults(func=_gradcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
