"""``perpair annotate PAIRS --teacher SPEC ... -o OUT`` and ``perpair annotate merge SHARD... -o OUT``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from perpair.annotate import annotate, load_config, merge
from perpair.annotate.runner import AnnotateResult, MergeResult
from perpair.annotate.runner import Progress as RunProgress
from perpair.cli import EXIT_TOO_FEW_ANNOTATED, app, console, given_path, out


class _DefaultRun(typer.core.TyperGroup):
    """``perpair annotate PAIRS ...`` means ``perpair annotate run PAIRS ...``; ``merge`` is the other command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


annotate_app = typer.Typer(cls=_DefaultRun, no_args_is_help=True, add_completion=False,
                           help="Label each pair's semantic gap with teacher LLMs (resumable). "
                                "`perpair annotate PAIRS ...` runs (its options: `perpair annotate run --help`); "
                                "`perpair annotate merge` joins shards.")
app.add_typer(annotate_app, name="annotate")


@annotate_app.command("run")
def run_command(
    pairs: Annotated[Path, typer.Argument(help="Pairs file written by perpair prepare.")],
    output: Annotated[Path, typer.Option("--output", "-o", parser=given_path("-o/--output"),
                                         help="Aggregated annotations file (.parquet); the per-call table goes "
                                              "beside it as NAME.calls.parquet.")],
    teacher: Annotated[list[str] | None, typer.Option(
        "--teacher", help="ratings | local:MODEL_DIR (or local:smollm2) | api:BASE_URL/MODEL; repeat for an "
                          "ensemble.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML file with teachers and settings.")] = None,
    cache: Annotated[Path | None, typer.Option(parser=given_path("--cache"),
                                               help="Answer cache (SQLite; default NAME.cache.sqlite).")] = None,
    concurrency: Annotated[int | None, typer.Option(
        help="Requests in flight per API teacher, 1-4096 (default 16).")] = None,
    limit: Annotated[int | None, typer.Option(help="Annotate only the first N pairs.")] = None,
    shard: Annotated[str | None, typer.Option(
        help="i/n, 0 <= i < n: this machine's share of the pairs, by pair id.")] = None,
    base_url: Annotated[list[str] | None, typer.Option(
        "--base-url", help="Another base URL for the API teachers to share the load with (repeatable).")] = None,
    template: Annotated[list[str] | None, typer.Option(
        "--template", help="Prompt template(s) of the API teachers (gap, gap-brief).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the per-pair response order (default 0).")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Ask again where the cache holds a "
                                               "final failure.")] = False,
    min_valid: Annotated[float | None, typer.Option(
        "--min-valid", metavar="SHARE", help="Exit 3 when fewer than this share of the pairs (0-1) got a valid "
                                             "annotation, or, in an ensemble, of one teacher's calls (default 0: "
                                             "only when none did); the files are written either way.")] = None,
    api_key_env: Annotated[str | None, typer.Option(
        "--api-key-env", metavar="VAR", help="Environment variable holding the API teachers' key (default: "
                                             "no key is sent).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every retry to stderr.")] = False,
) -> None:
    """Annotate pairs: category, magnitude, confidence and rationale per pair, from one or more teachers.

    Exit status: 0 done; 2 bad input or settings (nothing written); 3 fewer pairs than --min-valid (or none)
    got a valid annotation, or a teacher of an ensemble gave valid answers to fewer of its calls (or to none) (the
    files are written and every answer is cached).
    """
    settings = load_config(config, teachers=teacher, base_urls=base_url, templates=template, concurrency=concurrency,
                           api_key_env=api_key_env, limit=limit, shard=shard, seed=seed,
                           retry_failed=retry_failed or None, min_valid_share=min_valid)
    if teacher and config is not None:
        from perpair.config_files import load_yaml

        replaced = (load_yaml(config, "annotate config") or {}).get("teachers") or []
        if replaced:  # the command line wins, as everywhere; said, since a list is replaced, not merged
            console.print(f"note: --teacher replaces the {len(replaced)} teacher(s) of {escape(str(config))}",
                          soft_wrap=True)
    for spec in settings.teachers:
        if spec.kind == "api" and spec.api_key_env is None:
            console.print(f"note: teacher {escape(spec.id)} sends no API key (set api_key_env in a --config "
                          "file, or --api-key-env VAR, if its server needs one)", soft_wrap=True)
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpcore2").setLevel(logging.INFO)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
               TextColumn("{task.fields[extra]}"))
    # Off when stderr is not a terminal: rich would only print the last state, cut to 80 columns, and the
    # summary says all of it.
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task("annotating", total=None, rate="", extra="")
        start: dict[str, float] = {}

        def show(p: RunProgress) -> None:
            now = bar.get_time()
            fresh = p.done - p.cached
            start.setdefault("t", now)
            rate = fresh / (now - start["t"]) if now > start["t"] and fresh else 0.0
            extra = (f"{escape(p.phase)} · tokens {p.tokens:,} · cost {p.cost:.4f} · requests {p.requests:,} · "
                     f"retries {p.retries:,} · failed {p.failed:,}" + (f" · cached {p.cached:,}" if p.cached else ""))
            bar.update(task, total=p.total, completed=p.done, rate=f"{rate:.1f}/s", extra=extra)

        result = annotate(pairs, settings, output, cache_path=cache, on_progress=show)
    _print_result(result)
    _exit_if_short(result, "failed calls are cached; --retry-failed asks them again")


