"""Difficulty margins: how clearly the chosen response beats the rejected one (large = easy).

Three sources, each a pure function of per-pair arrays (NaN where a pair has no margin):

- ``ratings``: ``score_chosen − score_rejected`` — MixDPO's difficulty (UltraFeedback's GPT-4 overall
  scores, 1–10).
- ``teacher``: ``magnitude × confidence`` of the semantic-gap annotation, negative when the teacher says
  the pair is mislabeled, 0 when it says ``no_clear_gap`` (a tie has no margin, whatever magnitude came with
  it) (ours).
- ``reference``: the reference model's length-normalised log-prob margin,
  ``logp(chosen)/tokens(chosen) − logp(rejected)/tokens(rejected)`` (ours; the sequence-level
  implicit reward of the reference, read from the train stage's reference log-prob cache).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from perpair.errors import InputError

# The table the reference margin reads: summed log-probs of each response under the reference model
# (prompt masked) and the number of response tokens they sum over.
REFERENCE_LOGPS_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("chosen_logps", pa.float64(), nullable=False),
    pa.field("chosen_tokens", pa.int64(), nullable=False),
    pa.field("rejected_logps", pa.float64(), nullable=False),
    pa.field("rejected_tokens", pa.int64(), nullable=False),
])


def logps_table(pair_ids, chosen_logps, chosen_tokens, rejected_logps, rejected_tokens) -> pa.Table:
    """A table in :data:`REFERENCE_LOGPS_SCHEMA` from per-pair sequences (the train stage writes its reference
    cache and ``sequence_logps`` results with it)."""
    return pa.table({
        "pair_id": pa.array(pair_ids, pa.string()),
        "chosen_logps": pa.array(chosen_logps, pa.float64()),
        "chosen_tokens": pa.array(chosen_tokens, pa.int64()),
        "rejected_logps": pa.array(rejected_logps, pa.float64()),
        "rejected_tokens": pa.array(rejected_tokens, pa.int64()),
    }, schema=REFERENCE_LOGPS_SCHEMA)


def ratings_margin(score_chosen: np.ndarray, score_rejected: np.ndarray) -> np.ndarray:
    """MixDPO's difficulty: the rating margin; NaN where either score is missing."""
    return np.asarray(score_chosen, dtype=np.float64) - np.asarray(score_rejected, dtype=np.float64)


def teacher_margin(magnitude: np.ndarray, confidence: np.ndarray, mislabeled: np.ndarray,
                   tie: np.ndarray | None = None) -> np.ndarray:
    """magnitude × confidence, signed: negative where the teacher says the rejected response is better; 0 where
    it says neither is (``tie``: category ``no_clear_gap``): an API teacher's "tie" comes with the magnitude it
    gave (up to 3), which made a tie the easiest pair of the curriculum and kept it from τ's SFT route."""
    margin = np.asarray(magnitude, dtype=np.float64) * np.asarray(confidence, dtype=np.float64)
    margin = np.where(np.asarray(mislabeled, dtype=bool), -margin, margin)
    if tie is not None:
        margin = np.where(np.asarray(tie, dtype=bool) & ~np.isnan(margin), 0.0, margin)
    return margin


def reference_margin(chosen_logps: np.ndarray, chosen_tokens: np.ndarray, rejected_logps: np.ndarray,
                     rejected_tokens: np.ndarray) -> np.ndarray:
    """Length-normalised reference log-prob margin per pair.

    Normalising by length keeps long responses, whose summed log-prob is large and negative whatever
    their quality, from looking hard by length alone.
    """
    arrays = [np.asarray(a, dtype=np.float64)
              for a in (chosen_logps, chosen_tokens, rejected_logps, rejected_tokens)]
    if len({a.shape for a in arrays}) != 1:
        raise InputError("reference log-prob arrays have different lengths: "
                         f"{', '.join(str(a.shape) for a in arrays)}")
    chosen_lp, chosen_n, rejected_lp, rejected_n = arrays
    if np.any(chosen_n <= 0) or np.any(rejected_n <= 0):
        raise InputError("every response needs at least one token to normalise its log-prob by",
                         field="chosen_tokens/rejected_tokens")
    return chosen_lp / chosen_n - rejected_lp / rejected_n


def reference_margin_for(pair_ids: pa.Array | list[str], logps: pa.Table) -> np.ndarray:
    """:func:`reference_margin` aligned to ``pair_ids`` from a table in :data:`REFERENCE_LOGPS_SCHEMA`;
    NaN for pairs the table does not cover."""
    for field in REFERENCE_LOGPS_SCHEMA:
        if field.name not in logps.column_names:
            raise InputError("reference log-prob table lacks a column", field=field.name)
    margins = reference_margin(*(logps.column(name).to_numpy(zero_copy_only=False)
                                 for name in REFERENCE_LOGPS_SCHEMA.names[1:]))
    index = pc.index_in(pa.array(pair_ids, pa.string()), value_set=logps.column("pair_id").combine_chunks())
    positions = index.fill_null(-1).to_numpy().astype(np.int64)
    found = positions >= 0
    out = np.full(len(positions), np.nan)
    out[found] = margins[positions[found]]
    return out
