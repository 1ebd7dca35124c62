"""runtime/lookup.py: the n-gram index that drafts by context lookup."""

from __future__ import annotations

import pytest

from specpass.errors import SpecPassError
from specpass.runtime.lookup import NgramIndex


def test_proposes_what_followed_the_longest_matching_suffix():
    index = NgramIndex([5, 1, 2, 9, 7, 2, 8, 1, 2], max_n=2)
    # suffix (1, 2) occurred at 1..2, followed by 9, 7, ...; the 1-gram (2,) alone would say 8
    assert index.propose(3) == [9, 7, 2]


def test_the_most_recent_occurrence_wins():
    index = NgramIndex([4, 1, 6, 4, 1, 7, 4, 1], max_n=2)
    assert index.propose(1) == [7]


def test_no_match_and_no_self_match():
    index = NgramIndex([1, 2, 3], max_n=3)
    assert index.propose(2) == []  # the suffix itself has no continuation yet
    assert NgramIndex([1, 2, 3], max_n=2).propose(0) == []


def test_extend_indexes_new_tokens_and_proposals_stop_at_the_end():
    index = NgramIndex([3, 4], max_n=2)
    index.extend([5, 3])
    assert index.propose(5) == [4, 5, 3]  # only what exists after the match
    index.extend([4])
    assert index.propose(2) == [5, 3]


def test_min_n_ignores_shorter_matches():
    index = NgramIndex([7, 1, 8, 2, 1], max_n=3, min_n=2)
    assert index.propose(2) == []  # only the 1-gram (1,) matches
    assert NgramIndex([7, 1, 8, 2, 1], max_n=3, min_n=1).propose(2) == [8, 2]


def test_bad_sizes_are_refused():
    with pytest.raises(SpecPassError, match="min_n"):
        NgramIndex([], max_n=1, min_n=2)
