"""AlpacaEval 2.0 end to end: generate the model's answers to the 805 instructions, judge them against the
baseline's with the official weighted protocol, write alpaca_eval's own files and score them.

Files written to the output folder (alpaca_eval's formats): ``model_outputs.json`` (instruction, output,
generator, dataset), ``annotations.json`` (instruction, output_1 = baseline, generator_1, dataset, output_2 =
model, generator_2, annotator, preference, raw_completion), ``results.json`` (the leaderboard row), and
``cache.sqlite`` (every generation and judgment, so a re-run or a killed run repeats nothing finished).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from perpair.artifacts import folder_lock
from perpair.errors import InputError, PerpairError
from perpair.eval import sources
from perpair.eval.cache import ResultCache, cache_key
from perpair.eval.generate import GenerationConfig, dtype_name, generate_answers
from perpair.eval.judges import (
    UNCACHED,
    ApiLogprobJudge,
    LocalLogprobJudge,
    chatml_to_messages,
    fill_template,
    is_switched,
    judged_preference,
)
from perpair.eval.score import BASELINE_NAME, ScoreOptions, json_ready, score_frame
from perpair.models import model_fingerprint, resolve_model, tokenizer_identity

Progress = Callable[[str, int, int], None]


def is_api_judge(judge: str) -> bool:
    """Whether ``judge`` names an OpenAI-compatible server (its URL) rather than a local model."""
    return judge.startswith(("http://", "https://"))


class JudgeConfig(BaseModel):
    """A judge: a local model (a path, a Hub id or ``smollm2``) or an OpenAI-compatible server (its ``/v1`` URL)."""

    model_config = ConfigDict(extra="forbid")

    judge: str = Field(description="Local model, or http(s)://host:port/v1 of an OpenAI-compatible server.")
    model_name: str | None = Field(None, description="Model name sent to the server (API judges).")
    api_key_env: str | None = Field(None, description="Environment variable holding the server's API key.")
    concurrency: int = Field(8, ge=1, description="Requests in flight (API judges).")
    batch_size: int | None = Field(
        None, ge=1, description="Prompts per forward pass of a local judge (default: the AlpacaEval judge 1 on a CPU, "
                                "where padding costs more than batching gains, 8 on an accelerator; Arena-Hard's "
                                "writing judge 4).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weights of a local judge: auto = bfloat16 on a GPU, float32 on a CPU. bfloat16 is "
                            "several times faster on CPUs with AVX512-BF16/AMX and moves the judge's log-probs a "
                            "little (part of the judgments' cache key).")
    max_prompt_tokens: int = Field(8192, ge=64)
    prefix_cache: Path | None = Field(
        None, description="A local judge's folder of prompt beginnings' key/value caches, shared by evaluations of "
                          "the same instructions (perpair run's arms): the template, the instruction and the baseline "
                          "output before each model's answer are computed once (one prompt per pass only).")

    # The settings only one kind of judge reads: given to the other kind, which would ignore them, they are refused.
    API_SETTINGS: ClassVar[tuple[str, ...]] = ("model_name", "api_key_env", "concurrency")
    LOCAL_SETTINGS: ClassVar[tuple[str, ...]] = ("batch_size", "prefix_cache")

    @property
    def is_api(self) -> bool:
        return is_api_judge(self.judge)

    @classmethod
    def settings_problem(cls, judge: str, values: Mapping[str, Any], names: Mapping[str, str],
                         noun: str) -> str | None:
        """Why the settings ``values`` (by field name; None: not given) do not fit the judge ``judge``, or None.
        ``names`` says how the user wrote the judge (``"judge"``) and each field (``--judge-name`` on the command
        line, ``judge_name`` in a run config); ``noun`` is what those are ("option", "key")."""
        api = is_api_judge(judge)
        if api and not values.get("model_name"):  # now, not after the answers are generated
            return (f"{names['judge']} {judge} is an API judge: give {names['model_name']}, the model name the "
                    "server expects")
        given = [names[f] for f in (cls.LOCAL_SETTINGS if api else cls.API_SETTINGS) if values.get(f) is not None]
        if not given:
            return None
        what = f"{noun}s" if len(given) > 1 else f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"
        hint = f" (requests in flight: {names['concurrency']})" if api and "concurrency" in names else ""
        return (f"{', '.join(given)}: {what} of {'a local' if api else 'an API'} judge, and {names['judge']} {judge} "
                f"is {'an API' if api else 'a local'} judge{hint}; drop {'them' if len(given) > 1 else 'it'}")

    def client_config(self):
        from perpair.llm.client import ChatClientConfig

        if not self.model_name:
            raise PerpairError("an API judge needs --judge-name (the model name the server expects)")
        return ChatClientConfig(base_urls=[self.judge], model=self.model_name, api_key_env=self.api_key_env,
                                concurrency=self.concurrency)


class AlpacaEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The evaluated model: a checkpoint folder, a Hub id or smollm2.")
    name: str | None = Field(None, description="Generator name in the files (default: model_label(model): the "
                                               "model's folder name, or the run's for perpair train's OUT/model).")
    output_dir: Path
    judge: JudgeConfig
    generation: GenerationConfig = GenerationConfig()
    reference: Path | None = Field(None, description="Baseline outputs file (default: the Hub's online, "
                                                           "data_dir's copy offline).")
    judge_prompt: Path | None = None
    limit: int | None = Field(None, ge=1, description="Only the first N instructions.")
    offline: bool | None = None
    data_dir: Path | None = Field(None, description="A folder laid out as ../shared/data/alpaca_eval.")
    difficulty: Path | None = None
    glm_weights: Path | None = None

    def score_options(self) -> ScoreOptions:
        return ScoreOptions(offline=self.offline, data_dir=self.data_dir, difficulty=self.difficulty,
                            glm_weights=self.glm_weights)


def judge_prompt_template(path: Path | None, data_dir: Path | None) -> str:
    """The judge prompt given, else the data folder's, else the one installed with alpaca_eval."""
    found = sources.data_file(path, data_dir, sources.LOCAL_JUDGE_PROMPT)
    if found is None and importlib.util.find_spec("alpaca_eval") is not None:
        import alpaca_eval

        candidate = (Path(alpaca_eval.__file__).parent / "evaluators_configs" / "alpaca_eval_clf_gpt4_turbo"
                     / "alpaca_eval_clf.txt")
        found = candidate if candidate.is_file() else None
    if found is None:
        raise PerpairError(f"no AlpacaEval judge prompt: pass --judge-prompt ({sources.LOCAL_JUDGE_PROMPT}) or "
                           "--data-dir (a folder holding it), or install alpaca-eval")
    # checked here, before any answer is generated: a file cut short (an empty one, one without {output_2}) was
    # found out after every answer was generated, or not at all (each judge saw a prompt without the model's answer)
    try:
        template = found.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text ({exc})", file=str(found)) from None
    missing = [name for name in ("instruction", "output_1", "output_2") if "{" + name + "}" not in template]
    if missing:
        raise InputError(f"not an AlpacaEval judge prompt: no {', '.join('{' + m + '}' for m in missing)}",
                         file=str(found))
    try:
        chatml_to_messages(template)
    except PerpairError as exc:
        raise InputError(str(exc), file=str(found)) from None
    return template


