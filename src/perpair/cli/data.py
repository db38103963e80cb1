"""``perpair prepare`` and ``perpair inspect``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from perpair.cli import app, console, given_path, out
from perpair.data import PrepareOptions, prepare
from perpair.data.inspect import summarize
from perpair.data.prepare import PrepareResult
from perpair.errors import PerpairError

ROWS_SHOWN = 20


@app.command("prepare")
def prepare_command(
    output: Annotated[Path, typer.Option("--output", "-o", parser=given_path("-o/--output"),
                                         help="Pairs file to write (.parquet).")],
    sources: Annotated[list[str] | None, typer.Argument(
        help="Files (JSONL, JSONL.gz, JSON, Parquet), local dataset folders or Hub dataset ids (owner/name).",
        show_default=False)] = None,
    format: Annotated[str | None, typer.Option(
        help="Source layout: ultrafeedback, ultrafeedback-raw, hh-rlhf, openai, sharegpt, alpaca, trl, columns. "
             "Detected from the first row when not given.")] = None,
    split: Annotated[str | None, typer.Option(help="Split of a dataset source (default: train).")] = None,
    revision: Annotated[str | None, typer.Option(help="Revision of a Hub dataset source.")] = None,
    prompt_col: Annotated[str | None, typer.Option(help="Prompt column (dotted for nested fields).")] = None,
    chosen_col: Annotated[str | None, typer.Option(help="Chosen-response column.")] = None,
    rejected_col: Annotated[str | None, typer.Option(help="Rejected-response column.")] = None,
    score_chosen_col: Annotated[str | None, typer.Option(help="Score of the chosen response.")] = None,
    score_rejected_col: Annotated[str | None, typer.Option(help="Score of the rejected response.")] = None,
    system_col: Annotated[str | None, typer.Option(
        help="System-message column (default: a 'system' column, where the data has one).")] = None,
    limit: Annotated[int | None, typer.Option(help="Keep at most this many pairs.")] = None,
    test_fraction: Annotated[float, typer.Option(
        help="Share of pairs written to OUTPUT's .test.parquet sibling (split by pair id).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the test split and raw UltraFeedback binarization.")] = 0,
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid", help="Skip malformed rows and count them instead of stopping.")] = False,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Stop at the first degenerate pair instead of excluding it.")] = False,
    keep_template_markup: Annotated[bool, typer.Option(
        "--keep-template-markup", help="Keep text already rendered with a chat template (<|im_start|>, [INST], …) "
        "and count it, for a plan used inside TRL, which tokenizes such text as it is; perpair train refuses "
        "it.")] = False,
    role_map: Annotated[str | None, typer.Option(
        help="Map source role names to system/user/assistant/tool, e.g. human=user,gpt=assistant.")] = None,
    dataset_info: Annotated[str | None, typer.Option(
        help="LLaMA-Factory dataset_info.json; read the ranking dataset named by --dataset from it.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name in --dataset-info.")] = None,
) -> None:
    """Read preference data in any supported layout and write canonical pairs."""
    values = dict(format=format, split=split, revision=revision, prompt_col=prompt_col, chosen_col=chosen_col,
                  rejected_col=rejected_col, score_chosen_col=score_chosen_col,
                  score_rejected_col=score_rejected_col, system_col=system_col, limit=limit,
                  test_fraction=test_fraction, seed=seed, skip_invalid=skip_invalid, strict=strict,
                  keep_template_markup=keep_template_markup, role_map=role_map, dataset_info=dataset_info,
                  dataset=dataset)
    try:
        options = PrepareOptions(**values)
    except ValidationError as exc:
        raise PerpairError("invalid options: " + option_errors(exc)) from None
    start = time.perf_counter()
    with console.status("reading…") as status:
        result = prepare(sources or [], output, options, on_progress=lambda n: status.update(
            f"reading… {n:,} rows ({n / (time.perf_counter() - start):,.0f} rows/s)"))
    print_prepare(result)


def option_errors(exc: ValidationError) -> str:
    """Pydantic's messages, each with the option it is about (``--test-fraction: ...``)."""
    parts = []
    for error in exc.errors():
        names = [str(part) for part in error["loc"] if not str(part).isdigit()]
        option = "--" + names[0].replace("_", "-") if names else ""
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{option}: {message}" if option else message)
    return "; ".join(parts)


_NAMED_OPTIONS = "--score-chosen-col/--score-rejected-col, --system-col, --prompt-col"


