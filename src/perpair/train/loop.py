"""``train(config)``: per-pair DPO / SFT at plain-DPO cost.

Read :func:`train` (its body: :func:`_train`) top to bottom: it is the whole run. The step and its metrics are
below it; setup is in :mod:`~perpair.train.setup`, the pairs of each step in :mod:`~perpair.train.batches`,
checkpoints and the saved model in :mod:`~perpair.train.checkpoints`. What happens, in order:

1. the pairs (and the plan, if any) give each pair a β_i, a route (preference | sft) and a position;
2. the pairs the run will see are tokenized as TRL does;
3. reference log-probs come from the on-disk cache, the missing ones computed once — before training, so
   training holds no reference model; those of the first step's pairs come from that step's own forward, where
   the policy still is the reference;
4. each optimizer step runs its pairs through :class:`~perpair.train.logprobs.CompletionLogps` (packed,
   prompt shared, completion-only chunked logits), takes each pair's routed loss and reduces by the number of
   pairs in the whole step (so accumulation, packing and the number of processes change nothing);
5. every step appends one line to ``OUT/metrics.jsonl``; checkpoints make a killed run resumable exactly;
   ``OUT/summary.json`` gets the run's totals (pairs/s, peak memory, the allocator it ran with, …).
"""

from __future__ import annotations

import json
import math
import resource
import signal
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perpair import mkl
from perpair.allocator import active_allocator
from perpair.artifacts import folder_lock
from perpair.data.prepare import PrepareResult
from perpair.errors import PerpairError, TrainingStopped
from perpair.train.batches import PairData, StepBatches, build_step_batches, load_data, micro_batches
from perpair.train.checkpoints import (
    check_out,
    checkpoint_folder,
    checkpoints,
    claim_out,
    drop_resume_points,
    load_checkpoint,
    run_identity,
    save_checkpoint,
    save_model,
    truncate_metrics,
)
from perpair.train.config import TrainConfig
from perpair.train.lean import kept_gate_up, lean_patches
from perpair.train.logprobs import CompletionLogps, Packed, pack, run_packed
from perpair.train.losses import ROUTE_PREFERENCE, Logps, LossParams, routed_losses, wpo_weights
from perpair.train.processes import let_collectives_finish, on_main_process
from perpair.train.reference import RunReference
from perpair.train.setup import (
    check_lora_targets,
    check_router_loss,
    check_sequence_lengths,
    compute_reference,
    load_model,
    load_tokenizer,
    make_optimizer,
    make_scheduler,
    prepare_policy,
    setup_accelerator,
    uses_bf16,
)
from perpair.train.stopping import StopSignals, agreed
from perpair.train.tracking import start_trackers, tracker_values

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
clock = time.monotonic  # of the timed checkpoints (save_every_minutes); tests replace it


class NonFiniteLoss(PerpairError):
    """The loss became NaN or infinite; the run stopped before the optimizer step."""


@dataclass
class TrainResult:
    out: Path
    metrics_path: Path
    summary: dict[str, Any] = field(default_factory=dict)


def train(config: TrainConfig, on_step: Callable[[dict[str, Any]], None] | None = None,
          on_reference: Callable[[int, int], None] | None = None,
          on_resume: Callable[[int], None] | None = None,
          on_steps: Callable[[int], None] | None = None,
          on_prepare: Callable[[PrepareResult], None] | None = None) -> TrainResult:
    """Train as ``config`` says; returns where the outputs are and a summary (pairs/s, peak memory, …).
    ``on_prepare(result)`` when DATA is converted into a pairs file first (what was kept, excluded, left unread),
    ``on_steps(steps)`` once the run's steps are known (without ``config.steps``: one epoch's), ``on_step(metrics)``
    after every step, ``on_reference(done, to_compute)`` during the reference pass, ``on_resume(step)`` with
    ``resume``: the checkpoint's step, 0 when OUT has none yet."""
    # OUT's lock, taken once the processes are known, released however the run ends; SIGTERM / SIGUSR1 stop the run
    with ExitStack() as lock, StopSignals() as signals:
        return _train(config, lock, signals, on_step, on_reference, on_resume, on_steps, on_prepare)


