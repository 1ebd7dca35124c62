"""KVCache: any sequence of appends, rollbacks and compactions leaves the cache of the committed tokens.

The oracle is recomputation: after the operations, one decode step through the captured program must give
the logits HF eager gives for the committed token sequence from scratch.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from specpass.cache_spec import FULL, SLIDING, CacheSpec
from specpass.errors import SpecPassError
from specpass.runtime.kv_cache import KVCache

MAX_STEP = 5  # tokens per write
MAX_OPS = 6
ATOL = 1e-5


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (1, 1, q, W) additive mask from a boolean (q, W) one."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def run(cg, cache: KVCache, ids: list[int], positions: list[int], slots: list[int], masks: list[torch.Tensor]):
    with torch.no_grad():
        return cg.gm(torch.tensor([ids]), torch.tensor([positions]), torch.tensor(slots), *masks, *cache.tensors)


def chain_step(cg, cache: KVCache, ids: list[int], width: int, commit: bool = True) -> torch.Tensor:
    """q chain tokens at slots length.., attending to the first ``width`` slots (like runtime.generate._step)."""
    slots = cache.reserve(len(ids))
    masks = [m[..., :width] for m in cache.chain_masks(len(ids))]
    logits = run(cg, cache, ids, slots.tolist(), slots.tolist(), masks)
    if commit:
        cache.commit(len(ids))
    return logits


def draw_width(data, used: int, capacity: int) -> int:
    """Any mask width that covers every slot the step reads or writes (the program takes 2 <= W <= capacity)."""
    return data.draw(st.integers(max(2, used), capacity), label="width")


def draw_tokens(data, vocab: int, n: int) -> list[int]:
    return data.draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n), label="tokens")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=st.data())
def test_cache_operations_match_recomputation(tiny, arch, data):
    t = tiny(arch)
    cg, vocab = t.cg, t.vocab
    assert cg.spec.mask_kinds == (FULL,), "the tree masks below are full-attention masks"
    cache = KVCache(cg.spec)
    cap = cache.capacity
    seq: list[int] = []  # the committed tokens, as the cache should hold them

    for _ in range(data.draw(st.integers(0, MAX_OPS), label="n_ops")):
        length = cache.length
        room = cap - length - 1  # keep one slot for the final decode step
        ops = (["append", "chain_then_compact", "tree_then_compact"] if room > 0 else []) + (
            ["rollback"] if length else []
        )
        if not ops:
            break
        op = data.draw(st.sampled_from(ops), label="op")
        event(op)  # shown by --hypothesis-show-statistics

        if op == "append":
            ids = draw_tokens(data, vocab, data.draw(st.integers(1, min(MAX_STEP, room)), label="n"))
            chain_step(cg, cache, ids, draw_width(data, length + len(ids), cap))
            seq += ids

        elif op == "rollback":
            n = data.draw(st.integers(0, length), label="rollback")
            cache.rollback(n)
            seq = seq[: length - n]

        elif op == "chain_then_compact":
            # Draft a chain into the scratch slots after the prefix, accept a prefix of it in place.
            ids = draw_tokens(data, vocab, data.draw(st.integers(1, min(MAX_STEP, room)), label="n"))
            chain_step(cg, cache, ids, draw_width(data, length + len(ids), cap), commit=False)
            keep = data.draw(st.integers(0, len(ids)), label="accept")
            cache.compact(range(length, length + keep))
            seq += ids[:keep]

        else:  # tree_then_compact
            # A token tree written in one step at arbitrary scratch slots (anywhere past the prefix, in any
            # order), rotary/learned positions by depth, each node attending to the prefix and its ancestors.
            # Then one root-to-node path is accepted and compacted into place.
            n = data.draw(st.integers(1, min(MAX_STEP, room)), label="tree_size")
            parents = [data.draw(st.integers(-1, i - 1), label="parent") for i in range(n)]
            ids = draw_tokens(data, vocab, n)
            slots = data.draw(
                st.lists(st.integers(length, cap - 1), min_size=n, max_size=n, unique=True), label="slots"
            )
            paths = []
            for i in range(n):
                path = [i] if parents[i] < 0 else [*paths[parents[i]], i]
                paths.append(path)
            width = draw_width(data, max(slots) + 1, cap)
            allowed = torch.zeros(n, width, dtype=torch.bool)
            allowed[:, :length] = True
            for i, path in enumerate(paths):
                allowed[i, [slots[a] for a in path]] = True
            positions = [length + len(path) - 1 for path in paths]
            run(cg, cache, ids, positions, slots, [additive(allowed, cg.spec.dtype)])
            leaf = data.draw(st.integers(-1, n - 1), label="accepted_leaf")  # -1: reject the whole tree
            path = paths[leaf] if leaf >= 0 else []
            accepted = [slots[a] for a in path]
            in_place = accepted == list(range(length, length + len(path)))
            event(f"tree path of {len(path)} " + ("in place" if in_place else "moved"))
            cache.compact(accepted)
            seq += [ids[a] for a in path]

        assert cache.length == len(seq)

    token = data.draw(st.integers(0, vocab - 1), label="next_token")
    logits = chain_step(cg, cache, [token], draw_width(data, cache.length + 1, cap))
    with torch.no_grad():
        expected = t.model(torch.tensor([seq + [token]])).logits
    torch.testing.assert_close(logits[0, -1], expected[0, -1], atol=ATOL, rtol=ATOL)


# --------------------------------------------------------------------------------------------------------
# Bookkeeping and error paths (no model)
# --------------------------------------------------------------------------------------------------------
def small_cache(capacity: int = 8, kinds=(FULL,), window=None) -> KVCache:
    spec = CacheSpec.uniform(1, 1, 2, capacity, torch.float32, kinds, window)
    cache = KVCache(spec)
    for i, t in enumerate(cache.tensors):  # slot s of tensor i holds 100 * i + s
        t.copy_((100 * i + torch.arange(t.shape[2], dtype=t.dtype))[None, None, :, None].expand_as(t))
    return cache


def slot_values(cache: KVCache, i: int = 0) -> list[int]:
    return cache.tensors[i][0, 0, :, 0].long().tolist()


def test_reserve_commit_rollback_reset():
    cache = small_cache()
    assert cache.reserve(3).tolist() == [0, 1, 2] and cache.length == 0
    cache.commit(3)
    assert cache.reserve(2).tolist() == [3, 4]
    cache.rollback(2)
    assert cache.length == 1 and cache.reserve(1).tolist() == [1]
    cache.rollback(0)
    assert cache.length == 1
    cache.reset()
    assert cache.length == 0


def test_reserve_beyond_capacity_raises():
    cache = small_cache(8)
    cache.commit(6)
    assert cache.reserve(2).tolist() == [6, 7]
    with pytest.raises(SpecPassError, match=r"KV cache full: 6 tokens \+ 3 new > max_cache_len=8"):
        cache.reserve(3)
    with pytest.raises(ValueError):
        cache.reserve(-1)


def test_commit_beyond_capacity_raises():
    cache = small_cache(8)
    with pytest.raises(ValueError):
        cache.commit(9)
    with pytest.raises(ValueError):
        cache.commit(-1)
    assert cache.length == 0


def test_rollback_too_far_raises():
    cache = small_cache()
    cache.commit(3)
    with pytest.raises(ValueError, match="cannot roll back 4 of 3"):
        cache.rollback(4)
    with pytest.raises(ValueError):
        cache.rollback(-1)
    assert cache.length == 3


def test_compact_rejects_bad_slots():
    cache = small_cache(8)
    cache.commit(3)
    before = [t.clone() for t in cache.tensors]
    with pytest.raises(ValueError, match=r"must lie in \[3, 8\)"):
        cache.compact([2, 4])  # below the committed length: would overwrite committed K/V
    with pytest.raises(ValueError, match=r"must lie in \[3, 8\)"):
        cache.compact([8])  # past the capacity
    with pytest.raises(ValueError, match="repeat"):
        cache.compact([5, 5])
    assert cache.length == 3
    assert all(torch.equal(a, b) for a, b in zip(before, cache.tensors, strict=True))


def test_compact_moves_kv_into_place():
    cache = small_cache(8)
    cache.commit(2)
    cache.compact([5, 3])  # overlaps the destination run [2, 3]
    assert cache.length == 4
    assert slot_values(cache, 0)[:6] == [0, 1, 5, 3, 4, 5]
    assert slot_values(cache, 1)[:6] == [100, 101, 105, 103, 104, 105]
    cache.compact([4, 5])  # already in place
    assert cache.length == 6 and slot_values(cache, 0)[:6] == [0, 1, 5, 3, 4, 5]
    cache.compact([])
    assert cache.length == 6


def test_compact_reversed_overlap():
    cache = small_cache(8)
    cache.compact([1, 0])
    assert cache.length == 2 and slot_values(cache)[:3] == [1, 0, 2]


def test_chain_masks():
    neg = torch.finfo(torch.float32).min
    cache = small_cache(8, kinds=(FULL, SLIDING), window=2)
    cache.commit(3)
    full, sliding = cache.chain_masks(2)
    assert full.shape == sliding.shape == (1, 1, 2, 8)
    # Query slots 3 and 4 see everything up to themselves...
    assert (full[0, 0] == 0).tolist() == [[s <= 3 for s in range(8)], [s <= 4 for s in range(8)]]
    # ...and, in a window of 2, HF's `kv_idx > q_idx - sliding_window`.
    assert (sliding[0, 0] == 0).tolist() == [[s in (2, 3) for s in range(8)], [s in (3, 4) for s in range(8)]]
    assert set(full.unique().tolist()) == {0.0, neg}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_masks_are_the_chain_masks_of_its_slot(dtype):
    # One query's masks are slices of precomputed rows (the plain decode loop's fast path): each must equal the
    # definition and the first row of a two-query chain at the same slot, for every slot, width and offset.
    capacity, window = 12, 3
    spec = CacheSpec.uniform(1, 1, 2, capacity, dtype, (FULL, SLIDING), window)
    cache = KVCache(spec)
    keys = torch.arange(capacity)
    for length in range(capacity):
        cache.length = length
        for offset in range(capacity - length):
            start = length + offset
            for width in range(start + 1, capacity + 1):
                full, sliding = cache.chain_masks(1, width, offset)
                assert full.shape == sliding.shape == (1, 1, 1, width)
                assert full.is_contiguous() and sliding.is_contiguous() and full.dtype == dtype
                k = keys[None, :width]
                assert torch.equal(full, additive(k <= start, dtype))
                assert torch.equal(sliding, additive((k <= start) & (k > start - window), dtype))
                if start + 2 <= width:
                    two = cache.chain_masks(2, width, offset)
                    assert all(
                        torch.equal(one[..., :1, :], both[..., :1, :])
                        for one, both in zip((full, sliding), two, strict=True)
                    )
