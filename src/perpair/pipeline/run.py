"""``run(config)``: prepare → annotate → plan → train → evaluate, each stage skipped when nothing it depends on
changed, several arms over the same pairs, annotations and reference log-probs, one comparison at the end.

Read :func:`run` top to bottom: it is the whole job. Every stage goes through :meth:`_Job.stage`, which skips
it when its stamp (see :mod:`perpair.pipeline.stamps`) matches, and otherwise runs it and stamps it. Stages
are resumable inside too: the annotate cache keeps every answer, training checkpoints every
``train.save_every`` steps and a re-run resumes from the last one, evaluation caches answers and judgments.
With ``workers: N`` the stages that do not wait for each other run side by side, N at a time, each in a worker
process (:mod:`perpair.pipeline.workers`); a stage's work is a module-level function below the job, for that.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perpair.artifacts import file_sha256, folder_lock, path_identity
from perpair.config_files import format_validation_error
from perpair.errors import InputError, PerpairError, StoppedBySignal, TooFewAnnotated, TrainingStopped
from perpair.pipeline.config import STAGES, RunConfig, name_the_file
from perpair.pipeline.report import comparison_rows, evaluation_notes, write_run_report
from perpair.pipeline.stamps import Stamps, output_identity, stage_key
from perpair.pipeline.workers import Workers, available_cores

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
    notes: list[str] = field(default_factory=list)  # what the table's evaluation figures do not say


def run(config: RunConfig, *, from_stage: str | None = None, log: Log = print) -> RunResult:
    """Run the job ``config`` describes in ``config.workdir``; ``from_stage`` re-runs that stage and all after."""
    if from_stage is not None and from_stage not in STAGES:
        raise PerpairError(f"--from {from_stage!r}: expected one of {', '.join(STAGES)}")
    try:
        settings = validate(config)
    except PerpairError as exc:
        raise name_the_file(config, exc) from None
    job = _Job(config, Path(config.workdir), STAGES[STAGES.index(from_stage):] if from_stage else (), log)
    threads = max(settings.train_configs[arm].threads or 0 for arm in config.arms)
    if config.workers > 1 and config.workers * max(threads, 1) > available_cores():
        given = f" × train.threads {threads}" if threads else ""
        log(f"note: workers {config.workers}{given} > {available_cores()} cores: the stages will share cores"
            + ("; leave train.threads out to give each worker its share" if threads else ""))

    job.stamps.check_root()
    with workdir_lock(job.workdir):  # a second run on the same workdir is refused, not mixed in
        # the comparison of the run before goes: if this one fails, no table shows the previous settings' numbers
        # (or an arm that failed now) as this run's; an unchanged re-run writes it again in seconds
        shutil.rmtree(job.workdir / "report", ignore_errors=True)
        pairs, test = job.prepare(settings)
        with Workers(config.workers, log) as job.workers:
            # side by side: the annotation pass, the reference log-probs every arm reads, the initial model's evaluation
            annotating = job.workers.side(job.annotate, settings, pairs)
            referencing = job.workers.side(job.reference, *job.reference_work(settings, pairs, test))
            base = None
            if config.eval.base and config.eval.alpaca_eval is not None:
                base = job.workers.side(job.evaluate, settings, "base", {"key": job.model_key, "model": config.model},
                                        test)
            annotations = annotating.result()
            referencing.result()
            # then every arm: its plan, its training, its evaluations, in that order; the arms side by side
            arms = {arm: job.workers.side(job.arm, settings, arm, pairs, annotations, test) for arm in config.arms}
            trained: dict[str, dict[str, Any]] = {}
            evaluated: dict[str, dict[str, Any]] = {}
            for arm, chain in arms.items():
                trained[arm], evaluated[arm] = chain.result()
            if base is not None:
                evaluated["base"] = base.result()

        rows = comparison_rows(config, trained, evaluated)
        report = write_run_report(job.workdir, config, rows, trained, evaluated)
        return RunResult(job.workdir, rows, report, job.ran, job.skipped, evaluation_notes(evaluated))


def workdir_lock(workdir: Path) -> contextlib.AbstractContextManager[None]:
    """Hold ``WORKDIR/.lock`` for the run: a second run on the same workdir while the first is running (two
    terminals, a scheduler starting the job twice) would write the same artifacts, stamps and checkpoints at once
    (each deleting the other's half-trained arm), so it is refused. The worker processes write under the run's
    lock (each arm's training takes its own OUT's: another file)."""
    return folder_lock(workdir, f"workdir {workdir}: another perpair run is using it",
                       "wait for it to finish or give this run another workdir")


def validate(config: RunConfig) -> Settings:
    """Build every stage's config object so that a bad value stops the run before any work, named by its key."""
    from pydantic import ValidationError

    from perpair.annotate import AnnotateConfig, parse_teacher_spec
    from perpair.data import PrepareOptions
    from perpair.data.sources import resolve_source
    from perpair.plan import resolve_schedule
    from perpair.train.config import TrainConfig, check_plan_fits
    from perpair.train.setup import unread_release_cpu_memory

    command_line = config._source[2] if config._source is not None else None

    def fail(where: str, exc: Exception) -> PerpairError:
        detail = (format_validation_error(exc, where, command_line) if isinstance(exc, ValidationError)
                  else f"{where}: {exc}")
        return PerpairError(f"run config, {detail}")

    data = config.data.model_dump(exclude={"sources"})
    try:
        prepare = PrepareOptions(**data)
    except ValidationError as exc:
        raise fail("data", exc) from None
    annotate = None
    if config.annotate is not None:
        section = config.annotate.model_dump(exclude_unset=True)  # a default is not a setting (a seed with no reader)
        try:
            section["teachers"] = [parse_teacher_spec(t) if isinstance(t, str) else t for t in section["teachers"]]
            annotate = AnnotateConfig.model_validate(section)
        except (ValidationError, PerpairError) as exc:
            raise fail("annotate", exc) from None
    for key in ("beta", "label_smoothing"):
        places = (["train"] if key in config.train else []) + [f"arms.{name}.train" for name, arm in
                                                               config.arms.items() if key in arm.train]
        if places:
            raise PerpairError(f"run config, {places[0]}.{key}: every arm trains with its plan, which gives each "
                               f"pair its own {key}; set it where the plan is made: arms.NAME.beta (the plan's "
                               "global β) or arms.NAME.schedule")
    # the paths the run sets, as placeholders (steps left out: one epoch, counted when the arm trains)
    placeholders = {"model": config.model, "data": "pairs.parquet", "plan": "plan.parquet", "out": "out"}
    try:  # the shared section alone first, so that its mistakes are named there rather than in an arm
        # (a null as training reads it: max_grad_norm null is off, lr null is refused, both now)
        TrainConfig.model_validate({**placeholders, **config.train})
    except ValidationError as exc:
        raise fail("train", exc) from None
    schedules, train, train_configs = {}, {}, {}
    for name, arm in config.arms.items():
        if arm.beta is not None and isinstance(arm.schedule.get("beta"), dict) and "beta" in arm.schedule["beta"]:
            raise PerpairError(f"run config, arms.{name}: beta and schedule.beta.beta both set the plan's global β, "
                               "and beta would win unseen; keep one")
        try:
            schedules[name] = resolve_schedule(arm.preset, None, arm.beta, arm.schedule)
        except PerpairError as exc:
            raise fail(f"arms.{name}", exc) from None
        needs = schedules[name].beta.kind != "global" or schedules[name].margin.source == "teacher"
        if needs and annotate is None:
            raise PerpairError(f"run config, arms.{name}: preset {arm.preset} needs annotations; add an "
                               "'annotate' section")
        if annotate is None and (given := sorted(schedules[name].mislabeled.model_fields_set)):
            raise PerpairError(f"run config, arms.{name}.schedule.mislabeled.{given[0]} acts on the pairs the "
                               "annotations call mislabeled, and the run annotates none: add an 'annotate' section, "
                               "or drop it")
        keys = config.arm_train(name)
        try:
            arm_config = TrainConfig.model_validate({**placeholders, **keys})
            check_plan_fits(arm_config, schedules[name].curriculum.kind, schedules[name].label_smoothing > 0,
                            f"preset {arm.preset}")
        except (ValidationError, PerpairError) as exc:
            raise fail(f"arms.{name}.train", exc) from None
        # the device and allocator the arm will train with are this process's: checked now, not after annotation
        import torch

        if problem := unread_release_cpu_memory(arm_config, "cuda" if torch.cuda.is_available() else "cpu"):
            raise PerpairError(f"run config, arms.{name}.train: {problem}")
        if schedules[name].margin.source == "reference" and arm_config.objective.reference_free:
            raise PerpairError(f"run config, arms.{name}: margin.source 'reference' reads the reference log-probs "
                               f"the run computes for the arm's training, and loss {arm_config.loss!r} uses no "
                               "reference: take another margin source or loss")
        if schedules[name].margin.source == "reference" and arm_config.ld_alpha is not None:
            raise PerpairError(f"run config, arms.{name}: margin.source 'reference' reads the reference log-probs "
                               f"the run computes for the arm's training, and with ld_alpha {arm_config.ld_alpha} "
                               "they weigh each response's tokens past the shorter one's by ld_alpha: take another "
                               "margin source, or train without ld_alpha")
        train[name] = keys
        train_configs[name] = arm_config
    for i, source in enumerate(config.data.sources):  # a missing file: named as the key it came from, before prepare
        try:
            resolve_source(source, prepare.split, prepare.revision)
        except PerpairError as exc:
            raise fail(f"data.sources[{i}]", exc) from None
    check_model(config.model)
    _check_lora_targets(config, train_configs, fail)
    _check_other_models_and_files(config, annotate, fail)
    return Settings(prepare, annotate, schedules, train, train_configs)


EVAL_FILES = ("reference", "judge_prompt", "difficulty", "glm_weights")  # eval.alpaca_eval's files


def _check_lora_targets(config: RunConfig, train_configs: dict[str, Any],
                        fail: Callable[[str, Exception], Exception]) -> None:
    """The arms' LoRA target modules against the model's modules (built from its config, without weights), as
    ``perpair train`` checks them: before any stage, not when the arm trains."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from perpair.models import resolve_model
    from perpair.train.setup import check_lora_targets

    arms = {name: arm for name, arm in train_configs.items() if arm.lora is not None}
    if not arms:
        return
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(config.model)))
    except (ValueError, KeyError, TypeError, OSError):  # no causal LM Transformers builds: the arm's training says so
        return
    for name, arm in arms.items():
        try:
            check_lora_targets(arm, skeleton)
        except PerpairError as exc:
            own = config.arms[name].train  # named where the setting it refuses comes from
            mine = "recompute_mlp" in own or "target_modules" in (own.get("lora") or {})
            raise fail(f"arms.{name}.train" if mine else "train", exc) from None


def _check_other_models_and_files(config: RunConfig, annotate: Any,
                                  fail: Callable[[str, Exception], Exception]) -> None:
    """Local teachers and a local judge must be model folders with weights, and the evaluation's files must exist,
    before any stage: they are first read after training otherwise."""
    from perpair.models import resolve_model

    models = [(f"annotate.teachers[{i}]", t.model) for i, t in enumerate(annotate.teachers if annotate else [])
              if getattr(t, "kind", None) == "local"]
    section = config.eval.alpaca_eval
    if section is not None and not section.judge_is_api:
        models.append(("eval.alpaca_eval.judge", section.judge))
    for where, spec in models:
        try:
            resolve_model(spec)
        except PerpairError as exc:
            raise fail(where, exc) from None
    for key in EVAL_FILES:
        value = getattr(section, key) if section is not None else None
        if value is not None and not Path(value).is_file():
            raise PerpairError(f"run config, eval.alpaca_eval.{key}: {value}: no such file")
    if section is not None and section.data_dir is not None and not Path(section.data_dir).is_dir():
        raise PerpairError(f"run config, eval.alpaca_eval.data_dir: {section.data_dir}: no such folder")
    if section is not None:
        _check_alpaca_eval_files(section)


def _check_alpaca_eval_files(section: Any) -> None:
    """The files the evaluation reads from the data folder, or (offline) has nowhere else to read, are there: they
    are first read after training otherwise."""
    from perpair.eval import sources
    from perpair.eval.alpaca_eval import judge_prompt_template

    none = PerpairError(f"run config, eval.alpaca_eval.judge_prompt: no AlpacaEval judge prompt: give judge_prompt "
                        f"({sources.LOCAL_JUDGE_PROMPT}) or data_dir (a folder holding it), or install alpaca-eval")
    try:  # given, else the data folder's, else the one installed with alpaca-eval
        judge_prompt_template(section.judge_prompt, section.data_dir)
    except InputError as exc:  # there, but no judge prompt (cut short, not text): what is wrong with it, not "none"
        if exc.problem != "no such file":
            raise PerpairError(f"run config, eval.alpaca_eval.judge_prompt: {exc}") from None
        raise none from None
    except PerpairError:
        raise none from None
    if not sources.is_offline(section.offline):  # online, the Hub's
        return
    for key, name in (("reference", sources.LOCAL_REFERENCE), ("difficulty", sources.LOCAL_DIFFICULTY)):
        if getattr(section, key) is None and sources.data_file(None, section.data_dir, name) is None:
            raise PerpairError(f"run config, eval.alpaca_eval.{key}: offline, no file to read it from: give {key} "
                               f"({name}) or data_dir (a folder holding it)")
    # offline, every file is local: read now, so that one cut short or of another shape stops the run before any
    # stage, not after every arm's training
    from perpair.eval.score import ScoreOptions

    try:
        sources.load_reference_outputs(section.reference, section.data_dir, True)
        ScoreOptions(offline=True, data_dir=section.data_dir, difficulty=section.difficulty,
                     glm_weights=section.glm_weights).resolve()
    except PerpairError as exc:
        raise PerpairError(f"run config, eval.alpaca_eval: {exc}") from None


def check_model(spec: str) -> None:
    """Refuse a model whose config or tokenizer does not load (or that has no chat template) before any stage."""
    from perpair.models import load_tokenizer, resolve_model

    try:
        from transformers import AutoConfig

        path = resolve_model(spec)
        AutoConfig.from_pretrained(path)
        tokenizer = load_tokenizer(path)
    except PerpairError as exc:
        detail = str(exc) if str(exc).startswith("model ") else f"model: {exc}"  # "model X: …" names the field
        raise PerpairError(f"run config, {detail}") from None
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PerpairError(f"run config, model: {spec} is not a model that loads (its config.json and tokenizer): "
                           f"{first}") from None
    if not tokenizer.chat_template:  # (a blank one load_tokenizer refuses, naming its file)
        raise PerpairError(f"run config, model: {spec}: the tokenizer has no chat template; perpair trains on "
                           "conversations")


class _Job:
    """The run's state: where it writes, which stages it must re-run, and what ran or was skipped."""

    def __init__(self, config: RunConfig, workdir: Path, forced: tuple[str, ...], log: Log):
        self.config, self.workdir, self.forced, self.log = config, workdir, set(forced), log
        self.forced_from = forced[0] if forced else None
        self.stamps = Stamps(workdir)
        self.workers = Workers(1, log)  # run() sets the run's own
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self._model_key: str | None = None
        self._model_tokenizer: str | None = None

    def stage(self, name: str, kind: str, material: dict[str, Any], outputs: Callable[[], list[Path]],
              action: Callable[..., dict[str, Any] | None], *args) -> dict[str, Any]:
        """Skip ``name`` if its stamp matches ``material``, else run ``action(*args, log=…)`` (in a worker, with
        several) and stamp its ``outputs``."""
        key = stage_key({"stage": kind, **material})
        stamp, why = self.stamps.check(name, key)
        if kind in self.forced:
            why = f"--from {self.forced_from}"
        elif stamp is not None:
            self.skipped.append(name)
            self.log(f"[{name}] unchanged, skipped")
            return {**stamp["info"], "key": key}
        self.stamps.remove(name)
        try:
            info, seconds = self.workers.call(name, why, action, *args)
        except (PerpairError, StoppedBySignal) as exc:  # its one line names the stage (which arm refused its pairs)
            if not str(exc).startswith((f"{name}:", f"{kind}:")) and len(exc.args) == 1:
                exc.args = (f"{name}: {exc.args[0]}",)
            raise
        info = {**(info or {}), "seconds": seconds}
        self.stamps.write(name, key, outputs(), info)
        self.ran.append(name)
        self.log(f"[{name}] done in {seconds:.1f} s")
        return {**info, "key": key}

    @property
    def model_key(self) -> str:
        """Identity of the initial model: a local folder by its files and the contents of its weights, config
        and tokenizer (weights rewritten in place are another model, as is a chat template edited in place: another
        prompt for every pair, even at the same size), a Hub id by itself and the commit it loads."""
        if self._model_key is None:
            from perpair.models import model_fingerprint, resolve_model, tokenizer_identity

            path = Path(resolve_model(self.config.model))
            self._model_key = stage_key({"model": [output_identity(path), model_fingerprint(str(path)),
                                                   tokenizer_identity(str(path))]
                                         if path.is_dir() else [str(path), model_fingerprint(str(path))]})
        return self._model_key

    @property
    def model_tokenizer(self) -> str:
        """Identity of the initial model's tokenizer (a Hub model's too): the one its trained models are saved with."""
        if self._model_tokenizer is None:
            from perpair.models import load_tokenizer, resolve_model, tokenizer_fingerprint, tokenizer_identity

            path = resolve_model(self.config.model)  # (a local folder's, as model_key computed it: remembered)
            self._model_tokenizer = tokenizer_identity(path) or tokenizer_fingerprint(load_tokenizer(path))
        return self._model_tokenizer

    # ---------------------------------------------------------------------------------------------------
    # stages

    def prepare(self, settings: Settings) -> tuple[Path, Path | None]:
        pairs = self.workdir / "pairs.parquet"
        test = pairs.with_name("pairs.test.parquet") if settings.prepare.test_fraction > 0 else None
        sources = self.config.data.sources
        material = {"options": settings.prepare.model_dump(mode="json"),
                    "sources": [_source_identity(s, settings.prepare.revision) for s in sources]}
        info = self.stage("prepare", "prepare", material, lambda: [p for p in (pairs, test) if p], _prepare,
                          sources, pairs, settings.prepare)
        counts = info.get("counts", {})
        self.log(f"  pairs: {', '.join(f'{k} {v:,}' for k, v in counts.items())}")
        return pairs, test

    def annotate(self, settings: Settings, pairs: Path) -> Path | None:
        if settings.annotate is None:
            return None
        from perpair.annotate import calls_path

        output = self.workdir / "annotations.parquet"
        material = {"config": settings.annotate.model_dump(mode="json"), "pairs": file_sha256(pairs)}
        local = [t.model for t in settings.annotate.teachers if t.kind == "local"]
        if local:  # a local teacher retrained, or its chat template edited, at the same path is another teacher
            from perpair.models import model_fingerprint, resolve_model, tokenizer_identity

            material["teacher_weights"] = [model_fingerprint(resolve_model(model)) for model in local]
            if any(tokenizers := [tokenizer_identity(resolve_model(model)) for model in local]):
                material["teacher_tokenizers"] = tokenizers
        info = self.stage("annotate", "annotate", material, lambda: [output, calls_path(output)], _annotate,
                          pairs, settings.annotate, output, self.workdir / "annotations.cache.sqlite")
        if info.get("calls_per_second"):
            self.log(f"  {info['annotated']:,} of {info['pairs']:,} pairs annotated, "
                     f"{info['calls_per_second']:.2f} teacher calls/s")
        return output

    def reference(self, trainings: list[dict[str, Any]], evaluations: list) -> None:
        """The reference log-probs the arms' trainings and held-out evaluations read, computed once before them,
        into ``WORKDIR/reference`` (a cache keyed by what decides them: nothing to compute when it has them all)."""
        if trainings or evaluations:
            try:
                _, seconds = self.workers.call("reference", "log-probs every arm reads", _reference, trainings,
                                               evaluations)
            except StoppedBySignal as exc:  # (what it computed is saved) its line names it, as a stage's does
                exc.args = (f"reference: {exc.args[0]}",)
                raise
            self.log(f"[reference] done in {seconds:.1f} s")

    def reference_work(self, settings: Settings, pairs: Path, test: Path | None) -> tuple[list, list]:
        """What :meth:`reference` computes: the train options of each distinct reference of the arms' trainings
        (every pair) and the preference configs of their held-out evaluations."""
        trainings: dict[tuple, dict[str, Any]] = {}
        evaluations: dict[tuple, Any] = {}
        for arm in self.config.arms:
            config = settings.train_configs[arm]
            if not config.objective.reference_free:
                same = (config.reference_model, config.max_length, config.ld_alpha, config.precision)
                trainings.setdefault(same, {**self._reference_options(settings, arm, pairs),
                                            "steps": None})  # one epoch: every pair that fits
            if self.config.eval.preference is not None and test is not None:
                evaluation = self._preference_config(settings, arm, self.config.model, test)
                evaluations.setdefault((evaluation.max_length, evaluation.limit), evaluation)
        return list(trainings.values()), list(evaluations.values())

    def arm(self, settings: Settings, arm: str, pairs: Path, annotations: Path | None,
            test: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """One arm's stages, in order: plan, train, evaluate."""
        plan = self.plan(settings, arm, pairs, annotations)
        trained = self.train(settings, arm, pairs, plan)
        return trained, self.evaluate(settings, arm, trained, test)

    def plan(self, settings: Settings, arm: str, pairs: Path, annotations: Path | None) -> Path:
        schedule = settings.schedules[arm]
        output = self.workdir / "arms" / arm / "plan.parquet"
        material = {"preset": self.config.arms[arm].preset, "schedule": schedule.as_dict(),
                    "pairs": file_sha256(pairs), "annotations": file_sha256(annotations) if annotations else None}
        reference = None
        if schedule.margin.source == "reference":  # the margins of the arm's own reference log-probs
            reference = self._reference_file(settings, arm, pairs)
            material["reference"] = file_sha256(reference)
        info = self.stage(f"plan.{arm}", "plan", material, lambda: [output], _plan, pairs, annotations, schedule,
                          self.config.arms[arm].preset, output, arm, reference, self.config.arms[arm].beta)
        for warning in info.get("warnings", []):  # shown again when the stage is skipped: the plan still says it
            self.log(f"  warning: {warning}")
        return output

    def _reference_file(self, settings: Settings, arm: str, pairs: Path) -> Path:
        """The file of ``WORKDIR/reference`` holding the reference log-probs of the arm's training (filled by
        :meth:`reference` before any plan)."""
        from perpair.train import load_config
        from perpair.train.setup import load_tokenizer, reference_cache_file, uses_bf16

        config = load_config(None, {**self._reference_options(settings, arm, pairs), "steps": 1})
        path, _ = reference_cache_file(config, load_tokenizer(config), pairs, bf16=uses_bf16(config))
        if not path.is_file():
            raise PerpairError(f"arms.{arm}: margin.source 'reference': the reference pass left no log-probs for "
                               f"this arm's settings in {path.parent} (every prompt longer than max_length?)")
        return path

    @staticmethod
    def _train_keys(settings: Settings, arm: str) -> dict[str, Any]:
        """An arm's train keys (``steps`` as given: None for one epoch), a LoRA adapter merged after training."""
        keys = dict(settings.train[arm])
        if keys.get("lora") is not None:
            keys["lora"] = {**keys["lora"], "merge": True}  # the evaluation reads the merged model
        return keys

    def _reference_options(self, settings: Settings, arm: str, pairs: Path) -> dict[str, Any]:
        """The train options of the arm's reference pass: every pair, no plan (it runs before the plans). A loss
        that needs ε > 0 (exo_pair) takes it from the plan when it trains; the reference log-probs do not depend on
        the loss, so a placeholder ε lets the pass's config meet the rule for a run without a plan."""
        options = {**self._train_options(self._train_keys(settings, arm), arm, pairs), "plan": None,
                   "out": str(self.workdir / "reference")}
        if settings.train_configs[arm].objective.needs_smoothing:
            options["label_smoothing"] = 1e-3
        return options

    def _train_options(self, keys: dict[str, Any], arm: str, pairs: Path) -> dict[str, Any]:
        """``keys`` and what the run sets itself, but the plan, the steps and the output folder."""
        from perpair.train import TrainConfig
        from perpair.train.losses import objective

        options = {**keys, "model": self.config.model, "data": str(pairs)}
        # each only where training reads it (a setting that would go unread is refused by the train config)
        if not objective(keys.get("loss") or TrainConfig.model_fields["loss"].default,
                         keys.get("loss_weights")).reference_free:
            options["reference_cache"] = str(self.workdir / "reference")
        if set(keys.get("report_to") or ()) - {"tensorboard"}:  # (TensorBoard names no run: each arm has its OUT)
            options["run_name"] = keys.get("run_name") or arm  # trackers: one dashboard run per arm
        return options

    def train(self, settings: Settings, arm: str, pairs: Path, plan: Path) -> dict[str, Any]:
        out = self.workdir / "arms" / arm / "train"
        keys = self._train_keys(settings, arm)
        options = {**self._train_options(keys, arm, pairs), "plan": str(plan), "out": str(out)}
        from perpair.models import model_fingerprint, resolve_model
        from perpair.train import TrainConfig, load_config
        from perpair.train.checkpoints import MEMORY_ONLY, RECORDING_ONLY

        # every setting as training reads it, defaults included (a default that changes is another training), and
        # the models by content: the initial one and a reference model of its own (retrained at the same path). The
        # settings of the logs and checkpoints alone (RECORDING_ONLY), those that trade memory for time alone
        # (MEMORY_ONLY: an arm that ran out of memory resumes with gradient_checkpointing, its checkpoints kept), and
        # release_cpu_memory (when the allocator gives freed memory back: the peak RSS, never a number), are keyed at
        # the run's defaults: changing one trains no arm again, and the stamps made before they were left out still
        # match.
        config = load_config(None, options)
        settings_read = config.model_dump(mode="json", exclude={"model", "data", "plan", "out", "resume",
                                                                "reference_cache"})
        settings_read.update({name: TrainConfig.model_fields[name].get_default(call_default_factory=True)
                              for name in (*RECORDING_ONLY, *MEMORY_ONLY, "release_cpu_memory")}, run_name=arm)
        del settings_read["save_every_minutes"]  # newer than the stamps: left out, the stamps made before still match
        from perpair.models import config_dropout

        if not config_dropout(self.config.model):  # (newer too: keyed for a model with dropout only, whose arms
            del settings_read["disable_dropout"]  # trained before with it on train again)
        # precision auto is bf16 autocast on a GPU that has it, float32 elsewhere: keyed as it resolves where it is
        # bf16, so that a workdir trained in float32 on a CPU and run again on a GPU trains again (it was "unchanged,
        # skipped", and an arm retrained there was bf16 beside float32 ones); auto resolving to float32 keeps the key
        # "auto" of the stamps made before
        from perpair.train.setup import uses_bf16

        if config.precision == "auto" and uses_bf16(config):
            settings_read["precision"] = "bf16"
        material = {"train": settings_read,
                    "pairs": file_sha256(pairs), "plan": file_sha256(plan), "model": self.model_key,
                    "reference_model": model_fingerprint(resolve_model(config.reference_model))
                    if config.reference_model else None}
        key = stage_key({"stage": "train", **material})
        outputs = lambda: [out / "model", out / "metrics.jsonl"]  # noqa: E731
        # --from train trains again from the start: resuming would load the finished run's last checkpoint
        info = self.stage(f"train.{arm}", "train", material, outputs, _train, options, out, key,
                          "train" in self.forced)
        return {**info, "model": str(out / "model"), "metrics": str(out / "metrics.jsonl"), "plan": str(plan)}

    def _preference_config(self, settings: Settings, arm: str, model: str, test: Path):
        from perpair.eval.preference import PreferenceConfig
        from perpair.train.setup import REFERENCE_PACKING

        p = self.config.eval.preference
        # unset: the longest of the arms' train max_length, one for every arm, so that each is scored on the same
        # held-out pairs (an arm's own limit left out another arm's pairs whose prompt fills it)
        max_length = p.max_length or max(c.max_length for c in settings.train_configs.values())
        # the reference's log-probs of the held-out pairs come from the run's reference pass; without gradients
        # several pairs share a forward (as the training reference pass)
        return PreferenceConfig(model=model, ref=self.config.model, data=test, beta=p.beta, max_length=max_length,
                                limit=p.limit, name=arm, tokens_per_forward=REFERENCE_PACKING * max_length,
                                reference_cache=self.workdir / "reference")

    def evaluate(self, settings: Settings, arm: str, trained: dict[str, Any], test: Path | None) -> dict[str, Any]:
        """Held-out preference accuracy (arms only) and the AlpacaEval subset, each its own stamped stage."""
        from perpair.eval import sources
        from perpair.eval.alpaca_eval import AlpacaEvalConfig, JudgeConfig, judge_identity, judge_prompt_template
        from perpair.eval.generate import GenerationConfig, resolved_settings
        from perpair.models import hub_commit, model_fingerprint, tokenizer_identity

        section = self.config.eval
        folder = self.workdir / ("base" if arm == "base" else f"arms/{arm}") / "eval"
        results: dict[str, Any] = {}
        # the trained weights by content, not only the training's key: a model trained again under the same key
        # (its folder deleted, other threads: other rounding) or edited by hand is another model, evaluated again;
        # its tokenizer too where it is not the initial model's (which the training saves with it, and the key holds):
        # a chat template edited by hand is another prompt (the keys of a model as trained are as they were)
        weights = model_fingerprint(trained["model"]) if arm != "base" else None
        if arm != "base" and (tokenizer := tokenizer_identity(trained["model"])) != self.model_tokenizer:
            weights = [weights, tokenizer]
        preference = None
        if section.preference is not None and arm != "base" and test is not None:
            config = self._preference_config(settings, arm, trained["model"], test)
            material = {"config": config.model_dump(mode="json", exclude={"model", "data", "reference_cache"}),
                        "model": trained["key"], "weights": weights, "reference": self.model_key,
                        "test": file_sha256(test)}
            # The two evaluations read only the trained model: beside each other when a worker is free (the last
            # arm's would otherwise run one after the other while the other workers wait)
            preference = self.workers.side(self.stage, f"eval.{arm}.preference", "eval", material,
                                           lambda: [folder / "preference" / "results.json"], _preference,
                                           config, folder / "preference")
        if section.alpaca_eval is not None:
            a = section.alpaca_eval
            config = AlpacaEvalConfig(
                model=trained["model"], name=arm, output_dir=folder / "alpaca_eval",
                judge=JudgeConfig(judge=a.judge, model_name=a.judge_name, api_key_env=a.judge_api_key_env,
                                  batch_size=a.judge_batch_size, dtype=a.dtype,
                                  prefix_cache=self.workdir / "judge_prefixes"),  # the judge prompts' shared beginnings
                generation=GenerationConfig(max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, dtype=a.dtype),
                limit=a.limit, offline=a.offline, reference=a.reference, judge_prompt=a.judge_prompt,
                difficulty=a.difficulty, glm_weights=a.glm_weights, data_dir=a.data_dir)
            # the generation's backend and dtype as auto resolves them here (a workdir evaluated on a GPU, in
            # bfloat16, is evaluated again on a CPU, in float32). The config names the judge and the files by path:
            # what they hold is part of the stamp too (a local judge's weights, dtype and tokenizer, the files'
            # contents), so a judge retrained or a prompt edited in place evaluates again
            material = {"config": a.model_dump(mode="json"), "generation": resolved_settings(config.generation),
                        "model": trained["key"], "weights": weights,
                        "judge": judge_identity(config.judge),
                        "files": {k: file_sha256(getattr(a, k)) for k in EVAL_FILES if getattr(a, k) is not None}}
            if not sources.is_offline(a.offline):  # the reference outputs and difficulties the Hub serves now
                material["hub"] = hub_commit(sources.ALPACA_EVAL_REPO, "dataset")
            if a.judge_prompt is None and sources.data_file(None, a.data_dir, sources.LOCAL_JUDGE_PROMPT) is None:
                # the judge prompt installed with alpaca-eval (neither given nor in the data folder), by content: an
                # upgrade that changes it judges again (the keys of a prompt given or in data_dir are as they were)
                material["judge_prompt"] = hashlib.sha256(judge_prompt_template(None, None).encode()).hexdigest()
            if a.data_dir is not None:  # the data folder's files it reads, by content
                names = (sources.LOCAL_REFERENCE, sources.LOCAL_JUDGE_PROMPT, sources.LOCAL_DIFFICULTY,
                         sources.LOCAL_GLM_WEIGHTS, sources.LOCAL_LEADERBOARD)
                material["data_dir"] = {name: file_sha256(Path(a.data_dir) / name) for name in names
                                        if (Path(a.data_dir) / name).is_file()}
            results["alpaca_eval"] = self.stage(f"eval.{arm}.alpaca_eval", "eval", material,
                                                lambda: [folder / "alpaca_eval" / "results.json"], _alpaca_eval,
                                                config)
        if preference is not None:
            results = {"preference": preference.result(), **results}
        return results


def _source_identity(source: str, revision: str | None = None) -> Any:
    """A data source as the prepare stage's key holds it: a file by its SHA-256, a local dataset folder by the
    names and SHA-256 of its files (a file of it rewritten in place is other data), a Hub id by itself and the
    commit it loads (data.revision, else main, moves when the dataset's repository does)."""
    from perpair.models import hub_commit

    if Path(source).exists():
        return path_identity(source)
    return [source, hub_commit(source.removeprefix("hub:"), "dataset", revision)]


# -------------------------------------------------------------------------------------------------------
# each stage's work: module-level functions of picklable arguments, called with a ``log`` (in a worker process
# when the run has several)

def _prepare(sources: list[str], pairs: Path, options, *, log: Log) -> dict[str, Any]:
    from perpair.data import prepare

    result = prepare(sources, pairs, options)
    for report in result.sources:
        if unread := report.unread_line():
            name = report.source.get("path") or report.source.get("dataset")
            log(f"  {name}: fields not read: {unread} (in each pair's meta only; scores, a system message or a "
                "prompt under other names: data.score_chosen_col/score_rejected_col, data.system_col, "
                "data.prompt_col)")
    return {"counts": result.counts}


def _annotate(pairs: Path, config, output: Path, cache: Path, *, log: Log) -> dict[str, Any]:
    from perpair.annotate import annotate

    last = [0.0]

    def show(p) -> None:
        now = time.monotonic()
        if now - last[0] >= 30 or p.done == p.total:
            last[0] = now
            log(f"  annotated {p.done:,}/{p.total:,} ({p.cached:,} cached, {p.failed:,} failed)")

    result = annotate(pairs, config, output, cache_path=cache, on_progress=show)
    if result.shortfall:  # stop before planning on annotations that are not there; not stamped
        raise TooFewAnnotated(f"annotate: {result.shortfall}; every answer is cached, so a re-run asks only "
                              "what is missing (annotate.retry_failed: true asks failed calls again)")
    fresh = result.calls - result.cached
    return {"pairs": result.pairs, "annotated": result.annotated_pairs, "calls": result.calls,
            "status": result.status, "elapsed_s": result.elapsed_s,
            "calls_per_second": fresh / result.elapsed_s if result.elapsed_s and fresh else None}


def _reference(trainings: list[dict[str, Any]], evaluations: list, *, log: Log) -> None:
    from perpair.eval.preference import cache_reference
    from perpair.train import load_config, reference_pass

    for options in trainings:
        result = reference_pass(load_config(None, options))
        if result["pairs_computed"]:
            log(f"  training pairs: {result['pairs_computed']:,} computed in {result['seconds']:.1f} s")
    for config in evaluations:
        cache_reference(config)


def _plan(pairs: Path, annotations: Path | None, schedule, preset: str, output: Path, arm: str,
          reference: Path | None = None, beta: float | None = None, *, log: Log) -> dict[str, Any]:
    from perpair import plan
    from perpair.plan.reference import read_reference_logps

    logps = read_reference_logps(reference, file_sha256(pairs), str(pairs))[0] if reference else None
    result = plan.build_plan(pairs, annotations, schedule, preset=preset, reference_logps=logps)
    if beta is not None and (idle := plan.idle_global_beta(result)):  # as perpair plan --beta: refused, not ignored
        raise PerpairError(f"arms.{arm}.beta {beta:g} would change nothing: {idle}; drop it, or set "
                           f"arms.{arm}.schedule.beta.normalise: true to rescale them to it")
    plan.write_plan(result, output)
    plan.write_report(result.table, result.provenance, plan.report_dir(output), pairs_path=pairs,
                      command=f"perpair run (arm {arm}, preset {preset})")
    return {"counts": result.provenance["counts"], "warnings": result.provenance["warnings"]}


def _train(options: dict[str, Any], out: Path, key: str, fresh: bool = False, *, log: Log) -> dict[str, Any]:
    from perpair.train import load_config, train
    from perpair.train.checkpoints import STAGE_KEY, checkpoints, earlier_run_keys, held_key, run_key

    marker = out / STAGE_KEY  # the stage's identity (train's own OUT/run.key is its config's)
    resume = not fresh and marker.is_file() and marker.read_text() == key and bool(checkpoints(out))
    if resume:
        # train's own key holds the paths too: a workdir copied or moved trains again rather than refuse to resume
        # (or the key an earlier perpair wrote: the stage's key covers what it lacks)
        held, same = held_key(out), load_config(None, {**options, "resume": True})
        resume = held == run_key(same) or held in earlier_run_keys(same)
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        marker.write_text(key)
    config = load_config(None, {**options, "resume": resume})
    steps = [config.steps or 0]  # without train.steps: one epoch, whose steps train() counts
    if resume:
        log(f"  resuming from {checkpoints(out)[-1].name}")

    def show(m: dict[str, Any]) -> None:
        if m["step"] % max(1, steps[0] // 10) == 0 or m["step"] == steps[0]:
            log(f"  step {m['step']}/{steps[0]} loss {m['loss']:.4f} ({m['seconds']:.2f} s)")

    try:
        summary = train(config, on_step=show, on_steps=lambda n: steps.__setitem__(0, n)).summary
    except TrainingStopped as exc:  # perpair run has no --resume: a re-run resumes the arm by itself
        raise TrainingStopped(str(exc).replace("rerun with --resume", "re-run"), exc.exit_code - 128) from None
    keep = ("steps", "pairs", "tokens", "train_seconds", "pairs_per_second", "peak_memory_bytes",
            "reference_pairs_computed", "reference_pairs_from_first_step", "reference_seconds", "order")
    return {"summary": {k: summary.get(k) for k in keep}, "steps": steps[0]}


def _preference(config, folder: Path, *, log: Log) -> dict[str, Any]:
    from perpair.eval.preference import run_preference, write_results

    row = run_preference(config)
    write_results(row, folder)
    return {k: row.get(k) for k in ("accuracy", "mean_margin", "margin_se", "n_total", "length_normalised_accuracy")}


def _alpaca_eval(config, *, log: Log) -> dict[str, Any]:
    from perpair.eval.alpaca_eval import run_alpaca_eval

    row = run_alpaca_eval(config)
    return {k: row.get(k) for k in ("length_controlled_winrate", "lc_standard_error", "win_rate", "standard_error",
                                    "n_total", "avg_length", "lc_method", "n_unjudged", "lc_note", "lc_judge_note")}
