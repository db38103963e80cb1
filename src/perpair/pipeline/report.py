"""The end of a run: one comparison table of the arms (Markdown, JSON, on the terminal) and an HTML page with
the training curves, links to each arm's plan report and the evaluation report."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from perpair.artifacts import read_parquet
from perpair.pipeline.config import RunConfig

COLUMNS = (
    # the plan's counts (what each route holds) beside what the training read: pairs whose prompt fills max_length
    # are planned but not trained, and a run of more than one epoch reads pairs again
    ("arm", "arm"), ("preset", "preset"), ("pairs_preference", "pref. pairs (plan)"),
    ("pairs_sft", "SFT pairs (plan)"), ("beta_geomean", "β geomean (plan)"), ("steps", "steps"),
    ("pairs_trained", "pairs trained"), ("train_seconds", "train s"),
    ("train_loss", "train loss (last 20%)"), ("train_reward_accuracy", "train reward acc. (last 20%)"),
    ("heldout_n", "held-out pairs"), ("heldout_accuracy", "held-out acc."), ("heldout_margin", "held-out margin"),
    ("heldout_ln_accuracy", "held-out LN acc."), ("alpaca_n", "AlpacaEval instr."), ("alpaca_lc", "AlpacaEval LC"),
    ("alpaca_wr", "AlpacaEval WR"), ("alpaca_length", "AlpacaEval avg length (chars)"),
)


def _tail_mean(metrics: list[dict[str, Any]], key: str) -> float | None:
    values = [m[key] for m in metrics if m.get(key) is not None]
    if not values:
        return None
    tail = values[-max(1, math.ceil(len(values) / 5)):]
    return float(np.mean(tail))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def comparison_rows(config: RunConfig, trained: dict[str, dict[str, Any]],
                    evaluated: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for arm, info in trained.items():
        plan = read_parquet(info["plan"], columns=["beta", "route"])
        routes = np.array(plan.column("route").to_pylist(), dtype=object)
        betas = np.array(plan.column("beta").to_pylist(), dtype=float)[routes == "preference"]
        metrics = read_metrics(info["metrics"])
        summary = info.get("summary", {})
        row = {"arm": arm, "preset": config.arms[arm].preset,
               "pairs_preference": int(np.sum(routes == "preference")), "pairs_sft": int(np.sum(routes == "sft")),
               "beta_geomean": float(np.exp(np.mean(np.log(betas)))) if len(betas) else None,
               "steps": info.get("steps"), "pairs_trained": sum(m["pairs"] for m in metrics) if metrics else None,
               "train_seconds": summary.get("train_seconds"),
               "train_loss": _tail_mean(metrics, "loss"),
               "train_reward_accuracy": _tail_mean(metrics, "reward_accuracy")}
        rows.append({**row, **_eval_cells(evaluated.get(arm, {}))})
    if "base" in evaluated:
        rows.append({"arm": "base", "preset": "(initial model)", **_eval_cells(evaluated["base"])})
    return [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()} for row in rows]


def _eval_cells(results: dict[str, Any]) -> dict[str, Any]:
    pref, alpaca = results.get("preference", {}), results.get("alpaca_eval", {})
    return {"heldout_n": pref.get("n_total"), "heldout_accuracy": pref.get("accuracy"),
            "heldout_margin": pref.get("mean_margin"), "heldout_ln_accuracy": pref.get("length_normalised_accuracy"),
            "alpaca_n": alpaca.get("n_total"), "alpaca_lc": alpaca.get("length_controlled_winrate"),
            "alpaca_wr": alpaca.get("win_rate"), "alpaca_length": alpaca.get("avg_length")}


def evaluation_notes(evaluated: dict[str, dict[str, Any]]) -> list[str]:
    """What the table's AlpacaEval figures do not say: instructions left without a judgment, and an LC that is not
    the official one (the offline approximation) or not given, with the reason."""
    notes: dict[str, list[str]] = {}  # one line per note, naming the arms it is about
    for arm, results in evaluated.items():
        alpaca = results.get("alpaca_eval") or {}
        if alpaca.get("n_unjudged"):
            notes.setdefault(f"AlpacaEval: {alpaca['n_unjudged']} of {alpaca['n_unjudged'] + alpaca['n_total']} "
                             "instructions have no judgment and are not counted", []).append(arm)
        if alpaca.get("lc_note") and alpaca.get("lc_method") != "published_weights":
            # the reason the published weights were not used names the arm: the same note for every arm
            note = alpaca["lc_note"].split(". Published weights not used:")[0]
            notes.setdefault(f"AlpacaEval LC: {note}", []).append(arm)
        if alpaca.get("lc_judge_note"):  # another judge than AlpacaEval 2.0's: not the leaderboard's LC
            notes.setdefault(f"AlpacaEval LC: {alpaca['lc_judge_note']}", []).append(arm)
    return [f"{', '.join(arms)}: {note}" for note, arms in notes.items()]


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(label for _, label in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_run_report(workdir: Path, config: RunConfig, rows: list[dict[str, Any]],
                     trained: dict[str, dict[str, Any]], evaluated: dict[str, dict[str, Any]]) -> Path:
    """``WORKDIR/report/``: ``comparison.md``, ``comparison.json``, ``curves.png``, the evaluation report and
    ``index.html``; returns the page's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from perpair.eval.report import write_report as write_eval_report

    out = workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    notes = evaluation_notes(evaluated)
    (out / "comparison.md").write_text(markdown_table(rows) + "".join(f"\n{n}\n" for n in notes),
                                       encoding="utf-8")
    # each row with the notes about it, as the Markdown has them below the table (a reader of the JSON alone read
    # win rates over the judged instructions as over all)
    described = []
    for row in rows:
        results = evaluated.get(row["arm"], {})
        described.append({**row, "alpaca_n_unjudged": (results.get("alpaca_eval") or {}).get("n_unjudged"),
                          "notes": evaluation_notes({row["arm"]: results})})
    (out / "comparison.json").write_text(json.dumps(described, indent=1), encoding="utf-8")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm, info in trained.items():
        metrics = read_metrics(info["metrics"])
        steps = [m["step"] for m in metrics]
        for ax, key in zip(axes, ("loss", "reward_accuracy", "reward_margin"), strict=True):
            values = np.array([np.nan if m.get(key) is None else m[key] for m in metrics], dtype=float)
            ax.plot(steps, _smooth(values), label=arm)
    for ax, title in zip(axes, ("loss (routed mean)", "reward accuracy (preference pairs)", "reward margin"),
                         strict=True):
        ax.set_title(title + ", moving average of 5")
        ax.set_xlabel("optimizer step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)

    folders = [p for arm, results in evaluated.items() for p in _eval_folders(workdir, arm, results)]
    eval_page = write_eval_report(folders, out / "eval")["html"] if folders else None

    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(k)))}</td>" for k, _ in COLUMNS) + "</tr>"
                   for r in rows)
    plans = "".join(f'<li><a href="../arms/{html.escape(arm)}/plan_report/index.html">{html.escape(arm)}</a> '
                    f'({html.escape(config.arms[arm].preset)})</li>' for arm in trained)
    evaluation = (f'<p><a href="eval/{Path(eval_page).name}">evaluation report</a> (tables and plots of every '
                  f'benchmark run)</p>' if eval_page else "<p>no evaluation configured</p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>perpair run</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}</style></head><body>"
            f"<h1>perpair run: {html.escape(str(workdir))}</h1><h2>Comparison</h2><table><tr>{head}</tr>{body}"
            "</table><p>held-out pairs: the test split's pairs scored (those that fit max_length); held-out acc.: "
            "implicit-reward accuracy on them against the initial model (ties count half); LN: reference-free "
            "length-normalised log-prob margin; AlpacaEval instr.: the instructions judged, from the configured "
            "subset and by the configured judge, so comparable between arms of this run only.</p>"
            + "".join(f"<p>{html.escape(n)}</p>" for n in notes) +
            f"<h2>Training curves</h2><img src='curves.png' alt='training curves'><h2>Plans</h2><ul>{plans}</ul>"
            f"<h2>Evaluation</h2>{evaluation}</body></html>")
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def _smooth(values: np.ndarray, window: int = 5) -> np.ndarray:
    out = np.full_like(values, np.nan)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        chunk = chunk[np.isfinite(chunk)]
        if len(chunk):
            out[i] = chunk.mean()
    return out


def _eval_folders(workdir: Path, arm: str, results: dict[str, Any]) -> list[Path]:
    """The folders of the evaluations this run made of ``arm``: one left by an earlier run whose config had it (an
    evaluation since taken out of the config) holds numbers of other settings."""
    folder = workdir / ("base" if arm == "base" else f"arms/{arm}") / "eval"
    return [folder / name for name in ("preference", "alpaca_eval") if name in results]
