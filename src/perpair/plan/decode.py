"""A plan read back as the per-pair arrays a trainer needs, aligned to the rows of the pairs file.

:func:`plan_arrays` is the one reading of a plan file: ``perpair train`` takes its β, ε, routes and order from
it, and ``perpair run`` counts the pairs an epoch trains with it, so the two never disagree on which rows get
trained.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from perpair.artifacts import read_parquet
from perpair.errors import PerpairError


@dataclass
class PlanArrays:
    """Per row of the pairs file; rows the plan does not cover hold NaN / False / None."""

    beta: np.ndarray  # float, NaN where the plan has no β
    label_smoothing: np.ndarray  # float, cDPO ε (0 where the plan has none)
    sft: np.ndarray  # bool: the plan routes the pair to SFT (only the chosen response is trained)
    flipped: np.ndarray  # bool: the plan swapped chosen and rejected
    category: list[str | None]
    order: np.ndarray  # the trained rows (not dropped, with a position), in curriculum order
    curriculum: str  # the curriculum kind the plan was built with ("none": the order carries no meaning)


def plan_arrays(plan_path: str | os.PathLike, pairs_path: str | os.PathLike,
                pair_ids: list[str] | None = None) -> PlanArrays:
    """Load the plan at ``plan_path`` (refused unless built from ``pairs_path``) and decode it against the pairs
    file's rows (``pair_ids`` when the caller has them already, else read from ``pairs_path``)."""
    from perpair.plan.build import load_plan  # verifies that the plan was built from this very pairs file

    plan, provenance = load_plan(plan_path, pairs_path)
    if pair_ids is None:
        pair_ids = read_parquet(pairs_path, columns=["pair_id"]).column("pair_id").to_pylist()
    index = {pid: i for i, pid in enumerate(pair_ids)}
    rows = np.array([index[pid] for pid in plan.column("pair_id").to_pylist()], dtype=np.int64)
    n = len(pair_ids)
    beta, smoothing = np.full(n, np.nan), np.zeros(n)
    sft = np.zeros(n, dtype=bool)
    flipped = np.zeros(n, dtype=bool)
    category: list[str | None] = [None] * n
    routes = np.array(plan.column("route").to_pylist(), dtype=object)
    beta[rows] = np.array(plan.column("beta").to_pylist(), dtype=float)
    smoothing[rows] = np.array(plan.column("label_smoothing").to_pylist(), dtype=float)
    sft[rows] = routes == "sft"
    flipped[rows] = np.array(plan.column("flipped").to_pylist(), dtype=bool)
    for row, cat in zip(rows, plan.column("category").to_pylist(), strict=True):
        category[row] = cat
    positions = np.array([-1 if o is None else o for o in plan.column("order").to_pylist()])
    trained = (positions >= 0) & (routes != "drop")
    order = rows[trained][np.argsort(positions[trained], kind="stable")]
    if len(order) == 0:
        raise PerpairError(f"plan {plan_path}: no pair is trained (all dropped)")
    curriculum = (provenance.get("schedule") or {}).get("curriculum", {}).get("kind", "none")
    return PlanArrays(beta, smoothing, sft, flipped, category, order, curriculum)
