"""Which speculation plan pays on a device: tokens/s and tau of plain decoding, context-lookup chains and trees.

Each plan gets its own ``optimize(model, plan=...)``; the default model, greedy, Spec-Bench dev prompts
stratified by category, every output checked against HF eager's. ``--profile`` adds torch.profiler's table of
one generation for each speculative plan (on a GPU: the GPU time per step, and the host's waits on it).

    python examples/device_plans.py --device cuda --backend eager --num-prompts 6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from _sweep import chat_prompts

import specpass
from specpass.lower import BACKENDS
from specpass.models import default_model
from specpass.tune.plan import SpecPlan

GPU_PLAN = Path(__file__).resolve().parent / "plans" / "smollm2-gpu.json"


def plans() -> dict[str, SpecPlan | None]:
    tree = SpecPlan.load(GPU_PLAN)
    chain = dataclasses.replace(tree, tree_budget=0, tree_template=[], lookup_branches=1)
    return {
        "plain": None,
        "lookup chains of up to 3": dataclasses.replace(chain, lookup=3),
        "lookup chains of up to 6": chain,
        "lookup chains of up to 10": dataclasses.replace(chain, lookup=10),
        "lookup tree, 8 nodes, no recycled tokens": dataclasses.replace(tree, tree_budget=8, tree_template=[]),
        "lookup + recycled-token tree, 16 nodes": tree,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="eager", choices=BACKENDS)
    parser.add_argument("--num-prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--plans", default="", help="comma-separated names (default: all)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, tokenizer = default_model(progress=False)
    model = model.to(device).eval()
    eos = model.generation_config.eos_token_id
    prompts = chat_prompts(tokenizer, args.num_prompts, device)
    with torch.no_grad():
        reference = [
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=False
            )
            for ids in prompts
        ]
    wanted = set(filter(None, args.plans.split(",")))
    results = {}
    print("| plan | tok/s | tau | identical to HF eager |\n|---|---:|---:|---|", flush=True)
    for name, plan in plans().items():
        if wanted and name not in wanted:
            continue
        sm = specpass.optimize(model, speculate=plan is not None, plan=plan, backend=args.backend, progress=False)
        sm.generate(prompts[0], max_new_tokens=16, eos_token_id=eos)  # warm-up: graphs, lazy compiles
        tokens = seconds = identical = 0
        taus = []
        for ids, ref in zip(prompts, reference, strict=True):
            _sync(device)
            t0 = time.perf_counter()
            out = sm.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=eos)
            _sync(device)
            seconds += time.perf_counter() - t0
            tokens += out.shape[1] - ids.shape[1]
            identical += torch.equal(out.cpu(), ref.cpu())
            taus.append(sm.last_stats.tau)
        results[name] = {"tokens_per_s": tokens / seconds, "tau": sum(taus) / len(taus), "identical": identical}
        print(
            f"| {name} | {tokens / seconds:.1f} | {sum(taus) / len(taus):.2f} | {identical}/{len(prompts)} |",
            flush=True,
        )
        if args.profile and plan is not None:
            _profile(sm, prompts[-1], eos, device)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile(sm, ids: torch.Tensor, eos, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        sm.generate(ids, max_new_tokens=64, eos_token_id=eos)
        _sync(device)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50))
    print(f"steps {sm.last_stats.steps}, tau {sm.last_stats.tau:.2f}", flush=True)


if __name__ == "__main__":
    main()
