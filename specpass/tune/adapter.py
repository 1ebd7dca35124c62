"""The early-exit adapter: a small residual correction trained to make layer k's hidden state read like the
last layer's through the model's own final norm and head (Kangaroo's adapter, Liu et al., 2024, made cheaper:
a norm plus a low-rank MLP instead of an attention block, so the draft needs no KV of its own).
"""

from __future__ import annotations

import torch
from torch import nn


class ExitAdapter(nn.Module):
    """``h + up(silu(down(rmsnorm(h))))``; ``up`` starts at zero, so an untrained adapter is the identity."""

    def __init__(self, hidden: int, rank: int, eps: float = 1e-6):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(hidden))
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        nn.init.zeros_(self.up.weight)
        self.eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
        return h + self.up(nn.functional.silu(self.down(x)))

    @property
    def rank(self) -> int:
        return self.down.out_features
