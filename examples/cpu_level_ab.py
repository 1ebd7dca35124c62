"""Time a bundled model's programs compiled -march=native (Inductor's default) against the x86-64 levels specpass
compiles for (lower/cpu_target.py), in one process, in turns, and check that all give the same tokens.

    python examples/cpu_level_ab.py [--model default] [--fp32] [--turns 8] [--tokens 128]

Why it exists: specpass compiles CPU programs for a named level so that an engine runs on every CPU of that
level (docs/benchmarks.md, "Engines on another CPU"); this shows what the level costs against the native build,
and what a lower level's engine costs on this CPU. Run it with nothing else on the machine; each variant
compiles anew (the program cache is switched off here), about 75 s each for the default model on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from specpass.lower import cpu_target
from specpass.lower import inductor as inductor_lowering
from specpass.machine import kernel_isas
from specpass.models import bundled_model
from specpass.programs import compile_plain
from specpass.tokenization import chat_ids

PROMPT = "Write a short story about a lighthouse keeper."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="a bundled model (default, gemma-3-270m)")
    parser.add_argument("--fp32", action="store_true", help="exact_lowbit=False: every weight in fp32")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ["SPECPASS_PROGRAM_CACHE"] = "0"  # every variant compiled here, none taken from an earlier run
    torch.set_num_threads(args.threads)
    model, tok = bundled_model(args.model, progress=False)
    ids = chat_ids(tok, PROMPT)
    configs = inductor_lowering.inductor_configs

    def native(*a, **k):
        c = configs(*a, **k)
        c.pop("cpp.march", None)  # Inductor's own -march=native and widest vector ISA
        return c

    variants = {}
    for level in ("native", *[lvl for lvl in kernel_isas() if lvl != "generic"]):
        inductor_lowering.inductor_configs = native if level == "native" else configs
        t0 = time.perf_counter()
        variants[level] = compile_plain(
            model,
            backend="inductor",
            max_cache_len=512,
            progress=False,
            exact_lowbit=not args.fp32,
            isa=None if level == "native" else level,
        )
        print(f"{level}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    inductor_lowering.inductor_configs = configs
    ms, outs = {k: [] for k in variants}, {}
    for turn in range(args.turns):
        order = list(variants) if turn % 2 == 0 else list(reversed(variants))
        for level in order:
            t0 = time.perf_counter()
            outs[level] = variants[level].generate(ids, max_new_tokens=args.tokens, do_sample=False)
            ms[level].append((time.perf_counter() - t0) / args.tokens * 1e3)
    for level, times in ms.items():
        print(
            f"{level}: ms a token (prefill included) median {statistics.median(times):.2f}, "
            f"mean {statistics.mean(times):.2f}, turns {[round(t, 2) for t in times]}"
        )
    same = all(torch.equal(o, outs["native"]) for o in outs.values())
    print(
        f"same tokens in every variant: {same}; levels {', '.join(cpu_target.configs(lvl)['cpp.march'] for lvl in variants if lvl != 'native')}"
    )


if __name__ == "__main__":
    main()
