"""AlpacaEval 2.0 metrics against the published leaderboard and the official implementation (alpaca-eval 0.6.6)."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from conftest import SHARED_DATA, run_cli
from perpair.errors import InputError
from perpair.eval.lc import FEATURES, GamedRows, fit_length_controlled, predict_from_weights, std_delta_len
from perpair.eval.metrics import win_rate_metrics
from perpair.eval.score import ScoreOptions, score_annotations
from perpair.eval.sources import read_annotations, read_difficulty_csv

AE = SHARED_DATA / "alpaca_eval"
MODELS = sorted(p.name.removesuffix(".json.gz") for p in (AE / "annotations").glob("*.json.gz"))
LEADERBOARD = pd.read_csv(AE / "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv", index_col=0)
WEIGHTS = pd.read_csv(AE / "glm_weights_length_controlled_v1.csv", index_col=0)
DIFFICULTY = read_difficulty_csv(AE / "instruction_difficulty_reconstructed.csv")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def annotations(model: str) -> pd.DataFrame:
    return read_annotations(AE / "annotations" / f"{model}.json.gz")


def test_six_models_present():
    assert len(MODELS) == 6


@pytest.mark.parametrize("model", MODELS)
def test_raw_metrics_equal_leaderboard(model):
    frame = annotations(model)
    metrics = win_rate_metrics(frame["preference"])
    published = LEADERBOARD.loc[model]
    for key in ("win_rate", "standard_error", "discrete_win_rate"):
        assert metrics[key] == pytest.approx(published[key], abs=1e-6), key
    for key in ("n_total", "n_wins", "n_wins_base", "n_draws"):
        assert metrics[key] == published[key], key


@pytest.mark.parametrize("model", MODELS)
def test_lc_from_published_weights_equals_leaderboard(model):
    result = predict_from_weights(WEIGHTS.loc[model], DIFFICULTY, WEIGHTS.loc["gpt4_1106_preview"])
    assert result.length_controlled_winrate == pytest.approx(LEADERBOARD.loc[model, "length_controlled_winrate"],
                                                             abs=1e-4)
    if not np.isnan(LEADERBOARD.loc[model, "lc_standard_error"]):
        assert result.lc_standard_error == pytest.approx(LEADERBOARD.loc[model, "lc_standard_error"], abs=1e-4)


def test_hand_worked_metrics():
    # 4 valid preferences (one legacy draw 0 → 1.5, one null dropped): (0 + 1 + 0.5 + 0.75) / 4
    metrics = win_rate_metrics([1.0, 2.0, 0, 1.75, None])
    assert metrics["win_rate"] == pytest.approx(100 * 2.25 / 4)
    assert (metrics["n_wins"], metrics["n_wins_base"], metrics["n_draws"], metrics["n_total"]) == (2, 1, 1, 4)
    assert metrics["discrete_win_rate"] == pytest.approx(100 * (0 + 1 + 0.5 + 1) / 4)
    assert metrics["standard_error"] == pytest.approx(100 * np.std([0, 1, 0.5, 0.75], ddof=1) / 2)


def _gamed_frame(models: list[str]) -> pd.DataFrame:
    """A df_gamed.csv stand-in built from real annotations (the real file is on the Hub only)."""
    parts = []
    for model in models:
        frame = annotations(model)
        parts.append(pd.DataFrame({
            "index": range(len(frame)), "preference": frame["preference"] - 1,
            "std_delta_len": std_delta_len(frame["output_1"], frame["output_2"]),
            "instruction_difficulty": DIFFICULTY[:len(frame)], "not_gamed_baseline": False, "model": model}))
    return pd.concat(parts, ignore_index=True)


def _official(frame: pd.DataFrame, gamed_csv: Path, regularize: bool) -> tuple[dict, np.ndarray, dict]:
    glm = pytest.importorskip("alpaca_eval.metrics.glm_winrate")
    info = dict(glm.GLM_INFO["length_controlled_v1" if regularize else "length_controlled_noreg"])
    frame = frame.copy()
    weights = {}
    real_fit = glm.fit_LogisticRegressionCV

    def spy(*args, **kwargs):
        model = real_fit(*args, **kwargs)
        weights.update(dict(zip(FEATURES, model.coef_[0], strict=True)))
        return model

    with mock.patch.object(glm, "hf_hub_download", lambda **kwargs: str(gamed_csv)), \
            mock.patch.object(glm, "fit_LogisticRegressionCV", spy), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = glm.get_length_controlled_winrate(frame, save_weights_dir=None, glm_info=info)
    return metrics, frame["glm_preference"].to_numpy(), weights


@pytest.mark.parametrize(("model", "regularize"), [("claude-2.1", True), ("gpt-3.5-turbo-1106", True),
                                                   ("OpenHermes-2.5-Mistral-7B", False)])
def test_glm_fit_equals_official(tmp_path, model, regularize):
    gamed = _gamed_frame(["alpaca-7b", "gemma-7b-it"])
    gamed_csv = tmp_path / "df_gamed.csv"
    gamed.to_csv(gamed_csv, index=False)
    frame = annotations(model)
    metrics, glm_pref, weights = _official(frame, gamed_csv, regularize)

    ours = fit_length_controlled(frame["preference"], std_delta_len(frame["output_1"], frame["output_2"]),
                                 DIFFICULTY, GamedRows.from_frame(pd.read_csv(gamed_csv)) if regularize else None)
    assert ours.length_controlled_winrate == pytest.approx(metrics["length_controlled_winrate"], abs=1e-6)
    assert ours.lc_standard_error == pytest.approx(metrics["lc_standard_error"], abs=1e-6)
    np.testing.assert_allclose(ours.glm_preference, glm_pref, atol=1e-6)
    for feature in FEATURES:
        assert ours.weights[feature] == pytest.approx(weights[feature], abs=1e-6)


def test_glm_fit_with_missing_preferences_equals_official(tmp_path):
    gamed_csv = tmp_path / "df_gamed.csv"
    _gamed_frame(["alpaca-7b"]).to_csv(gamed_csv, index=False)
    frame = annotations("gemma-7b-it")
    frame.loc[[3, 50, 400], "preference"] = np.nan
    metrics, _, _ = _official(frame, gamed_csv, True)
    ours = fit_length_controlled(frame["preference"], std_delta_len(frame["output_1"], frame["output_2"]),
                                 DIFFICULTY, GamedRows.from_frame(pd.read_csv(gamed_csv)))
    assert ours.length_controlled_winrate == pytest.approx(metrics["length_controlled_winrate"], abs=1e-6)
    assert win_rate_metrics(frame["preference"])["win_rate"] == pytest.approx(metrics["win_rate"], abs=1e-9)


def test_score_offline_says_approximation(tmp_path):
    records = json.load(gzip.open(AE / "annotations" / "alpaca-7b.json.gz"))
    for record in records:
        record["generator_2"] = "a-model-without-published-weights"
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(records))
    row = score_annotations(path, ScoreOptions(difficulty=AE / "instruction_difficulty_reconstructed.csv",
                                               glm_weights=AE / "glm_weights_length_controlled_v1.csv", data_dir=AE))
    assert row["lc_method"] == "fit_offline_approximation"
    assert row["lc_is_approximation"] and "0.5 to 3 points" in row["lc_note"]
    assert row["lc_published_weights"] is None
    assert abs(row["length_controlled_winrate"] - LEADERBOARD.loc["alpaca-7b", "length_controlled_winrate"]) < 3


def test_difficulties_are_read_by_their_instruction_index_not_row_position(tmp_path):
    """alpaca_eval reads instruction k's difficulty at index k; read by position, a file with its rows in another
    order gave each instruction another's difficulty (a model without published weights: LC 19.6, not 6.6, exit 0),
    and an index missing or given twice went unseen."""
    frame = pd.read_csv(AE / "instruction_difficulty_reconstructed.csv")
    shuffled = tmp_path / "shuffled.csv"
    frame.sample(frac=1, random_state=0).to_csv(shuffled, index=False)
    np.testing.assert_array_equal(read_difficulty_csv(shuffled), DIFFICULTY)
    records = json.load(gzip.open(AE / "annotations" / "alpaca-7b.json.gz"))
    for record in records:
        record["generator_2"] = "a-model-without-published-weights"
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(records))
    rows = [score_annotations(path, ScoreOptions(difficulty=difficulty, data_dir=AE))["length_controlled_winrate"]
            for difficulty in (AE / "instruction_difficulty_reconstructed.csv", shuffled)]
    assert rows[0] == pytest.approx(rows[1], abs=1e-9)
    twice = tmp_path / "twice.csv"
    frame.assign(index=frame["index"].where(frame.index != 5, 4)).to_csv(twice, index=False)
    with pytest.raises(InputError) as info:
        read_difficulty_csv(twice)
    assert (info.value.row, info.value.field) == (6, "index"), str(info.value)


@pytest.mark.parametrize("name", ["glm_weights", "leaderboard"])
def test_published_tables_with_a_bad_cell_or_a_model_twice_are_refused_with_file_and_row(tmp_path, name):
    """A weight or leaderboard figure not a number, or a model on two rows, was float()'s or pandas' traceback;
    an empty weight was a NaN."""
    source = AE / ("glm_weights_length_controlled_v1.csv" if name == "glm_weights"
                   else "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv")
    frame = pd.read_csv(source, index_col=0)
    row = frame.index.get_loc("alpaca-7b")
    column = "instruction_difficulty" if name == "glm_weights" else "win_rate"
    for value, words in (("abc", "not a number ('abc')"), ("", "empty")):
        bad = frame.astype({column: object})
        bad.loc["alpaca-7b", column] = value
        path = tmp_path / f"{name}.csv"
        bad.to_csv(path)
        result = run_cli("eval", "score", "--offline", "--data-dir", AE, f"--{name.replace('_', '-')}", path,
                         AE / "annotations" / "alpaca-7b.json.gz", check=False)
        assert result.returncode == 2 and f"row {row + 1}, field '{column}': {words}" in result.stderr, result.stderr
    pd.concat([frame, frame.loc[["alpaca-7b"]]]).to_csv(path)
    result = run_cli("eval", "score", "--offline", "--data-dir", AE, f"--{name.replace('_', '-')}", path,
                     AE / "annotations" / "alpaca-7b.json.gz", check=False)
    assert result.returncode == 2 and "model alpaca-7b on two rows" in result.stderr and "Traceback" not in \
        result.stderr, result.stderr


def test_cli_score_json_has_leaderboard_keys():
    files = [AE / "annotations" / f"{m}.json.gz" for m in ("claude-2.1", "gemma-7b-it")]
    result = run_cli("eval", "score", "--json", "--offline", "--difficulty",
                     AE / "instruction_difficulty_reconstructed.csv",
                     "--glm-weights", AE / "glm_weights_length_controlled_v1.csv",
                     "--leaderboard", AE / "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv", "--data-dir", AE,
                     *files)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["name"] for r in rows] == ["claude-2.1", "gemma-7b-it"]
    for row in rows:
        published = LEADERBOARD.loc[row["name"]]
        for key in ("win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total",
                    "discrete_win_rate", "avg_length", "length_controlled_winrate"):
            assert row[key] == pytest.approx(published[key], abs=1e-4), key
        assert row["lc_method"] == "published_weights"
        assert row["lc_fit"]["note"].startswith("approximation")
    table = run_cli("eval", "score", "--offline", "--data-dir", AE, *files).stdout
    published = LEADERBOARD.loc["claude-2.1", "length_controlled_winrate"]
    assert "claude-2.1" in table and f"{published:.2f}" in table


def test_cli_score_six_models_unchanged():
    # every shipped file, scored as a user would (the data folder gives difficulties, weights and leaderboard)
    files = [AE / "annotations" / f"{m}.json.gz" for m in MODELS]
    result = run_cli("eval", "score", "--json", "--offline", "--no-fit", "--data-dir", AE, *files)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["name"] for r in rows] == MODELS
    for row in rows:
        published = LEADERBOARD.loc[row["name"]]
        for key in ("win_rate", "standard_error", "discrete_win_rate"):
            assert row[key] == pytest.approx(published[key], abs=1e-6), key
        for key in ("n_wins", "n_wins_base", "n_draws", "n_total", "avg_length"):
            assert row[key] == published[key], key
        assert row["length_controlled_winrate"] == pytest.approx(published["length_controlled_winrate"], abs=1e-4)
        assert row["lc_method"] == "published_weights" and not row["lc_is_approximation"]


def _renamed(tmp_path, model: str, generator: str):
    records = json.load(gzip.open(AE / "annotations" / f"{model}.json.gz"))
    for record in records:
        record["generator_2"] = generator
    path = tmp_path / f"{model}-as-{generator}.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize(("model", "generator"), [("alpaca-7b", "claude-2.1"), ("claude-2.1", "gemma-7b-it"),
                                                  ("gemma-7b-it", "example")])
def test_a_renamed_file_is_not_scored_with_the_other_models_weights(tmp_path, model, generator):
    # `example` has published weights but no leaderboard row (issue 14: LC 0.22 instead of 86.46, flagged exact)
    path = _renamed(tmp_path, model, generator)
    result = run_cli("eval", "score", "--json", "--offline", "--data-dir", AE, path)
    row = json.loads(result.stdout)
    assert row["name"] == generator
    assert row["lc_method"] == "fit_offline_approximation" and row["lc_is_approximation"]
    assert row["lc_published_weights"] is None
    assert "Published weights not used: " in row["lc_note"] and repr(generator) in row["lc_note"]
    wrong = predict_from_weights(WEIGHTS.loc[generator], DIFFICULTY, WEIGHTS.loc["gpt4_1106_preview"])
    assert abs(row["length_controlled_winrate"] - wrong.length_controlled_winrate) > 3
    assert abs(row["length_controlled_winrate"] - LEADERBOARD.loc[model, "length_controlled_winrate"]) < 3
    table = run_cli("eval", "score", "--offline", "--data-dir", AE, path).stdout
    assert "Published weights not used" in table  # the reason is printed, not only in --json

    # --name gives the file its model back: the published weights, exactly
    named = json.loads(run_cli("eval", "score", "--json", "--offline", "--no-fit", "--data-dir", AE,
                               "--name", model, path).stdout)
    assert named["lc_method"] == "published_weights"
    assert named["length_controlled_winrate"] == pytest.approx(LEADERBOARD.loc[model, "length_controlled_winrate"],
                                                               abs=1e-4)


def test_a_file_without_generator_2_is_named_by_its_whole_file_name(tmp_path):
    """Without generator_2 a file's model is its file's name: gpt-3.5-turbo-1106.json was scored as `gpt-3` (cut at
    the first dot), whose published weights there are none of, and shown under that other name."""
    records = json.load(gzip.open(AE / "annotations" / "gpt-3.5-turbo-1106.json.gz"))
    for record in records:
        record.pop("generator_2")
    for file in ("gpt-3.5-turbo-1106.json", "gpt-3.5-turbo-1106.json.gz"):
        path = tmp_path / file
        with (gzip.open(path, "wt") if file.endswith(".gz") else open(path, "w")) as handle:
            json.dump(records, handle)
        row = json.loads(run_cli("eval", "score", "--json", "--offline", "--no-fit", "--data-dir", AE, path).stdout)
        assert row["name"] == "gpt-3.5-turbo-1106" and row["lc_method"] == "published_weights"
        assert row["length_controlled_winrate"] == pytest.approx(
            LEADERBOARD.loc["gpt-3.5-turbo-1106", "length_controlled_winrate"], abs=1e-4)


def test_more_rows_than_alpaca_eval_has_get_raw_figures_and_no_lc(tmp_path):
    """A file with a row twice (806 rows) was an error, no figure at all, where a file with a row left out gets its
    raw figures and no LC; an alpaca-eval run on a --reference of more than 805 instructions ended so after every
    answer was generated and judged."""
    records = json.load(gzip.open(AE / "annotations" / "alpaca-7b.json.gz"))
    path = tmp_path / "twice.json"
    path.write_text(json.dumps([*records, records[10]]))
    row = json.loads(run_cli("eval", "score", "--json", "--offline", "--data-dir", AE, path).stdout)
    assert (row["n_total"], row["length_controlled_winrate"], row["lc_method"]) == (806, None, None)
    assert row["lc_note"] == "no LC: 806 rows, and AlpacaEval has 805 instructions"
    assert row["win_rate"] == pytest.approx(win_rate_metrics(
        [r["preference"] for r in [*records, records[10]]])["win_rate"])


def test_score_offline_without_the_official_rows_gives_no_lc(tmp_path, monkeypatch):
    """`eval score --offline --difficulty FILE` without a data folder read each row's difficulty by its position
    with no official rows to check the file against: a shuffled file got an LC of other instructions'
    difficulties (by the fit, or by the published weights of the model whose leaderboard row it matches). Now, as
    `alpaca-eval` given an unchecked --reference, it gets no LC and a note saying how to get one; its raw figures
    stand, exit 0."""
    monkeypatch.delenv("PERPAIR_ALPACA_EVAL_DATA", raising=False)
    records = json.load(gzip.open(AE / "annotations" / "claude-2.1.json.gz"))
    shuffled = tmp_path / "claude-2.1.json"
    shuffled.write_text(json.dumps([records[i] for i in np.random.default_rng(0).permutation(len(records))]))
    lc_files = ("--difficulty", AE / "instruction_difficulty_reconstructed.csv",
                "--glm-weights", AE / "glm_weights_length_controlled_v1.csv",
                "--leaderboard", AE / "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv")
    for options in ((), ("--no-fit",)):
        row = json.loads(run_cli("eval", "score", "--json", "--offline", *lc_files, *options, shuffled).stdout)
        assert row["length_controlled_winrate"] is None and row["lc_method"] is None, options
        assert row["lc_note"] == (
            "no LC: offline, the rows cannot be checked against AlpacaEval's instructions in the official order and "
            "the gpt4_1106_preview baseline's outputs, whose positions the length-controlled GLM reads: give a "
            "data folder holding reference_outputs_gpt4_1106_preview.json.gz (--data-dir), or score online")
        assert row["win_rate"] == pytest.approx(LEADERBOARD.loc["claude-2.1", "win_rate"], abs=1e-4)
    table = run_cli("eval", "score", "--offline", *lc_files, shuffled).stdout
    assert "no LC: offline, the rows cannot be checked" in " ".join(table.split())
    # with the data folder the rows are checked: the shuffled file is told apart, the official one gets its LC
    row = json.loads(run_cli("eval", "score", "--json", "--offline", *lc_files, "--data-dir", AE, shuffled).stdout)
    assert row["length_controlled_winrate"] is None and "row 1 is" in row["lc_note"]
    row = json.loads(run_cli("eval", "score", "--json", "--offline", *lc_files, "--data-dir", AE,
                             AE / "annotations" / "claude-2.1.json.gz").stdout)
    assert row["length_controlled_winrate"] == pytest.approx(
        LEADERBOARD.loc["claude-2.1", "length_controlled_winrate"], abs=1e-4)


def test_score_inputs_missing_or_ambiguous_are_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("PERPAIR_ALPACA_EVAL_DATA", raising=False)
    files = [AE / "annotations" / f"{m}.json.gz" for m in ("claude-2.1", "gemma-7b-it")]
    for args, words in ((["--offline", files[0]], "--difficulty"),
                        (["--offline", "--data-dir", tmp_path / "nowhere", files[0]], "no such data folder"),
                        (["--offline", "--data-dir", AE, "--glm-weights", tmp_path / "w.csv", files[0]],
                         "no such file"),
                        (["--offline", "--data-dir", AE, "--name", "x", *files], "--name names one file")):
        result = run_cli("eval", "score", *args, check=False)
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert result.stderr.startswith("error:") and "Traceback" not in result.stderr


def test_a_model_outputs_file_given_for_annotations_is_said_to_be_one():
    """alpaca_eval's model_outputs.json given to eval score was `missing field 'output_1'`, no more."""
    path = AE / "model_outputs" / "alpaca-7b.json.gz"
    result = run_cli("eval", "score", "--offline", "--data-dir", AE, path, check=False)
    assert result.returncode == 2 and result.stderr == (
        f"error: file {path}, row 1, field 'output_1': missing field: a model's outputs (instruction, output), not "
        "annotations (instruction, output_1, output_2, preference: alpaca_eval's annotations.json, or perpair eval "
        "alpaca-eval's)\n"), result.stderr


