"""Acceptance rules that keep speculative decoding lossless.

- Greedy: accept the longest prefix of the draft that equals the target's argmax, then emit the target's own
  token at the first disagreement (or after the last draft token): the output is the target's greedy output.
- Sampling: chain rejection sampling (Leviathan et al., 2023; Chen et al., 2023). Draft token x_i drawn from
  q_i is kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection a token is drawn from the
  residual norm(max(p_i - q_i, 0)) and the step ends; if every draft token is kept, one more is drawn from
  p_k. Each emitted token is then distributed exactly as under the target alone. p and q must be the
  *warped* distributions (temperature, top-k, top-p applied identically to both; see sampling.warp).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specpass.runtime.sampling import greedy


def greedy_accept(draft: Sequence[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """(number of draft tokens accepted, the token to emit after them).

    ``draft``: k ids; ``target_logits``: (k + 1, V), row i scoring the position of draft token i (the last
    row follows the whole draft). Reads the target's choices back once: a verify step's one host sync.
    """
    choice = greedy(target_logits).tolist()
    draft = draft.tolist() if isinstance(draft, torch.Tensor) else list(draft)
    n = next((i for i, (d, c) in enumerate(zip(draft, choice, strict=False)) if d != c), len(draft))
    return n, choice[n]


def sample_accept(
    draft: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """(number of draft tokens accepted, the token to emit after them), by chain rejection sampling.

    ``draft``: (k,) ids sampled from ``draft_probs`` (k, V); ``target_probs``: (k + 1, V).
    """
    k = draft.shape[0]
    idx = torch.arange(k, device=draft.device)
    p_x = target_probs[idx, draft]
    q_x = draft_probs[idx, draft]
    u = torch.rand(k, generator=generator, device=draft.device)
    # u < p/q, written without the division: q(x) > 0 for a sampled x, and p/q >= 1 always accepts.
    rejected = (u * q_x >= p_x).nonzero()
    if not rejected.numel():
        return k, int(torch.multinomial(target_probs[k], 1, generator=generator))
    n = int(rejected[0])
    residual = (target_probs[n] - draft_probs[n]).clamp_min(0)
    total = residual.sum()
    # p == q at a rejected position can only happen by rounding; the residual is then empty and p is exact.
    dist = residual / total if total > 0 else target_probs[n]
    return n, int(torch.multinomial(dist, 1, generator=generator))
