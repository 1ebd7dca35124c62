"""Draft trees on the default model: tokens/s, tau and the verify pass's size for tree budgets whose recycled-token
templates come from Sequoia's search over measured acceptance, against chain lookup and plain decoding.

Greedy, Spec-Bench dev prompts stratified by category, one compiled model, the settings taking turns on the
same prompts; every output is checked against plain compiled decoding's.

    python examples/tree_sweep.py --num-prompts 12 --max-new-tokens 128 --budgets 2,3,4,6,8
"""

from __future__ import annotations

import argparse

import torch
from _sweep import compiled_default_model
from _sweep import run as run_plan

from specpass.tune.plan import SpecPlan
from specpass.tune.tree_shape import best_tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--budgets", default="2,3,4,6,8")
    parser.add_argument("--lookup", type=int, default=2)
    args = parser.parse_args()
    sm, prompts = compiled_default_model(args.num_prompts)

    def run(plan):
        return run_plan(sm, prompts, plan, args.max_new_tokens)

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
