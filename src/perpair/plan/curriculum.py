"""Routing by margin and curriculum order (MixDPO), as pure functions of per-pair arrays.

Every order here depends only on content — the margins and the pair ids — and the configured seed, never
on file order (except ``none``, which *is* file order), hash randomisation or platform: ties are broken by
pair id, and shuffles are seeded PCG64 permutations applied to pairs sorted by pair id.
"""

from __future__ import annotations

import math

import numpy as np

CURRICULA = ("none", "easy_to_hard", "bucketed", "hard_to_easy", "random")
_STREAM_CURRICULUM = 2  # beta.py uses stream 1 of the same seed


def id_rank(pair_ids: np.ndarray) -> np.ndarray:
    """Each pair's position when the ids are sorted (code-point order): the tie-break key."""
    ids = np.asarray(pair_ids, dtype=str)
    rank = np.empty(len(ids), dtype=np.int64)
    rank[np.argsort(ids, kind="stable")] = np.arange(len(ids))
    return rank


def easy_to_hard(indices: np.ndarray, margin: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """``indices`` sorted by margin from large to small (MixDPO), ties by pair id (ours), pairs without a margin
    last (by pair id)."""
    m = margin[indices]
    missing = np.isnan(m)
    return indices[np.lexsort((rank[indices], -np.nan_to_num(m), missing))]


def hard_to_easy(indices: np.ndarray, margin: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """``indices`` sorted by margin from small to large, ties by pair id, pairs without a margin last."""
    m = margin[indices]
    missing = np.isnan(m)
    return indices[np.lexsort((rank[indices], np.nan_to_num(m), missing))]


def lowest_fraction(indices: np.ndarray, margin: np.ndarray, rank: np.ndarray,
                    quantile: float) -> np.ndarray:
    """The ``floor(quantile · n)`` pairs of ``indices`` (all with a margin) that come last easy→hard."""
    count = math.floor(quantile * len(indices))
    if count == 0:
        return indices[:0]
    return easy_to_hard(indices, margin, rank)[-count:]


def route_mask(margin: np.ndarray, eligible: np.ndarray, rank: np.ndarray, tau: float | None,
               quantile: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Which eligible pairs with a margin are routed away from the preference loss.

    Returns ``(below_tau, in_lowest_quantile)`` boolean masks; a pair is routed when either holds.
    """
    has_margin = eligible & ~np.isnan(margin)
    below_tau = np.zeros(len(margin), dtype=bool)
    lowest = np.zeros(len(margin), dtype=bool)
    if tau is not None:
        below_tau = has_margin & (np.nan_to_num(margin, nan=np.inf) < tau)
    if quantile is not None:
        lowest[lowest_fraction(np.flatnonzero(has_margin), margin, rank, quantile)] = True
    return below_tau, lowest


def curriculum_sequence(kind: str, included: np.ndarray, margin: np.ndarray, rank: np.ndarray,
                        buckets: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The included pairs' row indices in training order, and each pair's bucket (-1 where none).

    ``bucketed`` splits the easy→hard sequence of pairs with a margin into ``buckets`` near-equal
    contiguous parts and shuffles inside each (ours); pairs without a margin come last, unshuffled.
    """
    indices = np.flatnonzero(included)
    bucket = np.full(len(margin), -1, dtype=np.int64)
    if kind == "none":
        return indices, bucket
    if kind == "easy_to_hard":
        return easy_to_hard(indices, margin, rank), bucket
    if kind == "hard_to_easy":
        return hard_to_easy(indices, margin, rank), bucket
    rng = np.random.default_rng([seed, _STREAM_CURRICULUM])
    if kind == "random":
        by_id = indices[np.argsort(rank[indices], kind="stable")]
        return by_id[rng.permutation(len(by_id))], bucket
    if kind == "bucketed":
        ordered = easy_to_hard(indices, margin, rank)
        with_margin = ordered[~np.isnan(margin[ordered])]
        parts = []
        for number, part in enumerate(np.array_split(with_margin, buckets)):
            bucket[part] = number
            parts.append(part[rng.permutation(len(part))])
        parts.append(ordered[np.isnan(margin[ordered])])
        return np.concatenate(parts), bucket
    raise ValueError(f"unknown curriculum {kind!r}; expected one of {', '.join(CURRICULA)}")


def positions(sequence: np.ndarray, size: int) -> np.ndarray:
    """``order[i]`` = the position of row i in ``sequence``; -1 for rows not in it."""
    order = np.full(size, -1, dtype=np.int64)
    order[sequence] = np.arange(len(sequence))
    return order
