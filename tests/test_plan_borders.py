"""`perpair plan` at its borders: a per-pair β schedule that gives one β says so; ratings with an overall
score only still spread β by margin; `--reference-logps` reads the train stage's cache (and refuses another
pairs file's); -o naming an input is refused; the report names its inputs and shows escaped example pairs;
`--json` and piped tables are not cut."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from perpair.artifacts import file_sha256, read_artifact, write_artifact
from perpair.data import read_pairs
from perpair.errors import InputError
from plan_helpers import make_pairs, write_annotations


@pytest.fixture(scope="module")
def ratings_annotations(uf_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ratings") / "ratings.parquet"
    run_cli("annotate", uf_pairs, "-o", out, "--teacher", "ratings")
    return out


def read_plan(path):
    table, provenance = read_artifact(path, kind="plan", schema_version=1)
    return table.to_pylist(), provenance


def test_overall_scores_only_spread_beta_by_margin(uf_pairs, ratings_annotations, tmp_path):
    result = run_cli("plan", uf_pairs, "--preset", "sp2dpo", "--annotations", ratings_annotations,
                     "-o", tmp_path / "plan.parquet")
    rows, provenance = read_plan(tmp_path / "plan.parquet")
    assert provenance["warnings"] == [] and "warning" not in result.stderr
    by_magnitude = {}
    for row in rows:
        if row["category"] == "unknown":
            by_magnitude.setdefault(row["magnitude"], set()).add(row["beta"])
    # One β per margin size, smaller (enforced further) the larger the margin; exactly the β_max^(1-s)·β_min^s
    # of s = prior(unknown) · g(magnitude), rescaled by one factor for every pair.
    assert sorted(by_magnitude) == [1.0, 2.0, 3.0] and all(len(b) == 1 for b in by_magnitude.values())
    betas = [by_magnitude[m].pop() for m in (1.0, 2.0, 3.0)]
    raw = [0.4 ** (1 - 0.5 * g) * 0.025 ** (0.5 * g) for g in (0.4, 0.7, 1.0)]
    factor = betas[0] / raw[0]
    assert betas == pytest.approx([factor * r for r in raw], rel=1e-12) and betas[0] > betas[1] > betas[2]


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stdout
    [line] = result.stderr.strip().splitlines()
    return line


def test_one_beta_for_every_pair_is_refused(uf_pairs, ratings_annotations, tmp_path):
    """A per-pair β schedule whose annotations tell no pair from another gave every pair one β with a warning and
    exit 0: an arm trained on it was plain DPO under SP²DPO's name, beside the DPO arm in the comparison. Refused,
    saying why and what to do; one β asked for (preset dpo) is no problem."""
    schedule = tmp_path / "flat.yaml"
    schedule.write_text("beta:\n  priors:\n    unknown: 0.0\n")  # unknown pairs then sit with the ties at s = 0
    out = tmp_path / "flat.parquet"
    result = run_cli("plan", uf_pairs, "--preset", "sp2dpo", "--annotations", ratings_annotations,
                     "--config", schedule, "-o", out, check=False)
    assert result.returncode == 2 and not out.exists() and not (tmp_path / "flat_report").exists()
    [line] = result.stderr.strip().splitlines()
    # the schedule's fault (the annotations' magnitudes differ): the annotations file was named, "annotate with a
    # teacher LLM" advised
    assert line == ("error: field 'beta': a per-pair β that gives every preference pair β = 0.1: the annotations "
                    "differ, but the schedule gives each the signal s = 0 (beta.priors × beta.magnitude_gain × "
                    "confidence), so the plan would be plain DPO with one β; give the categories the annotations "
                    "hold a prior above 0 (beta.priors), or, for one β, use preset dpo")
    # every call failed: the cause said (the warning that knew it came after the refusal, never shown)
    failed = tmp_path / "failed.parquet"
    ids = read_pairs(str(uf_pairs))[0].column("pair_id").to_pylist()
    write_annotations(failed, uf_pairs, ids, [None] * len(ids), [None] * len(ids), [None] * len(ids))
    result = run_cli("plan", uf_pairs, "--preset", "sp2dpo", "--annotations", failed, "-o", out, check=False)
    assert one_line_error(result) == (
        f"error: file {failed}, field 'beta': a per-pair β that gives every preference pair β = 0.1: no pair has a "
        "valid annotation, so the plan would be plain DPO with one β; 994 of the 994 preference pairs are "
        "unannotated and get the global β 0.1 instead of a per-pair β: 994 got no valid annotation (its reason "
        "column says why; perpair annotate --retry-failed asks failed calls again)")
    plain = run_cli("plan", uf_pairs, "--preset", "dpo", "-o", tmp_path / "dpo.parquet")  # one β asked for
    assert "warning" not in plain.stderr and read_plan(tmp_path / "dpo.parquet")[1]["warnings"] == []


def test_output_naming_an_input_is_refused(uf_pairs, ratings_annotations, tmp_path):
    pairs = tmp_path / "pairs.parquet"
    pairs.write_bytes(uf_pairs.read_bytes())
    annotations = tmp_path / "ann.parquet"
    annotations.write_bytes(ratings_annotations.read_bytes())
    before = {p: p.read_bytes() for p in (pairs, annotations)}
    for target in (pairs, annotations):
        result = run_cli("plan", pairs, "--preset", "sp2dpo", "--annotations", annotations, "-o", target, check=False)
        assert result.returncode == 2 and "would overwrite the input" in result.stderr
        assert "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann.parquet", "pairs.parquet"]


def test_a_schedule_key_the_schedule_would_not_read_is_one_error(uf_pairs, tmp_path):
    """perpair plan --preset dpo with a schedule setting a per-pair β's spread, and --json or --no-report with
    --explain alone (no plan written, no summary, no report): each was accepted and changed nothing."""
    schedule = tmp_path / "schedule.yaml"
    schedule.write_text("beta:\n  beta_min: 0.01\n")
    result = run_cli("plan", uf_pairs, "--preset", "dpo", "--config", schedule, "-o", tmp_path / "p.parquet",
                     check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: file {schedule}: beta.beta_min shapes the per-pair β of beta.kind semantic or random, and this "
        "schedule's beta.kind is global (one β for every pair): it would change nothing; drop it, or set beta.kind"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["schedule.yaml"]
    pair_id = pq.read_table(uf_pairs, columns=["pair_id"]).column("pair_id")[0].as_py()
    for options, named in ((["--json"], "--json applies"), (["--no-report"], "--no-report applies"),
                           (["--json", "--no-report"], "--json and --no-report apply")):
        result = run_cli("plan", uf_pairs, "--preset", "dpo", "--explain", pair_id, *options, check=False)
        assert result.returncode == 2 and result.stderr.strip() == (
            f"error: {named} to the plan -o writes, and only --explain is asked for: drop it, or give -o")
    assert run_cli("plan", uf_pairs, "--preset", "dpo", "--explain", pair_id).returncode == 0


def reference_cache(folder, pairs_path, pair_ids, values, model="tiny"):
    from perpair.train import reference

    key = reference.cache_key(model=model, tokenizer="t", pairs_sha256=file_sha256(pairs_path), max_length=64)
    path = reference.cache_path(folder, key)
    reference.save_cached(path, key, dict(zip(pair_ids, values, strict=True)))
    return path


def test_reference_margin_from_the_train_cache(tmp_path):
    from perpair.plan import reference as plan_reference
    from perpair.train import reference

    assert (plan_reference.KIND, plan_reference.SCHEMA_VERSION) == (reference.KIND, reference.SCHEMA_VERSION)
    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(8.0, 2.0)] * 4)
    values = [(-10.0, 5, -30.0, 10), (-8.0, 4, -4.0, 2), (-9.0, 3, -12.0, 6), (-1.0, 1, -7.0, 7)]
    cache = tmp_path / "cache"
    path = reference_cache(cache, pairs, ids, values)
    schedule = tmp_path / "reference.yaml"
    schedule.write_text("margin:\n  source: reference\ncurriculum:\n  kind: easy_to_hard\n")
    expected = [c / ct - r / rt for c, ct, r, rt in values]  # -2 + 3, -2 + 2, -3 + 2, -1 + 1
    for given in (path, cache):  # the file, or the folder it is in
        out = tmp_path / "plan.parquet"
        run_cli("plan", pairs, "--preset", "dpo", "--config", schedule, "--reference-logps", given, "-o", out)
        rows, provenance = read_plan(out)
        assert [r["difficulty"] for r in rows] == expected == [1.0, 0.0, -1.0, 0.0]
        assert [r["order"] for r in rows] == [0, 1 + (ids[1] > ids[3]), 3, 1 + (ids[3] > ids[1])]
        assert provenance["reference_logps_sha256"]
    missing = run_cli("plan", pairs, "--preset", "dpo", "--config", schedule, "-o", out, check=False)
    assert missing.returncode == 2 and "--reference-logps" in missing.stderr
    unused = run_cli("plan", pairs, "--preset", "mixdpo", "--reference-logps", path, "-o", out, check=False)
    assert unused.returncode == 2 and "read only with margin.source: reference" in unused.stderr
    other = tmp_path / "other.parquet"
    other_ids = make_pairs(other, [(8.0, 2.0)] * 4, tag="other")
    wrong = run_cli("plan", other, "--preset", "dpo", "--config", schedule, "--reference-logps", path, "-o",
                    tmp_path / "o.parquet", check=False)
    assert wrong.returncode == 2 and "computed for another pairs file" in wrong.stderr
    empty = run_cli("plan", other, "--preset", "dpo", "--config", schedule, "--reference-logps", cache, "-o",
                    tmp_path / "o.parquet", check=False)
    assert empty.returncode == 2 and "no reference log-probs of" in empty.stderr
    reference_cache(cache, pairs, ids, values, model="another")
    two = run_cli("plan", pairs, "--preset", "dpo", "--config", schedule, "--reference-logps", cache, "-o", out,
                  check=False)
    assert two.returncode == 2 and "2 reference log-prob files" in two.stderr
    assert not (tmp_path / "o.parquet").exists() and other_ids


def test_a_plan_names_the_model_whose_reference_log_probs_it_read_and_refuses_ld_dpos(tmp_path):
    """A folder holding one cache of the pairs gave its margins whichever model computed it, naming only the file
    (another model's, an LD-DPO run's weighted sums): the model is printed, and LD-DPO's values are refused."""
    from perpair.train import reference

    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(8.0, 2.0)] * 4)
    values = dict(zip(ids, [(-10.0, 5, -30.0, 10), (-8.0, 4, -4.0, 2), (-9.0, 3, -12.0, 6), (-1.0, 1, -7.0, 7)],
                      strict=True))
    schedule = tmp_path / "reference.yaml"
    schedule.write_text("margin:\n  source: reference\n")
    cases = (("named", None, "/models/other-sft", "model /models/other-sft, max_length 64"),
             ("earlier", None, None, "model 0123456789abcdef01234567 (the hash of its files), max_length 64"),
             ("ld", 0.5, "/models/other-sft", None))
    for folder, ld_alpha, name, shown in cases:
        key = reference.cache_key(model="0123456789abcdef0123456789abcdef", tokenizer="t",
                                  pairs_sha256=file_sha256(pairs), max_length=64, ld_alpha=ld_alpha)
        path = reference.cache_path(tmp_path / folder, key)
        reference.save_cached(path, key, values, model_name=name)
        out = tmp_path / f"{folder}.parquet"
        result = run_cli("plan", pairs, "--preset", "dpo", "--config", schedule, "--reference-logps",
                         tmp_path / folder, "-o", out, check=False)
        if shown is None:
            assert result.returncode == 2 and not out.exists()
            assert result.stderr.strip() == (
                f"error: --reference-logps {path}: computed for LD-DPO (ld_alpha 0.5): its values weigh each "
                "response's tokens past the shorter one's length by ld_alpha, and a margin reads log-probs; train "
                "once without ld_alpha to cache them"), result.stderr
        else:
            assert result.returncode == 0, result.stderr
            assert f"reference log-probs: {path} ({shown})" in " ".join(result.stderr.split()), result.stderr