def _train(config: TrainConfig, lock: ExitStack, signals: StopSignals, on_step, on_reference, on_resume,
           on_steps, on_prepare) -> TrainResult:
    started = time.perf_counter()
    out = Path(config.out)
    identity = run_identity(config)  # (it hashes the data and plan files: once)
    key = check_out(config, identity)  # before any work: OUT may hold another run
    tokenizer = load_tokenizer(config)  # a wrong model path is refused before OUT is written
    check_router_loss(config)
    accelerator = setup_accelerator(config)
    # One training at a time writes OUT: a job submitted again while the first runs, or the processes a killed
    # launcher left, would pass check_out (the same run) and mix their metrics, checkpoints and model. The main
    # process holds it; the others exit with its refusal.
    on_main_process(accelerator, lambda: lock.enter_context(
        folder_lock(out, f"--out {out}: another training holds it", "wait for it to finish, or give this one "
                    "another --out")))
    peak_scope = reset_peak_memory(accelerator.device)  # this run's peak, not the process's (perpair run's arms)
    on_main_process(accelerator, lambda: claim_out(config, key, identity))
    data = load_data(config, accelerator, on_prepare)
    batches = build_step_batches(config, data, tokenizer)
    if config.steps is None:  # one epoch: its steps are known now (run.key keeps "one epoch", not their number)
        config = config.model_copy(update={"steps": len(batches.steps)})
        if problem := config.warmup_problem(config.steps):  # the validator's rules, now decidable
            raise PerpairError(f"{problem} (the steps of one epoch)")
        if config.save_every >= config.steps and not config.final_checkpoint:
            raise PerpairError(f"save_every {config.save_every} ≥ the {config.steps} steps of one epoch with "
                               "final_checkpoint false: the run would write no checkpoint; lower save_every or set "
                               "final_checkpoint true")
    if on_steps:
        on_steps(config.steps)
    # before the model and the reference pass: a tracker that cannot start (no W&B login, an MLflow server down) is
    # refused before hours of work, not after them; a resumed run continues from its latest checkpoint's step
    resumed_at = int(checkpoints(out)[-1].name.removeprefix("step-")) if config.resume and checkpoints(out) else 0
    start_trackers(accelerator, project=config.project, run_name=config.run_name or out.resolve().name,
                   config=config.model_dump(), out=str(out), resumed_at=resumed_at)

    model = load_model(config.model, accelerator)
    check_sequence_lengths(model, data, batches)  # one its sliding window or RoPE cannot take: refused before any work
    check_lora_targets(config, model)  # names that match nothing, or layers an adapter would not train: likewise
    reference_seconds = time.perf_counter()
    reference = compute_reference(config, data, batches, tokenizer, model, accelerator, on_reference,
                                  from_first_step=not (config.resume and checkpoints(out)), from_step=resumed_at)
    reference_seconds = time.perf_counter() - reference_seconds
    from_first_step = len(reference.from_first_step)
    reference_pairs = len(reference.values) + from_first_step  # every pair whose loss reads one (none: no reference)

    model = prepare_policy(config, model, single_process=accelerator.num_processes == 1)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer)
    start_step, sharded = 0, fsdp(accelerator)
    if config.resume and not sharded:
        start_step = load_checkpoint(out, accelerator, model, optimizer, scheduler)
    module = CompletionLogps(model, config.logits_chunk, config.ld_alpha, wpo=config.use_weighting,
                             grad_into_weight=accelerator.num_processes == 1)
    # The scheduler stays ours: Accelerate's wrapper would advance it once per process at every step.
    module, optimizer = accelerator.prepare(module, optimizer)
    if config.resume and sharded:  # under FSDP into the shards, which prepare makes
        start_step = load_checkpoint(out, accelerator, module, optimizer, scheduler, sharded=True)
    if config.resume and on_resume:
        on_resume(start_step)
    metrics_path = out / METRICS
    # the steps before the checkpoint, which the summary counts with this process's (the main one's: it writes both)
    earlier = on_main_process(accelerator, lambda: truncate_metrics(metrics_path, start_step)) or []

    # the whole run's training: with a resumed run's steps before its checkpoint (a run resumed to its end counted
    # 0 steps and 0 pairs; a preempted one, its last stretch)
    train_seconds, peak = sum(_number(m, "seconds") for m in earlier), 0
    totals = Counter({key: sum(_number(m, key) for m in earlier) for key in ("pairs", "tokens")})
    # checkpoints by the clock too, so that a run killed without warning (SIGKILL, a node lost) loses at most
    # save_every_minutes
    timed = config.save_every_minutes * 60
    saved_at = clock()
    signals.defer()  # from here a stop signal stops the run at the end of its step, with a checkpoint
    for step in range(start_step, config.steps):
        t0 = time.perf_counter()
        metrics = train_step(config, module, optimizer, scheduler, accelerator, data, batches, reference, step)
        reference.save_taken()  # after the first step: the reference log-probs its forward gave, into the cache
        metrics["seconds"] = time.perf_counter() - t0
        train_seconds += metrics["seconds"]
        totals.update(pairs=metrics["pairs"], tokens=metrics["tokens"])
        on_main_process(accelerator, partial(append_line, metrics_path, metrics))
        accelerator.log(tracker_values(metrics), step=metrics["step"])
        if on_step:
            on_step(metrics)
        if step + 1 == config.steps:
            break  # (a signal now: the run saves its last checkpoint and model as it ends anyway)
        stop, due = agreed(accelerator, signals.received, bool(timed) and clock() - saved_at >= timed)
        asked = bool(config.save_every) and (step + 1) % config.save_every == 0
        if asked or due or stop:
            reason = "save_every" if asked else "clock" if due else "stop"
            save_checkpoint(out, step + 1, accelerator, module, optimizer, scheduler, config, reason)
            saved_at = clock()
        if stop:
            let_collectives_finish(accelerator)  # as at the end of a run: no process hangs at exit
            accelerator.end_training()
            raise TrainingStopped(stopped_line(stop, step + 1, config.steps, checkpoint_folder(out, step + 1)), stop)
    if config.final_checkpoint:
        save_checkpoint(out, config.steps, accelerator, module, optimizer, scheduler, config, "final")
    # What the summary counts of the model, before it is saved (merging a LoRA adapter replaces the adapted layers,
    # and their patches with them): forward + backward FLOPs per unique non-padding token, 6·N·D (Kaplan et al.
    # 2020) for trained parameters and 4 for frozen ones (a LoRA run's base weights: no weight gradient), and the
    # lean patches.
    flops_per_token = sum((6 if p.requires_grad else 4) * p.numel()
                          for p in accelerator.unwrap_model(module).model.parameters())
    lean = lean_patches(model)
    lean_counts, kept = lean.counts(), kept_gate_up(model, config.longest_forward, 2 if uses_bf16(config) else 4)
    lean.undo()  # the model is the caller's from here: its modules' own forwards and attention
    saved = save_model(config, accelerator, module, tokenizer) if config.save_model else {}
    accelerator.unwrap_model(module).release()
    # the largest of every process's peak: what the run needs of each device (the main process's can be less)
    peak = int(accelerator.reduce(torch.tensor(peak_memory_bytes(accelerator.device), device=accelerator.device),
                                  reduction="max"))

    summary = {
        "steps": config.steps, "resumed_from": start_step or None,
        "pairs": totals["pairs"], "tokens": totals["tokens"], "train_seconds": train_seconds,
        "pairs_per_second": totals["pairs"] / train_seconds if train_seconds else None,
        "tokens_per_second": totals["tokens"] / train_seconds if train_seconds else None,
        "useful_flops_per_second": flops_per_token * totals["tokens"] / train_seconds if train_seconds else None,
        "reference_seconds": reference_seconds, "reference_pairs": reference_pairs,
        "reference_pairs_computed": reference.computed, "reference_pairs_from_first_step": from_first_step,
        "skipped_long_prompts": batches.skipped, "truncated_pairs": batches.truncated, "order": data.source,
        # pairs whose prompt the template renders otherwise before a response, trained on the common start (TRL)
        "prompt_cut_pairs": batches.prompt_cut,
        "peak_memory_bytes": peak, "peak_memory_scope": peak_scope, "total_seconds": time.perf_counter() - started,
        "processes": accelerator.num_processes, "device": accelerator.device.type,
        "allocator": active_allocator() or "system", **saved,
        "mkl_dispatch": "cpu features" if mkl.active() else "mkl's own",  # perpair.mkl: preloaded or not
        "lean_activations": lean_counts,  # modules lean at the end, per kind; all 0: the option did nothing (or off)
        # of the MLPs that recompute gate/up, how many keep them instead in the longest forward the run can have
        "mlp_gate_up_kept": {"longest_forward": config.longest_forward, "mlps": kept[0], "of": kept[1]},
        "tokens_per_forward": config.forward_tokens,  # the packing budget in effect (its default resolved)
    }
    on_main_process(accelerator, lambda: (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n"))
    if not config.final_checkpoint:  # the run is complete: what only made it resumable goes (save_every's stay)
        on_main_process(accelerator, lambda: drop_resume_points(out, config.save_every))
    let_collectives_finish(accelerator)  # before the process group goes (end_training) and the DDP module: see there
    accelerator.end_training()
    return TrainResult(out=out, metrics_path=metrics_path, summary=summary)


def fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _number(metrics: dict[str, Any], key: str) -> float:
    """A step's count or seconds from its metrics line (0 where a line edited by hand lacks it)."""
    value = metrics.get(key)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def stopped_line(signum: int, step: int, steps: int, checkpoint: Path) -> str:
    """The one line of a run stopped by ``signum`` after ``step``."""
    return (f"stopped by {signal.Signals(signum).name} after step {step} of {steps}: checkpoint {checkpoint}; rerun "
            "with --resume to continue")


def append_line(path: Path, metrics: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(metrics) + "\n")


def reference_pass(config: TrainConfig, on_reference: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The reference log-probs a run of ``config`` needs, into its cache (``config.reference_cache``), without
    training: runs over the same pairs that start after it (``perpair run``'s arms, side by side) read them
    instead of each computing them. ``config.plan`` left out means every pair. Returns how many pairs were
    computed and in how many seconds."""
    accelerator = setup_accelerator(config)
    data = load_data(config, accelerator)
    tokenizer = load_tokenizer(config)
    batches = build_step_batches(config, data, tokenizer)
    started = time.perf_counter()
    reference = compute_reference(config, data, batches, tokenizer, None, accelerator, on_reference,
                                  from_first_step=False)  # the model is loaded only if a pair is missing
    return {"pairs_computed": reference.computed, "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------------------------------------
# the step


def train_step(config: TrainConfig, module, optimizer, scheduler, accelerator, data: PairData,
               batches: StepBatches, reference: RunReference, step: int) -> dict[str, Any]:
    """One optimizer step over ``batches.steps[step]``; this process takes every num_processes-th pair."""
    batch = batches.steps[step]
    mine = batch[accelerator.process_index::accelerator.num_processes]
    # Each process divides by the pairs of the *whole* step; DDP averages gradients over processes, hence the
    # factor num_processes: the gradient is that of the mean over all pairs, however they are split.
    scale = accelerator.num_processes / len(batch)
    device = accelerator.device
    groups = micro_batches(config, [batches.tokenized[r] for r in mine])
    if config.objective.batch_level:  # AOT sorts across the step's pairs: one loss call, so one forward
        groups = [list(range(len(mine)))]  # (a single process: checked with the config)
    stats = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    for g, group in enumerate(groups):
        rows = [mine[i] for i in group]
        packed = pack([batches.tokenized[r] for r in rows])
        sync = g == len(groups) - 1  # gradients are exchanged once per step, after the last forward
        with nullcontext() if sync else accelerator.no_sync(module):
            with accelerator.autocast():
                result = forward_pairs(config, module, packed, rows, data, reference, device)
            accelerator.backward(result.losses.sum() * scale)
        stats += pair_stats(result, rows, data, batches)

    stats = accelerator.reduce(stats.to(device), reduction="sum").cpu()
    sums = dict(zip(STAT_NAMES, stats.tolist(), strict=True))
    loss = sums["loss"] / len(batch)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"step {step + 1}: the loss is {loss}; stopped before the optimizer step, so the "
                            f"weights are unchanged. The last good checkpoint is kept in "
                            f"{Path(config.out) / 'checkpoints'}. Lower the learning rate or check the data.")
    densify_gradients(module.parameters())
    # The norm at every step, clipping or not (max_norm inf scales the gradients by 1: unchanged; Accelerate's call
    # takes the norm over every process's shard under FSDP): a NaN or infinite gradient, clipped or stepped on,
    # would write NaN into every weight.
    grad_norm = float(accelerator.clip_grad_norm_(module.parameters(), config.max_grad_norm or math.inf))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"step {step + 1}: the loss is {loss} but its gradient norm is {grad_norm}; stopped "
                            f"before the optimizer step, so the weights are unchanged. The last good checkpoint "
                            f"is kept in {Path(config.out) / 'checkpoints'}. Lower the learning rate or check the "
                            "data.")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_metrics(step, batch, sums, loss, lr, grad_norm, data, batches)


def densify_gradients(parameters) -> None:
    """A sparse input-embedding gradient (see :func:`prepare_policy`) made whole, for clipping and AdamW."""
    for p in parameters:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()


def forward_pairs(config, module, packed: Packed, rows: list[int], data: PairData, reference: RunReference,
                  device):
    sums, counts, *aligned = run_packed(module, packed, device)
    policy = Logps(sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1])
    # WPO (use_weighting): each pair's loss scaled by its detached weight; SFT-route pairs are not weighted
    weight = wpo_weights(aligned[0][:, 0], counts[:, 0], aligned[0][:, 1], counts[:, 1]) if aligned else None
    route = torch.tensor(data.route[rows], device=device)
    ref = None
    if reference.needed:
        ref_values = reference.values_for(rows, policy.chosen.detach(), policy.rejected.detach())
        ref = Logps(ref_values[:, 0], ref_values[:, 1], counts[:, 0], counts[:, 1])
    beta = torch.tensor(data.beta[rows], dtype=sums.dtype, device=device)
    smoothing = torch.tensor(data.label_smoothing[rows], dtype=sums.dtype, device=device)
    params = LossParams(beta, smoothing, config.simpo_gamma, config.f_divergence_type,
                        config.f_alpha_divergence_coef, config.discopop_tau, weight)
    # a loss of sft terms alone (`[sft, sft]`, `sft` with loss_weights) routes every pair to SFT: its weights there
    result = routed_losses(config.objective, policy, ref, params, route,
                           sft=config.objective if config.sft_only else None)
    return _StepResult(result.losses, result.chosen_rewards, result.rejected_rewards, policy, route)


@dataclass
class _StepResult:
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    policy: Logps
    route: torch.Tensor


STAT_NAMES = ("loss", "loss_preference", "loss_sft", "pairs_preference", "pairs_sft", "logps_chosen",
              "logps_rejected", "rejected_count", "rewards_chosen", "rewards_rejected", "reward_accuracy")


def pair_stats(result: _StepResult, rows: list[int], data: PairData, batches: StepBatches) -> torch.Tensor:
    """Sums over this forward's pairs, reduced over processes before they become per-step means."""
    with torch.no_grad():
        losses = result.losses.detach().double().cpu()
        pref = (result.route == ROUTE_PREFERENCE).cpu()
        sft = ~pref
        has_rejected = result.policy.rejected_tokens.cpu() > 0
        chosen_r = result.chosen_rewards.detach().double().cpu()[pref]
        rejected_r = result.rejected_rewards.detach().double().cpu()[pref]
        values = (
            losses.sum(), losses[pref].sum(), losses[sft].sum(), pref.sum(), sft.sum(),
            result.policy.chosen.detach().double().cpu().sum(),
            result.policy.rejected.detach().double().cpu()[has_rejected].sum(), has_rejected.sum(),
            chosen_r.sum(), rejected_r.sum(), (chosen_r > rejected_r).double().sum(),
        )
        return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])


def step_metrics(step: int, batch: list[int], sums: dict[str, float], loss: float, lr: float, grad_norm,
                 data: PairData, batches: StepBatches) -> dict[str, Any]:
    pairs = [batches.tokenized[r] for r in batch]
    pref_rows = [r for r in batch if data.route[r] == ROUTE_PREFERENCE]
    betas = data.beta[pref_rows] if pref_rows else np.array([np.nan])
    n_pref = sums["pairs_preference"]

    def mean(total: float, count: float) -> float | None:
        return total / count if count else None

    metrics = {
        "step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
        "pairs": len(batch), "tokens": sum(p.tokens for p in pairs),
        "completion_tokens": sum(len(p.chosen) + len(p.rejected) for p in pairs),
        "logps_chosen": sums["logps_chosen"] / len(batch),
        "logps_rejected": mean(sums["logps_rejected"], sums["rejected_count"]),
        "rewards_chosen": mean(sums["rewards_chosen"], n_pref),
        "rewards_rejected": mean(sums["rewards_rejected"], n_pref),
        "reward_margin": mean(sums["rewards_chosen"] - sums["rewards_rejected"], n_pref),
        "reward_accuracy": mean(sums["reward_accuracy"], n_pref),
        "loss_preference": mean(sums["loss_preference"], n_pref), "loss_sft": mean(sums["loss_sft"], sums["pairs_sft"]),
        "pairs_preference": int(n_pref), "pairs_sft": int(sums["pairs_sft"]),
        "beta_mean": float(np.mean(betas)) if pref_rows else None,
        "beta_min": float(np.min(betas)) if pref_rows else None,
        "beta_max": float(np.max(betas)) if pref_rows else None,
    }
    if data.category is not None:
        # (a pair the plan has no annotation for: "unannotated", as `perpair eval` names it; it was "None")
        metrics["categories"] = dict(sorted(Counter(data.category[r] or "unannotated" for r in batch).items()))
    return metrics


def reset_peak_memory(device: torch.device) -> str:
    """Start the peak that :func:`peak_memory_bytes` reads at the memory in use now, so that a process training
    several runs (``perpair run``'s arms, a sweep) reports each run's own peak. Returns what the peak will cover:
    ``"run"``, or ``"process"`` where it cannot be reset (no ``/proc/self/clear_refs``: not Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "run"
    try:  # "5" resets the resident set's high-water mark (Linux ≥ 4.0) and nothing else
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return "process"
    return "run"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:  # the high-water mark that reset_peak_memory resets (ru_maxrss keeps the process's)
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
