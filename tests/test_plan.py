"""build_plan on small synthetic pairs and annotations: β schedule, controls, mislabeled actions, routing,
curricula, artifact hashes and refusals, schedule validation, and --explain's arithmetic."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from perpair.annotate.schema import ARROW_SCHEMA as ANNOTATIONS_SCHEMA
from perpair.annotate.schema import read_annotations
from perpair.artifacts import file_sha256, write_artifact
from perpair.data.schema import PairRecord, records_to_table
from perpair.errors import ArtifactMismatch, InputError, PerpairError
from perpair.plan import (
    PRESETS,
    Schedule,
    build_plan,
    explain,
    load_plan,
    resolve_schedule,
    write_plan,
)
from perpair.plan.difficulty import REFERENCE_LOGPS_SCHEMA
from perpair.plan.report import mislabeled_action
from plan_helpers import beta_from_explanation, make_pairs, random_annotations, write_annotations

N = 60


def _scores(n: int, seed: int = 1) -> list[tuple[float | None, float | None]]:
    rng = np.random.default_rng(seed)
    scores = []
    for i in range(n):
        rejected = float(rng.integers(2, 16)) / 2
        margin = [0.0, 0.0, 0.5, 1.0, 2.0, 3.5][i % 6]
        scores.append((rejected + margin, rejected))
    scores[7] = (None, 4.0)  # a pair without a rating margin
    return scores


@pytest.fixture()
def files(tmp_path):
    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, _scores(N))
    annotations = tmp_path / "annotations.parquet"
    random_annotations(annotations, pairs, ids, seed=5, unannotated=4)
    return pairs, annotations, ids


def _config(tmp_path, values: dict, name: str = "schedule.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def _col(result, name: str) -> list:
    return result.table.column(name).to_pylist()


def _geomean(values) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


# --- β schedule and its controls ---------------------------------------------------------------------

def test_sp2dpo_normalises_the_geometric_mean_to_the_global_beta(files, tmp_path):
    pairs, annotations, _ = files
    result = build_plan(pairs, annotations, resolve_schedule("sp2dpo"), preset="sp2dpo")
    write_plan(result, tmp_path / "plan.parquet")
    betas = pq.read_table(tmp_path / "plan.parquet").column("beta").to_pylist()
    assert all(b is not None for b in betas) and len(set(betas)) > 5
    assert _geomean(betas) == pytest.approx(0.1, abs=1e-9)
    # with another global β, the same schedule lands on it too
    result = build_plan(pairs, annotations, resolve_schedule("sp2dpo", beta=0.03))
    assert _geomean(_col(result, "beta")) == pytest.approx(0.03, abs=1e-9)


def test_sp2dpo_beta_by_hand(files):
    pairs, annotations, ids = files
    schedule = resolve_schedule("sp2dpo")
    result = build_plan(pairs, annotations, schedule)
    ann, _ = read_annotations(annotations)
    by_id = {r["pair_id"]: r for r in ann.to_pylist()}
    priors = schedule.beta.priors.model_dump()
    gain = dict(zip([0.0, 1.0, 2.0, 3.0, 1.5, 2.25], [0.0, 0.4, 0.7, 1.0, 0.55, 0.775], strict=True))
    raw = {}
    for pid in ids[4:]:
        a = by_id[pid]
        s = priors[a["category"]] * gain[a["magnitude"]] * a["confidence"]
        if a["category"] == "mislabeled" and a["confidence"] > 0.7:
            s = 0.0  # default action beta_max
        raw[pid] = 0.4 ** (1 - s) * 0.025 ** s
    c = 0.1 / _geomean(raw.values())
    planned = dict(zip(_col(result, "pair_id"), _col(result, "beta"), strict=True))
    for pid in ids[4:]:
        assert planned[pid] == pytest.approx(c * raw[pid], rel=1e-12)
    for pid in ids[:4]:
        assert planned[pid] == 0.1  # unannotated: the global β exactly


def test_unannotated_pairs_get_the_global_beta_and_are_counted(files):
    pairs, annotations, ids = files
    result = build_plan(pairs, annotations, resolve_schedule("sp2dpo"))
    counts = result.provenance["counts"]
    assert counts["unannotated"] == 4 and counts["annotated"] == N - 4
    rows = result.table.to_pylist()
    assert [r["beta"] for r in rows[:4]] == [0.1] * 4
    assert [r["category"] for r in rows[:4]] == [None] * 4 and rows[0]["signal"] is None


def test_random_control_has_the_same_betas_in_another_assignment(files):
    pairs, annotations, _ = files
    semantic = build_plan(pairs, annotations, resolve_schedule("sp2dpo"))
    shuffled = build_plan(pairs, annotations, resolve_schedule("sp2dpo-random"))
    a, b = _col(semantic, "beta"), _col(shuffled, "beta")
    assert sorted(a) == sorted(b)  # identical multiset, bit for bit
    assert a != b
    assert sum(x != y for x, y in zip(a, b, strict=True)) > N // 2
    assert _col(semantic, "category") == _col(shuffled, "category")  # annotations stay with their pair
    again = build_plan(pairs, annotations, resolve_schedule("sp2dpo-random"))
    assert _col(again, "beta") == b
    reseeded = build_plan(pairs, annotations, Schedule.model_validate(PRESETS["sp2dpo-random"] | {"seed": 9}))
    assert _col(reseeded, "beta") != b and sorted(_col(reseeded, "beta")) == sorted(a)


def test_global_schedule_is_one_beta(files):
    pairs, annotations, _ = files
    result = build_plan(pairs, annotations, resolve_schedule("dpo", beta=0.2))
    assert set(_col(result, "beta")) == {0.2}
    assert set(_col(result, "route")) == {"preference"}
    assert _col(result, "order") == list(range(N))  # curriculum none: file order
    assert result.provenance["normalisation"] is None


def test_semantic_schedule_needs_annotations(files):
    pairs, _, _ = files
    with pytest.raises(InputError, match="--annotations"):
        build_plan(pairs, None, resolve_schedule("sp2dpo"))


@pytest.mark.parametrize(("preset", "values", "message"), [
    # each was accepted, and the plan was the same as without it
    ("dpo", {"beta": {"beta_min": 0.01}}, "beta.beta_min shapes the per-pair β .* beta.kind is global"),
    ("mixdpo", {"beta": {"priors": {"style": 0.1}}}, "beta.priors shapes the per-pair β"),
    ("dpo", {"beta": {"normalise": False}}, "beta.normalise shapes the per-pair β"),
    ("dpo", {"mislabeled": {"threshold": 0.5}}, "mislabeled.threshold would change nothing: mislabeled.action "
                                                "beta_max moves a pair's β, and beta.kind global"),
    ("dpo", {"routing": {"action": "drop"}}, "routing.action says what routing.tau or routing.quantile do"),
    ("mixdpo", {"curriculum": {"buckets": 3}}, "curriculum.buckets is read by curriculum.kind bucketed only, not "
                                               "'easy_to_hard'"),
    ("mixdpo", {"seed": 1}, "seed draws beta.kind random's β and curriculum.kind random's or bucketed's order"),
    ("sp2dpo", {"seed": 1}, r"seed draws .* \(beta.kind semantic, curriculum.kind none\)"),
])
def test_a_schedule_key_that_would_change_nothing_is_refused(tmp_path, preset, values, message):
    config = _config(tmp_path, values)
    with pytest.raises(InputError, match=f"^file {config}: {message}"):
        resolve_schedule(preset, config)


def test_the_same_keys_where_they_are_read_are_accepted(tmp_path):
    """Each refused key in a schedule that reads it; and a preset's own key left unread by the file's change is
    not the user's (MixDPO's routing.action with routing.tau: null)."""
    for preset, values in (("sp2dpo", {"beta": {"beta_min": 0.01, "priors": {"style": 0.1}, "normalise": False}}),
                           ("sp2dpo", {"mislabeled": {"threshold": 0.5}}),
                           ("dpo", {"mislabeled": {"action": "flip", "threshold": 0.5}}),
                           ("mixdpo", {"routing": {"action": "drop"}}),
                           ("mixdpo", {"routing": {"tau": None}}),
                           ("mixdpo", {"curriculum": {"kind": "bucketed", "buckets": 3}}),
                           ("mixdpo", {"curriculum": {"kind": "random"}, "seed": 1}),
                           ("sp2dpo-random", {"seed": 1})):
        resolve_schedule(preset, _config(tmp_path, values))
    # a perpair run arm's schedule keys are checked as a file's are
    with pytest.raises(InputError, match="^curriculum.buckets is read by curriculum.kind bucketed only"):
        resolve_schedule("dpo", None, None, {"curriculum": {"buckets": 2}})


def test_mislabeled_settings_without_annotations_are_refused(files, tmp_path):
    """No annotations, no pair called mislabeled: mislabeled.action flip changed nothing, without a word."""
    pairs, _, _ = files
    schedule = resolve_schedule("dpo", _config(tmp_path, {"mislabeled": {"action": "flip"}}))
    with pytest.raises(InputError, match="field 'mislabeled.action': mislabeled.action acts on the pairs the "
                                         "annotations call mislabeled, and there are no annotations"):
        build_plan(pairs, None, schedule)
    build_plan(pairs, None, resolve_schedule("dpo"))


# --- mislabeled pairs ----------------------------------------------------------------------------------

@pytest.fixture()
def mislabeled_files(tmp_path):
    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(9.0, 5.0), (8.0, 6.0), (7.0, 3.0), (6.0, 5.0)], tag="m")
    annotations = tmp_path / "annotations.parquet"
    write_annotations(annotations, pairs, ids, ["mislabeled", "mislabeled", "safety", "style"],
                      [3.0, 2.0, 3.0, 1.0], [0.9, 0.5, 1.0, 0.8])
    return pairs, annotations, ids


@pytest.mark.parametrize("action", ["drop", "flip", "beta_max"])
def test_mislabeled_action(mislabeled_files, tmp_path, action):
    pairs, annotations, _ = mislabeled_files
    config = _config(tmp_path, {"mislabeled": {"action": action, "threshold": 0.7},
                                "margin": {"source": "ratings"}, "beta": {"normalise": False}})
    result = build_plan(pairs, annotations, resolve_schedule("sp2dpo", config))
    rows = result.table.to_pylist()
    counts = result.provenance["counts"]["mislabeled"]
    assert counts["total"] == 2 and counts["above_threshold"] == 1
    first, below = rows[0], rows[1]
    # Below the threshold, a mislabeled pair follows the formula with prior(mislabeled) = 0 → β_max.
    assert below["route"] == "preference" and below["beta"] == pytest.approx(0.4) and not below["flipped"]
    if action == "drop":
        assert first["route"] == "drop" and first["beta"] is None and first["order"] is None
        assert counts["dropped"] == 1
        assert sorted(r["order"] for r in rows[1:]) == [0, 1, 2]
    elif action == "flip":
        assert first["flipped"] and first["route"] == "preference"
        assert first["difficulty"] == -4.0  # the rating margin of the pair as trained (swapped)
        assert counts["flipped"] == 1
    else:
        assert first["beta"] == pytest.approx(0.4) and first["signal"] == 0.0 and not first["flipped"]
        assert counts["beta_max"] == 1
    assert rows[2]["beta"] == pytest.approx(0.025)  # safety, magnitude 3, confidence 1 → s = 1 → β_min


def test_beta_max_under_a_global_beta_moves_no_pair(mislabeled_files):
    """Action beta_max sets a β; a global-β schedule (dpo, mixdpo) given annotations keeps every pair at its one β:
    the plan's counts, the summary and --explain said the confident mislabeled pair was given β_max."""
    pairs, annotations, ids = mislabeled_files
    result = build_plan(pairs, annotations, resolve_schedule("dpo"), preset="dpo")
    counts = result.provenance["counts"]["mislabeled"]
    assert counts["above_threshold"] == 1 and counts["beta_max"] == 0
    assert set(_col(result, "beta")) == {0.1}
    assert "action beta_max: no effect, one global β" in explain(result, ids[0])
    assert mislabeled_action(result.provenance["counts"]) == "action beta_max: no effect, one global β"  # summary
    per_pair = build_plan(pairs, annotations, resolve_schedule("sp2dpo"), preset="sp2dpo")
    assert per_pair.provenance["counts"]["mislabeled"]["beta_max"] == 1
    assert "action beta_max: no effect, their signal is 0 already" in explain(per_pair, ids[0])
    # SP²DPO's prior of a mislabeled pair is 0: its signal is 0, its β β_max, with the action or without (the summary
    # said "action beta_max", as if it had moved a pair); with a prior, the action moves it
    assert per_pair.provenance["counts"]["mislabeled"]["beta_max_moved"] == 0
    assert mislabeled_action(per_pair.provenance["counts"]) == ("action beta_max: no effect, their signal is 0 "
                                                                "already (β_max; beta.priors.mislabeled 0)")
    weighted = build_plan(pairs, annotations, resolve_schedule(
        "sp2dpo", overrides={"beta": {"priors": {"mislabeled": 0.5}}}), preset="sp2dpo")
    assert weighted.provenance["counts"]["mislabeled"]["beta_max_moved"] == 1
    assert mislabeled_action(weighted.provenance["counts"]) == "action beta_max"
    assert "no effect" not in explain(weighted, ids[0])