def test_reference_log_probs_lacking_pairs_are_refused_and_a_stopped_passs_parts_are_read(tmp_path):
    """A cache that lacks pairs of the pairs file (a training of fewer steps than an epoch, or whose reference pass
    was killed) is refused, naming how many and how to compute them: those pairs got no margin, never routed and
    last in the curriculum, exit 0. Pairs the pass left out (prompt longer than max_length: trained by none) keep
    no margin; the part files a stopped pass saved are read with the file, also where it wrote no file yet."""
    from perpair.train import reference

    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(8.0, 2.0)] * 4)
    values = [(-10.0, 5, -30.0, 10), (-8.0, 4, -4.0, 2), (-9.0, 3, -12.0, 6), (-1.0, 1, -7.0, 7)]
    schedule = tmp_path / "reference.yaml"
    schedule.write_text("margin:\n  source: reference\nrouting:\n  tau: 0.5\n")
    out = tmp_path / "plan.parquet"
    cache = tmp_path / "cache"
    path = reference_cache(cache, pairs, ids[:2], values[:2])
    for given in (path, cache):
        line = _refused(run_cli("plan", pairs, "--preset", "dpo", "--config", schedule, "--reference-logps", given,
                                "-o", out, check=False))
        assert f"lacks 2 of the 4 pairs of {pairs}, e.g. {ids[2]}, {ids[3]}; a plan would give them no margin" in line
        assert f"perpair train --data {pairs} over every pair (no --plan, no --steps: one epoch)" in line
        assert not out.exists()

    key = reference.cache_key(model="tiny", tokenizer="t", pairs_sha256=file_sha256(pairs), max_length=64)
    part = path.with_name(f"{path.name}.part-1-0a1b2c3d")  # what a killed pass saved of its share
    reference.save_cached(part, key, {ids[2]: values[2]})
    line = _refused(run_cli("plan", pairs, "--preset", "dpo", "--config", schedule, "--reference-logps", cache,
                            "-o", out, check=False))
    assert (f"lacks 1 of the 4 pairs of {pairs} (a reference pass did not finish: stopped, or still running), "
            f"e.g. {ids[3]};") in line
    reference.save_cached(path, key, dict(zip(ids[:2], values[:2], strict=True)), left_out=[ids[3]])
    for given in (path, cache):
        run_cli("plan", pairs, "--preset", "dpo", "--config", schedule, "--reference-logps", given, "-o", out)
        rows, _ = read_plan(out)
        assert [r["difficulty"] for r in rows] == [1.0, 0.0, -1.0, None]  # the part's, and none for the long one
        assert [r["route"] for r in rows] == ["preference", "sft", "sft", "preference"]

    path.unlink()  # a first pass killed before it wrote the file: its parts alone
    reference.save_cached(part, key, dict(zip(ids[:3], values[:3], strict=True)), left_out=[ids[3]])
    run_cli("plan", pairs, "--preset", "dpo", "--config", schedule, "--reference-logps", cache, "-o", out)
    assert [r["difficulty"] for r in read_plan(out)[0]] == [1.0, 0.0, -1.0, None]


