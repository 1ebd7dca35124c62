"""The runtime-owned static KV cache.

Programs write K/V for their query tokens at the slots they are given (``cache_position``); this object only
decides which slots are *committed*. Slot i of the committed prefix always holds the token at sequence
position i, so a chain step writes at slots ``length .. length+q-1`` and its masks follow from slots alone.

- rollback(n): forget the last n committed tokens. Stale K/V stays in the buffers but is masked out and
  overwritten by the next write, so rollback costs nothing.
- compact(slots): a draft tree writes its nodes to scratch slots after the committed prefix; once a path is
  accepted, its nodes' K/V are copied into the contiguous run that continues the prefix.

Recurrent state (the conv and SSM/linear-attention state of hybrid and state-space layers) has no slots: every
call reads it and overwrites it with the state after its tokens. Rolling it back therefore needs a copy:
``checkpoint()`` before a speculative round, ``restore()`` to return to it (runtime/generate.py re-runs the
accepted tokens from there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specpass.cache_spec import CHUNKED, SLIDING, CacheSpec
from specpass.errors import SpecPassError


class KVCache:
    """Preallocated K/V for every attention layer, recurrent state for the others, and the committed length."""

    def __init__(self, spec: CacheSpec, *, batch: int = 1, device: torch.device | str | None = None):
        self.spec = spec
        self.tensors = [
            torch.zeros(t.buffer_shape(batch, spec.buffer_len), dtype=t.dtype, device=device) for t in spec.tensors
        ]
        self._kv = [x for x, t in zip(self.tensors, spec.tensors, strict=True) if t.is_kv]
        self._state = [x for x, t in zip(self.tensors, spec.tensors, strict=True) if not t.is_kv]
        self._saved: list[torch.Tensor] | None = None
        self.length = 0
        self.device = self.tensors[0].device
        self._slots = torch.arange(spec.max_cache_len, device=self.device)
        self._neg = torch.finfo(spec.dtype).min
        self._query_rows: dict[str, torch.Tensor] = {}

    @property
    def capacity(self) -> int:
        return self.spec.max_cache_len

    @property
    def has_state(self) -> bool:
        return bool(self._state)

    def reset(self) -> None:
        self.length = 0
        for t in self._state:  # a sequence starts from zero state (stale K/V is masked instead)
            t.zero_()

    def checkpoint(self) -> None:
        """Remember the recurrent state (after the committed prefix) for ``restore``."""
        if self._saved is None:
            self._saved = [t.clone() for t in self._state]
        else:
            for saved, t in zip(self._saved, self._state, strict=True):
                saved.copy_(t)

    def restore(self) -> None:
        """Put back the recurrent state of the last ``checkpoint``."""
        if self._saved is None:
            raise ValueError("restore() without a checkpoint()")
        for saved, t in zip(self._saved, self._state, strict=True):
            t.copy_(saved)

    # ---- bookkeeping ----------------------------------------------------------------------------------
    def reserve(self, n: int, offset: int = 0) -> torch.Tensor:
        """Slots for n chain tokens that follow ``offset`` uncommitted ones (a draft chain's next token)."""
        if n < 0 or offset < 0:
            raise ValueError(f"cannot reserve {n} slots at offset {offset}")
        start = self.length + offset
        if start + n > self.capacity:
            raise SpecPassError(
                f"KV cache full: {start} tokens + {n} new > max_cache_len={self.capacity}; "
                "pass a larger max_cache_len to specpass.optimize()"
            )
        return self._slots[start : start + n]

    def commit(self, n: int) -> None:
        if n < 0 or self.length + n > self.capacity:
            raise ValueError(f"cannot commit {n} tokens at length {self.length} (capacity {self.capacity})")
        self.length += n

    def rollback(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} of {self.length} committed tokens")
        if n and self._state:
            raise ValueError("recurrent state cannot be rolled back by length: restore() a checkpoint")
        self.length -= n

    def compact(self, slots: Sequence[int]) -> None:
        """Move the K/V at ``slots`` (scratch, all >= length) to ``length, length+1, ...`` and commit them."""
        src = [int(s) for s in slots]
        if not src:
            return
        if min(src) < self.length or max(src) >= self.capacity:
            raise ValueError(f"compact slots {src} must lie in [{self.length}, {self.capacity})")
        if len(set(src)) != len(src):
            # An accepted path visits each tree node once; a repeat would also overrun the buffer at capacity.
            raise ValueError(f"compact slots {src} repeat a slot")
        dst = list(range(self.length, self.length + len(src)))
        if src != dst:
            index = torch.tensor(src, device=self.device)
            # index_select copies first, so overlapping source and destination runs are safe.
            for t in self._kv:
                t[:, :, dst[0] : dst[-1] + 1] = t.index_select(2, index)
        self.length += len(src)

    # ---- masks --------------------------------------------------------------------------------------
    def chain_masks(self, q: int, width: int | None = None, offset: int = 0) -> list[torch.Tensor]:
        """Additive masks (1, 1, q, width) for q chain tokens at slots start..start+q-1, one per kind, where
        start = length + offset (a draft chain continues uncommitted slots).

        Programs attend to the first ``width`` slots (default: all), so it must cover start + q. The masks are
        read-only: one query's are views of rows this cache keeps.
        """
        width = self.capacity if width is None else width
        start = self.length + offset
        if not start + q <= width <= self.capacity:
            raise ValueError(f"mask width {width} must cover {start + q} slots and fit {self.capacity}")
        if q == 1 and CHUNKED not in self.spec.mask_kinds:
            # one query: slices of precomputed rows, no kernel a step (the plain decode loop's masks cost about
            # 80 us a step on a 2-core Xeon after a program has evicted the caches: docs/benchmarks.md)
            return [
                self._query_row(kind)[self.capacity - 1 - start :][:width].view(1, 1, 1, width)
                for kind in self.spec.mask_kinds
            ]
        keys = self._slots[None, :width]
        positions = start + torch.arange(q, device=self.device)[:, None]  # slot == position of each query
        return self._masks(keys <= positions, positions, keys)

    def _query_row(self, kind: str) -> torch.Tensor:
        """The additive masks of one query at every slot s, in one (2 * capacity,) row: entry capacity - 1 + k - s
        is key k's. A full mask allows k <= s, a sliding one s - window < k <= s: both depend on k - s only."""
        row = self._query_rows.get(kind)
        if row is None:
            offsets = torch.arange(2 * self.capacity, device=self.device) - (self.capacity - 1)  # k - s
            allowed = offsets <= 0
            if kind == SLIDING:
                allowed &= offsets > -self.spec.sliding_window
            row = torch.zeros(offsets.shape, dtype=self.spec.dtype, device=self.device).masked_fill_(
                ~allowed, self._neg
            )
            self._query_rows[kind] = row
        return row

    def tree_masks(
        self, ancestors: torch.Tensor, depth: torch.Tensor, width: int | None = None, first: int = 0
    ) -> list[torch.Tensor]:
        """Additive masks (1, 1, T - first, width) for the nodes first..T-1 of a T-node tree at slots
        length..length+T-1 (see runtime/tree.py): node i sees the committed prefix and the nodes j with
        ``ancestors[i, j]``. ``first`` > 0 runs only the newest nodes, whose ancestors already hold K/V.

        ``depth``: (T,) each node's depth; the position of node i is length + depth[i], which is what a
        sliding window is measured in.
        """
        width = self.capacity if width is None else width
        n = ancestors.shape[0]
        if not self.length + n <= width <= self.capacity:
            raise ValueError(f"mask width {width} must cover {self.length + n} slots and fit {self.capacity}")
        keys = self._slots[None, :width]
        allowed = (keys < self.length).expand(n, width).clone()
        allowed[:, self.length : self.length + n] = ancestors.to(self.device)
        key_positions = keys.clone()
        key_positions[0, self.length : self.length + n] = self.length + depth.to(self.device)
        return self._masks(allowed[first:], self.length + depth.to(self.device)[first:, None], key_positions)

    def _masks(self, allowed: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor) -> list[torch.Tensor]:
        """One additive mask per attention kind from the (q, width) visibility; a sliding window also hides
        keys ``sliding_window`` or more positions behind the query, and a chunked one (Llama 4) keys outside the
        query's chunk of ``chunk_size`` positions."""
        masks = []
        for kind in self.spec.mask_kinds:
            kind_allowed = allowed
            if kind == SLIDING:
                kind_allowed = allowed & (key_positions > positions - self.spec.sliding_window)
            elif kind == CHUNKED:
                chunk = self.spec.chunk_size
                kind_allowed = allowed & (key_positions // chunk == positions // chunk)
            mask = torch.zeros(kind_allowed.shape, dtype=self.spec.dtype, device=self.device)
            mask.masked_fill_(~kind_allowed, self._neg)
            masks.append(mask[None, None])
        return masks
