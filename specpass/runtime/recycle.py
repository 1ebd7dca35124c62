"""Draft trees from recycled tokens: Token Recycling (Luo et al., 2024), fused with context lookup as in RASD.

Every verify pass scores each tree node's next token over the whole vocabulary and then throws those scores
away. Token Recycling keeps the top-k of each row in an adjacency table, ``next[t]`` = the k tokens the target
ranked highest the last time it followed token t, and drafts the next step's tree by walking that table
along a static tree template: node (parent, rank) holds ``next[parent's token][rank]``. Drafting costs a few
dictionary lookups and no model call. The table lives with the compiled model, so it keeps warming up across
generate() calls; it only changes which tokens are proposed, never which are emitted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specpass.errors import SpecPassError
from specpass.runtime.tree import DraftTree

#: a tree template: node i > 0 is (parent node, rank among the parent's candidates); node 0 is the root
Template = Sequence[tuple[int, int]]


class AdjacencyTable:
    """token -> the top-``k`` next tokens the target gave it most recently."""

    def __init__(self, k: int = 8):
        self.k = k
        self.next: dict[int, list[int]] = {}

    def update(self, tokens: Sequence[int], logits: torch.Tensor) -> None:
        """Record the top-k of ``logits[i]`` (the target's scores after ``tokens[i]``) for every row."""
        top = logits.topk(min(self.k, logits.shape[-1]), dim=-1).indices.tolist()
        for t, row in zip(tokens, top, strict=True):
            self.next[int(t)] = row

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The table as tensors (what an engine file stores): ``tokens`` (n,) and their rows ``next`` (n, k),
        padded with -1 where a row holds fewer than k candidates."""
        tokens = sorted(self.next)
        rows = [(self.next[t] + [-1] * self.k)[: self.k] for t in tokens]
        return {
            "tokens": torch.tensor(tokens, dtype=torch.long),
            "next": torch.tensor(rows, dtype=torch.long).reshape(len(tokens), self.k),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the table with one from ``state_dict``."""
        tokens, rows = state["tokens"], state["next"]
        if tokens.dim() != 1 or rows.dim() != 2 or rows.shape[0] != tokens.shape[0]:
            raise SpecPassError(
                f"a recycled-token table needs tokens (n,) and next (n, k); got {tuple(tokens.shape)} and {tuple(rows.shape)}"
            )
        self.next = {
            t: [c for c in row if c >= 0][: self.k] for t, row in zip(tokens.tolist(), rows.tolist(), strict=True)
        }

    def grow(self, tree: DraftTree, template: Template) -> None:
        """Add the template's nodes under ``tree``'s root, as far as the tree's limits allow.

        A node the tree already holds (from lookup) is shared, and the template's subtree grows under it.
        """
        placed: list[int | None] = [0]  # template node -> tree node, None where it could not be placed
        for parent, rank in template:
            node = placed[parent]
            row = None if node is None else self.next.get(tree.tokens[node])
            placed.append(tree.add(node, row[rank]) if row is not None and rank < len(row) else None)

    def record(self, emitted: Sequence[int], hits: list[list[int]], tries: list[int]) -> None:
        """Count, per depth d, the verified pairs (emitted[d], emitted[d + 1]) and, by rank, those where the
        table had emitted[d + 1] among emitted[d]'s candidates: ``hits[d][r] / tries[d]`` is the acceptance
        per depth and rank that tune/tree_shape.py turns into a template. Call before ``update``, so the
        counts describe what was drafted."""
        for d, (prev, nxt) in enumerate(zip(emitted[:-1], emitted[1:], strict=False)):
            if d >= len(tries):
                break
            tries[d] += 1
            row = self.next.get(int(prev))
            if row is not None and nxt in row:
                hits[d][row.index(nxt)] += 1


def chain_template(depth: int) -> list[tuple[int, int]]:
    """The top-1 chain of ``depth`` nodes."""
    return [(i, 0) for i in range(depth)]
