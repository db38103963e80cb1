"""The results report: table (JSON, Markdown) and HTML page with plots, through the CLI."""

from __future__ import annotations

import gzip
import json

from conftest import SHARED_DATA, run_cli
from perpair.eval.arena_hard import arena_score, battles_from_games
from perpair.eval.score import ScoreOptions, json_ready, score_annotations

AE = SHARED_DATA / "alpaca_eval"


def test_report_from_result_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    alpaca = tmp_path / "claude"
    alpaca.mkdir()
    annotations = json.load(gzip.open(AE / "annotations" / "claude-2.1.json.gz"))
    (alpaca / "annotations.json").write_text(json.dumps(annotations))
    (alpaca / "model_outputs.json").write_text(json.dumps(
        [{"instruction": a["instruction"], "output": a["output_2"], "generator": "claude-2.1",
          "dataset": a["dataset"]} for a in annotations]))
    row = score_annotations(alpaca / "annotations.json", ScoreOptions(
        difficulty=AE / "instruction_difficulty_reconstructed.csv",
        glm_weights=AE / "glm_weights_length_controlled_v1.csv"))
    row.pop("glm_preference")
    row["benchmark"] = "alpaca_eval_2"
    (alpaca / "results.json").write_text(json.dumps([json_ready(row)]))
    arena = tmp_path / "arena"
    arena.mkdir()
    score = arena_score(battles_from_games([("B>A", False), ("A>B", True), ("A=B", False), ("A>>B", False)]))
    (arena / "results.json").write_text(json.dumps([{"benchmark": "arena_hard_v0.1", "name": "claude-2.1",
                                                     **score.as_dict()}]))

    report = tmp_path / "report"
    result = run_cli("eval", "report", alpaca, arena, "-o", report)
    for name in ("report.html", "results.json", "results.md", "win_rates.png", "lengths.png", "per_dataset.png"):
        assert (report / name).is_file(), result.stdout
    table = json.loads((report / "results.json").read_text())
    assert [r["benchmark"] for r in table] == ["alpaca_eval_2", "arena_hard_v0.1"]
    assert abs(table[0]["length_controlled_winrate"] - 25.2519) < 1e-3
    markdown = (report / "results.md").read_text()
    assert "claude-2.1" in markdown and "25.25" in markdown
    page = (report / "report.html").read_text()
    assert "win_rates.png" in page and "helpful_base" in page
