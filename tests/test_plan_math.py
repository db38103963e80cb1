"""The plan's maths, worked by hand: β schedule, margins, routing and curricula on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from perpair.errors import InputError
from perpair.plan import beta as bm
from perpair.plan import curriculum as cur
from perpair.plan import difficulty as dif


def test_magnitude_gain_is_the_table_at_integers_and_linear_between():
    table = (0.0, 0.4, 0.7, 1.0)
    got = bm.magnitude_gain(np.array([0.0, 1.0, 2.0, 3.0, 0.5, 2.5, 1.25, np.nan]), table)
    assert got[:4].tolist() == [0.0, 0.4, 0.7, 1.0]  # exact, no round-off at the table's own points
    assert got[4] == pytest.approx(0.2)
    assert got[5] == pytest.approx(0.85)
    assert got[6] == pytest.approx(0.4 + 0.25 * 0.3)
    assert math.isnan(got[7])


def test_signal_and_beta_by_hand():
    # s = prior · g · confidence: 0.9 · 0.7 · 0.5 = 0.315
    s = bm.signal_strength(np.array([0.9, 1.0, 0.0]), np.array([0.7, 1.0, 0.4]), np.array([0.5, 1.0, 0.9]))
    assert s.tolist() == pytest.approx([0.315, 1.0, 0.0])
    beta = bm.interpolate_beta(s, beta_min=0.025, beta_max=0.4)
    assert beta[0] == pytest.approx(0.4 ** 0.685 * 0.025 ** 0.315, rel=1e-15)
    assert beta[1] == pytest.approx(0.025)  # full signal → β_min
    assert beta[2] == pytest.approx(0.4)  # no signal → β_max
    # Half signal sits at the geometric centre: sqrt(0.025 · 0.4) = 0.1.
    assert bm.interpolate_beta(np.array([0.5]), 0.025, 0.4)[0] == pytest.approx(0.1)
    # β falls monotonically with the signal.
    assert np.all(np.diff(bm.interpolate_beta(np.linspace(0, 1, 11), 0.01, 1.0)) < 0)


def test_normalisation_factor_sets_the_geometric_mean():
    betas = np.array([0.05, 0.2, 0.4])
    geo = (0.05 * 0.2 * 0.4) ** (1 / 3)
    assert bm.geometric_mean(betas) == pytest.approx(geo)
    c = bm.normalisation_factor(betas, 0.1)
    assert c == pytest.approx(0.1 / geo)
    assert bm.geometric_mean(c * betas) == pytest.approx(0.1, rel=1e-12)


def test_random_assignment_is_a_seeded_permutation():
    a = bm.random_assignment(50, seed=3)
    assert sorted(a.tolist()) == list(range(50))
    assert a.tolist() == bm.random_assignment(50, seed=3).tolist()
    assert a.tolist() != bm.random_assignment(50, seed=4).tolist()


def test_margins_by_hand():
    ratings = dif.ratings_margin(np.array([8.0, 5.0, np.nan]), np.array([6.5, 5.0, 3.0]))
    assert ratings[:2].tolist() == [1.5, 0.0]
    assert math.isnan(dif.ratings_margin(np.array([np.nan]), np.array([3.0]))[0])
    teacher = dif.teacher_margin(np.array([2.0, 3.0]), np.array([0.5, 0.9]), np.array([False, True]))
    assert teacher.tolist() == pytest.approx([1.0, -2.7])
    # a tie (no_clear_gap) has no margin, whatever magnitude the teacher gave with it; unannotated stays NaN
    tie = dif.teacher_margin(np.array([3.0, 2.0, np.nan]), np.array([0.9, 0.5, np.nan]),
                             np.array([False, False, False]), np.array([True, False, False]))
    assert tie[:2].tolist() == [0.0, 1.0] and math.isnan(tie[2])
    # (−20 / 10) − (−90 / 30) = −2 + 3 = 1; (−5 / 5) − (−4 / 2) = −1 + 2 = 1; (−30/10) − (−10/10) = −2
    ref = dif.reference_margin(np.array([-20.0, -5.0, -30.0]), np.array([10, 5, 10]),
                               np.array([-90.0, -4.0, -10.0]), np.array([30, 2, 10]))
    assert ref.tolist() == pytest.approx([1.0, 1.0, -2.0])


def test_reference_margin_from_a_table_aligns_by_pair_id():
    logps = pa.table({"pair_id": ["b", "a"], "chosen_logps": [-10.0, -20.0], "chosen_tokens": [10, 10],
                      "rejected_logps": [-30.0, -20.0], "rejected_tokens": [10, 20]},
                     schema=dif.REFERENCE_LOGPS_SCHEMA)
    got = dif.reference_margin_for(["a", "c", "b"], logps)
    assert got[0] == pytest.approx(-2.0 - (-1.0))
    assert math.isnan(got[1])
    assert got[2] == pytest.approx(-1.0 - (-3.0))


def test_reference_margin_rejects_empty_responses_and_ragged_arrays():
    with pytest.raises(InputError, match="at least one token"):
        dif.reference_margin(np.array([-1.0]), np.array([0]), np.array([-1.0]), np.array([3]))
    with pytest.raises(InputError, match="different lengths"):
        dif.reference_margin(np.array([-1.0, -2.0]), np.array([1]), np.array([-1.0]), np.array([3]))


IDS = np.array(["d", "b", "a", "c", "e"])
MARGINS = np.array([1.0, 3.0, 1.0, np.nan, 2.0])


def test_easy_to_hard_sorts_large_first_ties_by_id_missing_last():
    rank = cur.id_rank(IDS)
    seq = cur.easy_to_hard(np.arange(5), MARGINS, rank)
    # margins 3 (b), 2 (e), then the tie at 1: a before d, then c without a margin
    assert IDS[seq].tolist() == ["b", "e", "a", "d", "c"]
    assert IDS[cur.hard_to_easy(np.arange(5), MARGINS, rank)].tolist() == ["a", "d", "e", "b", "c"]


def test_route_mask_tau_and_quantile():
    rank = cur.id_rank(IDS)
    eligible = np.array([True, True, True, True, False])
    below, lowest = cur.route_mask(MARGINS, eligible, rank, tau=1.5, quantile=None)
    assert IDS[below].tolist() == ["d", "a"]  # c has no margin, e is not eligible
    assert not lowest.any()
    # Of the 3 eligible pairs with a margin, floor(0.5 · 3) = 1 is the hardest: the tie at 1.0 is broken
    # by id, and d sorts after a, so d is the one.
    below, lowest = cur.route_mask(MARGINS, eligible, rank, tau=None, quantile=0.5)
    assert IDS[lowest].tolist() == ["d"]
    assert not below.any()


def test_bucketed_runs_buckets_easy_to_hard_and_shuffles_inside():
    margins = np.arange(12, dtype=np.float64)[::-1].copy()  # 11 … 0
    ids = np.array([f"p{i:02d}" for i in range(12)])
    rank = cur.id_rank(ids)
    seq, bucket = cur.curriculum_sequence("bucketed", np.ones(12, bool), margins, rank, buckets=3, seed=0)
    assert sorted(seq.tolist()) == list(range(12))
    assert [sorted(margins[seq[i:i + 4]].tolist()) for i in (0, 4, 8)] == [
        [8, 9, 10, 11], [4, 5, 6, 7], [0, 1, 2, 3]]
    assert bucket.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert seq.tolist() != sorted(seq.tolist())  # shuffled inside (this seed moves something)
    again, _ = cur.curriculum_sequence("bucketed", np.ones(12, bool), margins, rank, buckets=3, seed=0)
    assert again.tolist() == seq.tolist()


def test_random_and_none_curricula():
    rank = cur.id_rank(IDS)
    included = np.array([True, True, False, True, True])
    seq, _ = cur.curriculum_sequence("none", included, MARGINS, rank, 4, 0)
    assert seq.tolist() == [0, 1, 3, 4]
    seq, _ = cur.curriculum_sequence("random", included, MARGINS, rank, 4, 0)
    assert sorted(seq.tolist()) == [0, 1, 3, 4]
    order = cur.positions(seq, 5)
    assert order[2] == -1 and sorted(order[order >= 0].tolist()) == [0, 1, 2, 3]
