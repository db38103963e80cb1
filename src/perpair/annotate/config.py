"""The annotate stage's configuration: teachers (from ``--teacher SPEC`` or YAML) and run settings.

A YAML file says the same as the command line with more options::

    seed: 0
    teachers:
      - kind: api
        model: gpt-4o-mini
        base_urls: [https://api.openai.com/v1]
        api_key_env: OPENAI_API_KEY          # the variable's name; the key never enters a file
        templates: [gap, gap-brief]          # an ensemble over prompts
        price_prompt_per_1k: 0.00015
        price_completion_per_1k: 0.0006
      - kind: local
        model: smollm2
      - kind: ratings
        weight: 0.5
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from perpair.annotate.templates import get_template
from perpair.config_files import NumbersNotBools, invalid_config, load_yaml
from perpair.errors import InputError, PerpairError
from perpair.llm.client import ChatClientConfig

MAX_REASKS = 10  # the most re-asks after an invalid answer a teacher may be given


class _Teacher(NumbersNotBools):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="Teacher id in cache keys and rows (default from kind/model).")
    weight: float = Field(1.0, gt=0, allow_inf_nan=False,
                          description="Weight of this teacher's votes in the per-pair aggregation.")


class RatingsTeacherConfig(_Teacher):
    """The gap derived from the data's own ratings (free, instant)."""

    kind: Literal["ratings"] = "ratings"
    magnitude_edges: tuple[float, float] = Field(
        (1.0, 3.0), description="Overall-score margins up to which magnitude is 1, then 2; above: 3 (1-10 scale).")

    @property
    def id(self) -> str:
        return self.name or "ratings"

    @field_validator("magnitude_edges")
    @classmethod
    def _increasing(cls, edges: tuple[float, float]) -> tuple[float, float]:
        low, high = edges
        if not (math.isfinite(high) and 0 < low < high):  # else a magnitude (1 or 2) is never given, or 0 is
            raise ValueError(f"got [{low:g}, {high:g}]; give two margins with 0 < low < high: a margin up to low "
                             "is magnitude 1, up to high 2, above high 3 (a margin of 0 is magnitude 0)")
        return edges

    @property
    def templates(self) -> list[str]:
        return ["ratings@v1"]


class LocalTeacherConfig(_Teacher):
    """A local Hugging Face causal LM that ranks the label options by likelihood."""

    kind: Literal["local"] = "local"
    model: str = Field(min_length=1, description="Model folder, Hub id, or 'smollm2'.")
    templates: list[str] = Field(default_factory=lambda: ["gap-local@v1"], min_length=1)
    max_chars: int | None = Field(None, ge=50, description="Cut the prompt and each response to this many "
                                  "characters (overrides the template's limits; part of the cache key).")
    batch_size: int | None = Field(None, ge=1, description="Prompts per forward pass (default: 1 on a CPU, "
                                   "where no padding is fastest; 8 on an accelerator). Does not change the answers.")
    max_length: int = Field(2048, ge=16, description="Prompt tokens kept at most (the end is kept).")
    dtype: Literal["float32", "bfloat16"] = "float32"
    calibrate: bool = Field(True, description="Contextual calibration (Zhao et al., 2021): divide each label's "
                            "probability by its probability for a content-free pair ('N/A' everywhere), so the "
                            "model's prior for the label words themselves does not decide (part of the cache key).")
    threads: int | None = Field(None, ge=1, description="PyTorch threads while scoring (default: 1 on a CPU, much "
                                "the fastest when it is shared with other work; set more on an idle many-core "
                                "machine). Does not change the answers.")

    @property
    def id(self) -> str:
        return self.name or f"local:{self.model}"

    @field_validator("templates")
    @classmethod
    def _scoring_templates(cls, names: list[str]) -> list[str]:
        return _check_templates(names, "score")


