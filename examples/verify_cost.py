"""Cost of the compiled decode program per call for 1 to 8 tokens (decode and verify), with or without the
``linear_operand_order`` pass.

    python examples/verify_cost.py [--model default] [--without-operand-order] [--context 150]

Why it exists: docs/benchmarks.md ("Weight-stationary linear layers") compares the two operand orders with it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import specpass
from specpass import passes
from specpass.models import load
from specpass.runtime.generate import _run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--without-operand-order", action="store_true", help="drop the pass from decode's pipeline")
    parser.add_argument("--context", type=int, default=150)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.without_operand_order:
        decode = passes.PIPELINES["decode"]
        passes.PIPELINES["decode"] = tuple(p for p in decode if p is not passes.linear_operand_order)
    model, _ = load(args.model)
    sm = specpass.optimize(model, speculate=False, progress=False, max_cache_len=512)
    cells = []
    with torch.no_grad():
        for q in (1, 2, 3, 4, 5, 8):
            ids = torch.full((1, q), 5)
            times = []
            for _ in range(args.calls + 2):  # two warm-up calls
                sm.cache.length = args.context  # the same slots every call: a fixed attention width
                t0 = time.perf_counter()
                _run(sm.programs["decode"], sm.cache, ids)
                times.append(time.perf_counter() - t0)
            cells.append(f"{1e3 * statistics.median(times[2:]):.1f}")
    order = "x @ W.T" if args.without_operand_order else "W @ x.T (linear_operand_order)"
    print("| decode program, ms per call | q = 1 | 2 | 3 | 4 | 5 | 8 |\n|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {order} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
