"""Draft trees on the default model: tokens/s, tau and the verify pass's size for tree budgets whose recycled-token
templates come from Sequoia's search over measured acceptance, against chain lookup and plain decoding.

Greedy, Spec-Bench dev prompts stratified by category, one compiled model, the settings taking turns on the
same prompts; every output is checked against plain compiled decoding's.

    python examples/tree_sweep.py --num-prompts 12 --max-new-tokens 128 --budgets 2,3,4,6,8
"""

from __future__ import annotations

import argparse

import torch

import specpass
from specpass.bench import load_questions, resolve_prompts, stratified_sample
from specpass.models import chat_ids, default_model
from specpass.runtime.generate import RANK_DEPTHS
from specpass.tune.plan import SpecPlan
from specpass.tune.tree_shape import best_tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--budgets", default="2,3,4,6,8")
    parser.add_argument("--lookup", type=int, default=2)
    args = parser.parse_args()
    model, tokenizer = default_model()
    questions = stratified_sample(load_questions(resolve_prompts(None)), args.num_prompts)
    prompts = [chat_ids(tokenizer, q["turns"][0]) for q in questions]
    sm = specpass.optimize(model, speculate=False, max_cache_len=1024)

    def run(plan):
        """outputs, tokens/s, tau, tokens fed to the verifier per step, recycled-token (hits, tries)."""
        sm.plan = plan
        sm.recycled.next.clear()  # each setting starts cold: a table from an earlier run holds these very outputs
        outs, tokens, seconds, steps, nodes = [], 0, 0.0, 0, 0
        hits, tries = torch.zeros(RANK_DEPTHS, sm.recycled.k), torch.zeros(RANK_DEPTHS)
        for ids in prompts:
            outs.append(sm.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False))
            s = sm.last_stats
            tokens, seconds, steps = tokens + s.new_tokens, seconds + s.total_s, steps + s.steps
            nodes += s.tree_nodes or s.steps + sum(s.drafted)  # a chain step verifies its root + drafts
            if s.rank_tries:
                hits += torch.tensor(s.rank_hits, dtype=torch.float)
                tries += torch.tensor(s.rank_tries, dtype=torch.float)
        return outs, tokens / seconds, tokens / steps, nodes / max(steps, 1), (hits, tries)

    run(None)  # warm-up
    plain, plain_tps, _, _, _ = run(None)
    rows = [("plain compiled decoding", plain_tps, 1.0, 1.0, True)]
    chain = SpecPlan(speculate=True, lookup=args.lookup, max_draft=0)
    outs, tps, tau, nodes, _ = run(chain)
    rows.append((f"chain: lookup {args.lookup}", tps, tau, nodes, all(map(torch.equal, plain, outs))))

    # Measure recycled-token acceptance per depth and rank with a wide tree.
    wide, _ = best_tree([[0.5, 0.2, 0.1, 0.05]] * 6, 16)
    plan = SpecPlan(speculate=True, lookup=args.lookup, tree_budget=16, tree_template=[list(t) for t in wide])
    _, _, _, _, (hits, tries) = run(plan)
    accept = (hits / tries.clamp_min(1)[:, None]).tolist()
    print("recycled-token acceptance per depth (rows) and rank (columns):")
    for d, row in enumerate(accept):
        print(f"  depth {d + 1}: " + " ".join(f"{a:.3f}" for a in row) + f"  (n={int(tries[d])})")
    for budget in [int(b) for b in args.budgets.split(",")]:
        for branches in (1, 2):
            template, expected = best_tree(accept, budget)
            plan = SpecPlan(
                speculate=True,
                lookup=args.lookup,
                lookup_branches=branches,
                tree_budget=budget,
                tree_template=[list(t) for t in template],
            )
            outs, tps, tau, nodes, _ = run(plan)
            name = f"tree {budget} nodes, {branches} lookup branch(es), template {template}"
            rows.append((name, tps, tau, nodes, all(map(torch.equal, plain, outs))))
    print("| setting | tokens/s | vs plain | tau | nodes per verify | identical |\n|---|---:|---:|---:|---:|---|")
    for name, tps, tau, nodes, same in rows:
        print(f"| {name} | {tps:.1f} | {tps / plain_tps:.2f}x | {tau:.2f} | {nodes:.2f} | {same} |")


if __name__ == "__main__":
    main()
