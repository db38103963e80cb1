"""``train(config)``: per-pair DPO / SFT at plain-DPO cost.

Read :func:`train` top to bottom: it is the whole run. Setup, the step and checkpoints are named functions
below it. What happens, in order:

1. the pairs (and the plan, if any) give each pair a β_i, a route (preference | sft) and a position;
2. the pairs the run will see are tokenized as TRL does;
3. reference log-probs come from the on-disk cache, the missing ones computed once — before training, so
   training holds no reference model;
4. each optimizer step runs its pairs through :class:`~perpair.train.logprobs.CompletionLogps` (packed,
   prompt shared, completion-only chunked logits), takes each pair's routed loss and reduces by the number of
   pairs in the whole step (so accumulation, packing and the number of processes change nothing);
5. every step appends one line to ``OUT/metrics.jsonl``; checkpoints make a killed run resumable exactly;
   ``OUT/summary.json`` gets the run's totals (pairs/s, peak memory, the allocator it ran with, …).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import random
import resource
import shutil
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from perpair.allocator import active_allocator
from perpair.artifacts import file_sha256, read_header
from perpair.data import PrepareOptions, prepare, read_pairs
from perpair.data.schema import KIND as PAIRS_KIND
from perpair.errors import PerpairError
from perpair.models import model_fingerprint, resolve_model
from perpair.train import reference as ref_cache
from perpair.train.config import TrainConfig
from perpair.train.lean import lean_activations
from perpair.train.logprobs import CompletionLogps, Packed, pack, run_packed
from perpair.train.losses import LOSSES, ROUTE_PREFERENCE, ROUTE_SFT, Logps, LossParams, routed_losses
from perpair.train.tokenize import TokenizedPair, tokenize_pair
from perpair.train.tracking import start_trackers, tracker_values

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
REFERENCE_PACKING = 4  # the reference pass packs pairs up to this many × max_length tokens per forward


class NonFiniteLoss(PerpairError):
    """The loss became NaN or infinite; the run stopped before the optimizer step."""


@dataclass
class PairData:
    """Per-pair inputs aligned to the pairs file's rows."""

    path: Path
    table: pa.Table
    pair_ids: list[str]
    beta: np.ndarray
    label_smoothing: np.ndarray
    route: np.ndarray  # ROUTE_PREFERENCE / ROUTE_SFT; dropped pairs never enter ``order``
    flipped: np.ndarray
    category: list[str | None] | None
    order: np.ndarray  # row indices in training order (one epoch)
    source: str  # "plan" | "plan, shuffled" | "file order" | "shuffled"


@dataclass
class Schedule:
    """The exact pairs of every step: ``steps[s]`` = rows of the pairs file, all with a tokenized pair."""

    steps: list[list[int]]
    tokenized: dict[int, TokenizedPair]
    skipped: int  # pairs whose prompt alone fills max_length (TRL drops them too)


@dataclass
class TrainResult:
    out: Path
    metrics_path: Path
    summary: dict[str, Any] = field(default_factory=dict)