def test_no_lc_under_no_fit_says_no_fit_was_asked():
    """--no-fit on 805 judged instructions without published weights said `fewer than 5 judged instructions`."""
    row = json.loads(run_cli("eval", "score", "--json", "--offline", "--data-dir", AE, "--no-fit", "--name", "foo",
                             AE / "annotations" / "alpaca-7b.json.gz").stdout)
    assert (row["n_total"], row["length_controlled_winrate"]) == (805, None)
    assert row["lc_note"] == ("no LC: --no-fit and no published weights. Published weights not used: no published "
                              "GLM weights for 'foo'")


def test_bad_annotation_names_file_row_field(tmp_path):
    records = json.load(gzip.open(AE / "annotations" / "alpaca-7b.json.gz"))[:10]
    records[6]["preference"] = "2"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    with pytest.raises(InputError) as info:
        read_annotations(bad)
    assert (info.value.row, info.value.field) == (7, "preference")
    result = run_cli("eval", "score", bad, check=False)
    assert result.returncode == 2
    assert "row 7" in result.stderr and "preference" in result.stderr and "Traceback" not in result.stderr
    records[6]["preference"] = 2
    records[4]["dataset"] = ["helpful_base"]  # (pandas' traceback in eval report's per-dataset win rates)
    bad.write_text(json.dumps(records))
    with pytest.raises(InputError) as info:
        read_annotations(bad)
    assert (info.value.row, info.value.field) == (5, "dataset") and "expected a string or null" in str(info.value)
    records[4]["dataset"], records[2]["annotator"] = "helpful_base", ["x"]  # (the LC note's traceback)
    bad.write_text(json.dumps(records))
    with pytest.raises(InputError) as info:
        read_annotations(bad)
    assert (info.value.row, info.value.field) == (3, "annotator")


