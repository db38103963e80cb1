"""``perpair bench controlled --sweep NAME``: the follow-up questions to the main table (issue 18).

- ``teacher-accuracy``: does per-pair β beat the tuned global β with a better teacher (0.6, 0.8, 0.95, an
  oracle; calibrated and overconfident)?
- ``systematic-noise``: a rater consistently wrong on one kind of prompt, beside independent flips of the
  same count; does acting on the teacher's ``mislabeled`` flag help there?
- ``mislabel``: the three ``mislabeled`` actions × β normalisation on/off, at β = 0.1 and at the tuned β.
- ``tuning``: what an SP²DPO user must tune to match the 6-run global-β sweep, and a rule that picks β
  from the reference's log-probs without training.

Every sweep runs in the main benchmark's task with its arms' machinery (:mod:`perpair.bench.controlled`):
per seed one reference, one set of noise-free pairs, and per noise condition the global-β sweep trained once
and shared by every teacher and arm of that condition (it does not read the annotations). Each arm's result
is compared with ``DPO best β`` on the same seed and condition (paired).
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

from perpair.bench import controlled as ctl
from perpair.bench import task
from perpair.bench.arms import Arm, sp2dpo_at
from perpair.plan.config import PRESETS, BetaConfig

SWEEPS = ("teacher-accuracy", "systematic-noise", "mislabel", "tuning")
# The flip rates each sweep runs at unless --noise says otherwise (systematic-noise sets its own noise).
SWEEP_NOISE = {"teacher-accuracy": (0.4,), "mislabel": (0.2, 0.4), "tuning": (0.0, 0.4)}
TEACHER_ACCURACIES = (0.6, 0.8, 0.95)
ORACLE = "oracle"
# The tuning rule's target (ours, fixed before any run): β · median |Δ_ref| = log 9 over the pairs the
# reference ranks against their label, i.e. a median such pair's gradient weight σ(−β·m) has fallen to 0.1
# once the policy has moved its log-ratio margin m far enough to just correct the reference.
RULE_TARGET = math.log(9)
RANGE_RATIOS = (4.0, 64.0)  # β_max / β_min tried beside the default 0.4 / 0.025 = 16
SYSTEMATIC_CATEGORY = ("format", 0.5)  # one category's labels at chance

_SP2 = PRESETS["sp2dpo"]["beta"]


@dataclass(frozen=True)
class Teacher:
    name: str
    accuracy: float | None  # None: the oracle (exact categories and magnitudes, confidence 1)
    calibration: str


def teachers(config: ctl.ControlledConfig, sweep: str) -> list[Teacher]:
    if sweep != "teacher-accuracy":
        return [Teacher(f"{config.teacher_accuracy:g} {config.teacher_calibration}", config.teacher_accuracy,
                        config.teacher_calibration)]
    # The oracle's confidence is 1, so calibrated and overconfident are the same teacher: run it once.
    return [Teacher(f"{a:g} {c}", a, c) for a in TEACHER_ACCURACIES for c in ("calibrated", "overconfident")] + [
        Teacher(ORACLE, None, "calibrated")]


def teacher_notes(teacher: Teacher, pairs: task.PairSet, seed: int) -> task.Annotations:
    """The teacher's annotations; every accuracy uses the same uniforms (the default teacher's stream), so a
    better teacher reads a superset of the pairs a worse one reads (common random numbers across teachers)."""
    if teacher.accuracy is None:
        draws = task.oracle_draws(len(pairs))
    else:
        draws = task.teacher_draws(np.random.default_rng([seed, 3]), len(pairs), teacher.accuracy)
    return task.annotate(pairs, draws, teacher.calibration)


def conditions(config: ctl.ControlledConfig, sweep: str, base: task.BasePairs) -> list[tuple[str, task.PairSet]]:
    """The noise conditions of a sweep: flip rates, or for ``systematic-noise`` the systematic flips beside
    independent flips of exactly the same count."""
    if sweep != "systematic-noise":
        return [(f"flip {level:g}", task.apply_noise(base, level)) for level in config.noise_levels]
    carry = task.carry_flips(base)
    category, rate = SYSTEMATIC_CATEGORY
    return [("independent", task.flip_pairs(base, task.matched_flips(base, int(carry.sum())))),
            ("carry additions", task.flip_pairs(base, carry)),
            (f"{category} at {rate:g}", task.flip_pairs(base, task.category_flips(base, category, rate)))]


def _sp2(name: str, beta: float, **beta_options: Any) -> Arm:
    return Arm(name, "sp2dpo", {"beta": {"beta": beta, **beta_options}})


def _with_action(arm: Arm, action: str) -> Arm:
    return Arm(arm.name, arm.preset, {**arm.overrides, "mislabeled": {"action": action}})


def fixed_arms(config: ctl.ControlledConfig, sweep: str, best: float) -> list[Arm]:
    """The arms of a sweep that do not depend on other arms' results (``tuning`` adds more, see ``_tuning``)."""
    default = config.beta
    if sweep == "teacher-accuracy":
        return [_sp2("SP²DPO", default), sp2dpo_at(best), Arm("random β @ best β", "sp2dpo-random",
                                                               {"beta": {"beta": best}})]
    if sweep == "systematic-noise":
        return [sp2dpo_at(best)] + [
            _with_action(_sp2(f"SP²DPO {a} flagged @ best β", best), a) for a in ("flip", "drop")] + [
            Arm(f"DPO {a} flagged @ best β", "dpo", {"beta": {"beta": best}, "mislabeled": {"action": a}})
            for a in ("flip", "drop")]
    if sweep == "mislabel":
        out = []
        for level, suffix in ((default, ""), (best, " @ best β")):
            # Normalisation off: the raw β_max^(1−s)·β_min^s, its range scaled so that its geometric centre is
            # the level (the default range 0.025–0.4 is centred on 0.1), as normalisation on would centre it.
            scale = level / math.sqrt(_sp2_default("beta_min") * _sp2_default("beta_max"))
            for action in ("beta_max", "drop", "flip"):
                out.append(_with_action(_sp2(f"{action} · norm on{suffix}", level), action))
                out.append(_with_action(_sp2(f"{action} · norm off{suffix}", level, normalise=False,
                                             beta_min=_sp2_default("beta_min") * scale,
                                             beta_max=_sp2_default("beta_max") * scale), action))
        return out
    if sweep == "tuning":
        return [_sp2(f"SP²DPO β={b:g}", b) for b in config.beta_sweep]
    raise ValueError(f"unknown sweep {sweep!r}; expected one of {', '.join(SWEEPS)}")