def train(config: TrainConfig, on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train as ``config`` says; returns where the outputs are and a summary (pairs/s, peak memory, …)."""
    started = time.perf_counter()
    out = Path(config.out)
    accelerator = setup_accelerator(config)
    data = load_data(config, accelerator)
    tokenizer = load_tokenizer(config)
    schedule = build_schedule(config, data, tokenizer)

    model = load_model(config.model, accelerator)
    reference_seconds = time.perf_counter()
    reference, computed = compute_reference(config, data, schedule, tokenizer, model, accelerator)
    reference_seconds = time.perf_counter() - reference_seconds

    model = prepare_policy(config, model, single_process=accelerator.num_processes == 1)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer)
    start_step = 0
    if config.resume:
        start_step = load_checkpoint(out, model, optimizer, scheduler)
    module = CompletionLogps(model, config.logits_chunk)
    # The scheduler stays ours: Accelerate's wrapper would advance it once per process at every step.
    module, optimizer = accelerator.prepare(module, optimizer)
    metrics_path = out / METRICS
    if accelerator.is_main_process:
        truncate_metrics(metrics_path, start_step)
    start_trackers(accelerator, project=config.project, run_name=config.run_name or out.resolve().name,
                   config=config.model_dump(), out=str(out))

    train_seconds, peak = 0.0, 0
    totals = Counter()
    for step in range(start_step, config.steps):
        t0 = time.perf_counter()
        metrics = train_step(config, module, optimizer, scheduler, accelerator, data, schedule, reference, step)
        metrics["seconds"] = time.perf_counter() - t0
        train_seconds += metrics["seconds"]
        totals.update(pairs=metrics["pairs"], tokens=metrics["tokens"])
        if accelerator.is_main_process:
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(metrics) + "\n")
        accelerator.log(tracker_values(metrics), step=metrics["step"])
        if on_step:
            on_step(metrics)
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            save_checkpoint(out, step + 1, accelerator, module, optimizer, scheduler, config.keep_checkpoints)
    if config.final_checkpoint:
        save_checkpoint(out, config.steps, accelerator, module, optimizer, scheduler, config.keep_checkpoints)
    saved = save_model(config, accelerator, module, tokenizer) if config.save_model else {}
    peak = peak_memory_bytes(accelerator.device)

    parameters = sum(p.numel() for p in accelerator.unwrap_model(module).model.parameters())
    summary = {
        "steps": config.steps - start_step, "resumed_from": start_step or None,
        "pairs": totals["pairs"], "tokens": totals["tokens"], "train_seconds": train_seconds,
        "pairs_per_second": totals["pairs"] / train_seconds if train_seconds else None,
        "tokens_per_second": totals["tokens"] / train_seconds if train_seconds else None,
        # 6·N·D (Kaplan et al. 2020): forward + backward FLOPs per unique non-padding token
        "useful_flops_per_second": 6 * parameters * totals["tokens"] / train_seconds if train_seconds else None,
        "reference_seconds": reference_seconds, "reference_pairs_computed": computed,
        "skipped_long_prompts": schedule.skipped, "order": data.source,
        "peak_memory_bytes": peak, "total_seconds": time.perf_counter() - started,
        "processes": accelerator.num_processes, "allocator": active_allocator() or "system", **saved,
    }
    if accelerator.is_main_process:
        (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    accelerator.end_training()
    return TrainResult(out=out, metrics_path=metrics_path, summary=summary)


# --------------------------------------------------------------------------------------------------------
# setup


def setup_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if config.threads:
        torch.set_num_threads(config.threads)
    bf16 = config.precision == "bf16" or (
        config.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    # cpu=True without CUDA: Accelerate then runs processes started by torchrun / accelerate launch as gloo ranks
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not torch.cuda.is_available(),
                              log_with=config.report_to or None, project_dir=str(Path(config.out) / "runs"))
    set_seed(config.seed)
    if config.release_cpu_memory and accelerator.device.type == "cpu" and active_allocator() is None:
        release_freed_memory()  # glibc's malloc only: tcmalloc & co. (perpair.allocator) need no help
    _check_sharding(config, accelerator.distributed_type)
    if config.batch_size % accelerator.num_processes:
        raise PerpairError(f"batch_size {config.batch_size} must be a multiple of the number of processes "
                           f"({accelerator.num_processes})")
    return accelerator


def release_freed_memory(threshold: int = 1 << 20) -> bool:
    """Ask glibc to serve every allocation of ``threshold`` bytes or more with its own mapping, unmapped when
    freed (returns whether it took). By default glibc raises that threshold to 32 MiB as large blocks are freed,
    so activations end up in its heap, where the holes they leave between longer-lived gradients and optimizer
    states stay resident: on ``benchmarks/vs_trl.py`` 0.5 GiB of the peak. The cost is a page fault per fresh 4 KiB
    page of each such buffer; the step time did not measurably change."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD


def _check_sharding(config: TrainConfig, distributed_type) -> None:
    """Refuse what the loop does not yet do right when the weights are sharded, before any work is done."""
    from accelerate.utils import DistributedType

    if distributed_type == DistributedType.DEEPSPEED:
        # accelerator.backward runs DeepSpeed's optimizer step after every forward's backward (a step holds several),
        # and ZeRO-3 leaves lm_head.weight partitioned where CompletionLogps reads it outside lm_head's forward.
        raise PerpairError("DeepSpeed is not supported by perpair train yet; launch with an FSDP config "
                           "(examples/accelerate/fsdp-*.yaml)")
    if distributed_type != DistributedType.FSDP:
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":  # set by accelerate launch with FSDP
            raise PerpairError(f"an FSDP launch config, but Accelerate chose {distributed_type.value}: FSDP needs "
                               "GPUs (without one it would silently run DDP or single processes)")
        return
    if config.save_every or config.final_checkpoint or config.resume:
        raise PerpairError("resumable checkpoints are not supported under FSDP yet (they would hold one rank's shard): "
                           "set save_every: 0, final_checkpoint: false and resume: false")
    if config.tokens_per_forward:
        # FSDP gathers weights in every forward, a collective: ranks packing into different numbers of forwards hang
        raise PerpairError("tokens_per_forward must be 0 under FSDP (every rank must run the same number of forwards)")
    if config.lora is not None and config.lora.merge:
        raise PerpairError("lora.merge is not supported under FSDP; merge the saved adapter afterwards")


def load_data(config: TrainConfig, accelerator) -> PairData:
    """The pairs file (converted with ``prepare`` when DATA is another format) and the plan's per-pair values."""
    path = Path(config.data)
    if not path.exists():
        raise PerpairError(f"file {path}: not found")
    if not _is_pairs_file(path):
        target = Path(config.out) / "pairs.parquet"
        if accelerator.is_main_process:
            prepare([str(path)], target, PrepareOptions())
        accelerator.wait_for_everyone()
        path = target
    table, _ = read_pairs(str(path))
    n = table.num_rows
    pair_ids = table.column("pair_id").to_pylist()
    beta = np.full(n, config.beta)
    smoothing = np.full(n, config.label_smoothing)
    route = np.full(n, ROUTE_PREFERENCE)
    flipped = np.zeros(n, dtype=bool)
    category = None
    if config.loss == "sft":  # every pair is an SFT pair: no rejected forward, no reference
        route[:] = ROUTE_SFT
    if config.plan is None:
        order = _shuffled(np.arange(n), config.seed) if config.shuffle else np.arange(n)
        source = "shuffled" if config.shuffle else "file order"
    else:
        order, beta, smoothing, route, flipped, category = _apply_plan(config, path, pair_ids)
        source = "plan, shuffled" if config.shuffle else "plan"
    return PairData(path, table, pair_ids, beta, smoothing, route, flipped, category, order, source)


def _shuffled(rows: np.ndarray, seed: int | list[int]) -> np.ndarray:
    """``rows`` (sorted first) in a seeded random order; with no plan ``rows`` is ``arange(n)``."""
    rows = np.sort(rows)
    return rows[np.random.default_rng(seed).permutation(len(rows))]


def _is_pairs_file(path: Path) -> bool:
    if path.suffix != ".parquet":
        return False
    try:
        return read_header(path).get("kind") == PAIRS_KIND
    except PerpairError:
        return False


def _apply_plan(config: TrainConfig, pairs_path: Path, pair_ids: list[str]):
    from perpair.plan import load_plan  # verifies that the plan was built from this very pairs file

    plan, provenance = load_plan(config.plan, pairs_path)
    curriculum = (provenance.get("schedule") or {}).get("curriculum", {}).get("kind", "none")
    if config.shuffle and curriculum != "none":
        raise PerpairError(f"plan {config.plan}: its curriculum {curriculum!r} fixes the training order, so "
                           "--shuffle would undo it; drop --shuffle, or build the plan with curriculum none")
    index = {pid: i for i, pid in enumerate(pair_ids)}
    rows = np.array([index[pid] for pid in plan.column("pair_id").to_pylist()])
    n = len(pair_ids)
    beta, smoothing = np.full(n, np.nan), np.zeros(n)
    route = np.full(n, -1)
    flipped = np.zeros(n, dtype=bool)
    category: list[str | None] = [None] * n
    routes = np.array(plan.column("route").to_pylist(), dtype=object)
    beta[rows] = np.array(plan.column("beta").to_pylist(), dtype=float)
    smoothing[rows] = np.array(plan.column("label_smoothing").to_pylist(), dtype=float)
    preference = ROUTE_SFT if config.loss == "sft" else ROUTE_PREFERENCE
    route[rows] = np.where(routes == "sft", ROUTE_SFT, np.where(routes == "preference", preference, -1))
    flipped[rows] = np.array(plan.column("flipped").to_pylist(), dtype=bool)
    for row, cat in zip(rows, plan.column("category").to_pylist(), strict=True):
        category[row] = cat
    positions = np.array([-1 if o is None else o for o in plan.column("order").to_pylist()])
    trained = (positions >= 0) & (routes != "drop")
    order = rows[trained][np.argsort(positions[trained], kind="stable")]
    if config.shuffle:  # curriculum none: the plan's pairs in a seeded order, as without a plan
        order = _shuffled(order, config.seed)
    if len(order) == 0:
        raise PerpairError(f"plan {config.plan}: no pair is trained (all dropped)")
    used = route[order] == ROUTE_PREFERENCE
    if np.any(smoothing[order][used] > 0) and not LOSSES[config.loss].smoothing:
        raise PerpairError(f"plan {config.plan} sets label_smoothing > 0, which loss {config.loss!r} would ignore; "
                           "use sigmoid (cDPO), robust or simpo, or a plan without smoothing")
    if np.any(~np.isfinite(beta[order][used]) | (beta[order][used] <= 0)):
        raise PerpairError(f"plan {config.plan}: a trained pair has no positive beta")
    return order, beta, smoothing, route, flipped, category


def load_tokenizer(config: TrainConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model))
    if tokenizer.chat_template is None:
        raise PerpairError(f"model {config.model}: the tokenizer has no chat template; perpair trains on "
                           "conversations and tokenizes them as TRL does, with the template")
    return tokenizer