def test_an_earlier_perpairs_cache_says_its_lacking_pairs_may_be_too_long_ones(tmp_path):
    """A cache written before the reference pass recorded the pairs whose prompt alone fills max_length (no value,
    trained by none) lacks them, and the plan, which cannot tell them from pairs never computed, is refused: it
    said only to compute them, to a user whose cache was complete. It now says the cache is an earlier perpair's and
    that the run it names records those pairs, computing none of them; a cache of this perpair says nothing of it."""
    from perpair.train import reference

    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(8.0, 2.0)] * 3)
    values = {ids[0]: (-10.0, 5, -30.0, 10), ids[1]: (-8.0, 4, -4.0, 2)}  # ids[2]: its prompt too long
    schedule = tmp_path / "reference.yaml"
    schedule.write_text("margin:\n  source: reference\n")
    plan = ("plan", pairs, "--preset", "dpo", "--config", schedule, "--reference-logps", tmp_path / "cache", "-o",
            tmp_path / "plan.parquet")
    key = reference.cache_key(model="tiny", tokenizer="t", pairs_sha256=file_sha256(pairs), max_length=64)
    path = reference.cache_path(tmp_path / "cache", key)
    reference.save_cached(path, key, values)
    table, _ = read_artifact(path, kind=reference.KIND, schema_version=reference.SCHEMA_VERSION)
    write_artifact(path, table, kind=reference.KIND, schema_version=reference.SCHEMA_VERSION,
                   provenance={"key": key})  # as an earlier perpair wrote it
    line = _refused(run_cli(*plan, check=False))
    assert f"lacks 1 of the 3 pairs of {pairs}, e.g. {ids[2]}; a plan would give them no margin. This cache was " \
           "written by an earlier perpair, which did not record the pairs whose prompt alone fills max_length" in line
    reference.save_cached(path, key, values)  # this perpair's, lacking a pair
    line = _refused(run_cli(*plan, check=False))
    assert f"lacks 1 of the 3 pairs of {pairs}" in line and "earlier perpair" not in line
    reference.save_cached(path, key, values, left_out=[ids[2]])
    run_cli(*plan)


def test_a_reference_cache_that_cannot_be_read_is_named_never_passed_over(tmp_path):
    """A part file cut short (empty: a node lost after its rename reached the disk, before its data) made a plan
    given the folder pass over that cache for another model's cache of the same pairs, exit 0, and a reference pass
    reading it said only that it was not a readable Parquet file. Both refuse it now, naming it and that removing it
    loses nothing; another kind of file in the folder (a pairs file) is still no candidate."""
    import shutil

    from perpair.train import reference

    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(8.0, 2.0)] * 2)
    schedule = tmp_path / "reference.yaml"
    schedule.write_text("margin:\n  source: reference\n")
    cache, out = tmp_path / "cache", tmp_path / "plan.parquet"
    mine = reference_cache(cache, pairs, ids, [(-10.0, 5, -30.0, 10), (-8.0, 4, -4.0, 2)], model="mine")
    reference_cache(cache, pairs, ids, [(-1.0, 5, -1.0, 10), (-1.0, 4, -1.0, 2)], model="another")
    part = mine.with_name(f"{mine.name}.part-0-0a1b2c3d")
    part.write_bytes(b"")
    for given in (cache, mine):
        line = _refused(run_cli("plan", pairs, "--preset", "dpo", "--config", schedule, "--reference-logps", given,
                                "-o", out, check=False))
        assert f"{part}: not a readable Parquet file" in line and "remove it" in line
        assert not out.exists()
    with pytest.raises(InputError, match=r"part-0-0a1b2c3d: not a readable Parquet file .*; remove it, and the next "
                                         r"reference pass computes its pairs again"):
        reference.load_cached(mine)
    part.unlink()
    mine.unlink()
    shutil.copy(pairs, cache / "pairs.parquet")
    run_cli("plan", pairs, "--preset", "dpo", "--config", schedule, "--reference-logps", cache, "-o", out)
    # a file of the user's given by mistake is not a cache cut short: refused, and never advised removed
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    line = _refused(run_cli("plan", pairs, "--preset", "dpo", "--config", schedule, "--reference-logps", notes,
                            "-o", out, check=False))
    assert f"{notes}: not a readable Parquet file" in line and "remove it" not in line


