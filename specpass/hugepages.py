"""Large constant tensors in transparent huge pages.

A decode step reads every low-bit block once, from L3 or memory; in 4 KiB pages its streams walk the page tables
every 4 KiB (a TLB holds a few MB of such pages), which the kernel's prefetches do not hide. Gemma 3's 262,144 x 640
head (189 MB of Q8_0 blocks) took 8.3 ms a call in 4 KiB pages and 5.0-5.8 ms in 2 MiB ones on a 2-core Xeon
(docs/benchmarks.md). Linux hands out huge pages only where asked (``madvise``, the usual setting), and torch's
allocator does not ask, so the block tensors that specpass creates are copied into memory that does.
"""

from __future__ import annotations

import functools
import logging
import mmap
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
#: smaller tensors share chunks of this size (a layer's matrices are a few hundred KB each); below MIN_BYTES a
#: tensor spans too few pages to gain anything
CHUNK = 16 << 20
MIN_BYTES = 4096
_ALIGN = 64
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_lock = threading.Lock()
_chunk: tuple[mmap.mmap, int] | None = None  # the shared chunk being filled (as _huge returns it), and how far
_used = 0


@functools.cache
def available() -> bool:
    """Whether this system can back anonymous memory with transparent huge pages when asked."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in _THP.read_text()
    except OSError:
        return False


def backed(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in memory advised for huge pages (a new contiguous tensor), or ``t`` itself: on another
    device, below MIN_BYTES, or where the system has none. A tensor of a huge page or more gets a mapping of its
    own; smaller ones are placed, 64-byte aligned and in the order they come, in shared chunks, which live as long
    as any tensor in them. Each tensor has a storage of its own (AOTInductor's packaging expects a shared storage
    to have a tensor that covers it)."""
    if t.device.type != "cpu" or t.nbytes < MIN_BYTES or not available():
        return t
    global _chunk, _used
    with _lock:
        if t.nbytes >= HUGE_PAGE:
            place = _huge(t.nbytes)
        else:
            if _chunk is None or _used + t.nbytes > CHUNK:  # the advised CHUNK bytes, not the mapping's slack
                _chunk, _used = _huge(CHUNK), 0
            place = None if _chunk is None else (_chunk[0], _chunk[1] + _used)
            if place is not None:
                _used = -(-(_used + t.nbytes) // _ALIGN) * _ALIGN
    if place is None:
        return t
    memory, offset = place
    # frombuffer keeps the mapping alive as long as the tensor
    out = torch.frombuffer(memory, dtype=torch.uint8, count=t.nbytes, offset=offset).view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def _huge(nbytes: int) -> tuple[mmap.mmap, int] | None:
    """New memory of at least ``nbytes`` past its returned offset, advised for huge pages from there on (the
    offset is the first 2 MiB-aligned address), or None where the advice is refused."""
    # private: a shared anonymous mapping is shmem, which follows another switch (shmem_enabled, usually never)
    memory = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = torch.frombuffer(memory, dtype=torch.uint8, count=1).data_ptr()
    offset = -address % HUGE_PAGE
    try:
        memory.madvise(mmap.MADV_HUGEPAGE, offset, nbytes - nbytes % mmap.PAGESIZE)
    except OSError as e:  # a kernel without THP for this mapping: 4 KiB pages, as torch's own
        log.debug("huge pages not granted (%s)", e)
        return None
    return memory, offset
