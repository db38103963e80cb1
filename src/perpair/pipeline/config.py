"""The one YAML of a ``perpair run``: every stage's settings and the arms, validated before any work starts.

An arm is a plan preset (with optional schedule overrides) plus optional train overrides; all arms share
the prepared pairs, the annotations and the reference log-probs. ``train.steps`` may be left out: each arm
then trains one epoch over the pairs its plan keeps (MixDPO reads its data once, in plan order).
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from perpair.config_files import NumbersNotBools, _given, invalid_config, load_yaml
from perpair.errors import InputError, PerpairError
from perpair.plan.config import PRESETS, deep_merge

STAGES = ("prepare", "annotate", "plan", "train", "eval")
_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Train keys the pipeline sets itself (per arm); a config that sets them would be silently overridden, or would
# break what the run does with the arm's folder: overwrite beside the run's resume of a killed arm ('choose one'),
# save_model false leaving no model to evaluate.
_TRAIN_OWNED = {"model", "data", "plan", "out", "resume", "overwrite", "save_model", "reference_cache"}


def _leaves(section: dict[str, Any], within: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """The keys of a nested section down to its values (``("lora", "r")``), each with its value."""
    found = []
    for key, value in section.items():
        path = (*within, str(key))
        found += _leaves(value, path) if isinstance(value, dict) and value else [(path, value)]
    return found


def _sets(section: dict[str, Any], leaf: tuple[str, ...]) -> bool:
    """Whether ``section``, laid over another by ``deep_merge``, replaces that one's value at ``leaf``."""
    for depth, key in enumerate(leaf):
        if not isinstance(section, dict) or key not in section:
            return False
        section = section[key]
        if depth < len(leaf) - 1 and not isinstance(section, dict):  # a value where the other has a mapping
            return True
    return True


class _Section(NumbersNotBools):
    model_config = ConfigDict(extra="forbid")


class DataSection(_Section):
    """``perpair prepare`` settings (see :class:`perpair.data.PrepareOptions`)."""

    sources: list[str] = Field(min_length=1, description="Files, dataset folders or Hub dataset ids.")
    format: str | None = None
    split: str | None = None
    revision: str | None = None
    limit: int | None = Field(None, ge=1)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Held-out share for preference accuracy.")
    seed: int = 0
    skip_invalid: bool = False
    strict: bool = False
    # the columns of data in another layout, as perpair prepare's --prompt-col ... --system-col and --role-map
    prompt_col: str | None = None
    chosen_col: str | None = None
    rejected_col: str | None = None
    score_chosen_col: str | None = None
    score_rejected_col: str | None = None
    system_col: str | None = None
    role_map: str | dict[str, str] | None = None


class AnnotateSection(_Section):
    """``perpair annotate`` settings: teachers as specs (``ratings``, ``local:MODEL``, ``api:URL/MODEL``) or as
    mappings with every option of the annotate config."""

    teachers: list[str | dict[str, Any]] = Field(min_length=1)
    seed: int = 0
    limit: int | None = Field(None, ge=1)
    retry_failed: bool = False


class ArmConfig(_Section):
    preset: str = Field(description="Plan preset: dpo, sp2dpo, sp2dpo-random, mixdpo, sp2dpo+mixdpo.")
    schedule: dict[str, Any] = Field(default_factory=dict, description="Schedule keys over the preset's.")
    beta: float | None = Field(None, gt=0, allow_inf_nan=False,
                               description="The plan's global β (over preset and schedule).")
    train: dict[str, Any] = Field(default_factory=dict, description="Train keys over the shared train section.")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str) -> str:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        return preset


class PreferenceSection(_Section):
    limit: int | None = Field(None, ge=1, description="Only the first N held-out pairs.")
    beta: float = Field(0.1, gt=0, description="β of the implicit reward (scales margins only).")
    max_length: int | None = Field(None, ge=2, description="Default: the longest train max_length of the arms "
                                                           "(every arm scored on the same held-out pairs).")