def test_a_compressed_file_cut_short_or_damaged_is_an_error_naming_it(tmp_path):
    # gzip's EOFError (which click took for the end of input at a prompt: "error: input ended", no file named) and
    # zlib.error (a traceback), in the annotations scored and in the data folder's reference outputs
    data = (AE / "annotations" / "alpaca-7b.json.gz").read_bytes()
    damaged = bytearray(data)
    damaged[2000:2100] = bytes(b ^ 0xFF for b in damaged[2000:2100])
    (tmp_path / "cut.json.gz").write_bytes(data[:5000])
    (tmp_path / "damaged.json.gz").write_bytes(damaged)
    folder = tmp_path / "data"
    folder.mkdir()
    for path in AE.iterdir():
        (folder / path.name).symlink_to(path)
    reference = folder / "reference_outputs_gpt4_1106_preview.json.gz"
    reference.unlink()
    reference.write_bytes((AE / reference.name).read_bytes()[:20000])
    for args, named in ((["--data-dir", AE, tmp_path / "cut.json.gz"], tmp_path / "cut.json.gz"),
                        (["--data-dir", AE, tmp_path / "damaged.json.gz"], tmp_path / "damaged.json.gz"),
                        (["--data-dir", folder, AE / "annotations" / "alpaca-7b.json.gz"], reference)):
        result = run_cli("eval", "score", "--offline", *args, check=False)
        assert result.returncode == 2 and f"file {named}: not a readable JSON file" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["glm_weights_length_controlled_v1.csv",
                                  "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv"])
