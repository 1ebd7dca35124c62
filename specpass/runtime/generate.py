"""The decode loop: prefill, then one token per step, with HF-style stopping and streaming.

Reads in one sitting on purpose (gpt-fast): the programs are plain callables with the specpass signature
``logits = program(input_ids, position_ids, cache_position, *masks, *kv)``; the cache decides slots and masks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch

from specpass.errors import SpecPassError
from specpass.runtime.kv_cache import KVCache
from specpass.runtime.sampling import SamplingConfig, select

Program = Callable[..., torch.Tensor]


@dataclasses.dataclass
class GenerationStats:
    """What one generate() call did; ``tokens_per_s`` counts new tokens over the whole call."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0


class StopChecker:
    """max_new_tokens, eos ids and stop strings, with HF's semantics (the stopping token is kept)."""

    def __init__(self, max_new_tokens: int, eos: Sequence[int], stop_strings: Sequence[str], tokenizer):
        if stop_strings and tokenizer is None:
            raise SpecPassError("stop_strings needs a tokenizer: pass tokenizer= to generate()")
        self.max_new_tokens = max_new_tokens
        self.eos = set(int(e) for e in eos)
        self.stop_strings = list(stop_strings)
        self.tokenizer = tokenizer

    def done(self, new_ids: list[int]) -> bool:
        if len(new_ids) >= self.max_new_tokens or (new_ids and new_ids[-1] in self.eos):
            return True
        if self.stop_strings and new_ids:
            # A stop string counts once it ends inside the last token's text (HF's StopStringCriteria).
            text = self.tokenizer.decode(new_ids)
            before = len(self.tokenizer.decode(new_ids[:-1]))
            for s in self.stop_strings:
                at = text.rfind(s)
                if at >= 0 and at + len(s) > before:
                    return True
        return False


#: attention width granularity: programs attend to the first W cache slots, W a multiple of this
WINDOW_BUCKET = 64


def attention_width(used: int, capacity: int) -> int:
    """The mask width: programs attend to the first W slots (see capture.py), so W covers every used slot."""
    return min(capacity, -(-used // WINDOW_BUCKET) * WINDOW_BUCKET)


def _step(program: Program, cache: KVCache, ids: torch.Tensor) -> torch.Tensor:
    """Run q = ids.shape[1] chain tokens at the next slots; commit them; return their logits."""
    q = ids.shape[1]
    slots = cache.reserve(q)
    pos = slots[None, :]
    width = attention_width(cache.length + q, cache.capacity)
    # Contiguous masks of exactly this width: a sliced view's strides would fail the compiled graph's guards.
    masks = cache.chain_masks(q, width)
    logits = program(ids, pos, slots, *masks, *cache.tensors)
    cache.commit(q)
    return logits


def generate(
    programs: dict[str, Program],
    cache: KVCache,
    input_ids: torch.Tensor,
    *,
    sampling: SamplingConfig,
    stop: StopChecker,
    streamer=None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, GenerationStats]:
    """Autoregressive generation with the ``prefill`` and ``decode`` programs; returns prompt + new ids."""
    stats = GenerationStats(prompt_tokens=input_ids.shape[1])
    cache.reset()
    if streamer is not None:
        streamer.put(input_ids.cpu())
    new: list[int] = []
    with torch.no_grad():  # not inference_mode: its tensors would not match the compiled guards
        t0 = time.perf_counter()
        logits = _step(programs["prefill"], cache, input_ids)
        token = select(logits[:, -1], sampling, generator)
        stats.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        while True:
            new.append(int(token))
            if streamer is not None:
                streamer.put(token.cpu())
            if stop.done(new):
                break
            logits = _step(programs["decode"], cache, token[:, None])
            token = select(logits[:, -1], sampling, generator)
            stats.steps += 1
        stats.decode_s = time.perf_counter() - t0
    if streamer is not None:
        streamer.end()
    stats.new_tokens = len(new)
    out = torch.tensor([new], dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([input_ids, out], dim=1), stats
