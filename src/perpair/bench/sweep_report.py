"""The sweeps' tables and plots, and their sections of ``results.json`` and ``table.md`` (I/O only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from perpair.bench import report
from perpair.bench.controlled import BEST_DPO
from perpair.bench.sweeps import ORACLE, SWEEPS, paired

TEACHER_ARMS = ("SP²DPO", "SP²DPO @ best β", "random β @ best β")


def _cell(entry: dict[str, float]) -> str:
    return report.interval_cell(entry, signed=True)


def _abs(entry: dict[str, float]) -> str:
    return report.interval_cell(entry)


def sweep_markdown(sweep: str, section: dict[str, Any]) -> str:
    """The sweep's tables: paired differences to ``DPO best β`` (same seed and condition) first."""
    seeds = section["config"]["seeds"]
    lines = [f"## Sweep: {sweep}", "",
             f"Test-prompt objective accuracy; mean ± 95% t-interval half-width over {seeds} seed(s). "
             "Paired: the arm minus `DPO best β` on the same seed and condition (β chosen on validation prompts).",
             ""]
    body = {"teacher-accuracy": _teacher_tables, "systematic-noise": _systematic_tables,
            "mislabel": _mislabel_tables, "tuning": _tuning_tables}[sweep]
    return "\n".join(lines + body(section)) + "\n"


def _only_variant(aggregate: dict[str, Any], cond: str) -> tuple[str, dict[str, Any]]:
    (variant, cell), = aggregate[cond].items()
    return variant, cell


def _arms_by_condition(section: dict[str, Any], arms: list[str], metric: str, title: str) -> list[str]:
    aggregate = section["aggregate"]
    conds = list(aggregate)
    lines = [f"### {title}", "", "| arm | " + " | ".join(conds) + " |", "|---|" + "---:|" * len(conds)]
    rows = [(BEST_DPO, metric, _abs)] + [(a, f"{metric}_vs_best", _cell) for a in arms]
    for arm, key, fmt in rows:
        label = f"{arm} (absolute)" if arm == BEST_DPO else arm
        lines.append(f"| {label} | " + " | ".join(fmt(_only_variant(aggregate, c)[1]["arms"][arm][key])
                                                 for c in conds) + " |")
    return lines + [""]


def _data_line(section: dict[str, Any]) -> list[str]:
    aggregate = section["aggregate"]
    parts = []
    for cond in aggregate:
        variant, cell = _only_variant(aggregate, cond)
        d = cell["data"]
        parts.append(f"{cond}: {d['flipped']:.0f} flipped pairs, teacher ({variant}) accuracy "
                     f"{d['teacher_accuracy']:.3f}, {d['teacher_flags_mislabeled']:.0f} flagged mislabeled")
    return ["Per seed, mean over seeds: " + "; ".join(parts) + ".", ""]


def _chosen_line(section: dict[str, Any]) -> list[str]:
    per_seed = section["per_seed"]
    parts = [f"{cond}: " + ", ".join(f"β={s['conditions'][cond]['best_beta']:g}" for s in per_seed)
             for cond in section["aggregate"]]
    return ["DPO best β per seed: " + "; ".join(parts) + ".", ""]


def _teacher_tables(section: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for cond, variants in section["aggregate"].items():
        best = next(iter(variants.values()))["arms"][BEST_DPO]["objective"]
        lines += [f"### {cond}: paired difference vs DPO best β ({_abs(best)})", "",
                  "| teacher | accuracy (measured) | flagged mislabeled | " + " | ".join(TEACHER_ARMS)
                  + " | SP²DPO @ best β − random β @ best β |", "|---|" + "---:|" * (len(TEACHER_ARMS) + 3)]
        for variant, cell in variants.items():
            gap = paired(section["per_seed"], cond, variant, "SP²DPO @ best β", "random β @ best β")
            lines.append(f"| {variant} | {cell['data']['teacher_accuracy']:.3f} | "
                         f"{cell['data']['teacher_flags_mislabeled']:.0f} | "
                         + " | ".join(_cell(cell["arms"][a]["objective_vs_best"]) for a in TEACHER_ARMS)
                         + f" | {_cell(gap)} |")
        lines.append("")
    return lines + _chosen_line(section)


def _sweep_arms(section: dict[str, Any], exclude_prefix: tuple[str, ...] = ("DPO β=",)) -> list[str]:
    first = next(iter(section["aggregate"].values()))
    arms = next(iter(first.values()))["arms"]
    return [a for a in arms if a != BEST_DPO and not a.startswith(exclude_prefix)]


def _systematic_tables(section: dict[str, Any]) -> list[str]:
    arms = _sweep_arms(section)
    return (_arms_by_condition(section, arms, "objective", "objective accuracy, paired vs DPO best β")
            + _arms_by_condition(section, arms, "arithmetic", "arithmetic accuracy, paired vs DPO best β")
            + _data_line(section) + _chosen_line(section))


def _mislabel_tables(section: dict[str, Any]) -> list[str]:
    arms = _sweep_arms(section)
    lines = _arms_by_condition(section, arms, "objective", "objective accuracy, paired vs DPO best β")
    conds = list(section["aggregate"])
    groups = ("clean", "flip_flagged", "flip_missed")
    lines += ["### β by the generator's truth (geometric mean over the preference-routed trained pairs; mean "
              "over seeds)", "",
              "| arm | " + " | ".join(f"{c}: {g}" for c in conds for g in groups) + " |",
              "|---|" + "---:|" * (len(conds) * len(groups))]
    for arm in arms:
        cells = []
        for cond in conds:
            by_truth = _only_variant(section["aggregate"], cond)[1]["arms"][arm].get("beta_by_truth", {})
            cells += ["–" if by_truth.get(g) is None else f"{by_truth[g]:.3g}" for g in groups]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""] + _data_line(section) + _chosen_line(section)