def test_a_data_folder_file_that_is_a_folder_or_a_dangling_link_is_refused_not_taken_for_absent(tmp_path, name):
    """It was taken for absent: the LC went on without the published weights (exit 0, the note saying there was
    no such file)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for path in AE.iterdir():
        if path.name != name:
            (folder / path.name).symlink_to(path)
    for make in (lambda target: target.mkdir(), lambda target: target.symlink_to(tmp_path / "nowhere")):
        target = folder / name
        make(target)
        result = run_cli("eval", "score", "--offline", "--data-dir", folder, AE / "annotations" / "alpaca-7b.json.gz",
                         check=False)
        assert result.returncode == 2 and f"file {target}: not a readable file" in result.stderr, result.stderr
        if target.is_symlink():
            target.unlink()
        else:
            target.rmdir()


def test_a_json_file_nested_too_deeply_is_an_error_naming_it(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    result = run_cli("eval", "score", "--offline", "--data-dir", AE, deep, check=False)
    assert result.returncode == 2 and result.stderr == f"error: file {deep}: not a readable JSON file (nested too " \
                                                       "deeply)\n", result.stderr


def test_a_failed_download_is_an_error_not_a_silent_fallback(monkeypatch):
    import huggingface_hub

    from perpair.errors import PerpairError

    def unreachable(**kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("connection error")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    # online with a data folder at hand: the official files were asked for, so their absence is said, not papered
    with pytest.raises(PerpairError, match=r"could not download df_gamed\.csv .*--offline"):
        ScoreOptions(offline=False, data_dir=AE).resolve()
    offline = ScoreOptions(offline=True, data_dir=AE).resolve()  # offline, the folder is the source, by name
    assert offline.difficulty_source.endswith("instruction_difficulty_reconstructed.csv") and not offline.exact


def test_online_the_official_files_are_downloaded_before_scoring(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi, constants

    from perpair.models import hub_commit

    gamed_csv = tmp_path / "df_gamed.csv"
    _gamed_frame(["alpaca-7b"]).to_csv(gamed_csv, index=False)
    asked = []

    def download(*, repo_id, filename, repo_type, revision=None):  # the Hub's files, as hf_hub_download returns them
        asked.append((repo_id, filename, revision))
        return str(gamed_csv if filename == "df_gamed.csv" else AE / "instruction_difficulty_reconstructed.csv")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    # the commit the repository's main points to: files are read at it, and the row names it
    monkeypatch.setattr(HfApi, "repo_info", lambda self, repo_id, *, repo_type=None, revision=None, timeout=None:
                        SimpleNamespace(sha="c" * 40) if (repo_id, repo_type) == ("tatsu-lab/alpaca_eval", "dataset")
                        else None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub_commit.cache_clear()
    try:
        path = AE / "annotations" / "claude-2.1.json.gz"
        fitted = score_annotations(path, ScoreOptions(offline=False, data_dir=AE))
        assert fitted["lc_method"] == "fit" and not fitted["lc_is_approximation"] and fitted["lc_note"] is None
        assert asked == [("tatsu-lab/alpaca_eval", "df_gamed.csv", "c" * 40)]
        assert fitted["instruction_difficulty_source"] == f"hub:tatsu-lab/alpaca_eval/df_gamed.csv@{'c' * 40}"
        published = score_annotations(path, ScoreOptions(offline=False, data_dir=AE, fit=False))
        assert published["lc_method"] == "published_weights" and published["lc_note"] is None  # official difficulties
        assert published["instruction_difficulty_source"] == \
            f"hub:tatsu-lab/alpaca_eval/instruction_difficulty.csv@{'c' * 40}"
        assert published["length_controlled_winrate"] == pytest.approx(
            LEADERBOARD.loc["claude-2.1", "length_controlled_winrate"], abs=1e-4)
    finally:
        hub_commit.cache_clear()


def test_an_lc_figure_of_another_judge_says_it_is_not_comparable_to_the_leaderboards(tmp_path):
    """The LC fit (with the Hub's df_gamed.csv: `fit`, not an approximation) reads rows and difficulties judged by
    AlpacaEval 2.0's gpt-4-turbo annotator; annotations of another judge got the same figure with no word of it. It
    is still computed as alpaca_eval computes it, and the row and the printed line say it is not comparable."""
    import dataclasses

    from perpair.eval.score import score_frame

    inputs = ScoreOptions(offline=True, data_dir=AE).resolve()
    exact = dataclasses.replace(inputs, gamed=GamedRows.from_frame(_gamed_frame(["alpaca-7b"])))
    frame = annotations("claude-2.1")
    rows = {}
    for annotator in ("weighted_alpaca_eval_gpt4_turbo", "weighted_alpaca_eval:api:gpt-4-1106-preview",
                      "weighted_alpaca_eval:local:smollm2", "weighted_alpaca_eval:api:gpt-4o", None):
        judged = frame.assign(annotator=annotator) if annotator else frame.drop(columns="annotator")
        rows[annotator] = score_frame(judged, exact, name="claude-2.1")
    for annotator, row in rows.items():
        assert (row["lc_method"], row["lc_is_approximation"]) == ("fit", False)  # computed as alpaca_eval does
        assert row["length_controlled_winrate"] == rows["weighted_alpaca_eval_gpt4_turbo"]["length_controlled_winrate"]
        if annotator in ("weighted_alpaca_eval_gpt4_turbo", "weighted_alpaca_eval:api:gpt-4-1106-preview"):
            assert row["lc_judge_note"] is None, annotator
            continue
        note = row["lc_judge_note"]
        assert "judged by AlpacaEval 2.0's gpt-4-turbo annotator" in note and "df_gamed.csv" in note, annotator
        assert "not comparable to the leaderboard's" in note
        assert (repr(annotator) if annotator else "do not name their judge") in note
    local = tmp_path / "local.json"
    records = json.load(gzip.open(AE / "annotations" / "claude-2.1.json.gz"))
    local.write_text(json.dumps([{**r, "annotator": "weighted_alpaca_eval:local:smollm2"} for r in records]))
    printed = run_cli("eval", "score", "--offline", "--data-dir", AE, local).stdout
    assert "not comparable to the leaderboard's" in " ".join(printed.split())
    official = run_cli("eval", "score", "--json", "--offline", "--data-dir", AE,
                       AE / "annotations" / "claude-2.1.json.gz").stdout
    assert json.loads(official)["lc_judge_note"] is None


def test_unjudged_instructions_are_said_and_none_judged_is_an_error(tmp_path):
    """A null preference (the judge gave no usable answer) is left out of every figure, as alpaca_eval does; the
    row says how many and the table says so. A file where no instruction is judged has no win rate: exit 2."""
    records = json.load(gzip.open(AE / "annotations" / "claude-2.1.json.gz"))
    for i in (3, 50, 400):
        records[i]["preference"] = None
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(records))
    row = json.loads(run_cli("eval", "score", "--json", "--offline", "--no-fit", "--data-dir", AE, path).stdout)
    assert (row["n_total"], row["n_unjudged"]) == (802, 3)
    assert row["judgment_note"].startswith("3 of 805 instructions have no judgment")
    assert "3 of 805 instructions have no judgment" in run_cli("eval", "score", "--offline", "--no-fit",
                                                               "--data-dir", AE, path).stdout
    whole = score_annotations(AE / "annotations" / "claude-2.1.json.gz", ScoreOptions(offline=True, data_dir=AE,
                                                                                        fit=False))
    assert (whole["n_unjudged"], whole["judgment_note"]) == (0, None)

    for n in (3, 805):  # 3: too few for the LC fit, which used to be skipped and the null win rate printed, exit 0
        for record in records[:n]:
            record["preference"] = None
        path.write_text(json.dumps(records[:n]))
        result = run_cli("eval", "score", "--offline", "--data-dir", AE, path, check=False)
        assert result.returncode == 2 and result.stderr.startswith("error:"), (n, result.stdout, result.stderr)
        assert "no judged instruction" in result.stderr and "Traceback" not in result.stderr


def test_raw_metrics_equal_the_official_get_winrate():
    """win_rate_metrics against alpaca_eval 0.6.6's own get_winrate (not numbers copied from it): ties (1.5), the
    legacy draw 0, nulls, values a hair off 1.5, single rows, and the six real files."""
    winrate = pytest.importorskip("alpaca_eval.metrics.winrate")
    rng = np.random.default_rng(0)
    cases = [[1.0, 2.0, 0, 1.75, None], [1.5, 1.5, 1.5], [0, 0, 2], [1.4999999, 1.5000001, 1.5, np.nan], [2.0],
             [np.nan, 1.2]]
    for _ in range(50):
        values = rng.choice([1.0, 2.0, 1.5, 0.0, np.nan], size=int(rng.integers(1, 40)))
        soft = rng.random(len(values)) < 0.5
        values[soft] = rng.uniform(1, 2, int(soft.sum()))
        cases.append(list(values))
    cases += [list(annotations(model)["preference"]) for model in MODELS]
    for preferences in cases:
        official = winrate.get_winrate(pd.DataFrame({"preference": preferences}))
        ours = win_rate_metrics(preferences)
        assert set(official) <= set(ours)
        for key, value in official.items():
            if np.isnan(float(value)):
                assert np.isnan(ours[key]), (key, preferences)
            else:
                assert ours[key] == pytest.approx(float(value), abs=1e-9), (key, preferences)


def test_rows_out_of_the_official_order_get_no_lc(tmp_path):
    """The LC reads each instruction's difficulty by row position (as alpaca_eval does): a file missing an
    instruction (a model that left one unanswered) or in another order would be fitted on other instructions'
    difficulties, and another baseline's outputs against difficulties measured for gpt4_1106_preview's. With the
    data folder's rows at hand such a file gets no LC, and says why; its raw figures stand."""
    records = json.load(gzip.open(AE / "annotations" / "claude-2.1.json.gz"))
    missing, shuffled = tmp_path / "missing.json", tmp_path / "shuffled.json"
    missing.write_text(json.dumps(records[:10] + records[11:]))
    order = np.random.default_rng(0).permutation(len(records))
    shuffled.write_text(json.dumps([records[i] for i in order]))
    for path, where in ((missing, "row 11 is "), (shuffled, "row 1 is ")):
        row = json.loads(run_cli("eval", "score", "--json", "--offline", "--data-dir", AE, "--name", "claude-2.1",
                                 path).stdout)
        assert row["length_controlled_winrate"] is None and row["lc_method"] is None, row["lc_method"]
        assert row["lc_note"].startswith("no LC: the rows are not AlpacaEval's instructions in the official order")
        assert where in row["lc_note"]
        assert row["win_rate"] == pytest.approx(win_rate_metrics(pd.read_json(path)["preference"])["win_rate"])
    # another baseline's outputs (a --reference of the same instructions from another model): no LC either
    other = tmp_path / "other_baseline.json"
    other.write_text(json.dumps([{**r, "output_1": r["output_1"] + " And more."} for r in records]))
    row = json.loads(run_cli("eval", "score", "--json", "--offline", "--data-dir", AE, other).stdout)
    assert row["length_controlled_winrate"] is None and row["lc_method"] is None
    assert row["lc_note"].startswith("no LC: row 1's output_1 is not the AlpacaEval 2.0 baseline's")
    # the first N instructions (perpair eval alpaca-eval --limit N) are in the official order
    first = tmp_path / "first.json"
    first.write_text(json.dumps(records[:40]))
    row = json.loads(run_cli("eval", "score", "--json", "--offline", "--data-dir", AE, first).stdout)
    assert row["length_controlled_winrate"] is not None and row["lc_method"] == "fit_offline_approximation"


def test_online_without_a_data_folder_the_rows_are_checked_against_the_hubs(tmp_path, monkeypatch):
    """Online, the official rows were checked only when a data folder was given: a file in another order, scored
    with the Hub's difficulties, got an LC of other instructions' difficulties. Now the Hub's reference outputs are
    the official rows there."""
    import huggingface_hub

    from perpair.eval.sources import HUB_DIFFICULTY, HUB_REFERENCE

    records = json.load(gzip.open(AE / "annotations" / "claude-2.1.json.gz"))
    shuffled = tmp_path / "shuffled.json"
    shuffled.write_text(json.dumps([records[i] for i in np.random.default_rng(0).permutation(len(records))]))
    hub = {HUB_REFERENCE: AE / "reference_outputs_gpt4_1106_preview.json.gz",
           HUB_DIFFICULTY: AE / "instruction_difficulty_reconstructed.csv"}
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *, filename, **kw: asked.append(filename) or str(hub[filename]))
    monkeypatch.delenv("PERPAIR_ALPACA_EVAL_DATA", raising=False)
    row = score_annotations(shuffled, ScoreOptions(offline=False, fit=False))
    assert sorted(asked) == sorted(hub) and pd.isna(row["length_controlled_winrate"])
    assert row["lc_note"].startswith("no LC: the rows are not AlpacaEval's instructions")
    assert "row 1 is" in row["lc_note"]
    row = score_annotations(AE / "annotations" / "claude-2.1.json.gz", ScoreOptions(offline=False, fit=False))
    assert "official order" not in row["lc_note"]  # in order: only no weights (no data folder) leave it without LC


