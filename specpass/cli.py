"""The ``specpass`` command line: demo, tune, bench, coverage, compile, run, inspect, graphs, keygen, cache.

Exit codes: 0 success, 1 a check failed (e.g. outputs differ), 2 bad usage or a SpecPassError.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from specpass.errors import SpecPassError


def build_parser() -> argparse.ArgumentParser:
    from specpass.version import __version__

    parser = argparse.ArgumentParser(prog="specpass", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"specpass {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from specpass.bench import add_arguments as bench_args
    from specpass.cache import add_arguments as cache_args
    from specpass.coverage import add_arguments as coverage_args
    from specpass.demo import add_arguments as demo_args
    from specpass.engine_cli import (
        add_compile_arguments,
        add_inspect_arguments,
        add_keygen_arguments,
        add_run_arguments,
    )
    from specpass.graphs_cli import add_arguments as graphs_args
    from specpass.tune_cli import add_arguments as tune_args

    demo_args(sub.add_parser("demo", help="generate with the default model and print the speedup over HF eager"))
    bench_args(sub.add_parser("bench", help="benchmark specpass against HF baselines on Spec-Bench prompts"))
    coverage_args(sub.add_parser("coverage", help="try every HF causal-LM architecture; write docs/coverage.md"))
    add_compile_arguments(sub.add_parser("compile", help="compile a model into an engine file"))
    add_run_arguments(sub.add_parser("run", help="generate from an engine file"))
    add_inspect_arguments(sub.add_parser("inspect", help="show an engine file's manifest and programs"))
    graphs_args(sub.add_parser("graphs", help="snapshot the graphs specpass compiles for a model, or check them (CI)"))
    add_keygen_arguments(sub.add_parser("keygen", help="write an Ed25519 key pair for signing engine files"))
    tune_args(sub.add_parser("tune", help="run the full calibration search for a model within a time budget"))
    cache_args(sub.add_parser("cache", help="show the size of specpass's cache, or clear it"))
    return parser


#: command -> (module, function(args) -> exit code); imported only when that command runs
_COMMANDS = {
    "demo": ("specpass.demo", "run_demo"),
    "bench": ("specpass.bench", "run_bench"),
    "coverage": ("specpass.coverage", "run_coverage"),
    "compile": ("specpass.engine_cli", "run_compile"),
    "run": ("specpass.engine_cli", "run_run"),
    "inspect": ("specpass.engine_cli", "run_inspect"),
    "graphs": ("specpass.graphs_cli", "run_graphs"),
    "keygen": ("specpass.engine_cli", "run_keygen"),
    "tune": ("specpass.tune_cli", "run_tune"),
    "cache": ("specpass.cache", "run_cache"),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        module, function = _COMMANDS[args.command]
        return getattr(importlib.import_module(module), function)(args)
    except SpecPassError as e:
        print(f"specpass: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specpass: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
