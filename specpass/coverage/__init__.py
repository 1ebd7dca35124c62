"""``specpass coverage``: try every Hugging Face causal-LM architecture and report which ones are lossless.

For each ``model_type`` in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` this builds a tiny random model
(the architecture's default config, shrunk), greedy-decodes a few tokens with ``specpass.optimize(model,
backend="eager")`` (plainly, and with a forced lookup + early-exit plan) and with HF ``generate``, and classifies
the architecture:

- ``lossless``: the token ids are equal, decoding plainly and with forced speculation;
- ``failed``: specpass refused the model with a ``SpecPassError`` (unsupported; the reason says why);
- ``skipped``: transformers itself cannot build or run the tiny model (external deps, remote code, ...);
- ``crash``: any other exception inside specpass, and ``mismatch``: different tokens without an error.
  Both are specpass bugs.

Every architecture runs in a worker process with a time limit, so a hang or a segfault costs one row, not the
report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from specpass.coverage.check import (
    BUGS,
    CRASH,
    FAILED,
    FORCED_PLAN_FIELDS,
    LOSSLESS,
    MISMATCH,
    SKIPPED,
    STATUSES,
    CoverageResult,
    check_architecture,
)
from specpass.coverage.pool import TIMEOUT_S, all_model_types, run_architectures
from specpass.coverage.report import COMMAND, parse_markdown, render_markdown, summary_counts

__all__ = [
    "BUGS",
    "COMMAND",
    "CRASH",
    "FAILED",
    "FORCED_PLAN_FIELDS",
    "LOSSLESS",
    "MISMATCH",
    "SKIPPED",
    "STATUSES",
    "CoverageResult",
    "add_arguments",
    "all_model_types",
    "check_architecture",
    "parse_markdown",
    "render_markdown",
    "run_architectures",
    "run_coverage",
    "summary_counts",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="docs/coverage.md", help="markdown report to write (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    parser.add_argument("--only", nargs="+", metavar="ARCH", default=None, help="check only these model types")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default: %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT_S, help="seconds per architecture before it counts as a crash"
    )


def run_coverage(args: argparse.Namespace) -> int:
    """Check the architectures, write the report(s); exit 1 if any result is a specpass bug (crash/mismatch)."""
    from specpass.errors import SpecPassError
    from specpass.output_paths import check_output_file
    from specpass.progress import progress_bar

    known = all_model_types()
    only = getattr(args, "only", None)
    if only:
        unknown = sorted(set(only) - set(known))
        if unknown:
            raise SpecPassError(f"unknown model types {unknown}; see MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
        model_types = [m for m in known if m in set(only)]
    else:
        model_types = known
    for flag in ("output", "json"):
        if getattr(args, flag, None):
            check_output_file(getattr(args, flag), f"--{flag}")
    bar = progress_bar(total=len(model_types), desc="coverage", unit="arch")

    def show(res: CoverageResult) -> None:
        bar.set_postfix_str(f"{res.model_type}: {res.status}")
        bar.update(1)

    t0 = time.perf_counter()
    try:
        results = run_architectures(
            model_types,
            workers=getattr(args, "workers", 2),
            timeout_s=getattr(args, "timeout", TIMEOUT_S),
            on_result=show,
        )
    finally:
        bar.close()
    counts = summary_counts(results)
    output = getattr(args, "output", None)
    if output:
        if only and Path(output).exists():
            # A partial run updates its rows and keeps the others.
            merged = {m: CoverageResult(m, s, r) for m, (s, r) in parse_markdown(Path(output).read_text()).items()}
            merged.update({r.model_type: r for r in results})
            report = [merged[m] for m in sorted(merged)]
        else:
            report = results
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(render_markdown(report))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps([r.to_json() for r in results], indent=1) + "\n")
    print(", ".join(f"{counts[s]} {s}" for s in STATUSES) + f" ({time.perf_counter() - t0:.0f}s)")
    for r in results:
        if r.status in BUGS:
            print(f"  {r.status}: {r.model_type}: {r.reason}")
    return 1 if any(r.status in BUGS for r in results) else 0