# --- routing -------------------------------------------------------------------------------------------

def test_tau_routes_ties_to_sft_and_smooths_the_rest(files):
    pairs, _, _ = files
    result = build_plan(pairs, None, resolve_schedule("mixdpo"))
    rows = result.table.to_pylist()
    for row in rows:
        if row["difficulty"] is not None and row["difficulty"] < 0.5:
            assert row["route"] == "sft" and row["label_smoothing"] == 0.0
        else:
            assert row["route"] == "preference" and row["label_smoothing"] == 0.1
    assert set(_col(result, "beta")) == {0.01}
    no_margin = rows[7]
    assert no_margin["difficulty"] is None and no_margin["route"] == "preference"
    assert no_margin["order"] == N - 1  # pairs without a margin come after every pair with one
    assert result.provenance["counts"]["no_margin"] == 1


def test_quantile_routing_to_drop(files, tmp_path):
    pairs, _, _ = files
    config = _config(tmp_path, {"routing": {"tau": None, "quantile": 0.25, "action": "drop"}})
    result = build_plan(pairs, None, resolve_schedule("mixdpo", config))
    rows = result.table.to_pylist()
    dropped = [r for r in rows if r["route"] == "drop"]
    assert len(dropped) == math.floor(0.25 * (N - 1))  # one pair has no margin
    kept = [r["difficulty"] for r in rows if r["route"] != "drop" and r["difficulty"] is not None]
    assert max(r["difficulty"] for r in dropped) <= min(kept)
    assert all(r["order"] is None and r["beta"] is None for r in dropped)
    assert sorted(r["order"] for r in rows if r["route"] != "drop") == list(range(N - len(dropped)))