def _sp2_default(field: str) -> float:
    return float(getattr(BetaConfig(**_SP2), field))


def rule_beta(reference_margin: np.ndarray, target: float = RULE_TARGET) -> float:
    """β from the reference alone: ``target / median |Δ_ref|`` over the pairs the reference ranks against their
    label (Δ_ref = log π_ref(chosen) − log π_ref(rejected) < 0), i.e. the β at which just correcting the
    median such pair takes it to σ(target) of the way from loss log 2 to 0 (ours)."""
    margin = np.asarray(reference_margin, dtype=np.float64)
    against = -margin[margin < 0]
    if len(against) == 0:
        raise ValueError("the reference ranks every pair as labelled: the tuning rule has no pair to calibrate on")
    return float(target / np.median(against))


def _best_on_val(runs: dict[str, Any], names: list[str]) -> str:
    """The run with the best validation accuracy; ties go to the earlier name (the sweep's rule)."""
    return max(names, key=lambda n: (runs[n]["val"]["objective"], -names.index(n)))


def _tuning(config: ctl.ControlledConfig, setup: ctl.SeedSetup, level: ctl.Level, runs: dict[str, Any],
            best: float) -> dict[str, Any]:
    """SP²DPO tuned on its own β sweep, then its range at that level; and the no-training rule's β."""
    names = [f"SP²DPO β={b:g}" for b in config.beta_sweep]
    chosen = _best_on_val(runs, names)
    level_beta = config.beta_sweep[names.index(chosen)]
    runs["SP²DPO tuned"] = {**runs[chosen], "chosen": chosen}
    ranged = [chosen]
    for ratio in RANGE_RATIOS:
        name = f"SP²DPO tuned, range ×{ratio:g}"
        # Same geometric centre as the default range; with normalisation on only the ratio matters.
        centre = math.sqrt(_sp2_default("beta_min") * _sp2_default("beta_max"))
        arm = _sp2(name, level_beta, beta_min=centre / math.sqrt(ratio), beta_max=centre * math.sqrt(ratio))
        runs[name] = ctl.train_arm(config, setup, arm, level)
        ranged.append(name)
    picked = _best_on_val(runs, ranged)
    runs["SP²DPO tuned + range"] = {**runs[picked], "chosen": picked}
    ref = level.ref_logps
    beta_rule = rule_beta((ref.chosen - ref.rejected).numpy())
    runs["DPO @ rule β"] = ctl.train_arm(config, setup, Arm("DPO @ rule β", "dpo", {"beta": {"beta": beta_rule}}),
                                         level)
    runs["SP²DPO @ rule β"] = ctl.train_arm(config, setup, _sp2("SP²DPO @ rule β", beta_rule), level)
    return {"sweep_beta": best, "sp2dpo_beta": level_beta, "rule_beta": beta_rule}


