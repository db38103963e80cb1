"""The controlled benchmark: the generator's truth, its noise and teacher rates, what each arm is planned to
train, determinism, and one tiny end-to-end run of ``perpair bench controlled``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import run_cli
from perpair.bench import arms as arms_mod
from perpair.bench import sweeps, task
from perpair.bench.controlled import ControlledConfig, interval, run_seed
from perpair.errors import InputError, PerpairError
from perpair.plan import beta as beta_math
from perpair.train.losses import ROUTE_PREFERENCE, ROUTE_SFT

SHARE = {"arithmetic": 0.25, "format": 0.2, "refusal": 0.2, "over_refusal": 0.1, "style": 0.25}


@pytest.fixture(scope="module")
def splits():
    return task.split_prompts(np.random.default_rng(0), 0.15, 0.25)


def test_oracle_scores_one_and_the_typical_error_zero(splits):
    for kind in task.PROMPT_KINDS:
        prompts = np.concatenate([splits.train[kind], splits.val[kind], splits.test[kind]])
        oracle = [task.correct_answer(p) + [task.STYLE_B, task.EOS] for p in prompts]
        wrong = [task.typical_error(p) + [task.STYLE_A, task.EOS] for p in prompts]
        assert task.exact_match(prompts, oracle).mean() == 1.0
        assert task.exact_match(prompts, wrong).mean() == 0.0


def test_answers_by_hand():
    add = np.array([task.TOKEN[t] for t in ("ADD", "4", "7", "5")])  # 47 + 5
    assert task.text(task.correct_answer(add)) == "5 2"
    assert task.text(task.typical_error(add)) == "4 2"  # the forgotten carry
    rev = np.array([task.TOKEN[t] for t in ("REV", "a", "b", "c")])
    assert task.text(task.correct_answer(rev)) == "c b a" and task.text(task.typical_error(rev)) == "a b c"
    harmful = np.array([task.TOKEN[t] for t in ("COPY", "a", "z", "c")])
    assert task.text(task.correct_answer(harmful)) == "REFUSE" and task.text(task.typical_error(harmful)) == "a z c"
    benign = np.array([task.TOKEN[t] for t in ("COPY", "a", "b", "a")])
    assert task.text(task.correct_answer(benign)) == "a b a" and task.text(task.typical_error(benign)) == "REFUSE"
    assert task.content_of([task.TOKEN["5"], task.TOKEN["2"], task.STYLE_A, task.EOS]) == [task.TOKEN["5"],
                                                                                             task.TOKEN["2"]]


def test_splits_are_disjoint_and_cover_every_prompt(splits):
    for kind in task.PROMPT_KINDS:
        parts = [{tuple(r) for r in s[kind]} for s in (splits.train, splits.val, splits.test)]
        assert sum(map(len, parts)) == len(task.prompt_universe(kind)) == len(set.union(*parts))
    assert len(task.prompt_universe("arithmetic")) == 900 and len(task.prompt_universe("benign")) == 512


def test_each_pair_differs_in_its_one_category(splits):
    base = task.base_pairs(np.random.default_rng(1), splits.train, 3000, share=SHARE, style_agreement=0.55,
                           style_tie_rate=0.7, house_style_rate=0.3)
    for i in range(len(base.category)):
        good, bad = base.good[i][task.PROMPT_LEN:], base.bad[i][task.PROMPT_LEN:]
        assert task.content_of(good) == task.correct_answer(base.prompt[i])
        if base.category[i] == "style":
            assert good[:-2] == bad[:-2] and {good[-2], bad[-2]} == {task.STYLE_A, task.STYLE_B}
        else:
            assert good[-2] == bad[-2] and task.content_of(bad) != task.content_of(good)
            kind = task.SCORED["refusal" if base.category[i] == "refusal" else
                              "benign" if base.category[i] == "over_refusal" else base.category[i]]
            assert tuple(base.prompt[i]) in {tuple(r) for r in splits.train[kind]}


def test_noise_rates_match_the_config(splits):
    n = 20000
    base = task.base_pairs(np.random.default_rng(2), splits.train, n, share=SHARE, style_agreement=0.55,
                           style_tie_rate=0.7, house_style_rate=0.3)
    style = base.category == "style"
    assert abs(style.mean() - 0.25) < 0.015
    agree = np.array([g[-2] == task.STYLE_A for g in base.good])[style]
    assert abs(agree.mean() - 0.55) < 0.02
    marker = np.array([g[-2] == task.STYLE_A for g in base.good])[~style]  # objective pairs: the reference's rate
    assert abs(marker.mean() - 0.3) < 0.015
    low, high = task.apply_noise(base, 0.2), task.apply_noise(base, 0.4)
    assert not low.flipped[style].any()
    assert abs(low.flipped[~style].mean() - 0.2) < 0.015 and abs(high.flipped[~style].mean() - 0.4) < 0.015
    assert np.all(high.flipped[low.flipped])  # flipped sets nest as the rate grows
    margin = high.score_chosen - high.score_rejected
    assert abs(np.mean(margin[style] == 0) - 0.7) < 0.02  # style pairs are mostly ties
    assert margin[high.flipped].max() <= 2 and margin[~high.flipped & ~style].min() >= 1
    i = int(np.flatnonzero(high.flipped)[0])
    assert high.chosen[i] == base.bad[i] and high.rejected[i] == base.good[i]


@pytest.mark.parametrize("accuracy", [0.6, 0.8, 0.95])
def test_teacher_accuracy_and_calibration_match_the_config(splits, accuracy):
    n = 20000
    base = task.base_pairs(np.random.default_rng(3), splits.train, n, share=SHARE, style_agreement=0.55,
                           style_tie_rate=0.7, house_style_rate=0.3)
    pairs = task.apply_noise(base, 0.3)
    draws = task.teacher_draws(np.random.default_rng(4), n, accuracy)
    calibrated = task.annotate(pairs, draws, "calibrated")
    truth = np.array(["mislabeled" if f else task.ANNOTATION[c]
                      for c, f in zip(pairs.category, pairs.flipped, strict=True)])
    said = np.array(calibrated.category)
    assert np.array_equal(calibrated.correct, said == truth)
    assert abs(calibrated.correct.mean() - accuracy) < 0.015
    for low in (0.5, 0.7, 0.9):  # calibrated: accuracy within a confidence bin ≈ its confidence
        inside = (calibrated.confidence >= low) & (calibrated.confidence < low + 0.1)
        if inside.sum() > 500:
            assert abs(calibrated.correct[inside].mean() - calibrated.confidence[inside].mean()) < 0.04
    over = task.annotate(pairs, draws, "overconfident")
    assert over.confidence.mean() > calibrated.confidence.mean() + 0.03
    assert np.array_equal(over.correct, calibrated.correct)  # same reading, only the reported confidence moves
    missed = pairs.flipped & ~calibrated.correct  # a missed flip is read as its underlying category
    assert all(said[i] == task.ANNOTATION[pairs.category[i]] for i in np.flatnonzero(missed))


@pytest.fixture(scope="module")
def planned(splits, tmp_path_factory):
    n = 600
    base = task.base_pairs(np.random.default_rng(5), splits.train, n, share=SHARE, style_agreement=0.55,
                           style_tie_rate=0.7, house_style_rate=0.3)
    pairs = task.apply_noise(base, 0.3)
    notes = task.annotate(pairs, task.teacher_draws(np.random.default_rng(6), n, 0.8), "calibrated")
    pairs_path, annotations_path = arms_mod.write_inputs(tmp_path_factory.mktemp("plan"), pairs, notes)
    arms = {a.name: a for a in arms_mod.arms((0.1, 1.0), 0.1)}
    return pairs, notes, {name: arms_mod.plan_arm(arm, 0, pairs_path, annotations_path) for name, arm in arms.items()}


def test_dpo_arms_train_every_pair_in_file_order_at_one_beta(planned):
    pairs, _, plans = planned
    for name, value in (("DPO β=0.1", 0.1), ("DPO β=1", 1.0)):
        plan = plans[name]
        assert np.all(plan.beta == value) and np.all(plan.route == ROUTE_PREFERENCE)
        assert np.array_equal(plan.order, np.arange(len(pairs))) and np.all(plan.label_smoothing == 0)


def test_sp2dpo_beta_is_the_plan_formula_and_random_beta_shuffles_it(planned):
    _, notes, plans = planned
    sp2, rnd = plans["SP²DPO"], plans["random β"]
    priors = {"safety": 1.0, "factuality": 0.9, "instruction_following": 0.8, "helpfulness": 0.6, "style": 0.3,
              "no_clear_gap": 0.0, "mislabeled": 0.0}
    category = np.array(notes.category)
    signal = beta_math.signal_strength(np.array([priors[c] for c in category]),
                                       beta_math.magnitude_gain(notes.magnitude, (0.0, 0.4, 0.7, 1.0)),
                                       notes.confidence)
    signal[(category == "mislabeled") & (notes.confidence > 0.7)] = 0.0  # preset action beta_max
    raw = beta_math.interpolate_beta(signal, 0.025, 0.4)
    expected = raw * 0.1 / beta_math.geometric_mean(raw)
    np.testing.assert_allclose(sp2.beta, expected, rtol=1e-12)
    assert math.isclose(beta_math.geometric_mean(sp2.beta), 0.1, rel_tol=1e-9)
    assert np.array_equal(np.sort(rnd.beta), np.sort(sp2.beta)) and not np.array_equal(rnd.beta, sp2.beta)
    # objective pairs the teacher reads right get a smaller β than style pairs
    assert np.median(sp2.beta[category == "safety"]) < np.median(sp2.beta[category == "style"])


def test_mixdpo_arms_route_ties_and_order_easy_to_hard(planned):
    pairs, _, plans = planned
    margin = pairs.score_chosen - pairs.score_rejected
    full, curriculum, routing = plans["MixDPO"], plans["MixDPO curriculum"], plans["MixDPO routing"]
    assert np.array_equal(full.route == ROUTE_SFT, margin < 0.5) and np.array_equal(routing.route, full.route)
    assert np.all(curriculum.route == ROUTE_PREFERENCE)
    for plan in (full, curriculum):
        assert np.all(np.diff(margin[plan.order]) <= 0)  # one global sort, large margin first
    assert np.array_equal(routing.order, np.arange(len(pairs)))
    assert np.all(full.label_smoothing[full.route == ROUTE_PREFERENCE] == 0.1)
    assert np.all(full.label_smoothing[full.route == ROUTE_SFT] == 0.0)
    assert np.all(full.beta == 0.1)  # the preset's β = 0.01 is replaced by the common global β
    both = plans["SP²DPO+MixDPO"]
    assert np.array_equal(both.route, full.route) and np.array_equal(both.order, full.order)
    assert math.isclose(beta_math.geometric_mean(both.beta[both.route == ROUTE_PREFERENCE]), 0.1, rel_tol=1e-9)


def test_interval_is_the_student_t_interval():
    result = interval([1.0, 2.0, 3.0])
    assert result["mean"] == 2.0
    assert math.isclose(result["half_width"], 4.302652729911275 / math.sqrt(3), rel_tol=1e-9)
    # One seed has no interval: it was reported as ± 0.000, as if the seed's number were exact.
    assert interval([0.5]) == {"mean": 0.5, "low": None, "high": None, "half_width": None}


def test_config_rejects_impossible_settings():
    with pytest.raises(ValueError, match="pair_share"):
        ControlledConfig(pair_share={"arithmetic": 1.0})
    with pytest.raises(ValueError, match="multiple of heads"):
        ControlledConfig(hidden=30, heads=4)
    with pytest.raises(ValueError, match="flip rates"):
        ControlledConfig(noise_levels=(0.2, 0.7))
    # Results are keyed by the printed value: --noise 0.1 --noise 0.1 ran twice into one column.
    with pytest.raises(ValueError, match=r"noise_levels\n.*must be distinct values, got \[0.1, 0.1\]"):
        ControlledConfig(noise_levels=(0.1, 0.1))
    with pytest.raises(ValueError, match=r"noise_levels\n.*must be distinct"):
        ControlledConfig(noise_levels=(0.1, 0.1000001))  # both "0.1"
    with pytest.raises(ValueError, match="beta_sweep must be distinct"):
        ControlledConfig(beta_sweep=(0.1, 1.0, 0.1))


TINY = {"sft_examples": 100, "sft_steps": 3, "pairs": 40, "epochs": 1, "beta_sweep": (0.1,),
        "noise_levels": (0.2,), "hidden": 16, "heads": 2}


def test_a_seed_is_deterministic(tmp_path):
    config = ControlledConfig(**TINY)
    first = run_seed(config, 0, tmp_path / "a")
    second = run_seed(config, 0, tmp_path / "b")
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    runs = first["noise"]["0.2"]["runs"]
    assert runs["DPO best β"]["chosen"] == "DPO β=0.1"
    assert runs["MixDPO"]["routes_sft"] > 0 and runs["SP²DPO"]["routes_sft"] == 0


def test_every_level_uses_the_reference_log_probs_even_after_an_arm_trained(tmp_path):
    from perpair.bench import controlled as ctl

    config = ControlledConfig(**TINY)
    setup = ctl.prepare_seed(config, 0, lambda _: None)
    pairs = task.apply_noise(setup.base, 0.2)
    notes = task.annotate(pairs, setup.draws, "calibrated")
    first = ctl.make_level(setup, tmp_path / "a", pairs, notes)
    ctl.train_arm(config, setup, arms_mod.arms((1.0,), 0.1)[0], first)  # trains the shared model in place
    second = ctl.make_level(setup, tmp_path / "b", pairs, notes)
    assert torch.equal(first.ref_logps.chosen, second.ref_logps.chosen)
    assert torch.equal(first.ref_logps.rejected, second.ref_logps.rejected)


@pytest.mark.slow
def test_cli_writes_the_table_json_and_plots(tmp_path):
    out = tmp_path / "bench"
    result = run_cli("bench", "controlled", "--seeds", "2", "--quick", "-o", str(out))
    table = (out / "table.md").read_text(encoding="utf-8")
    assert table.strip() in result.stdout
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert data["config"]["seeds"] == 2 and len(data["per_seed"]) == 2
    assert set(data["aggregate"]) == {"0", "0.4"}
    arms = data["aggregate"]["0.4"]
    for name in ("reference", "DPO best β", "SP²DPO", "random β", "MixDPO curriculum", "MixDPO routing", "MixDPO",
                 "SP²DPO+MixDPO"):
        entry = arms[name]["objective"]
        assert entry["low"] <= entry["mean"] <= entry["high"]
        clean = data["aggregate"]["0"][name]["objective"]
        assert (f"| {name} | {clean['mean']:.3f} ± {clean['half_width']:.3f} | "
                f"{entry['mean']:.3f} ± {entry['half_width']:.3f} |") in table
        seeds = [s["noise"]["0.4"]["runs"][name]["test"]["objective"] if name != "reference"
                 else s["reference"]["test"]["objective"] for s in data["per_seed"]]
        assert math.isclose(entry["mean"], float(np.mean(seeds)))
        best = [s["noise"]["0.4"]["runs"]["DPO best β"]["test"]["objective"] for s in data["per_seed"]]
        paired = arms[name]["objective_vs_best"]["mean"]
        assert math.isclose(paired, float(np.mean(np.subtract(seeds, best))), abs_tol=1e-12)
    for name in ("accuracy_by_category", "accuracy_vs_noise", "style_drift"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert data["files"][name] in result.stdout


def test_cli_reports_bad_options(tmp_path):
    result = run_cli("bench", "controlled", "--quick", "--teacher-calibration", "sometimes", "-o",
                     str(tmp_path / "x"), check=False)
    assert result.returncode == 2 and "--teacher-calibration: " in result.stderr  # named by its option
    # --noise too (it was named noise_levels, the config's field, which no option of the command is called)
    for noise, message in ((("0.7",), "flip rates are in [0, 0.5], got [0.7]"),
                           (("0.2", "0.2"), "must be distinct values, got [0.2, 0.2]")):
        result = run_cli("bench", "controlled", "--quick", *(a for n in noise for a in ("--noise", n)), "-o",
                         str(tmp_path / "x"), check=False)
        assert result.returncode == 2 and result.stderr == f"error: invalid options: --noise: {message}\n"
    assert not (tmp_path / "x").exists()


# --- the sweeps (issue 18) -----------------------------------------------------------------------------------

def _base(splits, n: int, seed: int):
    return task.base_pairs(np.random.default_rng(seed), splits.train, n, share=SHARE, style_agreement=0.55,
                           style_tie_rate=0.7, house_style_rate=0.3)


def _truth(pairs) -> np.ndarray:
    return np.array(["mislabeled" if f else task.ANNOTATION[c] for c, f in zip(pairs.category, pairs.flipped,
                                                                             strict=True)])


def test_oracle_teacher_is_the_generator_truth_and_better_teachers_read_more(splits):
    pairs = task.apply_noise(_base(splits, 3000, 7), 0.4)
    by_name = {t.name: t for t in sweeps.teachers(ControlledConfig(), "teacher-accuracy")}
    assert list(by_name) == ["0.6 calibrated", "0.6 overconfident", "0.8 calibrated", "0.8 overconfident",
                             "0.95 calibrated", "0.95 overconfident", "oracle"]
    oracle = sweeps.teacher_notes(by_name["oracle"], pairs, seed=0)
    said = np.array(oracle.category)
    assert np.mean(said == _truth(pairs)) == 1.0  # measured against the pairs' truth, not the teacher's own flag
    assert np.array_equal(said == "mislabeled", pairs.flipped) and pairs.flipped.sum() > 300
    assert np.array_equal(oracle.magnitude, pairs.magnitude) and np.all(oracle.confidence == 1.0)
    read = {}
    for name in ("0.6 calibrated", "0.8 calibrated", "0.95 calibrated"):
        notes = sweeps.teacher_notes(by_name[name], pairs, seed=0)
        read[name] = np.array(notes.category) == _truth(pairs)
        assert abs(read[name].mean() - float(name.split()[0])) < 0.02
    # common random numbers: a better teacher reads every pair a worse one reads
    assert np.all(read["0.8 calibrated"][read["0.6 calibrated"]])
    assert np.all(read["0.95 calibrated"][read["0.8 calibrated"]])


def test_systematic_noise_flips_exactly_the_intended_pairs(splits):
    base = _base(splits, 3000, 8)
    conds = dict(sweeps.conditions(ControlledConfig(), "systematic-noise", base))
    assert list(conds) == ["independent", "carry additions", "format at 0.5"]
    digits = [task.text(p).split() for p in base.prompt]
    carry = np.array([c == "arithmetic" and int(d[2]) + int(d[3]) >= 10 for c, d in zip(base.category, digits,
                                                                                      strict=True)])
    assert np.array_equal(conds["carry additions"].flipped, carry) and carry.sum() > 200
    for i in np.flatnonzero(carry)[:50]:  # the rater prefers the carry-forgotten sum
        a, b = int(digits[i][1] + digits[i][2]), int(digits[i][3])
        assert task.text(task.content_of(conds["carry additions"].chosen[i][task.PROMPT_LEN:])) == " ".join(
            f"{a + b - 10:02d}")
    independent = conds["independent"].flipped
    assert independent.sum() == carry.sum() and not independent[base.category == "style"].any()
    assert len(set(base.category[independent])) == 4  # spread over every objective category
    objective = base.category != "style"  # the lowest flip draws: apply_noise's set at a matched rate
    assert base.flip_draw[independent].max() < base.flip_draw[objective & ~independent].min()
    fmt = conds["format at 0.5"].flipped
    assert set(base.category[fmt]) == {"format"}
    assert abs(fmt.sum() / np.sum(base.category == "format") - 0.5) < 0.05


def test_mislabel_arms_drop_flip_and_normalise_as_configured(splits, tmp_path):
    n = 600
    pairs = task.apply_noise(_base(splits, n, 9), 0.4)
    notes = task.annotate(pairs, task.teacher_draws(np.random.default_rng(10), n, 0.8), "calibrated")
    pairs_path, annotations_path = arms_mod.write_inputs(tmp_path, pairs, notes)
    flagged = (np.array(notes.category) == "mislabeled") & (notes.confidence > 0.7)  # the preset's threshold
    assert flagged.sum() > 50
    arms = {a.name: a for a in sweeps.fixed_arms(ControlledConfig(), "mislabel", best=3.0)}
    plan = {name: arms_mod.plan_arm(arm, 0, pairs_path, annotations_path) for name, arm in arms.items()}
    for suffix, level in (("", 0.1), (" @ best β", 3.0)):
        drop = plan[f"drop · norm on{suffix}"]
        assert set(drop.order) == set(np.flatnonzero(~flagged))  # exactly the flagged pairs leave training
        flip = plan[f"flip · norm on{suffix}"]
        assert np.array_equal(flip.flipped, flagged) and len(flip.order) == n
        for action in ("beta_max", "drop", "flip"):
            on, off = plan[f"{action} · norm on{suffix}"], plan[f"{action} · norm off{suffix}"]
            trained = on.order
            assert math.isclose(beta_math.geometric_mean(on.beta[trained]), level, rel_tol=1e-9)
            assert not np.any(off.flipped ^ on.flipped) and np.array_equal(off.order, on.order)
            # off: the raw β_max^(1−s)·β_min^s of the range 0.025–0.4 scaled to centre on the level, so a pair
            # flagged mislabeled (signal 0) that stays in training sits at exactly the scaled β_max
            scale = level / 0.1
            if action != "drop":
                np.testing.assert_allclose(off.beta[flagged], 0.4 * scale, rtol=1e-12)
            ratio = off.beta[trained] / on.beta[trained]
            assert np.ptp(ratio) < 1e-9 * ratio.max()  # normalisation only rescales the same β_i
            assert np.all(off.beta[trained] <= 0.4 * scale + 1e-12) and np.all(off.beta[trained] >= 0.025 * scale)


def test_rule_beta_by_hand():
    margins = np.array([-2.0, -1.0, -4.0, 3.0, 0.5, 0.0])  # against their label: 2, 1, 4 → median 2
    assert math.isclose(sweeps.rule_beta(margins), math.log(9) / 2.0, rel_tol=1e-12)
    assert math.isclose(sweeps.rule_beta(margins * 4), math.log(9) / 8.0, rel_tol=1e-12)
    with pytest.raises(ValueError, match="no pair"):
        sweeps.rule_beta(np.array([0.0, 1.0]))


SWEEP_SEEDS = {"teacher-accuracy": 1, "systematic-noise": 1, "mislabel": 1, "tuning": 2}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Every sweep at a tiny size into one folder, counting the arms each trains."""
    from perpair.bench import controlled as ctl

    out = tmp_path_factory.mktemp("sweeps")
    trained: dict[str, list[str]] = {}
    real = ctl.train_arm
    sections = {}
    with pytest.MonkeyPatch.context() as patch:
        for name, seeds in SWEEP_SEEDS.items():
            def counting(config, setup, arm, level, name=name):
                trained.setdefault(name, []).append(arm.name)
                return real(config, setup, arm, level)

            patch.setattr(ctl, "train_arm", counting)
            beta_sweep = (0.1, 1.0) if name == "tuning" else (0.1,)
            config = ControlledConfig(**{**TINY, "noise_levels": (0.4,), "beta_sweep": beta_sweep, "seeds": seeds})
            sections[name] = sweeps.run_sweep(config, name, out)
    return out, sections, trained


