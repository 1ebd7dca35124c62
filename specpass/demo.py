"""``specpass demo``: one chat prompt, Hugging Face generate vs specpass, and the speedup.

The first command a newcomer runs: it loads the default model (SmolLM2-135M-Instruct, fetched and converted
on first use), answers a prompt with HF's eager ``generate``, compiles the model with specpass, streams
specpass's answer, and prints both speeds and whether the two answers are the same token for token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from specpass.cli_args import MODEL_HELP, add_backend_argument, add_threads_argument, apply_threads
from specpass.errors import SpecPassError

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."
#: the KV cache is sized for prompt + new tokens rounded up to this, so that other prompts of about the same length
#: load the programs compiled for this one from the program cache instead of compiling their own (a minute or more
#: on two cores); each decode step attends to at most this many more slots
CACHE_STEP = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Answer one chat prompt with Hugging Face transformers (eager) and with specpass, stream specpass's "
        "answer, and print the tokens/s of both, the speedup, the compile time, and whether the outputs match."
    )
    parser.add_argument(
        "--model",
        default="default",
        help=f"{MODEL_HELP} (default: %(default)s)",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message (default: %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="(default: %(default)s)")
    add_backend_argument(parser)
    add_threads_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run_demo(args: argparse.Namespace, *, model=None, tokenizer=None) -> int:
    """Run the demo; ``model``/``tokenizer`` may be injected (tests). Exit code 1 if the outputs differ."""
    import specpass
    from specpass import models
    from specpass.bench import compare_outputs
    from specpass.capture import rounded_cache_len
    from specpass.tokenization import chat_ids

    if args.max_new_tokens < 1:
        raise SpecPassError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    apply_threads(args.threads)
    if model is None:
        _say(f"Loading {models.DEFAULT_MODEL_NAME if args.model == 'default' else args.model} ...")
        model, tokenizer = models.load(args.model)
    model.eval()
    ids = chat_ids(tokenizer, args.prompt)
    n_prompt = ids.shape[1]
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id

    _say(f"Prompt ({n_prompt} tokens): {args.prompt}")
    _say(f"[1/3] Hugging Face generate (eager), {args.max_new_tokens} new tokens at most ...")

    def hf(max_new_tokens: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )

    hf(2)  # untimed: the first call pays one-time setup
    t0 = time.perf_counter()
    ref = hf(args.max_new_tokens)
    hf_s = time.perf_counter() - t0
    hf_new = ref.shape[1] - n_prompt

    max_cache_len = rounded_cache_len(model, n_prompt + args.max_new_tokens, CACHE_STEP)
    _say(
        f"[2/3] Compiling with specpass ({args.backend}) for up to {max_cache_len} tokens; the programs are cached "
        "for the next run ..."
    )
    spec_model = specpass.optimize(model, tokenizer=tokenizer, backend=args.backend, max_cache_len=max_cache_len)
    warm_s = time.perf_counter()
    spec_model.generate(ids, max_new_tokens=2, do_sample=False, eos_token_id=eos)  # untimed, as for HF
    compile_s = spec_model.compile_s + (time.perf_counter() - warm_s)

    _say("[3/3] specpass generate:")
    streamer = None
    if not args.json:
        from transformers import TextStreamer

        sys.stdout.flush()
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    t0 = time.perf_counter()
    out = spec_model.generate(
        ids, max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=eos, streamer=streamer
    )
    spec_s = time.perf_counter() - t0
    spec_new = out.shape[1] - n_prompt

    diff = compare_outputs(model, ids, ref, out.cpu())
    identical = diff is None
    hf_tps = hf_new / hf_s if hf_s else 0.0
    spec_tps = spec_new / spec_s if spec_s else 0.0
    speedup = spec_tps / hf_tps if hf_tps else 0.0
    ok = identical or diff["near_tie"]

    if args.json:
        result = {
            "model": args.model,
            "prompt": args.prompt,
            "prompt_tokens": n_prompt,
            "max_new_tokens": args.max_new_tokens,
            "backend": args.backend,
            "threads": torch.get_num_threads(),
            "hf_eager": {"new_tokens": hf_new, "seconds": hf_s, "tokens_per_s": hf_tps},
            "specpass": {"new_tokens": spec_new, "seconds": spec_s, "tokens_per_s": spec_tps},
            "speedup": speedup,
            "compile_s": compile_s,
            "weights": weights_line(spec_model),
            "plan": plan_line(spec_model, args.model),
            "search": spec_model.plan.search if spec_model.plan is not None else None,
            "identical": identical,
            "mismatch": diff,
            "text": tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True),
        }
        print(json.dumps(result, indent=2))
        return 0 if ok else 1

    print()
    print(f"HF eager   {hf_tps:7.2f} tokens/s  ({hf_new} tokens in {hf_s:.2f} s)")
    print(f"specpass   {spec_tps:7.2f} tokens/s  ({spec_new} tokens in {spec_s:.2f} s)")
    print(f"speedup    {speedup:7.2f}x")
    print(f"compile    {compile_s:7.1f} s  (once per model, cache size and CPU: cached on disk)")
    print(f"weights    {weights_line(spec_model)}")
    print(f"plan       {plan_line(spec_model, args.model)}")
    if identical:
        print("identical  yes: specpass produced exactly HF's tokens")
    else:
        where = f"first difference at new token {diff['position']}"
        if diff["near_tie"]:
            print(
                f"identical  no, but tolerated: {where} is a near-tie of HF's top-2 logits "
                f"(gap {diff['hf_top2_gap']:.1e})"
            )
        else:
            print(f"identical  NO: {where} ({diff['reason']}); please report this as a bug")
    return 0 if ok else 1


def plan_line(sm, model: str) -> str:
    """The speculation plan used, and which search chose it."""
    plan = sm.plan
    if plan is None:
        return "no speculation"
    if plan.search == "quick":
        return f"{plan.describe()} (quick search; `specpass tune {model}` runs the full one, minutes)"
    return f"{plan.describe()} (full search)"


def weights_line(sm) -> str:
    """How the compiled programs read the weights: as exact low-bit blocks (with which kernels, where they were
    faster) or in fp32."""
    from specpass import machine
    from specpass.kernels import loaded_isa
    from specpass.kernels.choice import summarize, summarize_orders

    if not getattr(sm, "lowbit", None):
        orders = summarize_orders(getattr(sm, "order_choices", {}))
        return "fp32" + ("" if sm.exact_lowbit else " (exact_lowbit=False)") + (f"; {orders}" if orders else "")
    packed = sum(v["bytes"] for v in sm.lowbit.values()) / 1e6
    return (
        f"{len(sm.lowbit)} matrices as exact low-bit blocks ({packed:.1f} MB), {loaded_isa()} kernels on "
        f"{machine.cpu_model()}; {summarize(sm.lowbit_choices)}"
    )


def _say(message: str) -> None:
    """A progress line on stderr, so that stdout holds only the answer and the results."""
    print(message, file=sys.stderr, flush=True)
