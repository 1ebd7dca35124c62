"""Draft trees and their lossless acceptance: SpecInfer (Miao et al., 2024), Medusa (Cai et al., 2024).

A tree holds several candidate continuations of the last verified token (its root) that share prefixes, so
one verify pass scores them all: node i is written at cache slot ``length + i`` with position
``length + depth[i]`` and attends to the committed prefix and to its own ancestors (KVCache.tree_masks).

Acceptance walks down from the root, one node per verified token:
- greedy: descend into the child whose token is the target's argmax; stop at the first node without one and
  emit the argmax there. The emitted tokens are exactly the target's greedy tokens.
- sampling (children chosen deterministically, as every drafter here does): sample y from the target's warped
  distribution at the node; descend if y is a child's token, else emit y and stop. Every emitted token is a
  sample of the target at its true context, so the output distribution is the target's (SpecInfer's
  multi-step speculative sampling, with one-hot draft distributions).
"""

from __future__ import annotations

import torch

from specpass.runtime.sampling import SamplingConfig, greedy, probabilities


class DraftTree:
    """Nodes in creation order (a parent always precedes its children); node 0 is the root.

    A tree never grows past ``budget`` nodes or ``max_depth`` levels below the root: ``add`` returns None there.
    """

    def __init__(self, root: int, budget: int, max_depth: int):
        self.budget, self.limit = budget, max_depth
        self.tokens = [int(root)]
        self.parents = [-1]
        self.depth = [0]
        self._children: list[dict[int, int]] = [{}]  # node -> {token: child node}

    def __len__(self) -> int:
        return len(self.tokens)

    def child(self, node: int, token: int) -> int | None:
        return self._children[node].get(int(token))

    def add(self, parent: int, token: int) -> int | None:
        """The child of ``parent`` with ``token``, created if new and within the limits (else None)."""
        token = int(token)
        found = self._children[parent].get(token)
        if found is not None:
            return found
        if len(self.tokens) >= self.budget or self.depth[parent] >= self.limit:
            return None
        node = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depth.append(self.depth[parent] + 1)
        self._children.append({})
        self._children[parent][token] = node
        return node

    def add_path(self, tokens, parent: int = 0) -> None:
        """Merge a chain of tokens under ``parent``, reusing shared prefixes, as far as the limits allow."""
        for t in tokens:
            parent = self.add(parent, t)
            if parent is None:
                return

    def pad(self, size: int, vocab: int) -> None:
        """Grow to ``size`` nodes (as far as the limits allow) with children of the root holding the lowest
        token ids below ``vocab`` not yet among them: a graph-friendly node count. Verification treats them like
        any other node, so one that happens to be the target's token is accepted, losslessly."""
        token = 0
        while len(self) < size and self.limit > 0 and token < vocab:
            self.add(0, token)
            token += 1

    @property
    def max_depth(self) -> int:
        return max(self.depth)

    def ancestors(self) -> torch.Tensor:
        """(T, T) bool: [i, j] when node j is node i or one of its ancestors."""
        n = len(self)
        out = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            out[i] |= out[self.parents[i]]
        return out

    def path_to(self, node: int) -> list[int]:
        """The nodes from the root's first child down to ``node``."""
        path = []
        while node > 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


def accept_tree(
    tree: DraftTree,
    logits: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
) -> tuple[list[int], int]:
    """(the accepted nodes, root excluded, in order; the token to emit after them).

    ``logits``: (T, V), row i scoring the token after node i.
    """
    path: list[int] = []
    node = 0
    choice = None if sampling.do_sample else greedy(logits).tolist()  # greedy: one host sync
    while True:
        if choice is None:
            y = int(torch.multinomial(probabilities(logits[node], sampling), 1, generator=generator))
        else:
            y = choice[node]
        nxt = tree.child(node, y)
        if nxt is None:
            return path, y
        path.append(nxt)
        node = nxt
