"""``perpair plan``: per-pair β, route and curriculum order, with a report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from rich.table import Table

from perpair.cli import app, console, out
from perpair.errors import InputError

if TYPE_CHECKING:
    from perpair.plan import PlanResult


@app.command("plan")
def plan_command(
    pairs: Annotated[Path, typer.Argument(
        metavar="PAIRS.parquet", help="Pairs file written by perpair prepare.")],
    preset: Annotated[str, typer.Option(
        metavar="NAME", help="Named schedule: dpo, sp2dpo, sp2dpo-random, mixdpo, sp2dpo+mixdpo.")],
    annotations: Annotated[Path | None, typer.Option(
        metavar="ANN.parquet", help="Annotations of this pairs file (needed by the sp2dpo presets).")] = None,
    config: Annotated[Path | None, typer.Option(
        metavar="schedule.yaml", help="Schedule YAML whose keys override the preset's.")] = None,
    beta: Annotated[float | None, typer.Option(
        metavar="B", help="Global β; overrides preset and config.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="plan.parquet",
        help="Plan file to write (.parquet); its report goes to <stem>_report/.")] = None,
    explain_ids: Annotated[list[str] | None, typer.Option(
        "--explain", metavar="PAIR_ID",
        help="Print how this pair's β, route and order were derived (repeatable).")] = None,
    report: Annotated[bool, typer.Option(help="Write the HTML report next to the plan.")] = True,
) -> None:
    """Decide per pair a β (SP²DPO), a route and a curriculum position (MixDPO), and write the plan."""
    from perpair import plan  # matplotlib and friends load only when planning

    if output is None and not explain_ids:
        raise InputError("give -o PLAN.parquet to write the plan, or --explain PAIR_ID to only explain")
    schedule = plan.resolve_schedule(preset, config, beta)
    with console.status("planning…"):
        result = plan.build_plan(pairs, annotations, schedule, preset=preset)
        page = None
        if output is not None:
            plan.write_plan(result, output)
            if report:
                page = plan.write_report(result.table, result.provenance, plan.report_dir(output))
    for pair_id in explain_ids or []:
        out.print(plan.explain(result, pair_id), markup=False, highlight=False)
    if output is not None:
        _print_summary(result)
        out.print(f"wrote plan to {output}")
        if page is not None:
            out.print(f"report: {page}")


def _print_summary(result: PlanResult) -> None:
    counts = result.provenance["counts"]
    schedule = result.schedule
    n = max(counts["pairs"], 1)
    table = Table(title=f"plan ({result.provenance['preset']})", show_header=False)
    table.add_row("pairs", f"{counts['pairs']:,}")
    for route, count in counts["routes"].items():
        table.add_row(f"route {route}", f"{count:,} ({100 * count / n:.1f}%)")
    table.add_row("annotated / unannotated", f"{counts['annotated']:,} / {counts['unannotated']:,}")
    mislabeled = counts["mislabeled"]
    table.add_row("mislabeled above threshold",
                  f"{mislabeled['above_threshold']:,} of {mislabeled['total']:,} "
                  f"(action {mislabeled['action']})")
    betas = result.table.column("beta").to_numpy(zero_copy_only=False).astype(np.float64)
    trained = betas[np.array(result.table.column("route").to_pylist()) == "preference"]
    if len(trained):
        table.add_row("β (preference route) min / geomean / max",
                      f"{trained.min():.4g} / {np.exp(np.mean(np.log(trained))):.4g} / {trained.max():.4g}")
    table.add_row("β schedule", f"{schedule.beta.kind}, global β {schedule.beta.beta:g}")
    table.add_row("margin / curriculum", f"{schedule.margin.source} / {schedule.curriculum.kind}")
    if counts["no_margin"]:
        table.add_row("pairs without a margin", f"{counts['no_margin']:,}")
    out.print(table)
