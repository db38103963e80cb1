"""The one configuration of a training run: validated (types, ranges, cross-field rules) when loaded.

Load from YAML with :func:`load_config`, optionally with ``key=value`` overrides (dotted for nested keys,
values parsed as YAML: ``lora.r=16``, ``beta=0.01``). An impossible combination is refused here with one
message, never discovered mid-run.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from perpair.config_files import NumbersNotBools, invalid_config, load_yaml
from perpair.errors import InputError, PerpairError
from perpair.plan.config import deep_merge
from perpair.train.lean import RECOMPUTE_SHARE
from perpair.train.losses import F_DIVERGENCES, LOSSES, LossSpec, objective
from perpair.train.tracking import missing_packages


class LoraConfig(NumbersNotBools):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field("all-linear", description="Modules that get an adapter.")
    merge: bool = Field(False, description="Also save the base model with the adapter merged in.")

    @field_validator("target_modules")
    @classmethod
    def _some_target(cls, value: list[str] | str) -> list[str] | str:
        if not value:  # (PEFT refused it only after the reference pass)
            raise ValueError("no module named; 'all-linear' (the default) adapts every linear layer")
        return value


# tokens_per_forward's default, × max_length: twice one pair's most. benchmarks/RESULTS.md, "How the defaults were
# chosen" (batch 2, max length 512): at 4 × every step is one forward and the peak 0.2 GiB lower than one pair per
# forward (no gradient is held while another forward's activations live), the step as fast; at 2 × most steps did
# not pack.
PACK_LENGTHS = 4


class TrainConfig(NumbersNotBools):
    """Every option of ``perpair train``. Defaults follow TRL's DPOConfig where one exists."""

    model_config = ConfigDict(extra="forbid")

    # --- inputs and outputs ------------------------------------------------------------------------
    model: str = Field(description="Policy to train: a local folder, a Hub id, or 'smollm2'.")
    data: str = Field(description="A pairs file, or a data file or folder `perpair prepare` reads (converted on the "
                                  "fly with its defaults; a Hub dataset: perpair prepare it first).")
    plan: str | None = Field(None, description="A plan (perpair plan) giving per-pair beta, route and order.")
    out: str = Field(description="Output folder: metrics.jsonl, checkpoints/, model/ or adapter/.")
    reference_model: str | None = Field(None, description="Reference model; default: the initial policy.")
    reference_cache: str | None = Field(
        None, description="Folder of cached reference log-probs (default: $PERPAIR_CACHE/reference).")

    # --- objective -----------------------------------------------------------------------------------
    loss: str | list[str] = Field(
        "sigmoid", description=f"Preference loss, or a list of several summed with loss_weights (TRL's loss_type): "
                               f"{', '.join(sorted(LOSSES))}.")
    loss_weights: list[float] | None = Field(
        None, description="Weights of the losses in `loss` (default 1 each): MPO [sigmoid, bco_pair, sft] with "
                          "[0.8, 0.2, 1.0]; RPO [sigmoid, sft] with [1, alpha].")
    f_divergence_type: Literal[F_DIVERGENCES] = Field(  # type: ignore[valid-type]
        "reverse_kl", description="f-DPO divergence (Wang et al. 2023): reverse_kl (DPO), forward_kl, "
                                  "js_divergence, alpha_divergence; other than reverse_kl only for sigmoid, "
                                  "sigmoid_norm, hinge, ipo, exo_pair, robust, discopop (and sft).")
    f_alpha_divergence_coef: float = Field(0.5, description="alpha of alpha_divergence.")
    discopop_tau: float = Field(0.05, gt=0, description="DiscoPOP temperature tau (Eq. 5; 0.05 in the paper).")
    use_weighting: bool = Field(
        False, description="WPO (Zhou et al. 2024): scale each preference pair's loss by the policy's "
                           "length-normalised, sampling-aligned probability of both responses (detached).")
    ld_alpha: float | None = Field(
        None, ge=0, le=1, description="LD-DPO (Liu et al. 2024): weight of the tokens past min(|y_w|, |y_l|) in "
                                      "both responses' log-probs (policy and reference); null = plain sums.")
    beta: float = Field(0.1, gt=0, description="Global beta; a plan's per-pair beta replaces it.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Global cDPO/robust epsilon without a plan.")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin gamma (Meng et al. Eq. 6).")

    # --- data order and sizes ------------------------------------------------------------------------
    steps: int | None = Field(None, ge=1, description="Optimizer steps (unset: one epoch over the pairs the run "
                                                       "trains, those whose prompt fits max_length).")
    batch_size: int = Field(8, ge=1, description="Pairs per optimizer step (global, over all processes).")
    max_length: int = Field(1024, ge=2, description="Max tokens of prompt + response (TRL keep_start truncation).")
    shuffle: bool = Field(False, description="Shuffle (seeded) instead of file order; with a plan only if its "
                          "curriculum is none (a curriculum fixes the order).")
    # (NumPy's seeds are 0 … 2³² − 1: Accelerate's set_seed seeds it too)
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of shuffling, initialisation of adapters and of every RNG.")
    tokens_per_forward: int | None = Field(
        None, ge=0, description=f"Pack several pairs of a step into one forward up to this many tokens; 0 = one pair "
                                f"per forward; null (default) = {PACK_LENGTHS} × max_length (twice the most one "
                                f"pair can have: prompt + two responses), a bound that does not grow with "
                                f"batch_size (0 under FSDP, which needs the same number of forwards on every rank).")
    logits_chunk: int = Field(256, ge=1, description="Bounds the vocabulary projection's buffer to logits_chunk "
                              "× vocabulary logits (float32: 4 bytes each): a forward's completion positions are "
                              "projected onto blocks of at most 4,096 vocabulary entries, narrower where that "
                              "bound requires (the reference pass on a CPU: logits_chunk positions at a time).")

    # --- optimisation --------------------------------------------------------------------------------
    lr: float = Field(1e-6, gt=0, description="Peak learning rate (AdamW).")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("linear", description="Decay after warm-up.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the steps spent warming up linearly.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay, of every trained parameter "
                                "but biases and norms (as TRL's Trainer spares them)")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null = off.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast where supported (auto: on a CUDA device with bf16), else fp32.")
    disable_dropout: bool = Field(True, description="Set the model's own dropout modules to 0, as TRL's DPOConfig "
                                  "does by default (a LoRA adapter's lora.dropout, set here, still applies).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward (less memory).")
    lean_activations: bool = Field(
        True, description="Save only the inputs of SwiGLU MLPs and RMSNorms for the backward and recompute their "
                          "elementwise outputs (about a third less activation memory, no matmul recomputed).")
    recompute_mlp: bool | None = Field(
        None,
        description=f"With lean_activations: SwiGLU MLPs save only their input and recompute the gate and up "
                    f"projections in the backward (about 40% less activation memory for a sixth more matmul work; a "
                    f"lighter trade than gradient_checkpointing). true: every MLP; false: none. null (default): by a "
                    f"memory budget, {RECOMPUTE_SHARE:.0%} of the memory of the weights, gradients and AdamW state: in "
                    f"each forward the last MLPs keep their gate and up outputs as long as they fit in it, the others "
                    f"recompute (a short forward recomputes nothing).")
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
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: by the clock alone, save_every_minutes, "
                                                 "and at the end).")
    save_every_minutes: float = Field(
        30, ge=0, description="Checkpoint after the first step that ends this many minutes after the last checkpoint "
                              "(or the run's first step): a killed run loses at most that much (0: off). With "
                              "final_checkpoint false, a run that finishes removes these (save_every's stay).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (older ones are deleted): save_every's and "
                                  "the final one (the clock's when save_every is 0); beside them, a checkpoint of the "
                                  "clock or a stop only while it is the newest.")
    resume: bool = Field(False, description="Continue from the latest checkpoint in OUT (of this very run: "
                         "OUT/run.key must match these settings).")
    overwrite: bool = Field(False, description="Replace the outputs of another run in OUT (refused otherwise).")
    save_model: bool = Field(True, description="Save the final model (HF format) to OUT/model or OUT/adapter.")
    final_checkpoint: bool = Field(True, description="Write a resumable checkpoint after the last step too (false: "
                                   "a run that finishes also removes the checkpoints written by the clock or at a "
                                   "stop, keeping save_every's).")

    @field_validator("model", "data", "plan", "out", "reference_model", "reference_cache")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():  # '' would silently be the working directory
            raise ValueError("an empty path; name a file or folder")
        return value

    @field_validator("loss")
    @classmethod
    def _one_loss_is_a_name(cls, value: str | list[str]) -> str | list[str]:
        # an unknown name is this key's mistake (named as given, on the command line or in the file), not a rule
        # across keys as those of _check_loss
        unknown = [n for n in ([value] if isinstance(value, str) else value) if n not in LOSSES]
        if unknown:
            raise ValueError(f"loss {unknown[0]!r} is unknown; choose one of {', '.join(sorted(LOSSES))}")
        # [name] and name are the same run: keep one spelling, so `config.loss == "sft"` tests hold for both
        return value[0] if isinstance(value, list) and len(value) == 1 else value

    @field_validator("overwrite")
    @classmethod
    def _resume_or_overwrite(cls, value: bool, info: ValidationInfo) -> bool:
        # a key's own error (resume is read first), so --resume --overwrite is named as the command line's
        if value and info.data.get("resume"):
            raise ValueError("resume continues the run in OUT, overwrite replaces it: choose one")
        return value

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, value: list[str]) -> list[str]:
        # this key's own error (named as given: --report-to on the command line does not blame a config file)
        missing = missing_packages(value)
        if missing:
            raise ValueError(f"needs {', '.join(missing)}, not installed: pip install {' '.join(missing)} "
                             "(or 'perpair[tracking]' for every tracker)")
        return value

    @model_validator(mode="after")
    def _check_loss(self) -> TrainConfig:
        try:
            spec = objective(self.loss, self.loss_weights)
        except ValueError as exc:
            raise ValueError(f"loss: {exc}") from None
        if self.label_smoothing > 0 and not spec.smoothing:
            raise ValueError(f"label_smoothing {self.label_smoothing} has no meaning for loss {spec.name!r}; "
                             f"losses that use it: {', '.join(n for n, s in LOSSES.items() if s.smoothing)}")
        if spec.needs_smoothing and self.label_smoothing <= 0 and self.plan is None:
            raise ValueError(f"loss {spec.name!r} needs label_smoothing > 0 (EXO's log ε; the paper uses 1e-3)")
        if self.f_divergence_type != "reverse_kl" and not spec.f_divergence:
            raise ValueError(f"f_divergence_type {self.f_divergence_type} only applies to "
                             f"{', '.join(n for n, s in LOSSES.items() if s.f_divergence)} (the losses built on "
                             f"the chosen − rejected score, where log Z(x) cancels), not to {spec.name!r}")
        if spec.reference_free:  # no reference pass runs: a reference model or cache would go unread
            unread = [name for name in ("reference_model", "reference_cache") if getattr(self, name) is not None]
            if unread:
                raise ValueError(f"loss {spec.name!r} is reference-free; drop {' and '.join(unread)}")
        if self.use_weighting and spec.batch_level:
            raise ValueError(f"use_weighting cannot weight {spec.name!r}: it sorts the batch, so its terms belong "
                             "to no single pair")
        if self.ld_alpha is not None and "sft" in ([self.loss] if isinstance(self.loss, str) else self.loss):
            # TRL's sft term reads the plain token log-probs; ours would see the LD-weighted sum
            raise ValueError("ld_alpha weights the preference log-probs; it cannot apply to an sft loss term")
        return self

    @property
    def objective(self) -> LossSpec:
        """The loss (or weighted sum of losses) the preference pairs train with."""
        return objective(self.loss, self.loss_weights)

    @property
    def sft_only(self) -> bool:
        """Every term of the loss is ``sft`` (``sft``, or a weighted sum of sft terms alone such as ``[sft, sft]``):
        each pair's chosen response alone, by SFT; no β, ε, rejected response or reference."""
        return set([self.loss] if isinstance(self.loss, str) else self.loss) == {"sft"}

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.tokens_per_forward and self.tokens_per_forward < self.max_length:
            raise ValueError(f"tokens_per_forward ({self.tokens_per_forward}) must be 0 or at least max_length "
                             f"({self.max_length})")
        names = [self.loss] if isinstance(self.loss, str) else self.loss
        if self.sft_only and self.plan is not None:
            # a plan's β, ε, routes and flips say how to train preferences; SFT trains every chosen response
            raise ValueError(f"loss {self.objective.name!r} trains every pair's chosen response and would ignore the "
                             "plan's beta, label_smoothing, routes and flips; drop the plan, or use a preference loss "
                             "(the plan's sft route already trains some pairs by SFT)")
        given = [name for name in ("beta", "label_smoothing") if name in self.model_fields_set]
        if self.plan is not None and given:
            # the plan's per-pair values are what trains: a global one beside it would be silently unused
            raise ValueError(f"{' and '.join(given)} would be ignored: the plan gives every pair its own; drop "
                             f"{'them' if len(given) > 1 else 'it'}, or make the plan with other values (perpair "
                             f"plan --beta, the schedule's label_smoothing)")
        for option, loss in (("simpo_gamma", "simpo"), ("discopop_tau", "discopop")):
            if option in self.model_fields_set and loss not in names:
                raise ValueError(f"{option} is used by loss {loss!r} only, not {self.loss!r}; drop it")
        if "f_alpha_divergence_coef" in self.model_fields_set and self.f_divergence_type != "alpha_divergence":
            raise ValueError(f"f_alpha_divergence_coef is the alpha of f_divergence_type alpha_divergence, not "
                             f"{self.f_divergence_type}; drop it")
        if self.sft_only:  # every pair's chosen NLL: no β, no score for an f-divergence, no WPO weight
            unused = ["beta"] if "beta" in self.model_fields_set else []
            unused += ["f_divergence_type"] if self.f_divergence_type != "reverse_kl" else []
            unused += ["use_weighting"] if self.use_weighting else []
            if unused:
                raise ValueError(f"loss {self.objective.name!r} trains each chosen response's length-normalised NLL "
                                 f"and would ignore {' and '.join(unused)}; drop {'them' if len(unused) > 1 else 'it'}")
        named = ["project"] * ("project" in self.model_fields_set) + ["run_name"] * (self.run_name is not None)
        if named and not self.report_to:  # read only when a tracker starts
            raise ValueError(f"{' and '.join(named)} name{'s' if len(named) == 1 else ''} the run on a tracker's "
                             f"dashboard, and report_to names no tracker; drop {'it' if len(named) == 1 else 'them'}"
                             ", or add report_to")
        if self.run_name is not None and set(self.report_to) == {"tensorboard"}:
            raise ValueError("run_name names the run on W&B, Trackio or MLflow; TensorBoard, the only tracker here, "
                             "shows none: drop run_name (project names TensorBoard's folder, OUT/runs/PROJECT)")
        if self.lora is not None and self.lora.merge and not self.save_model:
            raise ValueError("lora.merge saves the merged model, and save_model false saves none; drop one")
        if self.recompute_mlp is not None and not self.lean_activations:
            raise ValueError("recompute_mlp applies with lean_activations only, which is false here; drop "
                             "recompute_mlp, or set lean_activations true")
        if self.objective.batch_level and self.tokens_per_forward is not None:
            raise ValueError(f"tokens_per_forward would be ignored: loss {self.objective.name!r} sorts across the "
                             "step, so the step's pairs always share one forward; drop it")
        if self.steps is not None and (problem := self.warmup_problem(self.steps)):
            raise ValueError(problem)
        if self.steps is not None and self.save_every >= self.steps and not self.final_checkpoint:
            raise ValueError(f"save_every {self.save_every} ≥ steps {self.steps} with final_checkpoint false: the "
                             "run would write no checkpoint; lower save_every or set final_checkpoint true")
        processes = launch_processes()
        if processes > 1 and self.objective.batch_level:
            raise ValueError(f"loss {self.objective.name!r} sorts across the whole batch, which one process must "
                             f"hold; this launch has {processes} (WORLD_SIZE): run it in a single process")
        if self.batch_size % processes:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of the number of processes "
                             f"({processes}, WORLD_SIZE of this launch)")
        problem = sharding_problem(self, launch_sharding())
        if problem:
            raise ValueError(problem)
        return self

    def warmup_problem(self, steps: int) -> str | None:
        """Why ``warmup_ratio`` over ``steps`` steps leaves the schedule unread (None: it does not): a warm-up of
        every step never reaches ``lr`` (step 1 trains at 0; a run of one step, at 0 alone), and the decay of
        ``lr_schedule`` never starts."""
        warmup = math.ceil(self.warmup_ratio * steps)
        if not self.warmup_ratio or warmup < steps:
            return None
        return (f"warmup_ratio {self.warmup_ratio:g} warms up for all {steps} steps (⌈{self.warmup_ratio:g} × "
                f"{steps}⌉, as Transformers counts them): the learning rate would never reach lr (step 1 trains at 0"
                f"{', the only step' if steps == 1 else ''}) and lr_schedule {self.lr_schedule} would never start; "
                "lower warmup_ratio")

    @property
    def warmup_steps(self) -> int:
        assert self.steps is not None, "the steps of one epoch are resolved by train() before the scheduler"
        # rounded up, as Transformers' Trainer (TRL's) turns a warm-up ratio into steps: 0.1 of 14 steps is 2
        return math.ceil(self.warmup_ratio * self.steps)

    @property
    def forward_tokens(self) -> int:
        """The packing budget in effect: ``tokens_per_forward`` as set, or its default for this launch. Resolved
        here rather than stored, so a dumped config reloaded under another launch resolves again."""
        if self.tokens_per_forward is not None:
            return self.tokens_per_forward
        return 0 if launch_sharding() == "fsdp" else PACK_LENGTHS * self.max_length

    @property
    def longest_forward(self) -> int:
        """Tokens one forward can hold at most: a pair is at most ``2 × max_length`` (the prompt once, each
        response up to max_length with it); a batch-level loss (AOT) runs the whole step in one forward."""
        if self.objective.batch_level:
            return self.batch_size * 2 * self.max_length
        return max(self.forward_tokens, 2 * self.max_length)


