"""``perpair run``: the whole job on a tiny random Llama (policy, local teacher and local judge), then the
skipping rules: an unchanged re-run does nothing, a changed arm re-runs only what depends on it, ``--from``
re-runs a stage and everything after it, a run killed mid-training resumes from its checkpoint, and one killed
mid-annotation or mid-evaluation keeps every answer (and judgment) it got."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from conftest import SHARED_DATA, UF_TRAIN, rewrite_weights, save_tiny_llama

AE = SHARED_DATA / "alpaca_eval"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


# An SP²DPO arm annotated by the tiny random model: it calls every pair no_clear_gap, whose prior 0 gives every
# pair one β, a plan refused as plain DPO; a prior above 0 lets its confidences tell the pairs apart.
SP2DPO_TINY_TEACHER = {"preset": "sp2dpo", "schedule": {"beta": {"priors": {"no_clear_gap": 0.5}}}}


def _config(tmp: Path, model: Path, **changes) -> dict:
    config = {
        "workdir": str(tmp / "work"),
        "model": str(model),
        "data": {"sources": [str(UF_TRAIN)], "limit": 24, "test_fraction": 0.25, "seed": 0},
        "annotate": {"teachers": ["ratings"]},  # β_i that differ: a tiny random local teacher tells no pair apart
        "train": {"batch_size": 4, "max_length": 96, "lr": 1e-3, "lr_schedule": "constant", "threads": 2,
                  "save_every": 1},
        "arms": {"dpo": {"preset": "dpo"}, "sp2dpo": {"preset": "sp2dpo"}, "mixdpo": {"preset": "mixdpo"}},
        "eval": {"preference": {"max_length": 96},
                 "alpaca_eval": {"judge": str(model), "limit": 2, "max_new_tokens": 4, "batch_size": 2,
                                 "offline": True, "reference": str(AE / "reference_outputs_gpt4_1106_preview.json.gz"),
                                 "judge_prompt": str(AE / "judge_prompt_alpaca_eval_clf.txt"),
                                 "difficulty": str(AE / "instruction_difficulty_reconstructed.csv"),
                                 "data_dir": str(AE)}},  # the official rows the reference file is checked against
    }
    for key, value in changes.items():
        config[key] = value
    return config


def _run(config: dict, from_stage: str | None = None):
    from perpair.pipeline import RunConfig, run

    lines: list[str] = []
    result = run(RunConfig.model_validate(config), from_stage=from_stage, log=lines.append)
    return result, lines


def test_run_all_stages_then_skip_rerun_and_from(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _config(tmp_path, tiny)
    policy = tmp_path / "policy"  # the trained model's own copy: its weights are rewritten below
    shutil.copytree(tiny, policy)
    config["model"] = str(policy)
    first, lines = _run(config)
    # the sample's one field no reader takes, named in the prepare stage's log
    assert f"  {UF_TRAIN}: fields not read: source_index × 24 (in each pair's meta only; scores, a system message " \
           "or a prompt under other names: data.score_chosen_col/score_rejected_col, data.system_col, " \
           "data.prompt_col)" in lines, lines[:6]
    work = tmp_path / "work"
    arms = ["dpo", "sp2dpo", "mixdpo"]
    expected = {"prepare", "annotate", *(f"{s}.{a}" for s in ("plan", "train") for a in arms),
                *(f"eval.{a}.preference" for a in arms), *(f"eval.{a}.alpaca_eval" for a in [*arms, "base"])}
    assert set(first.ran) == expected and not first.skipped

    # one epoch of the pairs each plan trains (MixDPO routes the ties to SFT but trains them too) whose prompts fit
    # max_length (at 96 tokens, most do not): no pair trained twice
    for arm in arms:
        lines = (work / "arms" / arm / "train" / "metrics.jsonl").read_text().splitlines()
        row = next(r for r in first.rows if r["arm"] == arm)
        skipped = json.loads((work / "arms" / arm / "train" / "summary.json").read_text())["skipped_long_prompts"]
        fit = row["pairs_preference"] + row["pairs_sft"] - skipped
        assert skipped > 0 and len(lines) == row["steps"] == -(-fit // 4)
        assert sum(json.loads(line)["pairs"] for line in lines) == row["steps"] * 4 == row["pairs_trained"] < fit + 4
        assert row["heldout_accuracy"] is not None and row["alpaca_wr"] is not None
        scored = json.loads((work / "arms" / arm / "eval" / "preference" / "results.json").read_text())
        assert row["heldout_n"] == scored[0]["n_total"] > 0
        assert row["alpaca_n"] == 2  # eval.alpaca_eval.limit
    mix = next(r for r in first.rows if r["arm"] == "mixdpo")
    assert mix["pairs_sft"] > 0 and mix["beta_geomean"] == pytest.approx(0.01)
    assert [r["arm"] for r in first.rows] == [*arms, "base"]
    report = first.report.read_text()
    assert "sp2dpo/plan_report/index.html" in report and (work / "report" / "curves.png").is_file()
    plan_page = (work / "arms" / "sp2dpo" / "plan_report" / "index.html").read_text()
    assert "perpair run (arm sp2dpo, preset sp2dpo)" in plan_page and "no pairs file given" not in plan_page
    described = json.loads((work / "report" / "comparison.json").read_text())
    # the table's rows, each with the notes about it (the tiny judge's instructions without a judgment, the LC's)
    assert [{k: v for k, v in r.items() if k not in ("alpaca_n_unjudged", "notes")} for r in described] == \
        json.loads(json.dumps(first.rows))
    assert all(isinstance(r["notes"], list) for r in described)
    markdown = (work / "report" / "comparison.md").read_text()
    assert all(note.split(": ", 1)[1] in markdown for r in described for note in r["notes"])
    # the local judge's prompts begin alike in the four evaluations: one stored beginning per instruction
    assert len(list((work / "judge_prefixes").glob("*.safetensors"))) == 2

    # unchanged: every stage skipped, nothing written again
    model_mtime = (work / "arms" / "dpo" / "train" / "model" / "model.safetensors").stat().st_mtime_ns
    second, _ = _run(config)
    assert not second.ran and set(second.skipped) == expected
    assert second.rows == first.rows
    assert (work / "arms" / "dpo" / "train" / "model" / "model.safetensors").stat().st_mtime_ns == model_mtime

    # one arm's train setting changed: only that arm's training and evaluation run again
    config["arms"]["dpo"]["train"] = {"lr": 5e-4}
    third, _ = _run(config)
    assert set(third.ran) == {"train.dpo", "eval.dpo.preference", "eval.dpo.alpaca_eval"}

    # --from plan: plans, training and evaluation again; prepared pairs and annotations kept
    fourth, _ = _run(config, from_stage="plan")
    assert {"prepare", "annotate"} == set(fourth.skipped) and "plan.sp2dpo" in fourth.ran

    # the initial model's weights rewritten in place (same files, same sizes): trained and evaluated again
    rewrite_weights(policy)
    fifth, _ = _run(config)
    assert {"prepare", "annotate", "plan.dpo", "plan.sp2dpo", "plan.mixdpo"} == set(fifth.skipped)
    assert {f"train.{a}" for a in arms} | {f"eval.{a}.alpaca_eval" for a in [*arms, "base"]} <= set(fifth.ran)


def test_stages_side_by_side_give_the_same_results(tmp_path, tiny, monkeypatch):
    """workers: 2 runs the arms (and annotation beside the reference pass and the base model's evaluation) in two
    worker processes: every stage runs once, the results are those of the run in order (one thread each, so the
    same bits), each stage's progress is logged under its name, and the arms read the reference log-probs the
    reference pass computed (no training computes any)."""
    import perpair.pipeline.workers as workers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(workers, "available_cores", lambda: 2)  # one thread per worker on any machine
    arms = {"dpo": {"preset": "dpo"}, "mixdpo": {"preset": "mixdpo"}}
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the run in order evaluates in this process
    try:
        for count in (1, 2):
            config = _config(tmp_path / f"workers{count}", tiny, arms=arms)
            config["train"]["threads"] = 1
            config["workers"] = count
            results[count] = _run(config)
    finally:
        torch.set_num_threads(threads)
    (in_order, _), (side_by_side, lines) = results[1], results[2]
    assert set(side_by_side.ran) == set(in_order.ran) and len(side_by_side.ran) == len(set(side_by_side.ran))
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]  # noqa: E731
    assert timeless(side_by_side.rows) == timeless(in_order.rows)
    assert [r["arm"] for r in side_by_side.rows] == ["dpo", "mixdpo", "base"]
    assert any(line.startswith("[train.mixdpo] step ") for line in lines)
    assert any(line.startswith("[reference] training pairs: ") for line in lines)
    for arm in arms:
        summary = json.loads((tmp_path / "workers2" / "work" / "arms" / arm / "train" / "summary.json").read_text())
        assert summary["reference_pairs_computed"] == 0 and summary["reference_pairs_from_first_step"] == 0

    # unchanged, again: every stage skipped, and the reference pass finds every pair without loading a model
    import perpair.train.loop as loop
    import perpair.train.setup as setup

    for module in (setup, loop):
        monkeypatch.setattr(module, "load_model", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    config = _config(tmp_path / "workers1", tiny, arms=arms)
    config["train"]["threads"] = 1
    again, lines = _run(config)
    assert not again.ran and timeless(again.rows) == timeless(in_order.rows)
    assert "[reference] running (log-probs every arm reads)" in lines


def test_an_arms_two_evaluations_run_side_by_side(tmp_path, tiny):
    """With several workers an arm's held-out evaluation and its AlpacaEval start together (both read only the
    trained model), so the last arm's do not run one after the other while the other workers wait: here each
    evaluation waits for the other to have started."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from perpair.pipeline import RunConfig
    from perpair.pipeline.run import _Job, validate

    config = RunConfig.model_validate(_config(tmp_path, tiny, arms={"dpo": {"preset": "dpo"}}, workers=2))
    job = _Job(config, tmp_path / "work", (), log=lambda line: None)
    both_started = threading.Barrier(2, timeout=30)
    started = []

    class Workers:  # the run's Workers, the stages' work left out: side() a thread, call() a stage
        def side(self, chain, *args):
            return pool.submit(chain, *args)

        def call(self, name, why, action, *args):
            started.append(name)
            both_started.wait()  # broken (an error) if the other evaluation only starts after this one
            folder = job.workdir / "arms" / "dpo" / "eval" / name.rsplit(".", 1)[1]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "results.json").write_text("{}")
            return {"name": name}, 0.0

    test = tmp_path / "test.parquet"
    test.write_bytes(b"held-out pairs")
    with ThreadPoolExecutor(4) as pool:
        job.workers = Workers()
        results = job.evaluate(validate(config), "dpo", {"model": str(tiny), "key": "trained"}, test)
    assert sorted(started) == ["eval.dpo.alpaca_eval", "eval.dpo.preference"]
    assert list(results) == ["preference", "alpaca_eval"]
    assert results["preference"]["name"] == "eval.dpo.preference"


def test_every_arm_is_scored_on_the_same_held_out_pairs(tmp_path, tiny):
    """Arms trained at other max_length are scored at one, the longest, unless eval.preference.max_length is set: at
    its own, an arm at 64 tokens left out the held-out pairs longer than that, and its accuracy was over fewer
    pairs than the other arm's, side by side in one table."""
    from perpair.pipeline import RunConfig
    from perpair.pipeline.run import _Job, validate

    arms = {"short": {"preset": "dpo", "train": {"max_length": 64}}, "long": {"preset": "dpo"}}
    test = tmp_path / "test.parquet"
    for setting, expected in ((None, 96), (80, 80)):
        config = RunConfig.model_validate(_config(tmp_path, tiny, arms=arms, eval={"preference": {"max_length":
                                                                                                  setting}}))
        job = _Job(config, tmp_path / "work", (), log=lambda line: None)
        settings = validate(config)
        assert [settings.train_configs[arm].max_length for arm in arms] == [64, 96]
        assert [job._preference_config(settings, arm, str(tiny), test).max_length for arm in arms] == [expected] * 2