def _tuning_tables(section: dict[str, Any]) -> list[str]:
    arms = _sweep_arms(section, exclude_prefix=())
    lines = _arms_by_condition(section, arms, "objective", "objective accuracy, paired vs DPO best β")
    lines += ["### β per seed: the DPO sweep's (6 trainings), SP²DPO's own sweep's, the rule's (no training)", "",
              "| condition | seed | DPO best β | SP²DPO tuned β | rule β | DPO best β acc | DPO @ rule β acc "
              "| SP²DPO tuned acc | SP²DPO @ rule β acc |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cond in section["aggregate"]:
        for seed, result in enumerate(section["per_seed"]):
            variant, = result["conditions"][cond]["variants"].values()
            d, runs = variant["data"], variant["runs"]
            accs = " | ".join(f"{runs[a]['test']['objective']:.3f}" for a in
                              (BEST_DPO, "DPO @ rule β", "SP²DPO tuned", "SP²DPO @ rule β"))
            lines.append(f"| {cond} | {seed} | {d['sweep_beta']:g} | {d['sp2dpo_beta']:g} | {d['rule_beta']:.3g} | "
                         f"{accs} |")
    return lines + [""] + _data_line(section)


def write_sweep(sweep: str, section: dict[str, Any], out: Path) -> dict[str, str]:
    """Add the sweep's section to ``results.json`` (others kept), re-render ``table.md`` from it, draw the
    sweep's plot; returns ``{name: path}``."""
    out.mkdir(parents=True, exist_ok=True)
    plot = out / f"sweep_{sweep}.png"
    files = {"results": str(out / "results.json"), "table": str(out / "table.md"), "plot": str(plot)}
    section = {**section, "table": sweep_markdown(sweep, section), "files": files}
    _plot(sweep, section, plot)
    report.update_results(out, lambda payload: payload.setdefault("sweeps", {}).__setitem__(sweep, section))
    return files


def _plot(sweep: str, section: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aggregate = section["aggregate"]
    conds = list(aggregate)
    if sweep == "teacher-accuracy":
        fig, axes = plt.subplots(1, len(conds), figsize=(5.5 * len(conds), 4.2), squeeze=False)
        for ax, cond in zip(axes[0], conds, strict=True):
            variants = aggregate[cond]
            for arm, color in zip(TEACHER_ARMS, ("C0", "C1", "C2"), strict=True):
                for calibration, style in (("calibrated", "-"), ("overconfident", "--")):
                    names = [v for v in variants if v.endswith(calibration)] + [ORACLE]
                    x = [variants[v]["data"]["teacher_accuracy"] for v in names]
                    y = [variants[v]["arms"][arm]["objective_vs_best"] for v in names]
                    ax.errorbar(x, [e["mean"] for e in y], yerr=[report.error_bar(e) for e in y], color=color,
                                linestyle=style, marker="o", capsize=2, label=f"{arm} ({calibration})")
            ax.axhline(0, color="gray", linewidth=0.8)
            ax.set_xlabel("teacher accuracy (measured)")
            ax.set_ylabel("objective − DPO best β (paired)")
            ax.set_title(cond)
        axes[0][0].legend(fontsize=6)
    else:
        arms = _sweep_arms(section, exclude_prefix=("DPO β=", "SP²DPO β=") if sweep == "tuning" else ("DPO β=",))
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(arms) * len(conds) + 1.5))
        height = 0.8 / len(conds)
        y = np.arange(len(arms))
        for i, cond in enumerate(conds):
            cell = _only_variant(aggregate, cond)[1]["arms"]
            ax.barh(y + (i - (len(conds) - 1) / 2) * height, [cell[a]["objective_vs_best"]["mean"] for a in arms],
                    height, xerr=[report.error_bar(cell[a]["objective_vs_best"]) for a in arms], capsize=2, label=cond)
        ax.axvline(0, color="gray", linewidth=0.8)
        ax.set_yticks(y, arms, fontsize=8)
        ax.set_xlabel("objective − DPO best β (paired, 95% t-interval)")
        ax.legend(fontsize=8)
    fig.suptitle(f"perpair bench controlled --sweep {sweep}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["SWEEPS", "sweep_markdown", "write_sweep"]
