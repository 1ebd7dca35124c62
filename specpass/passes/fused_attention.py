"""Compute each few-query SDPA call in one fused kernel call (flash-decoding, Dao et al., 2023).

A decode or verify step attends a handful of query rows to the cached keys. ``inline_attention`` writes that out
as two batched matmuls around a softmax; on CPU those are three parallel regions for about 10 us of arithmetic a
layer (BLAS starts its threads for each tiny product). Where specpass's C++ kernels are built, this pass replaces
the SDPA call instead by ``torch.ops.specpass.attention`` (kernels/attention.cpp): scores, softmax and weighted
sum in one parallel region, the keys split between the threads, so that one key/value head keeps every core
busy::

    o = sdpa(q, k, v, mask, scale=s)   ==>   o = specpass.attention(q, k, v, mask, s)

It rewrites exactly the calls ``inline_attention`` would (``inline_attention.plain_arguments``: fp32 on CPU,
an additive mask, no dropout or causal flag), and runs before it; what it leaves (no C++ compiler here, or
``optimize(model, exact_lowbit=False)``, which uses none of specpass's kernels) ``inline_attention`` writes out.
With many query rows (a token tree) the kernel multiplies with the matmuls itself. On a 2-core Xeon a decode step
of the default model was 8% faster than with the written-out attention, Gemma 3 270M's 9% (docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from specpass.kernels import build_error
from specpass.passes.inline_attention import plain_arguments
from specpass.passes.manager import PassResult, tag

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_FUSED = torch.ops.specpass.attention.default


def fused_attention(gm: torch.fx.GraphModule, structure, cfg=None) -> PassResult:
    """Replace each layer's plain SDPA call by specpass's fused attention kernel on the same operands."""
    calls = [
        (layer, i, sdpa, plain)
        for layer in structure.layers
        for i, sdpa in enumerate(layer.attention)
        if sdpa.target == _SDPA and (plain := plain_arguments(gm, sdpa)) is not None
    ]
    # Zero matches is a valid outcome (prefill-sized or non-fp32 attention; a model with eager attention).
    if not calls or build_error() is not None:  # no C++ compiler: inline_attention writes the matmuls out
        return PassResult(gm, False, 0)
    for layer, i, sdpa, (query, key, value, mask, scale) in calls:
        with gm.graph.inserting_before(sdpa):
            out = gm.graph.call_function(_FUSED, (query, key, value, mask, scale))
        out.meta["val"] = sdpa.meta["val"]
        tag(out, "fused_attention", sdpa)
        sdpa.replace_all_uses_with(out)
        gm.graph.erase_node(sdpa)
        layer.attention[i] = out  # it reads the mask inputs, as tree_verify proves
    return PassResult(gm, True, len(calls))
