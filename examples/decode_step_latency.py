"""Per-token latency of one decode step of the default model: the same rewritten decode program run eagerly,
under ``torch.compile``, and AOTInductor-compiled (specpass's ``inductor`` backend), in one process.

    python examples/decode_step_latency.py [--context 150] [--steps 40] [--threads 2]

Why it exists: docs/benchmarks.md explains the choice of AOTInductor over ``torch.compile`` with these numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import specpass
from specpass.models import default_model
from specpass.passes import PIPELINES, run_passes
from specpass.runtime.generate import _step


def median_step_ms(program, cache, context: int, steps: int) -> float:
    token = torch.tensor([[5]])
    times = []
    with torch.no_grad():
        for _ in range(3):  # warm-up (and, for torch.compile, compilation)
            cache.length = context
            _step(program, cache, token)
        for _ in range(steps):
            cache.length = context  # the same position every time: a fixed attention width
            t0 = time.perf_counter()
            _step(program, cache, token)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=150)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, _ = default_model()
    fast = specpass.optimize(model, speculate=False, backend="inductor", max_cache_len=512)
    captured = fast.captured
    decode = run_passes(captured.gm, PIPELINES["decode"], captured.structure)
    programs = {
        "eager (rewritten graph)": decode,
        "torch.compile (same graph)": torch.compile(decode, fullgraph=True, dynamic=False),
        "AOTInductor (specpass inductor)": fast.programs["decode"],
    }
    cache = fast.cache
    ids = torch.randint(100, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    fast.generate(ids, max_new_tokens=1)  # fills the cache up to the context
    print(f"decode step, context {args.context}, {args.threads} threads, median of {args.steps}")
    for name, program in programs.items():
        print(f"  {name:34s} {median_step_ms(program, cache, args.context, args.steps):6.2f} ms")


if __name__ == "__main__":
    main()