def test_each_sweep_trains_its_arms_and_shares_the_dpo_sweep(swept):
    _, sections, trained = swept
    # teacher-accuracy: the global-β sweep once per condition, then 3 arms for each of the 7 teachers
    assert trained["teacher-accuracy"] == ["DPO β=0.1"] + ["SP²DPO", "SP²DPO @ best β", "random β @ best β"] * 7
    assert len(trained["systematic-noise"]) == 3 * 6
    assert trained["mislabel"].count("DPO β=0.1") == 1 and len(trained["mislabel"]) == 1 + 12
    assert len(trained["tuning"]) == 2 * (2 + 2 + 2 + 2)  # seeds × (DPO sweep, SP²DPO sweep, 2 ranges, 2 rules)
    variants = sections["teacher-accuracy"]["per_seed"][0]["conditions"]["flip 0.4"]["variants"]
    assert len(variants) == 7 and all(v["runs"]["DPO best β"] == variants["oracle"]["runs"]["DPO best β"]
                                      for v in variants.values())
    assert variants["oracle"]["data"]["teacher_accuracy"] == 1.0


def test_sweep_tables_hold_the_paired_differences(swept):
    out, sections, _ = swept
    table = (out / "table.md").read_text(encoding="utf-8")
    headers = [line for line in table.splitlines() if line.startswith("## Sweep: ")]
    assert headers == [f"## Sweep: {name}" for name in sweeps.SWEEPS]  # every section kept, in a fixed order
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(data["sweeps"]) == set(sweeps.SWEEPS)
    tuning = sections["tuning"]
    for arm in ("SP²DPO tuned", "SP²DPO tuned + range", "DPO @ rule β", "SP²DPO @ rule β", "DPO β=1"):
        diffs = [s["conditions"]["flip 0.4"]["variants"]["0.8 calibrated"]["runs"][arm]["test"]["objective"]
                 - s["conditions"]["flip 0.4"]["variants"]["0.8 calibrated"]["runs"]["DPO best β"]["test"]["objective"]
                 for s in tuning["per_seed"]]
        entry = interval(diffs)
        assert f"| {arm} | {entry['mean']:+.3f} ± {entry['half_width']:.3f} |" in table
    for seed in tuning["per_seed"]:
        runs = seed["conditions"]["flip 0.4"]["variants"]["0.8 calibrated"]["runs"]
        val = [runs[f"SP²DPO β={b}"]["val"]["objective"] for b in ("0.1", "1")]
        assert runs["SP²DPO tuned"]["chosen"] == f"SP²DPO β={('0.1', '1')[int(val[1] > val[0])]}"
    for name in sweeps.SWEEPS:
        assert (out / f"sweep_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    teacher = data["sweeps"]["teacher-accuracy"]["table"]
    assert teacher in table
    for variant in ("0.6 calibrated", "0.95 overconfident", "oracle"):
        assert f"| {variant} | " in teacher
    assert "| arm | independent | carry additions | format at 0.5 |" in table


def test_sweep_aggregate_pairs_each_arm_with_the_tuned_dpo_by_hand():
    from perpair.bench.sweep_report import sweep_markdown

    def run(objective, arithmetic):
        return {"test": {"objective": objective, "arithmetic": arithmetic}}

    data = {"flipped": 10, "teacher_accuracy": 0.8, "teacher_flags_mislabeled": 9}
    per_seed = [{"conditions": {"carry additions": {"best_beta": b, "variants": {"0.8 calibrated": {
        "data": data, "runs": {"DPO best β": run(best, 0.5), "DPO β=1": run(0.9, 0.9), "arm A": run(a, 0.6)}}}}}}
        for b, best, a in ((1.0, 0.4, 0.5), (3.0, 0.5, 0.7))]
    aggregate = sweeps.aggregate_sweep(per_seed)
    entry = aggregate["carry additions"]["0.8 calibrated"]["arms"]["arm A"]
    # differences 0.1 and 0.2 (paired by seed): mean 0.15, half-width t(0.975, 1) · sd / √2 = 12.7062 · 0.05
    assert math.isclose(entry["objective_vs_best"]["mean"], 0.15, rel_tol=1e-12)
    assert math.isclose(entry["objective_vs_best"]["half_width"], 12.706204736174707 * 0.05, rel_tol=1e-9)
    assert math.isclose(entry["arithmetic_vs_best"]["mean"], 0.1, rel_tol=1e-12)
    table = sweep_markdown("systematic-noise", {"config": {"seeds": 2}, "per_seed": per_seed, "aggregate": aggregate})
    assert "| arm A | +0.150 ± 0.635 |" in table and "| DPO best β (absolute) | 0.450 ± 0.635 |" in table
    assert "carry additions: β=1, β=3." in table


def test_a_sweep_table_is_byte_identical_on_a_rerun(swept, tmp_path):
    from perpair.bench.sweep_report import sweep_markdown

    _, sections, _ = swept
    sweeps.run_sweep(ControlledConfig(**{**TINY, "noise_levels": (0.4,), "seeds": 1}), "mislabel", tmp_path)
    assert (tmp_path / "table.md").read_text(encoding="utf-8") == sweep_markdown("mislabel", sections["mislabel"])


def test_a_sweep_refuses_an_output_folder_it_cannot_add_to(tmp_path):
    (tmp_path / "results.json").write_text("not json", encoding="utf-8")
    with pytest.raises(InputError, match="results.json"):
        sweeps.run_sweep(ControlledConfig(**TINY), "mislabel", tmp_path)
    assert not (tmp_path / "table.md").exists()


@pytest.mark.slow
def test_cli_runs_a_sweep_and_refuses_bad_sweep_options(tmp_path):
    out = tmp_path / "bench"
    result = run_cli("bench", "controlled", "--quick", "--seeds", "1", "--sweep", "tuning", "--noise", "0.4", "-o",
                     str(out))
    table = (out / "table.md").read_text(encoding="utf-8")
    assert table.startswith("## Sweep: tuning") and table.strip() in result.stdout
    assert "| DPO @ rule β |" in table and (out / "sweep_tuning.png").exists()
    bad = run_cli("bench", "controlled", "--quick", "--sweep", "systematic-noise", "--noise", "0.2", "-o",
                  str(tmp_path / "x"), check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_an_empty_output_path_is_refused_not_the_current_folder(tmp_path, monkeypatch):
    """-o '' was Path('') = the current folder: results.json, table.md and the plots were written there."""
    monkeypatch.chdir(tmp_path)
    result = run_cli("bench", "controlled", "--quick", "--seeds", "1", "-o", "", check=False)
    assert result.returncode == 2 and result.stderr == "error: -o/--out: an empty path; give the path to write\n"
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_under_a_file_is_refused_before_any_training(tmp_path, monkeypatch):
    """-o FILE/sub passed the check, trained every arm, then failed to write: the whole run was lost."""
    from perpair.bench import controlled as ctl

    monkeypatch.setattr(ctl, "run_seed", lambda *a, **k: pytest.fail("trained before refusing --out"))
    (tmp_path / "a_file").write_text("x", encoding="utf-8")
    with pytest.raises(PerpairError, match=r"^--out .*a_file/sub: .*a_file is a file, not a folder$"):
        ctl.run_controlled(ControlledConfig(**TINY), tmp_path / "a_file" / "sub")
    with pytest.raises(PerpairError, match="is a file, not a folder"):
        sweeps.run_sweep(ControlledConfig(**TINY), "mislabel", tmp_path / "a_file" / "sub")


def test_another_commands_results_file_is_refused_not_overwritten(tmp_path, monkeypatch):
    """perpair eval's results.json in --out was replaced by the benchmark's (or got a sweeps section added)."""
    from perpair.bench import controlled as ctl
    from perpair.bench.report import check_out

    monkeypatch.setattr(ctl, "run_seed", lambda *a, **k: pytest.fail("trained before refusing --out"))
    theirs = '{"model": "mine", "win_rate": 0.5}'
    (tmp_path / "results.json").write_text(theirs, encoding="utf-8")
    with pytest.raises(InputError, match=r"not a results file of perpair bench controlled \(key\(s\) model, win_rate"):
        ctl.run_controlled(ControlledConfig(**TINY), tmp_path)
    with pytest.raises(InputError, match="not a results file of perpair bench controlled"):
        sweeps.run_sweep(ControlledConfig(**TINY), "mislabel", tmp_path)
    assert (tmp_path / "results.json").read_text(encoding="utf-8") == theirs
    (tmp_path / "results.json").write_text('{"config": {}}', encoding="utf-8")  # only keys the benchmark writes
    with pytest.raises(InputError, match="neither a main run nor a sweep"):
        check_out(tmp_path)
    from perpair.bench.report import RESULTS_KEYS

    for accepted in ({}, {"sweeps": {}}, dict.fromkeys(RESULTS_KEYS, 0)):  # the benchmark's own sections
        (tmp_path / "results.json").write_text(json.dumps(accepted), encoding="utf-8")
        check_out(tmp_path)


def test_a_results_file_whose_kept_sections_are_damaged_is_refused_before_training(tmp_path, monkeypatch):
    """The benchmark's own results.json with a section of another shape (edited by hand): the sections a run keeps
    are rendered into table.md with its own, and one that could not be was a traceback after the training (a
    sweep's results lost). Refused before any training; the section the run replaces is not looked at."""
    from perpair.bench import controlled as ctl

    monkeypatch.setattr(ctl, "run_seed", lambda *a, **k: pytest.fail("trained before refusing --out"))
    monkeypatch.setattr(sweeps, "run_sweep_seed", lambda *a, **k: pytest.fail("trained before refusing --out"))
    path = tmp_path / "results.json"
    for payload, run in (({"sweeps": {"mislabel": 3}}, lambda: ctl.run_controlled(ControlledConfig(**TINY), tmp_path)),
                         ({"sweeps": ["mislabel"]}, lambda: sweeps.run_sweep(ControlledConfig(**TINY), "mislabel",
                                                                             tmp_path)),
                         ({"aggregate": 0, "config": {}}, lambda: sweeps.run_sweep(ControlledConfig(**TINY),
                                                                                    "mislabel", tmp_path))):
        path.write_text(json.dumps(payload), encoding="utf-8")
        with pytest.raises(InputError, match="sections this run keeps cannot be read") as info:
            run()
        assert info.value.file == str(path) and json.loads(path.read_text(encoding="utf-8")) == payload
    from perpair.bench.report import check_out

    path.write_text(json.dumps({"aggregate": 0, "config": {}}), encoding="utf-8")
    check_out(tmp_path)  # a main run replaces that section


def test_the_dpo_sweep_breaks_a_validation_tie_towards_the_smaller_beta_in_any_order(monkeypatch):
    """The tie went to the first β of ``beta_sweep``, the larger one when a caller listed it first."""
    from perpair.bench import controlled as ctl

    monkeypatch.setattr(ctl, "train_arm", lambda config, setup, arm, level: {"val": {"objective": 0.5}})
    runs, best = ctl.dpo_sweep(ControlledConfig(**{**TINY, "beta_sweep": (1.0, 0.1, 3.0)}), None, None)
    assert best == 0.1 and runs["DPO best β"]["chosen"] == "DPO β=0.1"


def test_every_arm_trains_from_the_reference_whatever_trained_before(tmp_path):
    """The shared model object is trained in place by every arm: an arm's result must not depend on which arm
    trained before it (the README's past bug, from the training side)."""
    from perpair.bench import controlled as ctl

    config = ControlledConfig(**TINY)
    setup = ctl.prepare_seed(config, 0, lambda _: None)
    pairs = task.apply_noise(setup.base, 0.2)
    level = ctl.make_level(setup, tmp_path, pairs, task.annotate(pairs, setup.draws, "calibrated"))
    every = {a.name: a for a in arms_mod.arms((1.0,), 0.1)}
    alone = ctl.train_arm(config, setup, every["SP²DPO"], level)
    ctl.train_arm(config, setup, every["MixDPO"], level)
    after = ctl.train_arm(config, setup, every["SP²DPO"], level)
    assert json.dumps(alone, sort_keys=True) == json.dumps(after, sort_keys=True)


def test_beta_geomean_is_over_the_pairs_whose_beta_acts(tmp_path):
    """It averaged the β of SFT-routed pairs too, so SP²DPO+MixDPO's normalised β_i (geometric mean 0.1 over the
    preference pairs, as ``perpair run``'s table reports it) showed another value."""
    from perpair.bench import controlled as ctl

    config = ControlledConfig(**TINY)
    setup = ctl.prepare_seed(config, 0, lambda _: None)
    pairs = task.apply_noise(setup.base, 0.2)
    level = ctl.make_level(setup, tmp_path, pairs, task.annotate(pairs, setup.draws, "calibrated"))
    arm = {a.name: a for a in arms_mod.arms((1.0,), 0.1)}["SP²DPO+MixDPO"]
    result = ctl.train_arm(config, setup, arm, level)
    assert result["routes_sft"] > 0
    assert math.isclose(result["beta_geomean"], 0.1, rel_tol=1e-9)


def test_a_one_seed_table_shows_no_interval_rather_than_zero_width():
    from perpair.bench.controlled import METRICS, aggregate
    from perpair.bench.report import table_markdown

    metrics = dict.fromkeys(METRICS, 0.5)
    per_seed = [{"reference": {"test": metrics}, "noise": {"0": {"runs": {
        "DPO best β": {"test": metrics, "chosen": "DPO β=1"}, "SP²DPO": {"test": {**metrics, "objective": 0.25}}}}}}]
    table = table_markdown({"config": {"seeds": 1}, "per_seed": per_seed, "aggregate": aggregate(per_seed)})
    assert "| SP²DPO | 0.500 ± n/a | 0.500 ± n/a | 0.500 ± n/a | 0.500 ± n/a | 0.250 ± n/a |" in table
    assert "| SP²DPO | -0.250 ± n/a |" in table and "0.000" not in table.replace("+0.000 ± n/a", "")


def test_the_noise_plot_joins_the_flip_rates_in_increasing_order(tmp_path, monkeypatch):
    """--noise 0.4 --noise 0 --noise 0.2 drew each arm's line from 0.4 back to 0 and out to 0.2."""
    import matplotlib.axes

    from perpair.bench import report
    from perpair.bench.controlled import METRICS, aggregate

    drawn = []
    real = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, *a, **k: drawn.append((k.get("label"), list(x), list(y)))
                        or real(self, x, y, *a, **k))
    per_seed = [{"reference": {"test": dict.fromkeys(METRICS, 0.5)}, "noise": {
        level: {"runs": {"DPO best β": {"test": {**dict.fromkeys(METRICS, 0.5), "objective": 1 - float(level)}}}}
        for level in ("0.4", "0", "0.2")}} for _ in range(2)]
    files = {name: tmp_path / f"{name}.png" for name in ("accuracy_by_category", "accuracy_vs_noise", "style_drift")}
    report._plots({"aggregate": aggregate(per_seed)}, files)
    assert ("DPO best β", [0.0, 0.2, 0.4], [1.0, 0.8, 0.6]) in drawn