def test_bad_config_is_refused_before_any_work(tmp_path, tiny):
    from perpair.errors import PerpairError
    from perpair.pipeline import RunConfig, run

    bad_lr = _config(tmp_path, tiny)
    bad_lr["arms"]["dpo"]["train"] = {"lr": -1}
    no_annotations = _config(tmp_path, tiny, annotate=None)
    bad_schedule = _config(tmp_path, tiny)
    bad_schedule["arms"]["mixdpo"]["schedule"] = {"routing": {"tau": 0.5, "unknown": 1}}
    shared_beta = _config(tmp_path, tiny)
    shared_beta["train"]["beta"] = 0.5  # every arm has a plan, whose per-pair β would silently replace it
    arm_smoothing = _config(tmp_path, tiny)
    arm_smoothing["arms"]["dpo"]["train"] = {"label_smoothing": 0.2}
    shared_typo = _config(tmp_path, tiny)
    shared_typo["train"]["batchsize"] = 4  # named in the shared section, not in an arm's, nor as a command line's
    # models and files that were first read after training: a teacher or judge without weights, a missing reference
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    weightless_teacher = _config(tmp_path, tiny, annotate={"teachers": [f"local:{no_weights}"]})
    weightless_judge = _config(tmp_path, tiny)
    weightless_judge["eval"]["alpaca_eval"]["judge"] = str(no_weights)
    no_reference = _config(tmp_path, tiny)
    no_reference["eval"]["alpaca_eval"]["reference"] = str(tmp_path / "nowhere.json")
    no_data_dir = _config(tmp_path, tiny)
    no_data_dir["eval"]["alpaca_eval"]["data_dir"] = str(tmp_path / "nowhere")
    # offline, a file neither given nor in the data folder: read after training, an error then
    offline_no_reference = _config(tmp_path, tiny)
    offline_no_reference["eval"]["alpaca_eval"].update(reference=None, data_dir=None)
    (tmp_path / "empty").mkdir()
    offline_no_difficulty = _config(tmp_path, tiny)
    offline_no_difficulty["eval"]["alpaca_eval"].update(difficulty=None, data_dir=str(tmp_path / "empty"))
    # a judge prompt cut short: found out after training (or never: prompts without the model's answer judged)
    cut_prompt = _config(tmp_path, tiny)
    prompt = (AE / "judge_prompt_alpaca_eval_clf.txt").read_text()
    (tmp_path / "cut.txt").write_text(prompt[:prompt.index("{output_2}")])
    cut_prompt["eval"]["alpaca_eval"]["judge_prompt"] = str(tmp_path / "cut.txt")
    # offline, a reference or difficulties file cut short: read (and refused) after every arm's training
    cut_reference = _config(tmp_path, tiny)
    (tmp_path / "cut.json.gz").write_bytes((AE / "reference_outputs_gpt4_1106_preview.json.gz").read_bytes()[:9000])
    cut_reference["eval"]["alpaca_eval"]["reference"] = str(tmp_path / "cut.json.gz")
    cut_difficulty = _config(tmp_path, tiny)
    (tmp_path / "cut.csv").write_text((AE / "instruction_difficulty_reconstructed.csv").read_text()[:2000] + ",")
    cut_difficulty["eval"]["alpaca_eval"]["difficulty"] = str(tmp_path / "cut.csv")
    # LoRA target modules that would train nothing: refused when the arm trained (after annotation), or never
    arm_targets = _config(tmp_path, tiny)
    arm_targets["arms"]["dpo"]["train"] = {"lora": {"target_modules": ["q_proj", "typo_proj"]}}
    shared_targets = _config(tmp_path, tiny, train={**_config(tmp_path, tiny)["train"],
                                                     "lora": {"target_modules": ["lm_head"]}})
    for config, words in ((bad_lr, "arms.dpo.train.lr: Input should be greater than 0"),
                          (arm_targets, "arms.dpo.train: lora.target_modules ['q_proj', 'typo_proj']: 'typo_proj' "
                                        "matches no module of model"),
                          (shared_targets, "train: lora.target_modules ['lm_head']: 'lm_head' is the model's output"),
                          (no_annotations, "arms.sp2dpo: preset sp2dpo needs"), (bad_schedule, "arms.mixdpo"),
                          (shared_beta, "train.beta: every arm trains with its plan"),
                          (arm_smoothing, "arms.dpo.train.label_smoothing: every arm trains with its plan"),
                          (shared_typo, "unknown key 'train.batchsize'"),
                          (weightless_teacher, f"annotate.teachers[0]: model {no_weights}: the folder holds no"),
                          (weightless_judge, f"eval.alpaca_eval.judge: model {no_weights}: the folder holds no"),
                          (no_reference, f"eval.alpaca_eval.reference: {tmp_path / 'nowhere.json'}: no such file"),
                          (no_data_dir, f"eval.alpaca_eval.data_dir: {tmp_path / 'nowhere'}: no such folder"),
                          (offline_no_reference, "eval.alpaca_eval.reference: offline, no file to read it from"),
                          (offline_no_difficulty, "eval.alpaca_eval.difficulty: offline, no file to read it from"),
                          (cut_prompt, f"eval.alpaca_eval.judge_prompt: file {tmp_path / 'cut.txt'}: not an "
                                       "AlpacaEval judge prompt: no {output_2}"),
                          (cut_reference, f"eval.alpaca_eval: file {tmp_path / 'cut.json.gz'}: not a readable JSON"),
                          (cut_difficulty, f"eval.alpaca_eval: file {tmp_path / 'cut.csv'}: not a readable CSV")):
        with pytest.raises(PerpairError, match="^run config, " + re.escape(words)):
            run(RunConfig.model_validate(config), log=lambda line: None)
    assert not (tmp_path / "work").exists()
    with pytest.raises(ValueError, match="train.out is set by perpair run"):
        RunConfig.model_validate(_config(tmp_path, tiny, train={"out": "x"}))
    with pytest.raises(ValueError, match="workdir\n  Value error, an empty path; name a folder"):
        RunConfig.model_validate(_config(tmp_path, tiny, workdir=""))  # not the working directory, silently


@pytest.mark.parametrize("key", ["overwrite", "save_model"])
def test_train_keys_of_the_arms_folder_are_the_runs_own(tmp_path, tiny, key):
    """train.overwrite: true made the re-run of an arm killed mid-training fail ('resume continues the run in OUT,
    overwrite replaces it: choose one (from the command line)'), and changing it trained every arm again;
    save_model: false left the evaluation no model (a Hugging Face traceback after training). perpair run decides
    both for each arm (it resumes or starts the arm again, it evaluates the saved model): refused, as out is."""
    from perpair.pipeline import RunConfig

    for place in ("train", "arm"):
        config = _config(tmp_path, tiny)
        value = key == "overwrite"
        if place == "train":
            config["train"][key] = value
        else:
            config["arms"]["dpo"]["train"] = {key: value}
        with pytest.raises(ValueError, match=rf"train.{key} is set by perpair run itself \(per arm\); remove it"):
            RunConfig.model_validate(config)


def test_lora_merge_is_the_runs_own(tmp_path, tiny):
    """``lora: {merge: false}`` in a run's train section was set back to true for the evaluation, without a word;
    refused, naming where it was given (the merge itself, and the adapter beside it, are the run's)."""
    from perpair.pipeline import RunConfig

    for place, where in (("train", "train"), ("arm", "arms.dpo.train")):
        config = _config(tmp_path, tiny)
        section = config["train"] if place == "train" else config["arms"]["dpo"].setdefault("train", {})
        section["lora"] = {"r": 4, "merge": False}
        with pytest.raises(ValueError, match=rf"{re.escape(where)}\.lora\.merge is set by perpair run itself \(its "
                                             "evaluation reads the model with the adapter merged"):
            RunConfig.model_validate(config)
        del section["lora"]["merge"]
        RunConfig.model_validate(config)


def test_settings_no_arm_would_read_or_that_fail_only_in_training_are_refused_first(tmp_path, tiny):
    """Found by a review of `perpair run`, each exit 0 (or an error after prepare, annotation and the reference pass):
    a shared train key that every arm sets too was read by none (`--set train.lr=1e-5` beside each arm's lr: every
    stage "unchanged", exit 0); a null train key was validated as its default and given to training as null (lr:
    null failed in the reference pass; max_grad_norm: null, off there, validated as 1.0); an arm whose margin reads
    the reference log-probs with ld_alpha was refused at its plan, naming an option the run never gave."""
    from perpair.errors import PerpairError
    from perpair.pipeline import RunConfig
    from perpair.pipeline.run import validate

    shared = _config(tmp_path, tiny)
    for arm in shared["arms"].values():
        arm["train"] = {"lr": 1e-4}
    with pytest.raises(ValueError, match=re.escape("train.lr is set by every arm too (arms.NAME.train.lr), so no "
                                                   "arm reads the shared value")):
        RunConfig.model_validate(shared)
    del shared["arms"]["dpo"]["train"]  # one arm reads it: allowed
    RunConfig.model_validate(shared)
    nested = _config(tmp_path, tiny, train={**_config(tmp_path, tiny)["train"], "lora": {"r": 4}},
                     arms={"dpo": {"preset": "dpo", "train": {"lora": None}}})
    with pytest.raises(ValueError, match=re.escape("train.lora.r is set by every arm too")):
        RunConfig.model_validate(nested)

    null_lr = _config(tmp_path, tiny)
    null_lr["train"]["lr"] = None
    with pytest.raises(PerpairError, match=r"^run config, train.lr: "):
        validate(RunConfig.model_validate(null_lr))
    no_clip = _config(tmp_path, tiny)
    no_clip["train"]["max_grad_norm"] = None
    assert validate(RunConfig.model_validate(no_clip)).train_configs["dpo"].max_grad_norm is None

    ld = _config(tmp_path, tiny, arms={"dpo": {"preset": "dpo", "schedule": {"margin": {"source": "reference"}},
                                               "train": {"ld_alpha": 0.5}}})
    with pytest.raises(PerpairError, match=re.escape("run config, arms.dpo: margin.source 'reference' reads the "
                                                     "reference log-probs the run computes for the arm's training, "
                                                     "and with ld_alpha 0.5")):
        validate(RunConfig.model_validate(ld))


def test_without_a_held_out_evaluation_the_arms_train_on_every_pair(tmp_path, tiny):
    """eval.preference null left data.test_fraction at 0.1: a tenth of the pairs was held out for an evaluation
    that never ran, and every arm trained on the rest, without a word. It is 0 then, unless set."""
    from perpair.pipeline import RunConfig
    from perpair.pipeline.run import validate

    data = {"sources": [str(UF_TRAIN)], "limit": 24}
    config = RunConfig.model_validate(_config(tmp_path, tiny, data=data, eval={"preference": None}))
    assert validate(config).prepare.test_fraction == 0.0
    config = RunConfig.model_validate(_config(tmp_path, tiny, data=data))  # evaluated: the default held out
    assert validate(config).prepare.test_fraction == 0.1
    kept = RunConfig.model_validate(_config(tmp_path, tiny, data={**data, "test_fraction": 0.2},
                                            eval={"preference": None}))
    assert validate(kept).prepare.test_fraction == 0.2  # asked for: kept


