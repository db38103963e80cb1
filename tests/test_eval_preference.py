"""Held-out preference accuracy: the maths by hand on small tables, then ``perpair eval preference`` end to end on
20 pairs of the prepared UltraFeedback sample with two tiny random Llamas (policy = reference, then another)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli, save_tiny_llama
from perpair.eval.preference import (
    implicit_reward_margins,
    length_normalised_margins,
    margin_summary,
    preference_metrics,
    summary_by_category,
)
from plan_helpers import write_annotations


def _table(ids, cw, ct, rw, rt):
    return pd.DataFrame({"pair_id": ids, "chosen_logps": cw, "chosen_tokens": ct, "rejected_logps": rw,
                         "rejected_tokens": rt})


POLICY = _table(["a", "b", "c", "d"], [-10.0, -20.0, -5.0, -8.0], [10, 4, 5, 2], [-12.0, -18.0, -5.0, -6.0],
                [4, 9, 5, 3])
REFERENCE = _table(["d", "c", "b", "a"], [-8.0, -6.0, -21.0, -11.0], [2, 5, 4, 10], [-6.0, -6.0, -20.0, -11.0],
                   [3, 5, 9, 4])


def test_implicit_reward_margins_by_hand():
    # a: (−10+11) − (−12+11) = 1 + 1 = 2;  b: (−20+21) − (−18+20) = 1 − 2 = −1
    # c: (−5+6) − (−5+6) = 0;              d: (−8+8) − (−6+6) = 0   (reference rows in another order)
    margins = implicit_reward_margins(POLICY, REFERENCE, beta=0.5)
    assert list(margins.index) == ["a", "b", "c", "d"]
    np.testing.assert_allclose(margins.to_numpy(), [1.0, -0.5, 0.0, 0.0])


def test_summary_ties_count_half_and_are_reported():
    s = margin_summary([1.0, -0.5, 0.0, 0.0])
    assert (s["n"], s["n_correct"], s["n_wrong"], s["n_ties"]) == (4, 1, 1, 2)
    assert s["accuracy"] == pytest.approx((1 + 2 / 2) / 4)
    assert s["accuracy_strict"] == pytest.approx(1 / 4)
    assert s["mean_margin"] == pytest.approx(0.125)
    # s.e. = sd(ddof=1)/√n: deviations 0.875, −0.625, −0.125, −0.125 → Σ² = 1.1875; sd = √(1.1875/3)
    assert s["margin_se"] == pytest.approx(math.sqrt(1.1875 / 3) / 2)
    empty = margin_summary([])
    assert empty["n"] == 0 and math.isnan(empty["accuracy"]) and math.isnan(empty["margin_se"])
    one = margin_summary([2.0])
    assert one["accuracy"] == 1.0 and math.isnan(one["margin_se"])


def test_length_normalised_margins_by_hand():
    # a: −10/10 − (−12/4) = −1 + 3 = 2;  b: −20/4 + 18/9 = −3;  c: 0;  d: −8/2 + 6/3 = −2
    np.testing.assert_allclose(length_normalised_margins(POLICY).to_numpy(), [2.0, -3.0, 0.0, -2.0])


def test_by_category_and_full_metrics():
    categories = pd.Series({"a": "style", "b": "style", "c": "safety"})  # d unannotated
    margins = implicit_reward_margins(POLICY, REFERENCE, beta=1.0)
    by = summary_by_category(margins, categories)
    assert set(by) == {"style", "safety", "unannotated"}
    assert by["style"]["n"] == 2 and by["style"]["accuracy"] == 0.5
    assert by["safety"]["n_ties"] == 1 and by["safety"]["accuracy"] == 0.5
    metrics = preference_metrics(POLICY, REFERENCE.iloc[::-1], 1.0, categories)
    assert metrics["implicit_reward"]["accuracy"] == pytest.approx(0.5)
    assert metrics["length_normalised"]["accuracy"] == pytest.approx((1 + 0.5) / 4)
    assert metrics["length_normalised_by_category"]["style"]["n_correct"] == 1
    # policy = reference: every pair a tie, margin exactly 0
    same = preference_metrics(POLICY, POLICY, 0.1)["implicit_reward"]
    assert same["n_ties"] == 4 and same["accuracy"] == 0.5 and same["mean_margin"] == 0.0


def test_beta_scales_margin_not_accuracy():
    small = margin_summary(implicit_reward_margins(POLICY, REFERENCE, 0.1))
    large = margin_summary(implicit_reward_margins(POLICY, REFERENCE, 2.0))
    assert small["accuracy"] == large["accuracy"]
    assert large["mean_margin"] == pytest.approx(20 * small["mean_margin"])


def test_the_table_shows_a_small_margin_and_its_se_as_they_are_not_as_zero():
    """A policy close to its reference (a few steps of training) has margins of 1e-5: the table printed and written
    as results.md said mean margin 0.0000 and s.e. 0.0000 for a mean of 3.5e-05."""
    from perpair.eval.preference import markdown_table

    close = POLICY.assign(chosen_logps=POLICY["chosen_logps"] + [2e-4, 3e-4, 4e-4, 5e-4])  # margins 2e-5 … 5e-5
    metrics = preference_metrics(close, POLICY, 0.1)
    assert metrics["implicit_reward"]["mean_margin"] == pytest.approx(3.5e-05)
    assert metrics["implicit_reward"]["margin_se"] == pytest.approx(6.455e-06, rel=1e-3)
    table = markdown_table({"name": "dpo", "ref": "smollm2", "beta": 0.1, **metrics})
    assert table.splitlines()[-1].split(" | ")[:7] == ["| all", "4", "1.0000", "1.0000", "0", "3.5e-05",
                                                       "6.45e-06"], table


def _tiny(path, seed: int):
    return save_tiny_llama(path, seed=seed, layers=1)


N = 20


def test_cli_end_to_end_on_ultrafeedback(uf_pairs, tmp_path):
    from perpair.data import read_pairs

    ref, policy = _tiny(tmp_path / "ref", 0), _tiny(tmp_path / "policy", 1)
    ids = read_pairs(str(uf_pairs))[0].column("pair_id").to_pylist()[:N]
    annotations = tmp_path / "ann.parquet"
    write_annotations(annotations, uf_pairs, ids[2:], ["style", "factuality"] * 9, [1.0] * 18, [0.9] * 18)
    common = ("--data", uf_pairs, "--limit", N, "--max-length", 256, "--json")

    same = json.loads(run_cli("eval", "preference", "--model", ref, "--ref", ref, *common,
                              "-o", tmp_path / "same").stdout)
    # at 256 tokens a few UltraFeedback prompts fill the budget alone: those pairs are left out and counted
    n = same["n_total"]
    assert n >= N // 2 and n + same["n_skipped"] == N
    assert same["implicit_reward"]["n_ties"] == n and same["accuracy"] == 0.5
    assert same["mean_margin"] == 0.0 and same["margin_se"] == 0.0
    assert same["implicit_reward"]["accuracy_strict"] == 0.0

    out = tmp_path / "differs" / "results.json"
    result = run_cli("eval", "preference", "--model", policy, "--ref", ref, *common, "--annotations", annotations,
                     "--beta", "0.5", "-o", out)
    row = json.loads(result.stdout)
    assert row["n_total"] == n and row["implicit_reward"]["n_ties"] == 0 and 0 <= row["accuracy"] <= 1
    assert math.isfinite(row["mean_margin"]) and row["margin_se"] > 0
    assert 0 <= row["length_normalised_accuracy"] <= 1
    by = row["implicit_reward_by_category"]
    assert set(by) <= {"style", "factuality", "unannotated"} and sum(v["n"] for v in by.values()) == n
    assert row["n_annotated"] == n - by.get("unannotated", {"n": 0})["n"]
    assert sum(v["n_correct"] for v in by.values()) == row["implicit_reward"]["n_correct"]
    assert json.loads(out.read_text())[0]["accuracy"] == row["accuracy"]
    assert (same["limit"], row["limit"]) == (N, N)  # the report's table says the evaluation was of N pairs only
    markdown = out.with_suffix(".md").read_text()
    assert f"| all | {n} |" in markdown and "| factuality |" in markdown

    # the written results feed the report table
    run_cli("eval", "report", out.parent, tmp_path / "same", "-o", tmp_path / "report")
    table = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [r["benchmark"] for r in table] == ["preference_accuracy"] * 2
    assert table[0]["accuracy"] == row["accuracy"] and table[1]["accuracy"] == 0.5


def test_reference_cache_gives_the_uncached_results_and_is_keyed_by_the_reference(uf_pairs, tmp_path, monkeypatch):
    """perpair run's arms share the reference's log-probs of the held-out pairs through a cache: the results equal
    scoring the reference each time (packed forwards too, within float noise), a second evaluation against the same
    reference loads it no more, and another reference model is never served the first one's values."""
    from perpair.eval import preference
    from perpair.eval.preference import PreferenceConfig, run_preference

    ref, other, policy = _tiny(tmp_path / "ref", 0), _tiny(tmp_path / "other", 2), _tiny(tmp_path / "policy", 1)
    loaded = []
    real_load = preference._load
    monkeypatch.setattr(preference, "_load", lambda spec: loaded.append(str(spec)) or real_load(spec))

    def figures(reference, **options):
        config = PreferenceConfig(model=str(policy), ref=str(reference), data=uf_pairs, limit=N, max_length=256,
                                  **options)
        row = run_preference(config)
        return np.array([row["mean_margin"], row["margin_se"], row["accuracy"]])

    plain = figures(ref)
    cache = tmp_path / "cache"
    packed = figures(ref, reference_cache=cache, tokens_per_forward=1024)
    np.testing.assert_allclose(packed, plain, rtol=1e-5, atol=1e-7)
    loaded.clear()
    again = figures(ref, reference_cache=cache, tokens_per_forward=1024)
    assert loaded == [str(policy)]  # the reference came from the cache
    np.testing.assert_array_equal(again, packed)
    np.testing.assert_allclose(figures(other, reference_cache=cache), figures(other), rtol=1e-5, atol=1e-7)


