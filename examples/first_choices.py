"""Compile a model as a first run would (fresh caches) and print each low-bit choice it made, timed.

optimize() times the low-bit kernel against fp32 for every kind of call on first use and keeps the faster
(specpass/kernels/choice.py); the demo and the bench summarize those choices, this prints every one. Run it with
nothing else on the machine: the choices are measurements.

    python examples/first_choices.py [--model gemma-3-270m]     # SPECPASS_KERNEL_ISA=avx2 for the AVX2 path
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as fresh:
        # before torch is imported, which reads Inductor's cache folder then; specpass reads its own when used
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(fresh, "inductor")
        import specpass
        from specpass import kernels, models
        from specpass.kernels import choice

        model, _ = models.load(args.model)  # from the model cache: converting it is not what is timed
        os.environ["SPECPASS_CACHE"] = os.path.join(fresh, "specpass")
        start = time.perf_counter()
        sm = specpass.optimize(model, speculate=False, progress=False)
        took = time.perf_counter() - start
        print(f"{args.model}: compiled in {took:.1f} s, kernels {os.path.basename(kernels.load_kernels())}")
        for what, result in sorted(sm.lowbit_choices.items()):
            print(f"  {what}: {choice.describe_choice(result)}")


if __name__ == "__main__":
    main()