def test_the_data_section_takes_prepares_column_options(tmp_path, tiny):
    """The prepare stage's log told a run's user to set data.score_chosen_col or data.system_col, keys the run
    config refused (unknown key): data under other column names could not go through `perpair run`."""
    import json

    from perpair.pipeline import RunConfig
    from perpair.pipeline.run import validate

    rows = [{"question": f"Q{i}?", "good": f"A{i}.", "bad": f"B{i}.", "r_good": 8.0, "r_bad": float(i % 3)}
            for i in range(4)]
    source = tmp_path / "renamed.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = {"sources": [str(source)], "prompt_col": "question", "chosen_col": "good", "rejected_col": "bad",
            "score_chosen_col": "r_good", "score_rejected_col": "r_bad", "role_map": "human=user"}
    prepare = validate(RunConfig.model_validate(_config(tmp_path, tiny, data=data, eval={"preference": None}))).prepare
    assert (prepare.prompt_col, prepare.score_rejected_col, prepare.role_map) == ("question", "r_bad",
                                                                                  {"human": "user"})


def test_an_arm_resumes_a_training_whose_run_key_predates_the_tokenizer(tmp_path, tiny, uf_pairs):
    """Since run keys cover a model folder's tokenizer, a training stopped under an older perpair holds a run.key
    without it. The stage's own key covers the tokenizer, so the re-run resumes the arm from its checkpoint, as it
    did, instead of training it again from the first step."""
    from perpair.pipeline.run import _train
    from perpair.train import load_config
    from perpair.train.checkpoints import run_key

    out = tmp_path / "train"
    options = {"model": str(tiny), "data": str(uf_pairs), "out": str(out), "steps": 2, "batch_size": 2,
               "max_length": 96, "threads": 1, "reference_cache": str(tmp_path / "refcache")}
    lines: list[str] = []
    _train(options, out, "stage", log=lines.append)
    old = run_key(load_config(None, {**options, "resume": True}), tokenizer=False, resolved=False, memory=True)
    assert (out / "run.key").read_text().strip() != old
    (out / "run.key").write_text(old + "\n")
    lines.clear()
    _train(options, out, "stage", log=lines.append)
    assert lines[0] == "  resuming from step-00000002" and (out / "run.key").read_text().strip() == old, lines


def test_train_rules_that_need_the_plan_are_refused_before_prepare(tmp_path, tiny):
    """An arm's train keys meet its preset's plan at validation: shuffle undoing a curriculum, loss sft ignoring
    the plan, label smoothing a loss ignores; nothing is prepared."""
    from perpair.errors import PerpairError
    from perpair.pipeline import RunConfig, run

    cases = [({"shuffle": True}, "mixdpo", r"arms\.mixdpo\.train: preset mixdpo: its curriculum .* fixes the "
                                            "training order"),
             ({"loss": "sft"}, "dpo", r"arms\.dpo\.train: .*loss 'sft' .* would ignore the plan"),
             ({"loss": "ipo"}, "mixdpo", r"arms\.mixdpo\.train: preset mixdpo sets label_smoothing > 0")]
    for keys, arm, message in cases:
        config = _config(tmp_path, tiny)
        config["arms"][arm]["train"] = keys
        with pytest.raises(PerpairError, match=message):
            run(RunConfig.model_validate(config), log=lambda line: None)
        assert not (tmp_path / "work" / "pairs.parquet").exists() and not (tmp_path / "work").exists()
    allowed = _config(tmp_path, tiny)  # shuffle on a plan without a curriculum is fine: validation passes
    allowed["arms"] = {"dpo": {"preset": "dpo", "train": {"shuffle": True}}}
    from perpair.pipeline.run import validate

    validate(RunConfig.model_validate(allowed))


