"""``perpair bench``: benchmarks that test the seeds' claims (``controlled``: a generated task with known truth)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from perpair.cli import app, console, out
from perpair.config_files import format_validation_error
from perpair.errors import PerpairError

bench_app = typer.Typer(help="Benchmarks of the per-pair methods on tasks whose truth is known.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("controlled")
def controlled_command(
    seeds: Annotated[int, typer.Option(help="Independent seeds (intervals are over seeds).")] = 3,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("bench_controlled"),
    quick: Annotated[bool, typer.Option(
        "--quick", help="A tiny run (seconds) for smoke tests; its numbers mean little.")] = False,
    noise: Annotated[list[float] | None, typer.Option(
        help="Flip rate on objective pairs (repeatable; default 0, 0.2, 0.4).")] = None,
    pairs: Annotated[int | None, typer.Option(help="Preference pairs per seed (default 2000).")] = None,
    teacher_accuracy: Annotated[float | None, typer.Option(help="Simulated teacher's accuracy (default 0.8).")] = None,
    teacher_calibration: Annotated[str | None, typer.Option(
        help="calibrated or overconfident (default calibrated).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default 1).")] = None,
) -> None:
    """Global-β DPO (swept), SP²DPO, random β, MixDPO (curriculum, routing, both) and SP²DPO+MixDPO on a generated
    preference task; writes results.json, table.md and PNG plots, and prints the table."""
    from perpair.bench import ControlledConfig, run_controlled
    from perpair.bench.controlled import QUICK

    values: dict = {**(QUICK if quick else {}), "seeds": seeds}
    for key, value in (("noise_levels", tuple(noise) if noise else None), ("pairs", pairs),
                       ("teacher_accuracy", teacher_accuracy), ("teacher_calibration", teacher_calibration),
                       ("threads", threads)):
        if value is not None:
            values[key] = value
    try:
        config = ControlledConfig(**values)
    except ValidationError as exc:
        raise PerpairError(f"invalid options: {format_validation_error(exc)}") from None
    result = run_controlled(config, out_dir, progress=lambda line: console.print(line, highlight=False))
    out.print(Path(result["files"]["table"]).read_text(encoding="utf-8"))
    out.print(f"wall time {result['seconds']:.0f} s, CPU time {result['cpu_seconds']:.0f} s (this process)")
    for name, path in result["files"].items():
        out.print(f"{name}: {path}")
