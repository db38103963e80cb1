"""``perpair train`` end to end on a tiny randomly initialised Llama: resume after SIGKILL, MixDPO plans,
packing invariance, two processes, LoRA, bad input and NaN handling."""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import UF_TRAIN, rewrite_weights, run_cli, save_tiny_llama
from perpair.errors import PerpairError, TrainingStopped

TINY_ARGS = ("--steps", "6", "--batch-size", "4", "--max-length", "96", "--beta", "0.1", "--lr", "1e-3",
             "--lr-schedule", "cosine", "--warmup-ratio", "0.2")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with SmolLM2's tokenizer and chat template."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", hidden=64)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(model, data, out, *extra, check=True, fresh=False):
    from perpair.train.losses import objective

    # a cache of the test's own, where the loss reads a reference (a reference-free one refuses the setting)
    loss = str(dict(zip(extra, extra[1:], strict=False)).get("--loss", "sigmoid"))
    cache = () if objective(loss.split(",")).reference_free else ("--set", f"reference_cache={out.parent / 'refcache'}")
    threads = () if "--threads" in extra else ("--threads", "1")  # (an option given twice is refused)
    return run_cli("train", "--model", model, "--data", data, "--out", out, *threads, *cache, *extra,
                   check=check, fresh=fresh)


def test_resume_after_sigkill_is_exact(tiny_model, uf_pairs, tmp_path):
    # every run a program, as the killed one must be: the same preloads, so the same float32 kernels (perpair.mkl);
    # with weight decay, whose two groups of parameters (decayed or not, as TRL's) the checkpoint restores
    args = (*TINY_ARGS, "--set", "weight_decay=0.05")
    straight = tmp_path / "straight"
    _train(tiny_model, uf_pairs, straight, *args, fresh=True)
    resumed = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "perpair", "train", "--model", str(tiny_model), "--data", str(uf_pairs),
           "--out", str(resumed), "--threads", "1", "--set", f"reference_cache={tmp_path / 'refcache'}",
           "--save-every", "1", *args]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = resumed / "checkpoints" / "step-00000003"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert 3 <= len(_metrics(resumed)) < 6
    _train(tiny_model, uf_pairs, resumed, *args, "--save-every", "1", "--resume", fresh=True)

    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in b] == list(range(1, 7))
    # the summary counts the whole run, not the stretch after the checkpoint (it said steps 3, pairs of 3 steps)
    first, then = (json.loads((out / "summary.json").read_text()) for out in (straight, resumed))
    assert then["resumed_from"] >= 3 and first["resumed_from"] is None
    assert {k: then[k] for k in ("steps", "pairs", "tokens")} == {k: first[k] for k in ("steps", "pairs", "tokens")}
    assert then["train_seconds"] == pytest.approx(sum(m["seconds"] for m in b), rel=1e-9)
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-12)
    wa = load_file(straight / "model" / "model.safetensors")
    wb = load_file(resumed / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _weights(out: Path, folder: str = "model") -> dict[str, torch.Tensor]:
    return load_file(out / folder / "model.safetensors")


@pytest.mark.parametrize(("number", "status"), [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)],
                         ids=["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_finishes_the_step_saves_it_and_resume_is_exact(tiny_model, uf_pairs, tmp_path, monkeypatch,
                                                                      number, status):
    """SIGTERM (a scheduler's preemption, `timeout`, scancel) or SIGUSR1 (SLURM's --signal warning) during step 2:
    the step finishes, its checkpoint is written (a second SIGTERM while it is written changes nothing) and the run
    stops with status 128 + the signal; --resume then ends with the weights of a run never stopped. The signal
    ended the process, losing every step since the last checkpoint (here: all, save_every 0)."""
    import perpair.train.loop as loop
    from perpair.train import load_config, train

    def settings(out, **extra):
        return load_config(None, {"model": str(tiny_model), "data": str(uf_pairs), "out": str(out), "steps": 5,
                                  "batch_size": 4, "max_length": 96, "lr": 1e-3, "lr_schedule": "cosine",
                                  "warmup_ratio": 0.2, "threads": 1, "reference_cache": str(tmp_path / "ref"),
                                  **extra})

    train(settings(tmp_path / "straight"))
    save, saving = loop.save_checkpoint, []

    def save_signalled(*args, **kwargs):  # a second signal while the checkpoint is written
        saving.append(args[1])
        os.kill(os.getpid(), signal.SIGTERM)
        return save(*args, **kwargs)

    def unhandled(signum, frame):  # what the signal did without a handler of the run's (ended the process)
        raise AssertionError(f"{signal.Signals(signum).name} reached the process's own handler")

    monkeypatch.setattr(loop, "save_checkpoint", save_signalled)
    out = tmp_path / "stopped"
    previous = {s: signal.signal(s, unhandled) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with pytest.raises(TrainingStopped) as stopped:
            train(settings(out), on_step=lambda m: m["step"] == 2 and os.kill(os.getpid(), number))
        assert signal.getsignal(number) is unhandled  # the run's handlers are gone with it
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert stopped.value.exit_code == status
    assert str(stopped.value) == (f"stopped by {signal.Signals(number).name} after step 2 of 5: checkpoint "
                                  f"{out / 'checkpoints' / 'step-00000002'}; rerun with --resume to continue")
    assert saving == [2] and [c.name for c in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert [m["step"] for m in _metrics(out)] == [1, 2] and not (out / "model").exists()
    monkeypatch.setattr(loop, "save_checkpoint", save)
    train(settings(out, resume=True))
    a, b = _metrics(tmp_path / "straight"), _metrics(out)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], abs=1e-6)
    wa, wb = _weights(tmp_path / "straight"), _weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("phase", ["tokenizing", "reference pass"])
def test_a_stop_signal_before_training_stops_at_once(tiny_model, uf_pairs, tmp_path, monkeypatch, phase):
    """SIGTERM while the pairs are tokenized or during the reference pass (or the model's loading): nothing to save
    yet, the run stops there with its one line and status 143; it died without a word, and while tokenizing it was
    an error about the pair being tokenized (`error: PAIRS: pair ID: stopped by SIGTERM …`, exit 2)."""
    import perpair.train.batches as batches
    from perpair.train import load_config, train

    def unhandled(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} reached the process's own handler")

    def tokenize_signalled(*args, **kwargs):  # the signal arrives inside the tokenization of the first pair
        os.kill(os.getpid(), signal.SIGTERM)
        return tokenize(*args, **kwargs)

    tokenize = batches.tokenize_pair
    if phase == "tokenizing":
        monkeypatch.setattr(batches, "tokenize_pair", tokenize_signalled)
    config = load_config(None, {"model": str(tiny_model), "data": str(uf_pairs), "out": str(tmp_path / "run"),
                                "steps": 3, "batch_size": 2, "max_length": 64, "threads": 1,
                                "reference_cache": str(tmp_path / "ref")})
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.raises(TrainingStopped, match=r"^stopped by SIGTERM before training \(tokenizing, loading, the "
                                               r"reference pass\); rerun with --resume to continue$") as stopped:
            train(config, on_reference=lambda done, total: os.kill(os.getpid(), signal.SIGTERM))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.exit_code == 143
    assert not (tmp_path / "run" / "metrics.jsonl").is_file() or not _metrics(tmp_path / "run")


def test_sigterm_to_perpair_train_is_one_line_and_exit_143(tiny_model, uf_pairs, tmp_path):
    """The command line a job scheduler stops: one line naming the signal, the step and its checkpoint, and exit
    143, so the job reads as stopped, not finished. It died at once (status -15), nothing said, the steps since the
    last checkpoint lost."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "perpair", "train", "--model", str(tiny_model), "--data", str(uf_pairs),
           "--out", str(out), "--threads", "1", "--set", f"reference_cache={tmp_path / 'refcache'}",
           "--steps", "40", "--batch-size", "4", "--max-length", "96", "--save-every-minutes", "30"]
    with (tmp_path / "stderr").open("w") as stderr:
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1) \
                and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143, (tmp_path / "stderr").read_text()[-3000:]
    shown = (tmp_path / "stderr").read_text()
    assert "Traceback" not in shown and "error" not in shown and shown.count("stopped") == 1, shown[-3000:]
    step = len(_metrics(out))
    assert 1 <= step < 40
    assert shown.splitlines()[-1:] == [f"stopped by SIGTERM after step {step} of 40: checkpoint {out / 'checkpoints'}/"
                     f"step-{step:08d}; rerun with --resume to continue"], shown[-3000:]
    assert [c.name for c in (out / "checkpoints").iterdir()] == [f"step-{step:08d}"]


def test_precision_auto_is_keyed_as_it_resolves_and_earlier_keys_still_resume(tiny_model, uf_pairs, tmp_path,
                                                                               monkeypatch):
    """precision auto is bf16 autocast on a GPU with it, float32 elsewhere, and run.key held "auto": a run stopped
    on a GPU node and resumed on a CPU one (or back) went on in the other precision, half of one and half of the
    other, exit 0. The key holds the precision as it resolves; a run.key an earlier perpair wrote ("auto") is still
    this run's, so an upgrade loses no run."""
    import perpair.train.setup as setup
    from perpair.train import load_config
    from perpair.train.checkpoints import check_out, earlier_run_keys, run_key

    out = tmp_path / "out"
    config = load_config(None, {"model": str(tiny_model), "data": str(uf_pairs), "out": str(out), "steps": 2,
                                "batch_size": 2, "resume": True})
    on_cpu = run_key(config)
    assert run_key(config, memory=True) == earlier_run_keys(config)[1]  # float32 where it runs: the key as it was
    monkeypatch.setattr(setup, "uses_bf16", lambda c: c.precision in ("auto", "bf16"))  # as on a GPU with bf16
    on_gpu = run_key(config)
    assert on_gpu != on_cpu and on_gpu == run_key(config.model_copy(update={"precision": "bf16"}))
    out.mkdir()
    earlier = run_key(config, resolved=False, memory=True)
    (out / "run.key").write_text(earlier + "\n")  # a run claimed by an earlier perpair on this GPU: resumed
    (out / "metrics.jsonl").write_text("{}\n")
    assert check_out(config) == earlier
    monkeypatch.undo()
    (out / "run.key").write_text(on_gpu + "\n")  # claimed on a GPU, resumed on a CPU: another run
    with pytest.raises(PerpairError, match=r"holds another run \(its run.key differs"):
        check_out(config)


def test_trainings_of_two_precisions_run_one_after_the_other_in_one_process(tiny_model, uf_pairs, tmp_path):
    """Accelerate keeps one mixed precision per process: a second training in another precision (perpair run's
    arms in the run's process, a notebook) ended in Accelerate's "AcceleratorState has already been initialized"
    traceback. Each training now gets its own, and its metrics are those of a training alone in its precision."""
    from accelerate.state import AcceleratorState

    from perpair.train import load_config, train

    def run(name: str, precision: str) -> list[dict]:
        train(load_config(None, {"model": str(tiny_model), "data": str(uf_pairs), "out": str(tmp_path / name),
                                 "steps": 2, "batch_size": 2, "max_length": 64, "threads": 1, "save_model": False,
                                 "precision": precision, "reference_cache": str(tmp_path / "ref")}))
        return _metrics(tmp_path / name)

    AcceleratorState._reset_state(reset_partial_state=True)  # (what the tests before left)
    fp32, bf16, again = run("fp32", "fp32"), run("bf16", "bf16"), run("fp32-again", "fp32")
    assert [m["loss"] for m in again] == [m["loss"] for m in fp32]
    assert [m["loss"] for m in bf16] != [m["loss"] for m in fp32]  # (bf16 autocast: other numbers)
    assert AcceleratorState().mixed_precision == "no"


def test_checkpoints_by_the_clock(tiny_model, uf_pairs, tmp_path, monkeypatch):
    """save_every_minutes (default 30): a checkpoint after the first step that ends 30 minutes after the last one,
    so that a run killed without warning loses at most that much; a short run writes none but its last. A run
    without save_every wrote its first checkpoint at its end: killed at hour 3, it started again from step 1."""
    import perpair.train.loop as loop
    from perpair.train import load_config, train
    from perpair.train.checkpoints import run_key

    def run(name):
        out = tmp_path / name
        train(load_config(None, {"model": str(tiny_model), "data": str(uf_pairs), "out": str(out), "steps": 6,
                                 "batch_size": 2, "max_length": 64, "threads": 1, "save_model": False,
                                 "keep_checkpoints": 5, "reference_cache": str(tmp_path / "ref")}))
        return [c.name for c in (out / "checkpoints").iterdir()]

    assert run("short") == ["step-00000006"]
    # when to checkpoint is not what a run computes: a run resumed with another interval is the same run
    config = load_config(None, {"model": str(tiny_model), "data": str(uf_pairs), "out": str(tmp_path / "short"),
                                "steps": 6, "batch_size": 2, "save_every_minutes": 5})
    assert run_key(config) == run_key(config.model_copy(update={"save_every_minutes": 60}))
    minutes = iter(range(0, 1000, 11))  # 11 minutes a step: the interval's 30 end in step 3, then in step 6
    monkeypatch.setattr(loop, "clock", lambda: 60.0 * next(minutes), raising=False)
    assert sorted(run("long")) == ["step-00000003", "step-00000006"]


def test_no_final_checkpoint_leaves_no_clock_checkpoint(tiny_model, uf_pairs, tmp_path, monkeypatch):
    """final_checkpoint false: a run that finishes removes the checkpoints the clock wrote (each holds the
    optimizer state, ~96 GB for an 8B model) and keeps those save_every asked for. A run longer than
    save_every_minutes left its clock checkpoints in OUT after it finished."""
    import perpair.train.loop as loop
    from perpair.train import load_config, train

    minutes = iter(range(0, 1000, 11))  # 11 minutes a step: the clock's 30 end in step 3 (then 6, 9)
    monkeypatch.setattr(loop, "clock", lambda: 60.0 * next(minutes), raising=False)
    written = []
    save_checkpoint = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda out, step, *rest: (written.append(step),
                                                                           save_checkpoint(out, step, *rest)))

    def run(name, **extra):
        out = tmp_path / name
        train(load_config(None, {"model": str(tiny_model), "data": str(uf_pairs), "out": str(out), "steps": 10,
                                 "batch_size": 2, "max_length": 64, "threads": 1, "final_checkpoint": False,
                                 "keep_checkpoints": 5, "reference_cache": str(tmp_path / "ref"), **extra}))
        return sorted(c.name for c in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []

    assert run("clock") == [] and written == [3, 6, 9]  # the clock wrote them, the end removed them
    assert (tmp_path / "clock" / "model").is_dir()
    written.clear()
    assert run("both", save_every=4) == ["step-00000004", "step-00000008"]
    assert written == [3, 4, 7, 8]  # (the clock's count starts again at each checkpoint)
    # each records why it was written: a resume with another save_every (3) keeps the first attempt's (they went)
    from perpair.train.checkpoints import drop_resume_points
    drop_resume_points(tmp_path / "both", 3)
    assert sorted(c.name for c in (tmp_path / "both" / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]


def test_keep_checkpoints_counts_the_checkpoints_asked_for(tiny_model, uf_pairs, tmp_path, monkeypatch):
    """keep_checkpoints keeps the newest of save_every's; a checkpoint of the clock stays only while it is the
    newest. The clock's counted too: with keep 2, the clock's after step 7 pushed out step 4's, and the run, which
    removed the clock's at its end (final_checkpoint false), left one checkpoint of the two asked for."""
    import perpair.train.loop as loop
    from perpair.train import load_config, train

    minutes = iter(range(0, 1000, 11))  # 11 minutes a step: the clock's 30 end in step 3, then 7
    monkeypatch.setattr(loop, "clock", lambda: 60.0 * next(minutes), raising=False)
    out, on_disk = tmp_path / "run", []
    save_checkpoint = loop.save_checkpoint

    def saved(*args):
        save_checkpoint(*args)
        on_disk.append([int(c.name.removeprefix("step-")) for c in sorted((out / "checkpoints").iterdir())])

    monkeypatch.setattr(loop, "save_checkpoint", saved)
    train(load_config(None, {"model": str(tiny_model), "data": str(uf_pairs), "out": str(out), "steps": 10,
                             "batch_size": 2, "max_length": 64, "threads": 1, "final_checkpoint": False,
                             "save_every": 4, "keep_checkpoints": 2, "save_model": False,
                             "reference_cache": str(tmp_path / "ref")}))
    assert on_disk == [[3], [4], [4, 7], [4, 8]]
    assert sorted(c.name for c in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]


def test_a_checkpoint_cut_short_by_a_kill_does_not_stay_in_out(tiny_model, uf_pairs, tmp_path):
    """A kill in the middle of writing a checkpoint (SIGKILL after a preemption's grace period, while an FSDP run
    wrote its shards) leaves its temporary folder, which a resume never reads: the resumed run's next checkpoint,
    or its end without a final one, removes it. It stayed in OUT for good (up to a whole checkpoint: ~96 GB for an
    8B model), unless a checkpoint of the very same step was written again."""
    from perpair.train import load_config, train
    from perpair.train.checkpoints import drop_resume_points

    out = tmp_path / "run"

    def run(**extra):
        train(load_config(None, {"model": str(tiny_model), "data": str(uf_pairs), "out": str(out), "steps": 4,
                                 "batch_size": 2, "max_length": 64, "threads": 1, "save_every": 2,
                                 "save_model": False, "reference_cache": str(tmp_path / "ref"), **extra}))

    run()
    folders = out / "checkpoints"
    shutil.rmtree(folders / "step-00000004")  # killed in step 3's timed checkpoint, half of it written:
    cut = folders / ".step-00000003.tmp"
    shutil.copytree(folders / "step-00000002", cut)
    (cut / "state.json").unlink()
    run(resume=True)
    assert sorted(p.name for p in folders.iterdir()) == ["step-00000002", "step-00000004"]
    cut.mkdir()  # and a run that finishes without a final checkpoint, writing none after it
    drop_resume_points(out, 2)
    assert sorted(p.name for p in folders.iterdir()) == ["step-00000002", "step-00000004"]


def test_the_model_is_saved_whole_or_not_at_all(tiny_model, uf_pairs, tmp_path, monkeypatch):
    """OUT/model appears once every file of it is written: a save that fails half-way (a full disk; a kill) leaves
    none, and a resumed run's failed save leaves the complete model that was there. A half-written OUT/model (the
    weights without the tokenizer) looked like a model."""
    import perpair.train.loop as loop
    from perpair.train import load_config, train

    out = tmp_path / "run"

    def settings(**extra):
        return load_config(None, {"model": str(tiny_model), "data": str(uf_pairs), "out": str(out), "steps": 2,
                                  "batch_size": 2, "max_length": 64, "threads": 1,
                                  "reference_cache": str(tmp_path / "ref"), **extra})

    load_tokenizer = loop.load_tokenizer

    def failing_save(config):
        tokenizer = load_tokenizer(config)

        def full_disk(*args, **kwargs):
            raise OSError(28, "No space left on device")

        tokenizer.save_pretrained = full_disk
        return tokenizer

    monkeypatch.setattr(loop, "load_tokenizer", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train(settings())
    assert not (out / "model").exists()
    monkeypatch.setattr(loop, "load_tokenizer", load_tokenizer)
    train(settings(resume=True))
    files = {p.name: p.read_bytes() for p in (out / "model").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files.keys()
    monkeypatch.setattr(loop, "load_tokenizer", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train(settings(resume=True))
    assert {p.name: p.read_bytes() for p in (out / "model").iterdir()} == files


def test_packing_several_pairs_per_forward_changes_nothing(tiny_model, uf_pairs, tmp_path):
    """Reduction by the pairs of the whole step: one pair per forward, the default packing (4 × max_length
    tokens per forward) or all four packed together give the same losses."""
    args = ("--steps", "3", "--batch-size", "4", "--max-length", "96", "--lr", "1e-3", "--set", "save_model=false")
    _train(tiny_model, uf_pairs, tmp_path / "one", *args, "--set", "tokens_per_forward=0")
    default = _train(tiny_model, uf_pairs, tmp_path / "default", *args)
    _train(tiny_model, uf_pairs, tmp_path / "packed", *args, "--set", "tokens_per_forward=1000")
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("one", "default", "packed")]
    assert [s["tokens_per_forward"] for s in summaries] == [0, 4 * 96, 1000]
    # recompute_mlp's budget, 15% of 16 bytes a parameter, over one MLP's gate and up in a 384-token forward
    config = json.loads((tiny_model / "config.json").read_text())
    parameters = sum(p.numel() for p in load_file(tiny_model / "model.safetensors").values())
    per_mlp = 2 * config["intermediate_size"] * 4 * 4 * 96
    kept = min(int(0.15 * (16 * parameters)) // per_mlp, config["num_hidden_layers"])
    assert summaries[1]["mlp_gate_up_kept"] == {"longest_forward": 384, "mlps": kept,
                                                "of": config["num_hidden_layers"]}
    assert f"gate/up kept in the last {kept} of {config['num_hidden_layers']} recomputing MLPs at the longest " \
           "forward, 384 tokens" in default.stdout
    for name in ("default", "packed"):
        for x, y in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / name), strict=True):
            assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
            assert y["logps_chosen"] == pytest.approx(x["logps_chosen"], rel=1e-5)


def _mixdpo_plan(pairs: Path, tmp_path: Path) -> Path:
    """MixDPO's preset (ratings margin, τ routing to SFT, cDPO ε = 0.1, β = 0.01) with τ = 2 and a shuffled
    curriculum, so the first batches mix SFT and preference pairs in an order unlike the file's."""
    schedule = tmp_path / "schedule.yaml"
    schedule.write_text("routing: {tau: 2.0}\ncurriculum: {kind: random}\n")
    plan = tmp_path / "plan.parquet"
    run_cli("plan", pairs, "--preset", "mixdpo", "--config", schedule, "-o", plan, "--no-report")
    return plan


def test_shuffle_with_a_plan_only_without_curriculum(uf_pairs, tmp_path):
    """A plan with curriculum none leaves the order free: --shuffle gives a seeded permutation of its trained
    pairs. A plan with a curriculum fixes the order: --shuffle is refused, naming the curriculum."""
    from perpair.train import load_config
    from perpair.train.batches import load_data

    plans = {}
    for kind in ("none", "random"):
        schedule = tmp_path / f"{kind}.yaml"
        schedule.write_text(f"routing: {{tau: 2.0}}\ncurriculum: {{kind: {kind}}}\n")
        plans[kind] = tmp_path / f"{kind}.parquet"
        run_cli("plan", uf_pairs, "--preset", "mixdpo", "--config", schedule, "-o", plans[kind], "--no-report")

    def data(plan, shuffle, seed=0):
        config = load_config(None, {"model": "m", "data": str(uf_pairs), "out": str(tmp_path / "o"), "steps": 1,
                                    "plan": str(plan), "shuffle": shuffle, "seed": seed})
        return load_data(config, accelerator=None)

    fixed = data(plans["none"], False)
    assert fixed.source == "plan" and fixed.order.tolist() == sorted(fixed.order.tolist())  # none = file order
    shuffled = data(plans["none"], True)
    assert shuffled.source == "plan, shuffled"
    assert sorted(shuffled.order.tolist()) == fixed.order.tolist()  # the same pairs (drops stay dropped) …
    assert shuffled.order.tolist() != fixed.order.tolist()  # … in another order,
    assert np.array_equal(data(plans["none"], True).order, shuffled.order)  # seeded
    assert not np.array_equal(data(plans["none"], True, seed=1).order, shuffled.order)
    with pytest.raises(PerpairError, match="curriculum 'random' fixes the training order.*drop shuffle"):
        data(plans["random"], True)
    assert data(plans["random"], False).source == "plan"


def _edited(plan: Path, out: Path, edit) -> Path:
    """``plan`` with ``edit(columns)`` applied to its columns (a dict of lists), its provenance kept: a plan edited
    by hand after perpair plan wrote it."""
    table = pq.read_table(plan)
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    edit(columns)
    rows = len(columns["pair_id"])
    edited = pa.table({name: values if isinstance(values, pa.Array) else pa.array(values, table.schema.field(name).type)
                       for name, values in columns.items()})  # (an edit may give a column of its own type)
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), out)
    assert rows == edited.num_rows
    return out


def _set(column: str, row: int, value):
    return lambda columns: columns[column].__setitem__(row, value)


def _drop_rows(columns):
    for values in columns.values():
        del values[10:]


@pytest.mark.parametrize(("edit", "message"), [
    (_set("route", 0, "SFT"), r"row 1, field 'route': route 'SFT': expected one of preference, sft, drop"),
    (_set("pair_id", 0, "nowhere"), r"row 1, field 'pair_id': pair 'nowhere' is not in the pairs file"),
    (lambda c: c["pair_id"].__setitem__(1, c["pair_id"][0]), r"row 2, field 'pair_id': pair '\w+' appears twice"),
    (_drop_rows, r"the plan covers 10 of the \d+ pairs of .*a plan has a row for every pair"),
    (_set("order", 3, None), r"row 4, field 'order': a pair routed to (sft|preference) has no order position"),
    (lambda c: c["order"].__setitem__(1, c["order"][0]), r"field 'order': order \d+ is given to two trained pairs"),
    (lambda c: c.__setitem__("label_smoothing", [0.7] * len(c["pair_id"])),
     r"a trained pair has label_smoothing 0.7; it must be in \[0, 0.5\)"),
    (lambda c: c.__setitem__("flipped", pa.array(["no"] * len(c["pair_id"]))),
     r"field 'flipped': column has type string, a plan's is bool \(Failed to parse value: no\)"),
])
def test_a_plan_edited_into_something_else_is_refused_naming_where(tiny_model, uf_pairs, tmp_path, edit, message):
    """plan.parquet is there to be read (and maybe edited): what perpair plan never writes (a route it does not
    know, a pair of another file, a pair twice or not at all, a trained pair without its own position, ε ≥ 0.5) is
    one error naming the plan's row and field. They were trained: 'SFT' as a preference pair, the pairs without a
    row or position left out, a pair twice, ε 0.7 (the opposite preference), flipped written as text 'no' (every
    pair flipped: a non-empty string is true); a foreign pair_id was a traceback."""
    plan = _edited(_mixdpo_plan(uf_pairs, tmp_path), tmp_path / "edited.parquet", edit)
    result = _train(tiny_model, uf_pairs, tmp_path / "out", "--plan", plan, "--steps", "1", "--batch-size", "2",
                    "--max-length", "96", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.search(message, result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_mixdpo_plan_routes_sft_pairs_in_plan_order(tiny_model, uf_pairs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perpair.data import read_pairs
    from perpair.train import sequence_logps

    plan_path = _mixdpo_plan(uf_pairs, tmp_path)
    out = tmp_path / "run"
    result = _train(tiny_model, uf_pairs, out, "--plan", plan_path, "--steps", "3", "--batch-size", "8",
                    "--max-length", "96", "--lr", "1e-3", "--set", "save_model=false")
    assert "order: plan" in result.stdout
    metrics = _metrics(out)

    # The plan's order, skipping the pairs whose prompt fills max_length (as TRL does).
    plan = pq.read_table(plan_path).to_pandas()
    plan = plan[plan["route"] != "drop"].sort_values("order")
    pairs, _ = read_pairs(str(uf_pairs))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    row_of = {pid: i for i, pid in enumerate(pairs.column("pair_id").to_pylist())}
    logps = sequence_logps(model, tokenizer, pairs.take([row_of[p] for p in plan["pair_id"][:60]]), max_length=96)
    ordered = plan.set_index("pair_id").loc[logps.column("pair_id").to_pylist()]
    routes = ordered["route"].to_numpy()
    assert metrics[0]["beta_mean"] == pytest.approx(0.01)
    for step, m in enumerate(metrics):
        in_batch = routes[step * 8:(step + 1) * 8]
        assert m["pairs_sft"] == int((in_batch == "sft").sum())
        assert m["pairs_preference"] == int((in_batch == "preference").sum())
        assert m["categories"] == {"unannotated": 8}  # a plan from ratings: no category (it said {"None": 8})
    assert sum(m["pairs_sft"] for m in metrics) > 0 and sum(m["pairs_preference"] for m in metrics) > 0

    # Step 1 runs on the initial weights, which are also the reference: every DPO margin is 0, so a cDPO
    # pair's loss is log 2, and an SFT pair's is its chosen response's length-normalised NLL.
    first = logps.slice(0, 8).to_pydict()
    sft = np.array(first["chosen_logps"]) / np.array(first["chosen_tokens"])
    expected = np.where(routes[:8] == "sft", -sft, math.log(2)).mean()
    assert metrics[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics[0]["loss_sft"] == pytest.approx(-sft[routes[:8] == "sft"].mean(), rel=1e-5)


# The settings of the two-process runs compared with one process's (tests below).
TWO_ARGS = ("--steps", "3", "--batch-size", "4", "--max-length", "96", "--lr", "1e-4", "--threads", "1",
            "--set", "save_model=false")


@pytest.fixture(scope="module")
def one_process(tiny_model, uf_pairs, tmp_path_factory) -> Path:
    """TWO_ARGS trained by one process, its reference cache computed by it (OUT/../refcache): the run, and the
    reference log-probs, that two processes must give. Never changed."""
    out = tmp_path_factory.mktemp("one") / "out"
    _train(tiny_model, uf_pairs, out, *TWO_ARGS)
    return out


@pytest.mark.slow
def test_two_processes_equal_one_and_share_the_reference_pass(tiny_model, uf_pairs, one_process, tmp_path):
    """Two processes train as one does (the batch split between them; the first reports for both, each line once),
    and each computes its share of the missing reference log-probs, none twice. They were all computed by the first
    process while the others waited in a barrier: on 8 GPUs the recipes' 34-38 min pass (examples/README.md)
    outlasted NCCL's 10-minute collective timeout, killing the run. The summary's peak memory is the largest of the
    processes'."""
    record = tmp_path / "computed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PERPAIR_TEST_RECORD": str(record),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521",
         "-m", "perpair_recording_reference", "train", "--model", str(tiny_model), "--data", str(uf_pairs),
         "--out", str(tmp_path / "two"), "--set", f"reference_cache={tmp_path / 'two-cache'}", *TWO_ARGS],
        capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes" not in result.stderr  # no error about the batch split
    shown = result.stdout + result.stderr  # the first process reports for both: each line once
    assert shown.count("step 1/3") == 1 and shown.count("trained 3 steps") == 1, shown[-3000:]
    shares = [Path(f"{record}.{rank}").read_text().splitlines() if Path(f"{record}.{rank}").exists() else []
              for rank in (0, 1)]
    assert all(shares), [len(s) for s in shares]  # both processes computed some
    assert not set(shares[0]) & set(shares[1]) and all(len(set(s)) == len(s) for s in shares)  # none twice
    (cache,) = (tmp_path / "two-cache").glob("*.parquet")
    assert pq.read_table(cache).num_rows == len(shares[0]) + len(shares[1]) == 12  # every pair of the 3 steps
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["reference_pairs_computed"] == 12
    assert summary["peak_memory_bytes"] == 2 * 2**20  # the second process's, the larger (it was the first's)

    two = _metrics(tmp_path / "two")
    assert len(two) == 3
    for x, y in zip(_metrics(one_process), two, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5)
        assert y["reward_margin"] == pytest.approx(x["reward_margin"], abs=1e-5)
        assert y["logps_chosen"] == pytest.approx(x["logps_chosen"], rel=1e-5)


def _recording(tmp_path: Path, record: str, **env: str) -> dict[str, str]:
    """The environment of ``python -m perpair_recording_reference`` (tests/perpair_recording_reference.py)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PERPAIR_TEST_RECORD": str(tmp_path / record), **env,
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


def _cache_name(folder: Path) -> Path:
    """The one cache file of ``folder``, existing or named by its parts."""
    (name,) = {p.name.partition(".part-")[0] for p in folder.iterdir()}
    return folder / name


@pytest.mark.slow
def test_a_killed_reference_pass_keeps_what_it_saved_and_the_same_command_computes_the_rest(
        tiny_model, uf_pairs, tmp_path):
    """A training killed during its reference pass (SIGKILL: preempted, out of memory; no handler runs) keeps the
    pairs its pass saved as it went (here after every forward); the same command run again computes only the
    others, and folds them all into the cache file. The pass kept nothing: the rerun computed every pair again."""
    from perpair.train import reference

    cache = tmp_path / "refcache"
    args = ["train", "--model", str(tiny_model), "--data", str(uf_pairs), "--out", str(tmp_path / "out"),
            "--steps", "6", "--batch-size", "2", "--max-length", "64", "--threads", "1",
            "--set", f"reference_cache={cache}"]  # 12 pairs: the first step's 2 from its forward, 10 in the pass
    killed = subprocess.run([sys.executable, "-m", "perpair_recording_reference", *args], capture_output=True,
                            text=True, env=_recording(tmp_path, "killed", PERPAIR_TEST_KILL="0:3"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    path = _cache_name(cache)
    kept = reference.load_cached(path)
    assert not path.exists() and 3 <= len(kept) < 10

    result = subprocess.run([sys.executable, "-m", "perpair", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["reference_pairs_computed"] == 10 - len(kept)
    assert [p.name for p in cache.iterdir()] == [path.name] and len(reference.load_cached(path)) == 12


@pytest.mark.slow
def test_two_processes_killed_in_their_reference_pass_keep_their_shares(tiny_model, uf_pairs, one_process, tmp_path):
    """Two processes whose second is killed in the reference pass (the launcher then stops the first): each kept
    the pairs it computed, in a part file of its own (no collective: their shares end at different times). The
    same launch again computes only the others, and the cache holds every pair with a one-process pass's values."""
    from perpair.train import reference

    cache = tmp_path / "refcache"

    def launch(record, **env):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", "29529", "-m", "perpair_recording_reference", "train", "--model",
                               str(tiny_model), "--data", str(uf_pairs), "--out", str(tmp_path / "two"), *TWO_ARGS,
                               "--set", f"reference_cache={cache}"],
                              capture_output=True, text=True, env=_recording(tmp_path, record, **env))

    killed = launch("killed", PERPAIR_TEST_KILL="1:2")
    assert killed.returncode != 0 and "(SIGKILL)" in killed.stderr, killed.stderr[-3000:]
    path = _cache_name(cache)
    kept = reference.load_cached(path)
    assert not path.exists() and 2 <= len(kept) < 12

    again = launch("again")
    assert again.returncode == 0, again.stderr[-3000:]
    computed = [line for rank in (0, 1) if (record := tmp_path / f"again.{rank}").exists()
                for line in record.read_text().splitlines()]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["reference_pairs_computed"] == len(computed) == 12 - len(kept)
    assert [p.name for p in cache.iterdir()] == [path.name]
    one = reference.load_cached(one_process.parent / "refcache" / path.name)  # computed in one process
    two = reference.load_cached(path)
    assert one.keys() == two.keys()
    for pair_id, values in one.items():
        assert two[pair_id][1::2] == values[1::2]  # token counts
        assert two[pair_id][0::2] == pytest.approx(values[0::2], rel=1e-5)


@pytest.mark.slow
def test_a_refusal_of_the_main_process_alone_stops_every_process_with_its_one_error(tiny_model, tmp_path):
    """DATA in another format is prepared by the first process alone: its refusal is one `error:` line, and every
    process exits with its status 2. The other process failed in its next collective instead, a gloo traceback
    ("Connection closed by peer") after the error."""
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": 5, "chosen": \n')
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523",
         "-m", "perpair", "train", "--model", str(tiny_model), "--data", str(data), "--out", str(tmp_path / "out"),
         "--steps", "1", "--batch-size", "2", "--threads", "1"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.jsonl, row 2" in errors[0], result.stderr[-3000:]
    assert "[rank" not in result.stderr, result.stderr[-3000:]  # no process's traceback
    assert "exitcode  : 2" in result.stderr, result.stderr[-3000:]  # torchrun's report: the first one exited 2


@pytest.mark.slow
def test_only_train_runs_under_a_launch_of_several_processes(tmp_path):
    """perpair run (or any stage but train) under torchrun would run whole in every process: it is refused, one
    `error:` line, before anything is written. The second process was refused as 'another perpair run' using the
    workdir (its own sibling) while the first one prepared the data."""
    workdir = tmp_path / "work"
    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29525",
         "-m", "perpair", "run", str(config), "--set", f"workdir={workdir}"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "perpair run runs in one process" in errors[0], result.stderr[-3000:]
    assert "only perpair train takes several" in errors[0]
    assert not workdir.exists()


@pytest.mark.slow
def test_two_processes_exit_after_training(tiny_model, uf_pairs, tmp_path):
    """Every process of a launch exits once the run is done. The second hung at the return of train() in about 1
    run of 10 under load (3 of 17 in a row once): gloo's worker thread releases the last collective's tensors, which
    takes the GIL, while the DDP module's teardown joins that thread holding it (processes.let_collectives_finish).
    A race, so several runs (each hung or not)."""
    for run in range(4):
        try:
            result = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                 str(29541 + run), "-m", "perpair", "train", "--model", str(tiny_model), "--data", str(uf_pairs),
                 "--out", str(tmp_path / f"run{run}"), "--steps", "1", "--batch-size", "2", "--max-length", "64",
                 "--threads", "1", "--lora", "--set", "lora.r=4", "--set", f"reference_cache={tmp_path / 'ref'}"],
                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
                start_new_session=True)
        except subprocess.TimeoutExpired:
            for line in subprocess.run(["pgrep", "-f", str(tmp_path / f"run{run}")], capture_output=True,
                                       text=True).stdout.split():
                os.kill(int(line), signal.SIGKILL)  # the launcher and the process that hung
            pytest.fail(f"run {run + 1}: a process of the launch did not exit after training")
        assert result.returncode == 0, result.stderr[-3000:]


