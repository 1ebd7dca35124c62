"""Time the low-bit calls of one decode step of the default model alone: its 121 calls in order, on random
blocks of the same shapes and formats, without the rest of the program.

    python examples/kernel_step.py [--threads 2] [--layers 30]     # SPECPASS_KERNEL_ISA=avx2 for the AVX2 path

Why it exists: it separates the kernels from the rest of a decode step (docs/benchmarks.md compares it with
the whole step), and ``--layers 240`` (8 models' worth, 669 MB) gives a working set that no cache holds, to see
how close the kernels stream to the memory's bandwidth. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specpass import kernels

# (rows, columns, bits, shifted) of a layer's calls: q/k/v stacked, o, gate/up stacked, down (Q4_1)
LAYER = ((576 + 2 * 192, 576, 4, True), (576, 576, 4, True), (2 * 1536, 576, 4, True), (576, 1536, 4, True))
HEAD = (49152, 576, 8, False)  # the tied embedding as the head (Q8_0)


def blocks(rows: int, cols: int, bits: int, shifted: bool, gen: torch.Generator) -> tuple:
    q = torch.randint(0, 256, (rows, cols // 2 if bits == 4 else cols), dtype=torch.uint8, generator=gen)
    scale = torch.rand(rows, cols // 32, generator=gen) * 0.01
    shift = torch.rand(rows, cols // 32, generator=gen) * 0.01 if shifted else torch.empty(0)
    return q, scale, shift, torch.empty(0, dtype=torch.long), torch.empty(0), 32, bits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=30, help="layers of blocks (the default model has 30)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.load_kernels()
    gen = torch.Generator().manual_seed(0)
    calls = [blocks(*shape, gen) for _ in range(args.layers) for shape in LAYER] + [blocks(*HEAD, gen)]
    xs = {k: torch.randn(1, k, generator=gen) for k in {576, 1536}}
    linear = torch.ops.specpass.lowbit_linear

    def step() -> None:
        for b in calls:
            linear(xs[b[0].shape[1] * (2 if b[-1] == 4 else 1)], *b)

    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    nbytes = sum(t.numel() * t.element_size() for b in calls for t in b[:3])
    print(
        f"{torch.ops.specpass.lowbit_isa()} kernels, {args.threads} threads, {len(calls)} calls, {nbytes / 1e6:.1f} MB:"
        f" fastest {min(times) * 1e3:.2f} ms ({nbytes / min(times) / 1e9:.1f} GB/s),"
        f" median {statistics.median(times) * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