def build_schedule(config: TrainConfig, data: PairData, tokenizer) -> Schedule:
    """The pairs of every step, in training order, repeating the order (reshuffled when shuffling) when the run
    needs more pairs than one epoch. Only the pairs the run sees are tokenized."""
    needed = config.steps * config.batch_size
    tokenized: dict[int, TokenizedPair | None] = {}
    sequence: list[int] = []
    prompts, chosen, rejected = (data.table.column(c) for c in ("prompt", "chosen", "rejected"))
    epoch = 0
    while len(sequence) < needed:
        before = len(sequence)
        order = data.order if epoch == 0 or not config.shuffle else _shuffled(data.order, [config.seed, epoch])
        for row in order.tolist():
            if row not in tokenized:
                good, bad = chosen[row].as_py(), rejected[row].as_py()
                if data.flipped[row]:
                    good, bad = bad, good
                sft = data.route[row] == ROUTE_SFT  # the rejected response of an SFT pair is never computed
                tokenized[row] = tokenize_pair(tokenizer, prompts[row].as_py(), good, None if sft else bad,
                                               config.max_length)
            if tokenized[row] is not None:
                sequence.append(row)
                if len(sequence) == needed:
                    break
        if len(sequence) == before:
            raise PerpairError(f"every pair's prompt fills max_length {config.max_length}; raise max_length")
        epoch += 1
    steps = [sequence[s * config.batch_size:(s + 1) * config.batch_size] for s in range(config.steps)]
    skipped = sum(1 for t in tokenized.values() if t is None)
    return Schedule(steps, {k: v for k, v in tokenized.items() if v is not None}, skipped)


