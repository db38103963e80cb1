"""One results table (JSON + Markdown) and an HTML page with plots (matplotlib, Agg) from the folders that
``perpair eval alpaca-eval``, ``arena-hard`` and ``preference`` wrote: win rates with 95% intervals,
preference accuracies, answer-length distributions, and the AlpacaEval win rate per source dataset."""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from perpair.errors import InputError, PerpairError
from perpair.eval.metrics import win_rate_metrics
from perpair.eval.sources import read_annotations, read_json_records, read_outputs, write_json_records

# n_games, n_no_verdict: Arena-Hard's games and those without a verdict; limit: the --limit the evaluation ran
# with (- none), so that a partial evaluation does not read as a complete one
COLUMNS = ("benchmark", "name", "judge", "length_controlled_winrate", "lc_standard_error", "win_rate",
           "standard_error", "score", "rating_q025", "rating_q975", "accuracy", "mean_margin", "margin_se", "n_total",
           "n_games", "n_no_verdict", "limit", "avg_length", "lc_method", "folder")


def collect(folders: list[Path]) -> list[dict[str, Any]]:
    rows = []
    given: dict[Path, Path] = {}  # each results file read, by where it is: one given twice was reported twice
    for folder in folders:
        path = folder / "results.json" if folder.is_dir() else folder
        if not path.is_file():
            raise PerpairError(f"{folder}: no results.json (run perpair eval alpaca-eval, arena-hard or "
                               "preference first)")
        if (where := path.resolve()) in given:
            raise PerpairError(f"{folder}: given twice (as {given[where]} too): its rows would be reported twice")
        given[where] = folder
        if (path.parent / "report.html").is_file():  # its results.json is a table of other folders' rows
            raise PerpairError(f"{folder}: a report perpair eval report wrote, not an evaluation's results; give the "
                               "evaluations' folders (a shell glob over them must leave the report's -o out)")
        records = read_json_records(path)
        if not records:
            raise InputError("no results rows", file=str(path))
        for number, row in enumerate(records, 1):
            _check_row(row, path, number)
            row["_folder"] = str(path.parent)
            rows.append(row)
    # which model, judged by which judge, from which folder: two rows of one benchmark may differ only there (the
    # same model judged twice, the same arm of two runs)
    names = Counter((row.get("benchmark"), row.get("name")) for row in rows)
    for row in rows:
        row["judge"] = row.get("judge_name") or row.get("judge")
        if row.get("benchmark") == "preference_accuracy":  # judged by the implicit reward: against which reference
            row["judge"] = f"implicit reward against {row.get('ref')} (β {row.get('beta')}) on {row.get('data')}"
        row["folder"] = row["_folder"]
        # the plots' series, one per row: two under one name were drawn as one, the last row's figures shown
        row["_label"] = (str(row.get("name")) if names[row.get("benchmark"), row.get("name")] == 1
                         else f"{row.get('name')} ({row['_folder']})")
        skipped = row.get("n_skipped")
        if row.get("benchmark") == "preference_accuracy" and isinstance(skipped, int) and skipped > 0:
            # an accuracy over the pairs that fit max_length: two evaluations' may be over other pairs
            row["pairs_note"] = (f"accuracy over {row.get('n_total')} of {row.get('n_pairs')} pairs: {skipped} left "
                                 f"out, their prompt filling max_length {row.get('max_length')}")
    return rows


BENCHMARKS = ("alpaca_eval_2", "arena_hard_v0.1", "preference_accuracy")
FIGURES = ("length_controlled_winrate", "lc_standard_error", "win_rate", "standard_error", "score", "rating_q025",
           "rating_q975", "accuracy", "mean_margin", "margin_se", "n_total", "n_games", "n_no_verdict", "limit",
           "avg_length")
NOTES = ("judgment_note", "lc_note", "lc_judge_note", "note", "pairs_note")
# the plots a report may write: those of an earlier report into the same folder that this one does not draw (its rows
# have no AlpacaEval or Arena-Hard figures) go, rather than stand beside its table with another report's numbers
FIGURE_FILES = {"win_rates": "win_rates.png", "lengths": "lengths.png", "per_dataset": "per_dataset.png"}


