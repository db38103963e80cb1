"""``run(config)``: prepare → annotate → plan → train → evaluate, each stage skipped when nothing it depends on
changed, several arms over the same pairs, annotations and reference log-probs, one comparison at the end.

Read :func:`run` top to bottom: it is the whole job. Every stage goes through :meth:`_Job.stage`, which skips
it when its stamp (see :mod:`perpair.pipeline.stamps`) matches, and otherwise runs it and stamps it. Stages
are resumable inside too: the annotate cache keeps every answer, training checkpoints every
``train.save_every`` steps and a re-run resumes from the last one, evaluation caches answers and judgments.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perpair.artifacts import file_sha256
from perpair.config_files import format_validation_error
from perpair.errors import PerpairError, TooFewAnnotated
from perpair.pipeline.config import STAGES, RunConfig
from perpair.pipeline.report import comparison_rows, write_run_report
from perpair.pipeline.stamps import Stamps, output_identity, stage_key

Log = Callable[[str], None]


@dataclass
class Settings:
    """Every stage's validated configuration object, built before any work starts."""

    prepare: Any
    annotate: Any | None
    schedules: dict[str, Any]
    train: dict[str, dict[str, Any]]  # per arm, the train keys the config gives
    train_configs: dict[str, Any]  # per arm, those keys validated (with placeholders for the paths the run sets)


@dataclass
class RunResult:
    workdir: Path
    rows: list[dict[str, Any]]
    report: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def run(config: RunConfig, *, from_stage: str | None = None, log: Log = print) -> RunResult:
    """Run the job ``config`` describes in ``config.workdir``; ``from_stage`` re-runs that stage and all after."""
    if from_stage is not None and from_stage not in STAGES:
        raise PerpairError(f"--from {from_stage!r}: expected one of {', '.join(STAGES)}")
    settings = validate(config)
    job = _Job(config, Path(config.workdir), STAGES[STAGES.index(from_stage):] if from_stage else (), log)

    pairs, test = job.prepare(settings)
    annotations = job.annotate(settings, pairs)
    trained: dict[str, dict[str, Any]] = {}
    for arm in config.arms:
        plan = job.plan(settings, arm, pairs, annotations)
        trained[arm] = job.train(settings, arm, pairs, plan)
    evaluated = {arm: job.evaluate(settings, arm, info, test) for arm, info in trained.items()}
    if config.eval.base and config.eval.alpaca_eval is not None:
        evaluated["base"] = job.evaluate(settings, "base", {"key": job.model_key, "model": config.model}, test)

    rows = comparison_rows(config, trained, evaluated)
    report = write_run_report(job.workdir, config, rows, trained, evaluated)
    return RunResult(job.workdir, rows, report, job.ran, job.skipped)


def validate(config: RunConfig) -> Settings:
    """Build every stage's config object so that a bad value stops the run before any work, named by its key."""
    from pydantic import ValidationError

    from perpair.annotate import AnnotateConfig, parse_teacher_spec
    from perpair.data import PrepareOptions
    from perpair.plan import resolve_schedule
    from perpair.train import load_config as load_train_config
    from perpair.train.config import check_plan_fits

    def fail(where: str, exc: Exception) -> PerpairError:
        detail = format_validation_error(exc, where) if isinstance(exc, ValidationError) else f"{where}: {exc}"
        return PerpairError(f"run config, {detail}")

    data = config.data.model_dump(exclude={"sources"})
    try:
        prepare = PrepareOptions(**data)
    except ValidationError as exc:
        raise fail("data", exc) from None
    annotate = None
    if config.annotate is not None:
        section = config.annotate.model_dump()
        try:
            section["teachers"] = [parse_teacher_spec(t) if isinstance(t, str) else t for t in section["teachers"]]
            annotate = AnnotateConfig.model_validate(section)
        except (ValidationError, PerpairError) as exc:
            raise fail("annotate", exc) from None
    schedules, train, train_configs = {}, {}, {}
    for name, arm in config.arms.items():
        try:
            schedules[name] = resolve_schedule(arm.preset, None, arm.beta, arm.schedule)
        except PerpairError as exc:
            raise fail(f"arms.{name}", exc) from None
        if schedules[name].margin.source == "reference":  # the run computes reference log-probs only when training
            raise PerpairError(f"run config, arms.{name}: margin.source 'reference' is not available in perpair "
                               "run; train once, then plan with perpair plan --reference-logps")
        needs = schedules[name].beta.kind != "global" or schedules[name].margin.source == "teacher"
        if needs and annotate is None:
            raise PerpairError(f"run config, arms.{name}: preset {arm.preset} needs annotations; add an "
                               "'annotate' section")
        keys = config.arm_train(name)
        # the paths the run sets; steps left out: one epoch, known once the plan exists (checked again then)
        placeholders = {"model": config.model, "data": "pairs.parquet", "plan": "plan.parquet", "out": "out",
                        "steps": 1 << 30}
        try:
            arm_config = load_train_config(None, {**placeholders, **{k: v for k, v in keys.items() if v is not None}})
            check_plan_fits(arm_config, schedules[name].curriculum.kind, schedules[name].label_smoothing > 0,
                            f"preset {arm.preset}")
        except PerpairError as exc:
            raise fail(f"arms.{name}.train", exc) from None
        train[name] = keys
        train_configs[name] = arm_config
    check_model(config.model)
    return Settings(prepare, annotate, schedules, train, train_configs)


