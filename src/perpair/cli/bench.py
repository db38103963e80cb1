"""``perpair bench``: benchmarks that test the seeds' claims (``controlled``: a generated task with known truth)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from perpair.cli import app, console, given_path, out
from perpair.config_files import format_validation_error
from perpair.errors import PerpairError

bench_app = typer.Typer(help="Benchmarks of the per-pair methods on tasks whose truth is known.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("controlled")
def controlled_command(
    seeds: Annotated[int, typer.Option(help="Independent seeds (intervals are over seeds).")] = 3,
    out_dir: Annotated[Path, typer.Option("--out", "-o", parser=given_path("-o/--out"),
                                          help="Output folder.")] = Path("bench_controlled"),
    quick: Annotated[bool, typer.Option(
        "--quick", help="A tiny run (seconds) for smoke tests; its numbers mean little.")] = False,
    noise: Annotated[list[float] | None, typer.Option(
        help="Flip rate on objective pairs (repeatable; default 0, 0.2, 0.4).")] = None,
    pairs: Annotated[int | None, typer.Option(help="Preference pairs per seed (default 2000).")] = None,
    teacher_accuracy: Annotated[float | None, typer.Option(help="Simulated teacher's accuracy (default 0.8).")] = None,
    teacher_calibration: Annotated[str | None, typer.Option(
        help="calibrated or overconfident (default calibrated).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default 1).")] = None,
    sweep: Annotated[str | None, typer.Option(
        help="Run one follow-up sweep instead of the main table: teacher-accuracy, systematic-noise, mislabel "
        "or tuning (adds its section to results.json and table.md).")] = None,
) -> None:
    """Global-β DPO (swept), SP²DPO, random β, MixDPO (curriculum, routing, both) and SP²DPO+MixDPO on a generated
    preference task; writes results.json, table.md and PNG plots, and prints the table."""
    from perpair.bench import ControlledConfig, run_controlled
    from perpair.bench.controlled import QUICK
    from perpair.bench.report import table_markdown
    from perpair.bench.sweeps import SWEEP_NOISE, SWEEPS, run_sweep

    if sweep is not None and sweep not in SWEEPS:
        raise PerpairError(f"--sweep {sweep!r} is not a sweep; expected one of {', '.join(SWEEPS)}")
    if sweep == "systematic-noise" and noise:
        raise PerpairError("--noise does not apply to --sweep systematic-noise: it sets its own noise "
                           "(carry additions, one category at 0.5, independent flips of the same count)")
    if sweep == "teacher-accuracy" and (teacher_accuracy is not None or teacher_calibration is not None):
        raise PerpairError("--teacher-accuracy / --teacher-calibration do not apply to --sweep teacher-accuracy: "
                           "it runs every teacher (0.6, 0.8, 0.95 × calibrated, overconfident, and an oracle)")
    values: dict = {**(QUICK if quick else {}), "seeds": seeds}
    if sweep in SWEEP_NOISE:
        values["noise_levels"] = SWEEP_NOISE[sweep]
    for key, value in (("noise_levels", tuple(noise) if noise else None), ("pairs", pairs),
                       ("teacher_accuracy", teacher_accuracy), ("teacher_calibration", teacher_calibration),
                       ("threads", threads)):
        if value is not None:
            values[key] = value
    try:
        config = ControlledConfig(**values)
    except ValidationError as exc:
        raise PerpairError(f"invalid options: {format_validation_error(exc, options={'noise_levels': '--noise'})}") \
            from None
    progress = lambda line: console.print(line, highlight=False)  # noqa: E731
    if sweep is not None:
        section = run_sweep(config, sweep, out_dir, progress=progress)
        from perpair.bench.sweep_report import sweep_markdown

        out.print(sweep_markdown(sweep, section))
        out.print(f"wall time {section['seconds']:.0f} s, CPU time {section['cpu_seconds']:.0f} s (this process)")
        for name, path in section["files"].items():
            out.print(f"{name}: {path}")
        return
    result = run_controlled(config, out_dir, progress=progress)
    out.print(table_markdown(result))
    out.print(f"wall time {result['seconds']:.0f} s, CPU time {result['cpu_seconds']:.0f} s (this process)")
    for name, path in result["files"].items():
        out.print(f"{name}: {path}")