def test_a_routing_rule_given_replaces_the_presets(files, tmp_path):
    """``routing: {quantile: q}`` over mixdpo kept MixDPO's τ = 0.5 beside it, and a pair either rule picks is
    routed: the lowest q (a subset of the ties here) changed nothing, exit 0, no warning. A rule a layer gives now
    replaces the rule below it; a layer that gives both keeps both."""
    pairs, _, _ = files
    given = resolve_schedule("mixdpo", _config(tmp_path, {"routing": {"quantile": 0.1}}))
    assert (given.routing.tau, given.routing.quantile, given.routing.action) == (None, 0.1, "sft")
    result = build_plan(pairs, None, given)
    assert _col(result, "route").count("sft") == math.floor(0.1 * (N - 1)) < 19  # MixDPO's ties: 19 of the 59
    both = resolve_schedule("mixdpo", _config(tmp_path, {"routing": {"tau": 0.5, "quantile": 0.1}}))
    assert (both.routing.tau, both.routing.quantile) == (0.5, 0.1)
    assert _col(build_plan(pairs, None, both), "route").count("sft") == 19
    # a run arm's schedule over a schedule file: the same rule
    layered = resolve_schedule("mixdpo", _config(tmp_path, {"routing": {"tau": 1.0}}), None, {"routing": {
        "quantile": 0.2}})
    assert (layered.routing.tau, layered.routing.quantile) == (None, 0.2)


