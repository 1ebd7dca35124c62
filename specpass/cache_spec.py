"""``CacheSpec``: the shapes of the runtime-owned KV cache and masks, shared by capture and the runtime."""

from __future__ import annotations

import dataclasses

import torch

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Shapes of the runtime-owned KV cache and masks."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_cache_len: int
    dtype: torch.dtype
    mask_kinds: tuple[str, ...]  # order of the mask inputs
    sliding_window: int | None  # window of the ``sliding_attention`` mask, if any

    @property
    def buffer_len(self) -> int:
        # One spare slot past max_cache_len that no mask ever covers: with it the masks' width (<=
        # max_cache_len) is always a true slice of the buffer, which keeps the width symbolic in export
        # (a width that could equal the buffer length gets specialised).
        return self.max_cache_len + 1
