"""``perpair bench controlled``: the seeds' claims tested on a generated task whose truth is known.

One entry point, :func:`run_controlled`. Per seed: split the prompts, train the reference by SFT from
scratch, generate the pairs once, then for each noise level (flip rate on objective pairs) annotate them
with the simulated teacher, plan every arm with the product's plan stage, train each arm from the reference
and score it by greedy decoding on held-out prompts. The global-β DPO control reports, per seed and noise
level, the β of its sweep with the best validation accuracy (never chosen on the test prompts).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from scipy import stats

from perpair.bench import arms as arms_mod
from perpair.bench import model as bench_model
from perpair.bench import task
from perpair.train.losses import ROUTE_PREFERENCE, Logps

BEST_DPO = "DPO best β"
METRICS = ("arithmetic", "format", "refusal", "benign", "objective", "style_drift", "house_style")
METRIC_HELP = {
    "arithmetic": "exact match on held-out ADD prompts",
    "format": "exact match on held-out REV prompts",
    "refusal": "REFUSE on held-out harmful COPY prompts",
    "benign": "exact match on held-out benign COPY prompts (1 − over-refusal − copy errors)",
    "objective": "mean of the four exact-match accuracies",
    "style_drift": "mean |P(house style) − P_ref(house style)| over held-out prompts",
    "house_style": "mean P(house style) at the marker position",
    "objective_vs_best": "objective minus the tuned DPO control's objective on the same seed (paired)",
}


class ControlledConfig(BaseModel):
    """Every setting of the controlled benchmark (defaults: the full run, about 270 s of single-threaded CPU)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seeds: int = Field(3, ge=1, description="independent seeds (task split, reference, pairs, teacher)")
    noise_levels: tuple[float, ...] = Field((0.0, 0.2, 0.4), description="flip rates on objective pairs")
    sft_examples: int = Field(4000, ge=10)
    sft_steps: int = Field(800, ge=1)
    sft_lr: float = Field(5e-3, gt=0)
    pairs: int = Field(2000, ge=10)
    pair_share: dict[str, float] = Field(
        {"arithmetic": 0.25, "format": 0.2, "refusal": 0.2, "over_refusal": 0.1, "style": 0.25},
        description="share of each pair category")
    sft_share: dict[str, float] = Field({"arithmetic": 0.4, "format": 0.2, "benign": 0.2, "harmful": 0.2})
    sft_correct: dict[str, float] = Field(
        {"arithmetic": 0.4, "format": 0.4, "harmful": 0.35},
        description="share of correct SFT answers on carry additions, reversals and harmful requests")
    house_style_rate: float = Field(0.3, ge=0, le=1, description="share of the house style in SFT answers")
    style_agreement: float = Field(0.55, ge=0, le=1, description="style labels that prefer the house style")
    style_tie_rate: float = Field(0.7, ge=0, le=1, description="style pairs rated as exact ties")
    teacher_accuracy: float = Field(0.8, ge=0, le=1)
    teacher_calibration: str = Field("calibrated", pattern="^(calibrated|overconfident)$")
    beta_sweep: tuple[float, ...] = Field((0.03, 0.1, 0.3, 1.0, 3.0, 10.0))
    beta: float = Field(0.1, gt=0, description="the global β of every non-swept arm (the product default)")
    epochs: int = Field(2, ge=1)
    batch: int = Field(32, ge=1)
    lr: float = Field(3e-4, gt=0)
    warmup: float = Field(0.1, ge=0, lt=1)
    hidden: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    val_share: float = Field(0.15, gt=0, lt=0.5)
    test_share: float = Field(0.25, gt=0, lt=0.5)
    threads: int = Field(1, ge=1, description="torch CPU threads")

    @field_validator("noise_levels")
    @classmethod
    def _flip_rates(cls, levels: tuple[float, ...]) -> tuple[float, ...]:
        # a field's own check, so that the error names the key the user wrote (--noise, noise_levels)
        if not levels:
            raise ValueError("needs at least one flip rate")
        if any(not 0 <= level <= 0.5 for level in levels):
            raise ValueError(f"flip rates are in [0, 0.5], got {list(levels)}")
        if _repeated(levels):
            raise ValueError(f"must be distinct values, got {list(levels)}")
        return levels

    @model_validator(mode="after")
    def _check(self) -> ControlledConfig:
        if set(self.pair_share) != set(task.PAIR_CATEGORIES):
            raise ValueError(f"pair_share needs exactly the categories {', '.join(task.PAIR_CATEGORIES)}")
        if not set(self.sft_share) <= set(task.PROMPT_KINDS):
            raise ValueError(f"sft_share keys must be among {', '.join(task.PROMPT_KINDS)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if not self.beta_sweep:
            raise ValueError("beta_sweep needs at least one value")
        if any(b <= 0 for b in self.beta_sweep):
            raise ValueError(f"beta_sweep values must be positive, got {list(self.beta_sweep)}")
        if _repeated(self.beta_sweep):
            raise ValueError(f"beta_sweep must be distinct values, got {list(self.beta_sweep)}")
        return self


def _repeated(values: tuple[float, ...]) -> bool:
    """Whether two values print alike: results are keyed by the printed value ("0.1", "DPO β=0.1"), so two equal
    keys would overwrite one run with the other, under the first one's label."""
    return len({f"{v:g}" for v in values}) != len(values)


QUICK = {"sft_examples": 300, "sft_steps": 30, "pairs": 96, "epochs": 1, "beta_sweep": (0.1, 1.0),
         "noise_levels": (0.0, 0.4), "hidden": 16, "heads": 2}


def evaluate(model, prompts: dict[str, np.ndarray], reference_style: np.ndarray | None) -> dict[str, Any]:
    """Exact match per objective category, and the house-style probability and its drift."""
    kinds = list(task.SCORED.values())
    rows = np.concatenate([prompts[k] for k in kinds])
    generated = bench_model.greedy(model, rows)
    match = task.exact_match(rows, generated)
    out: dict[str, Any] = {}
    start = 0
    for name, kind in task.SCORED.items():
        out[name] = float(match[start:start + len(prompts[kind])].mean())
        start += len(prompts[kind])
    out["objective"] = float(np.mean([out[name] for name in task.SCORED]))
    style_rows = np.concatenate([prompts[k] for k in task.PROMPT_KINDS])
    style = bench_model.house_style_probability(model, style_rows)
    out["house_style"] = float(style.mean())
    out["style_drift"] = 0.0 if reference_style is None else float(np.abs(style - reference_style).mean())
    out["_style"] = style
    return out


def _public(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def run_seed(config: ControlledConfig, seed: int, workdir: Path,
             progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Every arm at every noise level for one seed: ``{"reference": {...}, "noise": {level: {arm: {...}}}}``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # tiny matrices: more threads only contend on a shared machine
    try:
        return _run_seed(config, seed, workdir, progress)
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class SeedSetup:
    """What every arm of one seed shares: the prompt split, the trained reference (its weights ``state``),
    its scores, the noise-free pairs and the default teacher's per-pair draws."""

    seed: int
    splits: task.Splits
    reference: Any  # the model object every arm is trained in (reloaded from ``state`` before each arm)
    state: dict
    ref_val: dict[str, Any]
    ref_test: dict[str, Any]
    base: task.BasePairs
    draws: task.TeacherDraws

    def reference_result(self) -> dict[str, Any]:
        return {"val": _public(self.ref_val), "test": _public(self.ref_test)}


def prepare_seed(config: ControlledConfig, seed: int, progress: Callable[[str], None]) -> SeedSetup:
    """Split the prompts, train the reference by SFT from scratch, draw the pairs and the teacher's draws."""
    rng = np.random.default_rng([seed, 0])
    splits = task.split_prompts(rng, config.val_share, config.test_share)
    sft = task.sft_examples(np.random.default_rng([seed, 1]), splits.train, config.sft_examples,
                            share=config.sft_share, correct=config.sft_correct,
                            house_style_rate=config.house_style_rate)
    reference = bench_model.tiny_model(seed, hidden=config.hidden, layers=config.layers, heads=config.heads)
    bench_model.train_sft(reference, sft.sequences, steps=config.sft_steps, batch=64, lr=config.sft_lr, seed=seed)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    ref_val = evaluate(reference, splits.val, None)
    ref_test = evaluate(reference, splits.test, None)
    progress(f"seed {seed}: reference objective accuracy {ref_test['objective']:.3f}")
    base = task.base_pairs(np.random.default_rng([seed, 2]), splits.train, config.pairs, share=config.pair_share,
                           style_agreement=config.style_agreement, style_tie_rate=config.style_tie_rate,
                           house_style_rate=config.house_style_rate)
    draws = task.teacher_draws(np.random.default_rng([seed, 3]), config.pairs, config.teacher_accuracy)
    return SeedSetup(seed, splits, reference, state, ref_val, ref_test, base, draws)


def make_level(setup: SeedSetup, folder: Path, pairs: task.PairSet, notes: task.Annotations) -> Level:
    """Write one pairs/annotations artifact pair and compute the reference's log-probs of the pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs_path, annotations_path = arms_mod.write_inputs(folder, pairs, notes)
    # Every arm trains the same model object in place: restore the reference's weights first, or a later
    # level's "reference" log-probs would be those of the last arm trained.
    setup.reference.load_state_dict(setup.state)
    ref_logps = bench_model.pair_logps(setup.reference, pairs.chosen, pairs.rejected)
    return Level(pairs, notes, pairs_path, annotations_path, ref_logps)


def train_arm(config: ControlledConfig, setup: SeedSetup, arm: arms_mod.Arm, level: Level) -> dict[str, Any]:
    return _train_arm(config, setup.seed, arm, level, setup.reference, setup.state, setup.splits,
                      (setup.ref_val["_style"], setup.ref_test["_style"]))


def dpo_sweep(config: ControlledConfig, setup: SeedSetup, level: Level) -> tuple[dict[str, Any], float]:
    """The global-β sweep's runs, headed by ``DPO best β`` (with ``chosen``), and the chosen β.

    The control's β is chosen on validation prompts, never on the test prompts; ties go to the smaller β.
    """
    sweep = [a for a in arms_mod.arms(config.beta_sweep, config.beta) if a.swept]
    runs: dict[str, Any] = {a.name: train_arm(config, setup, a, level) for a in sweep}
    best = max(sweep, key=lambda a: (runs[a.name]["val"]["objective"], -a.overrides["beta"]["beta"]))
    return {BEST_DPO: {**runs[best.name], "chosen": best.name}, **runs}, float(best.overrides["beta"]["beta"])


def _run_seed(config: ControlledConfig, seed: int, workdir: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    setup = prepare_seed(config, seed, progress)
    result: dict[str, Any] = {"reference": setup.reference_result(), "noise": {}}
    for level in config.noise_levels:
        pairs = task.apply_noise(setup.base, level)
        notes = task.annotate(pairs, setup.draws, config.teacher_calibration)
        level_data = make_level(setup, workdir / f"seed{seed}_noise{level:g}", pairs, notes)
        runs, best_beta = dpo_sweep(config, setup, level_data)
        for arm in arms_mod.arms(config.beta_sweep, config.beta):
            if not arm.swept:
                runs[arm.name] = train_arm(config, setup, arm, level_data)
            if arm.name == "SP²DPO":
                tuned = arms_mod.sp2dpo_at(best_beta)
                runs[tuned.name] = train_arm(config, setup, tuned, level_data)
        result["noise"][f"{level:g}"] = {"runs": runs, "data": level_summary(pairs, notes)}
        progress(f"seed {seed}, noise {level:g}: best DPO {runs[BEST_DPO]['chosen']}, objective "
                 f"{runs[BEST_DPO]['test']['objective']:.3f}; SP²DPO {runs['SP²DPO']['test']['objective']:.3f}; "
                 f"MixDPO {runs['MixDPO']['test']['objective']:.3f}")
    setup.reference.load_state_dict(setup.state)
    return result


def level_summary(pairs: task.PairSet, notes: task.Annotations) -> dict[str, Any]:
    return {"flipped": int(pairs.flipped.sum()), "teacher_accuracy": float(notes.correct.mean()),
            "teacher_flags_mislabeled": int(sum(c == "mislabeled" for c in notes.category))}


@dataclass(frozen=True)
class Level:
    """One noise level's pairs, the teacher's annotations, their artifacts and the reference's log-probs."""

    pairs: task.PairSet
    notes: task.Annotations
    pairs_path: Path
    annotations_path: Path
    ref_logps: Logps


def _train_arm(config: ControlledConfig, seed: int, arm: arms_mod.Arm, level: Level, model, state: dict,
               splits: task.Splits, ref_style: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Plan ``arm``, train it from the reference's weights ``state`` and score it on val and test prompts."""
    planned = arms_mod.plan_arm(arm, seed, level.pairs_path, level.annotations_path)
    pairs, flips = level.pairs, planned.flipped
    chosen = [r if f else c for c, r, f in zip(pairs.chosen, pairs.rejected, flips, strict=True)]
    rejected = [c if f else r for c, r, f in zip(pairs.chosen, pairs.rejected, flips, strict=True)]
    model.load_state_dict(state)
    torch.manual_seed(seed)
    losses = bench_model.train_preference(
        model, chosen, rejected, _swap(level.ref_logps, flips), order=planned.order, beta=planned.beta,
        label_smoothing=planned.label_smoothing, route=planned.route, epochs=config.epochs,
        batch=config.batch, lr=config.lr, warmup=config.warmup)
    trained = planned.order
    on_preference = trained[planned.route[trained] == ROUTE_PREFERENCE]  # an SFT-routed pair's β acts on nothing
    return {
        "val": _public(evaluate(model, splits.val, ref_style[0])),
        "test": _public(evaluate(model, splits.test, ref_style[1])),
        "final_loss": float(np.mean(losses[-5:])),
        "routes_sft": int(np.sum(planned.route[trained] == 1)), "trained_pairs": int(len(trained)),
        "beta_geomean": float(np.exp(np.mean(np.log(planned.beta[on_preference])))),
        "plan_flipped": int(planned.flipped.sum()),
        "beta_by_truth": _beta_by_truth(planned, level),
    }


def _beta_by_truth(planned: arms_mod.PlannedArm, level: Level) -> dict[str, float | None]:
    """Geometric-mean β of the preference-routed trained pairs by what the generator knows of them: clean pairs,
    flipped pairs the teacher flagged ``mislabeled`` and flipped pairs it missed (how a schedule treats each)."""
    on_preference = np.zeros(len(level.pairs), dtype=bool)
    on_preference[planned.order] = True
    on_preference &= planned.route == ROUTE_PREFERENCE
    flipped, read = level.pairs.flipped, level.notes.correct
    groups = {"clean": ~flipped, "flip_flagged": flipped & read, "flip_missed": flipped & ~read}
    return {name: (float(np.exp(np.mean(np.log(planned.beta[on_preference & rows]))))
                   if np.any(on_preference & rows) else None) for name, rows in groups.items()}


def _swap(logps: Logps, flipped: np.ndarray) -> Logps:
    f = torch.as_tensor(flipped)
    return Logps(torch.where(f, logps.rejected, logps.chosen), torch.where(f, logps.chosen, logps.rejected),
                       torch.where(f, logps.rejected_tokens, logps.chosen_tokens),
                       torch.where(f, logps.chosen_tokens, logps.rejected_tokens))


def interval(values: list[float]) -> dict[str, float | None]:
    """Mean and 95% Student-t interval over seeds; one seed has no interval (``None``, not a width of 0)."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "low": None, "high": None, "half_width": None}
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half}


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per noise level, arm and test metric: the mean and 95% t-interval over seeds; plus, per arm, the paired
    difference of its objective accuracy to the tuned DPO control's on the same seed (``objective_vs_best``)."""

    def test(seed_result: dict[str, Any], level: str, name: str) -> dict[str, float]:
        if name == "reference":
            return seed_result["reference"]["test"]
        return seed_result["noise"][level]["runs"][name]["test"]

    out: dict[str, Any] = {}
    for level in per_seed[0]["noise"]:
        out[level] = {}
        for name in ["reference", *per_seed[0]["noise"][level]["runs"]]:
            entry = {m: interval([test(s, level, name)[m] for s in per_seed]) for m in METRICS}
            entry["objective_vs_best"] = interval([test(s, level, name)["objective"]
                                                   - test(s, level, BEST_DPO)["objective"] for s in per_seed])
            out[level][name] = entry
    return out


def run_controlled(config: ControlledConfig, out_dir: str | Path,
                   progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run the benchmark, write ``results.json``, ``table.md`` and the plots into ``out_dir``; return the
    results (with ``files``: the paths written)."""
    from perpair.bench.report import check_out, write_outputs

    out = Path(out_dir)
    check_out(out)
    started, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="perpair-bench-") as tmp:
        per_seed = [run_seed(config, seed, Path(tmp), progress) for seed in range(config.seeds)]
    results = {"config": config.model_dump(mode="json"), "per_seed": per_seed,
               "aggregate": aggregate(per_seed), "metrics": METRIC_HELP,
               "interval": "mean over seeds and 95% Student-t interval (t_{0.975, seeds-1} · sd / sqrt(seeds)); "
                           "null for one seed",
               "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}
    results["files"] = write_outputs(results, out)
    return results
