"""What the run trains on: per-pair inputs (β, ε, route, orientation, order), the pairs of every step, and the
greedy packing of pairs into forwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from perpair.artifacts import read_header
from perpair.data import PrepareOptions, prepare, read_pairs
from perpair.data.prepare import PrepareResult
from perpair.data.schema import KIND as PAIRS_KIND
from perpair.errors import PerpairError
from perpair.train.config import TrainConfig, check_plan_fits
from perpair.train.losses import ROUTE_PREFERENCE, ROUTE_SFT
from perpair.train.processes import on_main_process
from perpair.train.tokenize import TokenizedPair, pair_tools, refuse_markup, tokenize_pair


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
class StepBatches:
    """The exact pairs of every step: ``steps[s]`` = rows of the pairs file, all with a tokenized pair."""

    steps: list[list[int]]
    tokenized: dict[int, TokenizedPair]
    skipped: int  # pairs whose prompt alone fills max_length (TRL drops them too)
    truncated: int = 0  # pairs trained with a response cut to max_length (TRL's keep_start truncation)
    prompt_cut: int = 0  # pairs whose prompt the template renders otherwise before a response (TokenizedPair)
    skipped_rows: list[int] = field(default_factory=list)  # the rows of the ``skipped`` pairs


def greedy_groups(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``sizes`` in consecutive groups, each as long as its total stays within ``budget``; an item
    larger than the budget gets a group of its own; ``budget`` 0: one item per group."""
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if not groups or not budget or total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def micro_batches(config: TrainConfig, pairs: list[TokenizedPair]) -> list[list[int]]:
    """Indices of ``pairs`` per forward: one pair each, or greedily packed up to ``tokens_per_forward``."""
    return greedy_groups([pair.tokens for pair in pairs], config.forward_tokens)


def load_data(config: TrainConfig, accelerator, on_prepare: Callable[[PrepareResult], None] | None = None) -> PairData:
    """The pairs file (converted with ``prepare`` when DATA is another format, its report to ``on_prepare``: what it
    kept, excluded and left unread) and the plan's per-pair values."""
    path = Path(config.data)
    if not path.exists():
        from perpair.data.sources import looks_local

        # (OWNER/NAME, as prepare reads a Hub id: data/x.jsonl that is missing is a missing file)
        hub = config.data.startswith("hub:") or (config.data.count("/") == 1 and not looks_local(config.data))
        raise PerpairError(f"file {path}: not found" + (
            "; perpair train reads files and folders: for a Hub dataset, perpair prepare "
            f"{config.data} -o pairs.parquet, then --data pairs.parquet" if hub else ""))
    if not is_pairs_file(path):
        target = Path(config.out) / "pairs.parquet"
        prepared = on_main_process(accelerator, lambda: prepare([str(path)], target, PrepareOptions()))
        if prepared is not None and on_prepare is not None:
            on_prepare(prepared)
        path = target
    table, _ = read_pairs(str(path))
    n = table.num_rows
    pair_ids = table.column("pair_id").to_pylist()
    if config.plan is None:
        route = np.full(n, ROUTE_SFT if config.sft_only else ROUTE_PREFERENCE)
        order = shuffled(np.arange(n), config.seed) if config.shuffle else np.arange(n)
        return PairData(path, table, pair_ids, np.full(n, config.beta), np.full(n, config.label_smoothing), route,
                        np.zeros(n, dtype=bool), None, order, "shuffled" if config.shuffle else "file order")
    from perpair.plan.decode import plan_arrays

    plan = plan_arrays(config.plan, path, pair_ids)
    check_plan(config, plan)
    route = np.full(n, -1)  # (loss sft with a plan is refused with the config)
    route[plan.order] = np.where(plan.sft[plan.order], ROUTE_SFT, ROUTE_PREFERENCE)
    order = shuffled(plan.order, config.seed) if config.shuffle else plan.order  # curriculum none only
    return PairData(path, table, pair_ids, plan.beta, plan.label_smoothing, route, plan.flipped, plan.category,
                    order, "plan, shuffled" if config.shuffle else "plan")


def check_plan(config: TrainConfig, plan) -> None:
    """Refuse a plan this config cannot train as the plan says."""
    used = ~plan.sft[plan.order]  # the pairs trained on the preference route
    eps = plan.label_smoothing[plan.order][used]
    if np.any(~np.isfinite(eps) | (eps < 0) | (eps >= 0.5)):  # the range the config's label_smoothing has
        bad = eps[~np.isfinite(eps) | (eps < 0) | (eps >= 0.5)][0]
        raise PerpairError(f"plan {config.plan}: a trained pair has label_smoothing {bad}; it must be in [0, 0.5) "
                           "(at 0.5 or above the label's flip is as likely as not, or likelier)")
    check_plan_fits(config, plan.curriculum, bool(np.any(plan.label_smoothing[plan.order][used] > 0)),
                    f"plan {config.plan}")
    if config.objective.needs_smoothing and np.any(plan.label_smoothing[plan.order][used] <= 0):
        raise PerpairError(f"plan {config.plan}: loss {config.objective.name!r} needs label_smoothing > 0 for "
                           "every preference pair (EXO's log ε); the plan gives some 0")
    beta = plan.beta[plan.order][used]
    if np.any(~np.isfinite(beta) | (beta <= 0)):
        raise PerpairError(f"plan {config.plan}: a trained pair has no positive beta")


