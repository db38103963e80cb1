"""The plan report: an HTML page with PNG plots, written next to the plan.

``plan.parquet`` → ``plan_report/index.html`` plus one PNG per plot. Figures are drawn on matplotlib's
Agg canvas without pyplot, so no global state or display is touched. A plot whose data the plan lacks
(no annotations, no margin) is still written, saying what is missing, so the page is always complete.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import yaml

from perpair.annotate.schema import CATEGORIES, UNKNOWN

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOTS = (
    ("beta_hist.png", "β histogram (pairs on the preference route)"),
    ("beta_by_category.png", "β by category"),
    ("category_magnitude.png", "category × magnitude (pair counts)"),
    ("routes.png", "routed share"),
    ("margin_hist.png", "difficulty (margin) distribution"),
    ("curriculum.png", "curriculum position vs difficulty"),
)
_ROUTE_COLOURS = {"preference": "#1f77b4", "sft": "#ff7f0e", "drop": "#7f7f7f"}


def report_dir(plan_path: str | os.PathLike) -> Path:
    """Where the report of ``plan_path`` goes: ``plan.parquet`` → ``plan_report/``."""
    plan_path = Path(plan_path)
    return plan_path.with_name(f"{plan_path.stem}_report")


def write_report(table: pa.Table, provenance: dict[str, Any], directory: str | os.PathLike, *,
                 pairs_path: str | os.PathLike | None = None, command: str | None = None) -> Path:
    """Write the plots and ``index.html`` into ``directory``; returns the page's path.

    With ``pairs_path`` (the pairs file planned) the page names it and shows a few example pairs per route
    and category; ``command`` is the command line that made the plan.
    """
    examples = _examples(table, pairs_path) if pairs_path is not None else []
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = _columns(table)
    figures = {
        "beta_hist.png": beta_histogram(data["beta"], data["route"], provenance["schedule"]["beta"]["beta"]),
        "beta_by_category.png": beta_by_category(data["beta"], data["category"], data["route"]),
        "category_magnitude.png": category_magnitude_figure(category_magnitude_counts(
            data["category"], data["magnitude"])),
        "routes.png": routes_figure(data["route"]),
        "margin_hist.png": margin_histogram(data["difficulty"], data["route"],
                                            provenance["schedule"]["routing"]["tau"]),
        "curriculum.png": curriculum_figure(data["order"], data["difficulty"], data["route"]),
    }
    for name, figure in figures.items():
        figure.savefig(directory / name, dpi=100, metadata={"Software": None})
    page = directory / "index.html"
    page.write_text(render_html(data, provenance, pairs_path=pairs_path, command=command, examples=examples),
                    encoding="utf-8")
    return page


def remove_report(directory: str | os.PathLike) -> None:
    """Remove the files a report of an earlier plan left in ``directory`` (the page and its plots, then the folder
    if that empties it): a plan written with ``--no-report`` over that plan would stand beside a report of the
    other plan's β and routes."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for name in ("index.html", *(name for name, _ in PLOTS)):
        (directory / name).unlink(missing_ok=True)
    if not any(directory.iterdir()):
        directory.rmdir()


EXAMPLES_PER_GROUP = 3
EXAMPLE_CHARS = 400  # of each text shown: enough to recognise the pair, short enough to skim


def _examples(table: pa.Table, pairs_path: str | os.PathLike) -> list[dict[str, Any]]:
    """The first few pairs (in the pairs file's order) of each route × category, with their texts."""
    from perpair.data import read_pairs
    from perpair.data.schema import text_of

    pairs, _ = read_pairs(str(pairs_path))
    rows: dict[str, int] = {pid: i for i, pid in enumerate(pairs.column("pair_id").to_pylist())}
    groups: dict[tuple[str, str], list[int]] = {}
    for i, (route, category) in enumerate(zip(table.column("route").to_pylist(),
                                              table.column("category").to_pylist(), strict=True)):
        group = groups.setdefault((route, category or "unannotated"), [])
        if len(group) < EXAMPLES_PER_GROUP:
            group.append(i)
    plan = table.to_pylist()
    examples = []
    for (route, category), members in sorted(groups.items()):
        for i in members:
            pair = pairs.slice(rows[plan[i]["pair_id"]], 1).to_pylist()[0]
            # as trained: a pair the plan flips trains (and an SFT route imitates) the file's rejected response
            chosen, rejected = ("rejected", "chosen") if plan[i]["flipped"] else ("chosen", "rejected")
            examples.append({"route": route, "category": category, "pair_id": plan[i]["pair_id"],
                             "beta": plan[i]["beta"], "magnitude": plan[i]["magnitude"],
                             "flipped": bool(plan[i]["flipped"]), "prompt": text_of(pair["prompt"]),
                             "chosen": text_of(pair[chosen]), "rejected": text_of(pair[rejected])})
    return examples