def test_a_workdir_whose_stages_is_no_folder_is_refused_before_any_stage(tmp_path, tiny):
    from conftest import run_cli

    # WORKDIR/stages a file, or a link to nothing: each stage was taken for unfinished and ran, then its stamp could
    # not be written (a link to nothing: the prepare stage's work done, then 'File exists', exit 1)
    config = _config(tmp_path, tiny, annotate=None, eval={"preference": None, "alpaca_eval": None})
    config["arms"] = {"dpo": {"preset": "dpo"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    stages = tmp_path / "work" / "stages"
    stages.parent.mkdir()
    for make in (lambda: stages.write_text("not a folder"), lambda: stages.symlink_to(tmp_path / "gone")):
        make()
        result = run_cli("run", path, check=False)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"error: {stages} is not a folder (perpair run keeps its stage stamps there); move it away or give the "
            "run another workdir"]
        assert sorted(p.name for p in stages.parent.iterdir()) == ["stages"]
        stages.unlink()


def test_a_folder_that_is_not_a_model_is_refused_before_any_stage(tmp_path, tiny, monkeypatch):
    from conftest import run_cli  # the command line in this process (its imports done once): the same lines

    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    no_weights = tmp_path / "no_weights"  # config and tokenizer, but the weights left behind
    shutil.copytree(tiny, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    path = tmp_path / "run.yaml"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model in (not_a_model, no_weights):
        config = _config(tmp_path, model, annotate=None, eval={"preference": None, "alpaca_eval": None})
        config["arms"] = {"dpo": {"preset": "dpo"}}
        path.write_text(yaml.safe_dump(config))
        result = run_cli("run", path, check=False)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert result.stderr.strip().splitlines() == [f"error: file {path}: run config, model {model}: the folder "
                                                      "holds no weights (model.safetensors, pytorch_model.bin or their "
                                                      "shards)"]
        assert not (tmp_path / "work").exists()

    # a chat template of whitespace only: the run prepared, then died in the reference pass (exit 136)
    blank = tmp_path / "blank_template"
    shutil.copytree(tiny, blank)
    (blank / "chat_template.jinja").write_text("  \n")
    config["model"] = str(blank)
    path.write_text(yaml.safe_dump(config))
    result = run_cli("run", path, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: file {path}: run config, model {blank}: {blank / 'chat_template.jinja'}: the chat template is empty "
        "or only whitespace (every conversation would render as blanks); restore the model's chat template"]
    assert not (tmp_path / "work").exists()

    # a path that is no folder: named once, as the field it came from
    config["model"] = str(tmp_path / "no_such_model")
    path.write_text(yaml.safe_dump(config))
    result = run_cli("run", path, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: file {path}: run config, model {tmp_path / 'no_such_model'}: no such folder, and not a Hub id "
        "(NAME or OWNER/NAME)"]
    assert not (tmp_path / "work").exists()
    # the run's own checks name the file as loading it does (they named only the key), but not for a --set value
    config["model"] = str(tiny)
    config["arms"]["dpo"]["preset"] = "dpoo"
    path.write_text(yaml.safe_dump(config))
    result = run_cli("run", path, check=False)
    assert result.returncode == 2 and result.stderr.startswith(f"error: file {path}: invalid run config: "
                                                               "arms.dpo.preset: unknown preset 'dpoo'")
    result = run_cli("run", path, "--set", "arms.dpo.preset=dpo", "--set", "train.beta=0.5", check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: run config, train.beta: every arm trains")
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_killed_during_training_resumes_without_redoing_finished_stages(tmp_path, tiny, monkeypatch, workers):
    """A run killed mid-training resumes there; with workers, its worker processes die with it (none is left
    training into the workdir)."""
    import psutil

    from conftest import run_cli

    config = _config(tmp_path, tiny, eval={"preference": None, "alpaca_eval": None},
                     arms={"dpo": {"preset": "dpo", "train": {"steps": 16}}}, workers=workers)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    checkpoints = tmp_path / "work" / "arms" / "dpo" / "train" / "checkpoints"
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "perpair", "run", str(path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not any(checkpoints.glob("step-0000000[3-9]")) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    children = psutil.Process(process.pid).children(recursive=True)
    assert len(children) >= (workers if workers > 1 else 0)  # the pool (and the resource tracker of spawn)
    process.send_signal(signal.SIGKILL)
    process.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive
    assert not (tmp_path / "work" / "stages" / "train.dpo.json").exists()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("run", path, check=False)  # the re-run in this process: its imports are done
    assert result.returncode == 0, result.stderr
    log = result.stderr
    for stage in ("prepare", "annotate", "plan.dpo"):
        assert f"[{stage}] unchanged, skipped" in log
    assert "resuming from step-" in log and "[train.dpo] done" in log
    metrics = [json.loads(line) for line in
               (tmp_path / "work" / "arms" / "dpo" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 17))
    assert "| dpo |" in result.stdout
    # the report's figures are the arm's whole training, not the stretch after the resume
    summary = json.loads((tmp_path / "work" / "stages" / "train.dpo.json").read_text())["info"]["summary"]
    assert summary["steps"] == 16 and summary["pairs"] == 16 * 4
    assert summary["train_seconds"] == pytest.approx(sum(m["seconds"] for m in metrics), rel=1e-12)


def _kill_once(command: list[str], env: dict[str, str], ready, log: Path) -> None:
    """Start ``command`` (its output into ``log``, never a pipe that could fill up and stall it) and SIGKILL it as
    soon as ``ready()``, polled every 50 ms for up to five minutes; it must not have ended before."""
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_until(ready, process, log, 0.05)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()


def _wait_until(ready, process: subprocess.Popen, log: Path, poll: float) -> None:
    """Poll ``ready()`` every ``poll`` seconds, for up to five minutes; ``process`` must not end before."""
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "not ready after 300 s"
        time.sleep(poll)


def _answered(cache: Path) -> int:
    """The answers in the annotation cache ``cache`` (read while a run writes it)."""
    import sqlite3

    if not cache.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{cache}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not there yet
        return 0


def _annotating_run(tmp_path: Path, tiny) -> tuple[Path, Path]:
    """A run config whose annotation by a local teacher takes a while (90 training pairs), and its annotation
    cache."""
    config = _config(tmp_path, tiny, eval={"preference": None, "alpaca_eval": None},
                     annotate={"teachers": [f"local:{tiny}"]}, arms={"sp2dpo": {**SP2DPO_TINY_TEACHER,
                                                                                "train": {"steps": 2}}})
    # enough that a stop at 20 answers comes mid-annotation: a local teacher on a CPU commits every 4 answers
    # (LOCAL_CHUNK_BATCHES batches of 1), so 70 are still to come (at 400 pairs, 280 were)
    config["data"]["limit"] = 120
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, tmp_path / "work" / "annotations.cache.sqlite"


@pytest.mark.slow
def test_killed_during_annotation_keeps_every_answer_and_asks_only_the_rest(tmp_path, tiny, monkeypatch):
    """A run killed inside annotation (SIGKILL, no chance to clean up) writes no annotations and stamps nothing;
    its re-run finds every answer given before the kill in the cache, asks the teacher only the rest, and goes on
    to plan and train: nothing lost, nothing asked twice."""
    path, cache = _annotating_run(tmp_path, tiny)
    work = tmp_path / "work"

    def answered() -> int:
        return _answered(cache)

    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "perpair", "run", str(path)]
    _kill_once(command, env, lambda: answered() >= 20, tmp_path / "killed.log")
    before = answered()
    assert before >= 20
    assert not (work / "annotations.parquet").exists() and not (work / "stages" / "annotate.json").exists()

    from conftest import run_cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("run", path, check=False)  # the re-run in this process: its imports are done
    assert result.returncode == 0, result.stderr
    log = result.stderr
    assert "[prepare] unchanged, skipped" in log and "[train.sp2dpo] done" in log
    progress = [line for line in log.splitlines() if "annotated" in line and "cached" in line][-1]
    done, total = (int(n.replace(",", "")) for n in progress.split("annotated ")[1].split(" ")[0].split("/"))
    cached = int(progress.split("(")[1].split(" cached")[0].replace(",", ""))
    assert done == total == answered() and cached == before < total  # the rest asked once each
    assert (work / "annotations.parquet").is_file() and (work / "stages" / "annotate.json").is_file()


@pytest.mark.slow
def test_killed_during_evaluation_keeps_every_answer_and_judgment(tmp_path, tiny, monkeypatch):
    """A run killed inside an arm's AlpacaEval (answers and judgments committed as they come) re-runs that
    evaluation only, generating and judging nothing it had finished."""
    import sqlite3

    config = _config(tmp_path, tiny, annotate=None, arms={"dpo": {"preset": "dpo", "train": {"steps": 2}}})
    config["eval"]["preference"] = None
    # enough that the kill at 4 judgments comes mid-evaluation: a local judge on a CPU judges one answer at a time,
    # each committed, so 20 are still to come (48 instructions had 44); the base model's evaluation, before, too
    config["eval"]["alpaca_eval"].update(limit=24, max_new_tokens=8)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    folder = tmp_path / "work" / "arms" / "dpo" / "eval" / "alpaca_eval"

    def cached() -> dict[str, int]:
        if not (folder / "cache.sqlite").exists():
            return {}
        try:
            with sqlite3.connect(f"file:{folder / 'cache.sqlite'}?mode=ro", uri=True, timeout=5) as db:
                return dict(db.execute("SELECT kind, COUNT(*) FROM results GROUP BY kind").fetchall())
        except sqlite3.OperationalError:  # the table is not there yet
            return {}

    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "perpair", "run", str(path)]
    _kill_once(command, env, lambda: cached().get("judgment", 0) >= 4, tmp_path / "killed.log")
    before = cached()
    answers = sum(n for kind, n in before.items() if kind != "judgment")
    assert answers == 24 and 4 <= before["judgment"] < 24, before
    assert not (folder / "results.json").exists()

    from conftest import run_cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("run", path, check=False)  # the re-run in this process: its imports are done
    assert result.returncode == 0, result.stderr
    for stage in ("prepare", "plan.dpo", "train.dpo", "eval.base.alpaca_eval"):
        assert f"[{stage}] unchanged, skipped" in result.stderr
    row = json.loads((folder / "results.json").read_text())[0]
    after = cached()
    assert row["n_generated"] == 0 and row["n_judged"] == after["judgment"] - before["judgment"] > 0
    assert "| dpo |" in result.stdout


def test_arms_plan_with_the_reference_margins_of_their_own_reference_pass(tmp_path, tiny, monkeypatch):
    """``margin.source: reference`` in a run (two arms side by side, their max lengths apart): each plan's
    difficulty of each pair the run's reference pass covered for that arm's training is the length-normalised
    reference margin from that pass's log-probs; the others have none; an unchanged re-run skips the plans."""
    from perpair.artifacts import read_artifact
    from perpair.plan.difficulty import reference_margin_for

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arms = {"short": {"preset": "mixdpo", "schedule": {"margin": {"source": "reference"}}, "train": {"steps": 2}},
            "long": {"preset": "mixdpo", "schedule": {"margin": {"source": "reference"}},
                     "train": {"steps": 2, "max_length": 160}}}
    config = _config(tmp_path, tiny, annotate=None, eval={"preference": None, "alpaca_eval": None}, arms=arms,
                     workers=2)
    first, _ = _run(config)
    assert {"prepare", "plan.short", "plan.long"} <= set(first.ran)
    work = tmp_path / "work"
    files = {}
    for path in (work / "reference").glob("*.parquet"):
        logps, provenance = read_artifact(path, kind="reference_logps", schema_version=1)
        files[provenance["key"]["max_length"]] = logps
    assert sorted(files) == [96, 160]  # one reference file for each arm's max length
    for arm, max_length in (("short", 96), ("long", 160)):
        logps = files[max_length]
        plan, provenance = read_artifact(work / "arms" / arm / "plan.parquet", kind="plan", schema_version=1)
        ids = plan.column("pair_id").to_pylist()
        expected = reference_margin_for(ids, logps)
        # pairs whose prompt fills max_length are not trained and have no reference log-probs: no margin, as with
        # perpair plan --reference-logps
        covered = ~np.isnan(expected)
        assert 0 < covered.sum() == logps.num_rows < len(ids)
        difficulty = np.array([np.nan if d is None else d for d in plan.column("difficulty").to_pylist()])
        np.testing.assert_allclose(difficulty[covered], expected[covered], rtol=0, atol=1e-12)
        assert np.isnan(difficulty[~covered]).all()
        assert provenance["reference_logps_sha256"]
        assert "preference" in set(plan.column("route").to_pylist())  # the margins decide: not every pair below τ
    assert files[96].num_rows < files[160].num_rows

    second, _ = _run(config)
    assert not second.ran and {"plan.short", "plan.long"} <= set(second.skipped)


def test_an_arm_whose_loss_takes_epsilon_from_its_plan_gets_its_reference_pass(tmp_path, tiny, monkeypatch):
    """exo_pair needs ε > 0, which MixDPO's plan gives every preference pair (0.1): the run's reference pass,
    before any plan (and the reference margins of margin.source reference), ran it as a run without a plan and
    stopped on 'needs label_smoothing > 0'. It trains, with the plan's ε."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arms = {"exo": {"preset": "mixdpo", "schedule": {"margin": {"source": "reference"}},
                    "train": {"steps": 2, "loss": "exo_pair"}}}
    config = _config(tmp_path, tiny, annotate=None, eval={"preference": None, "alpaca_eval": None}, arms=arms)
    result, _ = _run(config)
    assert {"plan.exo", "train.exo"} <= set(result.ran)
    metrics = [json.loads(line) for line in
               (tmp_path / "work" / "arms" / "exo" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)


def test_a_reference_free_arm_without_a_tracker_trains(tmp_path, tiny, monkeypatch):
    """The run set every arm's reference_cache and run_name, which train now refuses where they would go unread
    (a loss without a reference, no report_to): a SimPO arm without a tracker gets neither, and trains."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _small(tmp_path, tiny, arms={"simpo": {"preset": "dpo", "train": {"loss": "simpo"}}},
                    eval={"preference": None, "alpaca_eval": None})
    result, _ = _run(config)
    assert "train.simpo" in result.ran
    summary = json.loads((tmp_path / "work" / "arms" / "simpo" / "train" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["reference_pairs"] == 0


def test_an_arm_schedule_key_that_would_change_nothing_is_refused_before_prepare(tmp_path, tiny):
    from perpair.errors import PerpairError
    from perpair.pipeline import RunConfig
    from perpair.pipeline.run import validate

    for arm, changes, message in (
            ({"preset": "dpo", "schedule": {"curriculum": {"buckets": 2}}}, {},
             r"arms\.a: curriculum\.buckets is read by curriculum\.kind bucketed only"),
            ({"preset": "dpo", "schedule": {"mislabeled": {"action": "flip"}}}, {"annotate": None},
             r"arms\.a\.schedule\.mislabeled\.action acts on the pairs the annotations call mislabeled, and the "
             "run annotates none")):
        config = _config(tmp_path, tiny, arms={"a": arm}, **changes)
        with pytest.raises(PerpairError, match=message):
            validate(RunConfig.model_validate(config))
    # the arm's beta and its schedule's beta.beta: the first won, the second unread
    config = _config(tmp_path, tiny, arms={"a": {"preset": "dpo", "beta": 0.2, "schedule": {"beta": {"beta": 0.3}}}})
    with pytest.raises(PerpairError, match=r"^run config, arms\.a: beta and schedule\.beta\.beta both set the "
                                           "plan's global β, and beta would win unseen; keep one$"):
        validate(RunConfig.model_validate(config))
    validate(RunConfig.model_validate(_config(tmp_path, tiny, arms={"a": {
        "preset": "dpo", "schedule": {"mislabeled": {"action": "flip"}}}})))  # annotated: read


def test_release_cpu_memory_the_arms_would_not_read_is_refused_before_any_stage(tmp_path, tiny, monkeypatch):
    """Set in a run config where the arms train under tcmalloc (the perpair command's allocator where installed,
    which the workers share), it changed nothing; refused at validation, as train refuses it."""
    import torch

    import perpair.train.setup as setup
    from perpair.errors import PerpairError
    from perpair.pipeline import RunConfig
    from perpair.pipeline.run import validate

    config = _config(tmp_path, tiny, train={"release_cpu_memory": False})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU arms, on any machine
    monkeypatch.setattr(setup, "active_allocator", lambda: "tcmalloc")
    with pytest.raises(PerpairError, match=r"^run config, arms\.dpo\.train: release_cpu_memory applies to a training "
                                           "on a CPU under glibc's malloc .* under tcmalloc"):
        validate(RunConfig.model_validate(config))
    monkeypatch.setattr(setup, "active_allocator", lambda: None)
    validate(RunConfig.model_validate(config))


def test_an_annotate_seed_the_ratings_teacher_would_not_read_is_refused(tmp_path, tiny):
    """The run's annotate section passed its default seed as set: the rule on a seed the ratings teacher alone
    does not read holds for a seed the config gives, and only for it."""
    from perpair.errors import PerpairError
    from perpair.pipeline import RunConfig
    from perpair.pipeline.run import validate

    validate(RunConfig.model_validate(_config(tmp_path, tiny)))  # ratings, no seed given
    with pytest.raises(PerpairError, match="^run config, annotate: .*seed orders the two responses a teacher model"):
        validate(RunConfig.model_validate(_config(tmp_path, tiny, annotate={"teachers": ["ratings"], "seed": 1})))


@pytest.mark.parametrize("workers", [1, 2])
def test_annotations_that_fall_short_stop_the_run_before_planning(tmp_path, tiny, workers):
    """The ratings teacher on Orca pairs (no scores): no pair is annotated, so the run stops with exit 3's error
    after annotate, plans nothing and does not stamp annotate (a re-run asks again); the same error when annotate
    ran in a worker process."""
    from conftest import ORCA
    from perpair.errors import TooFewAnnotated

    config = _config(tmp_path, tiny, annotate={"teachers": ["ratings"]})
    config["data"] = {"sources": [str(ORCA)], "limit": 12, "test_fraction": 0.25, "seed": 0}
    config["arms"] = {"sp2dpo": {"preset": "sp2dpo"}}
    config["workers"] = workers
    with pytest.raises(TooFewAnnotated, match=r"annotate: no pair of 9 got a valid annotation"):
        _run(config)
    work = tmp_path / "work"
    assert (work / "pairs.parquet").is_file() and not (work / "arms").exists()
    assert not (work / "stages" / "annotate.json").exists()
    assert TooFewAnnotated("x").exit_code == 3


def test_a_judge_or_judge_prompt_changed_in_place_or_another_dtype_evaluates_again(tmp_path, tiny, monkeypatch):
    """The AlpacaEval stage's stamp holds what its judge and files hold, not only their paths: a local judge
    retrained at the same path, or a judge prompt edited in place, evaluates again (it was 'unchanged, skipped',
    the old judge's numbers reported as the new one's).

    eval.alpaca_eval.dtype auto is bfloat16 on a GPU and float32 on a CPU, for the generation and a local judge:
    it was left out of the AlpacaEval stage's stamp and of the judgments' cache key, so a workdir evaluated where it
    is one dtype was 'unchanged, skipped' where it is the other, the other precision's numbers reported. Now the
    stage, the answers and the judgments are keyed by the dtype as it resolves. (One chain of runs: each change
    is checked against the run before it, for half the runs of a chain each.)"""
    import torch

    from perpair.eval import generate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    judge, prompt = tmp_path / "judge", tmp_path / "judge_prompt.txt"
    shutil.copytree(tiny, judge)
    shutil.copy(AE / "judge_prompt_alpaca_eval_clf.txt", prompt)
    config = _config(tmp_path, tiny, annotate=None, arms={"dpo": {"preset": "dpo", "train": {"steps": 1}}})
    config["eval"]["preference"] = None
    config["eval"]["alpaca_eval"].update(judge=str(judge), judge_prompt=str(prompt))
    evaluations = {"eval.dpo.alpaca_eval", "eval.base.alpaca_eval"}
    first, _ = _run(config)
    assert evaluations <= set(first.ran)
    assert evaluations <= set(_run(config)[0].skipped)
    # the table's AlpacaEval LC cell is empty: the notes say why (2 instructions are too few for the fit)
    assert len(first.notes) == 1 and first.notes[0].startswith("dpo, base: AlpacaEval LC: no LC: fewer than 5 judged")
    assert first.notes[0] in (tmp_path / "work" / "report" / "comparison.md").read_text()

    rewrite_weights(judge)
    second, _ = _run(config)
    assert set(second.ran) == evaluations
    prompt.write_text(prompt.read_text().replace("highly efficient assistant", "very efficient assistant", 1))
    third, _ = _run(config)
    assert set(third.ran) == evaluations

    # where auto is bfloat16 (a GPU: here the same CPU, told so)
    monkeypatch.setattr(generate, "torch_dtype", lambda name: torch.bfloat16 if name == "auto"
                        else getattr(torch, name))
    again, _ = _run(config)
    assert set(again.ran) == evaluations
    results = json.loads((tmp_path / "work" / "base" / "eval" / "alpaca_eval" / "results.json").read_text())[0]
    assert results["n_generated"] == results["n_judged"] == 2  # neither answers nor judgments of float32


def test_the_judge_prompt_installed_with_alpaca_eval_is_keyed_by_content(tmp_path, tiny, monkeypatch):
    """Neither eval.alpaca_eval.judge_prompt nor a data_dir holding one: the judge reads the prompt installed with
    alpaca-eval, which the stage's stamp left out; an alpaca-eval whose prompt is another (an upgrade) had the
    evaluations 'unchanged, skipped', the old prompt's judgments reported. Now that prompt is keyed by content."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    installed = tmp_path / "site" / "alpaca_eval"  # an alpaca-eval package of its own, whose prompt is edited below
    prompt = installed / "evaluators_configs" / "alpaca_eval_clf_gpt4_turbo" / "alpaca_eval_clf.txt"
    prompt.parent.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    shutil.copy(AE / "judge_prompt_alpaca_eval_clf.txt", prompt)
    monkeypatch.syspath_prepend(str(installed.parent))
    monkeypatch.delitem(sys.modules, "alpaca_eval", raising=False)
    config = _config(tmp_path, tiny, annotate=None, arms={"dpo": {"preset": "dpo", "train": {"steps": 1}}})
    config["eval"]["preference"] = None
    config["eval"]["base"] = False
    config["eval"]["alpaca_eval"].update(judge_prompt=None, data_dir=None)
    assert "eval.dpo.alpaca_eval" in _run(config)[0].ran
    assert "eval.dpo.alpaca_eval" in _run(config)[0].skipped
    prompt.write_text(prompt.read_text().replace("highly efficient assistant", "very efficient assistant", 1))
    assert _run(config)[0].ran == ["eval.dpo.alpaca_eval"]


def test_a_reference_file_in_another_order_gets_no_lc_and_its_data_folder_is_keyed(tmp_path, tiny, monkeypatch):
    """The AlpacaEval rows are the reference file's, and the LC reads each instruction's difficulty by its row
    position: a run's reference file was never checked against the official order (perpair run had no data folder),
    so one in another order got an LC of other instructions' difficulties. Now, offline without
    eval.alpaca_eval.data_dir it gets no LC, said below the table; with it, the row that differs is named; the data
    folder's files are part of the stage's stamp (a copy edited in place evaluates again)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    official = AE / "reference_outputs_gpt4_1106_preview.json.gz"
    reference, data = tmp_path / "reference.json", tmp_path / "alpaca_eval"
    reference.write_text(json.dumps(json.loads(gzip.open(official).read())[:2][::-1]))
    data.mkdir()
    shutil.copy(official, data / official.name)
    config = _config(tmp_path, tiny, annotate=None, arms={"dpo": {"preset": "dpo", "train": {"steps": 1}}})
    config["eval"].update(preference=None, base=False)
    config["eval"]["alpaca_eval"].update(reference=str(reference), data_dir=None)
    first, _ = _run(config)
    assert len(first.notes) == 1 and "cannot be checked" in first.notes[0]
    assert first.notes[0].startswith("dpo: AlpacaEval LC: no LC: the rows are the reference file's")
    config["eval"]["alpaca_eval"]["data_dir"] = str(data)
    second, _ = _run(config)
    assert second.ran == ["eval.dpo.alpaca_eval"] and "row 1 is" in second.notes[0]
    assert _run(config)[0].ran == []
    with gzip.open(data / official.name, "wt") as handle:  # the official rows, edited: checked again
        handle.write(json.dumps(json.loads(gzip.open(official).read())[:2][::-1]))
    third, _ = _run(config)
    assert third.ran == ["eval.dpo.alpaca_eval"] and third.notes[0].startswith("dpo: AlpacaEval LC: no LC: fewer")


def test_a_plans_warnings_are_in_the_runs_log(tmp_path, tiny, monkeypatch):
    """An arm's plan that warns (here: annotations of the first 6 pairs only, so the others fall back to the
    global β) says so in the run's log, as `perpair plan` does, and again when the plan stage is skipped."""
    import importlib

    from perpair.pipeline import RunConfig, run

    run_module = importlib.import_module("perpair.pipeline.run")  # the module (the package's `run` is the function)

    class Planned(Exception):
        pass

    def stop(self, settings, arm, pairs, plan):
        raise Planned(plan)

    monkeypatch.setattr(run_module._Job, "train", stop)  # what the arm trains is not this test's
    config = _config(tmp_path, tiny, annotate={"teachers": ["ratings"], "limit": 6})
    config["arms"] = {"sp2dpo": {"preset": "sp2dpo"}}
    config["eval"] = {}
    for _ in range(2):
        lines = []
        with pytest.raises(Planned):
            run(RunConfig.model_validate(config), log=lines.append)
        (warning,) = [line for line in lines if "warning:" in line]
        assert "14 of the 20 preference pairs are unannotated and get the global β 0.1" in warning
        assert "(annotated with --limit 6)" in warning
    assert any("[plan.sp2dpo] unchanged, skipped" in line for line in lines)


def test_a_local_teacher_retrained_in_place_annotates_again(tmp_path, tiny, monkeypatch):
    """The annotate stage's identity holds its local teachers' weights, as the initial model's holds its own:
    a teacher rewritten at the same path annotated nothing again (the stage was skipped, the old answers kept). So
    does its chat template: one edited in place (the weights untouched) was skipped the same way."""
    import importlib

    from perpair.pipeline import RunConfig, run

    run_module = importlib.import_module("perpair.pipeline.run")

    class Planned(Exception):
        pass

    def stop(self, settings, arm, pairs, plan):
        raise Planned(plan)

    monkeypatch.setattr(run_module._Job, "train", stop)
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny, teacher)
    config = _config(tmp_path, tiny, annotate={"teachers": [f"local:{teacher}"], "limit": 4})
    config["arms"] = {"sp2dpo": SP2DPO_TINY_TEACHER}
    config["eval"] = {}
    ran = []
    template = teacher / "chat_template.jinja"
    for change in (None, None, "weights", "template", None):
        if change == "weights":
            rewrite_weights(teacher)
        elif change == "template":
            template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
        lines = []
        with pytest.raises(Planned):
            run(RunConfig.model_validate(config), log=lines.append)
        ran.append(any(line.startswith("[annotate] done") for line in lines))
    assert ran == [True, False, True, True, False]


def _small(tmp_path: Path, model: Path, **changes) -> dict:
    """Two DPO arms of 2 steps, held-out accuracy only: the stamps' rules in seconds."""
    config = _config(tmp_path, model, annotate=None, eval={"preference": {"max_length": 96}, "alpaca_eval": None},
                     arms={"a": {"preset": "dpo"}, "b": {"preset": "dpo", "beta": 0.2}})
    config["data"]["limit"] = 12
    config["train"] = {**config["train"], "steps": 2, "threads": 1}
    config.update(changes)
    return config


def test_a_model_trained_again_under_the_same_key_is_evaluated_again(tmp_path, tiny, monkeypatch):
    """The evaluations' stamps hold the trained weights by content, not only the training's key: an arm's train
    folder deleted trains again, and that model, which need not equal the first (other threads, other rounding),
    is evaluated again, as is a model edited by hand; the evaluation was 'unchanged, skipped', the first model's
    numbers shown as the new one's. The other arm's stages stay skipped."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _small(tmp_path, tiny)
    from perpair.models import model_fingerprint

    first, _ = _run(config)
    assert {"train.a", "eval.a.preference", "train.b", "eval.b.preference"} <= set(first.ran)
    model = tmp_path / "work" / "arms" / "a" / "train" / "model"
    weights = model_fingerprint(str(model))
    shutil.rmtree(model.parent)
    second, _ = _run(config)
    again = model_fingerprint(str(model)) != weights  # bit for bit the same model here, as a rule: not evaluated
    assert set(second.ran) == {"train.a", *(["eval.a.preference"] if again else [])}
    assert {"train.b", "eval.b.preference", "plan.a", "plan.b", "prepare"} <= set(second.skipped)
    assert not _run(config)[0].ran
    rewrite_weights(tmp_path / "work" / "arms" / "b" / "train" / "model")  # by hand: same names and sizes
    assert set(_run(config)[0].ran) == {"eval.b.preference"}


def test_a_dataset_folder_edited_in_place_prepares_again(tmp_path, tiny, monkeypatch):
    """A local dataset folder is keyed by what its files hold, as a file is: one rewritten in place prepares the
    pairs again (the stage was skipped and every arm trained on the old pairs)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import gzip

    lines = gzip.open(UF_TRAIN, "rt").read().splitlines()
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(lines[:24]) + "\n")
    config = _small(tmp_path, tiny, arms={"a": {"preset": "dpo"}}, eval={"preference": {"max_length": 512}})
    config["data"]["sources"] = [str(folder)]
    config["train"]["max_length"] = 512
    first, _ = _run(config)
    pairs = tmp_path / "work" / "pairs.parquet"
    before = pairs.read_bytes()
    (folder / "train.jsonl").write_text("\n".join(lines[24:48]) + "\n")
    second, _ = _run(config)
    assert {"prepare", "plan.a", "train.a", "eval.a.preference"} <= set(second.ran)
    assert pairs.read_bytes() != before


def test_a_second_run_on_the_same_workdir_is_refused_while_the_first_runs(tmp_path, tiny, monkeypatch):
    """Two runs on one workdir at once wrote the same stamps, artifacts and checkpoints (each one's training
    deleting the other's): the second is refused with one error naming the first's process, and writes nothing;
    once the first is over (or killed: the lock goes with its process) a run proceeds."""
    from perpair.errors import PerpairError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _small(tmp_path, tiny, arms={"a": {"preset": "dpo"}})
    work = tmp_path / "work"
    work.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write(f'{os.getpid()}\\n'); f.flush(); "
                               "print('locked', flush=True); time.sleep(60)", str(work / ".lock")],
                              stdout=subprocess.PIPE, text=True)  # a run in another process, holding the lock
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(PerpairError, match=rf"^workdir {re.escape(str(work))}: another perpair run is using it "
                                               rf"\(process {holder.pid}\); wait for it"):
            _run(config)
        assert sorted(p.name for p in work.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    result, _ = _run(config)
    assert "train.a" in result.ran
    from perpair.pipeline.run import workdir_lock

    with workdir_lock(work), pytest.raises(PerpairError, match="another perpair run is using it"):
        _run(config)  # the same process's own lock counts too: a script running two at once


def test_a_missing_data_source_is_refused_before_any_work_named_by_its_key(tmp_path, tiny):
    from perpair.errors import PerpairError

    config = _small(tmp_path, tiny)
    config["data"]["sources"] = [str(UF_TRAIN), str(tmp_path / "nope.jsonl")]
    with pytest.raises(PerpairError, match=rf"^run config, data.sources\[1\]: file {re.escape(str(tmp_path))}/nope"
                                           r"\.jsonl: no such file"):
        _run(config)
    assert not (tmp_path / "work").exists()


def test_a_training_is_keyed_by_its_settings_as_read_and_its_reference_model_by_content(tmp_path, tiny, monkeypatch):
    """The train stage's key holds every setting as training reads it (a default written out is no change; a
    default that changes would be one) and a reference model of its own by content: one retrained at the same
    path trains again (it was skipped: the arm's numbers were the old reference's)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = tmp_path / "reference_model"
    shutil.copytree(tiny, reference)
    config = _small(tmp_path, tiny, arms={"a": {"preset": "dpo", "train": {"reference_model": str(reference)}}})
    assert "train.a" in _run(config)[0].ran
    config["train"]["seed"] = 0  # training's default, now written
    config["train"]["lr"] = "1e-3"  # YAML reads 1e-3 (no dot) as a string, which training reads as 0.001
    assert "train.a" in _run(config)[0].skipped
    rewrite_weights(reference)
    assert {"train.a", "eval.a.preference"} <= set(_run(config)[0].ran)


@pytest.fixture(scope="module")
def run_of_arm_a(tmp_path_factory, tiny) -> tuple[Path, Any]:
    """A finished run of ``_small`` with one arm, a (in this process): its workdir and result, for the tests that
    start from one in a workdir of their own (a copy: what they check holds no workdir path). Never changed."""
    tmp = tmp_path_factory.mktemp("arm_a")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        result, _ = _run(_small(tmp, tiny, arms={"a": {"preset": "dpo"}}))
    return tmp / "work", result


def test_a_setting_of_the_logs_or_checkpoints_alone_trains_no_arm_again(tmp_path, tiny, monkeypatch, run_of_arm_a):
    """Changing when an arm checkpoints or where it logs (save_every, save_every_minutes, keep_checkpoints,
    report_to, project, run_name) changed the train stage's key, and the arm trained again from scratch: an hour
    lost to a logging change. So did release_cpu_memory, which changes the memory the process holds, no number.
    Those are skipped now; a setting that changes the weights (lr) still trains again."""
    import torch

    import perpair.train.setup as setup

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = _small(tmp_path, tiny, arms={"a": {"preset": "dpo"}})
    work, first = run_of_arm_a
    assert "train.a" in first.ran
    shutil.copytree(work, tmp_path / "work")
    config["train"] = {**config["train"], "save_every": 0, "keep_checkpoints": 1,
                       "report_to": ["tensorboard", "wandb"],  # (run_name: a W&B run's; TensorBoard shows none)
                       "project": "mine", "run_name": "first", "save_every_minutes": 10,
                       # and the settings that trade memory for time (an arm that ran out of memory, retrained)
                       "gradient_checkpointing": True, "logits_chunk": 128}
    if not torch.cuda.is_available():  # where the arms would read it: on a CPU under glibc's malloc
        monkeypatch.setattr(setup, "active_allocator", lambda: None)
        config["train"]["release_cpu_memory"] = False
    result, _ = _run(config)
    assert not result.ran and "train.a" in result.skipped
    config["train"]["lr"] = 2e-3
    assert {"train.a", "eval.a.preference"} <= set(_run(config)[0].ran)


def test_precision_auto_is_keyed_as_it_resolves(tmp_path, tiny, monkeypatch, run_of_arm_a):
    """train.precision auto (the default) is bf16 autocast on a GPU that has it and float32 on a CPU, and the train
    stage keyed it as "auto": a workdir trained on a CPU and run again on a GPU was "unchanged, skipped" (an arm
    retrained there trained in bf16 beside float32 ones). Now auto is keyed as bf16 where it resolves to bf16, as an
    explicit bf16 is; where it resolves to float32 the stamps made before still match."""
    from accelerate.state import AcceleratorState

    import perpair.train.setup as setup

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work, _ = run_of_arm_a  # trained here, on a CPU: auto is float32
    shutil.copytree(work, tmp_path / "work")
    config = _small(tmp_path, tiny, arms={"a": {"preset": "dpo"}})
    assert "train.a" in _run(config)[0].skipped
    # where auto is bf16 (a GPU: here the same CPU, told so; bf16 autocast runs on a CPU too)
    monkeypatch.setattr(setup, "uses_bf16", lambda c: c.precision in ("auto", "bf16"))
    AcceleratorState._reset_state(reset_partial_state=True)  # (this process's Accelerate state is float32's)
    try:
        assert {"train.a", "eval.a.preference"} <= set(_run(config)[0].ran)
        assert "train.a" in _run(config)[0].skipped
        config["train"]["precision"] = "bf16"  # what auto resolved to: the same training
        assert "train.a" in _run(config)[0].skipped
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_the_models_chat_template_edited_in_place_trains_again(tmp_path, tiny, monkeypatch, run_of_arm_a):
    """The initial model is keyed by its tokenizer's content too: a chat template edited in place to another text
    of the same size (another system prompt) left the model folder's names, sizes and weights as they were, and
    every arm's training and evaluation were 'unchanged, skipped', trained on the old template's prompts."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tmp_path / "model"  # a copy: the same model (its key holds no path)
    shutil.copytree(tiny, model)
    work, _ = run_of_arm_a
    shutil.copytree(work, tmp_path / "work")
    config = _small(tmp_path, model, arms={"a": {"preset": "dpo"}})
    assert "train.a" in _run(config)[0].skipped  # (the held-out evaluation's config names the model's path)
    template = model / "chat_template.jinja"
    text = template.read_text()
    edited = text.replace("named SmolLM", "named TinyLM")
    assert edited != text and len(edited) == len(text)
    template.write_text(edited)
    result, _ = _run(config)
    assert set(result.ran) == {"train.a", "eval.a.preference"} and {"prepare", "plan.a"} <= set(result.skipped)


def test_a_trained_models_chat_template_edited_by_hand_is_evaluated_again(tmp_path, tiny, monkeypatch, run_of_arm_a):
    """An arm's evaluation is keyed by the trained model's tokenizer where it is not the initial model's: its chat
    template edited by hand (at the same size, so that the training's outputs look unchanged) was 'unchanged,
    skipped', the old template's numbers reported; the model as trained keeps its evaluation's key."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work, _ = run_of_arm_a
    shutil.copytree(work, tmp_path / "work")
    config = _small(tmp_path, tiny, arms={"a": {"preset": "dpo"}})
    assert not _run(config)[0].ran
    template = tmp_path / "work" / "arms" / "a" / "train" / "model" / "chat_template.jinja"
    text = template.read_text()
    edited = text.replace("named SmolLM", "named TinyLM")
    assert edited != text and len(edited) == len(text)
    template.write_text(edited)
    result, _ = _run(config)
    assert result.ran == ["eval.a.preference"]


def test_an_arm_stopped_by_a_signal_says_a_re_run_continues_it(tmp_path, tiny, monkeypatch):
    """An arm's training stopped by SIGTERM says how to continue: perpair run again (it resumes the arm from its
    checkpoint), not train's --resume, which perpair run does not take; the status stays 143."""
    import perpair.train
    from perpair.errors import TrainingStopped

    def stopped(config, **callbacks):
        raise TrainingStopped(f"stopped by SIGTERM after step 2 of 6: checkpoint {config.out}/checkpoints/"
                              "step-00000002; rerun with --resume to continue", 15)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(perpair.train, "train", stopped)
    with pytest.raises(TrainingStopped, match=r"^train\.a: stopped by SIGTERM after step 2 of 6: checkpoint "
                                              r".*step-00000002; re-run to continue$") as exc:
        _run(_small(tmp_path, tiny, arms={"a": {"preset": "dpo"}}))
    assert exc.value.exit_code == 143