def test_pairs_without_a_ratings_margin_are_named_in_a_warning(files, tmp_path):
    """A pairs file mixing scored and unscored pairs under mixdpo: the unscored ones are never routed and come
    last in the curriculum; only the summary's count said so (a teacher margin's missing pairs were warned of)."""
    pairs, _, _ = files
    warnings = build_plan(pairs, None, resolve_schedule("mixdpo")).provenance["warnings"]
    assert any(w.startswith("1 of the 60 trained pairs have no ratings margin (score_chosen or score_rejected "
                            "missing: data without ratings) and are never routed and last in the curriculum")
               for w in warnings), warnings
    plain = _config(tmp_path, {"margin": {"source": "ratings"}})  # read by nothing but the difficulty column
    assert not build_plan(pairs, None, resolve_schedule("dpo", plain)).provenance["warnings"]


def test_a_curriculum_or_threshold_that_cannot_act_is_refused_or_warned(files, tmp_path):
    """``curriculum: {kind: bucketed, buckets: 1}`` was a seeded shuffle called easy to hard, and
    ``mislabeled.threshold: 1`` can never be exceeded by a confidence: both refused; buckets as many as the pairs
    order them as easy_to_hard does, which a warning says."""
    pairs, _, _ = files
    for values, key, message in (({"curriculum": {"kind": "bucketed", "buckets": 1}}, "curriculum.buckets",
                                  "got 1; one bucket is every pair shuffled, curriculum.kind random's order"),
                                 ({"mislabeled": {"threshold": 1.0}}, "mislabeled.threshold",
                                  "got 1; a pair is acted on when its confidence exceeds the threshold")):
        with pytest.raises(InputError, match=f"{key}.*{message}"):
            resolve_schedule("sp2dpo+mixdpo", _config(tmp_path, values))
    many = resolve_schedule("mixdpo", _config(tmp_path, {"curriculum": {"kind": "bucketed", "buckets": N}}))
    result = build_plan(pairs, None, many)
    assert any(w.startswith(f"curriculum.buckets {N} is at least the 59 trained pairs with a margin: one pair a "
                            "bucket") for w in result.provenance["warnings"]), result.provenance["warnings"]
    easy = build_plan(pairs, None, resolve_schedule("mixdpo"))
    assert _col(result, "order") == _col(easy, "order")


