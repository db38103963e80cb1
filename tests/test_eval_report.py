"""The results report: table (JSON, Markdown) and HTML page with plots, through the CLI."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from conftest import SHARED_DATA, run_cli
from perpair.eval import ScoreOptions, json_ready, score_annotations
from perpair.eval.arena_hard import arena_score, battles_from_games

AE = SHARED_DATA / "alpaca_eval"
LEADERBOARD = pd.read_csv(AE / "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv", index_col=0)


def _result_folders(tmp_path, name: str = "claude-2.1"):
    """An AlpacaEval folder (claude-2.1's published annotations, scored, shown under ``name``) and an
    Arena-Hard one, as the eval commands write them."""
    alpaca = tmp_path / "claude"
    alpaca.mkdir()
    annotations = json.load(gzip.open(AE / "annotations" / "claude-2.1.json.gz"))
    (alpaca / "annotations.json").write_text(json.dumps(annotations))
    (alpaca / "model_outputs.json").write_text(json.dumps(
        [{"instruction": a["instruction"], "output": a["output_2"], "generator": name,
          "dataset": a["dataset"]} for a in annotations]))
    row = score_annotations(alpaca / "annotations.json", ScoreOptions(offline=True, data_dir=AE, fit=False))
    row.pop("glm_preference")
    row["benchmark"] = "alpaca_eval_2"
    row["name"] = name
    (alpaca / "results.json").write_text(json.dumps([json_ready(row)]))
    arena = tmp_path / "arena"
    arena.mkdir()
    score = arena_score(battles_from_games([("B>A", False), ("A>B", True), ("A=B", False), ("A>>B", False)]))
    (arena / "results.json").write_text(json.dumps([{"benchmark": "arena_hard_v0.1", "name": name,
                                                     **score.as_dict()}]))
    return alpaca, arena


def test_report_from_result_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    alpaca, arena = _result_folders(tmp_path)

    report = tmp_path / "report"
    result = run_cli("eval", "report", alpaca, arena, "-o", report)
    for name in ("report.html", "results.json", "results.md", "win_rates.png", "lengths.png", "per_dataset.png"):
        assert (report / name).is_file(), result.stdout
    table = json.loads((report / "results.json").read_text())
    assert [r["benchmark"] for r in table] == ["alpaca_eval_2", "arena_hard_v0.1"]
    published = LEADERBOARD.loc["claude-2.1", "length_controlled_winrate"]
    assert table[0]["length_controlled_winrate"] == pytest.approx(published, abs=1e-4)
    markdown = (report / "results.md").read_text()
    assert "claude-2.1" in markdown and f"{published:.2f}" in markdown
    page = (report / "report.html").read_text()
    assert "win_rates.png" in page and "helpful_base" in page


def test_a_partial_arena_hard_run_does_not_read_as_a_complete_one(tmp_path, monkeypatch):
    """The tables left out Arena-Hard's games and those without a verdict, the --limit and the notes: a run of 3
    questions with a third of its games unjudged read like a complete one. The columns there were are kept."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    alpaca, arena = _result_folders(tmp_path)
    row = json.loads((arena / "results.json").read_text())[0]
    note = "2 of 6 games without a verdict (after one retry) weigh 0, as in show_result.py"
    (arena / "results.json").write_text(json.dumps([{**row, "limit": 3, "n_questions": 3, "n_games": 6,
                                                     "n_no_verdict": 2, "note": note}]))
    report = tmp_path / "report"
    run_cli("eval", "report", alpaca, arena, "-o", report)
    table = json.loads((report / "results.json").read_text())
    assert [(r["n_games"], r["n_no_verdict"], r["limit"]) for r in table] == [(None, None, None), (6, 2, 3)]
    assert list(table[1]) == ["benchmark", "name", "judge", "length_controlled_winrate", "lc_standard_error",
                              "win_rate", "standard_error", "score", "rating_q025", "rating_q975", "accuracy",
                              "mean_margin", "margin_se", "n_total", "n_games", "n_no_verdict", "limit",
                              "avg_length", "lc_method", "folder", "note"]  # (the notes too, as the .md has them)
    lines = (report / "results.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    arena_cells = dict(zip(header, (c.strip() for c in lines[3].strip("|").split("|")), strict=True))
    assert (arena_cells["n_games"], arena_cells["n_no_verdict"], arena_cells["limit"]) == ("6", "2", "3")
    assert f"- claude-2.1 (arena_hard_v0.1): {note}" in lines


@pytest.mark.parametrize("name", ["$\\alpha$-model $x^$", "[/x] [bold]model"])
def test_names_that_look_like_markup_are_shown_as_written(tmp_path, monkeypatch, name):
    # matplotlib reads $…$ as mathtext ("$x^$" does not parse); rich reads [..] as markup ("[/x]" closes nothing)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    alpaca, arena = _result_folders(tmp_path, name)
    report = tmp_path / "report"
    result = run_cli("eval", "report", alpaca, arena, "-o", report)
    assert (report / "win_rates.png").is_file() and (report / "lengths.png").is_file(), result.stderr
    assert [r["name"] for r in json.loads((report / "results.json").read_text())] == [name, name]
    scored = run_cli("eval", "score", "--offline", "--no-fit", "--data-dir", AE, "--name", name,
                     alpaca / "annotations.json")
    assert name in scored.stdout


def test_report_output_that_is_empty_or_a_file_is_refused(tmp_path):
    """-o '' used to write the report into the current folder; a file where the folder goes is refused too."""
    (tmp_path / "a file").write_text("x")
    for output, says in (("", "error: -o/--output: an empty path"),
                         (tmp_path / "a file", "a file, not a folder")):
        result = run_cli("eval", "report", tmp_path, "-o", output, check=False)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert says in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file"]


def test_a_missing_figure_gets_no_bar_not_a_bar_at_zero(tmp_path, monkeypatch):
    """A results row without an LC win rate (too few rows, or rows not in the official order) or an Arena-Hard row
    without a score used to be drawn as a bar at 0: a number the evaluation never gave."""
    import matplotlib.axes

    from perpair.eval import write_report

    alpaca, arena = _result_folders(tmp_path)
    row = json.loads((alpaca / "results.json").read_text())[0]
    (alpaca / "results.json").write_text(json.dumps([{**row, "length_controlled_winrate": None}]))
    (arena / "results.json").write_text(json.dumps([{"benchmark": "arena_hard_v0.1", "name": "x", "score": None}]))
    drawn = []
    real_bar = matplotlib.axes.Axes.bar

    def bar(self, x, height, *args, **kwargs):
        drawn.append(list(height))
        return real_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    write_report([alpaca, arena], tmp_path / "report")
    assert drawn[0] == [pytest.approx(row["win_rate"])]


def test_a_report_is_not_read_as_an_evaluation_nor_written_over_one(tmp_path, monkeypatch):
    """The recipes' `perpair eval report work/eval/* -o work/eval/report`, run twice, read the first report's
    results.json as an evaluation's: every row twice. And -o naming an evaluation's folder replaced its results."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    alpaca, arena = _result_folders(tmp_path)
    report = tmp_path / "report"
    run_cli("eval", "report", alpaca, arena, "-o", report)
    again = run_cli("eval", "report", alpaca, arena, report, "-o", report, check=False)
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert f"error: {report}: a report perpair eval report wrote" in again.stderr
    assert [r["benchmark"] for r in json.loads((report / "results.json").read_text())] == ["alpaca_eval_2",
                                                                                           "arena_hard_v0.1"]
    before = (arena / "results.json").read_text()
    over = run_cli("eval", "report", alpaca, arena / "results.json", "-o", arena, check=False)
    assert over.returncode == 2 and f"error: -o/--output {arena}: the folder of the evaluation" in over.stderr
    assert (arena / "results.json").read_text() == before and not (arena / "report.html").exists()


def _bars(monkeypatch) -> dict[str, list[float]]:
    """The heights of the bars each labelled series is drawn with (matplotlib's Axes.bar watched)."""
    import matplotlib.axes

    drawn: dict[str, list[float]] = {}
    real_bar = matplotlib.axes.Axes.bar

    def bar(self, x, height, *args, **kwargs):
        if "label" in kwargs:
            drawn[kwargs["label"]] = [float(h) for h in height]
        return real_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    return drawn


def test_a_dataset_an_evaluation_did_not_judge_gets_no_bar_not_a_bar_at_zero(tmp_path, monkeypatch):
    """The per-dataset plot of an evaluation of the first instructions alone (--limit: one source dataset) beside a
    whole one drew a 0% win rate for every dataset it never judged."""
    from perpair.eval import write_report

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    whole, _ = _result_folders(tmp_path)
    annotations = json.loads((whole / "annotations.json").read_text())
    first = [a for a in annotations if a["dataset"] == annotations[0]["dataset"]]
    part = tmp_path / "part"
    part.mkdir()
    (part / "annotations.json").write_text(json.dumps(first))
    (part / "results.json").write_text(json.dumps([{"benchmark": "alpaca_eval_2", "name": "part", "win_rate": 1.0}]))
    drawn = _bars(monkeypatch)
    write_report([whole, part], tmp_path / "report")
    datasets = sorted({a["dataset"] for a in annotations})
    assert len(datasets) > 1 and len(drawn["part"]) == len(datasets)
    for dataset, height in zip(datasets, drawn["part"], strict=True):
        assert (height > 0) if dataset == first[0]["dataset"] else np.isnan(height), dataset


def test_one_model_judged_twice_is_two_rows_and_two_series(tmp_path, monkeypatch):
    """The same model (one name) evaluated by two judges, or the same arm of two runs: the table's rows said nothing
    of the judge or the folder, and the plots drew one series under the name, the last folder's figures."""
    from perpair.eval import write_report

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first, _ = _result_folders(tmp_path / "one")
    second, _ = _result_folders(tmp_path / "two")
    for folder, judge in ((first, "gpt-4-turbo"), (second, "a-local-judge")):
        row = json.loads((folder / "results.json").read_text())[0]
        (folder / "results.json").write_text(json.dumps([{**row, "judge": "http://x/v1", "judge_name": judge}]))
    annotations = json.loads((second / "annotations.json").read_text())
    (second / "annotations.json").write_text(json.dumps([{**a, "preference": 3 - a["preference"]}
                                                        for a in annotations if a["preference"] is not None]))
    drawn = _bars(monkeypatch)
    report = tmp_path / "report"
    write_report([first, second], report)
    table = json.loads((report / "results.json").read_text())
    assert [(r["name"], r["judge"], r["folder"]) for r in table] == [
        ("claude-2.1", "gpt-4-turbo", str(first)), ("claude-2.1", "a-local-judge", str(second))]
    series = {label: heights for label, heights in drawn.items() if label.startswith("claude-2.1")}
    assert sorted(series) == [f"claude-2.1 ({first})", f"claude-2.1 ({second})"]
    # each series is its own folder's: win rates by dataset that add up to 100 between the flipped judgments
    ones, twos = series[f"claude-2.1 ({first})"], series[f"claude-2.1 ({second})"]
    assert all(a + b == pytest.approx(100) for a, b in zip(ones, twos, strict=True)) and ones != twos
    assert "| gpt-4-turbo |" in (report / "results.md").read_text()


def test_fractions_are_not_rounded_to_what_they_are_not(tmp_path):
    """A preference accuracy of 0.996 was "1.00" in the table and a margin's standard error of 0.004 "0.00": two
    decimals fit win rates in percent, not fractions."""
    from perpair.eval import write_report

    folder = tmp_path / "preference"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps([{
        "benchmark": "preference_accuracy", "name": "dpo", "accuracy": 0.996, "mean_margin": 0.0123,
        "margin_se": 0.0041, "n_total": 250}]))
    write_report([folder], tmp_path / "report")
    row = (tmp_path / "report" / "results.md").read_text().splitlines()[2]
    assert "| 0.996 | 0.0123 | 0.0041 | 250 |" in row, row


def test_evaluations_of_other_instructions_each_have_their_baseline_lengths(tmp_path, monkeypatch):
    """The length plot's one "baseline" series was the first folder's reference answers, also for an evaluation of
    other instructions (--limit): each evaluation now has its own where they differ, and one where they agree."""
    import matplotlib.axes

    from perpair.eval import write_report

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    whole, _ = _result_folders(tmp_path)
    annotations = json.loads((whole / "annotations.json").read_text())[:10]
    part = tmp_path / "part"
    part.mkdir()
    (part / "annotations.json").write_text(json.dumps(annotations))
    (part / "model_outputs.json").write_text(json.dumps([{"instruction": a["instruction"], "output": a["output_2"]}
                                                         for a in annotations]))
    (part / "results.json").write_text(json.dumps([{"benchmark": "alpaca_eval_2", "name": "part", "win_rate": 1.0}]))
    drawn: dict[str, int] = {}
    real_hist = matplotlib.axes.Axes.hist

    def hist(self, values, *args, **kwargs):
        drawn[kwargs["label"]] = len(values)
        return real_hist(self, values, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "hist", hist)
    write_report([whole, part], tmp_path / "report")
    assert drawn == {"claude-2.1": 805, "part": 10, "baseline (claude-2.1)": 805, "baseline (part)": 10}
    drawn.clear()
    write_report([whole], tmp_path / "again")
    assert drawn == {"claude-2.1": 805, "baseline": 805}


def test_preference_rows_say_against_which_reference_and_data(tmp_path):
    """Two held-out accuracies of one model against other references (or on other pairs) sat side by side with
    nothing in the table to tell them apart: a preference row's judge is the implicit reward against its reference."""
    from perpair.eval import write_report

    folders = []
    for name, ref, data in (("a", "smollm2", "uf.test.parquet"), ("b", "runs/sft/model", "hh.test.parquet")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps([{
            "benchmark": "preference_accuracy", "name": "dpo", "ref": ref, "data": data, "beta": 0.1,
            "accuracy": 0.6, "n_total": 20}]))
        folders.append(folder)
    write_report(folders, tmp_path / "report")
    table = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [r["judge"] for r in table] == ["implicit reward against smollm2 (β 0.1) on uf.test.parquet",
                                           "implicit reward against runs/sft/model (β 0.1) on hh.test.parquet"]


def test_results_rows_of_another_shape_are_refused_and_nothing_is_written(tmp_path, monkeypatch):
    """A results.json with no rows, or another program's rows, gave a report of nothing or of dashes (exit 0); a
    figure written as a string or a note as a number, and an AlpacaEval folder's model_outputs.json without an
    output, stopped the report with a traceback after its results.json and results.md were written."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    alpaca, arena = _result_folders(tmp_path)
    good = json.loads((arena / "results.json").read_text())[0]
    for rows, words in (([], "no results rows"),
                        ([{"name": "m", "win_rate": 12.0}], "row 1, field 'benchmark': not a results row"),
                        ([{**good, "score": "50.1"}], "row 1, field 'score': expected a number or null"),
                        ([good, {**good, "note": 3}], "row 2, field 'note': expected a string or null")):
        (arena / "results.json").write_text(json.dumps(rows))
        report = tmp_path / "report"
        result = run_cli("eval", "report", alpaca, arena, "-o", report, check=False)
        assert result.returncode == 2 and f"file {arena / 'results.json'}" in result.stderr, result.stderr
        assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not report.exists()
    (arena / "results.json").write_text(json.dumps([good]))
    outputs = json.loads((alpaca / "model_outputs.json").read_text())
    del outputs[3]["output"]
    (alpaca / "model_outputs.json").write_text(json.dumps(outputs))
    result = run_cli("eval", "report", alpaca, arena, "-o", report, check=False)
    assert result.returncode == 2 and "row 4, field 'output'" in result.stderr and not report.exists(), result.stderr


def test_no_command_writes_its_results_over_another_evaluations(tmp_path, monkeypatch, tiny_model_dir):
    """`eval preference -o eval/dpo` (the folder of dpo's AlpacaEval), `arena-hard run -o` it, or `eval report -o`
    it replaced the AlpacaEval results.json there without a word (exit 0; the report then showed no AlpacaEval row).
    Each is now refused before any work, naming the folder and what its results.json holds; nothing is written."""
    from plan_helpers import make_pairs

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    alpaca, arena = _result_folders(tmp_path)
    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(8.0, 2.0)] * 2)
    def files():  # (an evaluation's lock, .lock, is left empty where it was taken, as every run leaves it)
        return {p: p.read_bytes() for folder in (alpaca, arena) for p in folder.iterdir() if p.name != ".lock"}

    before = files()
    model = ("--model", tiny_model_dir, "--judge", tiny_model_dir, "--offline", "--limit", "1", "--max-new-tokens", "2")
    for args, folder, holds in (
            (("eval", "preference", "--model", tiny_model_dir, "--ref", tiny_model_dir, "--data", pairs), alpaca,
             "alpaca_eval_2"),
            (("eval", "report", arena), alpaca, "alpaca_eval_2"),
            (("eval", "arena-hard", "run", *model, "--judge-max-tokens", "2", "--data-dir",
              SHARED_DATA / "arena_hard"), alpaca, "alpaca_eval_2"),
            (("eval", "alpaca-eval", *model, "--data-dir", AE), arena, "arena_hard_v0.1")):
        result = run_cli(*args, "-o", folder, check=False)
        assert result.returncode == 2 and result.stderr == (
            f"error: -o/--output {folder}: results.json there holds the results of another evaluation ({holds}), "
            "which this command would replace; give it another folder\n"
            if args[1] != "report" else
            f"error: -o/--output {folder}: results.json there holds an evaluation's results ({holds}), which this "
            "command would replace; give it another folder\n"), (args, result.stderr)
    assert files() == before
    # an evaluation's own folder, and a report's, are written again as before
    run_cli("eval", "report", alpaca, arena, "-o", tmp_path / "report")
    run_cli("eval", "report", alpaca, "-o", tmp_path / "report")


def test_a_default_output_folder_holding_another_models_results_is_refused(tmp_path, monkeypatch, tiny_model_dir):
    """Two models whose folders share a name (two runs' `checkpoint-100`) share the default output folder
    `eval/checkpoint-100`: the second model's evaluation replaced the first's results there without a word. Now it
    is refused before any work, naming both models; the same model is evaluated there again, and an -o given by the
    user is the user's choice."""
    import shutil

    from plan_helpers import make_pairs

    monkeypatch.chdir(tmp_path)
    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, [(8.0, 2.0)] * 2)
    a, b = (tmp_path / run / "checkpoint-100" for run in ("a", "b"))
    for folder in (a, b):
        shutil.copytree(tiny_model_dir, folder)
    results = tmp_path / "eval" / "checkpoint-100" / "preference" / "results.json"

    def evaluate(model, *extra):
        return run_cli("eval", "preference", "--model", model, "--ref", tiny_model_dir, "--data", pairs, *extra,
                       check=False)

    assert evaluate(a).returncode == 0
    first = results.read_bytes()
    assert json.loads(first)[0]["model_path"] == str(a.resolve())
    refused = evaluate(b)
    assert refused.returncode == 2 and refused.stderr == (
        "error: the default output eval/checkpoint-100/preference: results.json there holds the preference_accuracy "
        f"results of another model ({a.resolve()}; this one is {b.resolve()}), which this command would replace; "
        "give it another folder with -o/--output (and --name, to tell the two apart in a report)\n"), refused.stderr
    assert results.read_bytes() == first
    assert evaluate(a).returncode == 0  # the same model, evaluated again
    assert evaluate(b, "-o", tmp_path / "eval" / "checkpoint-100" / "preference").returncode == 0  # asked for
    assert json.loads(results.read_text())[0]["model_path"] == str(b.resolve())


def test_a_report_into_the_folder_of_an_earlier_one_leaves_none_of_its_plots(tmp_path, monkeypatch):
    """A report written into the folder of an earlier one, of rows with no win rate to plot (held-out accuracies),
    left the earlier report's win-rate, length and per-dataset plots beside its table: another model's numbers in
    the report's folder. Only the plots of this report's rows are there."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    alpaca, arena = _result_folders(tmp_path)
    report = tmp_path / "report"
    run_cli("eval", "report", alpaca, arena, "-o", report)
    assert (report / "win_rates.png").is_file() and (report / "per_dataset.png").is_file()
    preference = tmp_path / "preference"
    preference.mkdir()
    (preference / "results.json").write_text(json.dumps([{
        "benchmark": "preference_accuracy", "name": "dpo", "ref": "smollm2", "data": "uf.test.parquet", "beta": 0.1,
        "accuracy": 0.6, "n_total": 20}]))
    result = run_cli("eval", "report", preference, "-o", report)
    assert sorted(p.name for p in report.iterdir()) == ["report.html", "results.json", "results.md"], result.stdout


def test_an_evaluation_named_baseline_keeps_its_own_length_series(tmp_path, monkeypatch):
    """The reference answers' lengths were drawn under "baseline", which replaced the series of a model (an arm)
    named baseline: the plot showed the reference's lengths alone, labelled as both."""
    from perpair.eval.report import collect, length_series

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    alpaca, _ = _result_folders(tmp_path, "baseline")
    series = length_series(collect([alpaca]))
    annotations = json.loads((alpaca / "annotations.json").read_text())
    assert series == {"baseline": [len(a["output_2"]) for a in annotations],
                      "baseline (reference outputs)": [len(a["output_1"]) for a in annotations]}


def test_a_folder_given_twice_is_refused(tmp_path, monkeypatch):
    """`perpair eval report eval/dpo eval/*` reported eval/dpo's rows twice, under one label."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    alpaca, arena = _result_folders(tmp_path)
    result = run_cli("eval", "report", alpaca, arena, alpaca / "results.json", "-o", tmp_path / "report", check=False)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: {alpaca / 'results.json'}: given twice (as {alpaca} too): its rows would be reported twice"]
    assert not (tmp_path / "report").exists()


def test_a_held_out_accuracy_over_fewer_pairs_says_so(tmp_path):
    """An `eval preference` row whose max_length left pairs out read as complete in the report: two models'
    accuracies over other subsets of pairs side by side, without a word."""
    folder = tmp_path / "pref"
    folder.mkdir()
    row = {"benchmark": "preference_accuracy", "name": "dpo", "ref": "smollm2", "beta": 0.1, "data": "t.parquet",
           "max_length": 256, "n_pairs": 25, "n_total": 20, "n_skipped": 5, "accuracy": 0.6, "mean_margin": 0.1,
           "margin_se": 0.05}
    (folder / "results.json").write_text(json.dumps([row]))
    run_cli("eval", "report", folder, "-o", tmp_path / "report")
    note = "accuracy over 20 of 25 pairs: 5 left out, their prompt filling max_length 256"
    assert json.loads((tmp_path / "report" / "results.json").read_text())[0]["pairs_note"] == note
    assert f"- dpo (preference_accuracy): {note}" in (tmp_path / "report" / "results.md").read_text()