def test_a_reference_cache_without_its_columns_is_one_error_naming_it(tmp_path):
    """A cache file of the right kind and key whose columns are not a cache's (edited, or another program's) ended
    the plan and the reference pass in pyarrow's KeyError traceback; now one error naming the file."""
    from perpair.errors import InputError
    from perpair.train import reference

    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(8.0, 2.0)] * 2)
    schedule = tmp_path / "reference.yaml"
    schedule.write_text("margin:\n  source: reference\n")
    cache = reference_cache(tmp_path / "cache", pairs, ids, [(-10.0, 5, -30.0, 10), (-8.0, 4, -4.0, 2)])
    table = pq.read_table(cache)
    pq.write_table(table.drop_columns(["chosen_logps"]).replace_schema_metadata(table.schema.metadata), cache)
    out = tmp_path / "plan.parquet"
    line = _refused(run_cli("plan", pairs, "--preset", "dpo", "--config", schedule, "--reference-logps", cache, "-o",
                            out, check=False))
    assert line == (f"error: reference log-probs {cache}: no column 'chosen_logps' of double values; remove it, and "
                    "the next reference pass computes its pairs again")
    assert not out.exists()
    with pytest.raises(InputError, match="no column 'chosen_logps'"):
        reference.load_cached(cache)


@pytest.mark.parametrize("left_out", ["p1", 5, None, [1]])
def test_a_reference_cache_whose_left_out_is_not_a_list_of_ids_is_one_error_naming_it(tmp_path, left_out):
    """A cache file whose provenance's left_out (the pairs with no value) is not a list of pair ids (edited, or
    another program's): a number ended the plan and the reference pass in a TypeError traceback, a string was read
    as its letters, pair ids that a training's reference pass wrote back into the cache, exit 0. Now one error
    naming the file."""
    from perpair.train import reference

    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(8.0, 2.0)] * 2)
    schedule = tmp_path / "reference.yaml"
    schedule.write_text("margin:\n  source: reference\n")
    cache = reference_cache(tmp_path / "cache", pairs, ids, [(-10.0, 5, -30.0, 10), (-8.0, 4, -4.0, 2)])
    table, provenance = read_artifact(cache, kind=reference.KIND, schema_version=reference.SCHEMA_VERSION)
    write_artifact(cache, table, kind=reference.KIND, schema_version=reference.SCHEMA_VERSION,
                   provenance={**provenance, "left_out": left_out})
    out = tmp_path / "plan.parquet"
    said = (f"reference log-probs {cache}: its provenance's left_out is not a list of pair ids; remove it, and the "
            "next reference pass computes its pairs again")
    result = run_cli("plan", pairs, "--preset", "dpo", "--config", schedule, "--reference-logps", cache, "-o", out,
                     check=False)
    assert result.returncode == 2 and result.stderr.splitlines() == ["error: " + said], result.stderr
    assert not out.exists()
    with pytest.raises(InputError, match=re.escape(said)):
        reference.load_cached(cache)


def test_run_refuses_a_reference_margin_for_a_loss_without_reference_at_validation(tmp_path):
    """``perpair run`` plans reference margins from the log-probs it computes for an arm's training
    (tests/test_run_pipeline.py); a reference-free loss has none, and is refused before any work."""
    from perpair.errors import PerpairError
    from perpair.pipeline import RunConfig, run

    config = {"workdir": str(tmp_path / "work"), "model": "smollm2", "data": {"sources": ["x.jsonl"]},
              "arms": {"ref": {"preset": "dpo", "schedule": {"margin": {"source": "reference"}},
                               "train": {"loss": "simpo"}}},
              "eval": {"preference": None, "alpaca_eval": None}}
    with pytest.raises(PerpairError, match=r"arms\.ref: margin.source 'reference' reads the reference log-probs .* "
                                           r"loss 'simpo' uses no reference"):
        run(RunConfig.model_validate(config), log=lambda line: None)
    assert not (tmp_path / "work").exists()


def test_report_names_its_inputs_and_shows_escaped_examples(tmp_path):
    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(9.0, 1.0), (5.0, 5.0), (8.0, 2.0), (7.0, 6.0)], tag="<script>x</script>&")
    annotations = tmp_path / "ann.parquet"
    write_annotations(annotations, pairs, ids, ["safety", "no_clear_gap", None, "unknown"], [3.0, 0.0, None, 1.0],
                      [0.9, 1.0, None, 1.0])
    out = tmp_path / "plan.parquet"
    run_cli("plan", pairs, "--preset", "sp2dpo+mixdpo", "--annotations", annotations, "-o", out)
    page = (tmp_path / "plan_report" / "index.html").read_text()
    assert f"pairs file {html.escape(str(pairs))}" in page and "command <code>perpair plan " in page
    assert "<script>" not in page and "question &lt;script&gt;x&lt;/script&gt;&amp;0" in page
    section = page[page.index("Example pairs"):]
    rows, _ = read_plan(out)
    for row in rows:  # every pair is the first of its route and category here: each is shown
        category = row["category"] or "unannotated"
        assert f"<td>{row['route']}</td><td>{category}</td><td><code>{row['pair_id']}</code>" in section
    assert rows[1]["route"] == "sft" and rows[3]["category"] == "unknown"


def test_the_reports_examples_show_a_flipped_pair_as_trained(tmp_path):
    """A pair mislabeled.action flip swaps trains the file's rejected response as chosen (and an SFT route imitates
    it); the report's examples showed the file's columns under "chosen" and "rejected", the other way round."""
    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(9.0, 1.0), (8.0, 2.0)])
    annotations = tmp_path / "ann.parquet"
    write_annotations(annotations, pairs, ids, ["mislabeled", "safety"], [3.0, 3.0], [0.9, 0.9])
    schedule = tmp_path / "flip.yaml"
    schedule.write_text("mislabeled:\n  action: flip\n")
    run_cli("plan", pairs, "--preset", "sp2dpo", "--annotations", annotations, "--config", schedule, "-o",
            tmp_path / "plan.parquet")
    section = (tmp_path / "plan_report" / "index.html").read_text().split("Example pairs", 1)[1]
    assert "<th>chosen (as trained)</th><th>rejected (as trained)</th>" in section
    flipped, kept = (section[section.index(f"<code>{pid}</code>"):].split("</tr>", 1)[0] for pid in ids)
    assert section.count("(flipped: the file's rejected response is chosen here)") == 1
    assert flipped.index("bad answer 0") < flipped.index("good answer 0")  # chosen column first
    assert kept.index("good answer 1") < kept.index("bad answer 1")