def test_a_signal_in_an_arms_last_step_stops_the_run_after_it(tmp_path, tiny, monkeypatch):
    """workers: 1, SIGTERM during an arm's last step: its training ends as it would (model saved, stage stamped),
    and the run stops there with status 143; it went on to the evaluations and ended with 0."""
    import perpair.train
    from perpair import signals
    from perpair.errors import StoppedBySignal

    train = perpair.train.train

    def signalled_in_the_last_step(config, on_step, **callbacks):
        def step(metrics):
            on_step(metrics)
            if metrics["step"] == config.steps:
                os.kill(os.getpid(), signal.SIGTERM)

        return train(config, on_step=step, **callbacks)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(signals, "received", 0)  # (this process's: a test before may have signalled it)
    monkeypatch.setattr(perpair.train, "train", signalled_in_the_last_step)
    with pytest.raises(StoppedBySignal, match=r"^eval\.a\.preference: stopped by SIGTERM: finished work is kept; "
                                              "re-run to continue$") as stopped:
        _run(_small(tmp_path, tiny, arms={"a": {"preset": "dpo"}}))
    assert stopped.value.exit_code == 143
    assert (tmp_path / "work" / "stages" / "train.a.json").is_file()
    assert not (tmp_path / "work" / "stages" / "eval.a.preference.json").exists()


