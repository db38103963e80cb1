"""``perpair eval``: AlpacaEval 2.0 (raw and length-controlled win rate), Arena-Hard-Auto v0.1, preference
accuracy, and the results report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from perpair.artifacts import check_output_file, check_output_folder
from perpair.cli import app, console, given_path, out
from perpair.config_files import format_validation_error
from perpair.errors import PerpairError

eval_app = typer.Typer(help="Evaluate models: AlpacaEval 2.0, Arena-Hard-Auto, preference accuracy, report.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")

arena_app = typer.Typer(help="Arena-Hard-Auto v0.1: run (answer, judge, score) or score existing judgments.",
                        no_args_is_help=True)
eval_app.add_typer(arena_app, name="arena-hard")

BASELINE_ARENA = "gpt-4-0314"
OFFLINE_HELP = ("The benchmark's files from the paths given or --data-dir, never from the Hub (default: online "
                "unless HF_HUB_OFFLINE=1, which keeps a Hub-id model or judge off the Hub too).")
ALPACA_NOTES = ("judgment_note", "lc_note", "lc_judge_note")  # what an AlpacaEval row's figures do not say, in order
ALPACA_DATA_ENV = "PERPAIR_ALPACA_EVAL_DATA"
ARENA_DATA_ENV = "PERPAIR_ARENA_HARD_DATA"


# the config fields whose option is not --FIELD (field_name → --field-name)
OPTION_NAMES = {"model_name": "--judge-name", "api_key_env": "--judge-api-key-env",
                "concurrency": "--judge-concurrency", "batch_size": "--judge-batch-size",
                "prefix_cache": "--judge-prefix-cache", "output_dir": "-o/--output", "fit": "--no-fit"}


def _options(cls, **kwargs):
    """The options validated as ``cls``; a refused value is named by its option (``--limit``), not its field."""
    from perpair.eval.alpaca_eval import JudgeConfig

    names = OPTION_NAMES if cls is JudgeConfig else {k: v for k, v in OPTION_NAMES.items()
                                                      if k in ("output_dir", "fit")}
    try:
        return cls(**kwargs)
    except ValidationError as exc:
        raise PerpairError(f"invalid options: {format_validation_error(exc, options=names)}") from None


def _judge_config(cls, *, concurrency: int | None, **options):
    """The judge's settings; an API judge's options given to a local judge, and a local judge's given to an API
    judge, are refused: it would ignore them (the rule: ``JudgeConfig.settings_problem``)."""
    config = _options(cls, **options, **({} if concurrency is None else {"concurrency": concurrency}))
    problem = cls.settings_problem(config.judge, {**options, "concurrency": concurrency},
                                   {**OPTION_NAMES, "judge": "--judge"}, "option")
    if problem:
        raise PerpairError(problem)
    return config


def _default_output(model: str, benchmark: str, subfolder: str | None = None) -> Path:
    """The output folder when -o is not given: ``eval/LABEL`` (and ``subfolder``), named after the model's folder, so
    another model of that name may have written it: its results of ``benchmark`` are refused, not replaced."""
    from perpair.eval import default_output_dir
    from perpair.eval.sources import check_results_owner, model_identity

    output = default_output_dir(model)
    if subfolder:
        output = output / subfolder
    check_results_owner(output / "results.json", benchmark, "the default output", model_identity(model))
    return output


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else f"{value:,}"


@eval_app.command("score")
def score_command(
    files: Annotated[list[Path], typer.Argument(help="AlpacaEval annotations files (.json or .json.gz).")],
    name: Annotated[str | None, typer.Option(
        help="The model's name on the leaderboard (default: the file's generator_2); one file only.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per file (leaderboard keys).")] = False,
    data_dir: Annotated[Path | None, typer.Option(
        envvar=ALPACA_DATA_ENV, help="Folder laid out as ../shared/data/alpaca_eval: the offline instruction "
                                     "difficulties (offline, this or --difficulty is required), published GLM "
                                     "weights and leaderboard by their names, and the reference outputs the rows "
                                     "are checked against (offline, without them: no LC).")] = None,
    difficulty: Annotated[Path | None, typer.Option(
        help="Instruction difficulties CSV (default: the Hub's online, DATA_DIR's reconstructed copy offline; "
             "given, the LC fit is an approximation).")] = None,
    glm_weights: Annotated[Path | None, typer.Option(
        help="Published LC GLM weights CSV (default: DATA_DIR's glm_weights_length_controlled_v1.csv).")] = None,
    leaderboard: Annotated[Path | None, typer.Option(
        help="Published leaderboard CSV: a file gets its model's published weights only when it matches that "
             "model's row (default: DATA_DIR's leaderboard_weighted_alpaca_eval_gpt4_turbo.csv).")] = None,
    offline: Annotated[bool | None, typer.Option("--offline/--online", help=OFFLINE_HELP)] = None,
    no_fit: Annotated[bool, typer.Option("--no-fit", help="Skip the GLM fit; published weights only.")] = False,
) -> None:
    """Raw and length-controlled win rates of AlpacaEval annotations, as the official leaderboard computes them."""
    from perpair.eval import ScoreOptions, json_ready, score_files

    options = _options(ScoreOptions, offline=offline, data_dir=data_dir, difficulty=difficulty,
                       glm_weights=glm_weights, leaderboard=leaderboard, fit=not no_fit)
    rows = score_files(files, options, name=name)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(json_ready({k: v for k, v in row.items() if k != "glm_preference"}),
                                  ensure_ascii=False))
        return
    table = Table(title="AlpacaEval 2.0", title_justify="left")
    for column in ("model", "LC win rate", "LC s.e.", "LC from", "win rate", "s.e.", "wins", "draws", "n",
                   "discrete", "avg length"):
        table.add_column(column, justify="left" if column in ("model", "LC from") else "right")
    for row in rows:
        table.add_row(escape(row["name"]), _fmt(row["length_controlled_winrate"]), _fmt(row["lc_standard_error"]),
                      row["lc_method"] or "-", _fmt(row["win_rate"]), _fmt(row["standard_error"]),
                      _fmt(row["n_wins"]), _fmt(row["n_draws"]), _fmt(row["n_total"]),
                      _fmt(row["discrete_win_rate"]), _fmt(row["avg_length"]))
    out.print(table)
    for row in rows:
        for note in filter(None, (row[key] for key in ALPACA_NOTES)):
            out.print(f"[yellow]{escape(row['name'])}[/]: {escape(note)}")
        if row["lc_method"] == "published_weights" and row["lc_fit"]:
            fit = row["lc_fit"]
            out.print(f"{escape(row['name'])}: offline refit gives LC {fit['length_controlled_winrate']:.2f} "
                      f"(± {fit['lc_standard_error']:.2f}); {escape(fit.get('note', ''))}")


def _progress():
    """A console status line fed by (stage, done, total) callbacks."""
    status = console.status("starting…")

    def update(stage: str, done: int, total: int) -> None:
        status.update(f"{stage}… {done:,}/{total:,}")

    return status, update


def _print_alpaca_row(row: dict) -> None:
    out.print(f"[bold]{escape(row['name'])}[/] vs {escape(row.get('reference', 'baseline'))}: "
              f"LC win rate {_fmt(row['length_controlled_winrate'])} (± {_fmt(row['lc_standard_error'])}, "
              f"{row['lc_method'] or 'no LC'}), win rate {_fmt(row['win_rate'])} (± {_fmt(row['standard_error'])}), "
              f"n = {row['n_total']}, avg length {row['avg_length']:,}")
    for note in filter(None, (row.get(key) for key in ALPACA_NOTES)):
        out.print(f"[yellow]note[/]: {escape(note)}")
    out.print(f"generated {row['n_generated']:,}, judged {row['n_judged']:,} (the rest from the cache); "
              f"files in {escape(row['output_dir'])}")


@eval_app.command("alpaca-eval")
def alpaca_eval_command(
    model: Annotated[str, typer.Option(help="Evaluated model: checkpoint folder, Hub id or smollm2.")],
    judge: Annotated[str, typer.Option(
        help="Judge: a local model (folder, Hub id, smollm2) or the /v1 URL of an OpenAI-compatible server.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", parser=given_path("-o/--output"),
                                                help="Output folder (default: eval/LABEL, LABEL the model's "
                                                     "folder name, or RUN for perpair train's RUN/model).")] = None,
    judge_name: Annotated[str | None, typer.Option(help="Model name sent to an API judge.")] = None,
    judge_api_key_env: Annotated[str | None, typer.Option(help="Env variable with the API judge's key.")] = None,
    judge_concurrency: Annotated[int | None, typer.Option(help="API judge requests in flight (default 8).")] = None,
    judge_batch_size: Annotated[int | None, typer.Option(
        help="Prompts per forward pass of a local judge (default: 1 on a CPU, 8 on an accelerator).")] = None,
    judge_prefix_cache: Annotated[Path | None, typer.Option(
        help="Folder where a local judge keeps the key/value caches of the prompts' beginnings that do not depend "
             "on the evaluated model; give every model of a comparison the same folder and they are computed once "
             "(one prompt per pass: a judge batch size of 1).")] = None,
    name: Annotated[str | None, typer.Option(
        help="Generator name written in the files (default: the model's folder name, or RUN for the model perpair "
             "train saved in RUN/model).")] = None,
    reference: Annotated[Path | None, typer.Option(
        help="Baseline outputs (default: the Hub's online, DATA_DIR's copy offline).")] = None,
    judge_prompt: Annotated[Path | None, typer.Option(
        help="alpaca_eval_clf.txt judge prompt (default: DATA_DIR's copy, else the installed alpaca_eval's).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N instructions (quick runs).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length cap in tokens.")] = 2048,
    batch_size: Annotated[int, typer.Option(help="Generation batch size.")] = 8,
    backend: Annotated[str, typer.Option(help="auto, transformers or vllm.")] = "auto",
    difficulty: Annotated[Path | None, typer.Option(help="Offline instruction difficulties CSV.")] = None,
    glm_weights: Annotated[Path | None, typer.Option(help="Published LC GLM weights CSV.")] = None,
    data_dir: Annotated[Path | None, typer.Option(
        envvar=ALPACA_DATA_ENV, help="Folder laid out as ../shared/data/alpaca_eval (offline copies of the "
                                     "reference, judge prompt, difficulties, GLM weights and leaderboard).")] = None,
    offline: Annotated[bool | None, typer.Option("--offline/--online", help=OFFLINE_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results row as JSON.")] = False,
) -> None:
    """AlpacaEval 2.0: generate, judge with the official weighted protocol, score (raw and LC win rate)."""
    from perpair.eval import (
        AlpacaEvalConfig,
        GenerationConfig,
        JudgeConfig,
        json_ready,
        run_alpaca_eval,
    )

    judge_config = _judge_config(JudgeConfig, judge=judge, model_name=judge_name, api_key_env=judge_api_key_env,
                                 concurrency=judge_concurrency, batch_size=judge_batch_size,
                                 prefix_cache=judge_prefix_cache)
    if judge_prefix_cache is not None:  # used (an API judge refused it above): never ignored
        if (judge_batch_size or 1) != 1:
            raise PerpairError(f"--judge-prefix-cache runs the judge one prompt per pass; --judge-batch-size is "
                               f"{judge_batch_size}")
        judge_config.batch_size = 1
        try:  # before any work: a path that cannot be a folder is refused now, not after the answers are generated
            judge_prefix_cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PerpairError(f"--judge-prefix-cache {judge_prefix_cache}: not a folder that can be created "
                               f"({exc.strerror})") from None
    output = output or _default_output(model, "alpaca_eval_2")
    check_output_folder(output, "-o/--output")
    config = _options(
        AlpacaEvalConfig, model=model, name=name, output_dir=output, judge=judge_config,
        generation=_options(GenerationConfig, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            backend=backend),
        reference=reference, judge_prompt=judge_prompt, limit=limit, offline=offline, difficulty=difficulty,
        glm_weights=glm_weights, data_dir=data_dir)
    status, update = _progress()
    with status:
        row = run_alpaca_eval(config, on_progress=update)
    if as_json:
        typer.echo(json.dumps(json_ready(row), ensure_ascii=False))
    else:
        _print_alpaca_row(row)


@arena_app.command("run")
def arena_hard_command(
    model: Annotated[str, typer.Option(help="Evaluated model: checkpoint folder, Hub id or smollm2.")],
    judge: Annotated[str, typer.Option(help="Judge: a local model or the /v1 URL of an OpenAI-compatible server.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", parser=given_path("-o/--output"),
                                                help="Output folder (default: eval/LABEL/arena_hard, LABEL the "
                                                     "model's folder name, or RUN for perpair train's "
                                                     "RUN/model).")] = None,
    judge_name: Annotated[str | None, typer.Option(help="Model name sent to an API judge.")] = None,
    judge_api_key_env: Annotated[str | None, typer.Option(help="Env variable with the API judge's key.")] = None,
    judge_concurrency: Annotated[int | None, typer.Option(help="API judge requests in flight (default 8).")] = None,
    judge_batch_size: Annotated[int | None, typer.Option(help="A local judge's prompts per batch (default 4).")] = None,
    judge_max_tokens: Annotated[int, typer.Option(help="Judgment length cap in tokens.")] = 4096,
    questions: Annotated[Path | None, typer.Option(help="Arena-Hard v0.1 question.jsonl(.gz).")] = None,
    baseline_answers: Annotated[Path | None, typer.Option(help="gpt-4-0314 answers (.jsonl(.gz)).")] = None,
    name: Annotated[str | None, typer.Option(
        help="Model name written in the files (default: the model's folder name, or RUN for the model perpair train "
             "saved in RUN/model).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N questions.")] = None,
    max_new_tokens: Annotated[int, typer.Option(
        help="Answer length cap in tokens (arena-hard-auto v0.1 generates up to 4,096).")] = 4096,
    batch_size: Annotated[int, typer.Option(help="Generation batch size.")] = 8,
    style_control: Annotated[bool, typer.Option("--style-control", help="Control for length and markdown.")] = False,
    data_dir: Annotated[Path | None, typer.Option(
        envvar=ARENA_DATA_ENV, help="Folder laid out as ../shared/data/arena_hard (offline copies of the "
                                    "questions and baseline answers).")] = None,
    offline: Annotated[bool | None, typer.Option("--offline/--online", help=OFFLINE_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results row as JSON.")] = False,
) -> None:
    """Arena-Hard-Auto v0.1: answer, judge two games per question, Bradley-Terry score with a 95% interval."""
    from perpair.eval import ArenaHardConfig, GenerationConfig, JudgeConfig, run_arena_hard

    output = output or _default_output(model, "arena_hard_v0.1", "arena_hard")
    judge_config = _judge_config(JudgeConfig, judge=judge, model_name=judge_name, api_key_env=judge_api_key_env,
                                 concurrency=judge_concurrency, batch_size=judge_batch_size)
    check_output_folder(output, "-o/--output")
    config = _options(
        ArenaHardConfig, model=model, name=name, output_dir=output, judge=judge_config,
        generation=_options(GenerationConfig, max_new_tokens=max_new_tokens, batch_size=batch_size),
        questions=questions, baseline_answers=baseline_answers, limit=limit, judge_max_tokens=judge_max_tokens,
        style_control=style_control, offline=offline, data_dir=data_dir)
    status, update = _progress()
    with status:
        row = run_arena_hard(config, on_progress=update)
    if as_json:
        typer.echo(json.dumps(row, ensure_ascii=False))
        return
    _print_arena_row(row)
    out.print(f"generated {row['n_generated']:,}, judged {row['n_judged']:,}; files in {escape(row['output_dir'])}")


def _print_arena_row(row: dict) -> None:
    out.print(f"[bold]{escape(row['name'])}[/] vs {BASELINE_ARENA}: score {_fmt(row['score'], 1)} "
              f"(95% CI {_fmt(row['rating_q025'], 1)} to {_fmt(row['rating_q975'], 1)}), {row['n_games']} games, "
              f"{row['n_no_verdict']} without verdict{', style-controlled' if row['style_control'] else ''}")
    if row["note"]:
        out.print(f"[yellow]note[/]: {escape(row['note'])}")


@arena_app.command("score")
def arena_score_command(
    files: Annotated[list[Path], typer.Argument(
        help="Judgment files in arena-hard-auto v0.1's layout: model_judgment/JUDGE/MODEL.jsonl.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per file.")] = False,
) -> None:
    """Score existing Arena-Hard-Auto v0.1 judgments as show_result.py does (score vs gpt-4-0314, 95% bootstrap
    interval); nothing is generated or judged."""
    from perpair.eval import score_judgment_file

    rows = [score_judgment_file(file) for file in files]  # every file read and checked before any is printed
    for row in rows:
        if as_json:
            typer.echo(json.dumps(row, ensure_ascii=False))
        else:
            _print_arena_row(row)


@eval_app.command("preference")
def preference_command(
    model: Annotated[str, typer.Option(help="Trained policy: checkpoint folder, Hub id or smollm2.")],
    ref: Annotated[str, typer.Option(help="Reference model (the policy's starting point).")],
    data: Annotated[Path, typer.Option(help="Held-out pairs artifact (e.g. the test split of perpair prepare).")],
    annotations: Annotated[Path | None, typer.Option(help="Annotations artifact: accuracy by category.")] = None,
    beta: Annotated[float, typer.Option(help="β of the implicit reward (scales margins; accuracy unchanged).")] = 0.1,
    max_length: Annotated[int, typer.Option(help="Prompt + response truncation in tokens, as in training.")] = 1024,
    limit: Annotated[int | None, typer.Option(help="Only the first N pairs.")] = None,
    tokens_per_forward: Annotated[int, typer.Option(
        help="Pack pairs up to this many tokens per forward (0: one pair per forward).")] = 0,
    name: Annotated[str | None, typer.Option(
        help="Name written in the results (default: the model's folder name, or RUN for the model perpair train "
             "saved in RUN/model).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", parser=given_path("-o/--output"),
                                                help="results.json path or output folder (default: "
                                                     "eval/LABEL/preference, LABEL the model's folder name, or RUN "
                                                     "for perpair train's RUN/model).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results row as JSON.")] = False,
) -> None:
    """Held-out preference accuracy: implicit-reward accuracy and margin against the reference, and the
    reference-free length-normalised log-prob margin, overall and by annotation category."""
    from perpair.eval import PreferenceConfig, json_ready, run_preference, write_results
    from perpair.eval.sources import check_results_owner

    config = _options(PreferenceConfig, model=model, ref=ref, data=data, annotations=annotations, beta=beta,
                      max_length=max_length, limit=limit, tokens_per_forward=tokens_per_forward, name=name)
    output = output or _default_output(model, "preference_accuracy", "preference")
    if output.suffix == ".json":
        check_output_file(output, "-o/--output", "results.json")
    else:
        check_output_folder(output, "-o/--output")
    check_results_owner(output if output.suffix == ".json" else output / "results.json", "preference_accuracy",
                        "-o/--output")
    status, update = _progress()
    with status:
        row = run_preference(config, on_progress=update)
    paths = write_results(row, output)
    if as_json:
        typer.echo(json.dumps(json_ready(row), ensure_ascii=False))
        return
    out.print(escape(paths["markdown"].read_text(encoding="utf-8")))
    if row["n_skipped"]:
        out.print(f"[yellow]{row['n_skipped']} pair{'s' * (row['n_skipped'] != 1)} left out[/]: "
                  f"{'their prompt' if row['n_skipped'] != 1 else 'its prompt'} alone fills --max-length")
    out.print(f"files: {paths['json']}, {paths['markdown']}")


@eval_app.command("report")
def report_command(
    folders: Annotated[list[Path], typer.Argument(help="Output folders (or results.json files) of eval runs.")],
    output: Annotated[Path, typer.Option("--output", "-o", parser=given_path("-o/--output"),
                                         help="Report folder.")] = Path("eval_report"),
) -> None:
    """One results table (JSON, Markdown) and an HTML page with plots."""
    from perpair.eval import write_report
    from perpair.eval.sources import check_results_owner

    check_output_folder(output, "-o/--output")
    for folder in folders:  # the report's results.json would replace the evaluation's (a report given: refused below)
        base = folder if folder.is_dir() else folder.parent
        if output.resolve() == base.resolve() and not (base / "report.html").is_file():
            raise PerpairError(f"-o/--output {output}: the folder of the evaluation {folder}, whose results.json the "
                               "report would replace; name another folder")
    check_results_owner(output / "results.json", None, "-o/--output")

    for kind, path in write_report(folders, output).items():
        out.print(f"{kind}: {escape(str(path))}")
