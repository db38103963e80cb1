"""The train stage's batches: the one greedy packer (steps and the reference pass), and that a packed row holds
the pairs' tokens and nothing else (no padding)."""

from __future__ import annotations

import pytest

from perpair.train.batches import greedy_groups
from perpair.train.logprobs import pack
from perpair.train.tokenize import TokenizedPair


@pytest.mark.parametrize(("sizes", "budget", "groups"), [
    ([3, 4, 2, 5], 0, [[0], [1], [2], [3]]),  # 0: one item per group
    ([3, 4, 2, 5], 7, [[0, 1], [2, 3]]),  # 3 + 4 = 7 fits exactly; 2 + 5 = 7 too
    ([3, 4, 2, 5], 6, [[0], [1, 2], [3]]),
    ([9, 1, 1], 5, [[0], [1, 2]]),  # larger than the budget: a group of its own
    ([], 5, []),
])
def test_greedy_groups_by_hand(sizes, budget, groups):
    assert greedy_groups(sizes, budget) == groups


def test_a_packed_row_holds_exactly_the_pairs_tokens():
    pairs = [TokenizedPair([1, 2, 3], [4, 5], [6]), TokenizedPair([7], [8, 9, 10], [11, 12]),
             TokenizedPair([], [13], [14, 15])]
    packed = pack(pairs)
    assert packed.input_ids.shape == (1, sum(p.tokens for p in pairs)) == (1, 15)
    assert packed.input_ids[0].tolist() == list(range(1, 16))  # every token once, in order: nothing padded