def _signal_once(command: list[str], env: dict[str, str], ready, log: Path, *, workers_too: bool = False,
                 number: int = signal.SIGTERM):
    """Start ``command`` (its output into ``log``), send it signal ``number`` as soon as ``ready()`` (and to every
    process it started, its workers and multiprocessing's resource tracker, as ``scancel`` signals each process of a
    job, with ``workers_too``); its exit status and the processes it had started."""
    import psutil

    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_until(ready, process, log, 0.01)
            children = psutil.Process(process.pid).children(recursive=True)
            process.send_signal(number)
            for child in children if workers_too else ():
                try:
                    child.send_signal(number)
                except psutil.NoSuchProcess:
                    pass
            return process.wait(timeout=120), children
        finally:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_stop_signals_to_a_run_with_workers_keep_the_arms_step_and_a_re_run_resumes_it(tmp_path, tiny,
                                                                                         monkeypatch):
    """workers: 2, a stop signal while an arm trains, three times over, each re-run resuming the last stop's
    checkpoint: SIGTERM to the run's process (`timeout`, `kill`), then SIGTERM and SIGUSR1 to it and every process
    it started (`scancel`, `scancel --signal=USR1`, SLURM's `--signal=USR1@N`). Each time the run passes it on and
    waits, the arm's worker finishes its step and saves its checkpoint, the run says so in one line and exits 143
    (138), no worker left; the last re-run trains the rest. The run died at once (status -15), its workers killed with
    it, every step since the arm's last checkpoint lost. SIGUSR1 to every process killed multiprocessing's resource
    tracker, and the run's end printed "resource_tracker: process died unexpectedly" and a KeyError traceback for
    each semaphore. (One chain of re-runs, not one run per signal: each stop is checked the same, for a third of the
    time.)"""
    import psutil

    config = _config(tmp_path, tiny, eval={"preference": None, "alpaca_eval": None},
                     arms={"dpo": {"preset": "dpo", "train": {"steps": 30}}}, workers=2)
    config["train"] = {**config["train"], "save_every": 0, "threads": 1}  # a checkpoint only where it stops
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "work" / "arms" / "dpo" / "train"
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "perpair", "run", str(path)]
    metrics = out / "metrics.jsonl"
    stops: list[int] = []  # the step of each stop
    for to, number in (("run", signal.SIGTERM), ("run and workers", signal.SIGTERM),
                       ("run and workers", signal.SIGUSR1)):
        before = stops[-1] if stops else 0
        log = tmp_path / f"stopped-{len(stops)}.log"
        status, children = _signal_once(command, env, lambda before=before: metrics.is_file() and
                                        metrics.read_text().count("\n") > before,
                                        log, workers_too=to == "run and workers", number=number)
        shown, name = log.read_text(), signal.Signals(number).name
        assert status == 128 + number, (to, name, shown[-3000:])
        assert len(children) >= 2 and not psutil.wait_procs(children, timeout=30)[1]
        step = metrics.read_text().count("\n")
        assert before < step < 30, (to, name, shown[-3000:])
        stops.append(step)
        assert sorted(c.name for c in (out / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in stops[-2:]]
        assert "Traceback" not in shown and "error:" not in shown and shown.count("stopped by") == 1, shown[-3000:]
        assert "Warning" not in shown and "resource_tracker" not in shown, (to, name, shown[-3000:])
        assert shown.splitlines()[-1] == (f"train.dpo: stopped by {name} after step {step} of 30: checkpoint "
                                          f"{out / 'checkpoints'}/step-{step:08d}; re-run to continue")
        assert not before or f"resuming from step-{before:08d}" in shown, shown[-3000:]
        assert not (tmp_path / "work" / "stages" / "train.dpo.json").exists()

    from conftest import run_cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("run", path, check=False)  # the re-run in this process: its imports are done
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from step-{stops[-1]:08d}" in result.stderr and "[train.dpo] done" in result.stderr
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 31))