def run_sweep_seed(config: ctl.ControlledConfig, sweep: str, seed: int, workdir: Path,
                   progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """One seed of a sweep: ``{"reference", "conditions": {cond: {"data", "best_beta", "variants": {teacher:
    {"data", "runs"}}}}}``; each variant's runs include the condition's global-β sweep."""
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        setup = ctl.prepare_seed(config, seed, progress)
        out: dict[str, Any] = {"reference": setup.reference_result(), "conditions": {}}
        for c_index, (cond, pairs) in enumerate(conditions(config, sweep, setup.base)):
            variants: dict[str, Any] = {}
            dpo: dict[str, Any] | None = None
            best = math.nan
            for t_index, teacher in enumerate(teachers(config, sweep)):
                notes = teacher_notes(teacher, pairs, seed)
                level = ctl.make_level(setup, workdir / f"{sweep}_s{seed}_c{c_index}_t{t_index}", pairs, notes)
                if dpo is None:  # global β reads no annotation: train the sweep once per condition
                    dpo, best = ctl.dpo_sweep(config, setup, level)
                runs = dict(dpo)
                for arm in fixed_arms(config, sweep, best):
                    runs[arm.name] = ctl.train_arm(config, setup, arm, level)
                data = ctl.level_summary(pairs, notes)
                if sweep == "tuning":
                    data |= _tuning(config, setup, level, runs, best)
                variants[teacher.name] = {"data": data, "runs": runs}
            out["conditions"][cond] = {"best_beta": best, "variants": variants}
            progress(f"{sweep} seed {seed}, {cond}: best DPO β={best:g}, objective "
                     f"{dpo[ctl.BEST_DPO]['test']['objective']:.3f}")  # type: ignore[index]
        setup.reference.load_state_dict(setup.state)
        return out
    finally:
        torch.set_num_threads(previous)


def aggregate_sweep(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per condition, teacher and arm: test objective and arithmetic accuracy (mean, 95% t-interval over
    seeds) and their paired differences to ``DPO best β``; the data summaries averaged over seeds."""
    out: dict[str, Any] = {}
    first = per_seed[0]["conditions"]
    for cond in first:
        out[cond] = {}
        for variant, cell in first[cond]["variants"].items():
            def test(seed: dict[str, Any], arm: str, v: str = variant, c: str = cond) -> dict[str, float]:
                return seed["conditions"][c]["variants"][v]["runs"][arm]["test"]

            arms: dict[str, Any] = {}
            for arm in cell["runs"]:
                entry: dict[str, Any] = {}
                for metric in ("objective", "arithmetic"):
                    values = [test(s, arm)[metric] for s in per_seed]
                    best = [test(s, ctl.BEST_DPO)[metric] for s in per_seed]
                    entry[metric] = ctl.interval(values)
                    entry[f"{metric}_vs_best"] = ctl.interval(list(np.subtract(values, best)))
                groups = [s["conditions"][cond]["variants"][variant]["runs"][arm].get("beta_by_truth")
                          for s in per_seed]
                if all(groups):
                    entry["beta_by_truth"] = {g: _mean_or_none([x[g] for x in groups]) for g in groups[0]}
                arms[arm] = entry
            data = [s["conditions"][cond]["variants"][variant]["data"] for s in per_seed]
            out[cond][variant] = {"arms": arms, "data": {k: float(np.mean([d[k] for d in data])) for k in data[0]}}
    return out


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def paired(per_seed: list[dict[str, Any]], cond: str, variant: str, arm: str, other: str) -> dict[str, float]:
    """``arm`` minus ``other`` in test objective accuracy, paired by seed."""
    def value(seed: dict[str, Any], name: str) -> float:
        return seed["conditions"][cond]["variants"][variant]["runs"][name]["test"]["objective"]

    return ctl.interval([value(s, arm) - value(s, other) for s in per_seed])


def run_sweep(config: ctl.ControlledConfig, sweep: str, out_dir: str | Path,
              progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run one sweep, add its section to ``results.json`` and ``table.md`` in ``out_dir`` (other sections
    stay), write its plot; return the section (with ``files``)."""
    if sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; expected one of {', '.join(SWEEPS)}")
    from perpair.bench.report import check_out
    from perpair.bench.sweep_report import write_sweep

    check_out(Path(out_dir), sweep=True)
    started, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="perpair-sweep-") as tmp:
        per_seed = [run_sweep_seed(config, sweep, seed, Path(tmp), progress) for seed in range(config.seeds)]
    section = {"config": config.model_dump(mode="json"), "per_seed": per_seed, "aggregate": aggregate_sweep(per_seed),
               "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}
    section["files"] = write_sweep(sweep, section, Path(out_dir))
    return section