def load_model(spec: str, accelerator):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(spec), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    return model.to(accelerator.device)


def compute_reference(config: TrainConfig, data: PairData, schedule: Schedule, tokenizer, policy,
                      accelerator) -> tuple[dict[int, tuple[float, float]], int]:
    """Reference log-probs ``{row: (chosen, rejected)}`` in the trained orientation, for the preference pairs of
    the run (SFT pairs and reference-free losses need none). The main process fills the cache; the others
    read it."""
    if LOSSES[config.loss].reference_free:
        return {}, 0
    rows = sorted({r for step in schedule.steps for r in step if data.route[r] == ROUTE_PREFERENCE})
    if not rows:
        return {}, 0
    cache_dir = Path(config.reference_cache) if config.reference_cache else ref_cache.default_cache_dir()
    spec = resolve_model(config.reference_model or config.model)
    key = ref_cache.cache_key(model=model_fingerprint(spec),
                              tokenizer=ref_cache.tokenizer_fingerprint(tokenizer),
                              pairs_sha256=file_sha256(data.path), max_length=config.max_length)
    path = ref_cache.cache_path(cache_dir, key)
    # cached values are in the pair's own orientation: un-flip to look them up
    own = [_unflip(schedule.tokenized[r]) if data.flipped[r] else schedule.tokenized[r] for r in rows]
    ids = [data.pair_ids[r] for r in rows]

    def load():  # the initial policy is the default reference: no second model is loaded
        return policy if config.reference_model is None else load_model(config.reference_model, accelerator)

    computed = 0
    autocast = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
    # Without gradients a forward keeps no activations, so several pairs share one (tree attention keeps each
    # pair's attention its own): larger matrix multiplications, fewer passes over the vocabulary projection.
    tokens = max(config.tokens_per_forward, REFERENCE_PACKING * config.max_length)
    if accelerator.is_main_process:
        _, computed = ref_cache.reference_logps(path, key, ids, own, load, device=accelerator.device,
                                                tokens_per_forward=tokens, chunk_size=config.logits_chunk,
                                                autocast_dtype=autocast)
    accelerator.wait_for_everyone()
    values, _ = ref_cache.reference_logps(path, key, ids, own, load, device=accelerator.device,
                                          tokens_per_forward=tokens, chunk_size=config.logits_chunk,
                                          autocast_dtype=autocast)
    out = {}
    for row, (c, r) in zip(rows, values.tolist(), strict=True):
        out[row] = (r, c) if data.flipped[row] else (c, r)
    return out, computed


