"""The benchmark's arms as plan schedules, planned by the product's own plan stage.

Each arm is a preset of :data:`perpair.plan.config.PRESETS` with overrides; its per-pair β, route, ε, order
and flips come from :func:`perpair.plan.build_plan` run on a pairs and an annotations artifact written for
the controlled pairs, so the benchmark trains exactly what ``perpair plan`` would hand to ``perpair train``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from perpair.annotate import schema as ann_schema
from perpair.artifacts import file_sha256, write_artifact
from perpair.bench import task
from perpair.data.schema import SCHEMA_VERSION, PairRecord, records_to_table
from perpair.plan import build_plan
from perpair.plan.config import PRESETS, Schedule, deep_merge
from perpair.train.losses import ROUTE_PREFERENCE, ROUTE_SFT


@dataclass(frozen=True)
class Arm:
    name: str
    preset: str
    overrides: dict[str, Any]
    swept: bool = False  # one of the global-β sweep's runs


def arms(sweep: tuple[float, ...], beta: float) -> list[Arm]:
    """The global-β sweep, then SP²DPO, its random-β control, MixDPO's parts and SP²DPO + MixDPO.

    Every non-swept arm uses the same global β (``beta``), so arms differ only in their per-pair decisions;
    the MixDPO arms keep the preset's cDPO ε = 0.1 and τ = 0.5 but not its β = 0.01, which was tuned for
    7–8B models at lr 1e-6 (ours).
    """
    out = [Arm(f"DPO β={b:g}", "dpo", {"beta": {"beta": b}}, swept=True) for b in sweep]
    g = {"beta": {"beta": beta}}
    out += [
        Arm("SP²DPO", "sp2dpo", g),
        Arm("random β", "sp2dpo-random", g),
        Arm("MixDPO curriculum", "mixdpo", deep_merge(g, {"routing": {"tau": None}})),
        Arm("MixDPO routing", "mixdpo", deep_merge(g, {"curriculum": {"kind": "none"}})),
        Arm("MixDPO", "mixdpo", g),
        Arm("SP²DPO+MixDPO", "sp2dpo+mixdpo", g),
    ]
    return out


def sp2dpo_at(beta: float) -> Arm:
    """SP²DPO with its β_i normalised to the global-β sweep's chosen β (does per-pair β add to a tuned β?)."""
    return Arm("SP²DPO @ best β", "sp2dpo", {"beta": {"beta": beta}})


def schedule_of(arm: Arm, seed: int) -> Schedule:
    return Schedule.model_validate(deep_merge(deep_merge(PRESETS[arm.preset], arm.overrides), {"seed": seed}))


@dataclass(frozen=True)
class PlannedArm:
    """Per-pair training inputs in the pairs' row order, and the training order."""

    beta: np.ndarray
    label_smoothing: np.ndarray
    route: np.ndarray  # ROUTE_PREFERENCE / ROUTE_SFT (dropped pairs never appear in ``order``)
    flipped: np.ndarray
    order: np.ndarray  # row indices in training order
    provenance: dict[str, Any]


def write_inputs(directory: Path, pairs: task.PairSet, annotations: task.Annotations) -> tuple[Path, Path]:
    """A pairs artifact and an annotations artifact for the controlled pairs (a system message numbers each
    pair, so pairs with the same content keep distinct ids)."""
    records = [
        PairRecord(prompt=[{"role": "system", "content": f"controlled pair {i}"},
                           {"role": "user", "content": task.text(pairs.prompt[i])}],
                   chosen=[{"role": "assistant", "content": task.text(pairs.chosen[i][task.PROMPT_LEN:])}],
                   rejected=[{"role": "assistant", "content": task.text(pairs.rejected[i][task.PROMPT_LEN:])}],
                   source="bench-controlled", source_row=i, meta=json.dumps({"category": str(pairs.category[i])}),
                   score_chosen=float(pairs.score_chosen[i]), score_rejected=float(pairs.score_rejected[i]))
        for i in range(len(pairs))
    ]
    pairs_path, annotations_path = directory / "pairs.parquet", directory / "annotations.parquet"
    write_artifact(pairs_path, records_to_table(records), kind="pairs", schema_version=SCHEMA_VERSION,
                   provenance={"source": "perpair bench controlled"})
    table = pa.table({"pair_id": [r.pair_id for r in records], "category": annotations.category,
                      "magnitude": annotations.magnitude.tolist(), "confidence": annotations.confidence.tolist()},
                     schema=ann_schema.ARROW_SCHEMA)
    write_artifact(annotations_path, table, kind=ann_schema.KIND, schema_version=ann_schema.SCHEMA_VERSION,
                   provenance={"pairs_sha256": file_sha256(pairs_path), "teacher": "simulated"})
    return pairs_path, annotations_path


def plan_arm(arm: Arm, seed: int, pairs_path: Path, annotations_path: Path) -> PlannedArm:
    """β_i, ε_i, routes, flips and order for one arm, from the product's plan stage."""
    result = build_plan(pairs_path, annotations_path, schedule_of(arm, seed), preset=arm.preset)
    table = result.table
    routes = np.array(table.column("route").to_pylist(), dtype=object)
    order = np.array([-1 if o is None else o for o in table.column("order").to_pylist()])
    trained = (order >= 0) & (routes != "drop")
    rows = np.flatnonzero(trained)
    return PlannedArm(
        beta=np.nan_to_num(np.array(table.column("beta").to_pylist(), dtype=float), nan=1.0),
        label_smoothing=np.array(table.column("label_smoothing").to_pylist(), dtype=float),
        route=np.where(routes == "sft", ROUTE_SFT, ROUTE_PREFERENCE),
        flipped=np.array(table.column("flipped").to_pylist(), dtype=bool),
        order=rows[np.argsort(order[rows], kind="stable")],
        provenance=result.provenance)