def test_the_reference_cache_records_the_pairs_too_long_for_max_length(tmp_path):
    """The evaluation's reference cache is the train stage's format, which perpair plan reads: like the train
    stage's pass, it records the pairs whose prompt alone fills max_length (no value). It recorded none and said so
    (an empty record, not a missing one): a plan given it was refused as lacking those pairs, advised to compute
    them, which no pass can."""
    from perpair.artifacts import file_sha256, write_artifact
    from perpair.data.schema import SCHEMA_VERSION, PairRecord, records_to_table
    from perpair.eval.preference import PreferenceConfig, cache_reference
    from perpair.plan.reference import read_reference_logps

    records = [PairRecord(prompt=[{"role": "user", "content": "question " + ("word " * 300 if i == 1 else str(i))}],
                          chosen=[{"role": "assistant", "content": f"good answer {i}"}],
                          rejected=[{"role": "assistant", "content": f"bad answer {i}"}],
                          source="test", source_row=i, meta="{}") for i in range(3)]
    pairs = tmp_path / "pairs.parquet"
    write_artifact(pairs, records_to_table(records), kind="pairs", schema_version=SCHEMA_VERSION,
                   provenance={"source": "tests"})
    ids = [r.pair_id for r in records]
    model, cache = _tiny(tmp_path / "model", 0), tmp_path / "cache"
    cache_reference(PreferenceConfig(model=str(model), ref=str(model), data=pairs, max_length=64,
                                     reference_cache=cache))
    table, _, _ = read_reference_logps(cache, file_sha256(pairs), str(pairs))  # refused: "lacks 1 of the 3 pairs"
    assert sorted(table.column("pair_id").to_pylist()) == sorted([ids[0], ids[2]])