def launch_processes() -> int:
    """Processes of this launch: ``WORLD_SIZE``, set by torchrun and ``accelerate launch`` (1 without either)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launch_sharding() -> str | None:
    """``"fsdp"`` or ``"deepspeed"`` when ``accelerate launch`` was given such a config, else None."""
    for name in ("deepspeed", "fsdp"):
        if os.environ.get(f"ACCELERATE_USE_{name.upper()}", "").lower() == "true":
            return name
    return None


def sharding_problem(config: TrainConfig, sharding: str | None) -> str | None:
    """Why ``config`` cannot run with its weights sharded this way (None: it can). Checked when the config is
    built (from the launch's environment) and again with the sharding Accelerate actually chose."""
    if sharding == "deepspeed":
        # accelerator.backward runs DeepSpeed's optimizer step after every forward's backward (a step holds several),
        # and ZeRO-3 leaves lm_head.weight partitioned where CompletionLogps reads it outside lm_head's forward.
        return ("DeepSpeed is not supported by perpair train yet; launch with an FSDP config "
                "(examples/accelerate/fsdp-*.yaml)")
    if sharding != "fsdp":
        return None
    if (config.save_every or config.save_every_minutes or config.final_checkpoint or config.resume) \
            and not sharded_checkpoints():
        import torch

        return (f"resumable checkpoints under FSDP need torch.distributed.checkpoint's sharded safetensors storage "
                f"(HuggingFaceStorageWriter with save_distributed), which torch {torch.__version__} lacks: upgrade "
                "torch (2.13 was tested), or set save_every: 0, save_every_minutes: 0 and final_checkpoint: false")
    if config.forward_tokens:  # its default is 0 under an FSDP launch; set, or FSDP chosen otherwise: refused
        # FSDP gathers weights in every forward, a collective: ranks packing into different numbers of forwards hang
        return "tokens_per_forward must be 0 under FSDP (every rank must run the same number of forwards)"
    if config.lora is not None and config.lora.merge:
        return "lora.merge is not supported under FSDP; merge the saved adapter afterwards"
    return None


def sharded_checkpoints() -> bool:
    """Whether torch can write and read checkpoints under FSDP as perpair does: every process its shards, in
    safetensors files (checkpoints.save_checkpoint)."""
    import inspect

    try:
        from torch.distributed.checkpoint import HuggingFaceStorageWriter
    except ImportError:
        return False
    return "save_distributed" in inspect.signature(HuggingFaceStorageWriter).parameters


def check_plan_fits(config: TrainConfig, curriculum: str, smoothing: bool, where: str) -> None:
    """The rules between the train config and a plan: its ``curriculum`` kind and whether it gives any trained
    preference pair ε > 0. ``perpair train`` checks them from the plan file, ``perpair run`` from each arm's
    schedule, both before any work."""
    if config.shuffle and curriculum != "none":
        raise PerpairError(f"{where}: its curriculum {curriculum!r} fixes the training order, so shuffle would "
                           "undo it; drop shuffle, or use curriculum none")
    if smoothing and not config.objective.smoothing:
        raise PerpairError(f"{where} sets label_smoothing > 0, which loss {config.objective.name!r} would ignore; "
                           f"use one that reads it ({', '.join(n for n, s in LOSSES.items() if s.smoothing)}), "
                           "or a plan without smoothing")


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PerpairError(f"override {key}: {part} is not a section")
    if parts[-1] in node:  # as a key written twice in a YAML mapping: one of the two would go unread
        raise PerpairError(f"override {key}: given twice (--set); keep one")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lora.r=8", "beta=0.01"]`` → a nested dict; values parsed as YAML scalars."""
    data: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PerpairError(f"override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as exc:  # `--set 'data.sources=[a'`: the value, not a traceback
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise PerpairError(f"override {item!r}: the value is not valid YAML ({problem})") from None
        _set_dotted(data, key.strip(), value)
    return data


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A validated config from a YAML file and/or overrides (overrides win). Relative paths in the file are
    kept as written (relative to the working directory, like the CLI's)."""
    in_file = load_yaml(path, "train config") if path is not None else {}
    if "lora" in in_file and in_file["lora"] is None and "lora" not in (overrides or {}):
        # YAML reads `lora:` with its keys commented out as null: the run would train every weight, not an adapter
        raise InputError("lora is empty (null), which trains every weight without an adapter: write `lora: {}` for "
                         "an adapter with the defaults, or remove the key for full fine-tuning", file=str(path),
                         field="lora")
    data = deep_merge(in_file, overrides or {})
    try:
        return TrainConfig(**data)
    except ValidationError as exc:
        raise invalid_config(exc, "train config", path, overrides) from None
