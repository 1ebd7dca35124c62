"""The static draft tree that maximises expected accepted tokens for a node budget: Sequoia (Chen et al., 2024).

Input: measured acceptance per depth and rank, ``accept[d][r]`` = the probability that the target's token at
depth d + 1 is a node's rank-r candidate, given that the walk reached the node. Candidates of one node are
disjoint events, so a child of rank r at depth d is reached with its parent's probability times
``accept[d][r]``, and the expected number of accepted tokens is the sum of every non-root node's reach
probability. Sequoia's dynamic program over (depth, rank, nodes left) finds the best tree exactly:

    V(n, d)    = best expected accepted tokens in a subtree of n nodes whose root sits at depth d
               = G(d, 0, n - 1)
    G(d, r, b) = best use of b nodes for the root's children of rank r, r+1, ...
               = max(0, max over s in 1..b of accept[d][r] * (1 + V(s, d + 1)) + G(d, r + 1, b - s))
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from specpass.errors import SpecPassError


def best_tree(accept: Sequence[Sequence[float]], budget: int) -> tuple[list[tuple[int, int]], float]:
    """(template, expected accepted tokens) for a tree of at most ``budget`` nodes, root included.

    The template lists nodes 1.. as (parent, rank) in breadth-first order (see runtime/recycle.py).
    """
    if budget < 1:
        raise SpecPassError(f"a draft tree needs a budget of at least 1 node, got {budget}")
    depths = len(accept)

    def p(d: int, r: int) -> float:
        return float(accept[d][r]) if d < depths and r < len(accept[d]) else 0.0

    @functools.cache
    def value(n: int, d: int) -> float:
        return group(d, 0, n - 1)[0]

    @functools.cache
    def group(d: int, r: int, b: int) -> tuple[float, int]:
        """(best value, the subtree size given to rank r; 0 = no child of rank r or later)."""
        best, size = 0.0, 0
        if b == 0 or p(d, r) <= 0.0:
            return best, size
        for s in range(1, b + 1):
            v = p(d, r) * (1 + value(s, d + 1)) + group(d, r + 1, b - s)[0]
            if v > best + 1e-12:
                best, size = v, s
        return best, size

    # Rebuild breadth-first: each entry is (tree node, its depth, nodes its subtree may use below it).
    template: list[tuple[int, int]] = []
    queue = [(0, 0, budget - 1)]
    while queue:
        node, d, b = queue.pop(0)
        r = 0
        while b > 0:
            _, s = group(d, r, b)
            if s == 0:
                break
            template.append((node, r))
            queue.append((len(template), d + 1, s - 1))
            b -= s
            r += 1
    return template, value(budget, 0)
