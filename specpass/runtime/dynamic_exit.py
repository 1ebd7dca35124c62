"""DEL's dynamic exit layer (Zarch et al., 2025): the draft's exit layer and length, chosen every round.

Each verify pass also returns, for every candidate exit, the token an early exit there would have drafted at
each verified position (passes/exit_predictions.py). Their agreement with the tokens verification accepted
estimates each exit's acceptance rate alpha online, in the context at hand. A round then drafts gamma tokens
at the exit k that maximises DEL's tokens per unit of compute,

    E[tokens] / cost = (1 - alpha_k ** (gamma + 1)) / (1 - alpha_k) / (gamma * c_k + 1),

where c_k is a draft token's cost at exit k relative to DEL's verify pass (the parameters each reads: decoding
one sequence is bound by memory bandwidth; optimize.del_costs). Gamma 0 is a plain step, chosen when no draft pays; its verify pass
still updates every estimate, so drafting resumes when the context gets easier.
"""

from __future__ import annotations

from collections.abc import Sequence

#: the program the verify pass runs under DEL: decode's graph plus each exit's tokens
VERIFY_EXITS = "verify_exits"


def draft_program_name(exit_layer: int) -> str:
    """The name of the early-exit draft program for ``exit_layer`` among a DEL plan's programs."""
    return f"draft_exit{exit_layer}"


class ExitChooser:
    """Per-exit acceptance estimates and DEL's choice of (exit layer, draft length)."""

    def __init__(self, exits: Sequence[int], costs: Sequence[float], max_draft: int, *, prior: float = 0.5):
        if len(exits) != len(costs) or not exits:
            raise ValueError(f"DEL needs one cost per exit: {len(exits)} exits, {len(costs)} costs")
        self.exits = list(exits)
        self.costs = dict(zip(self.exits, costs, strict=True))
        self.max_draft = max_draft
        self.alpha = dict.fromkeys(self.exits, prior)
        #: per verified token, the weight of the newest observation: about the last 1 / decay tokens count
        self.decay = 0.1

    def rate(self, k: int, gamma: int) -> float:
        """Expected tokens per unit of compute for ``gamma`` draft tokens at exit ``k`` (gamma 0: a plain step)."""
        a = min(self.alpha[k], 0.999)
        return (1 - a ** (gamma + 1)) / (1 - a) / (gamma * self.costs[k] + 1)

    def choose(self) -> tuple[int, int]:
        """(exit layer, draft length) with the most expected tokens per unit of compute; length 0: no draft."""
        options = [(self.exits[0], 0)] + [(k, g) for k in self.exits for g in range(1, self.max_draft + 1)]
        return max(options, key=lambda option: self.rate(*option))  # ties: the first, a plain step first

    def update(self, shadows: dict[int, Sequence[int]], verified: Sequence[int]) -> None:
        """``verified[i]``: the target's token after verify row i; ``shadows[k][i]``: exit k's token there."""
        for k in self.exits:
            for drafted, target in zip(shadows[k], verified, strict=True):
                self.alpha[k] += self.decay * (float(drafted == target) - self.alpha[k])
