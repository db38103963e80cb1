"""The plan stage end to end through the real CLI, on the prepared UltraFeedback sample (994 pairs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from perpair.plan import load_plan, resolve_schedule
from plan_helpers import SHARED_DATA, beta_from_explanation, random_annotations


def perpair(*args: str, hash_seed: str = "0") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run([sys.executable, "-m", "perpair", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


# `uf_pairs` comes from conftest.py: `perpair prepare` on ultrafeedback/train_1k.jsonl.gz, once per session.


@pytest.fixture(scope="module")
def uf_annotations(uf_pairs, tmp_path_factory):
    path = tmp_path_factory.mktemp("uf_annotations") / "annotations.parquet"
    ids = pq.read_table(uf_pairs, columns=["pair_id"]).column("pair_id").to_pylist()
    random_annotations(path, uf_pairs, ids, seed=11, unannotated=30)
    return path


@pytest.mark.slow
def test_mixdpo_routes_exactly_the_ties_last_in_a_content_only_order(uf_pairs, tmp_path):
    plan_a, plan_b = tmp_path / "a" / "plan.parquet", tmp_path / "b" / "plan.parquet"
    done = perpair("plan", uf_pairs, "--preset", "mixdpo", "-o", plan_a, hash_seed="1")
    assert done.returncode == 0, done.stderr
    assert "report:" in done.stdout and (plan_a.parent / "plan_report" / "index.html").exists()
    done = perpair("plan", uf_pairs, "--preset", "mixdpo", "-o", plan_b, "--no-report", hash_seed="4242")
    assert done.returncode == 0, done.stderr
    # Identical bytes whatever the interpreter's hash seed.
    assert plan_a.read_bytes() == plan_b.read_bytes()

    table, provenance = load_plan(plan_a, uf_pairs)
    pairs = pq.read_table(uf_pairs, columns=["pair_id", "score_chosen", "score_rejected"]).to_pylist()
    plan = {row["pair_id"]: row for row in table.to_pylist()}
    assert len(pairs) == len(plan) == 994
    ties = {p["pair_id"] for p in pairs if p["score_chosen"] == p["score_rejected"]}
    assert len(ties) == 110
    assert {pid for pid, row in plan.items() if row["route"] == "sft"} == ties
    assert provenance["counts"]["routes"] == {"preference": 884, "sft": 110, "drop": 0}
    sft_orders = [row["order"] for row in plan.values() if row["route"] == "sft"]
    pref_orders = [row["order"] for row in plan.values() if row["route"] == "preference"]
    assert min(sft_orders) > max(pref_orders)
    assert {row["label_smoothing"] for row in plan.values() if row["route"] == "preference"} == {0.1}
    assert {row["beta"] for row in plan.values()} == {0.01}
    # The order is a function of content alone: recomputed here with Python's own sort on
    # (−margin, pair_id), no numpy, no file order.
    expected = sorted(pairs, key=lambda p: (-(p["score_chosen"] - p["score_rejected"]), p["pair_id"]))
    assert [p["pair_id"] for p in expected] == sorted(plan, key=lambda pid: plan[pid]["order"])


@pytest.mark.slow
def test_cli_explain_reproduces_beta(uf_pairs, uf_annotations, tmp_path):
    config = tmp_path / "schedule.yaml"
    config.write_text(yaml.safe_dump({"mislabeled": {"action": "beta_max", "threshold": 0.6}}))
    table = pq.read_table(uf_annotations).to_pylist()
    acted = next(r["pair_id"] for r in table if r["category"] == "mislabeled" and r["confidence"] > 0.6)
    between = next(r["pair_id"] for r in table if r["magnitude"] in (1.5, 2.25) and r["category"] == "safety")
    unannotated = pq.read_table(uf_pairs, columns=["pair_id"]).column("pair_id")[0].as_py()
    chosen = [acted, between, unannotated, table[100]["pair_id"]]
    plan_path = tmp_path / "plan.parquet"
    args = ["plan", uf_pairs, "--annotations", uf_annotations, "--preset", "sp2dpo+mixdpo",
            "--config", config, "-o", plan_path, "--no-report"]
    for pid in chosen:
        args += ["--explain", pid]
    done = perpair(*args)
    assert done.returncode == 0, done.stderr
    planned = {r["pair_id"]: r for r in pq.read_table(plan_path).to_pylist()}
    schedule = resolve_schedule("sp2dpo+mixdpo", config)
    sections = re.split(r"(?m)^(?=pair [0-9a-f]{16}: row )", done.stdout)
    for pid in chosen:
        text = next(s for s in sections if s.startswith(f"pair {pid}: row"))
        beta = beta_from_explanation(text, schedule.beta.priors.model_dump(),
                                     list(schedule.beta.magnitude_gain))
        assert beta == pytest.approx(planned[pid]["beta"], rel=1e-12)
        assert f"order = {planned[pid]['order']} (0-based)" in text
    assert np.isclose(planned[unannotated]["beta"], 0.01)


@pytest.mark.slow
def test_cli_refusals_are_one_clear_message(uf_pairs, uf_annotations, tmp_path):
    config = tmp_path / "bad_schedule.yaml"
    config.write_text("routing:\n  tau: 0.5\n  taus: 1\n")
    done = perpair("plan", uf_pairs, "--preset", "mixdpo", "--config", config, "-o", tmp_path / "p.parquet")
    assert done.returncode == 2
    assert "bad_schedule.yaml" in done.stderr and "routing.taus" in done.stderr
    assert "Traceback" not in done.stderr
    other = tmp_path / "other.parquet"
    eval_sample = SHARED_DATA / "ultrafeedback" / "eval_200.jsonl.gz"
    assert perpair("prepare", eval_sample, "-o", other).returncode == 0
    done = perpair("plan", other, "--annotations", uf_annotations, "--preset", "sp2dpo", "-o",
                   tmp_path / "p.parquet")
    assert done.returncode == 2 and "another pairs file" in done.stderr
