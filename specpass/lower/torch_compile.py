"""TorchInductor lowering, just in time: ``torch.compile`` of each program, for devices where AOTInductor's
packages cannot load.

On the H200 of 2026-11-27 (torch 2.11.0+cu130) AOTInductor compiled CUDA packages but its loader crashed the
process (docs/benchmarks.md, "GPU"), which left the ``eager`` backend: every aten op its own kernel, about
1,300 launches per decode step of the default model, which CUDA graphs replay at some 2.8 ms of GPU time. The
same Inductor kernels through ``torch.compile`` need no package loader. Dynamo's guards and Python wrapper cost
host time per call (about 4 ms per step on 2 CPU cores, see lower/inductor.py), but runtime/cuda_graphs.py
replays the decode, verify and draft programs from CUDA graphs, which skip both; only prefill pays them.

Compilation is lazy: the first call of each shape compiles (the graphs' warm-up call, before capture), and a
second shape of the same program marks its dimensions dynamic instead of compiling once per shape. Inductor's
own CUDA graphs stay off (default mode): specpass captures the programs itself.
"""

from __future__ import annotations

import warnings

import torch

from specpass.program_export import quiet_compile


class CompiledProgram:
    """A program compiled by ``torch.compile`` on its first call; torch's warnings about itself stay inside."""

    def __init__(self, gm: torch.fx.GraphModule, name: str):
        self.gm = gm
        self.name = name
        self._compiled = torch.compile(gm, fullgraph=True)

    def __call__(self, *args):
        with quiet_compile(), warnings.catch_warnings():
            # Inductor's advice to enable TF32 for fp32 matmuls (seen on the H200): TF32 would change the logits
            warnings.filterwarnings("ignore", message=r".*TensorFloat32 tensor cores.*", category=UserWarning)
            return self._compiled(*args)


def lower_torch_compile(gm: torch.fx.GraphModule, name: str) -> CompiledProgram:
    return CompiledProgram(gm, name)