@pytest.mark.parametrize(("routing", "rule"), [({"tau": 0.5}, "difficulty 0.0 < τ = 0.5"),
                                               ({"tau": None, "quantile": 0.25}, "in the lowest q = 0.25 fraction")])
def test_explain_names_the_rule_that_dropped_a_pair(files, tmp_path, routing, rule):
    """--explain shows the comparison that routed a pair to SFT; a pair the same rule routed to drop (the filtering
    baseline) read only "routing.action drop", without its difficulty against τ or the quantile."""
    pairs, _, _ = files
    result = build_plan(pairs, None, resolve_schedule("mixdpo", _config(tmp_path, {"routing": routing | {
        "action": "drop"}})))
    rows = result.table.to_pylist()
    tie = next(r["pair_id"] for r in rows if r["difficulty"] == 0.0)
    assert f"route = drop: {rule}" in explain(result, tie) and "routing.action drop" in explain(result, tie)


def test_teacher_margin_is_signed_by_mislabeled(mislabeled_files, tmp_path):
    pairs, annotations, _ = mislabeled_files
    config = _config(tmp_path, {"margin": {"source": "teacher"}, "routing": {"tau": 0.0},
                                "mislabeled": {"action": "beta_max"}})
    result = build_plan(pairs, annotations, resolve_schedule("sp2dpo+mixdpo", config))
    assert _col(result, "difficulty") == pytest.approx([-2.7, -1.0, 3.0, 0.8])
    assert _col(result, "route") == ["sft", "sft", "preference", "preference"]
    assert _col(result, "order") == [3, 2, 0, 1]


def test_reference_margin_source(files, tmp_path):
    pairs, _, ids = files
    config = _config(tmp_path, {"margin": {"source": "reference"}, "routing": {"tau": 0.0}})
    schedule = resolve_schedule("mixdpo", config)
    with pytest.raises(InputError, match="reference"):
        build_plan(pairs, None, schedule)
    logps = pa.table({"pair_id": ids, "chosen_logps": [-10.0 - i for i in range(N)],
                      "chosen_tokens": [10] * N, "rejected_logps": [-30.0] * N, "rejected_tokens": [15] * N},
                     schema=REFERENCE_LOGPS_SCHEMA)
    result = build_plan(pairs, None, schedule, reference_logps=logps)
    expected = [(-10.0 - i) / 10 - (-30.0 / 15) for i in range(N)]
    assert _col(result, "difficulty") == pytest.approx(expected)
    assert _col(result, "route") == ["preference" if m >= 0 else "sft" for m in expected]
    assert result.provenance["reference_logps_sha256"]