def print_prepare(result: PrepareResult, *, converted_by: str | None = None) -> None:
    """What ``perpair prepare`` read, kept, excluded and left unread; or another command (``converted_by``) that
    converted its data with prepare's defaults, whose fields under other names need ``perpair prepare`` first."""
    # Names, reasons and paths come from the user's data: escaped, so rich reads no markup in them.
    for report in result.sources:
        name = report.source.get("path") or report.source.get("dataset")
        if report.limited and not report.rows_read:
            out.print(f"[bold]{escape(str(name))}[/]: not read (--limit reached before it)")
            continue
        limited = " (--limit reached)" if report.limited else ""
        out.print(f"[bold]{escape(str(name))}[/] ({escape(str(report.format))}): {report.rows_read:,} rows read, "
                  f"{report.pairs_kept:,} pairs kept{limited}")
        for label, tally in (("malformed, skipped", report.invalid), ("degenerate, excluded", report.degenerate),
                             ("duplicate, collapsed", report.duplicates),
                             ("kept, note", report.notes)):
            for reason in sorted(tally.counts):
                rows = tally.rows[reason]
                shown = ", ".join(map(str, rows[:ROWS_SHOWN])) + (" …" if tally.counts[reason] > ROWS_SHOWN else "")
                out.print(f"  {label}: {escape(reason)} × {tally.counts[reason]} (rows {shown})")
        if "chat_template_markup" in report.notes.counts:
            out.print("  (chat_template_markup: text rendered with a chat template already, kept as "
                      "--keep-template-markup asks: TRL's standard format tokenizes it as it is; perpair train "
                      "refuses these pairs)")
        if unread := report.unread_line():
            how = _NAMED_OPTIONS if converted_by is None else \
                f"perpair prepare with {_NAMED_OPTIONS}, then {converted_by} on its pairs file"
            out.print(f"  fields not read: {escape(unread)} (in each pair's meta only; scores, a system message or "
                      f"a prompt under other names: {how})")
    for name, path in result.outputs.items():
        out.print(f"wrote {result.counts[name]:,} {name} pairs to {escape(str(path))}")


@app.command("inspect")
def inspect_command(
    file: Annotated[Path, typer.Argument(help="A pairs file written by perpair prepare.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Summarise a pairs file: counts, sources, lengths, score margins, ties."""
    summary = summarize(str(file))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    out.print(f"[bold]{escape(str(summary['file']))}[/]: {summary['pairs']:,} pairs"
              + (f" (split: {escape(str(summary['split']))})" if summary["split"] else ""))
    out.print("sources: " + ", ".join(f"{escape(str(k))} ({v:,})" for k, v in summary["sources"].items()))
    out.print("user turns in prompt: " + ", ".join(f"{k}: {v:,}" for k, v in summary["prompt_user_turns"].items())
              + f"; with a system message: {summary['with_system_message']:,}")
    lengths = Table(title="length in characters", title_justify="left")
    lengths.add_column("part")
    stats = ("p5", "p25", "p50", "p75", "p95", "mean", "max")
    for stat in stats:
        lengths.add_column(stat, justify="right")
    for part, values in summary["length_chars"].items():
        lengths.add_row(part, *(f"{values[s]:,.0f}" if values else "-" for s in stats))
    out.print(lengths)
    if summary["scored_pairs"]:
        out.print(f"scored pairs: {summary['scored_pairs']:,}; ties (margin 0): {summary['ties']:,}; "
                  f"negative margins: {summary['negative_margins']:,}")
        histogram = Table(title="score margin (chosen − rejected)", title_justify="left")
        histogram.add_column("margin", justify="right")
        histogram.add_column("pairs", justify="right")
        histogram.add_column("")
        peak = max(count for _, count in summary["margin_histogram"])
        for label, count in summary["margin_histogram"]:
            histogram.add_row(label, f"{count:,}", "█" * max(1, round(30 * count / peak)) if count else "")
        out.print(histogram)
    else:
        out.print("no scores in this file")
    for source, kinds in summary["excluded"].items():
        parts = [f"{kind}: " + ", ".join(f"{r} × {c}" for r, c in reasons.items())
                 for kind, reasons in kinds.items() if reasons]
        if parts:
            # counted as prepare read the source, before any test split: the same counts in both split files
            out.print(f"excluded at prepare from {escape(str(source))} (before any test split): "
                      + escape("; ".join(parts)))