def _exit_if_short(result: AnnotateResult | MergeResult, retry: str) -> None:
    """Exit 3 with one error line when the annotations fall short of what was asked for (``result.shortfall``)."""
    if result.shortfall:
        # what a re-run can change: failed calls (--retry-failed), not a teacher's "cannot answer" (no ratings)
        kept = ["the files were written"]
        if result.status.get("failed"):
            kept.append(retry)
        if result.unanswered:
            reason, count = max(result.unanswered.items(), key=lambda item: item[1])
            kept.append(f"{count:,} calls got no annotation ({reason}), which asking again does not change")
        console.print(f"[bold red]error:[/] {escape(result.shortfall)}; {escape('; '.join(kept))}", soft_wrap=True)
        raise typer.Exit(EXIT_TOO_FEW_ANNOTATED)


def _print_result(result: AnnotateResult) -> None:
    status = ", ".join(f"{k} {v:,}" for k, v in sorted(result.status.items()))
    retried = f" ({result.retried:,} cached failures asked again)" if result.retried else ""
    out.print(f"{result.pairs:,} pairs, {result.calls:,} teacher calls ({status}); {result.cached:,} from the cache"
              f"{retried}; {result.annotated_pairs:,} pairs annotated")
    if result.prompt_tokens or result.completion_tokens:
        # (the answers' own usage, cached ones included: what the annotations cost, not what this run spent)
        out.print(f"tokens of the answers (cached included): {result.prompt_tokens:,} prompt + "
                  f"{result.completion_tokens:,} completion; cost {result.cost:.4f}; {result.requests:,} HTTP "
                  "requests this run")
    failed = result.status.get("failed", 0)
    for reason, count in sorted(result.failures.items(), key=lambda item: -item[1])[:10]:
        out.print(f"  failed × {count}: {escape(reason)}")
    for reason, count in sorted(result.unanswered.items(), key=lambda item: -item[1])[:10]:
        out.print(f"  no annotation × {count}: {escape(reason)}")
    if failed:
        out.print(f"{failed:,} calls failed and are cached as failures: re-run with --retry-failed to ask them "
                  "again (answers already cached are kept)")
    if result.unknown_pairs:
        out.print(f"{result.unknown_pairs:,} pairs have no per-aspect ratings (an overall score only): category "
                  "'unknown', magnitude from the score margin (a plan gives them beta.priors.unknown). For a "
                  "category per pair, annotate with a teacher LLM (--teacher local:MODEL or "
                  "--teacher api:BASE_URL/MODEL).")
    out.print(f"wrote {escape(str(result.output))} and {escape(str(result.calls_output))} in "
              f"{result.elapsed_s:.1f}s")
    fresh = result.calls - result.cached
    if fresh and result.elapsed_s > 0:
        # Pairs' worth of calls asked this run (cached ones excluded), over the whole run (model load included).
        out.print(f"throughput: {fresh * result.pairs / result.calls / result.elapsed_s:.2f} pairs/s "
                  f"({fresh:,} calls asked this run in {result.elapsed_s:.1f}s, start-up included)")


@annotate_app.command("merge")
def merge_command(
    shards: Annotated[list[Path], typer.Argument(help="Annotations files of --shard i/n runs.")],
    output: Annotated[Path, typer.Option("--output", "-o", parser=given_path("-o/--output"),
                                         help="Merged annotations file (.parquet).")],
    min_valid: Annotated[float, typer.Option(
        "--min-valid", metavar="SHARE", help="Exit 3 when fewer than this share of the merged pairs (0-1) got a "
                                             "valid annotation, or, in an ensemble, of one teacher's calls, as a "
                                             "run's --min-valid (default 0: only when none did); the files are "
                                             "written either way.")] = 0.0,
) -> None:
    """Join the outputs of `perpair annotate --shard i/n` runs into one annotations file.

    Exit status: as a run of all the shards' pairs with --min-valid SHARE would have (3: too few pairs, or a teacher of
    an ensemble too few calls, got a valid annotation; the merged files are written).
    """
    result = merge(shards, output, min_valid_share=min_valid)
    status = ", ".join(f"{k} {v:,}" for k, v in sorted(result.status.items()))
    out.print(f"merged {result.shards} shards: {result.pairs:,} pairs, {result.calls:,} teacher calls"
              f"{f' ({status})' if status else ''}; {result.annotated_pairs:,} pairs annotated -> "
              f"{escape(str(result.output))}")
    for teacher, (valid, calls) in result.teacher_calls.items():
        out.print(f"  teacher {escape(teacher)}: {valid:,} of {calls:,} calls valid")
    _exit_if_short(result, "failed calls are cached in the shards' caches; --retry-failed on those shards asks them "
                           "again, then merge again")