# --- curricula: content only, deterministic ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["easy_to_hard", "bucketed", "hard_to_easy", "random"])
def test_curriculum_depends_only_on_content(files, tmp_path, kind):
    pairs, _, ids = files
    scores = _scores(N)
    permutation = np.random.default_rng(0).permutation(N)
    shuffled = tmp_path / "shuffled.parquet"
    # Same pairs (same ids), other file order: every order must follow the pair, not the row.
    original = pq.read_table(pairs).to_pylist()
    records = []
    for i in permutation:
        row = original[i]
        records.append(PairRecord(prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"],
                                  source=row["source"], source_row=row["source_row"], meta=row["meta"],
                                  score_chosen=scores[i][0], score_rejected=scores[i][1]))
    write_artifact(shuffled, records_to_table(records), kind="pairs", schema_version=1, provenance={})
    config = _config(tmp_path, {"curriculum": {"kind": kind, **({"buckets": 3} if kind == "bucketed" else {})}})
    schedule = resolve_schedule("mixdpo", config)
    a = build_plan(pairs, None, schedule)
    b = build_plan(shuffled, None, schedule)
    order_a = dict(zip(_col(a, "pair_id"), _col(a, "order"), strict=True))
    order_b = dict(zip(_col(b, "pair_id"), _col(b, "order"), strict=True))
    assert set(order_a) == set(ids) and order_a == order_b
    if kind == "easy_to_hard":
        by_order = sorted((o, d if d is not None else -math.inf, p) for p, o, d in zip(
            _col(a, "pair_id"), _col(a, "order"), _col(a, "difficulty"), strict=True))
        assert [(-d, p) for _, d, p in by_order] == sorted((-d, p) for _, d, p in by_order)


# --- the artifact: hashes, determinism, refusals ---------------------------------------------------------

def test_plan_artifact_is_deterministic_and_records_its_inputs(files, tmp_path):
    pairs, annotations, _ = files
    schedule = resolve_schedule("sp2dpo+mixdpo")
    for name in ("a.parquet", "b.parquet"):
        write_plan(build_plan(pairs, annotations, schedule, preset="sp2dpo+mixdpo"), tmp_path / name)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    table, provenance = load_plan(tmp_path / "a.parquet", pairs, annotations)
    assert provenance["pairs_sha256"] == file_sha256(pairs)
    assert provenance["annotations_sha256"] == file_sha256(annotations)
    assert provenance["schedule"] == schedule.as_dict()
    assert provenance["schedule_sha256"] == schedule.sha256()
    assert provenance["counts"]["routes"]["sft"] == sum(r == "sft" for r in table.column("route").to_pylist())
    for column in ("pair_id", "beta", "route", "order", "difficulty", "label_smoothing", "category",
                   "magnitude", "confidence", "signal", "flipped"):
        assert column in table.column_names


def test_annotations_made_from_another_pairs_file_are_refused(files, tmp_path):
    pairs, annotations, ids = files
    other = tmp_path / "other.parquet"
    make_pairs(other, _scores(N), tag="other")
    foreign = tmp_path / "foreign.parquet"
    random_annotations(foreign, other, ids)  # records other's hash
    with pytest.raises(ArtifactMismatch, match="another pairs file"):
        build_plan(pairs, foreign, resolve_schedule("sp2dpo"))
    with pytest.raises(ArtifactMismatch, match="not in"):  # right hash, wrong ids
        stray = tmp_path / "stray.parquet"
        write_annotations(stray, pairs, ["0123456789abcdef"], ["style"], [1.0], [0.5])
        build_plan(pairs, stray, resolve_schedule("sp2dpo"))


