"""Trackers: ``perpair train --report-to`` writes what a TRL user's dashboard reads, under TRL's names."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import time
from pathlib import Path

import pytest

from conftest import run_cli
from perpair.errors import PerpairError
from perpair.train import load_config
from perpair.train.tracking import TRL_NAMES, missing_packages, tracker_values

ARGS = ("--steps", "3", "--batch-size", "2", "--max-length", "96", "--lr", "1e-3", "--threads", "1",
        "--set", "save_model=false", "--set", "final_checkpoint=false")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_trl_names_are_the_ones_trl_logs():
    """Every TRL name we log under is one TRL 1.16's DPOTrainer (or transformers' Trainer) writes."""
    source = "".join(Path(importlib.util.find_spec(module).origin).read_text()
                     for module in ("trl.trainer.dpo_trainer", "transformers.trainer"))
    for name in TRL_NAMES.values():
        assert f'"{name}"' in source, name


def test_tracker_values_maps_a_metrics_line():
    line = {"step": 2, "loss": 0.6, "lr": 1e-3, "grad_norm": 2.0, "pairs": 4, "pairs_preference": 3, "pairs_sft": 1,
            "tokens": 800, "seconds": 2.0, "reward_margin": 0.1, "reward_accuracy": None, "beta_mean": 0.05}
    values = tracker_values(line)
    assert values["train/loss"] == 0.6
    assert values["train/learning_rate"] == 1e-3
    assert values["train/rewards/margins"] == 0.1
    assert "train/rewards/accuracies" not in values  # no preference pair: nothing rather than a made-up 0
    assert values["train/perpair/route_share_sft"] == 0.25
    assert values["train/perpair/route_share_preference"] == 0.75
    assert values["train/perpair/tokens_per_second"] == 400.0
    assert values["train/perpair/beta_mean"] == 0.05


@pytest.mark.skipif(bool(missing_packages(["tensorboard", "wandb"])), reason="tensorboard and wandb not installed")
def test_tensorboard_and_wandb_offline_receive_every_step(tiny_model_dir, uf_pairs, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    run_cli("train", "--model", tiny_model_dir, "--data", uf_pairs, "--out", out, *ARGS,
            "--set", f"reference_cache={tmp_path / 'ref'}", "--report-to", "tensorboard", "--report-to", "wandb")
    metrics = _metrics(out)

    events = list((out / "runs" / "perpair").glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    for tag, key in (("train/loss", "loss"), ("train/logps/chosen", "logps_chosen"),
                     ("train/rewards/margins", "reward_margin"), ("train/perpair/beta_mean", "beta_mean")):
        scalars = accumulator.Scalars(tag)
        assert [s.step for s in scalars] == [m["step"] for m in metrics]
        assert [s.value for s in scalars] == pytest.approx([m[key] for m in metrics], rel=1e-6)

    # W&B offline: the run's history, as wandb itself syncs it, holds the same losses
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = _wandb_history(next(runs[0].glob("run-*.wandb")))
    assert [row["train/loss"] for row in history if "train/loss" in row] == pytest.approx(
        [m["loss"] for m in metrics], rel=1e-6)


def _stopped_after_logging_step_3(model: Path, pairs: Path, tmp_path: Path, tracker: str):
    """A 3-step run logging to ``tracker`` whose step 3 was logged and its checkpoint never written (final_checkpoint
    false), as a run stopped between the two: ``(out, its arguments, its losses)``."""
    out = tmp_path / "run"
    args = ("--model", model, "--data", pairs, "--out", out, *ARGS, "--set", f"reference_cache={tmp_path / 'ref'}",
            "--report-to", tracker, "--save-every", "1")
    run_cli("train", *args)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    return out, args, [m["loss"] for m in _metrics(out)]


@pytest.mark.skipif(bool(missing_packages(["tensorboard"])), reason="tensorboard not installed")
def test_a_resumed_run_hides_what_the_stopped_attempt_logged_after_its_checkpoint(tiny_model_dir, uf_pairs,
                                                                                   tmp_path):
    """A run stopped after logging step 3 but before its checkpoint trains step 3 again when resumed: TensorBoard
    plotted both (two points at step 3, from two event files). The resumed writer purges from the step after
    the checkpoint, so the log reads as the run's metrics.jsonl does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, args, first = _stopped_after_logging_step_3(tiny_model_dir, uf_pairs, tmp_path, "tensorboard")
    time.sleep(1.1)  # (TensorBoard names an event file by the second it was opened in)
    run_cli("train", *args, "--resume")
    assert len(list((out / "runs" / "perpair").glob("events.out.tfevents.*"))) == 2
    scalars = EventAccumulator(str(out / "runs" / "perpair")).Reload().Scalars("train/loss")
    assert [s.step for s in scalars] == [1, 2, 3]
    assert [s.value for s in scalars] == pytest.approx(first, rel=1e-5)
    # killed before its first checkpoint, then run again: from step 1, the first attempt's steps hidden as well (they
    # were plotted twice: the purge was only for a resumed checkpoint)
    shutil.rmtree(out / "checkpoints")
    (out / "summary.json").unlink()  # (a run killed then has not finished: a finished one is refused)
    time.sleep(1.1)
    run_cli("train", *args, "--resume")
    scalars = EventAccumulator(str(out / "runs" / "perpair")).Reload().Scalars("train/loss")
    assert [s.step for s in scalars] == [1, 2, 3]