def load_judge(config: JudgeConfig):
    if config.is_api:
        return ApiLogprobJudge(config.client_config())
    return LocalLogprobJudge(resolve_model(config.judge), batch_size=config.batch_size,
                             max_prompt_tokens=config.max_prompt_tokens, dtype=config.dtype,
                             prefix_cache=config.prefix_cache)


def check_judge(config: JudgeConfig) -> None:
    """A local judge that is no model (a path to nothing, a file, an adapter, a folder without weights or tokenizer)
    is refused before any answer is generated, as the judge: it was found out after every answer was generated
    (and ``model_outputs.json`` written), in words that named it a model."""
    if config.is_api:
        return
    try:
        judge_identity(config)
    except PerpairError as exc:
        raise PerpairError(f"judge {exc}") from None


def judge_identity(config: JudgeConfig) -> list[Any]:
    if config.is_api:
        return ["api", config.judge, config.model_name]
    # the dtype as it resolves here (auto: bfloat16 on a GPU, float32 on a CPU: other log-probs). The tokenizer and
    # chat template render the judge's prompt: edited in place, the judgments are others.
    path = resolve_model(config.judge)
    identity: list[Any] = ["local", model_fingerprint(path), dtype_name(config.dtype)]
    tokenizer = tokenizer_identity(path)
    if tokenizer is not None:
        identity.append({"tokenizer": tokenizer})
    if config.max_prompt_tokens != JudgeConfig.model_fields["max_prompt_tokens"].default:
        # a shorter bound cuts long prompts, which the judge then reads otherwise (the default keeps existing keys)
        identity.append({"max_prompt_tokens": config.max_prompt_tokens})
    return identity


