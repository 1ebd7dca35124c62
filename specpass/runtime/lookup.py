"""Draft tokens by n-gram lookup in the context: prompt lookup decoding (Saxena, 2023), LLMA (Yang et al., 2023).

Text that copies from its context (summaries, retrieval answers, code edits, a small model repeating
itself) continues the way an earlier occurrence of its last few tokens did. Proposing that continuation
costs no model call, so it pays whenever the target's multi-token verify step costs little more than a
one-token step. The proposal is a deterministic draft (a one-hot q), which chain rejection sampling
verifies losslessly like any other.
"""

from __future__ import annotations

from collections.abc import Iterable

from specpass.errors import SpecPassError


class NgramIndex:
    """The most recent earlier occurrence of every n-gram (``min_n`` <= n <= ``max_n``) of a growing sequence.

    An n-gram is indexed once the token after it is known, so a match always has a continuation; ``extend``
    and ``propose`` cost O(max_n) per token, not a scan of the context.
    """

    def __init__(self, ids: Iterable[int], *, max_n: int = 3, min_n: int = 1, keep: int = 2):
        if not 1 <= min_n <= max_n:
            raise SpecPassError(f"n-gram lookup needs 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.max_n, self.min_n, self.keep = max_n, min_n, keep
        self.seq: list[int] = []
        # n-gram -> the positions just after its ``keep`` latest occurrences, the latest last
        self._after: dict[tuple[int, ...], list[int]] = {}
        self.extend(ids)

    def extend(self, ids: Iterable[int]) -> None:
        for t in ids:
            end = len(self.seq)  # the n-grams ending just before t now have a continuation
            for n in range(self.min_n, min(self.max_n, end) + 1):
                seen = self._after.setdefault(tuple(self.seq[end - n : end]), [])
                seen.append(end)
                if len(seen) > self.keep:
                    del seen[0]
            self.seq.append(int(t))

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest matching suffix; [] without a match."""
        found = self.propose_many(k, 1)
        return found[0] if found else []

    def propose_many(self, k: int, branches: int) -> list[list[int]]:
        """Up to ``branches`` different continuations of up to ``k`` tokens, best first: the latest
        occurrences of the longest matching suffix, then of shorter ones (the branches of a draft tree)."""
        out: list[list[int]] = []
        if k <= 0:
            return out
        for n in range(min(self.max_n, len(self.seq)), self.min_n - 1, -1):
            for start in reversed(self._after.get(tuple(self.seq[-n:]), ())):
                chain = self.seq[start : start + k]
                if chain not in out:
                    out.append(chain)
                    if len(out) == branches:
                        return out
        return out