def test_too_few_judged_rows_for_the_fit_give_no_lc_not_an_error(tmp_path):
    """6 rows of which 2 unjudged: the raw figures over 4, and no LC (said), where the fit used to be tried on the
    4 judged rows and stop the whole evaluation (exit 2, after every answer was generated and judged)."""
    records = json.load(gzip.open(AE / "annotations" / "claude-2.1.json.gz"))[:6]
    records[0]["preference"] = records[1]["preference"] = None
    path = tmp_path / "six.json"
    path.write_text(json.dumps(records))
    row = json.loads(run_cli("eval", "score", "--json", "--offline", "--data-dir", AE, path).stdout)
    assert (row["n_total"], row["n_unjudged"], row["length_controlled_winrate"]) == (4, 2, None)
    assert row["lc_note"].startswith("no LC: fewer than 5 judged instructions")


def test_score_annotations_online_equals_the_official_lc(tmp_path, monkeypatch):
    """The whole scoring path (file read, length feature, difficulties from df_gamed.csv, fit) against alpaca_eval's
    get_length_controlled_winrate on the same file and the same df_gamed.csv, unjudged rows included."""
    import huggingface_hub

    gamed_csv = tmp_path / "df_gamed.csv"
    _gamed_frame(["alpaca-7b", "gemma-7b-it"]).to_csv(gamed_csv, index=False)
    reference = AE / "reference_outputs_gpt4_1106_preview.json.gz"  # the official rows the file is checked against
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda **kwargs: str(reference if kwargs["filename"].endswith(".json") else gamed_csv))
    records = json.load(gzip.open(AE / "annotations" / "gpt-3.5-turbo-1106.json.gz"))
    for i in (0, 7, 300):
        records[i]["preference"] = None
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(records))
    ours = score_annotations(path, ScoreOptions(offline=False))
    official, glm_pref, _ = _official(read_annotations(path), gamed_csv, True)
    assert ours["lc_method"] == "fit" and ours["n_unjudged"] == 3
    assert ours["length_controlled_winrate"] == pytest.approx(official["length_controlled_winrate"], abs=1e-6)
    assert ours["lc_standard_error"] == pytest.approx(official["lc_standard_error"], abs=1e-6)
    np.testing.assert_allclose(ours["glm_preference"], glm_pref, atol=1e-6)
    for key in ("win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total", "discrete_win_rate"):
        assert ours[key] == pytest.approx(float(official[key]), abs=1e-9), key
