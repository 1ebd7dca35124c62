"""Acceptance rules: greedy equals the target's argmax path; rejection sampling emits the target distribution.

Statistical tests use chi-square on a 6-token vocabulary over seeded trials; the negative controls (a wrong
residual, an inverted acceptance ratio) must fail the same test.
"""

from __future__ import annotations

import pytest
import torch
from conftest import chi2_pvalue, negative_control_pvalue, sampled_counts

from specpass.runtime.verify import greedy_accept, sample_accept

V = 6
TRIALS = 6000


def test_greedy_accepts_the_matching_prefix_and_emits_the_target_token():
    logits = torch.full((4, V), -1.0)
    for i, t in enumerate([2, 5, 1, 3]):
        logits[i, t] = 1.0
    assert greedy_accept(torch.tensor([2, 5, 1]), logits) == (3, 3)  # all accepted, bonus token
    assert greedy_accept(torch.tensor([2, 4, 1]), logits) == (1, 5)  # stops at the first disagreement
    assert greedy_accept(torch.tensor([0, 5, 1]), logits) == (0, 2)
    assert greedy_accept(torch.tensor([], dtype=torch.long), logits[:1]) == (0, 2)


def _dist(seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 1.5, -1)


def _emitted_first(p: torch.Tensor, q: torch.Tensor, accept=sample_accept, trials: int = TRIALS) -> torch.Tensor:
    """Counts of the first emitted token of one-token drafts x ~ q, verified against p."""
    gen = torch.Generator().manual_seed(0)
    target = torch.stack([p, torch.full((V,), 1.0 / V)])
    counts = torch.zeros(V, dtype=torch.float64)
    for _ in range(trials):
        x = torch.multinomial(q, 1, generator=gen)
        n, token = accept(x, q[None], target, gen)
        counts[x[0] if n == 1 else token] += 1
    return counts


@pytest.mark.parametrize(
    "case",
    ["different", "equal", "disjoint", "one_hot_draft", "one_hot_target"],
)
def test_rejection_sampling_emits_the_target_distribution(case):
    p, q = _dist(1), _dist(2)
    if case == "equal":
        q = p.clone()
    elif case == "disjoint":
        p = torch.tensor([0.5, 0.3, 0.2, 0, 0, 0])
        q = torch.tensor([0, 0, 0, 0.2, 0.3, 0.5])
    elif case == "one_hot_draft":
        q = torch.nn.functional.one_hot(torch.tensor(4), V).float()
    elif case == "one_hot_target":
        p = torch.nn.functional.one_hot(torch.tensor(1), V).float()
    assert chi2_pvalue(_emitted_first(p, q), p) > 1e-3


def test_equal_distributions_accept_every_draft_token():
    p = _dist(3)
    gen = torch.Generator().manual_seed(1)
    draft = torch.multinomial(p, 3, replacement=True, generator=gen)
    target = p.expand(4, V)
    assert all(sample_accept(draft, p.expand(3, V), target, gen)[0] == 3 for _ in range(200))


def _wrong_residual(draft, draft_probs, target_probs, generator=None):
    """Negative control: on rejection, resample from p instead of norm(max(p - q, 0))."""
    n, token = sample_accept(draft, draft_probs, target_probs, generator)
    if n < draft.shape[0]:
        token = int(torch.multinomial(target_probs[n], 1, generator=generator))
    return n, token


def _inverted_ratio(draft, draft_probs, target_probs, generator=None):
    """Negative control: accept with min(1, q/p) instead of min(1, p/q); the residual is the right one."""
    x = int(draft[0])
    if torch.rand(1, generator=generator) < draft_probs[0, x] / target_probs[0, x].clamp_min(1e-12):
        return 1, int(torch.multinomial(target_probs[1], 1, generator=generator))
    residual = (target_probs[0] - draft_probs[0]).clamp_min(0)
    return 0, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


@pytest.mark.parametrize("broken", [_wrong_residual, _inverted_ratio])
def test_negative_controls_fail_the_same_test(broken):
    p, q = _dist(1), _dist(2)
    assert chi2_pvalue(_emitted_first(p, q, accept=broken), p) < 1e-6


def test_a_negative_control_stops_sampling_only_once_the_fit_is_surely_rejected():
    """conftest.negative_control_pvalue, which the runtime's negative controls use: a fitting sampler is tested on
    all its samples, exactly as chi2_pvalue would; a far-off one stops at the first look; an impossible outcome
    at once."""
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    calls = []

    def sampler(probs: torch.Tensor):
        gen = torch.Generator().manual_seed(5)

        def sample() -> int:
            calls.append(1)
            return int(torch.multinomial(probs, 1, generator=gen))

        return sample

    fits = negative_control_pvalue(sampler(p), 2000, p)
    assert len(calls) == 2000 and fits == chi2_pvalue(sampled_counts(sampler(p), 2000, 4), p) > 1e-3
    calls.clear()
    assert negative_control_pvalue(sampler(torch.tensor([0.2, 0.3, 0.5, 0.0])), 2000, p) < 1e-6
    assert len(calls) == 500
    calls.clear()
    assert negative_control_pvalue(sampler(torch.tensor([0.0, 0.0, 0.0, 1.0])), 2000, p) == 0.0
    assert len(calls) == 1
