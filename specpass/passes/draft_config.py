"""What a draft program is made of; the passes read it as their ``cfg``."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass
class DraftConfig:
    """The draft's share of a SpecPlan, with tensors and modules ready for the passes."""

    skip_layers: tuple[int, ...] = ()  # whole decoder layers to skip (Draft&Verify, SWIFT)
    skip_attention: tuple[int, ...] = ()  # attention sublayers to skip (SWIFT)
    skip_mlp: tuple[int, ...] = ()  # MLP sublayers to skip (SWIFT)
    exit_layer: int | None = None  # exit after this layer (LayerSkip, Kangaroo)
    adapter: nn.Module | None = None  # trained exit adapter applied to the exit hidden state (Kangaroo)
    vocab_ids: torch.Tensor | None = None  # draft head rows, sorted token ids (FR-Spec, VocabTrim)
    exits: tuple[int, ...] = ()  # DEL: the exit layers whose tokens the verify program also returns