def shuffled(rows: np.ndarray, seed: int | list[int]) -> np.ndarray:
    """``rows`` (sorted first) in a seeded random order; with no plan ``rows`` is ``arange(n)``."""
    rows = np.sort(rows)
    return rows[np.random.default_rng(seed).permutation(len(rows))]


def is_pairs_file(path: Path) -> bool:
    if path.suffix != ".parquet":
        return False
    try:
        return read_header(path).get("kind") == PAIRS_KIND
    except PerpairError:
        return False


def build_step_batches(config: TrainConfig, data: PairData, tokenizer) -> StepBatches:
    """The pairs of every step, in training order, repeating the order (reshuffled when shuffling) when the run
    needs more pairs than one epoch. Only the pairs the run sees are tokenized. Without ``config.steps``: the steps
    of one epoch of the pairs whose prompt fits max_length (the last step filled from the next epoch's start)."""
    needed = config.steps * config.batch_size if config.steps else None
    tokenized: dict[int, TokenizedPair | None] = {}
    sequence: list[int] = []
    prompts, chosen, rejected = (data.table.column(c) for c in ("prompt", "chosen", "rejected"))
    tools = pair_tools(data.table)
    refuse_markup(tokenizer, ((data.pair_ids[row], {
        "prompt": prompts[row].as_py(), "chosen": chosen[row].as_py(),  # (an SFT pair's rejected is never read)
        "rejected": None if data.route[row] == ROUTE_SFT else rejected[row].as_py()}) for row in data.order.tolist()),
        f"{data.path}: ", "of the run")
    epoch = 0
    while needed is None or len(sequence) < needed:
        before = len(sequence)
        order = data.order if epoch == 0 or not config.shuffle else shuffled(data.order, [config.seed, epoch])
        # A step that spans two epochs never holds a pair twice: a pair of the new epoch already in that step (a
        # reshuffled order can start with the previous one's last pairs) waits until the step is full.
        waiting: list[int] = []
        for row in order.tolist():
            if row not in tokenized:
                good, bad = chosen[row].as_py(), rejected[row].as_py()
                if data.flipped[row]:
                    good, bad = bad, good
                sft = data.route[row] == ROUTE_SFT  # the rejected response of an SFT pair is never computed
                try:
                    tokenized[row] = tokenize_pair(tokenizer, prompts[row].as_py(), good, None if sft else bad,
                                                   config.max_length, tools[row])
                except PerpairError as exc:
                    raise PerpairError(f"{data.path}: pair {data.pair_ids[row]}: {exc}") from None
            if tokenized[row] is None:
                continue
            if row in sequence[len(sequence) - len(sequence) % config.batch_size:]:
                waiting.append(row)
                continue
            sequence.append(row)
            if len(sequence) % config.batch_size == 0:  # the step is full: the waiting pairs start the next
                sequence.extend(waiting[:needed - len(sequence) if needed else None])
                waiting = []
            if len(sequence) == needed:
                break
        sequence.extend(waiting)  # (a step that the epoch's other pairs could not fill: only with a too-large batch)
        if len(sequence) == before:
            raise PerpairError(f"every pair's prompt fills max_length {config.max_length}; raise max_length")
        if epoch == 0 and len(sequence) < config.batch_size:  # (the whole order read: these are all there are)
            skipped = sum(1 for t in tokenized.values() if t is None)
            also = f" ({skipped} more have prompts that fill max_length {config.max_length})" if skipped else ""
            raise PerpairError(f"batch_size {config.batch_size} is more than the {len(sequence)} pairs this run can "
                               f"train{also}: a step would hold some pair twice; lower batch_size")
        if needed is None:  # one epoch: every pair that fits, in whole steps
            needed = math.ceil(len(sequence) / config.batch_size) * config.batch_size
        epoch += 1
    sequence = sequence[:needed]
    steps = [sequence[s:s + config.batch_size] for s in range(0, needed, config.batch_size)]
    skipped = sum(1 for t in tokenized.values() if t is None)
    truncated = sum(1 for row in set(sequence) if tokenized[row].truncated)
    prompt_cut = sum(1 for row in set(sequence) if tokenized[row].prompt_cut)
    return StepBatches(steps, {k: v for k, v in tokenized.items() if v is not None}, skipped, truncated, prompt_cut,
                       sorted(k for k, v in tokenized.items() if v is None))
