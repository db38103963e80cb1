"""The plan schedule: validated configuration, named presets, YAML loading.

Where each constant comes from (see DESIGN, "What the papers state"):

- **From MixDPO** (Pang et al., 2026, arXiv 2602.00954): difficulty = the rating margin
  ``score_chosen − score_rejected``; τ = 0.5 on UltraFeedback (exactly the ties) routed to SFT; cDPO
  label smoothing ε = 0.1 on preference-routed pairs; β = 0.01; one global sort from large to small margin.
- **From SP²DPO** (He et al., 2026, arXiv 2601.22385): a per-pair β derived offline from a teacher's
  (category, magnitude, confidence), and the two controls: one global β, and random β_i.
- **Ours** (documented as ours): the mapping itself — ``s = prior(category) · g(magnitude) · confidence``,
  ``β = β_max^(1−s) · β_min^s``, the rescale to a global geometric mean — and every default number of it
  (β_min, β_max, the priors, the g table, the mislabeled threshold and action); the teacher and reference
  margins; the quantile rule; breaking margin ties by pair id; the ``bucketed``, ``hard_to_easy`` and ``random``
  curricula; the seed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from perpair.config_files import NumbersNotBools, format_validation_error, load_yaml
from perpair.errors import InputError

_Unit = Annotated[float, Field(ge=0.0, le=1.0)]


class _Strict(NumbersNotBools):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)


class CategoryPriors(_Strict):
    """prior(category) ∈ [0, 1]: how much a gap of this category says about the preference (ours).

    Ordered like the categories: the more objective the failure, the stronger the signal. ``mislabeled``
    is the prior of a mislabeled pair that the mislabeled action leaves in training (below the threshold,
    or flipped); 0 keeps it at β_max, as close to the reference as the schedule allows. ``unknown`` is the
    prior of a gap whose size is known but not its kind (the ratings teacher with an overall score only):
    between helpfulness and style, as an overall score mixes every kind of gap; its β then follows the margin.
    """

    safety: _Unit = 1.0
    factuality: _Unit = 0.9
    instruction_following: _Unit = 0.8
    helpfulness: _Unit = 0.6
    style: _Unit = 0.3
    no_clear_gap: _Unit = 0.0
    mislabeled: _Unit = 0.0
    unknown: _Unit = 0.5


class BetaConfig(_Strict):
    kind: Literal["global", "semantic", "random"] = Field(
        "global", description="global: one β for every pair (DPO; SP²DPO's tuned-β control); semantic: "
        "β_i from the annotation (SP²DPO); random: the semantic β_i shuffled across pairs (SP²DPO's random-β "
        "control; the same multiset, shuffled, is our reading of it)")
    beta: float = Field(0.1, gt=0.0, description="the global β (0.1 = the usual DPO default; MixDPO uses "
                        "0.01); the semantic β_i of the preference route are rescaled to this geometric mean "
                        "when normalise is on")
    # Ours: the geometric centre sqrt(0.025 · 0.4) = 0.1 is the usual DPO β, so s = 0.5 gives plain DPO.
    beta_min: float = Field(0.025, gt=0.0, description="β at signal 1: enforces the preference furthest")
    beta_max: float = Field(0.4, gt=0.0, description="β at signal 0: keeps the policy nearest the reference")
    normalise: bool = Field(True, description="rescale the annotated β_i so their geometric mean over the "
                            "preference-routed pairs is `beta` (one factor, not clipped: beta_min and beta_max "
                            "set the spread of β_i, not its bounds)")
    priors: CategoryPriors = Field(default_factory=CategoryPriors)
    # Ours: g(0..3) for magnitude none, minor, moderate, severe; linear between entries (ensemble means
    # are not integers). Concave, so a minor but real gap already counts.
    magnitude_gain: tuple[_Unit, _Unit, _Unit, _Unit] = Field(
        (0.0, 0.4, 0.7, 1.0), description="g(magnitude) at magnitudes 0, 1, 2, 3, non-decreasing")

    @model_validator(mode="after")
    def _check(self) -> BetaConfig:
        if self.beta_min >= self.beta_max:
            raise ValueError(f"beta.beta_min ({self.beta_min}) must be smaller than beta.beta_max "
                             f"({self.beta_max})")
        gain = self.magnitude_gain
        if any(b < a for a, b in zip(gain, gain[1:], strict=False)):
            raise ValueError(f"beta.magnitude_gain must be non-decreasing, got {list(gain)}")
        return self


class MislabeledConfig(_Strict):
    """What to do with pairs the teacher calls ``mislabeled`` with confidence above ``threshold`` (ours)."""

    threshold: float = Field(0.7, ge=0.0, description="confidence above which a mislabeled pair is acted on")
    action: Literal["drop", "flip", "beta_max"] = Field(
        "beta_max", description="drop: leave it out; flip: swap chosen and rejected; beta_max: keep it at "
        "signal 0, i.e. β_max before normalisation")

    @field_validator("threshold")
    @classmethod
    def _can_act(cls, threshold: float) -> float:
        if threshold >= 1:
            raise ValueError(f"got {threshold:g}; a pair is acted on when its confidence exceeds the threshold, and no "
                             "confidence exceeds 1: give a threshold below 1")
        return threshold


class MarginConfig(_Strict):
    source: Literal["none", "ratings", "teacher", "reference"] = Field(
        "none", description="ratings: score_chosen − score_rejected (MixDPO); teacher: magnitude × "
        "confidence, negative for mislabeled, 0 for no_clear_gap (ours); reference: the reference model's "
        "length-normalised log-prob margin (ours); none: no difficulty")


class RoutingConfig(_Strict):
    tau: float | None = Field(None, description="margin below τ → action (MixDPO: 0.5 on UltraFeedback)")
    quantile: float | None = Field(None, ge=0.0, lt=1.0,
                                   description="the lowest `quantile` fraction by margin → action (ours)")
    action: Literal["sft", "drop"] = Field(
        "sft", description="sft: the SFT loss on the chosen response (MixDPO); drop: the filtering baseline")


class CurriculumConfig(_Strict):
    kind: Literal["none", "easy_to_hard", "bucketed", "hard_to_easy", "random"] = Field(
        "none", description="none: file order; easy_to_hard: one global sort by margin, large first "
        "(MixDPO), ties by pair_id (ours); bucketed: K buckets easy→hard, seeded shuffle inside (ours); "
        "hard_to_easy, "
        "random: ablations (ours)")
    buckets: int = Field(4, ge=1, description="K, the number of buckets for `bucketed` (2 or more)")

    @field_validator("buckets")
    @classmethod
    def _several(cls, buckets: int) -> int:
        if buckets == 1:
            raise ValueError("got 1; one bucket is every pair shuffled, curriculum.kind random's order, not easy to "
                             "hard: give 2 or more")
        return buckets


class Schedule(_Strict):
    """Everything that decides a plan, validated at load time."""

    beta: BetaConfig = Field(default_factory=BetaConfig)
    mislabeled: MislabeledConfig = Field(default_factory=MislabeledConfig)
    margin: MarginConfig = Field(default_factory=MarginConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5,
                                   description="cDPO ε on preference-routed pairs (MixDPO: 0.1)")
    seed: int = Field(0, ge=0, description="seeds the random β control and the shuffled curricula")
    # where the user set beta.beta (a schedule file, or "" for overrides: a run arm's schedule), None where the
    # preset or --beta did: a plan in which that global β acts on no pair refuses it (build_plan)
    _beta_given_in: str | None = PrivateAttr(None)

    @property
    def beta_given_in(self) -> str | None:
        return self._beta_given_in

    def __eq__(self, other: object) -> bool:  # the settings alone: where beta.beta was given is no setting
        return isinstance(other, Schedule) and self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]  (mutable, as pydantic's models are)

    @model_validator(mode="after")
    def _check(self) -> Schedule:
        if self.margin.source == "none":
            if self.routing.tau is not None or self.routing.quantile is not None:
                raise ValueError("routing.tau / routing.quantile need a margin: set margin.source")
            if self.curriculum.kind in ("easy_to_hard", "bucketed", "hard_to_easy"):
                raise ValueError(f"curriculum.kind {self.curriculum.kind!r} orders by margin: "
                                 "set margin.source")
        return self

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def sha256(self) -> str:
        payload = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()


_MIXDPO: dict[str, Any] = {
    # MixDPO's published setting (arXiv 2602.00954): β = 0.01, ratings margin, ties (τ = 0.5) to SFT,
    # cDPO ε = 0.1 on the rest, one global sort from easy (large margin) to hard.
    "beta": {"kind": "global", "beta": 0.01},
    "margin": {"source": "ratings"},
    "routing": {"tau": 0.5, "action": "sft"},
    "label_smoothing": 0.1,
    "curriculum": {"kind": "easy_to_hard"},
}

PRESETS: dict[str, dict[str, Any]] = {
    "dpo": {},
    "sp2dpo": {"beta": {"kind": "semantic"}},
    "sp2dpo-random": {"beta": {"kind": "random"}},
    "mixdpo": _MIXDPO,
    # Ours: SP²DPO's β_i around MixDPO's global β = 0.01, with MixDPO's routing and curriculum.
    "sp2dpo+mixdpo": {**_MIXDPO, "beta": {"kind": "semantic", "beta": 0.01}},
}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` laid over ``base``; nested mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _lay(values: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """``layer`` laid over ``values``; a layer that sets one routing rule (``routing.tau`` or ``routing.quantile``)
    replaces the rule of the layers below it: ``routing: {quantile: 0.1}`` over ``mixdpo`` routes the lowest tenth
    by margin, not that and MixDPO's ties (either rule routes a pair: the two together route the larger of the two
    lowest sets, so the tenth would change nothing where ties are more). A layer that sets both keeps both."""
    routing = layer.get("routing")
    if isinstance(routing, dict) and isinstance(values.get("routing"), dict):
        rules = {"tau", "quantile"} & set(routing)
        if len(rules) == 1:
            values = deep_merge(values, {"routing": {({"tau", "quantile"} - rules).pop(): None}})
    return deep_merge(values, layer)


def resolve_schedule(preset: str, config_path: str | os.PathLike | None = None,
                     beta: float | None = None, overrides: dict[str, Any] | None = None) -> Schedule:
    """The schedule of ``preset``, overridden by the YAML file at ``config_path``, then by ``overrides`` (the
    same keys, e.g. from a run config), then by ``beta``; a routing rule given replaces the one below (:func:`_lay`).

    Unknown keys and out-of-range values raise :class:`~perpair.errors.InputError` naming the file (or
    the option) and the key.
    """
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    values = copy.deepcopy(PRESETS[preset])
    source = f"preset {preset}"
    given: list[tuple[dict[str, Any], str | None]] = []  # what the user wrote, and where: the preset's own keys aside
    if config_path is not None:
        in_file = load_yaml(config_path, "schedule")
        values = _lay(values, in_file)
        source = str(config_path)
        given.append((in_file, str(config_path)))
    if overrides:
        values = _lay(values, overrides)
        source = f"{source} with overrides"
        given.append((overrides, None))
    if beta is not None:
        if not math.isfinite(beta) or beta <= 0:
            raise InputError(f"the global β must be a positive number, got {beta}")
        values = deep_merge(values, {"beta": {"beta": beta}})
    try:
        schedule = Schedule.model_validate(values)
    except ValidationError as exc:
        raise InputError(format_validation_error(exc), file=source) from None
    for keys, where in given:
        if problem := unread_setting(schedule, keys):
            raise InputError(problem, file=where)
        if beta is None and isinstance(keys.get("beta"), dict) and "beta" in keys["beta"]:
            schedule._beta_given_in = where or ""
    return schedule


def unread_setting(schedule: Schedule, given: dict[str, Any]) -> str | None:
    """Why a key of ``given`` (a schedule file's or a run arm's keys, laid over a preset to make ``schedule``)
    would change nothing in the plan (None: each is read). Keys a preset sets are not the user's: they are not
    checked (MixDPO's ``routing.action`` stays, read or not, when a file sets ``routing.tau: null``)."""
    def keys(section: str) -> set[str]:
        value = given.get(section)
        return set(value) if isinstance(value, dict) else set()

    per_pair = sorted(keys("beta") & {"beta_min", "beta_max", "normalise", "priors", "magnitude_gain"})
    if per_pair and schedule.beta.kind == "global":
        return (f"beta.{per_pair[0]} shapes the per-pair β of beta.kind semantic or random, and this schedule's "
                f"beta.kind is global (one β for every pair): it would change nothing; drop it, or set beta.kind")
    mislabeled = sorted(keys("mislabeled"))
    if mislabeled and schedule.beta.kind == "global" and schedule.mislabeled.action == "beta_max":
        return (f"mislabeled.{mislabeled[0]} would change nothing: mislabeled.action beta_max moves a pair's β, and "
                "beta.kind global gives every pair one β; drop it, or set mislabeled.action drop or flip")
    if "action" in keys("routing") and schedule.routing.tau is None and schedule.routing.quantile is None:
        return ("routing.action says what routing.tau or routing.quantile do with the pairs they pick, and neither "
                "is set: it would change nothing; drop it, or set one of them")
    if "buckets" in keys("curriculum") and schedule.curriculum.kind != "bucketed":
        return (f"curriculum.buckets is read by curriculum.kind bucketed only, not {schedule.curriculum.kind!r}: it "
                "would change nothing; drop it")
    if "seed" in given and schedule.beta.kind != "random" and schedule.curriculum.kind not in ("random", "bucketed"):
        return (f"seed draws beta.kind random's β and curriculum.kind random's or bucketed's order, and this "
                f"schedule has none (beta.kind {schedule.beta.kind}, curriculum.kind {schedule.curriculum.kind}): "
                "it would change nothing; drop it")
    return None
