"""The measured fallback of the low-bit kernels, shown: with every kernel call slowed down on purpose (the test hook
``SPECPASS_KERNEL_TEST_DELAY_US``), ``optimize(model)`` times the kernel against fp32, keeps fp32, and decodes as
fast as ``optimize(model, exact_lowbit=False)``. HF eager, the fp32 programs and the measured ones alternate per
prompt in one process, greedy, every output compared with HF eager's.

    python examples/lowbit_fallback.py [--prompts 8] [--max-new-tokens 64] [--delay-us 2000] [--threads 2]

Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

import torch

import specpass
from specpass import kernels, machine
from specpass.bench.runner import load_questions, resolve_prompts, stratified_sample
from specpass.kernels.choice import summarize
from specpass.models import default_model
from specpass.tokenization import chat_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--delay-us", type=int, default=2000, help="added to every low-bit kernel call")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = default_model()
    prompts = [
        chat_ids(tokenizer, q["turns"][0])
        for q in stratified_sample(load_questions(resolve_prompts(None)), args.prompts)
    ]
    cache_len = max(p.shape[1] for p in prompts) + args.max_new_tokens
    fp32 = specpass.optimize(model, speculate=False, max_cache_len=cache_len, progress=False, exact_lowbit=False)
    kernels.set_test_delay(args.delay_us)
    measured = specpass.optimize(model, speculate=False, max_cache_len=cache_len, progress=False)
    eos = model.generation_config.eos_token_id

    def hf(ids):
        with torch.no_grad():
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=eos,
            )

    runs = {
        "hf_eager": hf,
        "exact_lowbit=False": lambda ids: fp32.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=eos),
        f"optimize(), kernel slowed by {args.delay_us} us a call": lambda ids: measured.generate(
            ids, max_new_tokens=args.max_new_tokens, eos_token_id=eos
        ),
    }
    for run in runs.values():
        run(prompts[0][:, :8])  # untimed first call
    tokens = dict.fromkeys(runs, 0)
    seconds = dict.fromkeys(runs, 0.0)
    identical = dict.fromkeys(runs, 0)
    for i, ids in enumerate(prompts):
        names = list(runs)
        outs = {}
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            outs[name] = runs[name](ids)
            seconds[name] += time.perf_counter() - t0
            tokens[name] += outs[name].shape[1] - ids.shape[1]
        for name in names[1:]:
            identical[name] += bool(torch.equal(outs[name], outs["hf_eager"]))
    kernels.set_test_delay(0)
    print(
        f"- CPU: {machine.cpu_model()} ({machine.isa_name()}), {args.threads} threads; kernels {kernels.loaded_isa()}"
    )
    print(
        f"- {args.prompts} Spec-Bench prompts x {args.max_new_tokens} new tokens, greedy; methods alternating per prompt"
    )
    print(f"- the measured choice with the hook: {summarize(measured.lowbit_choices)}")
    print()
    print("| method | tokens/s | vs hf_eager | identical to hf_eager |")
    print("|---|---:|---:|---|")
    base = tokens["hf_eager"] / seconds["hf_eager"]
    for name in runs:
        tps = tokens[name] / seconds[name]
        same = "(reference)" if name == "hf_eager" else f"{identical[name]} of {args.prompts}"
        print(f"| {name} | {tps:.2f} | {tps / base:.2f}x | {same} |")


if __name__ == "__main__":
    main()
