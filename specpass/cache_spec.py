"""``CacheSpec``: the runtime-owned cache (K/V per attention layer, conv and recurrent state per linear-attention
or state-space layer) and the masks, shared by capture and the runtime."""

from __future__ import annotations

import dataclasses

import torch

FULL = "full_attention"
SLIDING = "sliding_attention"
CHUNKED = "chunked_attention"

#: kinds of cache tensor: K and V are written at slots along dim 2; conv and recurrent state are whole tensors
#: that each call reads and overwrites (linear attention, state-space layers)
KEY, VALUE, CONV, RECURRENT = "k", "v", "conv", "recurrent"


@dataclasses.dataclass(frozen=True)
class CacheTensor:
    """One runtime-owned tensor of the cache, batch dimension excluded.

    K/V: ``shape`` is (heads, head_dim); the buffer is (B, heads, buffer_len, head_dim). Conv and recurrent
    state: ``shape`` is the state's own, the buffer (B, *shape).
    """

    layer: int
    kind: str  # KEY, VALUE, CONV or RECURRENT
    shape: tuple[int, ...]
    dtype: torch.dtype
    index: int = 0  # a layer may keep several conv / recurrent states

    @property
    def is_kv(self) -> bool:
        return self.kind in (KEY, VALUE)

    @property
    def name(self) -> str:
        """The program input's name: ``k_3``, ``v_3``, ``conv_0``, ``recurrent_0`` (``conv_0_1`` for a second)."""
        suffix = f"_{self.index}" if self.index else ""
        return f"{self.kind}_{self.layer}{suffix}"

    def buffer_shape(self, batch: int, buffer_len: int) -> tuple[int, ...]:
        if self.is_kv:
            return (batch, self.shape[0], buffer_len, self.shape[1])
        return (batch, *self.shape)


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Shapes of the runtime-owned cache and masks."""

    num_layers: int
    max_cache_len: int
    dtype: torch.dtype  # the model's (masks)
    mask_kinds: tuple[str, ...]  # order of the mask inputs
    sliding_window: int | None  # window of the ``sliding_attention`` mask, if any
    tensors: tuple[CacheTensor, ...]  # the cache inputs of every program, in order
    chunk_size: int | None = None  # chunk of the ``chunked_attention`` mask (Llama 4), if any

    @classmethod
    def uniform(
        cls,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_cache_len: int,
        dtype: torch.dtype,
        mask_kinds: tuple[str, ...],
        sliding_window: int | None,
    ) -> CacheSpec:
        """Every layer with K and V of one shape (most decoder-only transformers)."""
        tensors = tuple(
            CacheTensor(i, kind, (num_kv_heads, head_dim), dtype) for i in range(num_layers) for kind in (KEY, VALUE)
        )
        return cls(num_layers, max_cache_len, dtype, mask_kinds, sliding_window, tensors)

    @property
    def buffer_len(self) -> int:
        # One spare slot past max_cache_len that no mask ever covers: with it the masks' width (<=
        # max_cache_len) is always a true slice of the buffer, which keeps the width symbolic in export
        # (a width that could equal the buffer length gets specialised).
        return self.max_cache_len + 1

    @property
    def has_state(self) -> bool:
        """Whether some layer keeps recurrent state (conv/SSM), which a rejected draft must not leave behind."""
        return any(not t.is_kv for t in self.tensors)

    def names(self) -> list[str]:
        return [t.name for t in self.tensors]
