"""Write few-query attention out as matmul + softmax (Vaswani et al., 2017) instead of calling SDPA.

A decode or verify step attends a handful of query rows to the cached keys. On CPU, ATen's SDPA runs its
flash-attention kernel for that, built for long queries: per head, BLAS calls on tiles, online-softmax
bookkeeping, and the expanded mask copied for it, a fixed cost that is most of the call at a few hundred cached
tokens. Written out, the same attention is one batched product for the scores (all heads in one BLAS call), a
softmax that Inductor fuses with the mask's add and the scaling, and one batched product for the output::

    o = sdpa(q, k, v, mask, scale=s)
  ==>
    o = softmax((q * s) @ k^T + mask) @ v          (dropout 0, no causal flag: the mask says it all)

Rows that the mask hides entirely do not occur in these programs: each query sees at least its own slot.
Prefill keeps SDPA: its queries are many, where the flash kernel's tiling pays. Only fp32 attention on CPU is
rewritten (``plain_arguments`` says why not the rest). On a 2-core Xeon the default model's decode step is
about 5% faster at 150 cached tokens and 3% at 900 (docs/benchmarks.md).
"""

from __future__ import annotations

import math

import torch

from specpass.passes.manager import PassResult, tag

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default


def plain_arguments(gm: torch.fx.GraphModule, sdpa: torch.fx.Node) -> tuple | None:
    """(query, key, value, mask, scale) when ``sdpa`` is plain masked attention; else None."""
    # Every argument by name, the schema's defaults filled in.
    args = sdpa.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs
    mask = args["attn_mask"]
    if args["dropout_p"] != 0.0 or args["is_causal"] or args["enable_gqa"] or not isinstance(mask, torch.fx.Node):
        return None
    q, k, v = (args[n].meta.get("val") for n in ("query", "key", "value"))
    mask_val = mask.meta.get("val")
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v, mask_val)):
        return None
    if q.device.type != "cpu" or q.dtype != torch.float32 or mask_val.dtype != q.dtype or q.shape[1] != k.shape[1]:
        # GPUs' attention kernels have no such fixed cost; in 16 bits SDPA accumulates in fp32 where a written-out
        # softmax would round its scores; a boolean mask or heads SDPA broadcasts: all left to SDPA.
        return None
    scale = args["scale"] if args["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    return args["query"], args["key"], args["value"], mask, float(scale)


def inline_attention(gm: torch.fx.GraphModule, structure, cfg=None) -> PassResult:
    """Replace each layer's SDPA call by matmul, softmax, matmul on the same operands."""
    # Zero matches is a valid outcome (a model whose attention is already eager softmax): nothing to inline.
    graph = gm.graph
    n = 0
    for layer in structure.layers:
        for i, sdpa in enumerate(layer.attention):
            if sdpa.target != _SDPA:
                continue
            plain = plain_arguments(gm, sdpa)
            if plain is None:
                continue
            query, key, value, mask, scale = plain
            qv, kv, vv, mv = (x.meta["val"] for x in (query, key, value, mask))
            with graph.inserting_before(sdpa):
                q_scaled = graph.call_function(aten.mul.Tensor, (query, scale))
                k_t = graph.call_function(aten.transpose.int, (key, -2, -1))
                scores = graph.call_function(aten.matmul.default, (q_scaled, k_t))
                masked = graph.call_function(aten.add.Tensor, (scores, mask))
                probs = graph.call_function(aten._softmax.default, (masked, -1, False))
                out = graph.call_function(aten.matmul.default, (probs, value))
            q_scaled.meta["val"] = qv * scale
            k_t.meta["val"] = kv.transpose(-2, -1)
            scores.meta["val"] = q_scaled.meta["val"] @ k_t.meta["val"]
            masked.meta["val"] = scores.meta["val"] + mv
            probs.meta["val"] = torch.softmax(masked.meta["val"], -1)
            out.meta["val"] = probs.meta["val"] @ vv
            for new in (q_scaled, k_t, scores, masked, probs, out):
                tag(new, "inline_attention", sdpa)
            sdpa.replace_all_uses_with(out)
            graph.erase_node(sdpa)
            layer.attention[i] = probs  # the softmax of masked scores, as in a model with eager attention
            n += 1
    return PassResult(gm, n > 0, n)