# the judge's settings (JudgeConfig's fields) as this section's keys
_JUDGE_KEYS = {"judge": "judge", "model_name": "judge_name", "api_key_env": "judge_api_key_env",
               "batch_size": "judge_batch_size"}


class AlpacaEvalSection(_Section):
    judge: str = Field(description="Local model (folder, Hub id, smollm2) or an OpenAI-compatible /v1 URL.")
    judge_name: str | None = None
    judge_api_key_env: str | None = None
    judge_batch_size: int | None = Field(None, ge=1, description="Prompts per forward pass of a local judge "
                                                                 "(default: 1 on a CPU, 8 on an accelerator).")
    limit: int | None = Field(None, ge=1, description="Only the first N instructions.")
    max_new_tokens: int = Field(2048, ge=1)
    batch_size: int = Field(8, ge=1)
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weights of the generating models and of a local judge (auto: bfloat16 on a GPU, "
                            "float32 on a CPU; bfloat16 is several times faster on CPUs with AVX512-BF16/AMX).")
    offline: bool | None = Field(None, description="The benchmarks' files from the paths given or data_dir, never "
                                 "from the Hub (default: online unless HF_HUB_OFFLINE=1, which keeps models off the "
                                 "Hub too).")
    reference: str | None = Field(None, description="Baseline outputs file (default: the Hub).")
    judge_prompt: str | None = None
    difficulty: str | None = None
    glm_weights: str | None = None
    data_dir: str | None = Field(None, description="A folder laid out as ../shared/data/alpaca_eval (perpair eval's "
                                                   "--data-dir): the files above not given, and the official rows a "
                                                   "reference file given is checked against offline.")

    @property
    def judge_is_api(self) -> bool:
        """An OpenAI-compatible server's URL rather than a local model (as ``JudgeConfig.is_api`` reads it)."""
        from perpair.eval.alpaca_eval import is_api_judge

        return is_api_judge(self.judge)

    @model_validator(mode="after")
    def _options_of_this_kind_of_judge(self):  # an option the judge would ignore is refused, not dropped
        from perpair.eval.alpaca_eval import JudgeConfig

        problem = JudgeConfig.settings_problem(self.judge, {field: getattr(self, key) for field, key in
                                                            _JUDGE_KEYS.items() if key != "judge"},
                                               _JUDGE_KEYS, "key")
        if problem:
            raise ValueError(problem)
        return self


class EvalSection(_Section):
    base: bool = Field(True, description="Also evaluate the initial model on AlpacaEval (the arms' baseline).")
    preference: PreferenceSection | None = Field(default_factory=PreferenceSection)
    alpaca_eval: AlpacaEvalSection | None = None


