"""Context-lookup drafting on the default model: tokens/s and tau for a few lookup settings vs plain decoding.

Greedy, Spec-Bench dev prompts stratified by category, one compiled model, the settings taking turns on the
same prompts; every output is checked against plain compiled decoding's.

    python examples/lookup_sweep.py --num-prompts 24 --max-new-tokens 128
"""

from __future__ import annotations

import argparse

import torch

import specpass
from specpass.bench import load_questions, resolve_prompts, stratified_sample
from specpass.models import chat_ids, default_model
from specpass.tune.plan import SpecPlan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    model, tokenizer = default_model()
    questions = stratified_sample(load_questions(resolve_prompts(None)), args.num_prompts)
    prompts = [chat_ids(tokenizer, q["turns"][0]) for q in questions]
    sm = specpass.optimize(model, speculate=False, max_cache_len=1024)

    def run(plan):
        sm.plan = plan
        outs, tokens, seconds, taus = [], 0, 0.0, []
        for ids in prompts:
            outs.append(sm.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False))
            tokens, seconds = tokens + sm.last_stats.new_tokens, seconds + sm.last_stats.total_s
            taus.append(sm.last_stats.tau)
        return outs, tokens / seconds, sum(taus) / len(taus)

    run(None)  # warm-up
    plain, plain_tps, _ = run(None)
    print("| setting | tokens/s | vs plain | mean tau | identical |\n|---|---:|---:|---:|---|")
    print(f"| plain compiled decoding | {plain_tps:.1f} | 1.00x | 1.00 | - |")
    for tokens in (1, 2, 3):
        for min_n in (1, 2):
            plan = SpecPlan(speculate=True, lookup=tokens, lookup_min_ngram=min_n, max_draft=0)
            outs, tps, tau = run(plan)
            same = all(torch.equal(a, b) for a, b in zip(plain, outs, strict=True))
            print(
                f"| lookup {tokens} tokens, {min_n}..3-grams | {tps:.1f} | {tps / plain_tps:.2f}x | {tau:.2f} | {same} |"
            )


if __name__ == "__main__":
    main()
