"""Context-lookup drafting on the default model: tokens/s and tau for a few lookup settings vs plain decoding.

Greedy, Spec-Bench dev prompts stratified by category, one compiled model, the settings taking turns on the
same prompts; every output is checked against plain compiled decoding's.

    python examples/lookup_sweep.py --num-prompts 24 --max-new-tokens 128
"""

from __future__ import annotations

import argparse

import torch
from _sweep import compiled_default_model
from _sweep import run as run_plan

from specpass.tune.plan import SpecPlan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    sm, prompts = compiled_default_model(args.num_prompts)
    run_plan(sm, prompts, None, args.max_new_tokens)  # warm-up
    plain, plain_tps, *_ = run_plan(sm, prompts, None, args.max_new_tokens)
    print("| setting | tokens/s | vs plain | tau | identical |\n|---|---:|---:|---:|---|")
    print(f"| plain compiled decoding | {plain_tps:.1f} | 1.00x | 1.00 | - |")
    for tokens in (1, 2, 3):
        for min_n in (1, 2):
            plan = SpecPlan(speculate=True, lookup=tokens, lookup_min_ngram=min_n, max_draft=0)
            outs, tps, tau, *_ = run_plan(sm, prompts, plan, args.max_new_tokens)
            same = all(torch.equal(a, b) for a, b in zip(plain, outs, strict=True))
            print(
                f"| lookup {tokens} tokens, {min_n}..3-grams | {tps:.1f} | {tps / plain_tps:.2f}x | {tau:.2f} | {same} |"
            )


if __name__ == "__main__":
    main()
