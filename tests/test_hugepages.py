"""hugepages.backed: the same values in memory advised for transparent huge pages, only where that can help."""

from __future__ import annotations

import gc

import pytest
import torch

from specpass import hugepages


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float32, torch.int64])
def test_large_tensors_are_copied_with_their_values(dtype):
    n = 3 * hugepages.HUGE_PAGE // 2 // torch.empty(0, dtype=dtype).element_size()  # 3 MiB
    t = torch.arange(n).to(dtype).reshape(-1, 64)
    out = hugepages.backed(t)
    assert out.dtype == t.dtype and out.shape == t.shape and out.is_contiguous() and torch.equal(out, t)
    if hugepages.available():
        assert out.data_ptr() != t.data_ptr() and out.data_ptr() % hugepages.HUGE_PAGE == 0
    strided = t.t()  # any layout in, a contiguous copy out
    assert torch.equal(hugepages.backed(strided), strided)


def test_tiny_tensors_stay_and_small_ones_share_chunks():
    t = torch.zeros(hugepages.MIN_BYTES // 4 - 1)
    assert hugepages.backed(t) is t
    if not hugepages.available():
        pytest.skip("this system grants no transparent huge pages (/sys/kernel/mm/transparent_hugepage/enabled)")
    a, b = torch.arange(20_000, dtype=torch.float32), torch.arange(30_001, dtype=torch.int8)
    ha, hb = hugepages.backed(a), hugepages.backed(b)
    assert torch.equal(ha, a) and torch.equal(hb, b)
    assert ha.untyped_storage().data_ptr() != hb.untyped_storage().data_ptr()  # a storage each
    if hb.data_ptr() > ha.data_ptr():  # the next place in the same chunk (unless the first filled one)
        assert hb.data_ptr() == ha.data_ptr() + a.nbytes and hb.data_ptr() % 64 == 0


def test_the_memory_is_in_huge_pages_and_outlives_everything_but_the_tensor():
    if not hugepages.available():
        pytest.skip("this system grants no transparent huge pages (/sys/kernel/mm/transparent_hugepage/enabled)")
    t = hugepages.backed(torch.ones(4 * hugepages.HUGE_PAGE // 4))
    view = t[hugepages.HUGE_PAGE // 4 :]
    del t
    gc.collect()
    assert float(view.sum()) == 3 * hugepages.HUGE_PAGE // 4
    assert _anon_huge_kb(view.data_ptr()) >= 2048
