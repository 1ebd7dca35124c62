"""The ``specpass`` command line: demo, bench, coverage.

Exit codes: 0 success, 1 a check failed (e.g. outputs differ), 2 bad usage or a SpecPassError.
"""

from __future__ import annotations

import argparse
import logging
import sys

from specpass.errors import SpecPassError


def _demo(args: argparse.Namespace) -> int:
    from specpass.demo import run_demo

    return run_demo(args)


def _bench(args: argparse.Namespace) -> int:
    from specpass.bench import run_bench

    return run_bench(args)


def _coverage(args: argparse.Namespace) -> int:
    from specpass.coverage import run_coverage

    return run_coverage(args)


def build_parser() -> argparse.ArgumentParser:
    from specpass import __version__

    parser = argparse.ArgumentParser(prog="specpass", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"specpass {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from specpass.bench import add_arguments as bench_args
    from specpass.coverage import add_arguments as coverage_args
    from specpass.demo import add_arguments as demo_args

    demo_args(sub.add_parser("demo", help="generate with the default model and print the speedup over HF eager"))
    bench_args(sub.add_parser("bench", help="benchmark specpass against HF baselines on Spec-Bench prompts"))
    coverage_args(sub.add_parser("coverage", help="try every HF causal-LM architecture; write docs/coverage.md"))
    return parser


_COMMANDS = {"demo": _demo, "bench": _bench, "coverage": _coverage}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except SpecPassError as e:
        print(f"specpass: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specpass: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
