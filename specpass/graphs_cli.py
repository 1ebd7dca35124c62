"""``specpass graphs``: snapshot the graphs specpass compiles for a model, or check them against a snapshot (CI).

``-o DIR`` writes a snapshot (specpass/snapshot.py); ``--check DIR`` takes the model's graphs again with the
snapshot's plan, options and low-bit choices (nothing is timed or compiled) and exits 0 when nothing changed,
1 with a diff per program naming the pass whose output changed first, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from specpass.cli_args import EXACT_LOWBIT_HELP, MODEL_HELP
from specpass.errors import SpecPassError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Snapshot the graphs specpass compiles for a model (capture and passes, as specpass.optimize runs them, "
        "without compiling): one normalized graph text per program and pass, and a report (passes and op counts, "
        "low-bit weights, the plan, the CPU's low-bit choices, weight bytes per decode step). With --check, take "
        "them again with the snapshot's plan and choices and compare: exit 0 when unchanged, 1 with a diff per "
        "program (naming the pass whose output changed first), 2 on bad input."
    )
    parser.add_argument("model", nargs="?", default="default", help=f"{MODEL_HELP} (default: %(default)s)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("-o", "--output", metavar="DIR", help="write a snapshot to DIR (replacing a snapshot there)")
    where.add_argument("--check", metavar="DIR", help="compare the model's graphs with the snapshot in DIR")
    parser.add_argument("--update", action="store_true", help="with --check: rewrite the snapshot when it differs")
    parser.add_argument(
        "--plan",
        default=None,
        metavar="PATH",
        help="a SpecPlan JSON file (default: with -o the model's cached plan, else plain decoding; with --check "
        "the snapshot's)",
    )
    parser.add_argument("--no-speculate", action="store_true", help="plain decoding's programs only")
    parser.add_argument(
        "--max-cache-len",
        type=int,
        default=None,
        metavar="N",
        help="KV cache size to capture (default: with --check the snapshot's, else the model's default)",
    )
    parser.add_argument("--no-exact-lowbit", action="store_true", help=EXACT_LOWBIT_HELP)
    parser.add_argument(
        "--max-diff-lines",
        type=int,
        default=400,
        metavar="N",
        help="diff lines shown per changed part, 0 for all (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run_graphs(args: argparse.Namespace) -> int:
    from specpass import models, snapshot

    if args.update and not args.check:
        raise SpecPassError("--update goes with --check DIR (-o always writes)")
    if args.plan and args.no_speculate:
        raise SpecPassError("--plan and --no-speculate contradict each other: pass one")
    # bad input fails before the model loads
    old = snapshot.read(args.check) if args.check else None
    if args.output:
        snapshot.writable(args.output)
    plan = _plan(args)
    t0 = time.perf_counter()
    model, _ = models.load(args.model, tokenizer=False)
    if old is not None:
        new, changes = snapshot.check(
            model,
            old,
            plan="snapshot" if plan is False else plan,
            max_cache_len=args.max_cache_len,
            exact_lowbit=not args.no_exact_lowbit,
        )
        if changes and args.update:
            snapshot.write(new, args.check)
        return _report_check(args, changes, time.perf_counter() - t0)
    if plan is False:
        plan = _cached_plan(model, exact_lowbit=not args.no_exact_lowbit)
    taken = snapshot.take(model, plan=plan, max_cache_len=args.max_cache_len, exact_lowbit=not args.no_exact_lowbit)
    snapshot.write(taken, args.output)
    seconds = time.perf_counter() - t0
    programs = list(taken.report["programs"])
    if args.json:
        print(
            json.dumps(
                {"snapshot": args.output, "programs": programs, "plan": taken.report["plan"], "seconds": seconds}
            )
        )
    else:
        print(
            f"wrote {args.output}: {len(programs)} programs ({', '.join(programs)}), {taken.report['plan']}; {seconds:.1f} s"
        )
    return 0


def _plan(args: argparse.Namespace):
    """The plan the user named: a SpecPlan, None (--no-speculate), or False when they named none."""
    if args.no_speculate:
        return None
    if args.plan:
        from specpass.tune.plan import SpecPlan

        return SpecPlan.load(args.plan)
    return False


def _cached_plan(model, *, exact_lowbit: bool):
    """The plan ``optimize()`` would use without calibrating: the cached one, if any (else plain decoding)."""
    from specpass.tune.plan import cached_plan, model_hash

    plan = cached_plan(model_hash(model, exact_lowbit=exact_lowbit))
    if plan is None:
        print(
            "no cached plan for this model: snapshot of plain decoding (run `specpass tune` first to include its "
            "draft programs, or pass --plan)",
            file=sys.stderr,
        )
    return plan


def _report_check(args: argparse.Namespace, changes: list, seconds: float) -> int:
    from specpass.snapshot import render

    if args.json:
        print(
            json.dumps(
                {
                    "snapshot": args.check,
                    "unchanged": not changes,
                    "updated": bool(changes and args.update),
                    "changes": [{"what": c.what, "first": c.first, "diff": c.diff} for c in changes],
                    "seconds": seconds,
                }
            )
        )
    elif not changes:
        print(f"{args.check}: unchanged ({seconds:.1f} s)")
    else:
        print(render(changes, max_lines=args.max_diff_lines))
        print(f"{args.check}: {len(changes)} part(s) changed" + ("; snapshot updated" if args.update else ""))
    return 0 if not changes or args.update else 1
