"""Calibration's timing: program costs for the cost model, and candidates timed generating against plain decoding.

Only generating decides: a draft's promise on the calibration text (tune/candidates.py) ranks what is worth
timing, the measured tokens/s choose. ``Ledger`` keeps every measurement of a search on disk as it is made, with
its time budget, so that an interrupted or budget-bound search resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from specpass.cache import cache_root, write_atomic

log = logging.getLogger("specpass.tune")

#: bump when what a ledger holds, or what its measurements mean, changes
LEDGER_VERSION = 1


def seconds(fn, repeat: int = 7, device: torch.device | None = None) -> float:
    """Median seconds of ``fn()``; on a GPU until its kernels have run, not until they are queued."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else lambda: None
    fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_costs(sm, context: int, max_q: int) -> dict:
    """Seconds per verify call at q = 1..max_q tokens, and the head at full size (one token)."""
    from specpass.runtime.generate import _run

    cache = sm.cache
    device = cache.device
    costs = {"verify": {}}
    decode = sm.runnable_programs()["decode"]
    context = min(context, sm.max_cache_len - max_q - 1)
    with torch.no_grad():
        cache.reset()
        cache.commit(context)  # stale slots are fine for timing
        for q in range(1, max_q + 1):
            ids = torch.zeros((1, q), dtype=torch.long, device=device)
            # as generate() calls it: from CUDA graphs where the model replays them
            costs["verify"][q] = seconds(lambda ids=ids: _run(decode, cache, ids), device=device)
        cache.reset()
    head = sm.model.get_output_embeddings().weight
    x = torch.randn(1, head.shape[1], device=head.device, dtype=head.dtype)
    costs["head"] = {head.shape[0]: seconds(lambda: nn.functional.linear(x, head), 20, device=device)}
    return costs


def tokens_per_s(sm, plan, prompts: list[torch.Tensor], new_tokens: int) -> float:
    """Greedy tokens/s of ``sm`` under ``plan`` (None: plain decoding) over ``prompts``, after a short warm-up.

    A prompt longer than the cache leaves room for keeps its end (as tune/text.py's calibration text does)."""
    new_tokens = min(new_tokens, sm.max_cache_len // 2)
    prompts = [ids[:, -(sm.max_cache_len - new_tokens) :] for ids in prompts]
    previous, table = sm.plan, dict(sm.recycled.next)
    sm.plan = plan
    try:
        sm.generate(prompts[0], max_new_tokens=min(8, new_tokens), do_sample=False, eos_token_id=[])  # warm-up
        tokens = elapsed = 0.0
        for ids in prompts:
            sm.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
            tokens += sm.last_stats.new_tokens
            elapsed += sm.last_stats.total_s
    finally:
        # Every candidate starts from the same recycled-token table: one that had generated the timed prompts
        # before would hand the next candidate their continuations verbatim.
        sm.plan, sm.recycled.next = previous, table
    return tokens / elapsed


class Ledger:
    """A search's measurements by name, written through to ``path`` (None: kept in memory only), and its
    budget: ``left()`` seconds until ``budget_s`` of this run's time is spent (None: no limit)."""

    def __init__(self, path: Path | None, budget_s: float | None = None):
        self.path = path
        self.budget_s = budget_s
        self.start = time.perf_counter()
        self.entries: dict = {}
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            if isinstance(data, dict) and data.get("version") == LEDGER_VERSION:
                self.entries = data.get("entries", {})
        self.resumed = sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str, default=None):
        return self.entries.get(name, default)

    def put(self, name: str, value) -> None:
        self.entries[name] = value
        if self.path is not None:
            write_atomic(self.path, json.dumps({"version": LEDGER_VERSION, "entries": self.entries}).encode())

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - self.elapsed()

    def discard(self) -> None:
        """Forget the measurements (a finished search starts anew next time)."""
        self.entries, self.resumed = {}, []
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def ledger_path(model_key: str) -> Path:
    """Where the full search of the model with this plan key keeps its measurements while it runs."""
    return cache_root() / "tune" / f"{model_key}.json"
