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
from perpair.errors import InputError, PerpairError


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
    n = len(pair_ids)
    rows = _rows(plan, index, str(plan_path), str(pairs_path))
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
    trained = routes != "drop"
    _check_order(positions, trained, routes, str(plan_path))
    order = rows[trained][np.argsort(positions[trained], kind="stable")]
    if len(order) == 0:
        raise PerpairError(f"plan {plan_path}: no pair is trained (all dropped)")
    curriculum = (provenance.get("schedule") or {}).get("curriculum", {}).get("kind", "none")
    return PlanArrays(beta, smoothing, sft, flipped, category, order, curriculum)


ROUTES = ("preference", "sft", "drop")


def _rows(plan, index: dict[str, int], plan_file: str, pairs_file: str) -> np.ndarray:
    """The pairs file's row of each plan row. A plan has one row for every pair (route ``drop`` leaves a pair out),
    each with a route perpair knows: an edited plan that breaks this is refused, never trained in part."""
    rows = np.empty(plan.num_rows, dtype=np.int64)
    seen: dict[str, int] = {}
    for i, (pid, route) in enumerate(zip(plan.column("pair_id").to_pylist(), plan.column("route").to_pylist(),
                                         strict=True)):
        if route not in ROUTES:
            raise InputError(f"route {route!r}: expected one of {', '.join(ROUTES)}", file=plan_file, row=i + 1,
                             field="route")
        if pid not in index:
            raise InputError(f"pair {pid!r} is not in the pairs file {pairs_file}", file=plan_file, row=i + 1,
                             field="pair_id")
        if pid in seen:
            raise InputError(f"pair {pid!r} appears twice (rows {seen[pid]} and {i + 1}); a plan needs unique pair "
                             "ids", file=plan_file, row=i + 1, field="pair_id")
        seen[pid] = i + 1
        rows[i] = index[pid]
    if len(seen) < len(index):
        missing = next(pid for pid in index if pid not in seen)
        raise InputError(f"the plan covers {len(seen)} of the {len(index)} pairs of {pairs_file} (e.g. {missing!r} "
                         "has no row); a plan has a row for every pair, route 'drop' for those it leaves out",
                         file=plan_file)
    return rows


def _check_order(positions: np.ndarray, trained: np.ndarray, routes: np.ndarray, plan_file: str) -> None:
    """Every trained pair (route preference or sft) has its own position in the order."""
    for i in np.flatnonzero(trained & (positions < 0)):
        raise InputError(f"a pair routed to {routes[i]} has no order position (null or negative); give it one, or "
                         "route it to drop", file=plan_file, row=int(i) + 1, field="order")
    values, counts = np.unique(positions[trained], return_counts=True)
    if np.any(counts > 1):
        position = values[np.argmax(counts > 1)]
        twice = np.flatnonzero(trained & (positions == position))[:2] + 1
        raise InputError(f"order {position} is given to two trained pairs (rows {twice[0]} and {twice[1]}); the "
                         "order must be a sequence without ties", file=plan_file, field="order")