def test_a_plan_is_refused_for_another_pairs_file(files, tmp_path):
    pairs, annotations, ids = files
    write_plan(build_plan(pairs, annotations, resolve_schedule("sp2dpo")), tmp_path / "plan.parquet")
    other = tmp_path / "other.parquet"
    make_pairs(other, _scores(N), tag="other")
    with pytest.raises(ArtifactMismatch, match="another pairs file"):
        load_plan(tmp_path / "plan.parquet", other)
    other_annotations = tmp_path / "ann2.parquet"
    random_annotations(other_annotations, pairs, ids, seed=1)  # same pairs, other annotations
    with pytest.raises(ArtifactMismatch, match="annotations"):
        load_plan(tmp_path / "plan.parquet", pairs, other_annotations)
    with pytest.raises(PerpairError, match="expected 'plan'"):
        load_plan(pairs, pairs)


@pytest.mark.parametrize(("row", "field", "value", "message"), [
    (2, "magnitude", 3.5, "outside"),
    (3, "confidence", 1.2, "outside"),
    (2, "confidence", None, "missing"),
    (1, "category", "rudeness", "unknown category"),
    (3, "pair_id", "DUP", "twice"),
])
def test_annotations_reader_names_file_row_and_field(tmp_path, row, field, value, message):
    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(5.0, 4.0)] * 3)
    columns = {"pair_id": ids, "category": ["style"] * 3, "magnitude": [1.0] * 3, "confidence": [0.5] * 3}
    if value == "DUP":
        columns["pair_id"][2] = columns["pair_id"][0]
    else:
        columns[field][row - 1] = value
    path = tmp_path / "ann.parquet"
    write_annotations(path, pairs, columns["pair_id"], columns["category"], columns["magnitude"],
                      columns["confidence"])
    with pytest.raises(InputError, match=message) as caught:
        read_annotations(path)
    assert (caught.value.file, caught.value.row, caught.value.field) == (str(path), row, field)


def test_annotations_without_the_pairs_hash_are_refused(tmp_path):
    path = tmp_path / "ann.parquet"
    write_artifact(path, pa.table({"pair_id": ["a"], "category": [None], "magnitude": [None],
                                   "confidence": [None]}, schema=ANNOTATIONS_SCHEMA),
                   kind="annotations", schema_version=1, provenance={})
    with pytest.raises(InputError, match="pairs_sha256"):
        read_annotations(path)


# --- schedule: presets, overrides, validation ---------------------------------------------------------------

def test_presets_resolve_and_overrides_apply_in_order(tmp_path):
    for name in PRESETS:
        resolve_schedule(name)
    mix = resolve_schedule("mixdpo")
    assert (mix.beta.kind, mix.beta.beta, mix.margin.source, mix.routing.tau, mix.routing.action,
            mix.label_smoothing, mix.curriculum.kind) == ("global", 0.01, "ratings", 0.5, "sft", 0.1,
                                                          "easy_to_hard")
    config = _config(tmp_path, {"beta": {"beta": 0.05, "priors": {"style": 0.5}}, "seed": 3})
    schedule = resolve_schedule("sp2dpo-random", config)
    assert (schedule.beta.kind, schedule.beta.beta, schedule.beta.priors.style, schedule.beta.priors.safety,
            schedule.seed) == ("random", 0.05, 0.5, 1.0, 3)
    assert resolve_schedule("sp2dpo-random", config, beta=0.2).beta.beta == 0.2  # the CLI's --beta wins