class RunConfig(_Section):
    workdir: str = Field(description="Folder of every artifact of the run (relative to the working directory).")
    model: str = Field(description="Initial policy and reference: a folder, a Hub id, or smollm2.")
    data: DataSection
    annotate: AnnotateSection | None = None
    train: dict[str, Any] = Field(default_factory=dict, description="Train keys shared by every arm.")
    arms: dict[str, ArmConfig] = Field(min_length=1)
    eval: EvalSection = Field(default_factory=EvalSection)
    _source: tuple[str, dict[str, Any], dict[str, Any]] | None = PrivateAttr(None)  # file, its values, --set's
    workers: int = Field(1, ge=1, description="Stages run side by side, each in its own process with cores / "
                                              "workers threads (the arms, and annotation beside the reference "
                                              "pass): on a CPU, 2 finish sooner than 1 with all cores.")

    @field_validator("workdir", "model")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():  # '' would silently be the working directory
            raise ValueError("an empty path; name a folder")
        return value

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, arms: dict[str, ArmConfig]) -> dict[str, ArmConfig]:
        seen: dict[str, str] = {}
        for name in arms:
            if not _ARM_NAME.match(name) or name == "base":
                raise ValueError(f"arm name {name!r}: use letters, digits and _ . + - ('base' is reserved)")
            if name.lower() in seen:  # one folder on a case-insensitive file system (macOS, Windows)
                raise ValueError(f"arm names {seen[name.lower()]!r} and {name!r} differ only in case; their folders "
                                 "would be one on a case-insensitive file system: rename one")
            seen[name.lower()] = name
        return arms

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        owned = sorted(_TRAIN_OWNED & (set(self.train) | {k for a in self.arms.values() for k in a.train}))
        if owned:
            raise ValueError(f"train.{owned[0]} is set by perpair run itself (per arm); remove it")
        sections = {"train": self.train, **{f"arms.{name}.train": a.train for name, a in self.arms.items()}}
        for where, section in sections.items():
            if isinstance(section.get("lora"), dict) and "merge" in section["lora"]:
                raise ValueError(f"{where}.lora.merge is set by perpair run itself (its evaluation reads the model "
                                 "with the adapter merged; the adapter is kept beside it); remove it")
        for leaf, _ in _leaves(self.train):
            if self.arms and all(_sets(arm.train, leaf) for arm in self.arms.values()):
                key = ".".join(leaf)
                raise ValueError(f"train.{key} is set by every arm too (arms.NAME.train.{key}), so no arm reads the "
                                 f"shared value: remove it from train, or from the arms")
        if self.eval.preference is not None and self.data.test_fraction == 0:
            raise ValueError("eval.preference needs held-out pairs: set data.test_fraction > 0 "
                             "(or eval.preference: null)")
        if self.eval.preference is None and "test_fraction" not in self.data.model_fields_set:
            self.data.test_fraction = 0.0  # no held-out evaluation: the arms train on every pair
        return self

    def arm_train(self, name: str) -> dict[str, Any]:
        """The train keys of one arm: the shared section with the arm's keys on top."""
        return deep_merge(self.train, self.arms[name].train)


def load_run_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate the run config; ``overrides`` (nested, from ``--set key=value``) win over the file."""
    in_file = load_yaml(path, "run config")
    arms = in_file.get("arms") if isinstance(in_file, dict) else None
    if overrides and isinstance(overrides.get("arms"), dict) and isinstance(arms, dict):
        overrides = {**overrides, "arms": _arm_names_whole(overrides["arms"], [str(name) for name in arms])}
    data = deep_merge(in_file, overrides or {})
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise invalid_config(exc, "run config", path, overrides, in_file) from None
    config._source = (str(path), in_file, overrides or {})
    return config


def _arm_names_whole(arms: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """``--set arms.dpo-0.05.train.lr=…`` split at every dot: the keys under ``arms`` put back together where they
    begin with the name of an arm of the file that has dots (``dpo-0.05``), the longest such name."""
    dotted = sorted((name for name in names if "." in name), key=len, reverse=True)
    if not dotted:
        return arms
    joined: dict[str, Any] = {}
    for path, value in _leaves(arms):
        text = ".".join(path)
        name = next((n for n in dotted if text == n or text.startswith(n + ".")), None)
        parts = [name, *path[len(name.split(".")):]] if name else list(path)
        node = joined
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return joined


def name_the_file(config: RunConfig, exc: PerpairError) -> PerpairError:
    """``exc`` (a ``run config, KEY: …`` error of the run's validation) naming the config file, as the errors of
    loading it do, unless the command line (``--set``) set that key or one inside it: then it says so."""
    message = str(exc)
    if config._source is None or not message.startswith("run config, "):
        return exc
    path, in_file, command_line = config._source
    key = re.split(r"[: ]", message.removeprefix("run config, "), maxsplit=1)[0]
    loc = tuple(re.sub(r"\[\d+\]$", "", part) for part in key.split("."))
    if _given(command_line, loc):  # (--set there: the file need not be the one to blame)
        return exc if "(from the command line)" in message else PerpairError(f"{message} (from the command line)")
    return InputError(message, file=path)
