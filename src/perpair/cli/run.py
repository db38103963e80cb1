"""``perpair run CONFIG.yaml``: the whole job, stage by stage, skipping what is already done."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from perpair.cli import app, console, out


@app.command("run")
def run_command(
    config: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="Run config: data, annotate, train, "
                                           "arms, eval (see configs/demo.yaml).")],
    from_stage: Annotated[str | None, typer.Option(
        "--from", metavar="STAGE", help="Re-run this stage and every later one: prepare, annotate, plan, train, "
                                        "eval.")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="Any config key, dotted for nested ones (repeatable), e.g. "
                                           "data.limit=200 or arms.dpo.train.lr=1e-6.")] = None,
) -> None:
    """prepare → annotate → plan → train → evaluate, for every arm; prints the comparison table."""
    from perpair.pipeline import load_run_config, markdown_table, run
    from perpair.train import parse_overrides

    settings = load_run_config(config, parse_overrides(overrides or []))
    result = run(settings, from_stage=from_stage, log=lambda line: console.print(line, markup=False,
                                                                                    highlight=False))
    out.print(markdown_table(result.rows), markup=False, highlight=False)
    for note in result.notes:
        out.print(note, markup=False, highlight=False)
    out.print(f"stages run: {len(result.ran)}, skipped (unchanged): {len(result.skipped)}")
    out.print(f"report: {result.report}")
