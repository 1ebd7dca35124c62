"""``PiecewiseProgram``: a program for any number of tokens made of programs for fixed numbers of tokens.

Models with recurrent state (linear attention, state-space layers) are captured once per query length
(capture.py), so a call of q tokens runs as pieces of power-of-two lengths, largest first (7 = 4 + 2 + 1):
each piece continues the K/V and the state the pieces before it wrote, exactly as one call would, and at most
log2(max_piece) + 1 programs ever exist. The programs are built when a length is first needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def piece_lengths(q: int, max_piece: int) -> list[int]:
    """q as a sum of powers of two of at most ``max_piece``, largest first."""
    out = []
    while q > 0:
        piece = min(max_piece, 1 << (q.bit_length() - 1))
        out.append(piece)
        q -= piece
    return out


class PiecewiseProgram:
    """Calls ``build(n)``'s program on consecutive pieces of the query tokens; logits (or each output of a
    program with several) are concatenated along the query dimension."""

    def __init__(self, build: Callable[[int], Callable], n_masks: int, max_piece: int):
        self.build = build
        self.n_masks = n_masks
        self.max_piece = max_piece
        self.programs: dict[int, Callable] = {}

    def program(self, q: int) -> Callable:
        if q not in self.programs:
            self.programs[q] = self.build(q)
        return self.programs[q]

    def __call__(self, input_ids, position_ids, cache_position, *rest):
        masks, cache = rest[: self.n_masks], rest[self.n_masks :]
        outs, start = [], 0
        for q in piece_lengths(input_ids.shape[1], self.max_piece):
            end = start + q
            piece_masks = [m[:, :, start:end].contiguous() for m in masks]
            out = self.program(q)(
                input_ids[:, start:end], position_ids[:, start:end], cache_position[start:end], *piece_masks, *cache
            )
            outs.append(out)
            start = end
        if len(outs) == 1:
            return outs[0]
        if isinstance(outs[0], (tuple, list)):
            return type(outs[0])(torch.cat(parts, dim=1) for parts in zip(*outs, strict=True))
        return torch.cat(outs, dim=1)
