"""Attend grouped queries to their shared K/V head directly instead of copying K/V per query head (GQA).

Grouped-query attention (Ainslie et al., 2023) gives g query heads one K/V head. HF's eager and SDPA paths
on CPU first materialise ``repeat_kv``: every step copies the whole attended cache g times per layer, which
costs more than the attention itself. The g query heads of a group can instead be stacked as extra query rows
of one head, which is the same computation row for row::

    k = reshape(expand(unsqueeze(k_cache, 2), [B, Hkv, g, W, D]), [B, H, W, D])     (same for v)
    o = sdpa(q, k, v, mask)                                    # q: (B, H, q, D)
  ==>
    o = reshape(sdpa(reshape(q, [B, Hkv, g*q, D]), k_cache, v_cache, mask repeated g times on rows),
                [B, H, q, D])
"""

from __future__ import annotations

import torch

from specpass.passes.manager import PassResult, tag

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def _repeated_kv(node) -> tuple[torch.fx.Node, int] | None:
    """(source, g) if ``node`` is reshape(expand(unsqueeze(source, 2), [B, Hkv, g, W, D]), [B, Hkv*g, W, D])."""
    if not isinstance(node, torch.fx.Node) or node.target not in _RESHAPES:
        return None
    expand = node.args[0]
    if not isinstance(expand, torch.fx.Node) or expand.target != aten.expand.default:
        return None
    unsq = expand.args[0]
    if not isinstance(unsq, torch.fx.Node) or unsq.target != aten.unsqueeze.default or unsq.args[1] != 2:
        return None
    val = expand.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 5 or not isinstance(val.shape[2], int):
        return None
    return unsq.args[0], int(val.shape[2])


def fold_gqa_heads(gm: torch.fx.GraphModule, structure, cfg=None) -> PassResult:
    """Replace repeat_kv + SDPA by SDPA over query rows grouped per K/V head (GQA)."""
    # Zero matches is a valid outcome here (multi-head attention, or eager softmax attention): this pass only
    # removes work, and the pass history records n_matches = 0.
    attention = [n for layer in structure.layers for n in layer.attention if n.target == _SDPA]
    n = 0
    graph = gm.graph
    for sdpa in attention:
        query, key, value = sdpa.args[:3]
        mask = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")
        k, v = _repeated_kv(key), _repeated_kv(value)
        if k is None or v is None or k[1] != v[1] or k[1] == 1 or not isinstance(mask, torch.fx.Node):
            continue  # multi-head attention, or a layout this pass does not know: leave it as it is
        (k_src, g), (v_src, _) = k, v
        q_val, mask_val = query.meta["val"], mask.meta.get("val")
        if mask_val is None or mask_val.dim() != 4 or mask_val.shape[1] != 1:
            continue
        batch, heads, _, dim = q_val.shape
        if not all(isinstance(x, int) for x in (batch, heads, dim)):
            continue
        kv_heads = heads // g
        v_dim = v_src.meta["val"].shape[-1]  # multi-head latent attention: V's head dim is not Q's
        with graph.inserting_before(sdpa):
            q2 = graph.call_function(aten.reshape.default, (query, [batch, kv_heads, -1, dim]))
            m_unsq = graph.call_function(aten.unsqueeze.default, (mask, 2))
            m_exp = graph.call_function(aten.expand.default, (m_unsq, [-1, -1, g, -1, -1]))
            m2 = graph.call_function(aten.flatten.using_ints, (m_exp, 2, 3))
            kwargs = {k_: v_ for k_, v_ in sdpa.kwargs.items() if k_ != "attn_mask"}
            out2 = graph.call_function(_SDPA, (q2, k_src, v_src, m2, *sdpa.args[4:]), kwargs)
            out = graph.call_function(aten.reshape.default, (out2, [batch, heads, -1, v_dim]))
        # Shapes for meta["val"]: run the new ops on the fake values of their inputs.
        q2.meta["val"] = q_val.reshape(batch, kv_heads, -1, dim)
        m_unsq.meta["val"] = mask_val.unsqueeze(2)
        m_exp.meta["val"] = m_unsq.meta["val"].expand(-1, -1, g, -1, -1)
        m2.meta["val"] = m_exp.meta["val"].flatten(2, 3)
        out2.meta["val"] = q2.meta["val"].new_empty((*q2.meta["val"].shape[:3], v_dim))
        out.meta["val"] = sdpa.meta["val"]
        for new in (q2, m_unsq, m_exp, m2, out2, out):
            tag(new, "fold_gqa_heads", sdpa)
        sdpa.replace_all_uses_with(out)
        graph.erase_node(sdpa)
        for layer in structure.layers:
            layer.attention = [out2 if a is sdpa else a for a in layer.attention]
        n += 1
    return PassResult(gm, n > 0, n)