def test_json_summary_and_piped_table_width(uf_pairs, tmp_path):
    result = run_cli("plan", uf_pairs, "--preset", "mixdpo", "-o", tmp_path / "p.parquet", "--json")
    summary = json.loads(result.stdout)
    assert summary["counts"]["routes"] == {"preference": 884, "sft": 110, "drop": 0}
    assert summary["beta_preference"] == {"min": 0.01, "max": 0.01, "geomean": pytest.approx(0.01)}
    assert summary["plan"] == str(tmp_path / "p.parquet") and "explain" not in summary
    # --explain beside --json: the explanation in the JSON (it was printed before it, stdout no JSON then)
    pair_id = read_pairs(str(uf_pairs))[0].column("pair_id")[0].as_py()
    result = run_cli("plan", uf_pairs, "--preset", "mixdpo", "-o", tmp_path / "e.parquet", "--json", "--explain",
                     pair_id)
    explained = json.loads(result.stdout)["explain"]
    assert list(explained) == [pair_id] and pair_id in explained[pair_id] and "β" in explained[pair_id]
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"COLUMNS": "30"}
    piped = subprocess.run([sys.executable, "-m", "perpair", "plan", str(uf_pairs), "--preset", "mixdpo", "-o",
                            str(tmp_path / "q.parquet")], capture_output=True, text=True, env=env, check=True)
    assert "│ route preference" in piped.stdout and "884 (88.9%)" in piped.stdout
    assert max(len(line) for line in piped.stdout.splitlines()) > 30


def test_unknown_category_prior_is_in_the_schedule():
    from perpair.plan import resolve_schedule

    assert resolve_schedule("sp2dpo").beta.priors.unknown == 0.5
    assert resolve_schedule("sp2dpo", overrides={"beta": {"priors": {"unknown": 0.2}}}).beta.priors.unknown == 0.2


def _refused(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_output_that_is_empty_or_a_folder_is_refused(tmp_path, monkeypatch):
    """-o '' and -o . used to end in a traceback (PosixPath('.') has an empty name); a folder, a path under a file
    and an empty path are refused before planning, nothing written."""
    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(8.0, 2.0), (5.0, 4.0)])
    (tmp_path / "a file").write_text("x")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for output, says in (("", "-o/--output: an empty path"), (".", "-o/--output .: a folder; name a file"),
                         (tmp_path, "a folder; name a file"), (tmp_path / "a file" / "p.parquet", "is a file")):
        assert says in _refused(run_cli("plan", pairs, "--preset", "dpo", "-o", output, check=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # another perpair artifact in the way (the pairs themselves, or annotations): refused, not replaced
    held = pairs.read_bytes()
    (tmp_path / "copy.parquet").write_bytes(held)
    line = _refused(run_cli("plan", pairs, "--preset", "dpo", "-o", tmp_path / "copy.parquet", check=False))
    assert line.endswith("copy.parquet: holds perpair pairs, which writing plan there would destroy; name another file")
    assert (tmp_path / "copy.parquet").read_bytes() == held
    # the report's folder taken by a file: refused before planning (the plan was written, then the report failed
    # with 'File exists')
    (tmp_path / "p_report").write_text("x")
    line = _refused(run_cli("plan", pairs, "--preset", "dpo", "-o", tmp_path / "p.parquet", check=False))
    assert line.endswith("its report goes to " + str(tmp_path / "p_report") + ", which is a file; move it, name "
                         "another -o, or give --no-report")
    assert not (tmp_path / "p.parquet").exists()
    assert run_cli("plan", pairs, "--preset", "dpo", "-o", tmp_path / "p.parquet", "--no-report").returncode == 0


def test_a_global_beta_plan_keeps_the_annotations_categories(tmp_path):
    """dpo reads no β from the annotations, but its plan records each pair's category (the plan report's β by
    category, perpair run's dpo arm): --annotations is taken, not refused."""
    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(8.0, 2.0), (5.0, 4.0), (6.0, 6.0)])
    annotations = tmp_path / "ann.parquet"
    write_annotations(annotations, pairs, ids, ["style", "mislabeled", "safety"], [1.0, 2.0, 3.0], [0.9] * 3)
    out = tmp_path / "plan.parquet"
    run_cli("plan", pairs, "--preset", "dpo", "--annotations", annotations, "-o", out)
    table = pq.read_table(out)
    assert table.column("category").to_pylist() == ["style", "mislabeled", "safety"]
    assert set(table.column("beta").to_pylist()) == {0.1}


