"""Token selection: greedy, or sampling with HF's warpers (temperature, then top-k, then top-p)."""

from __future__ import annotations

import dataclasses

import torch

from specpass.errors import SpecPassError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.do_sample:
            if not self.temperature > 0:
                raise SpecPassError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if self.top_k is not None and self.top_k < 0:
                raise SpecPassError(f"top_k must be >= 0, got {self.top_k}")
            if self.top_p is not None and not 0 < self.top_p <= 1:
                raise SpecPassError(f"top_p must be in (0, 1], got {self.top_p}")


def warp(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Apply HF's TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper, in that order."""
    logits = logits.float()
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k:
        k = min(cfg.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - cfg.top_p)
        remove[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), -float("inf"))
    return logits


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    return warp(logits, cfg).softmax(dim=-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dimension: the first index of the largest value, a NaN counting as the largest.

    torch.max(dim) follows argmax's rule (its documentation for ties, a test for NaN), and its reduction is the
    vectorized one: over the default model's 49,152 logits right after a decode step, 85 vs 120 us on a 2-core Xeon.
    """
    return logits.max(dim=-1).indices


def select(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if not cfg.do_sample:
        return greedy(logits)
    probs = probabilities(logits, cfg)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