def _columns(table: pa.Table) -> dict[str, np.ndarray]:
    def floats(name: str) -> np.ndarray:
        return np.asarray(table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False), np.float64)

    return {
        "beta": floats("beta"),
        "difficulty": floats("difficulty"),
        "magnitude": floats("magnitude"),
        "order": floats("order"),
        "route": np.asarray(table.column("route").to_numpy(zero_copy_only=False), dtype=object),
        "category": np.asarray(table.column("category").to_numpy(zero_copy_only=False), dtype=object),
    }


def _figure(**options) -> Figure:
    """A matplotlib figure, imported here rather than with the module: importing matplotlib's figures takes
    0.25 s, which every command that imports the plan stage (``perpair train`` does) would pay at start-up."""
    from matplotlib.figure import Figure

    return Figure(**options)


def _placeholder(title: str, message: str) -> Figure:
    figure = _figure(figsize=(6, 3.5))
    ax = figure.add_subplot()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    return figure


def beta_histogram(beta: np.ndarray, route: np.ndarray, global_beta: float) -> Figure:
    values = beta[(route == "preference") & ~np.isnan(beta)]
    if len(values) == 0:
        return _placeholder("β histogram", "no pair is on the preference route")
    figure = _figure(figsize=(6, 3.5), layout="constrained")
    ax = figure.add_subplot()
    low, high = values.min(), values.max()
    if high > low * (1 + 1e-9):
        ax.hist(values, bins=np.geomspace(low, high, 41), color=_ROUTE_COLOURS["preference"])
        ax.set_xscale("log")
    else:
        ax.bar([0], [len(values)], color=_ROUTE_COLOURS["preference"])
        ax.set_xticks([0], [f"{low:.4g}"])
    if high > low * (1 + 1e-9):  # (one bar, at 0, has no β axis to mark the global β on: its tick says the value)
        ax.axvline(global_beta, color="black", linestyle="--", label=f"global β = {global_beta:g}")
        ax.legend()
    ax.set_xlabel("β")
    ax.set_ylabel("pairs")
    ax.set_title("β histogram (preference route)")
    return figure