def test_write_errors_name_the_destination_not_the_temporary_file(tmp_path, monkeypatch):
    """Artifacts are written to `.NAME.tmp-PID-THREAD` and renamed: an error (a folder in the way, Arrow failing to
    open the file on a read-only file system) names the path asked for, never that temporary name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from perpair import artifacts

    folder = tmp_path / "plan.parquet"
    folder.mkdir()
    table = pa.table({"x": [1]})
    with pytest.raises(IsADirectoryError) as caught:
        artifacts.write_artifact(folder, table, kind="plan", schema_version=1, provenance={})
    assert caught.value.filename == str(folder) and ".tmp-" not in str(caught.value)
    with pytest.raises(IsADirectoryError) as caught:
        artifacts.write_text_atomic(folder, "text")
    assert caught.value.filename == str(folder) and ".tmp-" not in str(caught.value)

    def read_only(table, where, **options):  # what Arrow raises there: no errno, no filename, only a message
        raise OSError(f"Failed to open local file '{where}'. Detail: [errno 30] Read-only file system")

    monkeypatch.setattr(pq, "write_table", read_only)
    target = tmp_path / "rofs" / "a.parquet"
    with pytest.raises(OSError) as caught:
        artifacts.write_artifact(target, table, kind="plan", schema_version=1, provenance={})
    assert (caught.value.filename, caught.value.strerror) == (str(target), "Read-only file system")
    assert list(target.parent.iterdir()) == []


def test_settings_that_change_nothing_are_warnings(tmp_path):
    """A routing rule that routes no pair, or a curriculum by margin over equal margins, leaves the plan as it
    would be without it: the plan says so (stderr, provenance, report) instead of looking like MixDPO."""
    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(8.0, 3.0)] * 5)  # one margin, 5, and no tie
    out = tmp_path / "mixdpo.parquet"
    result = run_cli("plan", pairs, "--preset", "mixdpo", "-o", out)
    rows, provenance = read_plan(out)
    assert {r["route"] for r in rows} == {"preference"}
    tau, curriculum = provenance["warnings"]
    assert tau.startswith("routing.tau 0.5 routes no pair to sft") and "the smallest is 5" in tau
    assert curriculum.startswith("curriculum.kind easy_to_hard orders by margin") and "(5)" in curriculum
    assert result.stderr.count("warning:") == 2
    page = (tmp_path / "mixdpo_report" / "index.html").read_text()
    assert all(html.escape(w) in page for w in provenance["warnings"])
    schedule = tmp_path / "quantile.yaml"
    schedule.write_text("routing: {tau: null, quantile: 0.1}\ncurriculum: {kind: none}\n")  # 0.1 of 5 pairs: none
    run_cli("plan", pairs, "--preset", "mixdpo", "--config", schedule, "-o", out)
    assert read_plan(out)[1]["warnings"] == ["routing.quantile 0.1 routes no pair to sft: 0.1 of the 5 pairs with a "
                                             "margin is less than one"]
    spread = tmp_path / "spread.parquet"
    make_pairs(spread, [(8.0, 3.0), (7.0, 7.0), (9.0, 2.0)], tag="spread")
    plain = run_cli("plan", spread, "--preset", "mixdpo", "-o", tmp_path / "plain.parquet")
    assert "warning" not in plain.stderr and read_plan(tmp_path / "plain.parquet")[1]["warnings"] == []


def test_sft_on_a_chosen_response_the_ratings_call_worse_is_a_warning(tmp_path):
    """MixDPO's τ routes the ties to SFT on the chosen response; a pair whose rejected response scored higher has a
    margin below τ too, and SFT would train on the response its ratings call worse: the plan says so."""
    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(8.0, 3.0), (7.0, 7.0), (2.0, 9.0), (9.0, 2.0)], tag="reversed")
    out = tmp_path / "mixdpo.parquet"
    result = run_cli("plan", pairs, "--preset", "mixdpo", "-o", out)
    rows, provenance = read_plan(out)
    assert sorted(r["route"] for r in rows) == ["preference", "preference", "sft", "sft"]  # MixDPO's rule, kept
    (warning,) = provenance["warnings"]
    assert warning.startswith("1 pairs routed to sft have a negative margin (the rejected response has the higher")
    assert result.stderr.count("warning:") == 1
    drop = tmp_path / "drop.yaml"
    drop.write_text("routing: {action: drop}\n")  # dropped, not imitated: nothing to say
    run_cli("plan", pairs, "--preset", "mixdpo", "--config", drop, "-o", out)
    assert read_plan(out)[1]["warnings"] == []


def test_pairs_flipped_against_their_ratings_and_routed_to_sft_are_named_as_such(tmp_path):
    """mixdpo with mislabeled.action flip: a pair the teacher calls mislabeled is swapped, its ratings margin negated
    (as trained), so it falls below τ and is routed to SFT on the response its ratings call worse. The warning told
    the user to check their labels, which the ratings confirm; it now says the teacher and the ratings disagree."""
    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(9.0, 2.0), (8.0, 3.0), (7.0, 7.0), (9.0, 1.0)], tag="flipped")
    annotations = tmp_path / "ann.parquet"
    write_annotations(annotations, pairs, ids, ["mislabeled", "style", "style", "style"], [3.0, 1.0, 1.0, 1.0],
                      [0.9, 0.8, 0.8, 0.8])
    schedule = tmp_path / "flip.yaml"
    schedule.write_text("mislabeled:\n  action: flip\n  threshold: 0.5\n")
    out = tmp_path / "plan.parquet"
    run_cli("plan", pairs, "--preset", "mixdpo", "--annotations", annotations, "--config", schedule, "-o", out)
    rows, provenance = read_plan(out)
    first = next(r for r in rows if r["pair_id"] == ids[0])
    assert first["flipped"] and first["route"] == "sft"  # the rule as it stands: SFT on the swapped chosen
    (warning,) = provenance["warnings"]
    assert warning.startswith("1 pairs routed to sft have a negative margin (the rejected response has the higher")
    assert "1 of them are pairs mislabeled.action flip swapped against their ratings" in warning, warning


def test_a_plan_with_no_preference_pair_is_refused(tmp_path):
    """τ above every margin routes every pair to SFT: β and label smoothing would act on nothing, and the
    'preference' plan would train SFT alone. Refused, saying why, and nothing is written."""
    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(8.0, 3.0), (7.0, 7.0), (9.0, 2.0)])
    schedule = tmp_path / "tau.yaml"
    schedule.write_text("routing: {tau: 100}\n")
    out = tmp_path / "plan.parquet"
    result = run_cli("plan", pairs, "--preset", "mixdpo", "--config", schedule, "-o", out, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "no pair is left on the preference route (preference 0, sft 3, drop 0)" in line
    assert "routing.tau 100 routes 3 pairs to sft (the largest margin is 7)" in line
    assert not out.exists() and not (tmp_path / "plan_report").exists()
    ties = tmp_path / "ties.parquet"
    make_pairs(ties, [(7.0, 7.0)] * 3, tag="ties")  # MixDPO on ties only: SFT alone
    assert run_cli("plan", ties, "--preset", "mixdpo", "-o", out, check=False).returncode == 2


def test_unannotated_pairs_under_a_per_pair_beta_are_a_warning(tmp_path):
    """Pairs the annotations leave without a category fall back to the global β: the plan says how many and why
    (no row: annotated with --limit or one --shard; a row without a category: the teacher calls failed)."""
    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(8.0, 3.0)] * 6)
    annotations = tmp_path / "ann.parquet"
    write_annotations(annotations, pairs, ids[:4], ["safety", "style", None, None], [3.0, 1.0, None, None],
                      [0.9, 0.8, None, None])
    out = tmp_path / "plan.parquet"
    result = run_cli("plan", pairs, "--preset", "sp2dpo", "--annotations", annotations, "-o", out)
    (warning,) = read_plan(out)[1]["warnings"]
    assert warning.startswith("4 of the 6 preference pairs are unannotated and get the global β 0.1 instead of a "
                              "per-pair β: 2 have no row in ")
    assert "; 2 got no valid annotation" in warning and "--retry-failed" in warning
    assert "warning: 4 of the 6 preference pairs are unannotated" in result.stderr
    # One β for every pair asked for (dpo): the annotations only label the report, nothing falls back.
    dpo = run_cli("plan", pairs, "--preset", "dpo", "--annotations", annotations, "-o", tmp_path / "dpo.parquet")
    assert "warning" not in dpo.stderr and read_plan(tmp_path / "dpo.parquet")[1]["warnings"] == []


def test_unannotated_pairs_under_a_mislabeled_action_are_a_warning(tmp_path):
    """mislabeled.action drop or flip acts on the pairs the annotations call mislabeled: under a global β (mixdpo,
    dpo) the pairs the annotations leave out were kept as labelled without a word, the plan's only warning being
    for a per-pair β. Now the same warning counts them."""
    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(8.0, 3.0), (7.0, 5.0), (9.0, 2.0), (6.0, 4.0), (5.0, 5.0), (8.0, 1.0)])
    annotations = tmp_path / "ann.parquet"
    write_annotations(annotations, pairs, ids[:2], ["mislabeled", "style"], [3.0, 1.0], [0.9, 0.8])
    schedule = tmp_path / "schedule.yaml"
    for preset, action, first, preference in (("mixdpo", "drop", "drop", 4), ("dpo", "flip", "preference", 6)):
        schedule.write_text(f"mislabeled:\n  action: {action}\n")
        out = tmp_path / f"{action}.parquet"
        result = run_cli("plan", pairs, "--preset", preset, "--annotations", annotations, "--config", schedule,
                         "-o", out)
        rows, provenance = read_plan(out)
        assert rows[0]["route"] == first and rows[0]["flipped"] == (action == "flip")
        (warning,) = provenance["warnings"]
        unannotated = preference - 1 if action == "drop" else preference - 2
        assert warning.startswith(f"{unannotated} of the {preference} preference pairs are unannotated and get no "
                                  f"check for a mislabeled pair (mislabeled.action {action}: kept as labelled): "
                                  f"{unannotated} have no row in "), warning
        assert f"warning: {warning}" in result.stderr


def test_annotations_of_one_shard_say_so(uf_pairs, tmp_path):
    shard = tmp_path / "shard.parquet"
    run_cli("annotate", uf_pairs, "--teacher", "ratings", "--shard", "1/3", "--limit", "30", "-o", shard)
    annotated = read_artifact(shard, kind="annotations", schema_version=1)[0].num_rows
    result = run_cli("plan", uf_pairs, "--preset", "sp2dpo", "--annotations", shard, "-o", tmp_path / "p.parquet")
    (warning,) = read_plan(tmp_path / "p.parquet")[1]["warnings"]
    assert warning.startswith(f"{994 - annotated} of the 994 preference pairs are unannotated")
    assert "(annotated with --limit 30 and --shard 1/3; join the shards with perpair annotate merge)" in warning
    assert "perpair annotate merge" in result.stderr


def test_the_reports_numbers_are_the_plans(uf_pairs, ratings_annotations, tmp_path):
    """The report's summary holds the plan's numbers: its β row is the preference route's, as perpair plan prints
    it (it took every pair with a β, the SFT-routed ties too, whose β no loss reads: geometric mean 0.01103, not
    the 0.01 the schedule normalises to), and its routes and category × magnitude counts are the plan's rows."""
    out = tmp_path / "plan.parquet"
    result = run_cli("plan", uf_pairs, "--preset", "sp2dpo+mixdpo", "--annotations", ratings_annotations, "-o", out,
                     "--json")
    betas = json.loads(result.stdout)["beta_preference"]
    page = (tmp_path / "plan_report" / "index.html").read_text()
    shown = re.search(r"<th>β \(preference route\) min / geometric mean / max</th><td>([^<]*)</td>", page).group(1)
    assert shown == f"{betas['min']:.4g} / {betas['geomean']:.4g} / {betas['max']:.4g}" == "0.006056 / 0.01 / 0.01391"
    rows, _ = read_plan(out)
    for route in ("preference", "sft", "drop"):
        count = sum(r["route"] == route for r in rows)
        assert f"<tr><th>route {route}</th><td>{count}</td></tr>" in page
    grid = re.findall(r"<tr><th>(\w+)</th>((?:<td>\d+</td>){5})</tr>", page)
    assert grid
    for category, cells in grid:
        counts = [int(c) for c in re.findall(r"\d+", cells)]
        expected = [sum(r["category"] == category and r["magnitude"] == m for r in rows) for m in range(4)]
        assert counts == [*expected, sum(expected)]


