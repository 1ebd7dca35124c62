"""``specpass tune``: the full calibration search for a model, within a time budget, cached as its plan.

A first ``optimize()`` (or ``specpass demo``) chooses its plan with the quick search, in seconds; this command
runs every candidate (context lookup, draft trees, draft programs, DEL: tune/calibrate.py), keeps what it
measured if it is stopped (a second run resumes), and caches the better plan, which ``optimize()`` then uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from specpass.cli_args import EXACT_LOWBIT_HELP, MODEL_HELP, add_backend_argument, add_threads_argument, apply_threads
from specpass.errors import SpecPassError

DEFAULT_BUDGET_S = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the full calibration search for a model (context lookup, draft trees, early-exit and layer-skip "
        "drafts, DEL), timed generating against plain decoding, within a time budget; cache the plan, which "
        "specpass.optimize, demo, bench and compile then use. Stopped early, it keeps its measurements: run it "
        "again to resume."
    )
    parser.add_argument("model", nargs="?", default="default", help=f"{MODEL_HELP} (default: %(default)s)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        metavar="S",
        help="seconds the search may take, after the model is loaded and compiled; candidates that would not "
        "fit are left for the next run (default: %(default)g)",
    )
    add_backend_argument(parser)
    parser.add_argument("--max-cache-len", type=int, default=None, metavar="N", help="KV cache size to compile")
    parser.add_argument("--no-exact-lowbit", action="store_true", help=EXACT_LOWBIT_HELP)
    add_threads_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run_tune(args: argparse.Namespace) -> int:

    from specpass import models
    from specpass.programs import compile_plain
    from specpass.tune.calibrate import calibrate_compiled
    from specpass.tune.plan import cached_plan, model_hash, plan_cache_dir

    if args.budget_s <= 0:
        raise SpecPassError(f"--budget-s must be > 0, got {args.budget_s:g}")
    apply_threads(args.threads)
    t0 = time.perf_counter()
    _say(f"Loading {models.DEFAULT_MODEL_NAME if args.model == 'default' else args.model} ...")
    model, tokenizer = models.load(args.model)
    exact_lowbit = not args.no_exact_lowbit
    sm = compile_plain(
        model, backend=args.backend, max_cache_len=args.max_cache_len, progress=True, exact_lowbit=exact_lowbit
    )
    key = model_hash(model, exact_lowbit=exact_lowbit)
    before = cached_plan(key)
    _say(f"Searching within {args.budget_s:g} s (--budget-s) ...")
    plan = calibrate_compiled(sm, tokenizer=tokenizer, search="full", budget_s=args.budget_s, resume=True)
    plan.model_hash = key
    path = plan_cache_dir() / f"{key}.json"
    plan.save(path)
    m = plan.measurements
    search = m["search"]
    result = {
        "model": args.model,
        "plan": plan.describe(),
        "reason": plan.reason,
        "plan_file": str(path),
        "complete": search["complete"],
        "candidates_timed": search["timed"],
        "candidates_not_timed": len(search["not_timed"]),
        "search_s": m["calibration_s"],
        "total_s": time.perf_counter() - t0,
        "plain_tokens_per_s": m["plain_tokens_per_s"],
        "tokens_per_s": _tokens_per_s(plan, m),
        "previous_plan": None if before is None else before.describe(),
        "previous_search": None if before is None else before.search,
        "previous_tokens_per_s": None if before is None else _tokens_per_s(before, m),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"plan       {result['plan']}")
    print(f"           {plan.reason}")
    print(f"plain      {result['plain_tokens_per_s']:7.1f} tokens/s")
    print(f"this plan  {result['tokens_per_s']:7.1f} tokens/s")
    if before is not None:
        was = result["previous_tokens_per_s"]
        timed = f"{was:7.1f} tokens/s" if was is not None else "   (not among this search's candidates)"
        print(f"previous   {timed}  ({before.search} search: {result['previous_plan']})")
    done = "complete" if search["complete"] else f"{result['candidates_not_timed']} candidates left for the next run"
    print(f"search     {result['candidates_timed']} candidates timed in {result['search_s']:.0f} s ({done})")
    print(f"cached     {path}")
    return 0


def _tokens_per_s(plan, measurements: dict) -> float | None:
    """``plan``'s tokens/s in the search that made ``measurements``: plain decoding's for a plan that does not
    speculate, else the fastest timed candidate with the same drafts (None if none was timed)."""
    if not plan.speculate:
        return measurements["plain_tokens_per_s"]
    same = [t["tokens_per_s"] for t in measurements.get("timed", []) if t.get("plan") == plan.describe()]
    return max(same, default=None)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