def output_lock(out: Path):
    """Hold ``out/.lock`` while an evaluation writes ``out``: two evaluations writing one folder at once (two judges
    of a model, whose default folder is the model's) would leave one's answers beside the other's judgments and
    results."""
    return folder_lock(out, f"-o/--output {out}: another evaluation is writing it",
                       "wait for it to finish, or give this one another folder (-o)")


def run_alpaca_eval(config: AlpacaEvalConfig, on_progress: Progress | None = None) -> dict[str, Any]:
    """Generate, judge, write the files and return the results row (see module docstring)."""
    out = Path(config.output_dir)
    with output_lock(out):
        return _run_alpaca_eval(config, out, on_progress)


def _run_alpaca_eval(config: AlpacaEvalConfig, out: Path, on_progress: Progress | None) -> dict[str, Any]:
    sources.check_results_owner(out / "results.json", "alpaca_eval_2", "-o/--output")
    # every input is read before the first answer is generated: a missing file stops the run at once
    reference, reference_source, reference_sha256 = sources.load_reference_outputs(config.reference, config.data_dir,
                                                                                   config.offline)
    if config.limit:
        reference = reference.iloc[:config.limit]
    template = judge_prompt_template(config.judge_prompt, config.data_dir)
    score_options = config.score_options()
    lc_inputs = score_options.resolve()
    unchecked = unchecked_rows(config, lc_inputs)
    model_path = resolve_model(config.model)
    check_judge(config.judge)
    name = config.name or model_label(model_path) or config.model
    instructions = reference["instruction"].tolist()
    progress = on_progress or (lambda stage, done, total: None)

    # the folder's files are rewritten below: a results.json of an earlier run must not stand beside them if this
    # one stops before its own (perpair eval report would show its numbers with this run's answers)
    (out / "results.json").unlink(missing_ok=True)
    with ResultCache(out / "cache.sqlite") as cache:
        outputs, n_generated = generate_answers(model_path, config.generation, instructions, cache,
                                                lambda done, total: progress("generating", done, total))
        datasets = reference["dataset"].tolist() if "dataset" in reference else [None] * len(instructions)
        model_outputs = [{"instruction": i, "output": o, "generator": name, "dataset": d}
                         for i, o, d in zip(instructions, outputs, datasets, strict=True)]
        sources.write_json_records(out / "model_outputs.json", model_outputs)

        annotations, n_judged = judge_alpaca_eval(reference, outputs, name, config.judge, template, cache,
                                                  lambda done, total: progress("judging", done, total))
    sources.write_json_records(out / "annotations.json", annotations)

    frame = sources.read_annotations(out / "annotations.json")
    row = score_frame(frame, lc_inputs, name=name, fit=score_options.fit, baseline=score_options.baseline,
                      unchecked=unchecked)
    row.pop("glm_preference", None)
    row.update({"benchmark": "alpaca_eval_2", "model": config.model, "model_path": sources.model_identity(config.model),
                "judge": config.judge.judge, "judge_name": config.judge.model_name, "judge_dtype": config.judge.dtype,
                "generation": config.generation.model_dump(mode="json"), "limit": config.limit,
                "reference": reference_source, "reference_sha256": reference_sha256, "n_generated": n_generated,
                "n_judged": n_judged, "output_dir": str(out)})
    sources.write_json_records(out / "results.json", [json_ready(row)])
    return row


