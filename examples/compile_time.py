"""The default model's programs compiled one at a time, each timed alone: capture, passes, AOTInductor.

Run it with empty caches to see a first run's compile (the program cache is off here; Inductor's and the kernels'
caches are whatever ``TORCHINDUCTOR_CACHE_DIR`` and ``SPECPASS_CACHE`` point at):

    SPECPASS_CACHE=$(mktemp -d) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python examples/compile_time.py

Prints one line per step with its seconds.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["SPECPASS_PROGRAM_CACHE"] = "0"  # every program compiles here, none comes from an earlier run

import torch  # noqa: E402

import specpass  # noqa: E402
from specpass.kernels import build_kernels, loaded_isa  # noqa: E402
from specpass.lower import resolve  # noqa: E402
from specpass.models import default_model  # noqa: E402
from specpass.passes import PIPELINES  # noqa: E402
from specpass.programs import build_program  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-cache-len", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    model, _ = default_model()
    print(f"load the converted model   {time.perf_counter() - t:6.1f} s")
    t = time.perf_counter()
    build_kernels()
    print(f"kernels (build or cache)   {time.perf_counter() - t:6.1f} s")
    t = time.perf_counter()
    captured = specpass.capture(model, max_cache_len=args.max_cache_len)
    print(f"capture                    {time.perf_counter() - t:6.1f} s")
    for name in ("prefill", "decode"):
        t = time.perf_counter()
        program, _ = build_program(captured, name, PIPELINES[name], "inductor", dynamic_q=True)
        resolve(program)
        print(f"{name:<10} passes + AOTI  {time.perf_counter() - t:6.1f} s (alone)")
    print(f"kernels {loaded_isa()}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