@pytest.mark.skipif(bool(missing_packages(["wandb"])), reason="wandb not installed")
def test_a_resumed_run_continues_its_wandb_run(tiny_model_dir, uf_pairs, tmp_path, monkeypatch):
    """A preempted run resumed from its checkpoint logs to the W&B run its first attempt started (a new run at
    each resume split one training's curve into several runs); --overwrite, another training, starts a new one."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, args, first = _stopped_after_logging_step_3(tiny_model_dir, uf_pairs, tmp_path, "wandb")
    (run,) = (out / "wandb").glob("offline-run-*")
    run_id = run.name.rsplit("-", 1)[1]
    time.sleep(1.1)  # (W&B names an offline run's folder by the second it started in)
    run_cli("train", *args, "--resume")
    attempts = sorted((out / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2
    assert {a.name.rsplit("-", 1)[1] for a in attempts} == {run_id}  # `wandb sync` uploads both into one run
    resumed = _wandb_history(attempts[1] / f"run-{run_id}.wandb")
    assert [row["train/loss"] for row in resumed] == pytest.approx(first[2:], rel=1e-5)  # step 3, trained again
    assert [row["_step"] for row in resumed] == [3]

    time.sleep(1.1)
    run_cli("train", *args, "--overwrite")
    (again,) = (out / "wandb").glob("offline-run-*")  # the old attempts removed with the run they logged
    assert again.name.rsplit("-", 1)[1] != run_id


def test_a_recorded_wandb_run_is_named_where_wandb_refuses_it_and_a_users_run_id_wins(tmp_path, monkeypatch):
    """A W&B run deleted in its web app cannot be continued: the refusal names OUT/trackers.json, whose removal starts
    a new run (the only way out was --overwrite, which removes the checkpoints too). A WANDB_RUN_ID the user set is
    the run W&B logs to, not the recorded one."""
    from perpair.train.tracking import TRACKER_RUNS, start_trackers

    class Accelerator:
        log_with, is_main_process, kwargs = ["wandb"], True, None

        def init_trackers(self, project, config, init_kwargs):
            self.kwargs = init_kwargs
            raise RuntimeError("run abc123 was previously created and deleted")

    (tmp_path / TRACKER_RUNS).write_text('{"wandb": "abc123"}\n')
    accelerator = Accelerator()
    with pytest.raises(PerpairError, match=r"the tracker did not start: run abc123 was previously created and deleted "
                                           r"\(it continues W&B run abc123, recorded in .*trackers\.json: remove that "
                                           r"file to start a new W&B run"):
        start_trackers(accelerator, project="p", run_name="r", config={}, out=str(tmp_path), resumed_at=2)
    assert (accelerator.kwargs["wandb"]["id"], accelerator.kwargs["wandb"]["resume"]) == ("abc123", "allow")
    monkeypatch.setenv("WANDB_RUN_ID", "mine")
    with pytest.raises(PerpairError) as refused:
        start_trackers(accelerator, project="p", run_name="r", config={}, out=str(tmp_path), resumed_at=2)
    assert "id" not in accelerator.kwargs["wandb"] and "trackers.json" not in str(refused.value)


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file, once W&B has written all of it: its service process writes the
    file and can still be at it when ``wandb.finish()`` has returned (seen once on a loaded machine: the file read
    then held no history yet), and its last record is the run's ``exit``."""
    deadline = time.monotonic() + 60
    while True:
        rows, finished = _wandb_records(path.read_bytes())
        if finished:
            return rows
        assert time.monotonic() < deadline, f"{path}: W&B wrote no exit record within 60 s"
        time.sleep(0.1)


def _wandb_records(data: bytes) -> tuple[list[dict], bool]:
    """The history rows in an offline W&B run file's bytes, and whether its ``exit`` record is among them. The file is
    a LevelDB-style log (a 7-byte header ":W&B", magic, version; 32 KiB blocks of records: crc32 u32, length u16, type
    u8 = full/first/middle/last) of protobuf ``Record`` messages, decoded with wandb's own schema (wandb ≥ 0.20 has no
    Python reader)."""
    from wandb.proto import wandb_internal_pb2

    if len(data) < 7:  # (the file just created)
        return [], False
    assert data[:4] == b":W&B"
    rows, position, pending, block, finished = [], 7, b"", 32768, False
    while position + 7 <= len(data):
        left = block - position % block
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            position += left
            continue
        if position + 7 + length > len(data):  # a record still being written
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            finished = finished or record.WhichOneof("record_type") == "exit"
    return rows, finished


def test_a_tracker_whose_package_is_missing_is_refused_at_load(monkeypatch, tmp_path):
    import perpair.train.tracking as tracking

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(Exception, match="report_to: needs mlflow"):
        load_config(None, {"model": "m", "data": "d", "out": str(tmp_path), "steps": 1, "report_to": ["mlflow"]})
    # given on the command line beside a config file, the tracker is named as the command line's, not the file's
    path = tmp_path / "train.yaml"
    path.write_text("model: m\ndata: d\nout: o\nsteps: 1\n")
    for trackers, says in ((["mlflow"], "report_to: needs mlflow, not installed"),
                           (["tensorboard", "bogus"], "report_to.1: Input should be")):
        with pytest.raises(PerpairError) as given:
            load_config(path, {"report_to": trackers})
        assert says in str(given.value) and str(given.value).endswith("(from the command line)")
        assert "train.yaml" not in str(given.value)


def test_an_unknown_tracker_is_refused_by_the_cli(tmp_path):
    result = run_cli("train", "--model", "m", "--data", "d", "--out", tmp_path / "o", "--steps", "1",
                     "--report-to", "tensorbored", check=False)
    assert result.returncode == 2
    assert "report_to" in result.stderr and "'tensorboard', 'wandb'" in result.stderr
    assert "Traceback" not in result.stderr