def unchecked_rows(config: AlpacaEvalConfig, lc_inputs: sources.LCInputs) -> str | None:
    """Why the annotations' rows cannot be checked against AlpacaEval's official ones, or None. The rows are the
    reference file's, and the length-controlled GLM reads each instruction's difficulty by its row position: a
    reference file given (another instruction set, order or baseline?) is checked against the data folder's copy,
    else online the Hub's; offline without a data folder it cannot be, and gets no LC rather than other
    instructions' difficulties."""
    if config.reference is None or lc_inputs.instructions is not None:  # the official file itself, or checked
        return None
    return (f"the rows are the reference file's ({config.reference}), which offline cannot be checked against "
            f"AlpacaEval's instructions in the official order and the {BASELINE_NAME} baseline's outputs, whose "
            f"positions the length-controlled GLM reads: give a data folder holding {sources.LOCAL_REFERENCE} "
            "(--data-dir; eval.alpaca_eval.data_dir in a run config)")


def judge_alpaca_eval(reference, outputs: list[str], name: str, judge_config: JudgeConfig, template: str,
                      cache: ResultCache, on_progress: Callable[[int, int], None]) -> tuple[list[dict], int]:
    """Judge every (baseline, model) pair with the official order and parser; returns ``(annotations, judged
    now)``. Judgments are cached under the judge's identity and the exact messages shown."""
    identity = judge_identity(judge_config)
    baseline_name = str(reference["generator"].iloc[0]) if "generator" in reference else "baseline"
    rows: list[dict[str, Any]] = []
    todo: list[tuple[int, str, list[dict[str, str]]]] = []
    shared: dict[int, list[dict[str, str]]] = {}  # each prompt with the model's output left empty
    for i, (record, output) in enumerate(zip(reference.to_dict("records"), outputs, strict=True)):
        switched = is_switched(record["instruction"])
        first, second = (output, record["output"]) if switched else (record["output"], output)
        messages = chatml_to_messages(fill_template(template, record["instruction"], first, second))
        shared[i] = chatml_to_messages(fill_template(template, record["instruction"],
                                                     *(("", record["output"]) if switched else (record["output"], ""))))
        rows.append({"instruction": record["instruction"], "output_1": record["output"],
                     "generator_1": record.get("generator", baseline_name), "dataset": record.get("dataset"),
                     "output_2": output, "generator_2": name,
                     "annotator": f"weighted_alpaca_eval:{identity[0]}:{judge_config.model_name or judge_config.judge}",
                     "preference": None, "raw_completion": None, "_switched": switched})
        if record["output"] == output:
            rows[-1]["preference"] = 1.5  # identical outputs: a draw, no call (PairwiseAnnotator._preprocess)
            continue
        key = cache_key(identity, messages)
        hit = cache.get("judgment", key)
        if hit is None:
            todo.append((i, key, messages))
        else:
            _fill(rows[i], hit)
    total, done = len(rows), len(rows) - len(todo)
    on_progress(done, total)
    if todo:
        judge = load_judge(judge_config)
        step = judge.batch_size if not judge_config.is_api else max(judge_config.concurrency * 4, 32)
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            results = judge.judge([m for _, _, m in chunk], [shared[i] for i, _, _ in chunk])
            cache.put_many("judgment", [(key, r) for (_, key, _), r in zip(chunk, results, strict=True)
                                        if UNCACHED not in r])
            for (i, _, _), result in zip(chunk, results, strict=True):
                _fill(rows[i], result)
            done += len(chunk)
            on_progress(done, total)
    for row in rows:
        row.pop("_switched")
    return rows, len(todo)


def _fill(row: dict[str, Any], judgment: dict[str, Any]) -> None:
    value = judged_preference(judgment["logprobs"], row["_switched"])
    row["preference"] = None if math.isnan(value) else value
    row["raw_completion"] = judgment.get("raw_completion")


def model_label(model: str) -> str:
    """The name an evaluation gives a model by default: its folder's name, or for a model ``perpair train`` saved
    (``OUT/model`` or ``OUT/adapter``, OUT holding the run's ``run.key``) OUT's name, so that ``runs/dpo/model`` and
    ``runs/mixdpo/model`` are ``dpo`` and ``mixdpo``, not two models named ``model`` writing into one folder."""
    from perpair.train.checkpoints import RUN_KEY

    path = Path(model.rstrip("/"))
    if path.name in ("model", "adapter") and path.parent.name and (path.parent / RUN_KEY).is_file():
        return path.parent.name
    return path.name


def default_output_dir(model: str) -> Path:
    """``eval/<model_label(model)>`` under the working directory (the CLI's ``--output`` default)."""
    return Path("eval") / model_label(model)