def _unflip(pair: TokenizedPair) -> TokenizedPair:
    return TokenizedPair(pair.prompt, pair.rejected, pair.chosen)


def prepare_policy(config: TrainConfig, model, single_process: bool = True):
    """Full fine-tuning, or a LoRA adapter (PEFT) on the frozen model."""
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name since Transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lean_activations and config.lora is None:  # LoRA freezes the MLPs: nothing to gain there
        lean_activations(model, recompute_mlp=config.recompute_mlp)
    model.train()
    if config.lora is None:
        if single_process:
            # A forward reads a few hundred rows of the input embedding; its dense gradient would be a zeroed
            # [vocab, hidden] tensor per forward. Sparse, it is added into the parameter's gradient (dense as
            # soon as a tied output embedding contributes) and densified once before the optimizer step.
            model.get_input_embeddings().sparse = True
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)  # adapter initialisation
    lora = config.lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def make_optimizer(config: TrainConfig, model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                  weight_decay=config.weight_decay)
    try:  # the fused kernel updates in place: fastest, and no temporary copies of the parameters
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=False, **kwargs)


def lr_factor(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant, linear or cosine decay to 0 (the shapes of transformers' schedulers)."""
    warmup = config.warmup_steps
    if step < warmup:
        return step / max(1, warmup)
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, config.steps - warmup)
    if config.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_scheduler(config: TrainConfig, optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step))


# --------------------------------------------------------------------------------------------------------
# the step


def micro_batches(config: TrainConfig, pairs: list[TokenizedPair]) -> list[list[int]]:
    """Indices of ``pairs`` per forward: one pair each, or greedily packed up to ``tokens_per_forward``."""
    if not config.tokens_per_forward:
        return [[i] for i in range(len(pairs))]
    groups: list[list[int]] = [[]]
    total = 0
    for i, pair in enumerate(pairs):
        if groups[-1] and total + pair.tokens > config.tokens_per_forward:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += pair.tokens
    return groups