def _two_pairs_annotated(tmp_path):
    """Two pairs, both annotated: a global β reaches none of them when beta.normalise is off."""
    pairs = tmp_path / "pairs.parquet"
    ids = make_pairs(pairs, [(8.0, 3.0), (7.0, 5.0)])
    annotations = tmp_path / "ann.parquet"
    write_annotations(annotations, pairs, ids, ["safety", "style"], [3.0, 1.0], [0.9, 0.8])
    return pairs, ids, annotations


def test_a_beta_that_would_change_nothing_is_refused(tmp_path):
    """--beta with a per-pair β and normalise off reaches only unannotated preference pairs: with every pair
    annotated the plan was the same with or without it, exit 0. Refused, nothing written; taken while a pair
    falls back to it."""
    pairs, ids, annotations = _two_pairs_annotated(tmp_path)
    schedule = tmp_path / "raw.yaml"
    schedule.write_text("beta: {normalise: false}\n")
    out = tmp_path / "plan.parquet"
    line = _refused(run_cli("plan", pairs, "--preset", "sp2dpo", "--annotations", annotations, "--config", schedule,
                            "--beta", "0.05", "-o", out, check=False))
    assert line.startswith("error: --beta 0.05 would change nothing: beta.normalise is off")
    assert not out.exists()
    partial = tmp_path / "partial.parquet"
    write_annotations(partial, pairs, ids[:1], ["safety"], [3.0], [0.9])
    run_cli("plan", pairs, "--preset", "sp2dpo", "--annotations", partial, "--config", schedule, "--beta", "0.05",
            "-o", out)
    assert [r["beta"] for r in read_plan(out)[0]][1] == 0.05