_LAUNCH_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _sigterm_to_the_second_process(command: list[str], out: Path, log: Path) -> str:
    """Launch ``command`` (two processes under torchrun), send SIGTERM to the second process alone once the first
    step's metrics are written, wait for the launch to end; what it printed."""
    with log.open("w") as written:
        launcher = subprocess.Popen(command, stdout=written, stderr=subprocess.STDOUT, env=_LAUNCH_ENV)
        deadline = time.monotonic() + 180
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size) \
                and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        second = next(int(pid) for pid in children
                      if "RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0"))
        os.kill(second, signal.SIGTERM)
        try:
            launcher.wait(timeout=120)
        finally:
            launcher.kill()
    return log.read_text()


@pytest.mark.slow
def test_sigterm_to_one_process_of_a_launch_stops_every_process_after_the_same_step(tiny_model, uf_pairs, tmp_path):
    """A signal may reach one process of a launch alone: every process stops after the same step and saves that
    step's checkpoint together (each its RNG state), the first one says so, and the launch exits 143. The process
    signalled died alone, the other one failed in its next collective."""
    out = tmp_path / "run"
    shown = _sigterm_to_the_second_process(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "perpair", "train", "--model", str(tiny_model), "--data", str(uf_pairs), "--out", str(out),
         "--steps", "40", "--batch-size", "4", "--max-length", "96", "--threads", "1",
         "--set", f"reference_cache={tmp_path / 'ref'}"], out, tmp_path / "log")
    step = len(_metrics(out))
    assert shown.count("stopped by SIGTERM") == 1 and f"after step {step} of 40" in shown, shown[-3000:]
    assert "exitcode  : 143" in shown, shown[-3000:]  # torchrun's report
    (checkpoint,) = (out / "checkpoints").iterdir()
    assert checkpoint.name == f"step-{step:08d}" and (checkpoint / "rng-1.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_resume_exactly_with_dropout(tiny_model, uf_pairs, tmp_path):
    """Each process draws its own dropout masks: a checkpoint keeps every process's RNG state, so two processes
    resumed from step 2 continue as the run that was not stopped (they all took the first process's state). The
    second process's RNG file damaged: refused by the first process too, in one line; the second alone refused it,
    which left the first in a collective ("[rank0]: Traceback … Connection closed by peer")."""
    args = ["--steps", "4", "--batch-size", "4", "--max-length", "96", "--lr", "1e-3", "--threads", "1", "--lora",
            "--set", "lora.r=4", "--set", "lora.dropout=0.3", "--save-every", "1", "--set", "keep_checkpoints=4",
            "--set", f"reference_cache={tmp_path / 'refcache'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def two(out, *extra, ok=True):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
             "-m", "perpair", "train", "--model", str(tiny_model), "--data", str(uf_pairs), "--out", str(out),
             *args, *extra], capture_output=True, text=True, env=env)
        assert (result.returncode == 0) == ok, result.stderr[-3000:]
        return result

    two(tmp_path / "straight")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed)  # its checkpoints, as the run wrote them
    checkpoint = resumed / "checkpoints" / "step-00000002"
    assert (checkpoint / "rng-1.safetensors").is_file()
    for late in ("step-00000003", "step-00000004"):  # as if killed after the checkpoint of step 2
        shutil.rmtree(resumed / "checkpoints" / late)
    shutil.rmtree(resumed / "adapter")

    rng = checkpoint / "rng-1.safetensors"
    whole = rng.read_bytes()
    rng.write_bytes(whole[: len(whole) // 2])
    result = two(resumed, "--resume", ok=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "exitcode  : 2" in result.stderr and "[rank0]: Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: checkpoint {checkpoint} is damaged or incomplete ("), \
        result.stderr[-3000:]
    assert errors[0].endswith("remove it to resume from the one before (step-00000001)")
    rng.write_bytes(whole)
    two(resumed, "--resume")
    a, b = _metrics(tmp_path / "straight"), _metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == x["loss"] and y["grad_norm"] == x["grad_norm"]
    wa = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    wb = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


FORCED_FSDP = Path(__file__).resolve().parents[1] / "benchmarks" / "fsdp_forced_cpu.py"
FSDP_ARGS = ("--steps", "8", "--batch-size", "4", "--max-length", "96", "--lr", "1e-3", "--lr-schedule", "cosine",
             "--warmup-ratio", "0.2", "--set", "tokens_per_forward=0", "--threads", "1")


def _fsdp(model, data, out: Path, *extra) -> list[str]:
    """Two gloo processes training through Accelerate's FSDP2 path, forced on CPU (benchmarks/fsdp_forced_cpu.py:
    Accelerate never chooses FSDP without a GPU); the command line. (--standalone: a free port of its own, as the
    run the tests compare with may be launched by two test workers at once.)"""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(FORCED_FSDP), "--worker", "train", "--model", str(model), "--data", str(data), "--out", str(out),
            "--set", f"reference_cache={out.parent / 'refcache'}", *FSDP_ARGS, *extra]



FSDP_CHECKPOINTS = ("--save-every", "2", "--set", "keep_checkpoints=3")


@pytest.fixture(scope="module")
def fsdp_straight(tiny_model, uf_pairs, tmp_path_factory) -> Path:
    """8 steps of two FSDP processes, never stopped, with a checkpoint every 2 steps (3 kept): the run the resumed
    ones must equal, and whose checkpoints a resume starts from (writing them changes nothing in the run)."""
    out = tmp_path_factory.mktemp("fsdp") / "straight"
    result = subprocess.run(_fsdp(tiny_model, uf_pairs, out, *FSDP_CHECKPOINTS), capture_output=True, text=True,
                            env=_LAUNCH_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _same_run(a: Path, b: Path) -> None:
    """The metrics of every step and the final weights of two runs, exactly."""
    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in mb] == [m["step"] for m in ma] == list(range(1, 9))
    for x, y in zip(ma, mb, strict=True):
        assert (y["loss"], y["grad_norm"], y["lr"]) == (x["loss"], x["grad_norm"], x["lr"]), y["step"]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_fsdp_checkpoints_hold_every_processs_shards_and_resume_exactly(tiny_model, uf_pairs, fsdp_straight,
                                                                        tmp_path):
    """Under FSDP each process writes its shards of the weights and Adam states (no process gathers them), and
    two FSDP processes resumed from step 4 continue as the run never stopped: the same losses, gradient norms and
    final weights. keep_checkpoints holds; a checkpoint with a shard cut short is refused, naming it, before
    anything is restored or rewritten; a run without FSDP refuses the sharded checkpoint. These options were
    refused under FSDP ("resumable checkpoints are not supported under FSDP yet"): a preempted or crashed FSDP run
    started again from step 1."""
    out = tmp_path / "run"

    def launch(*extra):
        return subprocess.run(_fsdp(tiny_model, uf_pairs, out, *FSDP_CHECKPOINTS, *extra), capture_output=True,
                              text=True, env=_LAUNCH_ENV)

    shutil.copytree(fsdp_straight, out)  # its checkpoints, as the run wrote them
    folders = out / "checkpoints"
    assert sorted(c.name for c in folders.iterdir()) == ["step-00000004", "step-00000006", "step-00000008"]
    checkpoint = folders / "step-00000004"
    shards = sorted((checkpoint / "shards").iterdir())
    assert len(shards) == 2 and not (checkpoint / "model.safetensors").exists()  # one file of shards per process
    for late in ("step-00000006", "step-00000008"):  # as if killed after the checkpoint of step 4
        shutil.rmtree(folders / late)
    shutil.rmtree(out / "model")
    written = _metrics(out)

    whole = shards[0].read_bytes()
    shards[0].write_bytes(whole[: len(whole) // 2])  # a disk that filled while it was written
    result = launch("--resume")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr and errors == [
        f"error: checkpoint {checkpoint} is damaged or incomplete (shards/{shards[0].name} holds {len(whole) // 2} "
        f"bytes, not the {len(whole)} written); remove it, or start again with --overwrite"], result.stderr[-3000:]
    assert _metrics(out) == written
    shards[0].write_bytes(whole)
    # the second process's RNG states cut short: refused by the first process as well, not by the second alone,
    # which left the first in a collective ("[rank0]: Traceback … Connection closed by peer", killed by torchrun)
    rng = checkpoint / "rng-1.safetensors"
    whole = rng.read_bytes()
    rng.write_bytes(whole[: len(whole) // 2])
    result = launch("--resume")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr and "[rank0]: Traceback" not in result.stderr
    assert len(errors) == 1 and errors[0].startswith(f"error: checkpoint {checkpoint} is damaged or incomplete ("), \
        result.stderr[-3000:]
    assert _metrics(out) == written
    rng.write_bytes(whole)

    result = _train(tiny_model, uf_pairs, out, *FSDP_ARGS, *FSDP_CHECKPOINTS, "--resume",
                    check=False)  # one process, no FSDP
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: checkpoint {checkpoint} was written by a run under FSDP; resume it under FSDP, as the run that "
        "wrote it"]

    result = launch("--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 4
    _same_run(fsdp_straight, out)


@pytest.mark.slow
def test_sigterm_stops_an_fsdp_run_with_its_checkpoint_and_resume_is_exact(tiny_model, uf_pairs, fsdp_straight,
                                                                           tmp_path):
    """SIGTERM to one process of an FSDP launch: every process finishes the step and writes its shards of that
    step's checkpoint, the line names it, the launch exits 143, and --resume continues as the run never stopped.
    It said "without a checkpoint (not supported under FSDP yet): a new run starts from step 1"."""
    out = tmp_path / "run"
    shown = _sigterm_to_the_second_process(_fsdp(tiny_model, uf_pairs, out), out, tmp_path / "log")
    step = len(_metrics(out))
    assert 1 <= step < 8, shown[-3000:]
    checkpoint = out / "checkpoints" / f"step-{step:08d}"
    assert [line for line in shown.splitlines() if "stopped by" in line] == [
        f"stopped by SIGTERM after step {step} of 8: checkpoint {checkpoint}; rerun with --resume to continue"]
    assert "exitcode  : 143" in shown, shown[-3000:]  # torchrun's report
    assert [c.name for c in (out / "checkpoints").iterdir()] == [checkpoint.name]
    assert len(list((checkpoint / "shards").iterdir())) == 2 and (checkpoint / "rng-1.safetensors").is_file()
    result = subprocess.run(_fsdp(tiny_model, uf_pairs, out, "--resume"), capture_output=True,
                            text=True, env=_LAUNCH_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == step
    _same_run(fsdp_straight, out)


@pytest.mark.slow
def test_an_fsdp_lora_run_with_dropout_resumes_exactly(tiny_model, uf_pairs, tmp_path):
    """LoRA under FSDP, with dropout: the checkpoint holds the adapter's shards and Adam states, not the frozen base
    (which a strict restore would miss: "Missing key(s) in state_dict"), and every process's RNG state; the run
    resumed from step 4 ends as it did."""
    out = tmp_path / "run"
    args = ("--lora", "--set", "lora.r=4", "--set", "lora.dropout=0.3", "--save-every", "4", "--set",
            "keep_checkpoints=2")
    for extra in ((), ("--resume",)):
        result = subprocess.run(_fsdp(tiny_model, uf_pairs, out, *args, *extra), capture_output=True,
                                text=True, env=_LAUNCH_ENV)
        assert result.returncode == 0, result.stderr[-3000:]
        if not extra:
            straight, adapter = _metrics(out), load_file(out / "adapter" / "adapter_model.safetensors")
            shutil.rmtree(out / "checkpoints" / "step-00000008")
            shutil.rmtree(out / "adapter")
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 4
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in _metrics(out)] == \
        [(m["step"], m["loss"], m["grad_norm"]) for m in straight]
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == adapter.keys() and all(torch.equal(resumed[k], adapter[k]) for k in adapter)


def test_a_checkpoint_without_fsdp_is_refused_by_a_run_under_fsdp(tiny_model, uf_pairs, tmp_path):
    """The reverse: a run under FSDP reads its shards, which a checkpoint written without FSDP does not hold; it
    is refused, naming it, before anything is read into the model."""
    from types import SimpleNamespace

    from perpair.train.checkpoints import load_checkpoint

    out = tmp_path / "run"
    _train(tiny_model, uf_pairs, out, "--steps", "1", "--batch-size", "2", "--max-length", "64", "--set",
           "save_model=false")
    first = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0)
    with pytest.raises(PerpairError, match=re.escape(
            f"checkpoint {out / 'checkpoints' / 'step-00000001'} was written by a run without FSDP; resume it "
            "without FSDP, as the run that wrote it")):
        load_checkpoint(out, first, None, None, None, sharded=True)


def test_raw_source_lora_and_adapter(tiny_model, tmp_path):
    """DATA may be a raw UltraFeedback file (prepared on the fly); --lora saves an adapter and a merged model."""
    out = tmp_path / "lora"
    result = _train(tiny_model, UF_TRAIN, out, "--steps", "2", "--batch-size", "2", "--max-length", "64",
                    "--lr", "1e-3", "--lora", "--set", "lora.r=4", "--set", "lora.merge=true")
    assert "pairs/s" in result.stdout and "peak memory" in result.stdout
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "model" / "config.json").is_file()
    assert (out / "pairs.parquet").is_file()
    m = _metrics(out)[0]
    for key in ("step", "loss", "seconds", "pairs", "tokens", "logps_chosen", "logps_rejected",
                "rewards_chosen", "rewards_rejected", "reward_accuracy", "beta_mean"):
        assert key in m

    # The base stays frozen and the merged model is base + (alpha / r)·B·A on every adapted layer, nothing else
    base, merged = load_file(tiny_model / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    adapted = {key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
               for key in adapter if key.endswith(".lora_A.weight")}
    assert adapted and merged.keys() == base.keys()
    for name, weight in base.items():
        module = name.removesuffix(".weight")
        if module in adapted:
            a = adapter[f"base_model.model.{module}.lora_A.weight"]
            b = adapter[f"base_model.model.{module}.lora_B.weight"]
            assert b.abs().max() > 0, f"{module}: the adapter did not train"
            torch.testing.assert_close(merged[name], weight + scale * b @ a, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(merged[name], weight), f"{name} changed although it has no adapter"


def test_data_converted_on_the_fly_says_what_it_left_and_a_changed_folder_is_another_run(tiny_model, tmp_path):
    """DATA that perpair train converts itself: prepare's report was dropped (a system prompt under another name went
    unread without a word, where perpair prepare names it), and a data folder was keyed by its path: rewritten
    between a stop and --resume, the checkpoint went on over other pairs, exit 0. Now the report is printed, and
    the folder is keyed by its files, as perpair run keys a folder source."""
    import datasets

    rows = [json.loads(line) for line in gzip.open(UF_TRAIN, "rt")][:10]
    folder = tmp_path / "data"
    datasets.Dataset.from_list([{**row, "system_prompt": "Be brief."} for row in rows[:8]]).save_to_disk(folder)
    out = tmp_path / "out"
    args = ("--steps", "3", "--batch-size", "2", "--max-length", "64", "--save-every", "1", "--set",
            "save_model=false")
    first = _train(tiny_model, folder, out, *args)
    said = " ".join(first.stdout.split())
    assert f"{folder} (" in said and "8 rows read, 8 pairs kept" in said, first.stdout
    assert re.search(r"fields not read: [^()]*system_prompt × 8[^()]* \(in each pair's meta only; scores, a system "
                     "message or a prompt under other names: perpair prepare with --score-chosen-col/"
                     "--score-rejected-col, --system-col, --prompt-col, then perpair train on its pairs file\\) "
                     f"wrote 8 train pairs to {re.escape(str(out / 'pairs.parquet'))}", said), first.stdout
    shutil.rmtree(out / "checkpoints" / "step-00000003")  # stopped after step 2
    datasets.Dataset.from_list(rows[2:10]).save_to_disk(tmp_path / "other")  # the folder rewritten
    shutil.rmtree(folder)
    (tmp_path / "other").rename(folder)
    again = _train(tiny_model, folder, out, *args, "--resume", check=False)
    assert again.returncode == 2 and "holds another run (it differs in data's contents)" in again.stderr, \
        again.stderr[-400:]


def test_an_adapter_names_its_base_by_an_absolute_path_and_merges_to_its_logits(tiny_model, uf_pairs, tmp_path,
                                                                                monkeypatch):
    """`--model models/tiny` (a path relative to the working directory) was recorded as such in the adapter's
    adapter_config.json: PEFT loading the adapter from anywhere else read it as a Hub id and failed. The adapter now
    names its base by an absolute path, and base + adapter, loaded from another directory by PEFT, gives the merged
    model's logits."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    work = tmp_path / "work"
    shutil.copytree(tiny_model, work / "models" / "tiny")
    monkeypatch.chdir(work)
    _train(Path("models/tiny"), uf_pairs, Path("runs/lora"), "--steps", "2", "--batch-size", "2", "--max-length",
           "64", "--lr", "1e-3", "--lora", "--set", "lora.r=4", "--set", "lora.merge=true")
    config = json.loads((work / "runs" / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(work / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    adapted = AutoPeftModelForCausalLM.from_pretrained(work / "runs" / "lora" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(work / "runs" / "lora" / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = (torch.arange(3, 40) * 7919 % merged.config.vocab_size)[None]
    with torch.no_grad():
        logits = adapted(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
        assert (logits - base(input_ids=ids).logits).abs().max() > 1e-4  # the adapter changed something


@pytest.mark.parametrize(("extra", "message"), [
    (("--loss", "ipo", "--set", "label_smoothing=0.1"), "label_smoothing 0.1 has no meaning for loss 'ipo'"),
    (("--set", "betas=0.1"), "unknown key 'betas'"),
    (("--beta", "-1"), "beta: Input should be greater than 0"),
    # refused, not trained: SFT would silently drop the plan's beta, label smoothing, routes and flips
    (("--loss", "sft", "--plan", "plan.parquet"), "loss 'sft' trains every pair's chosen response and would ignore"),
])
def test_bad_config_is_one_clear_error(tiny_model, uf_pairs, tmp_path, extra, message):
    result = _train(tiny_model, uf_pairs, tmp_path / "bad", "--steps", "1", *extra, check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_a_warm_up_of_every_step_of_one_epoch_is_refused(tiny_model, uf_pairs, tmp_path):
    """Without --steps the steps are known once the pairs are tokenized: a warm-up covering all of them (the
    learning rate never reaching --lr, the schedule's decay never starting) is refused then, before any step."""
    result = _train(tiny_model, uf_pairs, tmp_path / "out", "--batch-size", "4", "--max-length", "96",
                    "--warmup-ratio", "0.999", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert re.fullmatch(r"error: warmup_ratio 0.999 warms up for all (\d+) steps .* lower warmup_ratio \(the steps "
                        r"of one epoch\)", line), line
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_corrupt_pairs_file_is_one_error_naming_it(tiny_model, uf_pairs, tmp_path):
    """A pairs file whose footer reads but whose pages do not (it used to say only "error: ZSTD decompression
    failed: ...", naming nothing), a read asking for a column the file lacks (``ParquetFile.read`` would leave it
    out without a word), and a pairs file that is not there."""
    import pyarrow as pa

    from perpair.artifacts import read_parquet
    from perpair.errors import PerpairError

    data = bytearray(uf_pairs.read_bytes())
    for i in range(1000, 60000, 7):  # the first row group's pages; the footer at the end stays intact
        data[i] ^= 0xFF
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(bytes(data))
    result = _train(tiny_model, corrupt, tmp_path / "out", "--steps", "1", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: file {corrupt}: not a readable Parquet file (ZSTD decompression failed: Data corruption detected)"]
    assert read_parquet(uf_pairs, columns=["pair_id"]).column_names == ["pair_id"]
    with pytest.raises(PerpairError, match=f"file {uf_pairs}: no column 'route'"):
        read_parquet(uf_pairs, columns=["pair_id", "route"])
    assert isinstance(read_parquet(uf_pairs), pa.Table)
    missing = tmp_path / "missing.parquet"  # not Arrow's "[Errno 2] Failed to open local file ..."
    result = run_cli("inspect", missing, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: file {missing}: not found"]
    # a Hub dataset id, which the help promised ("any source perpair prepare reads"): prepared first, said so
    for data in ("trl-lib/ultrafeedback_binarized", "hub:trl-lib/ultrafeedback_binarized",
                 "allenai/tulu-2.5-preference-data"):
        result = _train(tiny_model, data, tmp_path / "hub", "--steps", "1", check=False)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            f"error: file {data}: not found; perpair train reads files and folders: for a Hub dataset, perpair "
            f"prepare {data} -o pairs.parquet, then --data pairs.parquet"]


def test_a_damaged_checkpoint_is_refused_naming_it_and_the_one_before_resumes_exactly(tiny_model, uf_pairs,
                                                                                     tmp_path):
    """--resume reads the latest checkpoint whole before restoring anything: a truncated weights file, a missing
    or unreadable state is one error naming the checkpoint and the one before it, with OUT's metrics kept; removing
    the damaged one resumes from the one before, exactly."""
    args = ("--steps", "3", "--batch-size", "2", "--max-length", "64", "--lr", "1e-3", "--save-every", "1",
            "--set", "keep_checkpoints=3", "--set", "save_model=false")
    out = tmp_path / "run"
    _train(tiny_model, uf_pairs, out, *args)
    straight = _metrics(out)
    last, before = out / "checkpoints" / "step-00000003", "step-00000002"
    weights = last / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a disk that filled while it was written
    for damage in (None, "missing state", "bad state"):
        if damage == "missing state":
            (last / "state.json").unlink()
        elif damage == "bad state":
            (last / "state.json").write_text('{"step": 3')
        result = _train(tiny_model, uf_pairs, out, *args, "--resume", check=False)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {last} is damaged or incomplete"), lines
        assert f"remove it to resume from the one before ({before})" in lines[0]
        assert "Traceback" not in result.stderr
        assert _metrics(out) == straight
    shutil.rmtree(last)
    _train(tiny_model, uf_pairs, out, *args, "--resume")
    resumed = _metrics(out)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    assert resumed[2]["loss"] == pytest.approx(straight[2]["loss"], abs=1e-6)


def test_a_checkpoint_holding_other_values_than_its_runs_is_refused_before_anything_is_restored(tiny_model, uf_pairs,
                                                                                                tmp_path):
    """Checkpoint files that read but hold values of another shape: a weight of another shape was broadcast into the
    model and an integer one cast (exit 0, other weights), optimizer state under other names or none at all skipped
    (exit 0, fresh moments), state of another shape crashed the process, and a state.json whose scheduler, parameter
    groups or random states are not a run's ended in a traceback. Each is one error naming the checkpoint."""
    from safetensors.torch import save_file

    args = ("--steps", "2", "--batch-size", "2", "--max-length", "64", "--lr", "1e-3", "--save-every", "1",
            "--set", "keep_checkpoints=2", "--set", "save_model=false")
    out = tmp_path / "run"
    _train(tiny_model, uf_pairs, out, *args)
    last = out / "checkpoints" / "step-00000002"
    whole = {name: (last / name).read_bytes() for name in ("state.json", "model.safetensors",
                                                            "optimizer.safetensors", "rng.safetensors")}

    def state(**values):
        return lambda: (last / "state.json").write_text(json.dumps({**json.loads(whole["state.json"]), **values}))

    def tensors(file, edit):
        return lambda: save_file(edit(load_file(last / file)), last / file)

    damages = {
        "weights of another shape": tensors("model.safetensors", lambda w: {n: v[:1].clone() for n, v in w.items()}),
        "integer weights": tensors("model.safetensors", lambda w: {n: v.long() for n, v in w.items()}),
        "optimizer state of other names": tensors("optimizer.safetensors", lambda _: {"x::exp_avg": torch.zeros(2)}),
        "no optimizer state": tensors("optimizer.safetensors", lambda _: {}),
        "optimizer state of another shape": tensors("optimizer.safetensors",
                                                    lambda o: {n: torch.zeros(1) for n in o}),
        "RNG state not torch's": tensors("rng.safetensors", lambda _: {"torch": torch.zeros(3)}),
        "a scheduler of another shape": state(scheduler=[]),
        "another scheduler": state(scheduler={"foo": 1}),
        "a scheduler between steps": state(scheduler={**json.loads(whole["state.json"])["scheduler"],
                                                      "last_epoch": 1.5}),
        "no parameter groups": state(param_groups=[]),
        "parameter groups of another shape": state(param_groups={"names": []}),
        "Python's random state not one": state(python_rng=[1, 2]),
        "NumPy's random state not one": state(numpy_rng=[1]),
    }
    for damage, write in damages.items():
        write()
        result = _train(tiny_model, uf_pairs, out, *args, "--resume", check=False)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and "Traceback" not in result.stderr, (damage, result.stderr[-2000:])
        assert len(errors) == 1 and errors[0].startswith(f"error: checkpoint {last} is damaged or incomplete ("), \
            (damage, errors)
        for name, data in whole.items():
            (last / name).write_bytes(data)
    _train(tiny_model, uf_pairs, out, *args, "--resume")  # whole again: it resumes


def test_resume_refuses_an_out_whose_checkpoints_is_a_file_keeping_the_metrics(tiny_model, uf_pairs, tmp_path):
    """OUT/checkpoints a file (another program wrote one there) read as no checkpoints: --resume started the run
    again, emptied its metrics.jsonl, and failed at its first checkpoint, naming a temporary folder. Now refused
    before any work, naming it; OUT is as it was."""
    args = ("--steps", "2", "--batch-size", "2", "--max-length", "64", "--save-every", "1", "--set",
            "save_model=false")
    out = tmp_path / "run"
    _train(tiny_model, uf_pairs, out, *args)
    metrics = (out / "metrics.jsonl").read_text()
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").write_text("not a folder")
    result = _train(tiny_model, uf_pairs, out, *args, "--resume", check=False)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: --out {out}: its 'checkpoints' is a file, not the folder of a run's checkpoints; remove it, or "
        "--overwrite to replace the run's outputs"], result.stderr
    assert (out / "metrics.jsonl").read_text() == metrics


def test_resume_drops_a_metrics_line_torn_by_the_kill_and_refuses_other_damage(tmp_path):
    """A run killed while it appended a step's metrics leaves a torn last line, of a step after any checkpoint:
    --resume drops it with the other lines past its checkpoint. A line that is not metrics before the last is
    refused, naming the file and line."""
    from perpair.train.checkpoints import truncate_metrics

    lines = [json.dumps({"step": s, "loss": 0.5}) for s in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n" + lines[2][:-7].replace("3", "4"))  # step 4's line, torn
    truncate_metrics(path, 2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    path.write_text(lines[0] + "\n" + "garbage\n" + lines[2] + "\n")
    with pytest.raises(PerpairError, match=f"file {re.escape(str(path))}, line 2: not a line of metrics"):
        truncate_metrics(path, 2)


def test_a_run_key_or_metrics_file_that_is_no_text_is_named_not_a_decoding_traceback(tmp_path):
    """OUT/run.key or OUT/metrics.jsonl overwritten with bytes that are no UTF-8 text (another program's file): the
    command said only "error: text encoding: 'utf-8' codec can't decode byte 0xff ...", naming no file. A run.key
    that is no text is no run's key (OUT holds another run: refused, as any other key is); metrics that are no text
    are refused naming the file."""
    from perpair.train.checkpoints import held_key, truncate_metrics

    (tmp_path / "run.key").write_bytes(b"\xff\xfe\x00")
    assert held_key(tmp_path) == "\ufffd\ufffd\x00"
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(json.dumps({"step": 1}).encode() + b"\n\xff\xfe\n")
    with pytest.raises(PerpairError, match=f"^file {re.escape(str(path))}: not a metrics file \\(not UTF-8 text at "
                                           "byte 12\\)"):
        truncate_metrics(path, 1)


def test_a_kill_while_resume_rewrites_the_metrics_keeps_every_line(tmp_path, monkeypatch):
    """--resume rewrites metrics.jsonl without the lines past its checkpoint. It was rewritten in place: a run killed
    during that write (here: the write stops halfway, as a kill leaves it) lost the lines of the steps before the
    checkpoint too. The old file now stands until the new one is whole."""
    from perpair.train.checkpoints import truncate_metrics

    lines = [json.dumps({"step": s, "loss": 0.5}) for s in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    before = "".join(line + "\n" for line in lines)
    path.write_text(before)
    write_text = Path.write_text

    def killed_halfway(self, data, *args, **kwargs):
        write_text(self, data[:len(data) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        truncate_metrics(path, 2)
    monkeypatch.undo()
    assert path.read_text() == before
    truncate_metrics(path, 2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model, uf_pairs, tmp_path):
    """Reference log-probs corrupted to NaN for the pairs of steps 3 and 4: the run stops at step 3 with one
    clear message, before the optimizer step, and keeps the checkpoint of step 2."""
    from perpair.artifacts import read_artifact, write_artifact
    from perpair.data import read_pairs
    from perpair.train import reference

    args = ("--steps", "4", "--batch-size", "2", "--max-length", "64", "--lr", "1e-3", "--save-every", "1",
            "--set", "keep_checkpoints=1")
    _train(tiny_model, uf_pairs, tmp_path / "fill", *args)  # fills the reference cache
    (cache,) = (tmp_path / "refcache").glob("*.parquet")
    table, provenance = read_artifact(cache, kind=reference.KIND, schema_version=reference.SCHEMA_VERSION)
    pairs, _ = read_pairs(str(uf_pairs))
    row_of = {pid: i for i, pid in enumerate(pairs.column("pair_id").to_pylist())}
    ids = table.column("pair_id").to_pylist()
    late = {pid for pid in sorted(ids, key=row_of.get)[4:]}  # the pairs of steps 3 and 4 (file order)
    values = [float("nan") if pid in late else v for pid, v in zip(ids, table.column("chosen_logps").to_pylist(),
                                                                     strict=True)]
    table = table.set_column(1, "chosen_logps", pa.array(values, pa.float64()))
    write_artifact(cache, table, kind=reference.KIND, schema_version=reference.SCHEMA_VERSION,
                   provenance=provenance)

    out = tmp_path / "nan"
    result = _train(tiny_model, uf_pairs, out, *args, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "step 3: the loss is nan" in result.stderr and "Traceback" not in result.stderr
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    assert [c.name for c in (out / "checkpoints").glob("step-*")] == ["step-00000002"]
    assert not (out / "model").exists()


def test_out_holding_files_no_run_wrote_is_refused_even_with_overwrite(tiny_model, uf_pairs, tmp_path):
    """A folder of the user's (here their base model in `model/`, one of the names a run writes, and a notes file)
    is never written into nor cleared: --overwrite replaces only a run's outputs. A folder holding only hidden
    files (.gitkeep) is taken."""
    out = tmp_path / "project"
    (out / "model").mkdir(parents=True)
    (out / "model" / "model.safetensors").write_text("the user's weights")
    (out / "notes.txt").write_text("mine")
    before = {p.relative_to(out): p.read_text() for p in out.rglob("*") if p.is_file()}
    for extra in ((), ("--overwrite",)):
        result = _train(tiny_model, uf_pairs, out, *TINY_ARGS, *extra, check=False)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0] == (f"error: --out {out} holds files that no perpair run wrote (model, notes.txt; no run.key): "
                            "choose a new or empty folder (--overwrite replaces only a perpair run's outputs)")
        assert {p.relative_to(out): p.read_text() for p in out.rglob("*") if p.is_file()} == before
    hidden = tmp_path / "kept"
    hidden.mkdir()
    (hidden / ".gitkeep").write_text("")
    _train(tiny_model, uf_pairs, hidden, *TINY_ARGS)
    assert (hidden / "run.key").is_file() and (hidden / ".gitkeep").is_file()


@pytest.mark.parametrize("max_grad_norm", [1.0, None], ids=["clipping", "not-clipping"])
def test_a_non_finite_gradient_stops_before_the_optimizer_step(tiny_model, uf_pairs, tmp_path, monkeypatch,
                                                               max_grad_norm):
    """A finite loss whose gradient is not (a NaN in one gradient at step 2): clipping by a NaN norm, or the
    optimizer step on it unclipped, would write NaN into every weight, and the next checkpoint would hold them. The
    run stops at step 2 with the weights and the checkpoint of step 1 as they were, clipping or not."""
    import perpair.train.loop as loop
    from perpair.train import NonFiniteLoss, load_config, train

    densify, calls = loop.densify_gradients, []

    def poisoned(parameters):
        parameters = list(parameters)
        densify(parameters)
        calls.append(1)
        if len(calls) == 2:
            next(p for p in parameters if p.grad is not None).grad.view(-1)[0] = float("nan")

    monkeypatch.setattr(loop, "densify_gradients", poisoned)
    out = tmp_path / "run"
    config = load_config(None, {"model": str(tiny_model), "data": str(uf_pairs), "out": str(out), "steps": 3,
                                "batch_size": 2, "max_length": 64, "lr": 1e-3, "threads": 1, "save_every": 1,
                                "max_grad_norm": max_grad_norm, "reference_cache": str(tmp_path / "refcache")})
    with pytest.raises(NonFiniteLoss, match=r"step 2: the loss is [0-9.]+ but its gradient norm is nan"):
        train(config)
    assert [m["step"] for m in _metrics(out)] == [1]
    assert math.isfinite(_metrics(out)[0]["grad_norm"])  # the norm of a step that does not clip is logged too
    assert [c.name for c in (out / "checkpoints").glob("step-*")] == ["step-00000001"]
    assert not (out / "model").exists()


def test_a_finished_run_without_a_checkpoint_is_not_trained_again_unasked(tiny_model, uf_pairs, tmp_path):
    """A finished run with no checkpoint (final_checkpoint false) run again into its OUT, with or without --resume,
    trained again from step 1 without a word, its old summary and model left in place until the new run ended. It
    is refused now, OUT untouched; --overwrite trains it again."""
    out = tmp_path / "out"
    args = ("--steps", "1", "--batch-size", "2", "--max-length", "64", "--set", "final_checkpoint=false")
    _train(tiny_model, uf_pairs, out, *args)
    assert (out / "summary.json").is_file() and not (out / "checkpoints").exists()
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
    for extra in ((), ("--resume",)):
        result = _train(tiny_model, uf_pairs, out, *args, *extra, check=False)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (f"error: --out {out} holds this run, finished (summary.json) and with no "
                                          "checkpoint to resume from; --overwrite trains it again, or choose another "
                                          "--out")
        assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before
    result = _train(tiny_model, uf_pairs, out, *args, "--overwrite")
    assert (out / "summary.json").stat().st_mtime_ns > before[Path("summary.json")]


def test_out_holding_another_run_is_refused_unless_resumed_or_overwritten(tiny_model, uf_pairs, tmp_path):
    """OUT/run.key names the run whose outputs OUT holds: another run's settings are refused (with or without
    --resume) and nothing in OUT changes; the same run needs --resume; --overwrite replaces the old outputs."""
    out = tmp_path / "out"
    first = ("--steps", "2", "--batch-size", "2", "--max-length", "96", "--save-every", "1", "--set",
             "save_model=false", "--set", "keep_checkpoints=5")
    result = _train(tiny_model, uf_pairs, out, *first)
    assert "reference log-probs: 2/2 pairs" in result.stderr  # step 2's pairs computed, shown as they go
    assert "reference log-probs: 2 pairs computed in" in result.stdout  # step 1's from its own forward:
    assert ", 2 from the first step (the initial weights are the reference)" in result.stdout
    assert "step 1/2" in result.stderr and "ETA 0:0" in result.stderr

    def snapshot():
        return {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}

    before = snapshot()
    other = (*first, "--beta", "0.2")
    for extra, message in [((), r"holds another run \(it differs in beta 0\.1 → 0\.2\); choose another --out"),
                           (("--resume",), "holds another run .*--resume continues only the run that wrote them"),
                           ((), None)]:
        args = first if message is None else other  # the same run again, without --resume
        result = _train(tiny_model, uf_pairs, out, *args, *extra, check=False)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --out"), result.stderr
        assert re.search(message or "holds this run's checkpoints .*step-00000002.*--resume", lines[0]), lines[0]
        assert snapshot() == before  # nothing written, nothing pruned

    # where it logs and when it checkpoints change nothing it computes: the same run, resumed
    logged = (*first[:-1], "keep_checkpoints=3")  # (one --set per key: a second would be refused)
    resumed = _train(tiny_model, uf_pairs, out, *logged, "--resume", "--report-to", "tensorboard", "--set",
                     "project=mine")  # (run_name: not with TensorBoard alone, which shows no run name)
    assert "resumed from the checkpoint of step 2 (0 steps to go)" in resumed.stderr
    key = (out / "run.key").read_text()
    old_events = out / "runs" / "perpair" / "events.out.tfevents.old"  # the replaced run's TensorBoard log
    old_events.parent.mkdir(parents=True)
    old_events.write_text("old")
    _train(tiny_model, uf_pairs, out, *other, "--overwrite")
    assert (out / "run.key").read_text() != key and not old_events.exists()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000001", "step-00000002"]
    assert [m["beta_mean"] for m in _metrics(out)] == [0.2, 0.2]


def test_a_second_training_into_the_same_out_is_refused_while_the_first_runs(tiny_model, uf_pairs, tmp_path):
    """A job submitted again while the first still trains (or the processes of a killed launcher) passed the OUT
    check, the same run, and both wrote metrics.jsonl, checkpoints and the model, exit 0 each: the second is
    refused, one error naming OUT and the first's process, nothing written; once the first is gone (killed: the
    lock goes with its process, its file stays) --resume continues."""
    out = tmp_path / "out"
    args = ("--steps", "2", "--batch-size", "2", "--max-length", "96", "--save-every", "1", "--set",
            "save_model=false")
    _train(tiny_model, uf_pairs, out, *args)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write(f'{os.getpid()}\\n'); f.flush(); "
                               "print('locked', flush=True); time.sleep(60)", str(out / ".lock")],
                              stdout=subprocess.PIPE, text=True)  # a training in another process, holding OUT
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {p.relative_to(out): (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")}
        result = _train(tiny_model, uf_pairs, out, *args, "--resume", check=False)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and lines == [
            f"error: --out {out}: another training holds it (process {holder.pid}); wait for it to finish, or give "
            "this one another --out"], result.stderr
        assert {p.relative_to(out): (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")} == before
    finally:
        holder.kill()
        holder.wait()
    resumed = _train(tiny_model, uf_pairs, out, *args, "--resume")
    assert "resumed from the checkpoint of step 2 (0 steps to go)" in resumed.stderr
    assert [m["step"] for m in _metrics(out)] == [1, 2]


def test_resume_refuses_a_run_whose_files_changed_at_the_same_paths(tiny_model, uf_pairs, tmp_path):
    """run.key holds the contents of the data, plan and model files and the model folder's tokenizer, not only their
    paths: a file rewritten at the same path (re-planned, re-prepared, retrained, a chat template edited) makes
    another run, which --resume refuses instead of going on with it (steps of two plans, two models or two prompt
    formats in one run; the template was not in the key). A run whose run.key was written before the key covered
    the tokenizer still resumes."""
    import shutil

    from perpair.train import load_config
    from perpair.train.checkpoints import run_key

    model, data, plan = tmp_path / "model", tmp_path / "pairs.parquet", tmp_path / "plan.parquet"
    shutil.copytree(tiny_model, model)
    shutil.copy(uf_pairs, data)
    run_cli("plan", data, "--preset", "dpo", "-o", plan)
    args = ("--steps", "2", "--batch-size", "2", "--max-length", "96", "--set", "save_model=false")
    refused = "holds another run (it differs in {}'s contents); --resume continues only the run that wrote them"

    def rewrite_plan():
        run_cli("plan", data, "--preset", "dpo", "--beta", "0.3", "-o", plan)

    def rewrite_data():
        table = pq.read_table(data)
        pq.write_table(table.slice(1).replace_schema_metadata(table.schema.metadata), data)

    def rewrite_model():
        rewrite_weights(model)

    def rewrite_template():
        template = model / "chat_template.jinja"
        assert "You are a helpful AI assistant" in template.read_text()
        template.write_text(template.read_text().replace("a helpful AI", "a terse AI"))

    # a global β or ε beside the plan would be silently unused: refused, nothing written
    for option, name in ((("--beta", "0.5"), "beta"), (("--set", "label_smoothing=0.1"), "label_smoothing")):
        result = _train(str(model), data, tmp_path / "unused", *args, "--plan", str(plan), *option, check=False)
        assert result.returncode == 2 and f"{name} would be ignored: the plan gives every pair its own" \
            in result.stderr and not (tmp_path / "unused").exists()
    for name, rewrite, planned in (("plan", rewrite_plan, True), ("data", rewrite_data, False),
                                   ("model", rewrite_model, False), ("tokenizer", rewrite_template, False)):
        out = tmp_path / f"out-{name}"
        extra = ("--plan", str(plan)) if planned else ()
        _train(str(model), data, out, *args, *extra)
        rewrite()
        result = _train(str(model), data, out, *args, *extra, "--resume", check=False)
        assert result.returncode == 2 and refused.format(name) in result.stderr, (name, result.stderr[-500:])
        assert len(_metrics(out)) == 2
    # run.key as a run wrote it before it covered the tokenizer: resumed (nothing to train: 0 steps to go)
    out = tmp_path / "out-tokenizer"
    config = load_config(None, {"model": str(model), "data": str(data), "out": str(out), "steps": 2, "batch_size": 2,
                                "max_length": 96, "save_model": False, "resume": True})
    _train(str(model), data, out, *args, "--overwrite")
    assert (out / "run.key").read_text().strip() == run_key(config) != run_key(config, tokenizer=False)
    (out / "run.key").write_text(run_key(config, tokenizer=False, resolved=False, memory=True) + "\n")
    resumed = _train(str(model), data, out, *args, "--resume")
    assert "resumed from the checkpoint of step 2 (0 steps to go)" in resumed.stderr, resumed.stderr[-500:]


def test_a_run_resumes_with_other_memory_settings_and_a_refusal_names_what_differs(tiny_model, uf_pairs, tmp_path):
    """Memory-only settings (gradient_checkpointing, lean_activations, recompute_mlp, tokens_per_forward,
    logits_chunk) were part of the run's key: a run that ran out of memory could not resume with
    gradient_checkpointing, refused as "another run" without saying which setting made it one. Now they are not in
    the key, and a refusal names the settings that differ (run.settings.json beside run.key)."""
    out = tmp_path / "out"
    args = ("--steps", "3", "--batch-size", "2", "--max-length", "96", "--save-every", "1", "--set", "save_model=false")
    _train(tiny_model, uf_pairs, out, *args)
    shutil.rmtree(out / "checkpoints" / "step-00000003")  # stopped after step 2
    assert json.loads((out / "run.settings.json").read_text())["beta"] == 0.1
    resumed = _train(tiny_model, uf_pairs, out, *args, "--resume", "--set", "gradient_checkpointing=true",
                     "--set", "tokens_per_forward=96", "--set", "logits_chunk=64")
    assert "resumed from the checkpoint of step 2 (1 steps to go)" in resumed.stderr, resumed.stderr[-500:]
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3]
    refused = _train(tiny_model, uf_pairs, out, *args, "--resume", "--beta", "0.2", "--set", "lr=0.001",
                     check=False)
    assert refused.returncode == 2 and "holds another run (it differs in beta 0.1 → 0.2; lr 1e-06 → 0.001); " \
        "--resume continues only the run that wrote them" in refused.stderr, refused.stderr[-500:]


def test_a_resumed_run_computes_the_reference_of_the_steps_it_trains_only(tiny_model, uf_pairs, tmp_path):
    """A resumed run computed the reference log-probs of every step's pairs, those of the steps its checkpoint had
    trained too: with a cold cache (another node's, say) a run resumed at its end to merge an adapter recomputed the
    whole pass for nothing. Now only the steps left are read; the losses are those of the run in one go."""
    out, whole = tmp_path / "out", tmp_path / "whole"
    args = ("--steps", "3", "--batch-size", "2", "--max-length", "96", "--save-every", "1", "--set", "save_model=false")
    run_cli("train", "--model", tiny_model, "--data", uf_pairs, "--out", whole, "--threads", "1", *args,
            "--set", f"reference_cache={tmp_path / 'cache-whole'}")
    _train(tiny_model, uf_pairs, out, *args)
    shutil.rmtree(out / "checkpoints" / "step-00000003")  # stopped after step 2
    resumed = run_cli("train", "--model", tiny_model, "--data", uf_pairs, "--out", out, "--threads", "1", *args,
                      "--resume", "--set", f"reference_cache={tmp_path / 'cold'}")
    assert "resumed from the checkpoint of step 2 (1 steps to go)" in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference_pairs"] == summary["reference_pairs_computed"] == 2  # step 3's pairs alone
    assert [m["loss"] for m in _metrics(out)] == pytest.approx([m["loss"] for m in _metrics(whole)], rel=1e-6)
    again = run_cli("train", "--model", tiny_model, "--data", uf_pairs, "--out", out, "--threads", "1", *args,
                    "--resume", "--set", f"reference_cache={tmp_path / 'colder'}")
    assert "(0 steps to go)" in again.stderr and not (tmp_path / "colder").exists()


def test_disable_dropout_is_keyed_for_a_model_with_dropout_only(tiny_model, uf_pairs, tmp_path):
    """Dropout became off by default (TRL's disable_dropout) on 7 Dec 2026. For a model without dropout (SmolLM2,
    Llama) the setting changes nothing: the run key is the one before, whatever its value. For one with dropout
    (GPT-2's 0.1) it is keyed, so a run begun before, trained with dropout on, is not resumed with it off: its key is
    that of disable_dropout false."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from perpair.train import load_config
    from perpair.train.checkpoints import earlier_run_keys, run_key

    def keys(model):
        base = {"model": str(model), "data": str(uf_pairs), "out": str(tmp_path / "out"), "steps": 2}
        on, off = (load_config(None, {**base, "disable_dropout": value}) for value in (True, False))
        return run_key(on), run_key(off), earlier_run_keys(on), earlier_run_keys(off)

    on, off, earlier_on, earlier_off = keys(tiny_model)
    assert on == off and earlier_on == earlier_off
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(gpt2)
    on, off, earlier_on, earlier_off = keys(gpt2)
    assert on != off and not set(earlier_on) & set(earlier_off)
    assert on not in earlier_on + earlier_off and off not in earlier_on + earlier_off


def test_the_weights_of_a_loss_of_sft_terms_alone_apply(tiny_model, uf_pairs, tmp_path):
    """`loss: [sft, sft]` with loss_weights [1, 0.5] (or `sft` with [2]) trained plain SFT, the weights dropped
    (TRL trains 1.5×, 2× the SFT loss): the loss logged and the gradient, against max_grad_norm, were another."""
    args = ("--model", tiny_model, "--data", uf_pairs, "--threads", "1", "--steps", "1", "--batch-size", "2",
            "--max-length", "96", "--set", "save_model=false")  # (reference-free: no reference_cache)
    run_cli("train", *args, "--out", tmp_path / "sft", "--loss", "sft")
    run_cli("train", *args, "--out", tmp_path / "summed", "--set", "loss=[sft,sft]", "--set", "loss_weights=[1.0,0.5]")
    [one], [two] = _metrics(tmp_path / "sft"), _metrics(tmp_path / "summed")
    assert two["loss"] == pytest.approx(1.5 * one["loss"], rel=1e-6) and one["loss"] > 0


def test_a_batch_larger_than_the_trainable_pairs_is_refused(tiny_model, uf_pairs, tmp_path):
    """A step never holds a pair twice: a batch_size above the pairs whose prompts fit max_length is refused, naming
    both counts (it used to repeat pairs within the step, exit 0); an empty path is no output folder."""
    table = pq.read_table(uf_pairs)
    small = tmp_path / "small.parquet"
    pq.write_table(table.slice(0, 6).replace_schema_metadata(table.schema.metadata), small)
    result = _train(tiny_model, small, tmp_path / "out", "--steps", "1", "--batch-size", "20", "--max-length", "96",
                    check=False)
    assert result.returncode == 2 and re.search(r"error: batch_size 20 is more than the \d pairs this run can train "
                                                r"\(\d more have prompts that fill max_length 96\): a step would hold "
                                                r"some pair twice", result.stderr), result.stderr[-600:]
    result = run_cli("train", "--model", tiny_model, "--data", small, "--out", "", "--steps", "1", check=False)
    assert result.returncode == 2 and "out: an empty path; name a file or folder" in result.stderr
    # without --steps: one epoch of the pairs that fit, every one of them once
    result = _train(tiny_model, small, tmp_path / "epoch", "--batch-size", "2", "--max-length", "96")
    summary = json.loads((tmp_path / "epoch" / "summary.json").read_text())
    fit = 6 - summary["skipped_long_prompts"]
    steps = -(-fit // 2)
    assert 0 < fit < 6 and summary["steps"] == steps == len(_metrics(tmp_path / "epoch"))
    assert f"step {steps}/{steps} " in result.stderr + result.stdout
    result = _train(tiny_model, small, tmp_path / "nocheckpoint", "--batch-size", "2", "--max-length", "96",
                    "--save-every", "50", "--set", "final_checkpoint=false", check=False)
    assert result.returncode == 2 and f"save_every 50 ≥ the {steps} steps of one epoch with final_checkpoint false" \
        in result.stderr


@pytest.mark.parametrize(("targets", "refused"), [
    ("[q_proj,typo_proj]", "'typo_proj' matches no module of model"),
    ("q_proj", "'q_proj' matches no module of model"),
    ("[q_proj,lm_head]", "'lm_head' is the model's output layer; perpair's log-probs apply its weight directly"),
    ("[lm_head]", "'lm_head' is the model's output layer"),
    ("[embed_tokens]", "'model.embed_tokens' is the model's input embedding; an adapter there is not supported"),
    ("[self_attn]", "'model.layers.0.self_attn' is a LlamaAttention, not a layer an adapter goes on")])
def test_lora_targets_that_would_train_nothing_are_refused_before_the_reference_pass(tiny_model, uf_pairs, tmp_path,
                                                                                    targets, refused):
    """A list entry matching no module (a typo beside a real name) was left out by PEFT without a word and the run
    trained the rest; an adapter on the output layer never trained (perpair's log-probs read the layer's weight, so
    its lora_B stayed 0 beside q_proj's, or alone the backward failed with a traceback); one on the input embedding
    ended in an AttributeError traceback; a string that matches nothing, or a module no adapter goes on (an attention
    block), was refused only after the reference pass. Each is one error line now, before the reference pass writes
    anything."""
    result = _train(tiny_model, uf_pairs, tmp_path / "out", "--steps", "1", "--batch-size", "2", "--max-length", "96",
                    "--lora", "--set", "lora.r=4", "--set", f"lora.target_modules={targets}", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: lora.target_modules ") and refused in lines[0], lines
    assert not (tmp_path / "refcache").exists() and not (tmp_path / "out" / "adapter").exists()


def test_a_lora_run_resumed_as_another_adapter_or_full_fine_tuning_is_refused(tiny_model, uf_pairs, tmp_path):
    """A LoRA checkpoint holds the adapter alone: resumed with another rank, other targets or no adapter at all it
    would restart or mix two runs. Each is refused (the run's key differs), the checkpoints kept; the same
    settings resume."""
    out = tmp_path / "lora"
    args = ("--steps", "2", "--batch-size", "2", "--max-length", "96", "--lr", "1e-3", "--save-every", "1")
    _train(tiny_model, uf_pairs, out, *args, "--lora", "--set", "lora.r=4")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    for other in (("--lora", "--set", "lora.r=8"), ("--lora", "--set", "lora.r=4", "--set",
                                                    "lora.target_modules=[q_proj,v_proj]"), ()):
        result = _train(tiny_model, uf_pairs, out, *args, "--resume", *other, check=False)
        assert result.returncode == 2 and "holds another run" in result.stderr, (other, result.stderr[-1000:])
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    _train(tiny_model, uf_pairs, out, *args, "--resume", "--lora", "--set", "lora.r=4")


def test_a_lora_run_without_a_checkpoint_is_told_how_to_merge_its_adapter(tiny_model, uf_pairs, tmp_path):
    """Without a checkpoint (final_checkpoint false) `--resume --set lora.merge=true` has nothing to resume: it trained
    the run again, and now is refused; the hint `perpair eval` gives for OUT/model says what works there."""
    args = ("--steps", "1", "--batch-size", "2", "--max-length", "64", "--lora", "--set", "lora.r=4", "--set",
            "final_checkpoint=false")
    out = tmp_path / "run"
    _train(tiny_model, uf_pairs, out, *args)
    result = run_cli("eval", "preference", "--model", out / "model", "--ref", tiny_model, "--data", uf_pairs, "-o",
                     tmp_path / "eval", check=False)
    assert result.returncode == 2 and result.stderr == (
        f"error: model {out / 'model'}: no such folder; {out} holds a LoRA adapter alone (adapter/): it kept no "
        "checkpoint to resume (final_checkpoint false): merge the adapter with PEFT (PeftModel.from_pretrained(base, "
        "adapter).merge_and_unload()), or train it again with --overwrite --set lora.merge=true\n")
    result = _train(tiny_model, uf_pairs, out, *args, "--resume", "--set", "lora.merge=true", check=False)
    assert result.returncode == 2 and "finished (summary.json) and with no checkpoint to resume" in result.stderr


def test_a_finished_lora_run_resumed_with_merge_saves_its_merged_model(tiny_model, uf_pairs, tmp_path):
    """`perpair eval` reads OUT/model, which a LoRA run writes only with lora.merge=true. A run finished without it
    could not get one: `--resume --set lora.merge=true` was refused as another run (merge was part of the run's
    key), so the adapter had to be trained again. It resumes now, trains nothing and saves the model merged, the
    same weights as a run merged at its end; the metrics stay those of the run."""
    args = ("--steps", "2", "--batch-size", "2", "--max-length", "96", "--lr", "1e-3", "--lora", "--set", "lora.r=4")
    merged = _train(tiny_model, uf_pairs, tmp_path / "merged", *args, "--set", "lora.merge=true")
    # the run's progress without Transformers' bar of the saved model's shards (it was in every run's log)
    assert "model shards" not in merged.stderr + merged.stdout and (tmp_path / "merged" / "model").is_dir()
    out = tmp_path / "later"
    _train(tiny_model, uf_pairs, out, *args)
    metrics = (out / "metrics.jsonl").read_text()
    assert not (out / "model").exists()
    result = run_cli("eval", "preference", "--model", out / "model", "--ref", tiny_model, "--data", uf_pairs, "-o",
                     tmp_path / "eval", check=False)
    assert result.returncode == 2 and result.stderr == (
        f"error: model {out / 'model'}: no such folder; {out} holds a LoRA adapter alone (adapter/): the same perpair "
        "train command with --resume --set lora.merge=true saves the merged model there\n")
    summary = json.loads((out / "summary.json").read_text())
    _train(tiny_model, uf_pairs, out, *args, "--resume", "--set", "lora.merge=true")
    assert (out / "metrics.jsonl").read_text() == metrics
    resumed = json.loads((out / "summary.json").read_text())  # still the run's training (it said 0 steps, 0 pairs)
    assert resumed["resumed_from"] == 2 and resumed["model"] == str(out / "model")
    assert {k: resumed[k] for k in ("steps", "pairs", "tokens", "train_seconds", "pairs_per_second")} == \
        {k: summary[k] for k in ("steps", "pairs", "tokens", "train_seconds", "pairs_per_second")}
    a = load_file(tmp_path / "merged" / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("lora", [False, True])
def test_the_saved_model_has_its_base_models_config(tiny_model, uf_pairs, tmp_path, lora):
    """Training turns the model's key/value cache off (`use_cache`), and the model saved to OUT/model (fully
    trained, or merged from a LoRA adapter) kept `use_cache: false` in its config.json, a setting of training, not
    of the model: whatever loads it and calls it without saying otherwise got no cache. Its config.json is now the
    base model's."""
    out = tmp_path / "out"
    _train(tiny_model, uf_pairs, out, "--steps", "1", "--batch-size", "2", "--max-length", "96", "--lr", "1e-3",
           *(("--lora", "--set", "lora.r=4", "--set", "lora.merge=true") if lora else ()))
    base = json.loads((tiny_model / "config.json").read_text())
    assert base["use_cache"] is True
    assert json.loads((out / "model" / "config.json").read_text()) == base


def test_recompute_mlp_that_an_adapted_mlp_ignores_is_refused(tiny_model, uf_pairs, tmp_path):
    """Under LoRA an MLP with an adapter on any projection runs PEFT's layers, not the recomputing one: with the
    default all-linear targets `recompute_mlp=true` did nothing (the summary's lean counts showed no
    mlp_recomputed) without a word. Refused now, before the reference pass; with attention-only adapters the MLPs
    recompute as asked."""
    args = ("--steps", "1", "--batch-size", "2", "--max-length", "96", "--lora", "--set", "lora.r=4", "--set",
            "recompute_mlp=true")
    result = _train(tiny_model, uf_pairs, tmp_path / "all", *args, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: recompute_mlp true does nothing with lora.target_modules all-linear: every MLP has an adapter on a "
        "projection, and an adapted MLP runs its own layers, which recompute nothing; drop recompute_mlp "
        "(gradient_checkpointing=true saves memory), or adapt no MLP projection (e.g. [q_proj, k_proj, v_proj, "
        "o_proj])"]
    assert not (tmp_path / "refcache").exists()
    _train(tiny_model, uf_pairs, tmp_path / "attention", *args, "--set", "lora.target_modules=[q_proj,v_proj]")
    summary = json.loads((tmp_path / "attention" / "summary.json").read_text())
    assert summary["lean_activations"]["mlp_recomputed"] == 2


def test_an_adapter_or_tracker_that_cannot_start_is_one_error_line(tiny_model, uf_pairs, tmp_path, monkeypatch):
    """LoRA target modules the model lacks (PEFT's ValueError) and W&B without a login (its UsageError) used to end
    the run with a traceback; the tracker's refusal came after the reference pass, now before the model loads. The
    model loads before the adapter is refused: Transformers' "Loading weights" bar came before the error line, which
    must be all stderr holds."""
    args = ("--steps", "1", "--batch-size", "2", "--max-length", "96")
    result = _train(tiny_model, uf_pairs, tmp_path / "lora", *args, "--lora", "--set",
                    "lora.target_modules=[nonexistent_proj]", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: lora.target_modules ['nonexistent_proj']: 'nonexistent_proj' matches no module of model {tiny_model} "
        "(its linear layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj); PEFT would leave it out "
        "and train the rest without a word"]
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    # a process of its own: W&B keeps its settings in the process that first used it (other tests run it offline)
    result = run_cli("train", "--model", tiny_model, "--data", uf_pairs, "--out", tmp_path / "wandb-run", "--threads",
                     "1", "--set", f"reference_cache={tmp_path / 'refcache'}", *args, "--report-to", "wandb",
                     check=False, fresh=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: report_to wandb: the tracker did not start: ")
    assert not (tmp_path / "refcache").exists()  # refused before the reference pass (it came after it: hours lost)


def test_a_wrong_model_path_is_named_and_a_run_that_never_trained_does_not_hold_out(tiny_model, uf_pairs,
                                                                                     tmp_path):
    """A model path that names no folder is refused by name before OUT is written (it used to reach
    ``from_pretrained`` as a malformed Hub id: "Repo id must be in the form 'repo_name' ..."), and so is a file. A run
    that claimed OUT but stopped before its first step (here: unreadable pairs) leaves only its run.key (and an
    empty .lock), which does not make the corrected run "another run" (it used to be refused until --overwrite)."""
    out = tmp_path / "out"
    for model, message in ((tmp_path / "nowhere" / "model", "no such folder, and not a Hub id (NAME or OWNER/NAME)"),
                           (uf_pairs, "a file; give the folder that holds its config.json and weights")):
        result = _train(str(model), uf_pairs, out, "--steps", "1", check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines() == [f"error: model {model}: {message}"], result.stderr
        assert not out.exists()

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(uf_pairs.read_bytes()[:-100] + bytes(100))  # the footer gone: not a Parquet file
    result = _train(tiny_model, broken, out, "--steps", "1", check=False)
    assert result.returncode == 2 and "not a readable Parquet file" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lock", "run.key", "run.settings.json"]  # (.lock: empty)
    result = _train(tiny_model, uf_pairs, out, "--steps", "1", "--set", "save_model=false", "--resume")
    assert f"--resume: no checkpoint in {out} yet; training from step 1" in result.stderr  # said, not silent
    assert len(_metrics(out)) == 1
    result = _train(tiny_model, uf_pairs, out, "--steps", "1", "--beta", "0.2", check=False)
    assert result.returncode == 2 and "holds another run" in result.stderr  # a run that trained is protected


def test_bf16_and_fp32_runs_keep_separate_reference_caches(tiny_model, uf_pairs, tmp_path):
    """A bf16 run's reference log-probs (up to ~0.5% off fp32's) are never served to an fp32 run."""
    args = ("--steps", "1", "--batch-size", "2", "--max-length", "64", "--set", "save_model=false",
            "--set", "final_checkpoint=false")
    _train(tiny_model, uf_pairs, tmp_path / "fp32", *args, "--set", "precision=fp32")
    assert len(list((tmp_path / "refcache").glob("*.parquet"))) == 1
    _train(tiny_model, uf_pairs, tmp_path / "bf16", *args, "--set", "precision=bf16")
    assert len(list((tmp_path / "refcache").glob("*.parquet"))) == 2


def test_a_reference_model_gives_the_reference_log_probs(tiny_model, uf_pairs, tmp_path):
    """With ``reference_model`` the cached reference log-probs are that model's (not the policy's initial ones)."""
    from transformers import AutoTokenizer

    from perpair.models import load_causal_lm
    from perpair.train import sequence_logps

    other = save_tiny_llama(tmp_path / "other", hidden=64, seed=7)
    out = tmp_path / "ref"
    _train(tiny_model, uf_pairs, out, "--steps", "1", "--batch-size", "2", "--max-length", "64", "--set",
           f"reference_model={other}", "--set", "save_model=false")
    (cache,) = (tmp_path / "refcache").glob("*.parquet")
    cached = pq.read_table(cache).to_pandas().set_index("pair_id")
    pairs = pq.read_table(uf_pairs)
    pairs = pairs.filter(pa.array([p in cached.index for p in pairs.column("pair_id").to_pylist()]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for model, same in ((other, True), (tiny_model, False)):
        values = sequence_logps(load_causal_lm(str(model), dtype=torch.float32), tokenizer, pairs, max_length=64)
        values = values.to_pandas().set_index("pair_id").loc[cached.index]
        close = np.allclose(values.chosen_logps, cached.chosen_logps, atol=1e-4) and \
            np.allclose(values.rejected_logps, cached.rejected_logps, atol=1e-4)
        assert close == same, model


def test_a_reference_model_with_another_tokenizer_is_refused(tiny_model, uf_pairs, tmp_path):
    """The reference scores the policy's token ids: one with another vocabulary (same size: it trained, exit 0, on
    another text's log-probs) or with an embedding too small for them (a traceback) is one error, before OUT."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from conftest import tiny_llama

    model, tokenizer = tiny_llama(hidden=64, seed=3)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(len(tokenizer))}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", eos_token="w1")
    other.chat_template = AutoTokenizer.from_pretrained(tiny_model).chat_template
    model.save_pretrained(tmp_path / "other_tokens")
    other.save_pretrained(tmp_path / "other_tokens")
    small = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    small.save_pretrained(tmp_path / "small")  # no tokenizer files: the embedding is checked
    for reference, message in (("other_tokens", "its tokenizer's vocabulary differs from that of model"),
                               ("small", "its embedding has 1000 rows, and the tokenizer of model")):
        out = tmp_path / f"out_{reference}"
        result = _train(tiny_model, uf_pairs, out, "--steps", "1", "--batch-size", "2", "--max-length", "64",
                        "--set", f"reference_model={tmp_path / reference}", check=False)
        assert result.returncode == 2, result.stderr
        assert f"error: reference_model {tmp_path / reference}: {message}" in result.stderr
        assert "Traceback" not in result.stderr
        assert reference == "small" or not out.exists()  # the vocabulary is compared before OUT is written


def test_a_chat_template_refusing_a_conversation_is_one_error_naming_the_pair(tmp_path, uf_pairs):
    """A template that raises on a conversation (Gemma's refuses a system message) stops the run with one error
    naming the pairs file and the pair, not a Jinja traceback."""
    from transformers import AutoTokenizer

    model = save_tiny_llama(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role "
                               "not supported') }}{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer.save_pretrained(model)
    table = pq.read_table(uf_pairs)
    prompts = table.column("prompt").to_pylist()
    prompts[0] = [{"role": "system", "content": "Be brief."}, *prompts[0]]
    table = table.set_column(table.schema.get_field_index("prompt"), table.schema.field("prompt"),
                             pa.array(prompts, table.schema.field("prompt").type))
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(table, pairs)
    out = tmp_path / "out"
    result = _train(model, pairs, out, "--steps", "1", "--batch-size", "2", "--max-length", "64", check=False)
    assert result.returncode == 2, result.stderr
    first = table.column("pair_id")[0].as_py()
    assert (f"error: {pairs}: pair {first}: the tokenizer's chat template refuses the conversation (system, user): "
            "System role not supported") in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("template", ["", "  \n"])
def test_a_model_whose_chat_template_file_is_empty_is_refused_naming_it(uf_pairs, tmp_path, template):
    """A chat_template.jinja of 0 bytes (a copy cut short) gives the tokenizer the template "": every conversation
    rendered as no tokens, and the run ended in torch's traceback; one of whitespace only rendered blanks and ended
    the process in a floating point exception (exit 136). Now one error naming the model and the file, exit 2."""
    model = save_tiny_llama(tmp_path / "model", layers=1)
    (model / "chat_template.jinja").write_text(template)
    out = tmp_path / "out"
    result = _train(model, uf_pairs, out, "--steps", "1", "--batch-size", "2", "--max-length", "64", check=False)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines == [f"error: model {model}: {model / 'chat_template.jinja'}: the chat template is empty or only "
                     "whitespace (every conversation would render as blanks); restore the model's chat template"]
    assert not (out / "metrics.jsonl").exists()


def test_a_moe_router_loss_the_run_would_not_add_is_refused(uf_pairs, tmp_path):
    """A Mixture-of-Experts config with output_router_logits and a router_aux_loss_coef: Transformers and TRL add the
    router's load-balancing loss, perpair does not; refused before OUT is written (it trained without a word)."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(save_tiny_llama(tmp_path / "llama"))
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True, router_aux_loss_coef=0.02)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    out = tmp_path / "out"
    result = _train(tmp_path / "moe", uf_pairs, out, "--steps", "1", "--batch-size", "2", "--max-length", "64",
                    check=False)
    assert result.returncode == 2, result.stderr
    assert (f"error: model {tmp_path / 'moe'}: its config sets output_router_logits with router_aux_loss_coef 0.02"
            in result.stderr) and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("kind", ["sliding-window", "dynamic-rope"])
def test_a_sequence_longer_than_the_models_window_is_refused_before_the_reference_pass(uf_pairs, tmp_path, kind):
    """A model that attends within a sliding window (Mistral), or scales its rotary embedding by the sequence's
    length beyond some length (dynamic RoPE), cannot train a packed sequence longer than that. It was refused at
    the first forward holding one: in the reference pass, which takes the longest pairs last, after computing the
    others. Now before the reference pass, naming the longest pair, with the same fix."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from perpair.data import read_pairs
    from perpair.train import load_config, train
    from perpair.train.logprobs import tokenize_table

    tokenizer = AutoTokenizer.from_pretrained(save_tiny_llama(tmp_path / "llama"))
    pairs, _ = read_pairs(str(uf_pairs))
    ids, tokenized = tokenize_table(tokenizer, pairs, 256)
    # the run's pairs (4 steps of 4, in file order) and their longest sequences, a prompt and one response
    ids, lengths = ids[:16], [len(t.prompt) + max(len(t.chosen), len(t.rejected)) for t in tokenized[:16]]
    limit = max(n for n in lengths if n < 256)  # the pairs cut to max_length do not fit
    longest = ids[lengths.index(max(lengths))]
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    if kind == "sliding-window":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=limit))
        message = f"MistralAttention attends within a sliding window of {limit} tokens, shorter than pair {longest} "
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, max_position_embeddings=limit,
                                             rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
        message = f"LlamaModel scales its rotary embedding by the sequence's length beyond {limit} tokens"
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    progress = []
    config = load_config(None, {"model": str(tmp_path / "model"), "data": str(uf_pairs), "out": str(tmp_path / "out"),
                                "steps": 4, "batch_size": 4, "max_length": 256, "threads": 1,
                                "reference_cache": str(tmp_path / "refcache")})
    with pytest.raises(PerpairError, match=f"^{re.escape(message)}.*lower max_length to {limit}$"):
        train(config, on_reference=lambda done, total: progress.append(done))
    assert not progress and not list((tmp_path / "refcache").glob("*.parquet"))  # no reference log-prob computed


def test_the_last_lines_count_the_reference_log_probs_the_run_read(tiny_model, uf_pairs, tmp_path):
    """The run's reference log-probs, each pair counted where it came from: a SimPO run, which reads none, printed
    "0 pairs computed (the rest from the cache)"; a run on a cache another filled now says how many it read."""
    args = ("--steps", "2", "--batch-size", "2", "--max-length", "96", "--set", "save_model=false")
    simpo = _train(tiny_model, uf_pairs, tmp_path / "simpo", *args, "--loss", "simpo")
    assert "reference log-probs: none (loss simpo uses no reference); order:" in simpo.stdout
    assert json.loads((tmp_path / "simpo" / "summary.json").read_text())["reference_pairs"] == 0
    first = _train(tiny_model, uf_pairs, tmp_path / "first", *args)
    assert "reference log-probs: 2 pairs computed in" in first.stdout
    assert ", 2 from the first step (the initial weights are the reference), 0 from the cache;" in first.stdout
    again = _train(tiny_model, uf_pairs, tmp_path / "again", *args)
    assert re.search(r"reference log-probs: 0 pairs computed in [0-9.]+ s, 4 from the cache;", again.stdout)