def train_step(config: TrainConfig, module, optimizer, scheduler, accelerator, data: PairData,
               schedule: Schedule, reference: dict[int, tuple[float, float]], step: int) -> dict[str, Any]:
    """One optimizer step over ``schedule.steps[step]``; this process takes every num_processes-th pair."""
    batch = schedule.steps[step]
    mine = batch[accelerator.process_index::accelerator.num_processes]
    # Each process divides by the pairs of the *whole* step; DDP averages gradients over processes, hence the
    # factor num_processes: the gradient is that of the mean over all pairs, however they are split.
    scale = accelerator.num_processes / len(batch)
    device = accelerator.device
    groups = micro_batches(config, [schedule.tokenized[r] for r in mine])
    stats = torch.zeros(len(STAT_NAMES), dtype=torch.float64)
    for g, group in enumerate(groups):
        rows = [mine[i] for i in group]
        packed = pack([schedule.tokenized[r] for r in rows], config.share_prompt)
        sync = g == len(groups) - 1  # gradients are exchanged once per step, after the last forward
        with nullcontext() if sync else accelerator.no_sync(module):
            with accelerator.autocast():
                result = forward_pairs(config, module, packed, rows, data, reference, device)
            accelerator.backward(result.losses.sum() * scale)
        stats += pair_stats(result, rows, data, schedule)

    stats = accelerator.reduce(stats.to(device), reduction="sum").cpu()
    s = dict(zip(STAT_NAMES, stats.tolist(), strict=True))
    loss = s["loss"] / len(batch)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"step {step + 1}: the loss is {loss}; stopped before the optimizer step, so the "
                            f"weights are unchanged. The last good checkpoint is kept in "
                            f"{Path(config.out) / 'checkpoints'}. Lower the learning rate or check the data.")
    densify_gradients(module.parameters())
    grad_norm = None
    if config.max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(module.parameters(), config.max_grad_norm))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_metrics(step, batch, s, loss, lr, grad_norm, data, schedule)


def densify_gradients(parameters) -> None:
    """A sparse input-embedding gradient (see :func:`prepare_policy`) made whole, for clipping and AdamW."""
    for p in parameters:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()


def forward_pairs(config, module, packed: Packed, rows: list[int], data: PairData,
                  reference: dict[int, tuple[float, float]], device):
    sums, counts = run_packed(module, packed, device)
    policy = Logps(sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1])
    route = torch.tensor(data.route[rows], device=device)
    ref = None
    if reference:
        ref_values = torch.tensor([reference.get(r, (0.0, 0.0)) for r in rows], dtype=sums.dtype, device=device)
        ref = Logps(ref_values[:, 0], ref_values[:, 1], counts[:, 0], counts[:, 1])
    beta = torch.tensor(data.beta[rows], dtype=sums.dtype, device=device)
    smoothing = torch.tensor(data.label_smoothing[rows], dtype=sums.dtype, device=device)
    result = routed_losses(config.loss, policy, ref, LossParams(beta, smoothing, config.simpo_gamma), route)
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


def pair_stats(result: _StepResult, rows: list[int], data: PairData, schedule: Schedule) -> torch.Tensor:
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


def step_metrics(step: int, batch: list[int], s: dict[str, float], loss: float, lr: float, grad_norm,
                 data: PairData, schedule: Schedule) -> dict[str, Any]:
    pairs = [schedule.tokenized[r] for r in batch]
    pref_rows = [r for r in batch if data.route[r] == ROUTE_PREFERENCE]
    betas = data.beta[pref_rows] if pref_rows else np.array([np.nan])
    n_pref = s["pairs_preference"]

    def mean(total: float, count: float) -> float | None:
        return total / count if count else None

    metrics = {
        "step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
        "pairs": len(batch), "tokens": sum(p.tokens for p in pairs), "padding_share": 0.0,  # packed: no padding
        "completion_tokens": sum(len(p.chosen) + len(p.rejected) for p in pairs),
        "logps_chosen": s["logps_chosen"] / len(batch),
        "logps_rejected": mean(s["logps_rejected"], s["rejected_count"]),
        "rewards_chosen": mean(s["rewards_chosen"], n_pref), "rewards_rejected": mean(s["rewards_rejected"], n_pref),
        "reward_margin": mean(s["rewards_chosen"] - s["rewards_rejected"], n_pref),
        "reward_accuracy": mean(s["reward_accuracy"], n_pref),
        "loss_preference": mean(s["loss_preference"], n_pref), "loss_sft": mean(s["loss_sft"], s["pairs_sft"]),
        "pairs_preference": int(n_pref), "pairs_sft": int(s["pairs_sft"]),
        "beta_mean": float(np.mean(betas)) if pref_rows else None,
        "beta_min": float(np.min(betas)) if pref_rows else None,
        "beta_max": float(np.max(betas)) if pref_rows else None,
    }
    if data.category is not None:
        metrics["categories"] = dict(sorted(Counter(str(data.category[r]) for r in batch).items()))
    return metrics


