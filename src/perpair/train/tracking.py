"""Experiment trackers (TensorBoard, W&B, Trackio, MLflow) through Accelerate's own tracking API.

A TRL run reaches its dashboard through transformers' callbacks, which log each metric under ``train/`` + the
name TRL gives it (``train/loss``, ``train/rewards/margins``, …). We log the same quantities under the same
names, so a TRL run and a perpair run plot on the same panels, and perpair's own quantities (per-pair β,
routes, throughput) under ``train/perpair/…``. Only quantities with the same meaning share a name: TRL's
``num_tokens`` counts the prompt once per response, our packed layout once per pair, so ours is not called that.

The tracker packages are optional (``pip install 'perpair[tracking]'``): a name whose package is missing is
refused when the configuration is built, before any work.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from perpair.artifacts import write_text_atomic
from perpair.errors import PerpairError

# tracker name (as Accelerate and TRL's report_to spell it) -> the package it needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}

# our metric -> the name TRL 1.16's DPOTrainer (through transformers' Trainer) logs the same quantity under
TRL_NAMES = {
    "loss": "loss",
    "lr": "learning_rate",
    "grad_norm": "grad_norm",
    "rewards_chosen": "rewards/chosen",
    "rewards_rejected": "rewards/rejected",
    "reward_margin": "rewards/margins",
    "reward_accuracy": "rewards/accuracies",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
}
# ours alone, logged as train/perpair/NAME
OWN_NAMES = ("beta_mean", "beta_min", "beta_max", "loss_preference", "loss_sft", "pairs", "tokens", "seconds")
PREFIX = "train/"
# OUT's record of the W&B run its training logs to, so that a resumed run (or one started again after it stopped
# before its first checkpoint) continues that run instead of starting another
TRACKER_RUNS = "trackers.json"


def missing_packages(report_to: list[str]) -> list[str]:
    """The packages the trackers in ``report_to`` need and this environment lacks."""
    return [TRACKERS[name] for name in report_to if importlib.util.find_spec(TRACKERS[name]) is None]


def tracker_values(metrics: dict[str, Any]) -> dict[str, float]:
    """One step's metrics (a line of metrics.jsonl) as the scalars a dashboard plots, under TRL's names."""
    values = {PREFIX + TRL_NAMES[key]: metrics[key] for key in TRL_NAMES if metrics.get(key) is not None}
    values.update({f"{PREFIX}perpair/{key}": metrics[key] for key in OWN_NAMES if metrics.get(key) is not None})
    pairs = metrics.get("pairs") or 0
    if pairs:
        for route in ("preference", "sft"):
            values[f"{PREFIX}perpair/route_share_{route}"] = metrics.get(f"pairs_{route}", 0) / pairs
    if metrics.get("seconds"):
        values[f"{PREFIX}perpair/tokens_per_second"] = metrics["tokens"] / metrics["seconds"]
    return {key: float(value) for key, value in values.items()}


def hyperparameters(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The run's configuration flattened to the scalar values every tracker stores (dotted keys)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in hyperparameters(value).items()})
        elif isinstance(value, bool | int | float | str):
            flat[key] = value
        else:  # None, lists: stored as their JSON text (TensorBoard's hparams take scalars only)
            flat[key] = json.dumps(value)
    return flat


def start_trackers(accelerator, *, project: str, run_name: str, config: dict[str, Any], out: str,
                   resumed_at: int = 0) -> None:
    """Open the trackers the Accelerator was created with (``log_with``); a no-op when there are none.
    ``resumed_at``: the step of the checkpoint a resumed run continues from; TensorBoard hides what the stopped
    attempt logged after it (its steps are trained again, and would be plotted twice). W&B continues the run an
    earlier attempt of this training logged to (its id in ``out``/:data:`TRACKER_RUNS`)."""
    if not accelerator.log_with:
        return
    # TensorBoard's purge from step 1 too: a run that starts again without a checkpoint (killed before its first)
    init_kwargs = {"wandb": {"name": run_name, "dir": out}, "trackio": {"name": run_name},
                   "mlflow": {"run_name": run_name}, "tensorboard": {"purge_step": resumed_at + 1}}
    record = Path(out) / TRACKER_RUNS  # (only an attempt of this run wrote it: another run's outputs are removed)
    earlier = _recorded_runs(record)
    continued = earlier.get("wandb") if not os.environ.get("WANDB_RUN_ID") else None  # (the user's own id wins)
    if continued:
        # the same W&B run: the steps trained again after the checkpoint are logged to it again, and W&B keeps
        # the first attempt's values of them (the same losses: a resumed run is exact), with a warning
        init_kwargs["wandb"].update(id=continued, resume="allow")
    # TensorBoard writes to project_dir/<project>: the run's own folder, so two runs never share event files
    try:
        accelerator.init_trackers(project, config=hyperparameters(config), init_kwargs=init_kwargs)
    except Exception as exc:  # noqa: BLE001 - each tracker raises its own types (W&B's UsageError without a login)
        first = " ".join(str(exc).split()) or type(exc).__name__
        hint = (f" (it continues W&B run {continued}, recorded in {record}: remove that file to start a new W&B run, "
                "e.g. where that one was deleted)" if continued else "")
        raise PerpairError(f"report_to {', '.join(map(str, accelerator.log_with))}: the tracker did not start: "
                           f"{first[:300]}{hint}") from None
    if accelerator.is_main_process and "wandb" in _names(accelerator.log_with):
        run_id = accelerator.get_tracker("wandb", unwrap=True).id
        if run_id != earlier.get("wandb"):
            write_text_atomic(record, json.dumps({**earlier, "wandb": run_id}) + "\n")


def _names(log_with) -> set[str]:
    """The trackers' names (Accelerate keeps a LoggerType, a str enum, or a name)."""
    return {str(getattr(tracker, "value", tracker)) for tracker in log_with}


def _recorded_runs(path: Path) -> dict[str, str]:
    """The tracker runs recorded in ``path`` (:data:`TRACKER_RUNS`); none where there is no readable record (a new
    run then: nothing is lost but the continuity of the plot)."""
    try:
        runs = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in runs.items() if isinstance(v, str)} if isinstance(runs, dict) else {}