def _check_row(row: dict[str, Any], path: Path, number: int) -> None:
    """A row as perpair eval writes it, or refused by file, row and field: another program's row was shown as a row
    of dashes (exit 0), a figure written as a string or a note as a number stopped the report with a traceback."""
    if row.get("benchmark") not in BENCHMARKS:
        raise InputError(f"not a results row of perpair eval (benchmark {row.get('benchmark')!r}; expected one of "
                         f"{', '.join(BENCHMARKS)})", file=str(path), row=number, field="benchmark")
    if not isinstance(row.get("name"), str):
        raise InputError(f"expected a string, got {row.get('name')!r}", file=str(path), row=number, field="name")
    for key in FIGURES:
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise InputError(f"expected a number or null, got {value!r}", file=str(path), row=number, field=key)
    for key in NOTES:
        if row.get(key) is not None and not isinstance(row[key], str):
            raise InputError(f"expected a string or null, got {row[key]!r}", file=str(path), row=number, field=key)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):  # two decimals fit win rates in percent; a fraction's said 1.00 for 0.996
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4g}"
    return str(value)


def _plain(text: Any) -> str:
    """A name shown as itself in a plot: matplotlib reads text between two ``$`` as mathtext (and fails on some)."""
    return str(text).replace("$", r"\$")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The table, then each row's notes (what its figures do not say: games without a verdict, instructions without a
    judgment, an LC that is an approximation or of another judge), as the HTML page shows them."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    notes = [f"- {row.get('_label', row.get('name'))} ({row.get('benchmark')}): {row[key]}" for row in rows
             for key in NOTES if row.get(key)]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def per_dataset(folder: Path) -> dict[str, float]:
    path = folder / "annotations.json"
    if not path.is_file():
        return {}
    frame = read_annotations(path)
    if "dataset" not in frame:
        return {}
    return {str(k): win_rate_metrics(g["preference"])["win_rate"] for k, g in frame.groupby("dataset")}


