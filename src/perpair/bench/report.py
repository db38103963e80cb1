"""The controlled benchmark's outputs: ``results.json``, ``table.md`` and PNG plots (I/O only)."""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from perpair.artifacts import check_output_folder, write_text_atomic
from perpair.errors import InputError

TABLE_METRICS = ("arithmetic", "format", "refusal", "benign", "objective", "style_drift")
# The top-level keys of the results.json this benchmark writes (the main run's, and "sweeps").
RESULTS_KEYS = {"config", "per_seed", "aggregate", "metrics", "interval", "seconds", "cpu_seconds", "files", "sweeps"}


def interval_cell(entry: dict[str, float], digits: int = 3, signed: bool = False) -> str:
    sign = "+" if signed else ""
    half = entry["half_width"]
    return f"{entry['mean']:{sign}.{digits}f} ± " + ("n/a" if half is None else f"{half:.{digits}f}")


def error_bar(entry: dict[str, float]) -> float:
    """The half-width to draw (NaN draws no bar: one seed has no interval)."""
    return math.nan if entry["half_width"] is None else entry["half_width"]


def table_markdown(results: dict[str, Any]) -> str:
    """One table per noise level (arms × test metrics), then objective accuracy across noise levels."""
    aggregate = results["aggregate"]
    seeds = results["config"]["seeds"]
    levels = list(aggregate)
    lines = [f"Controlled benchmark: test-prompt metrics, mean ± 95% t-interval half-width over {seeds} seed(s).",
             "Accuracies are exact match (higher is better); style_drift is mean |ΔP(house style)| vs the "
             "reference (lower = closer).", ""]
    for level in levels:
        lines += [f"### flip rate {level}", "",
                  "| arm | " + " | ".join(TABLE_METRICS) + " |",
                  "|---|" + "---:|" * len(TABLE_METRICS)]
        for arm, entry in aggregate[level].items():
            lines.append(f"| {arm} | " + " | ".join(interval_cell(entry[m]) for m in TABLE_METRICS) + " |")
        lines.append("")
    lines += ["### objective accuracy vs flip rate", "",
              "| arm | " + " | ".join(f"flip {level}" for level in levels) + " |",
              "|---|" + "---:|" * len(levels)]
    for arm in aggregate[levels[0]]:
        lines.append(f"| {arm} | " + " | ".join(interval_cell(aggregate[level][arm]["objective"]) for level in levels)
                     + " |")
    lines += ["", "### paired difference in objective accuracy vs DPO best β (same seed)", "",
              "| arm | " + " | ".join(f"flip {level}" for level in levels) + " |",
              "|---|" + "---:|" * len(levels)]
    for arm in aggregate[levels[0]]:
        if arm != "DPO best β":
            cells = [interval_cell(aggregate[level][arm]["objective_vs_best"], signed=True) for level in levels]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    chosen = [[seed["noise"][level]["runs"]["DPO best β"]["chosen"] for seed in results["per_seed"]]
              for level in levels]
    lines += ["", "DPO best β chosen on validation prompts (per flip rate, per seed): "
              + "; ".join(f"{level}: {', '.join(c.removeprefix('DPO ') for c in picks)}"
                          for level, picks in zip(levels, chosen, strict=True))]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, str]:
    """Write every output of the main run (a sweep's section already in ``results.json`` stays); returns
    ``{name: path}``."""
    files = {"results": out / "results.json", "table": out / "table.md",
             "accuracy_by_category": out / "accuracy_by_category.png",
             "accuracy_vs_noise": out / "accuracy_vs_noise.png", "style_drift": out / "style_drift.png"}
    files_str = {k: str(v) for k, v in files.items()}
    out.mkdir(parents=True, exist_ok=True)
    _plots(results, files)

    def replace_main(payload: dict[str, Any]) -> None:
        sweeps = payload.get("sweeps")
        payload.clear()
        payload.update({**results, "files": files_str})
        if sweeps:
            payload["sweeps"] = sweeps

    update_results(out, replace_main)
    return files_str


def render_table(payload: dict[str, Any]) -> str:
    """``table.md``: the main run's tables (when it ran into this folder), then each sweep's, in a fixed order."""
    from perpair.bench.sweeps import SWEEPS

    parts = [table_markdown(payload)] if "aggregate" in payload else []
    parts += [payload["sweeps"][name]["table"] for name in SWEEPS if name in payload.get("sweeps", {})]
    return "\n".join(parts)