@pytest.mark.parametrize(("values", "key", "message"), [
    ({"beta": {"betta": 0.1}}, "beta.betta", "unknown key"),
    ({"routing": {"tau": 0.5, "quantil": 0.1}}, "routing.quantil", "unknown key"),
    ({"beta": {"priors": {"rudeness": 1.0}}}, "beta.priors.rudeness", "unknown key"),
    ({"beta": {"beta_min": -0.1}}, "beta.beta_min", "greater than 0"),
    ({"beta": {"priors": {"safety": 1.5}}}, "beta.priors.safety", "less than or equal to 1"),
    ({"mislabeled": {"threshold": 2}}, "mislabeled.threshold", "give a threshold below 1"),
    ({"mislabeled": {"action": "burn"}}, "mislabeled.action", "'drop', 'flip' or 'beta_max'"),
    ({"routing": {"quantile": 1.0}}, "routing.quantile", "less than 1"),
    ({"label_smoothing": 0.5}, "label_smoothing", "less than 0.5"),
    ({"curriculum": {"buckets": 0}}, "curriculum.buckets", "greater than or equal to 1"),
    ({"beta": {"magnitude_gain": [0, 0.5, 1]}}, "beta.magnitude_gain", ""),
    ({"beta": {"beta_min": 0.5, "beta_max": 0.4}}, "beta.beta_min", "smaller than beta.beta_max"),
    ({"beta": {"magnitude_gain": [0, 0.8, 0.5, 1]}}, "beta.magnitude_gain", "non-decreasing"),
    ({"beta": {"beta": float("nan")}}, "beta.beta", ""),
])
def test_schedule_yaml_errors_name_the_file_and_the_key(tmp_path, values, key, message):
    config = _config(tmp_path, values, name="my_schedule.yaml")
    with pytest.raises(InputError) as caught:
        resolve_schedule("sp2dpo", config)
    text = str(caught.value)
    assert "my_schedule.yaml" in text and key in text and message in text


def test_schedule_needs_a_margin_for_routing(tmp_path):
    config = _config(tmp_path, {"routing": {"tau": 0.5}})
    with pytest.raises(InputError, match="margin.source"):
        resolve_schedule("dpo", config)
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: [unclosed\n")
    with pytest.raises(InputError, match="bad.yaml"):
        resolve_schedule("dpo", bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="mapping"):
        resolve_schedule("dpo", bad)
    with pytest.raises(InputError, match="unknown preset"):
        resolve_schedule("ipo")
    with pytest.raises(InputError, match="global β must be a positive number"):
        resolve_schedule("dpo", beta=-1.0)


# --- explain ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("preset", "overrides"), [
    ("sp2dpo", {}),
    ("sp2dpo", {"beta": {"normalise": False}, "mislabeled": {"action": "flip", "threshold": 0.5}}),
    ("sp2dpo-random", {}),
    ("sp2dpo+mixdpo", {"mislabeled": {"action": "drop"}, "curriculum": {"kind": "bucketed"}}),
    ("mixdpo", {}),
])
def test_explain_reproduces_every_beta_by_hand(files, tmp_path, preset, overrides):
    pairs, annotations, ids = files
    schedule = resolve_schedule(preset, _config(tmp_path, overrides))
    result = build_plan(pairs, annotations, schedule, preset=preset)
    priors = schedule.beta.priors.model_dump()
    gain = list(schedule.beta.magnitude_gain)
    for row in result.table.to_pylist():
        text = explain(result, row["pair_id"])
        assert row["pair_id"] in text and f"route = {row['route']}" in text
        if row["route"] == "drop":
            assert "β: none" in text and "order: none" in text
            continue
        assert beta_from_explanation(text, priors, gain) == pytest.approx(row["beta"], rel=1e-12)
        assert f"order = {row['order']} (0-based)" in text


def test_explain_unknown_pair(files):
    pairs, _, _ = files
    result = build_plan(pairs, None, resolve_schedule("dpo"))
    with pytest.raises(InputError, match="not in this plan"):
        explain(result, "nope")


def test_a_tie_has_no_teacher_margin(tmp_path):
    """margin.source teacher: a no_clear_gap pair's margin is 0, so τ routes it to SFT and the curriculum puts it
    with the hard pairs; an API teacher's tie comes with its magnitude (3 here), which made it the easiest pair."""
    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(8.0, 3.0)] * 3)
    annotations = tmp_path / "ann.parquet"
    write_annotations(annotations, pairs, ids, ["no_clear_gap", "style", "factuality"], [3.0, 1.0, 2.0],
                      [0.9, 0.8, 0.5])
    config = _config(tmp_path, {"margin": {"source": "teacher"}, "routing": {"tau": 0.5},
                                "curriculum": {"kind": "easy_to_hard"}})
    result = build_plan(pairs, annotations, resolve_schedule("sp2dpo", config))
    assert _col(result, "difficulty") == pytest.approx([0.0, 0.8, 1.0])
    assert _col(result, "route") == ["sft", "preference", "preference"]
    assert _col(result, "order") == [2, 1, 0]
    assert "difficulty = 0 (no_clear_gap: a tie has no margin; magnitude 3.0) = 0.0" in explain(result, ids[0])
