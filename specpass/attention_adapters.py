"""Per-architecture adapters for models whose attention does not follow the mask it is given (BLOOM, GPT-Neo).

Each forward adapter is a context manager ``adapter(model, {kind: mask}) -> attention_mask to pass``, active
only while the capture wrapper runs (i.e. while capture traces it): the model's own forward, which capture's
self-check compares the graph against, is left untouched, so a wrong adapter is refused there, not shipped.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from specpass.cache_spec import FULL, SLIDING


@contextlib.contextmanager
def _bloom_alibi_from_mask(model: nn.Module, masks: dict[str, torch.Tensor]):
    """BLOOM: build the ALiBi bias from the runtime's 4D mask instead of a 2D padding mask.

    BLOOM adds ``slope * key_position`` to its attention scores, with the key positions counted from a 2D
    padding mask (``build_alibi_tensor``: ``cumsum(mask) - 1``, the key's index among the tokens attended to);
    given the 4D (B, 1, q, W) mask it fails to unpack it. The same count, taken per query over its own row of
    the 4D mask, gives each visible key its sequence position: a query sees the committed prefix (slot i holds
    position i) and, in a draft tree, its ancestors in creation order (positions one apart), so its visible keys
    in slot order are positions 0, 1, ..., p (or, under a window, a run of consecutive ones: a constant offset
    per row, which softmax ignores). Unlike slope * slot, this is also right for tree nodes written at scratch
    slots by an earlier call. Masked keys get 0, as in HF; the mask removes them anyway.
    """
    from transformers.models.bloom.modeling_bloom import BloomModel, _get_alibi_slopes

    def build_alibi_tensor(mask, num_heads, dtype):  # mask: the 4D mask yielded below, as BLOOM passes it on
        visible = mask > torch.finfo(mask.dtype).min / 2  # (B, 1, q, W): 0 = attend, finfo.min = masked
        positions = (visible.cumsum(-1) - 1) * visible
        alibi = _get_alibi_slopes(num_heads, mask.device)[None, :, None, None] * positions  # (B, H, q, W), fp32
        return alibi.reshape(mask.shape[0] * num_heads, mask.shape[2], mask.shape[3]).to(dtype)

    patched = [m for m in model.modules() if isinstance(m, BloomModel)]
    for m in patched:
        m.build_alibi_tensor = build_alibi_tensor  # an instance attribute shadows the method
    try:
        yield masks[FULL]
    finally:
        for m in patched:
            del m.build_alibi_tensor


@contextlib.contextmanager
def _gpt_neo_attention_from_masks(model: nn.Module, masks: dict[str, torch.Tensor]):
    """GPT-Neo: attend with the runtime's masks instead of the model's own causal/banded buffer.

    GPT-Neo's eager attention first applies a (max_positions, max_positions) boolean buffer, causal for its
    "global" layers and causal within ``window_size`` for its "local" ones, sliced bottom-right as if the q
    queries were the last q of the keys (``bias[..., W - q : W, :W]``), then adds the mask it is given. Over a
    runtime cache of W slots the queries sit at slots start..start+q-1, not W-q..W-1: the global layers still
    come out right (their buffer rows allow a superset of the mask), but a local layer's window is placed at
    the end of the cache and hides the keys the query should see. Here the buffer is left out and every layer
    adds its runtime mask alone: the full one for global layers (what the model passes), the sliding one
    (window ``window_size``, see _gpt_neo_layer_kinds) for local layers. The rest is GPT-Neo's ``_attn``
    (fp32 scores, no 1/sqrt(d) scaling), so the logits are the model's own.
    """
    from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

    def attn(module, layer_mask, query, key, value, attention_mask=None):
        query, key = query.to(torch.float32), key.to(torch.float32)
        attn_weights = torch.matmul(query, key.transpose(-1, -2)) + layer_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1).to(value.dtype)
        attn_weights = module.attn_dropout(attn_weights)
        return torch.matmul(attn_weights, value), attn_weights

    patched = [m for m in model.modules() if isinstance(m, GPTNeoSelfAttention)]
    for m in patched:
        layer_mask = masks[SLIDING] if m.attention_type == "local" else masks[FULL]
        m._attn = lambda q, k, v, attention_mask=None, m=m, layer_mask=layer_mask: attn(m, layer_mask, q, k, v)
    try:
        yield masks[FULL]
    finally:
        for m in patched:
            del m._attn


def _gpt_neo_layer_kinds(config) -> tuple[list[str], int | None]:
    """GPT-Neo names its layer kinds in ``attention_layers`` ("global"/"local") and the window ``window_size``."""
    names = {"global": FULL, "local": SLIDING}
    return [names.get(kind, kind) for kind in config.attention_layers], config.window_size


#: model_type -> forward adapter (see above)
FORWARD_ADAPTERS = {"bloom": _bloom_alibi_from_mask, "gpt_neo": _gpt_neo_attention_from_masks}
#: model_type -> config -> (per-layer kinds, sliding window), for configs that do not declare ``layer_types``
LAYER_KIND_ADAPTERS = {"gpt_neo": _gpt_neo_layer_kinds}


def layer_kinds(config) -> tuple[list[str] | None, int | None]:
    """(per-layer attention kinds, or None where all layers are alike; the config's sliding window)."""
    adapter = LAYER_KIND_ADAPTERS.get(getattr(config, "model_type", None))
    if adapter is not None:
        return adapter(config)
    return getattr(config, "layer_types", None), getattr(config, "sliding_window", None)