def length_series(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    """The answer lengths (characters) of each AlpacaEval row's model, by its label, and of the baseline."""
    lengths, baselines = {}, {}
    for row in rows:
        path = Path(row["_folder"]) / "model_outputs.json"
        if row.get("benchmark") == "alpaca_eval_2" and path.is_file():
            lengths[row["_label"]] = read_outputs(path)["output"].str.len().tolist()
            annotations = Path(row["_folder"]) / "annotations.json"
            if annotations.is_file():
                baselines[row["_label"]] = read_annotations(annotations)["output_1"].str.len().tolist()
    # the baseline's series under a name no row has (an arm named "baseline" lost its own series to the reference's);
    # one where every evaluation had the same baseline, else each its own (another --limit or reference file: the
    # first folder's alone stood for every row's)
    name = next((name for name in ("baseline", "baseline (reference outputs)", "reference outputs")
                 if not any(name == label or label.startswith(f"{name} (") for label in lengths)), "reference")
    if len({tuple(values_) for values_ in baselines.values()}) == 1:
        lengths[name] = next(iter(baselines.values()))
    else:
        lengths.update({f"{name} ({label})": values_ for label, values_ in baselines.items()})
    return lengths


def write_report(folders: list[Path], output: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = collect(folders)
    # every file is read before the report's first is written: a bad one leaves no half report
    lengths = length_series(rows)
    breakdown = {row["_label"]: per_dataset(Path(row["_folder"])) for row in rows
                 if row.get("benchmark") == "alpaca_eval_2"}
    breakdown = {k: v for k, v in breakdown.items() if v}
    output.mkdir(parents=True, exist_ok=True)
    for name in FIGURE_FILES.values():
        (output / name).unlink(missing_ok=True)
    # with what the figures do not say (the notes, the instructions without a judgment), as the Markdown table has it
    table = [{**{c: row.get(c) for c in COLUMNS}, **{k: row[k] for k in ("n_unjudged", *NOTES) if row.get(k)}}
             for row in rows]
    write_json_records(output / "results.json", table)
    (output / "results.md").write_text(markdown_table(rows), encoding="utf-8")

    figures: dict[str, Path] = {}
    labels, values, errors = [], [], []
    for row in rows:
        if row.get("benchmark") == "alpaca_eval_2":
            for key, se, tag in (("length_controlled_winrate", "lc_standard_error", "LC"),
                                 ("win_rate", "standard_error", "raw")):
                if row.get(key) is None:  # no such figure (e.g. no LC): no bar, rather than a bar at 0
                    continue
                labels.append(f"{_plain(row['_label'])}\nAlpacaEval {tag}")
                values.append(row[key])
                half = 1.96 * (row.get(se) or 0.0)
                errors.append((half, half))
        elif row.get("benchmark") == "arena_hard_v0.1" and row.get("score") is not None:
            labels.append(f"{_plain(row['_label'])}\nArena-Hard")
            score = row["score"]
            values.append(score)
            low, high = (score if row.get(k) is None else row[k] for k in ("rating_q025", "rating_q975"))
            errors.append((max(score - low, 0), max(high - score, 0)))  # a bound of 0.0 is a bound (not "or")
    if labels:
        fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(labels)), 4))
        ax.bar(range(len(labels)), values, yerr=list(zip(*errors, strict=True)), capsize=4, color="#4C72B0")
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("win rate / score vs baseline (%)")
        ax.set_title("Win rates with 95% intervals")
        fig.tight_layout()
        figures["win_rates"] = output / FIGURE_FILES["win_rates"]
        fig.savefig(figures["win_rates"], dpi=110)
        plt.close(fig)

    if lengths:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, values_ in lengths.items():
            ax.hist(values_, bins=30, alpha=0.5, label=_plain(label))
        ax.set_xlabel("answer length (characters)")
        ax.set_ylabel("answers")
        ax.legend(fontsize=8)
        ax.set_title("Length distributions (AlpacaEval)")
        fig.tight_layout()
        figures["lengths"] = output / FIGURE_FILES["lengths"]
        fig.savefig(figures["lengths"], dpi=110)
        plt.close(fig)

    if breakdown:
        datasets = sorted({d for v in breakdown.values() for d in v})
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(datasets)), 4))
        width = 0.8 / len(breakdown)
        for k, (name, values_) in enumerate(breakdown.items()):
            # a dataset none of whose instructions this row's evaluation judged (another --limit) gets no bar
            ax.bar([i + k * width for i in range(len(datasets))], [values_.get(d, math.nan) for d in datasets],
                   width, label=_plain(name))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(datasets))], [_plain(d) for d in datasets],
                      rotation=30, fontsize=8)
        ax.set_ylabel("raw win rate (%)")
        ax.set_title("AlpacaEval win rate by source dataset")
        ax.legend(fontsize=8)
        fig.tight_layout()
        figures["per_dataset"] = output / FIGURE_FILES["per_dataset"]
        fig.savefig(figures["per_dataset"], dpi=110)
        plt.close(fig)

    notes = "".join(f"<p><b>{html.escape(r['_label'])}</b>: {html.escape(r[key])}</p>" for r in rows
                    for key in NOTES if r.get(key))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in COLUMNS) + "</tr>"
                   for r in rows)
    images = "".join(f'<h2>{html.escape(k.replace("_", " "))}</h2><img src="{p.name}" alt="{k}">'
                     for k, p in figures.items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>perpair evaluation</title><style>"
            f"body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;"
            f"padding:4px 8px;text-align:right}}</style></head><body><h1>perpair evaluation</h1>"
            f"<table><tr>{head}</tr>{body}</table>{notes}{images}"
            f"<h2>per-dataset win rate</h2><pre>{html.escape(json.dumps(breakdown, indent=1))}</pre></body></html>")
    (output / "report.html").write_text(page, encoding="utf-8")
    return {"html": output / "report.html", "json": output / "results.json", "markdown": output / "results.md",
            **figures}