@pytest.mark.slow
def test_sigterm_during_annotation_stops_the_run_in_one_line_keeping_the_answers(tmp_path, tiny):
    """workers: 1, SIGTERM while a local teacher annotates in the run's own process: one line naming the stage,
    exit 143, every answer so far in the cache, nothing stamped or written as if complete. The run died without a
    word (status -15)."""
    path, cache = _annotating_run(tmp_path, tiny)
    work = tmp_path / "work"
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    status, _ = _signal_once([sys.executable, "-m", "perpair", "run", str(path)], env,
                             lambda: _answered(cache) >= 20, tmp_path / "stopped.log")
    shown = (tmp_path / "stopped.log").read_text()
    assert status == 143, shown[-3000:]
    assert "Traceback" not in shown and shown.count("stopped by") == 1, shown[-3000:]
    assert shown.splitlines()[-1] == "annotate: stopped by SIGTERM: finished work is kept; re-run to continue"
    assert _answered(cache) >= 20
    assert not (work / "annotations.parquet").exists() and not (work / "stages" / "annotate.json").exists()


def _stopped_in_a_worker(*, log) -> None:  # a stage's work stopped by a signal (an arm's training)
    from perpair.errors import TrainingStopped

    raise TrainingStopped("stopped by SIGTERM after step 2 of 6: checkpoint c; re-run to continue", 15)


def test_a_stage_stopped_by_a_signal_in_a_worker_comes_back_as_its_stop():
    """A TrainingStopped raised in a worker process did not come back to the run (rebuilt without its signal): the
    pool broke, its other workers were killed, and the run said a worker died abruptly, exit 2. It comes back as it
    was: its line, status 143."""
    from perpair.errors import TrainingStopped
    from perpair.pipeline.workers import Workers

    with pytest.raises(TrainingStopped, match=r"^stopped by SIGTERM after step 2 of 6: checkpoint c; re-run to "
                                              "continue$") as stopped, Workers(2, lambda line: None) as workers:
        workers.call("train.a", "a test", _stopped_in_a_worker)
    assert stopped.value.exit_code == 143


def _nothing(*, log) -> None:  # a stage's work that ends at once
    pass


def _slow(marker: str, *, log) -> None:  # a stage's work that takes a while, then leaves a file
    time.sleep(3)
    Path(marker).touch()


def test_a_stage_that_fails_leaves_the_stage_running_in_its_chains_worker_to_finish(tmp_path):
    """A worker process dies with the thread that started it (PR_SET_PDEATHSIG), and the run ended the threads of
    its chains as it stopped: a stage that failed (or that a stop signal stopped, as a scheduler's SIGUSR1 to every
    process did: "reference: a worker process of the run died abruptly", exit 2) killed the worker its chain had
    started, running another chain's stage (an arm's training lost since its last checkpoint). That stage
    finishes, as the running ones do, and the run reports the failure."""
    import threading

    from perpair.errors import PerpairError
    from perpair.pipeline.workers import Workers

    marker = tmp_path / "b"
    a_done, b_started = threading.Event(), threading.Event()

    def chain_a() -> None:  # starts the first worker, then fails while b runs in it
        workers.call("a", "a test", _nothing)
        a_done.set()
        assert b_started.wait(60)
        time.sleep(1)
        raise PerpairError("a: refused")

    def chain_b() -> None:
        assert a_done.wait(60)
        time.sleep(0.5)  # the worker chain a started is idle: b runs in it
        b_started.set()
        workers.call("b", "a test", _slow, str(marker))

    with pytest.raises(PerpairError, match="^a: refused$"), Workers(2, lambda line: None) as workers:
        workers.side(chain_b)
        workers.side(chain_a).result()
    assert marker.exists(), "stage b was killed with the worker chain a had started"


def _ran(marker: str, *, log) -> None:  # a stage's work, which leaves a file where it ran
    Path(marker).touch()


def test_a_worker_started_as_the_run_forwards_a_stop_signal_gets_it_too(tmp_path, monkeypatch):
    """The pool starts a worker process as a stage comes: a SIGTERM to the run after the stage's check but before
    that worker was in the pool's list was passed on to the workers there were, and the new one ran its stage (an
    arm trained on to its end, the run waiting for it). The run passes it on to the worker it started too, whose
    stage does not start."""
    from concurrent.futures import ProcessPoolExecutor

    from perpair import signals
    from perpair.errors import StoppedBySignal
    from perpair.pipeline.workers import Workers

    spawn = ProcessPoolExecutor._spawn_process

    def signalled_first(pool) -> None:  # the signal comes, and is passed on, as the worker is being started
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not workers.signalled:
            assert time.monotonic() < deadline, "the run did not take the signal"
            time.sleep(0.01)
        spawn(pool)

    monkeypatch.setattr(ProcessPoolExecutor, "_spawn_process", signalled_first)
    monkeypatch.setattr(signals, "received", 0)  # (this process's: a test before may have signalled it)
    marker = tmp_path / "ran"
    with pytest.raises(StoppedBySignal, match="^stopped by SIGTERM: finished work is kept; re-run to continue$") \
            as stopped, Workers(2, lambda line: None) as workers:
        workers.side(workers.call, "train.a", "a test", _ran, str(marker)).result()
    assert stopped.value.exit_code == 143
    assert not marker.exists(), "the worker started as the signal came ran its stage"


