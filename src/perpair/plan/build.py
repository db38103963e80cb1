"""Build, write and load a plan: per pair a β, a route and a position in the curriculum.

I/O stays here at the edges (reading pairs and annotations, hashing, writing the artifact); the maths is
in :mod:`perpair.plan.beta`, :mod:`perpair.plan.difficulty` and :mod:`perpair.plan.curriculum`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from perpair import __version__
from perpair.annotate.schema import align_to_pairs, read_annotations
from perpair.artifacts import cast_column, file_sha256, read_artifact, write_artifact
from perpair.data import schema as pairs_schema
from perpair.errors import ArtifactMismatch, InputError
from perpair.plan import beta as beta_math
from perpair.plan import curriculum, difficulty
from perpair.plan.config import CurriculumConfig, Schedule

KIND = "plan"
SCHEMA_VERSION = 1
ROUTES = ("preference", "sft", "drop")

ARROW_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("beta", pa.float64()),  # null for dropped pairs
    pa.field("route", pa.string(), nullable=False),  # preference | sft | drop
    pa.field("order", pa.int64()),  # 0-based position in training; null for dropped pairs
    pa.field("difficulty", pa.float64()),  # the margin used (large = easy); null without one
    pa.field("label_smoothing", pa.float64(), nullable=False),  # cDPO ε; 0 off the preference route
    pa.field("flipped", pa.bool_(), nullable=False),  # chosen and rejected swapped (mislabeled → flip)
    pa.field("category", pa.string()),  # the annotation the β came from; null when unannotated
    pa.field("magnitude", pa.float64()),
    pa.field("confidence", pa.float64()),
    pa.field("signal", pa.float64()),  # s as used for β (0 for mislabeled → beta_max)
])


@dataclass(frozen=True)
class PlanTrace:
    """Intermediate per-pair values (row order of the pairs file) that ``explain`` and the report show."""

    pair_ids: np.ndarray
    score_chosen: np.ndarray
    score_rejected: np.ndarray
    reference: dict[str, np.ndarray] | None  # chosen/rejected logps and tokens, NaN where missing
    prior: np.ndarray
    gain: np.ndarray
    raw_beta: np.ndarray  # β_max^(1−s)·β_min^s before normalisation; NaN where not used
    factor: float | None  # normalisation factor c
    geometric_mean_raw: float | None
    normalised_pairs: int
    donor: np.ndarray  # random control: the row whose β this row received; -1 otherwise
    mislabeled_acted: np.ndarray
    below_tau: np.ndarray
    lowest_quantile: np.ndarray
    bucket: np.ndarray
    trained: int  # pairs with an order


@dataclass(frozen=True)
class PlanResult:
    table: pa.Table  # columns of ARROW_SCHEMA, one row per pair in pairs-file order
    provenance: dict[str, Any]
    schedule: Schedule
    trace: PlanTrace

    def row_of(self, pair_id: str) -> int:
        rows = np.flatnonzero(self.trace.pair_ids == pair_id)
        if len(rows) == 0:
            raise InputError(f"pair {pair_id!r} is not in this plan", field="pair_id")
        return int(rows[0])


def build_plan(pairs_path: str | os.PathLike, annotations_path: str | os.PathLike | None,
               schedule: Schedule, *, preset: str | None = None,
               reference_logps: pa.Table | None = None) -> PlanResult:
    """Plan every pair of ``pairs_path`` under ``schedule``.

    ``annotations_path`` must have been made from this very pairs file (its recorded ``pairs_sha256``);
    ``reference_logps`` (a table in :data:`perpair.plan.difficulty.REFERENCE_LOGPS_SCHEMA`) is needed only
    for ``margin.source: reference``.
    """
    pairs_file = str(pairs_path)
    pairs_sha = file_sha256(pairs_path)
    pairs, _ = read_artifact(pairs_path, kind=pairs_schema.KIND, schema_version=pairs_schema.SCHEMA_VERSION)
    ids_array = pairs.column("pair_id").combine_chunks().cast(pa.string())
    pair_ids = np.asarray(ids_array.to_numpy(zero_copy_only=False), dtype=str)
    n = len(pair_ids)
    _check_unique(pair_ids, pairs_file)
    rank = curriculum.id_rank(pair_ids)
    score_chosen = _floats(pairs.column("score_chosen"))
    score_rejected = _floats(pairs.column("score_rejected"))

    # --- annotations, aligned to the pairs -------------------------------------------------------
    beta_cfg = schedule.beta
    annotations_sha = None
    ann_provenance: dict[str, Any] = {}
    no_row = np.zeros(n, dtype=bool)  # pairs the annotations file has no row for
    category = np.full(n, None, dtype=object)
    magnitude = np.full(n, np.nan)
    confidence = np.full(n, np.nan)
    if annotations_path is not None:
        annotations, ann_provenance = read_annotations(annotations_path)
        annotations_sha = file_sha256(annotations_path)
        index = align_to_pairs(annotations_path, annotations, ann_provenance, pairs_file, pairs_sha, ids_array)
        no_row = np.asarray(index.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        taken = annotations.select(["category", "magnitude", "confidence"]).take(index)
        category = taken.column("category").to_numpy(zero_copy_only=False).astype(object)
        magnitude = _floats(taken.column("magnitude"))
        confidence = _floats(taken.column("confidence"))
    annotated = np.array([c is not None for c in category], dtype=bool)
    magnitude = np.where(annotated, magnitude, np.nan)
    confidence = np.where(annotated, confidence, np.nan)
    if beta_cfg.kind != "global" and annotations_path is None:
        raise InputError(f"beta.kind {beta_cfg.kind!r} derives β from annotations: pass --annotations",
                         field="beta.kind")
    if annotations_path is None and (given := sorted(schedule.mislabeled.model_fields_set)):
        # without annotations no pair is called mislabeled: the setting would change nothing
        raise InputError(f"mislabeled.{given[0]} acts on the pairs the annotations call mislabeled, and there are "
                         "no annotations: pass --annotations, or drop it", field=f"mislabeled.{given[0]}")

    # --- mislabeled pairs ------------------------------------------------------------------------
    mislabeled = annotated & (category == "mislabeled")
    acted = mislabeled & (confidence > schedule.mislabeled.threshold)
    action = schedule.mislabeled.action
    dropped = acted & (action == "drop")
    flipped = acted & (action == "flip")
    forced_max = acted & (action == "beta_max") & (beta_cfg.kind != "global")  # one global β: no β to move

    # --- signal ----------------------------------------------------------------------------------
    priors = beta_cfg.priors.model_dump()
    prior = np.array([np.nan if c is None else priors[c] for c in category], dtype=np.float64)
    gain = beta_math.magnitude_gain(magnitude, beta_cfg.magnitude_gain)
    signal = beta_math.signal_strength(prior, gain, confidence)
    moved = forced_max & (signal != 0)  # (a mislabeled pair's prior is 0 by default: its signal is 0, β_max already)
    signal[forced_max] = 0.0  # β_max before normalisation: as near the reference as the schedule goes

    # --- difficulty margin -----------------------------------------------------------------------
    reference = None
    source = schedule.margin.source
    if source == "ratings":
        margin = difficulty.ratings_margin(score_chosen, score_rejected)
    elif source == "teacher":
        if annotations_path is None:
            raise InputError("margin.source 'teacher' reads the annotations: pass --annotations",
                             field="margin.source")
        margin = difficulty.teacher_margin(magnitude, confidence, mislabeled,
                                           annotated & (category == "no_clear_gap"))
    elif source == "reference":
        if reference_logps is None:
            raise InputError("margin.source 'reference' needs the reference model's log-probs: pass "
                             "--reference-logps with the train stage's reference cache (a file, or the folder "
                             "$PERPAIR_CACHE/reference)", field="margin.source")
        margin = difficulty.reference_margin_for(ids_array, reference_logps)
        reference = _reference_arrays(ids_array, reference_logps)
    else:
        margin = np.full(n, np.nan)
    margin = np.where(flipped, -margin, margin)  # the margin of the pair as it will be trained
    if source != "none" and n and np.isnan(margin).all():
        raise InputError(f"margin.source {source!r} gives no pair a margin"
                         + (" (no pair has both score_chosen and score_rejected)" if source == "ratings"
                            else ""), file=pairs_file, field="margin.source")

    # --- routes ----------------------------------------------------------------------------------
    route = np.full(n, "preference", dtype=object)
    route[dropped] = "drop"
    below_tau, lowest = curriculum.route_mask(margin, ~dropped, rank, schedule.routing.tau,
                                              schedule.routing.quantile)
    route[below_tau | lowest] = schedule.routing.action
    if n and not np.any(route == "preference"):
        raise InputError(_no_preference_pair(schedule, margin, route, below_tau, lowest, dropped),
                         file=pairs_file, field="routing")

    # --- β ---------------------------------------------------------------------------------------
    beta = np.full(n, beta_cfg.beta)
    raw = np.full(n, np.nan)
    donor = np.full(n, -1, dtype=np.int64)
    factor = geo = None
    basis = np.zeros(n, dtype=bool)
    if beta_cfg.kind != "global":
        have = annotated & (route != "drop")
        raw[have] = beta_math.interpolate_beta(signal[have], beta_cfg.beta_min, beta_cfg.beta_max)
        beta[have] = raw[have]
        # Normalise over the pairs whose β acts (preference route), so the known-good global β is their
        # geometric mean; unannotated pairs already sit at the global β.
        basis = have & (route == "preference")
        if beta_cfg.normalise and basis.any():
            geo = beta_math.geometric_mean(raw[basis])
            factor = beta_cfg.beta / geo
            beta[have] = factor * raw[have]
        if beta_cfg.kind == "random":
            rows = np.flatnonzero(basis)
            rows = rows[np.argsort(rank[rows], kind="stable")]
            donor[rows] = rows[beta_math.random_assignment(len(rows), schedule.seed)]
            beta[rows] = beta[donor[rows]]
    beta[route == "drop"] = np.nan

    label_smoothing = np.where(route == "preference", schedule.label_smoothing, 0.0)
    unannotated = _unannotated_warning(schedule, route, annotated, no_row, ann_provenance, str(annotations_path))
    trained = route == "preference"
    if same := _one_beta(beta_cfg.kind, beta[trained], category, annotated, unannotated):
        # the annotations' fault, or the schedule's: annotations that differ, each given the same signal
        told = np.unique(np.stack([magnitude, confidence], 1)[trained & annotated], axis=0)
        flat = len(np.unique(category[trained & annotated].astype(str))) > 1 or len(told) > 1
        if flat:
            same = (f"a per-pair β that gives every preference pair β = {beta[trained][0]:.4g}: the annotations "
                    f"differ, but the schedule gives each the signal s = {signal[trained & annotated][0]:.4g} "
                    "(beta.priors × beta.magnitude_gain × confidence), so the plan would be plain DPO with one β; "
                    "give the categories the annotations hold a prior above 0 (beta.priors), or, for one β, use "
                    "preset dpo")
        raise InputError(same, file=None if flat else str(annotations_path) if annotations_path else pairs_file,
                         field="beta")
    warnings = [*unannotated, *_no_ratings_warning(schedule, margin, route),
                *_routing_warnings(schedule, margin, below_tau, lowest, dropped, flipped)]

    # --- curriculum ------------------------------------------------------------------------------
    sequence, bucket = curriculum.curriculum_sequence(
        schedule.curriculum.kind, route != "drop", margin, rank, schedule.curriculum.buckets, schedule.seed)
    order = curriculum.positions(sequence, n)

    warnings += _curriculum_warning(schedule.curriculum, margin[sequence])

    table = pa.table({
        "pair_id": ids_array,
        "beta": _nullable(beta),
        "route": pa.array(route.tolist(), pa.string()),
        "order": pa.array(order, pa.int64(), mask=order < 0),
        "difficulty": _nullable(margin),
        "label_smoothing": pa.array(label_smoothing, pa.float64()),
        "flipped": pa.array(flipped, pa.bool_()),
        "category": pa.array(category.tolist(), pa.string()),
        "magnitude": _nullable(magnitude),
        "confidence": _nullable(confidence),
        "signal": _nullable(signal),
    }, schema=ARROW_SCHEMA)

    counts = {
        "pairs": n,
        "routes": {name: int(np.sum(route == name)) for name in ROUTES},
        "annotated": int(annotated.sum()),
        "unannotated": int(n - annotated.sum()),
        "mislabeled": {"total": int(mislabeled.sum()), "above_threshold": int(acted.sum()), "action": action,
                       "dropped": int(dropped.sum()), "flipped": int(flipped.sum()),
                       "beta_max": int(forced_max.sum()), "beta_max_moved": int(moved.sum())},
        "no_margin": int(np.sum(np.isnan(margin) & (route != "drop"))) if source != "none" else None,
        "routed_by": {"tau": int(below_tau.sum()), "quantile": int(lowest.sum())},
    }
    provenance = {
        "pairs_sha256": pairs_sha,
        "annotations_sha256": annotations_sha,
        "reference_logps_sha256": None if reference_logps is None else _table_sha256(reference_logps),
        "preset": preset,
        "schedule": schedule.as_dict(),
        "schedule_sha256": schedule.sha256(),
        "counts": counts,
        "normalisation": None if factor is None else {
            "factor": factor, "geometric_mean_before": geo, "pairs": int(basis.sum())},
        "perpair_version": __version__,
        "warnings": warnings,
    }
    trace = PlanTrace(
        pair_ids=pair_ids, score_chosen=score_chosen, score_rejected=score_rejected, reference=reference,
        prior=prior, gain=gain, raw_beta=raw, factor=factor, geometric_mean_raw=geo,
        normalised_pairs=int(basis.sum()), donor=donor, mislabeled_acted=acted, below_tau=below_tau,
        lowest_quantile=lowest, bucket=bucket, trained=len(sequence))
    result = PlanResult(table=table, provenance=provenance, schedule=schedule, trace=trace)
    if schedule.beta_given_in is not None and (idle := idle_global_beta(result)):  # as --beta: refused, not ignored
        raise InputError(f"beta.beta {beta_cfg.beta:g} would change nothing: {idle}; drop it, or set "
                         "beta.normalise: true to rescale them to it", file=schedule.beta_given_in or None,
                         field="beta.beta")
    return result


def idle_global_beta(result: PlanResult) -> str | None:
    """Why the schedule's global β changes nothing in this plan, or None. A per-pair schedule without
    normalisation gives it only to the preference pairs it finds unannotated: with none, a global β the user set
    (``perpair plan --beta``, a run arm's ``beta``) would be ignored, and is refused instead."""
    cfg = result.schedule.beta
    if cfg.kind == "global" or cfg.normalise:
        return None
    routes = np.array(result.table.column("route").to_pylist(), dtype=object)
    annotated = np.array([c is not None for c in result.table.column("category").to_pylist()], dtype=bool)
    if np.any((routes == "preference") & ~annotated):
        return None
    return (f"beta.normalise is off, so every preference pair takes its β from its annotation (between "
            f"beta.beta_min {cfg.beta_min:g} and beta.beta_max {cfg.beta_max:g})")


def write_plan(result: PlanResult, path: str | os.PathLike) -> None:
    """Write the plan artifact (deterministic bytes for identical inputs and schedule)."""
    write_artifact(path, result.table, kind=KIND, schema_version=SCHEMA_VERSION,
                   provenance=result.provenance)


def load_plan(plan_path: str | os.PathLike, pairs_path: str | os.PathLike,
              annotations_path: str | os.PathLike | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Read a plan for ``pairs_path``; refuses a plan built from another pairs (or annotations) file."""
    table, provenance = read_artifact(plan_path, kind=KIND, schema_version=SCHEMA_VERSION)
    pairs_sha = file_sha256(pairs_path)
    if provenance.get("pairs_sha256") != pairs_sha:
        raise ArtifactMismatch(f"plan {plan_path} was built from another pairs file "
                               f"(pairs_sha256 {str(provenance.get('pairs_sha256'))[:12]}…), "
                               f"not {pairs_path} ({pairs_sha[:12]}…); re-plan this pairs file")
    if annotations_path is not None:
        annotations_sha = file_sha256(annotations_path)
        if provenance.get("annotations_sha256") != annotations_sha:
            raise ArtifactMismatch(f"plan {plan_path} was not built from annotations {annotations_path}")
    missing = [name for name in ARROW_SCHEMA.names if name not in table.column_names]
    if missing:
        raise InputError(f"plan lacks column(s) {', '.join(missing)}", file=str(plan_path))
    # a plan edited with other types is read as its values say, or refused: flipped 'no' read as true flipped every
    # pair, silently, and order as text ended in numpy's traceback
    for field in ARROW_SCHEMA:
        table = cast_column(table, field, file=str(plan_path), expected=f"a plan's is {field.type}")
        if not field.nullable and table.column(field.name).null_count:
            raise InputError("column holds nulls; every pair has one", file=str(plan_path), field=field.name)
    if not isinstance(provenance.get("schedule", {}), dict):
        raise InputError("its provenance's schedule is not a mapping", file=str(plan_path))
    return table, provenance


def _one_beta(kind: str, trained: np.ndarray, category: np.ndarray, annotated: np.ndarray,
              unannotated: list[str]) -> str | None:
    """Why a per-pair β schedule that gave every preference pair the same β is refused (None where it did not): the
    plan would be plain DPO under a per-pair method's name, and an arm trained on it a copy of the DPO arm, read
    in a comparison as the method's result."""
    if kind == "global" or len(trained) < 2 or np.ptp(trained) > 1e-9 * np.max(trained):
        return None
    names, counts = np.unique(category[annotated].astype(str), return_counts=True)
    seen = ", ".join(f"{name} {count}" for name, count in zip(names, counts, strict=True)) or "none"
    if not annotated.any() and unannotated:  # (the warning that says why: calls failed, --limit, a shard)
        return (f"a per-pair β that gives every preference pair β = {trained[0]:.4g}: no pair has a valid annotation, "
                f"so the plan would be plain DPO with one β; {unannotated[0]}")
    return (f"a per-pair β that gives every preference pair β = {trained[0]:.4g}: the annotations tell no pair from "
            f"another ({int(annotated.sum())} of {len(category)} pairs annotated; categories: {seen}), so the plan "
            "would be plain DPO with one β. Annotate with a teacher LLM (perpair annotate --teacher local:MODEL or "
            "api:BASE_URL/MODEL) or with ratings that have per-aspect scores; or, for one β, use preset dpo")


def _unannotated_warning(schedule: Schedule, route: np.ndarray, annotated: np.ndarray, no_row: np.ndarray,
                         provenance: dict[str, Any], annotations: str) -> list[str]:
    """Pairs on the preference route that a schedule reading the annotations finds unannotated: they fall back
    to the global β (with margin.source teacher, to no margin; with mislabeled.action drop or flip, to being kept as
    labelled), which the summary's count alone does not say."""
    action = schedule.mislabeled.action
    reads = [what for what, used in (
        (f"the global β {schedule.beta.beta:g} instead of a per-pair β", schedule.beta.kind != "global"),
        ("no difficulty margin (never routed; last in the curriculum)", schedule.margin.source == "teacher"),
        (f"no check for a mislabeled pair (mislabeled.action {action}: kept as labelled)",
         action in ("drop", "flip")))
        if used]
    missing = (route == "preference") & ~annotated
    if not reads or not missing.any():
        return []
    absent, failed = int(np.sum(missing & no_row)), int(np.sum(missing & ~no_row))
    why = []
    if absent:
        made = [option for option, value in (("--limit", provenance.get("limit")),
                                             ("--shard", provenance.get("shard"))) if value]
        how = " and ".join(f"{option} {provenance[option[2:]]}" for option in made)
        why.append(f"{absent:,} have no row in {annotations}" + (f" (annotated with {how}" if made else "")
                   + ("; join the shards with perpair annotate merge" if "--shard" in made else "")
                   + (")" if made else ""))
    if failed:
        why.append(f"{failed:,} got no valid annotation (its reason column says why; perpair annotate "
                   "--retry-failed asks failed calls again)")
    return [f"{int(missing.sum()):,} of the {int(np.sum(route == 'preference')):,} preference pairs are unannotated "
            f"and get {' and '.join(reads)}: {'; '.join(why)}"]


def _no_ratings_warning(schedule: Schedule, margin: np.ndarray, route: np.ndarray) -> list[str]:
    """Trained pairs without a ratings margin (a score missing: a pairs file that mixes scored and unscored data)
    escape routing and come last in a curriculum by margin, which the summary's count alone does not say. (The
    teacher's are :func:`_unannotated_warning`'s; a reference cache that lacks pairs is refused.)"""
    if schedule.margin.source != "ratings":
        return []
    missing = (route != "drop") & np.isnan(margin)
    routed = schedule.routing.tau is not None or schedule.routing.quantile is not None
    ordered = schedule.curriculum.kind in ("easy_to_hard", "hard_to_easy", "bucketed")
    if not missing.any() or not (routed or ordered):
        return []
    what = [part for part, read in (("never routed", routed), ("last in the curriculum, by pair id", ordered))
            if read]
    return [f"{int(missing.sum()):,} of the {int(np.sum(route != 'drop')):,} trained pairs have no ratings margin "
            f"(score_chosen or score_rejected missing: data without ratings) and are {' and '.join(what)}; "
            "plan the scored pairs alone, or set margin.source teacher (with --annotations) to give every pair one"]


def _routing_warnings(schedule: Schedule, margin: np.ndarray, below_tau: np.ndarray, lowest: np.ndarray,
                      dropped: np.ndarray, flipped: np.ndarray) -> list[str]:
    """A routing rule that routes no pair changes nothing in the plan: say so, with the margins it met."""
    routing = schedule.routing
    eligible = ~dropped & ~np.isnan(margin)
    if not eligible.any():
        return []
    smallest = float(np.min(margin[eligible]))
    warnings = []
    if routing.tau is not None and not below_tau.any():
        warnings.append(f"routing.tau {routing.tau:g} routes no pair to {routing.action}: every margin is at least "
                        f"{routing.tau:g} (the smallest is {smallest:g}), so the plan is the same without it")
    if routing.quantile is not None and not lowest.any():
        warnings.append(f"routing.quantile {routing.quantile:g} routes no pair to {routing.action}: "
                        f"{routing.quantile:g} of the {int(eligible.sum()):,} pairs with a margin is less than one")
    # MixDPO routes the ties (its data has no negative margin); a pair whose ratings or teacher say the rejected
    # response is the better one would be trained to imitate the chosen one. (A negative reference margin is a
    # pair the model gets wrong, not a label in doubt.)
    reversed_ = (below_tau | lowest) & (margin < 0)
    source = schedule.margin.source
    if routing.action == "sft" and source in ("ratings", "teacher") and reversed_.any():
        better, fix = (("has the higher score", "check their labels, or set routing.action drop") if source == "ratings"
                       else ("is the better one by the teacher (mislabeled)",
                             "mislabeled.action flip or drop keeps them out of SFT"))
        if source == "ratings" and (turned := int((reversed_ & flipped).sum())):
            # flipped by the teacher against their ratings: the two disagree, and SFT imitates the response the
            # ratings call the worse one (the ratings margin of a flipped pair is negated: as trained)
            fix = (f"{turned:,} of them are pairs mislabeled.action flip swapped against their ratings (the teacher "
                   "and the ratings disagree); mislabeled.action drop leaves such pairs out, margin.source teacher "
                   "routes by the teacher, or routing.action drop leaves the routed pairs out")
        warnings.append(f"{int(reversed_.sum()):,} pairs routed to sft have a negative margin (the rejected response "
                        f"{better}): SFT trains the policy on their chosen response, which the margin calls the "
                        f"worse one; {fix}")
    return warnings


def _no_preference_pair(schedule: Schedule, margin: np.ndarray, route: np.ndarray, below_tau: np.ndarray,
                        lowest: np.ndarray, dropped: np.ndarray) -> str:
    """Why no pair is left on the preference route, for the refusal (a preference plan without preference pairs:
    its β and label smoothing would act on nothing)."""
    routing = schedule.routing
    why = []
    if below_tau.any():
        largest = float(np.nanmax(margin[~dropped])) if np.any(~dropped & ~np.isnan(margin)) else float("nan")
        why.append(f"routing.tau {routing.tau:g} routes {int(below_tau.sum()):,} pairs to {routing.action} "
                   f"(the largest margin is {largest:g})")
    if lowest.any():
        why.append(f"routing.quantile {routing.quantile:g} routes {int(lowest.sum()):,} pairs to {routing.action}")
    if dropped.any():
        why.append(f"{int(dropped.sum()):,} mislabeled pairs are dropped (mislabeled.action drop)")
    counts = ", ".join(f"{name} {int(np.sum(route == name)):,}" for name in ROUTES)
    return (f"no pair is left on the preference route ({counts}): {'; '.join(why)}. Lower routing.tau or "
            "routing.quantile (for SFT alone: perpair train --loss sft, without a plan)")


def _curriculum_warning(curriculum: CurriculumConfig, margins: np.ndarray) -> list[str]:
    """A curriculum by margin over pairs whose margins are all equal orders them by pair id only; buckets as many
    as the pairs hold one pair each, an easy_to_hard order that no seed shuffles."""
    kind = curriculum.kind
    if kind not in ("easy_to_hard", "hard_to_easy", "bucketed"):
        return []
    known = margins[~np.isnan(margins)]
    if len(known) >= 2 and np.ptp(known) == 0:
        return [f"curriculum.kind {kind} orders by margin, but every trained pair with a margin has the same one "
                f"({known[0]:g}): the order is by pair id" + (", shuffled within buckets" if kind == "bucketed" else "")
                + ", not from easy to hard"]
    if kind == "bucketed" and len(known) and curriculum.buckets >= len(known):
        return [f"curriculum.buckets {curriculum.buckets} is at least the {len(known):,} trained pairs with a margin: "
                "one pair a bucket, so the order is easy_to_hard's and the seed shuffles nothing; lower "
                "curriculum.buckets, or set curriculum.kind easy_to_hard"]
    return []


def _check_unique(pair_ids: np.ndarray, file: str) -> None:
    unique, first, counts = np.unique(pair_ids, return_index=True, return_counts=True)
    if len(unique) != len(pair_ids):
        duplicate = unique[np.argmax(counts > 1)]
        rows = np.flatnonzero(pair_ids == duplicate)[:2] + 1
        raise InputError(f"pair {duplicate} appears twice (rows {rows[0]} and {rows[1]}); a plan needs "
                         "unique pair ids", file=file, field="pair_id")


def _floats(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Float64 numpy values with NaN for nulls."""
    return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def _nullable(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.float64(), mask=np.isnan(values))


def _reference_arrays(pair_ids: pa.Array, logps: pa.Table) -> dict[str, np.ndarray]:
    index = pc.index_in(pair_ids, value_set=logps.column("pair_id").combine_chunks())
    taken = logps.take(index)
    return {name: _floats(taken.column(name)) for name in difficulty.REFERENCE_LOGPS_SCHEMA.names[1:]}


def _table_sha256(table: pa.Table) -> str:
    digest = hashlib.sha256()
    for name in difficulty.REFERENCE_LOGPS_SCHEMA.names:
        column = table.column(name)
        digest.update(name.encode())
        if name == "pair_id":
            digest.update("\0".join(column.to_pylist()).encode())
        else:
            digest.update(_floats(column).tobytes())
    return digest.hexdigest()