def check_out(out: Path, *, sweep: bool = False) -> None:
    """Refuse, before any training, an output folder whose ``results.json`` the run could not add to (``sweep``: a
    sweep's run, which keeps the main run's section; the main run keeps the sweeps')."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is not a folder")
    check_output_folder(out, "--out")  # a path under a file, a read-only folder: refused now, not after the run
    results_path = out / "results.json"
    if results_path.exists():
        try:
            payload = json.loads(results_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"is not a results file of perpair bench controlled ({exc}); choose another --out",
                             file=str(results_path)) from None
        if not isinstance(payload, dict):
            raise InputError("is not a results file of perpair bench controlled (not a JSON object); choose "
                             "another --out", file=str(results_path))
        # Another command's results.json (perpair eval's, say) would be replaced by this run's, or get a sweep
        # section added to it: only a file this benchmark wrote is added to.
        foreign = sorted(set(payload) - RESULTS_KEYS)
        if foreign or (payload and not {"aggregate", "sweeps"} & set(payload)):
            why = f"key(s) {', '.join(foreign)}" if foreign else "neither a main run nor a sweep"
            raise InputError(f"is not a results file of perpair bench controlled ({why}), which this run would "
                             "overwrite; choose another --out", file=str(results_path))
        # the sections this run keeps are rendered into table.md again with its own: one of another shape (edited by
        # hand) was a traceback after the training, its results lost
        kept = payload if sweep else {"sweeps": payload["sweeps"]} if payload.get("sweeps") else {}
        try:
            if not isinstance(kept.get("sweeps", {}), dict):
                raise TypeError(f"sweeps is a {type(kept['sweeps']).__name__}, not an object")
            render_table(kept)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
            raise InputError(f"is a results file of perpair bench controlled whose sections this run keeps cannot "
                             f"be read ({type(exc).__name__}: {exc}); remove it or choose another --out",
                             file=str(results_path)) from None


def update_results(out: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Read ``results.json`` (if any), apply ``change``, write it back and re-render ``table.md`` from it.

    An exclusive lock on a file beside them keeps two runs writing into the same folder (e.g. two sweeps in
    parallel) from losing each other's section; each file is written to a temporary name and renamed, so a
    reader never sees half a file.
    """
    out.mkdir(parents=True, exist_ok=True)
    results_path, table_path = out / "results.json", out / "table.md"
    with open(out / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        payload = json.loads(results_path.read_text(encoding="utf-8")) if results_path.exists() else {}
        change(payload)
        write_text_atomic(results_path, json.dumps(payload, indent=1, ensure_ascii=False, default=float))
        write_text_atomic(table_path, render_table(payload))


def _plots(results: dict[str, Any], files: dict[str, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aggregate = results["aggregate"]
    levels = list(aggregate)
    arms = [a for a in aggregate[levels[0]] if not a.startswith("DPO β=")]  # the sweep is summarised by its best
    middle = levels[len(levels) // 2]
    categories = ("arithmetic", "format", "refusal", "benign")

    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(arms)
    x = np.arange(len(categories))
    for i, arm in enumerate(arms):
        means = [aggregate[middle][arm][c]["mean"] for c in categories]
        errors = [error_bar(aggregate[middle][arm][c]) for c in categories]
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, means, width, yerr=errors, capsize=2, label=arm)
    ax.set_xticks(x, categories)
    ax.set_ylabel("exact match (held-out prompts)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Accuracy per category, flip rate {middle} (mean, 95% t-interval over seeds)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(files["accuracy_by_category"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_noise = sorted(levels, key=float)  # a line joins the flip rates left to right, whatever order --noise gave
    noise = [float(level) for level in by_noise]
    for arm in arms:
        means = np.array([aggregate[level][arm]["objective"]["mean"] for level in by_noise])
        errors = np.array([error_bar(aggregate[level][arm]["objective"]) for level in by_noise])
        ax.errorbar(noise, means, yerr=errors, marker="o", capsize=3, label=arm,
                    linestyle="--" if arm == "reference" else "-")
    ax.set_xlabel("flip rate on objective pairs")
    ax.set_ylabel("mean exact match (4 categories)")
    ax.set_title("Robustness to label noise")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(files["accuracy_vs_noise"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    trained = [a for a in arms if a != "reference"]
    width = 0.8 / len(levels)
    x = np.arange(len(trained))
    for i, level in enumerate(levels):
        means = [aggregate[level][arm]["style_drift"]["mean"] for arm in trained]
        errors = [error_bar(aggregate[level][arm]["style_drift"]) for arm in trained]
        ax.bar(x + (i - (len(levels) - 1) / 2) * width, means, width, yerr=errors, capsize=2,
               label=f"flip {level}")
    ax.set_xticks(x, trained, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("mean |ΔP(house style)| vs reference")
    ax.set_title("Drift on the subjective dimension (style)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(files["style_drift"], dpi=110)
    plt.close(fig)