class ApiTeacherConfig(ChatClientConfig, NumbersNotBools):
    """A teacher behind an OpenAI-compatible chat endpoint (client settings as in ChatClientConfig)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["api"] = "api"
    name: str | None = None
    weight: float = Field(1.0, gt=0, allow_inf_nan=False)
    templates: list[str] = Field(default_factory=lambda: ["gap@v1"], min_length=1)
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(256, ge=16)
    max_chars: int | None = Field(None, ge=50, description="Cut the prompt and each response to this many "
                                  "characters (overrides the template's limits; part of the cache key).")
    seed: int | None = Field(None, description="Sent to servers that honour it.")
    structured: Literal["auto", "json_schema", "json_object", "none"] = Field(
        "auto", description="Structured output: 'auto' tries json_schema, then json_object, then plain text.")
    max_reasks: int = Field(2, ge=0, le=MAX_REASKS, description="Re-asks after an invalid answer.")

    @property
    def id(self) -> str:
        return self.name or f"api:{self.model}"

    def client_config(self) -> ChatClientConfig:
        return ChatClientConfig(**self.model_dump(include=set(ChatClientConfig.model_fields)))

    @field_validator("templates")
    @classmethod
    def _generating_templates(cls, names: list[str]) -> list[str]:
        return _check_templates(names, "generate")


def _kind(teacher: Any) -> Any:
    return teacher.get("kind") if isinstance(teacher, dict) else getattr(teacher, "kind", None)


# The kind is read by a function, not named as a discriminator field: pydantic refuses a before-validator on a
# discriminator field, and NumbersNotBools puts one on every field of the teachers.
TeacherConfig = Annotated[
    Annotated[RatingsTeacherConfig, Tag("ratings")] | Annotated[LocalTeacherConfig, Tag("local")]
    | Annotated[ApiTeacherConfig, Tag("api")],
    Discriminator(_kind, custom_error_type="teacher_kind",
                  custom_error_message="a teacher's 'kind' must be 'ratings', 'local' or 'api'"),
]

MAX_CONCURRENCY = next(m.le for m in ChatClientConfig.model_fields["concurrency"].metadata if hasattr(m, "le"))

_SHARD = re.compile(r"^(\d+)/(\d+)$")


class AnnotateConfig(NumbersNotBools):
    model_config = ConfigDict(extra="forbid")

    teachers: list[TeacherConfig] = Field(min_length=1)
    seed: int = Field(0, description="Seed of the per-pair response order.")
    limit: int | None = Field(None, ge=1, description="Annotate only the first N pairs of the file.")
    shard: str | None = Field(None, description="'i/n': this machine's share of the pairs, by pair id.")
    retry_failed: bool = Field(False, description="Ask again where the cache holds a final failure.")
    min_valid_share: float = Field(0.0, ge=0.0, le=1.0, description="The run fails (exit 3, artifacts still "
                                   "written) when fewer than this share of the pairs got a valid annotation, "
                                   "or when none did; in an ensemble, also when fewer than this share of one "
                                   "teacher's (or template's) calls got a valid answer.")

    @field_validator("shard")
    @classmethod
    def _shard(cls, value: str | None) -> str | None:
        if value is not None:
            match = _SHARD.match(value)
            if not match or not int(match.group(1)) < int(match.group(2)):
                raise ValueError(f"shard {value!r} must be 'i/n' with 0 <= i < n")
        return value

    @model_validator(mode="after")
    def _unique_ids(self) -> AnnotateConfig:
        ids = [t.id for t in self.teachers]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"two teachers share the id {duplicates[0]!r}; give one a 'name'")
        return self

    @model_validator(mode="after")
    def _all_read(self) -> AnnotateConfig:
        # settings that change no annotation here: accepted, they would go unnoticed
        if len(self.teachers) == 1 and "weight" in self.teachers[0].model_fields_set:
            raise ValueError("teachers.0.weight weighs a teacher's votes against the other teachers', and this run "
                             "has one teacher: it would change nothing; drop it, or add a teacher")
        if "seed" in self.model_fields_set and all(t.kind == "ratings" for t in self.teachers):
            raise ValueError("seed orders the two responses a teacher model reads, and the ratings teacher reads "
                             "none (it reads the data's scores): it would change nothing; drop it")
        return self

    @property
    def shard_index(self) -> tuple[int, int] | None:
        if self.shard is None:
            return None
        i, n = self.shard.split("/")
        return int(i), int(n)


def _check_templates(names: list[str], kind: str) -> list[str]:
    """The templates' ids (``name@vN``: the version is part of every cache key and row)."""
    ids = []
    for name in names:
        template = get_template(name)
        if template.kind != kind:
            raise ValueError(f"template {name!r} is a {template.kind} template; this teacher needs a {kind} one")
        ids.append(template.id)
    if len(set(ids)) != len(ids):
        raise ValueError("a template is listed twice")
    return ids