def check_model(spec: str) -> None:
    """Refuse a model whose config or tokenizer does not load (or that has no chat template) before any stage."""
    from perpair.models import resolve_model

    try:
        from transformers import AutoConfig, AutoTokenizer

        path = resolve_model(spec)
        AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except PerpairError as exc:
        raise PerpairError(f"run config, model: {exc}") from None
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PerpairError(f"run config, model: {spec} is not a model that loads (its config.json and tokenizer): "
                           f"{first}") from None
    if tokenizer.chat_template is None:
        raise PerpairError(f"run config, model: {spec}: the tokenizer has no chat template; perpair trains on "
                           "conversations")


class _Job:
    """The run's state: where it writes, which stages it must re-run, and what ran or was skipped."""

    def __init__(self, config: RunConfig, workdir: Path, forced: tuple[str, ...], log: Log):
        self.config, self.workdir, self.forced, self.log = config, workdir, set(forced), log
        self.forced_from = forced[0] if forced else None
        self.stamps = Stamps(workdir)
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self._model_key: str | None = None

    def stage(self, name: str, kind: str, material: dict[str, Any], outputs: Callable[[], list[Path]],
              action: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        """Skip ``name`` if its stamp matches ``material``, else run ``action`` and stamp its ``outputs``."""
        key = stage_key({"stage": kind, **material})
        stamp, why = self.stamps.check(name, key)
        if kind in self.forced:
            why = f"--from {self.forced_from}"
        elif stamp is not None:
            self.skipped.append(name)
            self.log(f"[{name}] unchanged, skipped")
            return {**stamp["info"], "key": key}
        self.stamps.remove(name)
        self.log(f"[{name}] running ({why})")
        started = time.perf_counter()
        info = action() or {}
        info["seconds"] = time.perf_counter() - started
        self.stamps.write(name, key, outputs(), info)
        self.ran.append(name)
        self.log(f"[{name}] done in {info['seconds']:.1f} s")
        return {**info, "key": key}

    @property
    def model_key(self) -> str:
        """Identity of the initial model: a local folder by its files, a Hub id by itself."""
        if self._model_key is None:
            from perpair.models import resolve_model

            path = Path(resolve_model(self.config.model))
            self._model_key = stage_key({"model": output_identity(path) if path.is_dir() else str(path)})
        return self._model_key

    # ---------------------------------------------------------------------------------------------------
    # stages

    def prepare(self, settings: Settings) -> tuple[Path, Path | None]:
        from perpair.data import prepare

        pairs = self.workdir / "pairs.parquet"
        test = pairs.with_name("pairs.test.parquet") if settings.prepare.test_fraction > 0 else None
        sources = self.config.data.sources
        material = {"options": settings.prepare.model_dump(mode="json"),
                    "sources": [file_sha256(s) if Path(s).is_file() else s for s in sources]}

        def action():
            result = prepare(sources, pairs, settings.prepare)
            return {"counts": result.counts}

        info = self.stage("prepare", "prepare", material, lambda: [p for p in (pairs, test) if p], action)
        counts = info.get("counts", {})
        self.log(f"  pairs: {', '.join(f'{k} {v:,}' for k, v in counts.items())}")
        return pairs, test

    def annotate(self, settings: Settings, pairs: Path) -> Path | None:
        if settings.annotate is None:
            return None
        from perpair.annotate import annotate, calls_path

        output = self.workdir / "annotations.parquet"
        material = {"config": settings.annotate.model_dump(mode="json"), "pairs": file_sha256(pairs)}
        last = [0.0]

        def show(p) -> None:
            now = time.monotonic()
            if now - last[0] >= 30 or p.done == p.total:
                last[0] = now
                self.log(f"  annotated {p.done:,}/{p.total:,} ({p.cached:,} cached, {p.failed:,} failed)")

        def action():
            result = annotate(pairs, settings.annotate, output, cache_path=self.workdir / "annotations.cache.sqlite",
                              on_progress=show)
            if result.shortfall:  # stop before planning on annotations that are not there; not stamped
                raise TooFewAnnotated(f"annotate: {result.shortfall}; every answer is cached, so a re-run asks only "
                                      "what is missing (annotate.retry_failed: true asks failed calls again)")
            fresh = result.calls - result.cached
            return {"pairs": result.pairs, "annotated": result.annotated_pairs, "calls": result.calls,
                    "status": result.status, "elapsed_s": result.elapsed_s,
                    "calls_per_second": fresh / result.elapsed_s if result.elapsed_s and fresh else None}

        info = self.stage("annotate", "annotate", material, lambda: [output, calls_path(output)], action)
        if info.get("calls_per_second"):
            self.log(f"  {info['annotated']:,} of {info['pairs']:,} pairs annotated, "
                     f"{info['calls_per_second']:.2f} teacher calls/s")
        return output

    def plan(self, settings: Settings, arm: str, pairs: Path, annotations: Path | None) -> Path:
        from perpair import plan

        schedule = settings.schedules[arm]
        output = self.workdir / "arms" / arm / "plan.parquet"
        material = {"preset": self.config.arms[arm].preset, "schedule": schedule.as_dict(),
                    "pairs": file_sha256(pairs), "annotations": file_sha256(annotations) if annotations else None}

        def action():
            result = plan.build_plan(pairs, annotations, schedule, preset=self.config.arms[arm].preset)
            plan.write_plan(result, output)
            plan.write_report(result.table, result.provenance, plan.report_dir(output), pairs_path=pairs,
                              command=f"perpair run (arm {arm}, preset {self.config.arms[arm].preset})")
            return {"counts": result.provenance["counts"]}

        self.stage(f"plan.{arm}", "plan", material, lambda: [output], action)
        return output

    def train(self, settings: Settings, arm: str, pairs: Path, plan: Path) -> dict[str, Any]:
        from perpair.train import load_config, train
        from perpair.train.checkpoints import checkpoints

        out = self.workdir / "arms" / arm / "train"
        keys = dict(settings.train[arm])
        if keys.get("lora") is not None:
            keys["lora"] = {**keys["lora"], "merge": True}  # the evaluation reads the merged model
        if keys.get("steps") is None:
            keys["steps"] = _one_epoch(plan, pairs, settings.train_configs[arm].batch_size)
        options = {**keys, "model": self.config.model, "data": str(pairs), "plan": str(plan), "out": str(out),
                   "reference_cache": str(self.workdir / "reference"),
                   "run_name": keys.get("run_name") or arm}  # trackers: one dashboard run per arm
        material = {"train": keys, "pairs": file_sha256(pairs), "plan": file_sha256(plan), "model": self.model_key}
        key = stage_key({"stage": "train", **material})

        def action():
            marker = out / "stage.key"  # the stage's identity (train's own OUT/run.key is its config's)
            resume = marker.is_file() and marker.read_text() == key and bool(checkpoints(out))
            if not resume:
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                marker.write_text(key)
            config = load_config(None, {**options, "resume": resume})
            every = max(1, config.steps // 10)
            if resume:
                self.log(f"  resuming from {checkpoints(out)[-1].name}")

            def show(m: dict[str, Any]) -> None:
                if m["step"] % every == 0 or m["step"] == config.steps:
                    self.log(f"  step {m['step']}/{config.steps} loss {m['loss']:.4f} ({m['seconds']:.2f} s)")

            summary = train(config, on_step=show).summary
            keep = ("steps", "pairs", "tokens", "train_seconds", "pairs_per_second", "peak_memory_bytes",
                    "reference_pairs_computed", "reference_pairs_from_first_step", "reference_seconds", "order")
            return {"summary": {k: summary.get(k) for k in keep}, "steps": config.steps}

        outputs = lambda: [out / "model", out / "metrics.jsonl"]  # noqa: E731
        info = self.stage(f"train.{arm}", "train", material, outputs, action)
        return {**info, "model": str(out / "model"), "metrics": str(out / "metrics.jsonl"), "plan": str(plan)}

    def evaluate(self, settings: Settings, arm: str, trained: dict[str, Any], test: Path | None) -> dict[str, Any]:
        """Held-out preference accuracy (arms only) and the AlpacaEval subset, each its own stamped stage."""
        from perpair.eval.alpaca_eval import AlpacaEvalConfig, JudgeConfig, run_alpaca_eval
        from perpair.eval.generate import GenerationConfig
        from perpair.eval.preference import PreferenceConfig, run_preference, write_results
        from perpair.train.setup import REFERENCE_PACKING

        section = self.config.eval
        folder = self.workdir / ("base" if arm == "base" else f"arms/{arm}") / "eval"
        results: dict[str, Any] = {}
        if section.preference is not None and arm != "base" and test is not None:
            p = section.preference
            max_length = p.max_length or settings.train_configs[arm].max_length
            # the reference's log-probs of the held-out pairs are computed by the first arm's evaluation and read
            # by the others; without gradients several pairs share a forward (as the training reference pass)
            config = PreferenceConfig(model=trained["model"], ref=self.config.model, data=test, beta=p.beta,
                                      max_length=max_length, limit=p.limit, name=arm,
                                      tokens_per_forward=REFERENCE_PACKING * max_length,
                                      reference_cache=self.workdir / "reference")
            material = {"config": config.model_dump(mode="json", exclude={"model", "data", "reference_cache"}),
                        "model": trained["key"], "reference": self.model_key, "test": file_sha256(test)}

            def preference():
                row = run_preference(config)
                write_results(row, folder / "preference")
                return {k: row.get(k) for k in ("accuracy", "mean_margin", "margin_se", "n_total",
                                                "length_normalised_accuracy")}

            results["preference"] = self.stage(f"eval.{arm}.preference", "eval", material,
                                               lambda: [folder / "preference" / "results.json"], preference)
        if section.alpaca_eval is not None:
            a = section.alpaca_eval
            config = AlpacaEvalConfig(
                model=trained["model"], name=arm, output_dir=folder / "alpaca_eval",
                judge=JudgeConfig(judge=a.judge, model_name=a.judge_name, api_key_env=a.judge_api_key_env,
                                  batch_size=a.judge_batch_size, dtype=a.dtype),
                generation=GenerationConfig(max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, dtype=a.dtype),
                limit=a.limit, offline=a.offline, reference=a.reference, judge_prompt=a.judge_prompt,
                difficulty=a.difficulty, glm_weights=a.glm_weights)
            # dtype auto leaves the stamp as it was before the option existed
            material = {"config": a.model_dump(mode="json", exclude={"dtype"} if a.dtype == "auto" else None),
                        "model": trained["key"]}

            def alpaca_eval():
                row = run_alpaca_eval(config)
                return {k: row.get(k) for k in ("length_controlled_winrate", "lc_standard_error", "win_rate",
                                                "standard_error", "n_total", "avg_length", "lc_method")}

            results["alpaca_eval"] = self.stage(f"eval.{arm}.alpaca_eval", "eval", material,
                                                lambda: [folder / "alpaca_eval" / "results.json"], alpaca_eval)
        return results


def _one_epoch(plan: Path, pairs: Path, batch_size: int) -> int:
    """Optimizer steps that read every pair the plan trains once (the rows ``perpair train`` trains)."""
    from perpair.plan.decode import plan_arrays

    return math.ceil(len(plan_arrays(plan, pairs).order) / batch_size)