def beta_by_category(beta: np.ndarray, category: np.ndarray, route: np.ndarray) -> Figure:
    kept = ~np.isnan(beta)
    labels = [c for c in (*CATEGORIES, UNKNOWN, None) if np.any(kept & (category == c))] if kept.any() else []
    if not labels:
        return _placeholder("β by category", "no pair has a β")
    figure = _figure(figsize=(7, 3.8), layout="constrained")
    ax = figure.add_subplot()
    groups = [beta[kept & (category == c)] for c in labels]
    ax.boxplot(groups, showfliers=False)
    ax.set_xticks(range(1, len(labels) + 1),
                  [f"{c or 'unannotated'} (n={len(g)})" for c, g in zip(labels, groups, strict=True)],
                  fontsize=8, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("β")
    ax.set_title("β by category (every pair with a β)")
    return figure


def category_magnitude_counts(category: np.ndarray, magnitude: np.ndarray) -> dict[str, list[int]]:
    """Pair counts per category and magnitude rounded to 0–3, halves up (the annotated pairs only; an ensemble's
    magnitudes are means). numpy's rint rounds halves to even: 0.5 counted as 0 but 1.5 as 2, 2.5 as 2."""
    counts = {}
    rounded = np.floor(np.nan_to_num(magnitude) + 0.5).astype(np.int64)
    for c in (*CATEGORIES, UNKNOWN):
        if c == UNKNOWN and not np.any(category == c):
            continue  # a row only where a teacher said it (the ratings teacher with an overall score only)
        rows = category == c
        counts[c] = [int(np.sum(rows & (rounded == m))) for m in range(4)]
    return counts


def category_magnitude_figure(counts: dict[str, list[int]]) -> Figure:
    grid = np.array(list(counts.values()))
    if grid.sum() == 0:
        return _placeholder("category × magnitude", "no annotations: every pair is unannotated")
    figure = _figure(figsize=(6, 4), layout="constrained")
    ax = figure.add_subplot()
    image = ax.imshow(grid, cmap="Blues", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > grid.max() / 2 else "black", fontsize=8)
    ax.set_xticks(range(4), ["0 none", "1 minor", "2 moderate", "3 severe"])
    ax.set_yticks(range(len(counts)), list(counts))
    ax.set_xlabel("magnitude (rounded)")
    ax.set_title("category × magnitude")
    figure.colorbar(image, ax=ax, label="pairs")
    return figure


def percent(count: int, n: int) -> str:
    """``count`` of ``n`` in percent to one decimal, but never 0.0% for some nor 100.0% for not all: 1 pair of
    3,000 on the SFT route read "0.0%", and the other 2,999 "100.0%"."""
    share = 100 * count / n
    if 0 < share < 0.05:
        return "<0.1%"
    if 99.95 <= share < 100:
        return ">99.9%"
    return f"{share:.1f}%"


def mislabeled_action(counts: dict[str, Any]) -> str:
    """The mislabeled action as the summary shows it: beta_max under one global β moves no pair's β, nor where the
    pairs' signal is 0 already (``beta.priors.mislabeled`` 0, the default: β_max by the formula)."""
    mislabeled = counts["mislabeled"]
    said = f"action {mislabeled['action']}"
    if mislabeled["action"] != "beta_max" or not mislabeled["above_threshold"]:
        return said
    if not mislabeled["beta_max"]:
        return said + ": no effect, one global β"
    if not mislabeled.get("beta_max_moved", mislabeled["beta_max"]):  # (a plan of before 7 Dec 2026: not counted)
        return said + ": no effect, their signal is 0 already (β_max; beta.priors.mislabeled 0)"
    return said


def routes_figure(route: np.ndarray) -> Figure:
    names = ["preference", "sft", "drop"]
    counts = [int(np.sum(route == name)) for name in names]
    total = max(sum(counts), 1)
    figure = _figure(figsize=(6, 2.8), layout="constrained")
    ax = figure.add_subplot()
    bars = ax.barh(names, [100 * c / total for c in counts], color=[_ROUTE_COLOURS[n] for n in names])
    for bar, count in zip(bars, counts, strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {count} ({percent(count, total)})",
                va="center")
    ax.set_xlim(0, 115)
    ax.invert_yaxis()
    ax.set_xlabel("share of pairs (%)")
    ax.set_title("routed share")
    return figure


def margin_histogram(difficulty: np.ndarray, route: np.ndarray, tau: float | None) -> Figure:
    have = ~np.isnan(difficulty)
    if not have.any():
        return _placeholder("difficulty distribution", "no difficulty margin (margin.source none)")
    figure = _figure(figsize=(6, 3.5), layout="constrained")
    ax = figure.add_subplot()
    values = difficulty[have]
    distinct = np.unique(values)
    if 1 < len(distinct) <= 40:  # discrete margins (ratings): one bar per value, edges halfway between
        middles = (distinct[1:] + distinct[:-1]) / 2
        bins = np.concatenate([[2 * distinct[0] - middles[0]], middles, [2 * distinct[-1] - middles[-1]]])
    else:
        bins = np.histogram_bin_edges(values, bins=40)
    names = [n for n in ("preference", "sft", "drop") if np.any(have & (route == n))]
    ax.hist([difficulty[have & (route == n)] for n in names], bins=bins, stacked=True, label=names,
            color=[_ROUTE_COLOURS[n] for n in names])
    if tau is not None:
        ax.axvline(tau, color="black", linestyle="--", label=f"τ = {tau:g}")
    ax.legend()
    ax.set_xlabel("difficulty (margin; large = easy)")
    ax.set_ylabel("pairs")
    ax.set_title("difficulty distribution by route")
    return figure


def curriculum_figure(order: np.ndarray, difficulty: np.ndarray, route: np.ndarray) -> Figure:
    have = ~np.isnan(order) & ~np.isnan(difficulty)
    if not have.any():
        return _placeholder("curriculum", "no difficulty margin to plot the order against")
    figure = _figure(figsize=(6, 3.5), layout="constrained")
    ax = figure.add_subplot()
    for name in ("preference", "sft"):
        rows = have & (route == name)
        if rows.any():
            ax.scatter(order[rows], difficulty[rows], s=3, color=_ROUTE_COLOURS[name], label=name,
                       rasterized=True, linewidths=0)
    ax.legend(markerscale=4)
    ax.set_xlabel("position in training (order)")
    ax.set_ylabel("difficulty (margin)")
    ax.set_title("curriculum position vs difficulty")
    return figure


def _clip(text: str) -> str:
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + " …"


def _examples_html(examples: list[dict[str, Any]]) -> str:
    if not examples:
        return "<p>(no pairs file given: no examples)</p>"
    esc = html.escape
    rows = []
    for e in examples:
        beta = "—" if e["beta"] is None else f"{e['beta']:.4g}"
        magnitude = "—" if e["magnitude"] is None else f"{e['magnitude']:g}"
        route = esc(e["route"]) + ("<br>(flipped: the file's rejected response is chosen here)"
                                   if e.get("flipped") else "")
        rows.append(f"<tr><td>{route}</td><td>{esc(e['category'])}</td><td><code>{esc(e['pair_id'])}"
                    f"</code></td><td>{beta}</td><td>{magnitude}</td>"
                    + "".join(f'<td class="text">{esc(_clip(e[k]))}</td>' for k in ("prompt", "chosen", "rejected"))
                    + "</tr>")
    return ("<table>\n<tr><th>route</th><th>category</th><th>pair</th><th>β</th><th>magnitude</th><th>prompt</th>"
            "<th>chosen (as trained)</th><th>rejected (as trained)</th></tr>\n" + "\n".join(rows) + "\n</table>")


def render_html(data: dict[str, np.ndarray], provenance: dict[str, Any], *, pairs_path: str | os.PathLike | None = None,
                command: str | None = None, examples: list[dict[str, Any]] | None = None) -> str:
    esc = html.escape
    counts = provenance["counts"]
    rows = [
        ("pairs", counts["pairs"]),
        *((f"route {name}", value) for name, value in counts["routes"].items()),
        ("annotated / unannotated", f"{counts['annotated']} / {counts['unannotated']}"),
        ("mislabeled above threshold", f"{counts['mislabeled']['above_threshold']} ({mislabeled_action(counts)})"),
        ("pairs without a difficulty", counts["no_margin"] if counts["no_margin"] is not None else "n/a"),
    ]
    # The β that act: the preference route's (an SFT pair's β is never read), as perpair plan's summary shows
    # them and as the geometric mean is normalised over.
    kept = data["beta"][(data["route"] == "preference") & ~np.isnan(data["beta"])]
    if len(kept):
        rows.append(("β (preference route) min / geometric mean / max",
                     f"{kept.min():.4g} / {np.exp(np.mean(np.log(kept))):.4g} / {kept.max():.4g}"))
    summary = "\n".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in rows)
    grid = category_magnitude_counts(data["category"], data["magnitude"])
    grid_rows = "\n".join(f"<tr><th>{esc(c)}</th>" + "".join(f"<td>{v}</td>" for v in values)
                          + f"<td>{sum(values)}</td></tr>" for c, values in grid.items())
    figures = "\n".join(
        f'<figure><img src="{name}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'
        for name, caption in PLOTS)
    schedule = yaml.safe_dump(provenance["schedule"], sort_keys=False)
    warnings = "".join(f'<p class="warning"><strong>warning:</strong> {esc(w)}</p>\n'
                       for w in provenance.get("warnings") or [])
    inputs = ((f"pairs file {esc(str(pairs_path))}<br>" if pairs_path is not None else "")
              + (f"command <code>{esc(command)}</code><br>" if command else "")
              + f"pairs sha256 {provenance['pairs_sha256']}<br>"
              f"annotations sha256 {provenance['annotations_sha256'] or 'none'}<br>"
              f"schedule sha256 {provenance['schedule_sha256']}")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>perpair plan report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 70em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ text-align: left; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
img {{ max-width: 100%; }}
pre {{ background: #f6f6f6; padding: 0.8em; }}
td.text {{ text-align: left; white-space: pre-wrap; font-size: 85%; max-width: 24em; vertical-align: top; }}
.warning {{ background: #fff3cd; border: 1px solid #e0c060; padding: 0.6em; }}
</style>
</head>
<body>
<h1>perpair plan report</h1>
<p>preset {esc(str(provenance.get('preset')))}; {inputs}</p>
{warnings}<h2>Summary</h2>
<table>
{summary}
</table>
<h2>Category × magnitude</h2>
<table>
<tr><th>category</th><th>0</th><th>1</th><th>2</th><th>3</th><th>total</th></tr>
{grid_rows}
</table>
<h2>Plots</h2>
{figures}
<h2>Example pairs (the first {EXAMPLES_PER_GROUP} of each route and category)</h2>
{_examples_html(examples or [])}
<h2>Schedule</h2>
<pre>{esc(schedule)}</pre>
</body>
</html>
"""
