"""``perpair plan``: per-pair β, route and curriculum order, with a report."""

from __future__ import annotations

import math
import shlex
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from perpair.cli import app, console, given_path, out
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
        "--output", "-o", metavar="plan.parquet", parser=given_path("-o/--output"),
        help="Plan file to write (.parquet); its report goes to <stem>_report/. Optional with --explain.")] = None,
    explain_ids: Annotated[list[str] | None, typer.Option(
        "--explain", metavar="PAIR_ID",
        help="Print how this pair's β, route and order were derived (repeatable).")] = None,
    report: Annotated[bool, typer.Option(help="Write the HTML report next to the plan.")] = True,
    reference_logps: Annotated[Path | None, typer.Option(
        "--reference-logps", metavar="FILE|DIR",
        help="Reference log-probs for margin.source: reference: the cache perpair train writes (a file, or "
             "the folder $PERPAIR_CACHE/reference, or a run's WORKDIR/reference).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of a table.")] = False,
) -> None:
    """Decide per pair a β (SP²DPO), a route and a curriculum position (MixDPO), and write the plan."""
    from perpair import plan  # matplotlib and friends load only when planning
    from perpair.artifacts import check_output_file, check_output_folder, file_sha256, refuse_overwrite
    from perpair.plan.reference import read_reference_logps

    if output is None and not explain_ids:
        raise InputError("give -o PLAN.parquet to write the plan, or --explain PAIR_ID to only explain")
    if output is None and (unread := [o for o, given in (("--json", as_json), ("--no-report", not report)) if given]):
        # they shape the summary and the report of the plan -o writes: with --explain alone, neither is made
        raise InputError(f"{' and '.join(unread)} appl{'y' if len(unread) > 1 else 'ies'} to the plan -o writes, and "
                         "only --explain is asked for: drop it, or give -o")
    if output is not None:
        refuse_overwrite({"output": output}, {"pairs file": pairs, "annotations file": annotations,
                                              "schedule file": config, "reference log-probs": reference_logps})
        check_output_file(output, "-o/--output", "plan.parquet", kind=plan.KIND)
        if report:  # before planning: a report that cannot be written failed after the plan was written
            folder = plan.report_dir(output)
            if folder.exists() and not folder.is_dir():
                raise InputError(f"-o/--output {output}: its report goes to {folder}, which is a file; move it, "
                                 "name another -o, or give --no-report")
            check_output_folder(folder, "the report folder of -o/--output")
    # the options named as such (resolve_schedule's own words fit a library call or a run config as well)
    if preset not in plan.PRESETS:
        raise InputError(f"--preset {preset}: unknown preset; expected one of {', '.join(plan.PRESETS)}")
    if beta is not None and not (math.isfinite(beta) and beta > 0):
        raise InputError(f"--beta {beta}: must be a positive number")
    schedule = plan.resolve_schedule(preset, config, beta)
    logps = None
    if reference_logps is not None:
        if schedule.margin.source != "reference":
            raise InputError(f"--reference-logps is read only with margin.source: reference (this schedule's "
                             f"is {schedule.margin.source!r}); drop the option or set the margin source")
        logps, found, computed_by = read_reference_logps(reference_logps, file_sha256(pairs), str(pairs),
                                                         "--reference-logps")
        # (the cache's model, named: a folder holding one cache of these pairs gives it, whichever model computed it)
        console.print(f"reference log-probs: {escape(str(found))} ({escape(computed_by)})", soft_wrap=True)
    with warnings.catch_warnings(), console.status("planning…"):
        warnings.simplefilter("ignore")  # matplotlib's (fonts, layout) are not the user's to act on
        result = plan.build_plan(pairs, annotations, schedule, preset=preset, reference_logps=logps)
        if beta is not None and (idle := plan.idle_global_beta(result)):
            raise InputError(f"--beta {beta:g} would change nothing: {idle}; drop --beta, or set beta.normalise: "
                             "true to rescale them to it")
        known = set(result.trace.pair_ids.tolist())
        for pair_id in explain_ids or []:  # before writing: a mistyped id left a plan behind an exit 2
            if pair_id not in known:
                raise InputError(f"--explain {pair_id}: no pair of {pairs} has this id")
        page = None
        if output is not None:
            plan.write_plan(result, output)
            if report:
                page = plan.write_report(result.table, result.provenance, plan.report_dir(output), pairs_path=pairs,
                                         command=shlex.join(["perpair", *sys.argv[1:]]))
            else:  # the report of the plan this one replaces would describe that plan
                plan.remove_report(plan.report_dir(output))
    explained = {pair_id: plan.explain(result, pair_id) for pair_id in explain_ids or []}
    if not (as_json and output is not None):  # (with --json, in the JSON: stdout holds that alone)
        for text in explained.values():
            out.print(text, markup=False, highlight=False)
    for warning in result.provenance["warnings"]:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    if output is not None:
        if as_json:
            out.print_json(data={**_summary(result, output, page), **({"explain": explained} if explained else {})})
            return
        _print_summary(result)
        out.print(f"wrote plan to {escape(str(output))}")
        if page is not None:
            out.print(f"report: {escape(str(page))}")


def _preference_betas(result: PlanResult) -> dict[str, float] | None:
    """min, geometric mean and max of β over the preference route (None when no pair is on it)."""
    betas = result.table.column("beta").to_numpy(zero_copy_only=False).astype(np.float64)
    trained = betas[np.array(result.table.column("route").to_pylist()) == "preference"]
    if not len(trained):
        return None
    return {"min": float(trained.min()), "geomean": float(np.exp(np.mean(np.log(trained)))),
            "max": float(trained.max())}


def _summary(result: PlanResult, output: Path, page: Path | None) -> dict:
    return {"plan": str(output), "report": None if page is None else str(page), "preset": result.provenance["preset"],
            "counts": result.provenance["counts"], "beta_preference": _preference_betas(result),
            "warnings": result.provenance["warnings"]}


def _print_summary(result: PlanResult) -> None:
    from perpair.plan.report import mislabeled_action, percent

    counts = result.provenance["counts"]
    schedule = result.schedule
    n = max(counts["pairs"], 1)
    table = Table(title=f"plan ({result.provenance['preset']})", show_header=False)
    table.add_row("pairs", f"{counts['pairs']:,}")
    for route, count in counts["routes"].items():
        table.add_row(f"route {route}", f"{count:,} ({percent(count, n)})")
    table.add_row("annotated / unannotated", f"{counts['annotated']:,} / {counts['unannotated']:,}")
    mislabeled = counts["mislabeled"]
    table.add_row("mislabeled above threshold",
                  f"{mislabeled['above_threshold']:,} of {mislabeled['total']:,} ({mislabeled_action(counts)})")
    if (betas := _preference_betas(result)) is not None:
        table.add_row("β (preference route) min / geomean / max",
                      f"{betas['min']:.4g} / {betas['geomean']:.4g} / {betas['max']:.4g}")
    table.add_row("β schedule", f"{schedule.beta.kind}, global β {schedule.beta.beta:g}")
    table.add_row("margin / curriculum", f"{schedule.margin.source} / {schedule.curriculum.kind}")
    if counts["no_margin"]:
        table.add_row("pairs without a margin", f"{counts['no_margin']:,}")
    out.print(table)  # piped: at its natural width (see perpair.cli.PIPED_WIDTH)