# --------------------------------------------------------------------------------------------------------
# checkpoints: safetensors and JSON only, nothing pickled


def checkpoints(out: Path) -> list[Path]:
    """The resumable checkpoints in ``out``, oldest first."""
    root = out / "checkpoints"
    return sorted(root.glob("step-*")) if root.is_dir() else []


def save_checkpoint(out: Path, step: int, accelerator, module, optimizer, scheduler, keep: int) -> None:
    """Model (trainable weights), optimizer, scheduler, sampler position (the step) and RNG states, written to
    a temporary folder and renamed, so a kill never leaves half a checkpoint."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(module).model
    target = out / "checkpoints" / f"step-{step:08d}"
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, tmp / "model.safetensors")
    inner = getattr(optimizer, "optimizer", optimizer)
    tensors, groups = {}, []
    for group in inner.param_groups:
        groups.append({"names": [names[id(p)] for p in group["params"]],
                       **{k: v for k, v in group.items() if k != "params"}})
        for p in group["params"]:
            for key, value in inner.state.get(p, {}).items():
                tensors[f"{names[id(p)]}::{key}"] = value.detach().contiguous().cpu()
    save_file(tensors, tmp / "optimizer.safetensors")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, tmp / "rng.safetensors")
    np_state = np.random.get_state()
    state = {
        "step": step, "param_groups": groups, "scheduler": _jsonable(scheduler.state_dict()),
        "python_rng": _jsonable(random.getstate()),
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model, optimizer, scheduler) -> int:
    """Restore the latest checkpoint in ``out``; returns its step (0 when there is none)."""
    found = checkpoints(out)
    if not found:
        return 0
    folder = found[-1]
    state = json.loads((folder / "state.json").read_text())
    weights = load_file(folder / "model.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or any(n not in params for n in weights):
        raise PerpairError(f"checkpoint {folder} does not match this model (e.g. {(missing or list(weights))[0]}); "
                           "resume with the configuration that wrote it")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    tensors = load_file(folder / "optimizer.safetensors")
    for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
        group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k != "names"})
        for name, p in zip(saved["names"], group["params"], strict=True):
            entries = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.split("::", 1)[0] == name}
            if entries:
                optimizer.state[p] = {k: v.to(p.device) for k, v in entries.items()}
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    random.setstate(_tuples(state["python_rng"]))
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    return int(state["step"])


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps up to ``step`` (a resumed run rewrites the ones after its checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if step == 0 or not path.exists():
        path.write_text("")
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def save_model(config: TrainConfig, accelerator, module, tokenizer) -> dict[str, str]:
    """HF-format outputs: full weights in OUT/model, or the adapter in OUT/adapter (and merged in OUT/model)."""
    from accelerate.utils import DistributedType

    accelerator.wait_for_everyone()
    state_dict = None
    if accelerator.distributed_type == DistributedType.FSDP:
        # Each rank holds a shard: every rank takes part in gathering the full weights, rank 0 receives them.
        gathered = accelerator.get_state_dict(module)
        state_dict = {name.removeprefix("model."): value for name, value in gathered.items()}  # CompletionLogps.model
    if not accelerator.is_main_process:
        return {}
    model = accelerator.unwrap_model(module).model
    out = Path(config.out)
    saved = {}
    if config.lora is None:
        model.save_pretrained(out / "model", state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out / "model")
        saved["model"] = str(out / "model")
    else:
        model.save_pretrained(out / "adapter", state_dict=state_dict)
        saved["adapter"] = str(out / "adapter")
        if config.lora.merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(out / "model", safe_serialization=True)
            tokenizer.save_pretrained(out / "model")
            saved["model"] = str(out / "model")
    return saved


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
