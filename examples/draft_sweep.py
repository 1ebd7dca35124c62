"""Draft-program drafts on the default model: EAGLE-2 dynamic trees (top-k per level) against the same draft's
greedy chain, and DEL's dynamic exit layer against fixed exits, beside context-lookup trees and plain decoding.

Greedy, Spec-Bench dev prompts stratified by category, one compiled model, the settings taking turns on the
same prompts; every output is checked against plain compiled decoding's. The drafts are early exits without
an adapter and a SWIFT-style skip set (calibration trains exit adapters; this sweep does not).

    python examples/draft_sweep.py --num-prompts 8 --max-new-tokens 96
"""

from __future__ import annotations

import argparse

import torch
from _sweep import compiled_default_model
from _sweep import run as run_plan

from specpass.programs import build_draft_programs, check_tree_verify, del_costs
from specpass.tune.plan import SpecPlan

#: (name, draft fields): an early exit at mid depth; every third layer of the upper part skipped
DRAFTS = [
    ("exit after layer 14", {"exit_layer": 14}),
    ("skip 7 of 30 layers", {"skip_layers": [9, 12, 15, 18, 21, 24, 27]}),
]
#: (draft_topk, max_draft, tree_budget): the greedy chain, then EAGLE-2 trees
SHAPES = [(1, 3, 4), (2, 3, 4), (2, 3, 6), (3, 2, 6)]
#: DEL's candidate exits: the deepest layers, where a plain early exit of this model agrees most often
DEL_EXITS = [24, 27]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--no-trees", action="store_true", help="only the fixed exits and DEL")
    args = parser.parse_args()
    sm, prompts = compiled_default_model(args.num_prompts)
    check_tree_verify(sm)

    def run(plan):
        return run_plan(sm, prompts, plan, args.max_new_tokens)

    run(None)  # warm-up
    plain, plain_tps, _, _, _ = run(None)
    rows = [("plain compiled decoding", plain_tps, 1.0, 1.0, True)]
    lookup = SpecPlan(speculate=True, lookup=1, lookup_min_ngram=2, tree_budget=2, tree_template=[[0, 0]])
    outs, tps, tau, nodes, _ = run(lookup)
    same = all(map(torch.equal, plain, outs))
    rows.append(("lookup 1 + recycled tokens, 2-node trees (the cached plan)", tps, tau, nodes, same))
    for name, fields in [] if args.no_trees else DRAFTS:
        for k, depth, budget in SHAPES:
            plan = SpecPlan(speculate=True, max_draft=depth, threshold=0.0, tree_budget=budget, draft_topk=k, **fields)
            build_draft_programs(sm, plan)  # compiled once per draft: the shapes share one dynamic program
            outs, tps, tau, nodes, _ = run(plan)
            shape = "greedy chain" if k == 1 else f"EAGLE-2 top-{k}"
            label = f"{name}: {shape}, depth {depth}, {budget}-node trees"
            rows.append((label, tps, tau, nodes, all(map(torch.equal, plain, outs))))
            print(rows[-1], flush=True)
    for name, plan in [
        *[
            (f"fixed exit after layer {k}, chains of up to 3", SpecPlan(speculate=True, exit_layer=k))
            for k in DEL_EXITS
        ],
        (f"DEL over exits {DEL_EXITS}, chains of up to 3", SpecPlan(speculate=True, del_exits=DEL_EXITS)),
    ]:
        plan.max_draft, plan.threshold = 3, 0.3
        if plan.del_exits:
            plan.del_costs = del_costs(sm.captured, plan)
        build_draft_programs(sm, plan)
        outs, tps, tau, nodes, _ = run(plan)
        if plan.del_exits:
            last = sm.last_stats
            costs = [round(c, 2) for c in plan.del_costs]
            name += f" (costs {costs}; last prompt: {last.steps} steps, drafting rounds per exit {last.exit_rounds})"
        rows.append((name, tps, tau, nodes, all(map(torch.equal, plain, outs))))
        print(rows[-1], flush=True)
    print("| setting | tokens/s | vs plain | tau | nodes per verify | identical |\n|---|---:|---:|---:|---:|---|")
    for name, tps, tau, nodes, same in rows:
        print(f"| {name} | {tps:.1f} | {tps / plain_tps:.2f}x | {tau:.2f} | {nodes:.2f} | {same} |")


if __name__ == "__main__":
    main()