def parse_teacher_spec(spec: str) -> dict:
    """``ratings``, ``local:MODEL`` or ``api:BASE_URL/MODEL`` as a teacher config dict."""
    kind, _, rest = spec.partition(":")
    if kind == "ratings" and not rest:
        return {"kind": "ratings"}
    if kind == "local" and rest:
        return {"kind": "local", "model": rest}
    if kind == "api" and rest:
        # an OpenAI-compatible root ends in /v1: what follows is the model, '/' and all (vLLM serves a Hub id)
        head, v1, tail = rest.rstrip("/").partition("/v1/")
        base, _, model = (head + "/v1", "", tail) if v1 else rest.rstrip("/").rpartition("/")
        if base.startswith(("http://", "https://")) and model and "://" not in model:
            return {"kind": "api", "base_urls": [base], "model": model}
    raise PerpairError(f"teacher {spec!r}: expected 'ratings', 'local:MODEL_DIR' or 'api:BASE_URL/MODEL' "
                       "(e.g. api:http://127.0.0.1:8080/v1/smollm2; after /v1/ the model's name may hold '/'; a root "
                       "without /v1 and a model name with '/' need a YAML config)")


def load_config(path: str | Path | None, *, teachers: list[str] | None = None, base_urls: list[str] | None = None,
                templates: list[str] | None = None, concurrency: int | None = None, api_key_env: str | None = None,
                **overrides) -> AnnotateConfig:
    """The YAML file (if any) with the command line's options on top, validated before any work starts."""
    if concurrency is not None and not 1 <= concurrency <= MAX_CONCURRENCY:  # refused whatever the teachers
        raise InputError(f"invalid annotate settings: --concurrency {concurrency}: requests in flight per API "
                         f"teacher, from 1 to {MAX_CONCURRENCY} (from the command line)")
    data = load_yaml(path, "annotate config") if path is not None else {}
    # what the command line set, nested as pydantic locates it (a teacher's keys under its kind): its mistakes
    # are not blamed on the file
    options_set = {k: v for k, v in overrides.items() if v is not None}
    given: dict[str, Any] = dict(options_set)
    if teachers:
        data["teachers"] = [parse_teacher_spec(spec) for spec in teachers]
    for index, teacher in enumerate(data.get("teachers") or []):
        if not isinstance(teacher, dict):
            continue
        options = {}
        if teacher.get("kind") == "api":
            if base_urls:
                options["base_urls"] = list(dict.fromkeys([*teacher.get("base_urls", []), *base_urls]))
            if concurrency is not None:
                options["concurrency"] = concurrency
            if templates:
                options["templates"] = templates
            if api_key_env is not None:
                options["api_key_env"] = api_key_env
            teacher.update(options)
        if teachers or options:
            given.setdefault("teachers", {})[index] = {teacher.get("kind"): teacher if teachers else options}
    data.update(options_set)
    if not data.get("teachers"):
        raise PerpairError("no teacher: give --teacher SPEC or a config with 'teachers'")
    api_only = [name for name, value in (("--concurrency", concurrency), ("--base-url", base_urls),
                                         ("--template", templates), ("--api-key-env", api_key_env)) if value]
    kinds = [t.get("kind") for t in data["teachers"] if isinstance(t, dict)]
    if api_only and "api" not in kinds:  # they set API teachers only: ignored, they would go unnoticed
        raise PerpairError(f"{', '.join(api_only)} set{'s' if len(api_only) == 1 else ''} the API teachers; this "
                           f"run has none ({', '.join(map(str, kinds))}): drop {'it' if len(api_only) == 1 else 'them'}"
                           ", or add an API teacher")
    try:
        return AnnotateConfig.model_validate(data)
    except ValidationError as exc:
        raise invalid_config(exc, "annotate settings", path, given) from None
