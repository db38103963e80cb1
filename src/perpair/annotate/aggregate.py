"""Per-pair aggregation of an ensemble's calls (several teachers and/or templates).

DESIGN: category by confidence-weighted vote; magnitude and confidence by weighted mean; agreement kept.
Ours, precisely: a valid call of teacher t votes ``w_t · confidence`` for its category (the most objective
category wins a tie: CATEGORIES order); magnitude = the mean of magnitudes weighted by ``w_t · confidence``;
confidence = the mean of confidences weighted by ``w_t``; agreement = the winning category's share of the
vote. A single call passes through unchanged (agreement 1). Calls whose category is ``unknown`` (a gap of
known size, unknown kind) vote only when no call names a category: they say nothing about which one it is, so a
teacher's weight weighs only its calls that name one (a ``weight`` on a ratings teacher that names no category for
any pair is refused before a run: :func:`perpair.annotate.runner.annotate`).
Pairs without a valid call get a null category (the plan treats them as unannotated) and the reasons of
their calls.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from perpair.annotate.cache import CallRecord
from perpair.annotate.schema import CATEGORIES, UNKNOWN

_RANK = {category: i for i, category in enumerate((*CATEGORIES, UNKNOWN))}  # tie-break: most objective first

AGGREGATE_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("category", pa.string()),
    pa.field("magnitude", pa.float64()),
    pa.field("confidence", pa.float64()),
    pa.field("agreement", pa.float64()),
    pa.field("n_calls", pa.int64()),
    pa.field("n_valid", pa.int64()),
    pa.field("rationale", pa.string()),
    pa.field("reason", pa.string()),
])


def aggregate_pair(pair_id: str, records: list[CallRecord], weights: dict[str, float]) -> dict:
    valid = [r for r in records if r.status == "ok" and r.category is not None]
    row = {"pair_id": pair_id, "category": None, "magnitude": None, "confidence": None, "agreement": None,
           "n_calls": len(records), "n_valid": len(valid), "rationale": None, "reason": None}
    if not valid:
        reasons = sorted({r.reason for r in records if r.reason}) or ["no teacher call"]
        row["reason"] = "; ".join(reasons)
        return row
    valid = [r for r in valid if r.category != UNKNOWN] or valid
    vote_weight = [weights.get(r.teacher, 1.0) * (r.confidence or 0.0) for r in valid]
    if sum(vote_weight) == 0:  # every call had confidence 0: count them equally rather than divide by 0
        vote_weight = [weights.get(r.teacher, 1.0) for r in valid]
    votes: dict[str, float] = {}
    for record, weight in zip(valid, vote_weight, strict=True):
        votes[record.category] = votes.get(record.category, 0.0) + weight
    winner = min(votes, key=lambda c: (-votes[c], _RANK[c]))
    total = sum(vote_weight)
    teacher_weight = [weights.get(r.teacher, 1.0) for r in valid]
    row.update(
        category=winner,
        magnitude=_mean([r.magnitude for r in valid], vote_weight),
        confidence=_mean([r.confidence or 0.0 for r in valid], teacher_weight),
        agreement=min(votes[winner] / total, 1.0),
    )
    # The rationale of the strongest vote for the winner (first in teacher/template order on a tie).
    backing = [(w, i) for i, (w, r) in enumerate(zip(vote_weight, valid, strict=True)) if r.category == winner]
    row["rationale"] = valid[max(backing, key=lambda item: (item[0], -item[1]))[1]].rationale
    return row


def _mean(values: list[float], weights: list[float]) -> float:
    """The weighted mean, kept within its values' range: rounding alone can take (0.844422 * 3) / 0.844422 to
    3.0000000000000004, outside the schema's [0, 3]."""
    mean = sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)
    return min(max(mean, min(values)), max(values))


def aggregate(pair_ids: Iterable[str], records: Iterable[CallRecord], weights: dict[str, float]) -> pa.Table:
    """The aggregated per-pair table, one row per pair id (in the order given)."""
    by_pair: dict[str, list[CallRecord]] = {}
    for record in records:
        by_pair.setdefault(record.pair_id, []).append(record)
    rows = [aggregate_pair(pid, by_pair.get(pid, []), weights) for pid in pair_ids]
    return pa.Table.from_pylist(rows, schema=AGGREGATE_SCHEMA)
