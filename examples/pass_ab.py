"""Time the default model's decode step with and without one pass of the decode pipeline, alternating in one
process, and check that both give the same tokens.

    python examples/pass_ab.py --without inline_attention [--context 150] [--reps 12] [--threads 2]

Why it exists: a pass that only saves time is kept by measurement (docs/benchmarks.md, "attention written
out"); on 2 shared cores the machine's speed drifts by more than such a pass gains, so the two programs run
in turn, rep after rep, and the medians and the reps each one won are compared. Run it with nothing else on the
machine.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from decode_step_latency import median_step_ms  # examples/ is the script's own folder: on sys.path

import specpass
from specpass import passes
from specpass.models import default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--without", required=True, help="a pass of the decode pipeline, e.g. inline_attention")
    parser.add_argument("--context", type=int, default=150, help="cached tokens at each step")
    parser.add_argument("--reps", type=int, default=12, help="turns of each program")
    parser.add_argument("--steps", type=int, default=300, help="decode steps a turn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-cache-len", type=int, default=960)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipeline = passes.PIPELINES["decode"]
    if args.without not in [p.__name__ for p in pipeline]:
        parser.error(f"{args.without} is not a pass of the decode pipeline: {[p.__name__ for p in pipeline]}")

    model, _ = default_model()
    fast = {"with": specpass.optimize(model, speculate=False, max_cache_len=args.max_cache_len)}
    passes.PIPELINES["decode"] = tuple(p for p in pipeline if p.__name__ != args.without)
    try:
        fast["without"] = specpass.optimize(model, speculate=False, max_cache_len=args.max_cache_len)
    finally:
        passes.PIPELINES["decode"] = pipeline

    ids = torch.randint(100, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    for f in fast.values():
        f.generate(ids, max_new_tokens=1)  # fills the cache up to the context
    times: dict[str, list[float]] = {name: [] for name in fast}
    for _ in range(args.reps):
        for name, f in fast.items():
            times[name].append(median_step_ms(f.programs["decode"], f.cache, args.context, args.steps))
    won = sum(w < wo for w, wo in zip(times["with"], times["without"], strict=True))
    print(f"decode step, context {args.context}, {args.threads} threads, medians of {args.steps} steps per turn:")
    for name, t in times.items():
        print(
            f"  {name:7s} {args.without}: median {statistics.median(t):.3f} ms, best {min(t):.3f}  ({' '.join(f'{x:.2f}' for x in t)})"
        )
    print(f"  with it faster in {won} of {args.reps} turns")
    prompt = ids[:, :40]
    same = torch.equal(
        fast["with"].generate(prompt, max_new_tokens=48), fast["without"].generate(prompt, max_new_tokens=48)
    )
    print(f"  the same 48 tokens from a 40-token prompt: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