def test_a_stop_signal_outside_training_stops_once_where_it_is():
    """The command line's handler (perpair.signals): the first SIGTERM / SIGUSR1 stops the work where it is, with
    its line and status; a second one (scancel's copy, the run's forwarded one) does not cut short what the stop is
    saving; the previous handlers come back."""
    from perpair.errors import StoppedBySignal
    from perpair.signals import stop_on_signals

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    saved = []
    with pytest.raises(StoppedBySignal, match="^stopped by SIGUSR1: finished work is kept; re-run to continue$") \
            as stopped, stop_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(10)
        finally:  # what a stage saves as it stops (the reference pass's part file)
            os.kill(os.getpid(), signal.SIGTERM)
            saved.append("part")
    assert stopped.value.exit_code == 138 and saved == ["part"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before


class _SignalledInDel:
    """An object whose ``__del__`` is where a stop signal comes (the regex module's, as a tokenizer loads)."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10000):  # (Python runs the handler here, inside __del__)
            pass


def _signalled_in_a_del(marker: str, *, log) -> None:  # a stage's work, signalled in a __del__, then going on
    _SignalledInDel()  # (dropped at once: its __del__ runs here)
    for _ in range(100):
        time.sleep(0.02)
    Path(marker).touch()


@pytest.mark.parametrize("where", ["command", "training", "worker"])
def test_a_stop_signal_that_comes_inside_a_del_still_stops_the_work(tmp_path, capfd, where):
    """A handler's stop raised inside a ``__del__`` is swallowed by Python: it printed 'Exception ignored in
    <function Group.__del__>' and a traceback, and the work (an annotation, an evaluation, tokenizing) went on as
    if no signal had come (a scheduler's SIGUSR1 to every process of perpair run, 1 run in 10 in the right
    second). The stop is raised again a moment later, where the work is, and nothing is printed: in a command
    (perpair.signals), before a training's steps (StopSignals) and in a stage of a worker process."""
    from perpair.errors import StoppedBySignal
    from perpair.pipeline.workers import Workers
    from perpair.signals import stop_on_signals
    from perpair.train.stopping import StopSignals

    before = sys.unraisablehook
    marker = tmp_path / "went on"
    with pytest.raises(StoppedBySignal, match="^stopped by SIGTERM") as stopped:
        if where == "worker":
            with Workers(2, lambda line: None) as workers:
                workers.call("annotate", "a test", _signalled_in_a_del, str(marker))
        else:
            with stop_on_signals() if where == "command" else StopSignals():
                _signalled_in_a_del(str(marker), log=None)
    assert stopped.value.exit_code == 143 and not marker.exists()
    assert "Exception ignored" not in capfd.readouterr().err
    assert sys.unraisablehook is before


_SWALLOWED_AS_IT_ENDS = """
import os, signal
from perpair.errors import StoppedBySignal
from perpair.signals import stop_on_signals
class SignalledInDel:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10000):
            pass
try:
    with stop_on_signals():  # (the command line's)
        SignalledInDel()  # a stop swallowed in the command's last moment: its objects freed as it returns
    print("done", flush=True)
except StoppedBySignal:  # (sent again before the end: a machine so busy that 10 ms passed)
    print("stopped", flush=True)
"""


def test_a_stop_swallowed_as_the_command_ends_does_not_kill_it_after():
    """A stop signal that came inside a ``__del__`` as a command ended, its work done and its status decided, was
    sent again once the command had put the default handlers back: the process was killed by it, without a word
    (exit -15, where the command had decided 0). The work is done: its status stands."""
    result = subprocess.run([sys.executable, "-c", _SWALLOWED_AS_IT_ENDS], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout in ("done\n", "stopped\n") and not result.stderr, result


@pytest.fixture(scope="module")
def run_of_arm_b(tmp_path_factory, tiny) -> Path:
    """The workdir of a finished run of ``_small`` with one arm, b (in this process): the run before
    test_an_arm_that_fails_is_named_and_the_others_work_is_kept's, which is the same for either number of
    workers (their keys hold none). Copied by each test, never changed."""
    tmp = tmp_path_factory.mktemp("arm_b")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        _run(_small(tmp, tiny, arms={"b": {"preset": "dpo"}}))
    return tmp / "work"


@pytest.mark.parametrize("workers", [1, 2])
def test_an_arm_that_fails_is_named_and_the_others_work_is_kept(tmp_path, tiny, monkeypatch, workers, run_of_arm_b):
    """An arm whose training refuses its pairs stops the run with one error naming the stage (which arm: the
    message alone did not say) and leaves no comparison (the run before's stayed, showing that arm's numbers under
    its old settings); the other arm's finished stages are stamped, so the re-run with the mistake fixed trains
    only the failed arm."""
    from perpair.errors import PerpairError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _small(tmp_path, tiny, workers=workers, arms={"b": {"preset": "dpo"}})
    shutil.copytree(run_of_arm_b, tmp_path / "work")  # the first run, of this config
    assert (tmp_path / "work" / "report" / "comparison.md").is_file()  # a first run's table, arm b's settings
    config["arms"] = {"a": {"preset": "dpo"}, "b": {"preset": "dpo", "train": {"batch_size": 64}}}
    with pytest.raises(PerpairError, match=r"^train\.b: batch_size 64 is more than the \d+ pairs"):
        _run(config)
    stamps = {p.stem for p in (tmp_path / "work" / "stages").iterdir()}
    assert {"prepare", "plan.a", "plan.b", "train.a"} <= stamps and "train.b" not in stamps
    # no table of a run that failed: the first run's, arm b's numbers under other settings, is gone too
    assert not (tmp_path / "work" / "report").exists()
    del config["arms"]["b"]["train"]
    result, _ = _run(config)
    assert "train.b" in result.ran and not {"prepare", "plan.a", "plan.b", "train.a"} & set(result.ran)
    assert [row["arm"] for row in result.rows] == ["a", "b"]


def _killed(*, log) -> None:  # a stage's work whose worker process dies (the out-of-memory killer's SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_process_that_dies_is_one_error_naming_the_stage():
    """A worker killed mid-stage broke the pool: a traceback ending in BrokenProcessPool (exit 1), no stage named.
    Now one error naming the stage it ran, which the command line prints as its `error:` line."""
    from perpair.errors import PerpairError
    from perpair.pipeline.workers import Workers

    with pytest.raises(PerpairError, match=r"^train\.a: a worker process of the run died abruptly .* re-run to "
                                           "continue$"), Workers(2, lambda line: None) as workers:
        workers.call("train.a", "a test", _killed)


def _holds_the_log_lock(*, log) -> None:
    """A stage's work stopped while writing a log line: it holds the lock of the queue its lines go through."""
    from perpair.pipeline import workers

    log("started")
    workers._log_queue._wlock.acquire()
    time.sleep(120)


def test_ctrl_c_while_a_worker_writes_a_line_stops_the_run(tmp_path):
    """Ctrl-C terminates the workers; one stopped while writing a line kept the lock of the log queue, and the
    run, putting its end marker on that queue, hung for good (seen on `perpair run` with workers 2). It stops."""
    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_run_pipeline import _holds_the_log_lock
from perpair.pipeline.workers import Workers

lines = []
try:
    with Workers(2, lines.append) as workers:
        workers._chains.submit(workers.call, "train.a", "a test", _holds_the_log_lock)
        while "[train.a] started" not in lines:
            time.sleep(0.05)
        time.sleep(0.5)
        raise KeyboardInterrupt
except KeyboardInterrupt:
    print("stopped", flush=True)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90,
                            cwd=tmp_path)
    assert result.stdout.strip() == "stopped", result.stderr


def test_more_chains_waiting_on_chains_than_default_threads_finish(tmp_path):
    """Each arm's chain waits for its held-out evaluation, a chain it starts; the chains' thread pool had Python's
    default bound (cores + 4: 6 threads on 2 cores), so six arms took every thread, each waiting for an evaluation
    queued behind them, and `perpair run` with workers 2 hung for good, re-runs too. Twelve such chains finish."""
    script = """
from perpair.pipeline.workers import Workers

with Workers(2, lambda line: None) as workers:
    arms = [workers.side(lambda i: workers.side(lambda: i).result(), i) for i in range(12)]
    print(sum(arm.result() for arm in arms), flush=True)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.stdout.strip() == str(sum(range(12))), result.stderr


def test_ctrl_c_says_what_is_kept(tmp_path, monkeypatch):
    """Typer turned Ctrl-C into exit 130 without a word; the command line's own message was never printed."""
    import perpair.pipeline.config as run_config
    from conftest import run_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_config, "load_yaml", interrupted)
    result = run_cli("run", tmp_path / "run.yaml", check=False)
    assert result.returncode == 130
    assert "interrupted: finished work is kept; re-run to continue" in result.stderr


def test_from_train_trains_again_from_the_start(tmp_path, tiny, monkeypatch):
    """`--from train` after a finished training resumed from its last checkpoint, the final step: nothing was
    trained again and the same model came back. It trains from the start; a re-run without --from after a kill
    still resumes (test_killed_during_training_resumes_without_redoing_finished_stages)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _small(tmp_path, tiny, arms={"a": {"preset": "dpo"}})
    _run(config)
    metrics = tmp_path / "work" / "arms" / "a" / "train" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    result, lines = _run(config, from_stage="train")
    assert {"train.a", "eval.a.preference"} <= set(result.ran)
    assert not any("resuming from" in line for line in lines)
    assert [line.split(" loss")[0].strip() for line in lines if line.strip().startswith("step ")] == \
        ["step 1/2", "step 2/2"]
    assert metrics.stat().st_mtime_ns != before and len(metrics.read_text().splitlines()) == 2


def test_a_copied_workdir_checks_its_own_files(tmp_path, tiny, monkeypatch, run_of_arm_a):
    """Stamps named their outputs by the path the run wrote them at: a copy of the workdir checked the original's
    files, so an arm's metrics deleted in the copy were 'unchanged' (the copy's table then had no training
    columns) and a moved workdir ran everything again. Now by their place in the workdir."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _small(tmp_path, tiny, arms={"a": {"preset": "dpo"}})
    shutil.copytree(run_of_arm_a[0], tmp_path / "work")  # a finished run of this config
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "work", copy)
    (copy / "arms" / "a" / "train" / "metrics.jsonl").unlink()
    result, _ = _run({**config, "workdir": str(copy)})
    assert "train.a" in result.ran and result.rows[0]["train_loss"] is not None
    moved = tmp_path / "moved"
    (tmp_path / "work").rename(moved)
    assert not _run({**config, "workdir": str(moved)})[0].ran


def test_a_stamp_of_another_shape_runs_its_stage_again(tmp_path, tiny, monkeypatch, run_of_arm_a):
    """A stage's stamp that is valid JSON of another shape (a list; an object without its info) was a traceback on
    the re-run (AttributeError at once, KeyError after the stage was skipped); it is now no stamp: the stage runs
    again."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _small(tmp_path, tiny, arms={"a": {"preset": "dpo"}})
    for damage in (lambda stamp: [stamp], lambda stamp: {k: v for k, v in stamp.items() if k != "info"}):
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(run_of_arm_a[0], work)
        path = work / "stages" / "train.a.json"
        path.write_text(json.dumps(damage(json.loads(path.read_text()))))
        result, _ = _run({**config, "workdir": str(work)})
        assert "train.a" in result.ran and result.rows[0]["train_loss"] is not None


def test_an_arm_beta_that_would_change_nothing_is_refused_as_plan_refuses_it(tmp_path, tiny):
    """perpair plan refuses --beta with a per-pair β and normalise off when every preference pair is annotated
    (each takes its β from its annotation: the plan is the same with or without it); a run arm's `beta` with
    `normalise: false` was silently ignored. Refused at the arm's plan (what came before is kept), nothing
    planned."""
    from perpair.errors import PerpairError

    config = _config(tmp_path, tiny, annotate={"teachers": ["ratings"]}, eval={"base": False, "preference": None})
    config["arms"] = {"sp2dpo": {"preset": "sp2dpo", "beta": 0.05, "schedule": {"beta": {"normalise": False}}}}
    with pytest.raises(PerpairError, match=r"^plan\.sp2dpo: arms\.sp2dpo\.beta 0\.05 would change nothing: "
                                           r"beta\.normalise is off, .*set arms\.sp2dpo\.schedule\.beta\.normalise: "
                                           "true"):
        _run(config)
    assert not (tmp_path / "work" / "arms" / "sp2dpo" / "plan.parquet").exists()
    assert not (tmp_path / "work" / "stages" / "plan.sp2dpo.json").exists()
    assert (tmp_path / "work" / "stages" / "annotate.json").exists()


def test_an_evaluation_taken_out_of_the_config_leaves_the_report(tmp_path, tiny, monkeypatch):
    """A re-run without eval.alpaca_eval showed, in its evaluation report (report/eval), the AlpacaEval rows the run
    before had left in the arms' folders: numbers of other settings as this run's, beside a comparison table without
    them. The report holds this run's evaluations only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _small(tmp_path, tiny, arms={"a": {"preset": "dpo"}})
    config["eval"]["alpaca_eval"] = _config(tmp_path, tiny)["eval"]["alpaca_eval"]
    _run(config)
    report = tmp_path / "work" / "report" / "eval" / "results.json"
    assert {r["benchmark"] for r in json.loads(report.read_text())} == {"preference_accuracy", "alpaca_eval_2"}
    config["eval"]["alpaca_eval"] = None
    result, _ = _run(config)
    assert (tmp_path / "work" / "arms" / "a" / "eval" / "alpaca_eval" / "results.json").is_file()  # kept, not shown
    assert result.rows[0]["alpaca_wr"] is None
    assert [r["benchmark"] for r in json.loads(report.read_text())] == ["preference_accuracy"]


def test_the_comparison_notes_an_lc_of_another_judge_than_alpaca_evals():
    """perpair run's table showed an AlpacaEval LC judged by a local model beside nothing that said it is not the
    leaderboard's figure (the GLM's reference rows were judged by gpt-4-turbo): the evaluation's note is carried."""
    from perpair.pipeline.report import evaluation_notes

    note = "the LC fit's reference rows were judged by gpt-4-turbo"
    evaluated = {arm: {"alpaca_eval": {"length_controlled_winrate": 50.0, "lc_method": "fit", "n_total": 8,
                                       "lc_judge_note": note}} for arm in ("dpo", "base")}
    assert evaluation_notes(evaluated) == [f"dpo, base: AlpacaEval LC: {note}"]
    assert evaluation_notes({"dpo": {"alpaca_eval": {"lc_method": "fit", "n_total": 8}}}) == []


def test_set_reaches_an_arm_whose_name_has_dots(tmp_path, tiny):
    """Arm names may hold dots (`dpo-0.05`), and `--set arms.dpo-0.05.train.lr=…` was split at each of them: an
    arm 'dpo-0' with a key '05', refused as a config error naming neither."""
    import yaml

    from perpair.pipeline import load_run_config
    from perpair.train import parse_overrides

    config = _config(tmp_path, tiny, arms={"dpo-0.05": {"preset": "dpo", "beta": 0.05}, "dpo": {"preset": "dpo"}})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_run_config(path, parse_overrides(["arms.dpo-0.05.train.lr=0.00001", "arms.dpo.train.max_length=64",
                                                    "arms.dpo-0.05.schedule.beta.kind=global"]))
    assert loaded.arms["dpo-0.05"].train == {"lr": 0.00001} and loaded.arms["dpo"].train == {"max_length": 64}
    assert loaded.arms["dpo-0.05"].schedule == {"beta": {"kind": "global"}} and loaded.arms["dpo-0.05"].beta == 0.05