def test_a_beta_of_the_schedule_file_that_would_change_nothing_is_refused(tmp_path):
    """The same global β written in the schedule file (beta.beta) beside normalise off, every pair annotated: the
    file's β reached no pair, exit 0. Refused naming the file and key; --beta given, the file's is not the user's
    last word (--beta wins), and --beta's own refusal stands."""
    pairs, ids, annotations = _two_pairs_annotated(tmp_path)
    schedule = tmp_path / "raw.yaml"
    schedule.write_text("beta: {normalise: false, beta: 0.05}\n")
    out = tmp_path / "plan.parquet"
    line = _refused(run_cli("plan", pairs, "--preset", "sp2dpo", "--annotations", annotations, "--config", schedule,
                            "-o", out, check=False))
    assert line == (f"error: file {schedule}, field 'beta.beta': beta.beta 0.05 would change nothing: beta.normalise "
                    "is off, so every preference pair takes its β from its annotation (between beta.beta_min 0.025 "
                    "and beta.beta_max 0.4); drop it, or set beta.normalise: true to rescale them to it")
    assert not out.exists()
    line = _refused(run_cli("plan", pairs, "--preset", "sp2dpo", "--annotations", annotations, "--config", schedule,
                            "--beta", "0.07", "-o", out, check=False))
    assert line.startswith("error: --beta 0.07 would change nothing")
    partial = tmp_path / "partial.parquet"  # a pair falls back to it: read
    write_annotations(partial, pairs, ids[:1], ["safety"], [3.0], [0.9])
    run_cli("plan", pairs, "--preset", "sp2dpo", "--annotations", partial, "--config", schedule, "-o", out)
    assert [r["beta"] for r in read_plan(out)[0]][1] == 0.05


def test_a_bad_option_is_named_as_the_option(tmp_path):
    """`--preset bogus` said "field 'preset': unknown preset", `--beta -1` "field '--beta'" and a missing
    `--reference-logps` "file X, field '--reference-logps'": options are named as the options they are, with
    the values they take; a run's arm names its key."""
    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(8.0, 3.0), (7.0, 5.0)])
    out = tmp_path / "plan.parquet"
    line = _refused(run_cli("plan", pairs, "--preset", "bogus", "-o", out, check=False))
    assert line == "error: --preset bogus: unknown preset; expected one of dpo, sp2dpo, sp2dpo-random, mixdpo, " \
                   "sp2dpo+mixdpo"
    for beta in ("-1", "inf"):
        line = _refused(run_cli("plan", pairs, "--preset", "dpo", "--beta", beta, "-o", out, check=False))
        assert line.startswith(f"error: --beta {float(beta)}: must be a positive number")
    schedule = tmp_path / "reference.yaml"
    schedule.write_text("margin:\n  source: reference\n")
    missing = tmp_path / "nowhere"
    line = _refused(run_cli("plan", pairs, "--preset", "dpo", "--config", schedule, "--reference-logps", missing,
                            "-o", out, check=False))
    assert line == f"error: --reference-logps {missing}: no such file or folder"
    assert not out.exists()
    from perpair.pipeline import load_run_config

    config = tmp_path / "run.yaml"
    config.write_text("workdir: w\nmodel: m\ndata: {sources: [x.jsonl]}\narms: {dpo: {preset: bogus}}\n")
    with pytest.raises(InputError, match=r"arms\.dpo\.preset: unknown preset 'bogus'; expected one of dpo, "):
        load_run_config(config)
    config.write_text("workdir: w\nmodel: m\ndata: {sources: [x.jsonl]}\narms: {dpo: {preset: dpo, beta: .inf}}\n")
    with pytest.raises(InputError, match=r"arms\.dpo\.beta: Input should be a finite number"):
        load_run_config(config)
    from perpair.bench.report import check_out

    with pytest.raises(InputError, match=rf"^--out {re.escape(str(config))}: is not a folder$"):
        check_out(config)  # perpair bench's --out


def test_a_share_of_routed_pairs_is_not_rounded_to_none_or_all(tmp_path):
    """One tied pair of 2,001 on MixDPO's SFT route was "1 (0.0%)" and the other 2,000 "(100.0%)" of the pairs:
    a share that is not 0 nor all is never printed as one."""
    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(5.0, 1.0)] * 2000 + [(3.0, 3.0)])
    result = run_cli("plan", pairs, "--preset", "mixdpo", "-o", tmp_path / "plan.parquet")
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.stdout.splitlines()
             if line.count("│") == 3}
    assert lines["route preference"] == "2,000 (>99.9%)" and lines["route sft"] == "1 (<0.1%)"
    assert lines["route drop"] == "0 (0.0%)"
    from perpair.plan.report import routes_figure  # the report's routed-share plot says the same

    figure = routes_figure(np.array(["preference"] * 2000 + ["sft"], dtype=object))
    assert [t.get_text() for t in figure.axes[0].texts] == [" 2000 (>99.9%)", " 1 (<0.1%)", " 0 (0.0%)"]


def test_explain_of_a_pair_not_in_the_plan_writes_nothing(tmp_path):
    """`perpair plan -o PLAN --explain ID` with a mistyped id wrote the plan and its report, then exited 2 on the id:
    a refused command left its files behind (a plan the user may not have meant, beside an error), and the error
    named a 'field pair_id' of no file. The ids are checked before anything is written, and named as the option's."""
    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(8.0, 3.0), (7.0, 5.0)])
    out = tmp_path / "plan.parquet"
    line = _refused(run_cli("plan", pairs, "--preset", "mixdpo", "-o", out, "--explain", "deadbeef", check=False))
    assert line == f"error: --explain deadbeef: no pair of {pairs} has this id"
    assert not out.exists() and not (tmp_path / "plan_report").exists()


def test_a_plan_written_with_no_report_over_a_reported_plan_leaves_no_report_of_the_old_plan(tmp_path):
    """perpair plan --no-report over a plan written with its report left that report beside the new plan: a page
    of the other preset's β and routes, as this plan's. It goes (a file of the user's in the folder stays)."""
    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(5.0 + (i % 4), 5.0) for i in range(12)])
    plan, folder = tmp_path / "plan.parquet", tmp_path / "plan_report"
    run_cli("plan", pairs, "--preset", "mixdpo", "-o", plan)
    assert "preset mixdpo" in (folder / "index.html").read_text()
    run_cli("plan", pairs, "--preset", "dpo", "-o", plan, "--no-report")
    assert not folder.exists() and read_artifact(plan, kind="plan", schema_version=1)[1]["preset"] == "dpo"
    run_cli("plan", pairs, "--preset", "mixdpo", "-o", plan)
    (folder / "notes.txt").write_text("mine")
    run_cli("plan", pairs, "--preset", "dpo", "-o", plan, "--no-report")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
