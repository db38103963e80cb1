"""The one configuration of a training run: validated (types, ranges, cross-field rules) when loaded.

Load from YAML with :func:`load_config`, optionally with ``key=value`` overrides (dotted for nested keys,
values parsed as YAML: ``lora.r=16``, ``beta=0.01``). An impossible combination is refused here with one
message, never discovered mid-run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from perpair.errors import PerpairError
from perpair.train.losses import LOSSES
from perpair.train.tracking import missing_packages


class LoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field("all-linear", description="Modules that get an adapter.")
    merge: bool = Field(False, description="Also save the base model with the adapter merged in.")


class TrainConfig(BaseModel):
    """Every option of ``perpair train``. Defaults follow TRL's DPOConfig where one exists."""

    model_config = ConfigDict(extra="forbid")

    # --- inputs and outputs ------------------------------------------------------------------------
    model: str = Field(description="Policy to train: a local folder, a Hub id, or 'smollm2'.")
    data: str = Field(description="A pairs file, or any source `perpair prepare` reads (converted on the fly).")
    plan: str | None = Field(None, description="A plan (perpair plan) giving per-pair beta, route and order.")
    out: str = Field(description="Output folder: metrics.jsonl, checkpoints/, model/ or adapter/.")
    reference_model: str | None = Field(None, description="Reference model; default: the initial policy.")
    reference_cache: str | None = Field(
        None, description="Folder of cached reference log-probs (default: $PERPAIR_CACHE/reference).")

    # --- objective -----------------------------------------------------------------------------------
    loss: str = Field("sigmoid", description=f"Preference loss: {', '.join(sorted(LOSSES))}.")
    beta: float = Field(0.1, gt=0, description="Global beta; a plan's per-pair beta replaces it.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Global cDPO/robust epsilon without a plan.")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin gamma (Meng et al. Eq. 6).")

    # --- data order and sizes ------------------------------------------------------------------------
    steps: int = Field(ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Pairs per optimizer step (global, over all processes).")
    max_length: int = Field(1024, ge=2, description="Max tokens of prompt + response (TRL keep_start truncation).")
    shuffle: bool = Field(False, description="Shuffle (seeded) instead of file order; with a plan only if its "
                          "curriculum is none (a curriculum fixes the order).")
    seed: int = Field(0, description="Seed of shuffling, initialisation of adapters and of every RNG.")
    tokens_per_forward: int = Field(
        0, ge=0, description="Pack several pairs of a step into one forward up to this many tokens; 0 = one pair "
                             "per forward (least activation memory; packing gives the matrix multiplications more "
                             "rows, which pays on a GPU).")
    share_prompt: bool = Field(True, description="Compute the prompt once for both responses (tree attention).")
    logits_chunk: int = Field(256, ge=1, description="Positions per chunk of the vocabulary projection "
                              "(a chunk's float32 logits are logits_chunk × vocabulary × 4 bytes).")

    # --- optimisation --------------------------------------------------------------------------------
    lr: float = Field(1e-6, gt=0, description="Peak learning rate (AdamW).")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("linear", description="Decay after warm-up.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the steps spent warming up linearly.")
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null = off.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast where supported (auto: on a CUDA device with bf16), else fp32.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward (less memory).")
    lean_activations: bool = Field(
        True, description="Save only the inputs of SwiGLU MLPs and RMSNorms for the backward and recompute their "
                          "elementwise outputs (about a third less activation memory, no matmul recomputed).")
    recompute_mlp: bool = Field(
        True, description="With lean_activations: SwiGLU MLPs save only their input and recompute the gate and "
                           "up projections in the backward (about 40% less activation memory for a sixth more "
                           "matmul work; a lighter trade than gradient_checkpointing).")
    lora: LoraConfig | None = Field(None, description="Train a LoRA adapter instead of all weights.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice).")
    release_cpu_memory: bool = Field(
        True, description="Training on a CPU under glibc's malloc (Linux, no tcmalloc/mimalloc/jemalloc preloaded; "
                          "see perpair.allocator): give every freed buffer of 1 MiB or more back to the OS at once "
                          "(mallopt M_MMAP_THRESHOLD, process-wide) instead of keeping it in a fragmented heap; a "
                          "lower peak RSS for more page faults.")

    # --- experiment tracking -----------------------------------------------------------------------
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = Field(
        default_factory=list, description="Trackers to log every step to (Accelerate's), under TRL's metric names "
                                          "(train/loss, train/rewards/margins, …) plus train/perpair/….")
    project: str = Field("perpair", description="Tracker project (TensorBoard: the sub-folder of OUT/runs).")
    run_name: str | None = Field(None, description="Run name on the dashboard (default: the output folder's name).")

    # --- checkpoints ---------------------------------------------------------------------------------
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (older ones are deleted).")
    resume: bool = Field(False, description="Continue from the latest checkpoint in OUT.")
    save_model: bool = Field(True, description="Save the final model (HF format) to OUT/model or OUT/adapter.")
    final_checkpoint: bool = Field(True, description="Write a resumable checkpoint after the last step too.")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} is unknown; choose one of {', '.join(sorted(LOSSES))}")
        if self.label_smoothing > 0 and not LOSSES[self.loss].smoothing:
            raise ValueError(f"label_smoothing {self.label_smoothing} has no meaning for loss {self.loss!r}; "
                             f"losses that use it: {', '.join(n for n, s in LOSSES.items() if s.smoothing)}")
        if self.reference_model is not None and LOSSES[self.loss].reference_free:
            raise ValueError(f"loss {self.loss!r} is reference-free; drop reference_model")
        if self.tokens_per_forward and self.tokens_per_forward < self.max_length:
            raise ValueError(f"tokens_per_forward ({self.tokens_per_forward}) must be 0 or at least max_length "
                             f"({self.max_length})")
        missing = missing_packages(self.report_to)
        if missing:
            raise ValueError(f"report_to needs {', '.join(missing)}, not installed: pip install 'perpair[tracking]'")
        return self

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_ratio * self.steps))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PerpairError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lora.r=8", "beta=0.01"]`` → a nested dict; values parsed as YAML scalars."""
    data: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PerpairError(f"override {item!r}: expected key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw else None)
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A validated config from a YAML file and/or overrides (overrides win). Relative paths in the file are
    kept as written (relative to the working directory, like the CLI's)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise PerpairError(f"file {path}: cannot read the config ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise PerpairError(f"file {path}: the config must be a mapping of options")
        data = loaded or {}
    data = _merge(data, overrides or {})
    try:
        return TrainConfig(**data)
    except ValidationError as exc:
        where = f"file {path}: " if path else ""
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        raise PerpairError(f"{where}invalid train config: {problems}") from None