def _refused(result) -> str:
    """The one `error:` line of a refused command (exit 2, no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr
    return lines[-1]


def test_annotations_of_other_pairs_and_no_pair_that_fits_are_refused(tmp_path):
    """Annotations made from another pairs file are refused as `perpair plan` refuses them (they used to list every
    pair as unannotated, exit 0); a --max-length that no pair fits is refused too (it used to give accuracy null,
    exit 0). Either way nothing is written."""
    from plan_helpers import make_pairs

    pairs, other = tmp_path / "pairs.parquet", tmp_path / "other.parquet"
    make_pairs(pairs, [(8.0, 2.0)] * 4)
    other_ids = make_pairs(other, [(8.0, 2.0)] * 4, tag="other ")
    annotations = tmp_path / "ann.parquet"
    write_annotations(annotations, other, other_ids, ["style"] * 4, [1.0] * 4, [0.9] * 4)
    model = _tiny(tmp_path / "model", 0)
    out = tmp_path / "out"
    common = ("eval", "preference", "--model", model, "--ref", model, "--data", pairs, "-o", out)

    line = _refused(run_cli(*common, "--annotations", annotations, check=False))
    assert f"annotations {annotations} were made from another pairs file" in line
    assert "re-annotate this pairs file" in line
    line = _refused(run_cli(*common, "--max-length", 1, check=False))
    assert "no pair fits --max-length 1" in line and "raise --max-length" in line
    assert not out.exists()


def test_output_paths_that_cannot_be_written_are_refused(tmp_path):
    """-o '' (never the current folder), a file where the folder goes, a folder where results.json goes: refused
    before any model is loaded, nothing written."""
    from plan_helpers import make_pairs

    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(8.0, 2.0)] * 2)
    (tmp_path / "a file").write_text("x")
    (tmp_path / "r.json").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    for output, says in (("", "-o/--output: an empty path"), (tmp_path / "a file", "a file, not a folder"),
                         (tmp_path / "r.json", "a folder; name a file")):
        result = run_cli("eval", "preference", "--model", "nowhere", "--ref", "nowhere", "--data", pairs,
                         "-o", output, check=False)
        assert says in _refused(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_models_perpair_train_saved_are_told_apart_by_their_run(uf_pairs, tmp_path, monkeypatch):
    """``perpair train --out runs/NAME`` saves runs/NAME/model: evaluated without -o or --name, two such models were
    both named "model" and wrote into one folder, eval/model, the second replacing the first's results. The default
    label is the run's folder (the one holding run.key); a folder named model anywhere else keeps its name."""
    ref = _tiny(tmp_path / "ref", 0)
    for run, seed in (("dpo", 1), ("mixdpo", 2)):
        _tiny(tmp_path / "runs" / run / "model", seed)
        (tmp_path / "runs" / run / "run.key").write_text("key\n")
    plain = _tiny(tmp_path / "mine" / "model", 3)  # no run.key beside it: not a perpair train output
    monkeypatch.chdir(tmp_path)
    rows = {}
    for model in ("runs/dpo/model", "runs/mixdpo/model/"):
        row = json.loads(run_cli("eval", "preference", "--model", model, "--ref", ref, "--data", uf_pairs,
                                 "--limit", 3, "--max-length", 256, "--json").stdout)
        rows[row["name"]] = row
    assert set(rows) == {"dpo", "mixdpo"}
    for name, row in rows.items():
        written = json.loads((tmp_path / "eval" / name / "preference" / "results.json").read_text())
        assert written[0]["name"] == name and written[0]["model"] == row["model"]
    assert not (tmp_path / "eval" / "model").exists()
    from perpair.eval.alpaca_eval import default_output_dir, model_label

    assert model_label(str(plain)) == "model" and default_output_dir(str(plain)).parts == ("eval", "model")
    assert model_label("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"


def test_a_model_alias_is_named_as_the_other_evaluations_name_it():
    """`eval preference --model smollm2` named the model `smollm2` where alpaca-eval and arena-hard run name it by its
    checkpoint's folder: one model, two rows' names in a report."""
    from perpair.eval.alpaca_eval import model_label
    from perpair.eval.preference import _model_label
    from perpair.models import resolve_model

    assert _model_label("smollm2") == model_label(resolve_model("smollm2")) == "smollm2-135m-instruct"
