"""perpair plans inside TRL's own ``DPOTrainer``: change one import, pass a plan.

    from perpair.integrations.trl import PerPairDPOTrainer
    trainer = PerPairDPOTrainer(model=model, args=DPOConfig(...), train_dataset=ds, plan="plan.parquet")

Inside TRL's training step each pair gets its plan values: β_i in every loss where β is a per-pair
multiplier or parameter, ε_i where the loss reads ``label_smoothing`` (robust, exo_pair) and in ``sigmoid`` as cDPO
(perpair's ``sigmoid`` with ε, which TRL 1.16's ignores: MixDPO's loss), the SFT route as
the length-normalised NLL of the chosen response (perpair's ``sft`` loss), ``drop`` pairs removed and the
plan's curriculum kept by a sequential sampler (a plan without one keeps TRL's sampler). Pairs are matched by
perpair's ``pair_id`` (recomputed from the dataset rows with perpair's own reader), so a plan made from one copy of
the data applies to another.

How β_i gets in without copying TRL's loss code: TRL's ``_compute_loss`` multiplies by ``self.beta`` (and
reads ``self.label_smoothing``) elementwise, so for the duration of one call they are the batch's per-pair
tensors; every loss TRL writes as ``β · something`` then gets β_i. cDPO, −(1−ε) log σ(βΔ) − ε log σ(−βΔ), is TRL's
``robust`` loss, (−(1−ε') log σ(βΔ) + ε' log σ(−βΔ)) / (1−2ε'), at ε' = −ε / (1−2ε): a ``sigmoid`` call whose pairs
have ε > 0 runs TRL's robust code with those ε'. Losses that sort the batch (``aot``,
``aot_unpaired``) would pair β_i with another pair's margin, so they are refused.

SFT pairs are taken out of TRL's batch: TRL's forward sees only the preference pairs (it needs chosen,
rejected and their reference log-probs); the SFT pairs get one extra forward of their chosen sequence alone,
with no rejected response and no reference. The two are combined as perpair reduces: the sum of per-pair
losses over the number of pairs of the micro-batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from perpair.data.prepare import _generic_degenerate
from perpair.errors import InputError, PerpairError

SUPPORTED_TRL = ("1.16", "1.17")  # [low, high): the versions whose DPOTrainer internals this module relies on


def check_trl_version(version: str) -> None:
    """Refuse a TRL outside the supported range with a message, instead of an attribute error mid-training. The
    range is read as pip reads ``>=1.16,<1.17``: a pre-release of 1.17 (``1.17.0.dev0``, ``1.17.0rc1``, TRL's
    main branch) is outside it, though it sorts below 1.17; a development build of 1.16.x is inside."""
    from packaging.specifiers import SpecifierSet

    low, high = SUPPORTED_TRL
    if not SpecifierSet(f">={low},<{high}").contains(version, prereleases=True):
        raise PerpairError(f"perpair.integrations.trl supports trl>={low},<{high} (its DPOTrainer internals), "
                           f"found trl {version}; install the supported one with: pip install 'perpair[trl]'")


try:
    import trl
except ImportError as error:  # the optional extra is not installed
    raise ImportError("perpair.integrations.trl needs TRL: pip install 'perpair[trl]'") from error
check_trl_version(trl.__version__)

import torch  # noqa: E402  (after the version check: a wrong TRL fails here, with the message above)
from datasets import Dataset  # noqa: E402
from torch.utils.data import SequentialSampler  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

# TRL 1.16 loss types by how a per-pair β_i enters: in all of these β is an elementwise factor or parameter
# of each pair's own loss (TRL's "sft" type does not read β at all).
PER_PAIR_LOSSES = frozenset({"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                             "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft"})
REFUSED_LOSSES = {
    "aot": "it sorts the batch's margins, so a pair's β_i would multiply another pair's margin",
    "aot_unpaired": "it sorts chosen and rejected log-ratios separately, so β_i belongs to no pair",
}
SMOOTHING_LOSSES = frozenset({"robust", "exo_pair"})  # the TRL 1.16 losses that read label_smoothing
CDPO = "sigmoid"  # with a plan's ε > 0: cDPO, as perpair train's sigmoid (TRL 1.16's own ignores label_smoothing)
PLAN_COLUMNS = ("beta", "route", "order", "label_smoothing")  # a dataset may carry these instead of a plan
CARRIED = (*PLAN_COLUMNS, "flipped")  # (flipped: optional)
ROUTES = ("preference", "sft", "drop")
# Columns this module adds to the training dataset; the collator turns them into batch tensors.
BETA, SFT, EPS = "perpair_beta", "perpair_sft", "perpair_label_smoothing"
SFT_PROCESSES = ("SFT-routed pairs with several processes are not supported yet; train them on one process, or "
                 "use a plan without SFT routes")
PAIR = "perpair_pair_id"  # (not a batch tensor: it identifies the run's pairs for its checkpoints)
PLAN_RECORD = "perpair_plan.json"  # in each checkpoint: the pairs it trained, so that a resume continues those


# --------------------------------------------------------------------------------------- plan and dataset

LEFT_OUT = ("a pair perpair prepare leaves out, so no plan has it; remove such rows, or train on the pairs file the "
            "plan was made from")


def pair_ids(dataset: Dataset) -> list[str]:
    """perpair's ``pair_id`` of every row, from perpair's own reader of TRL's layouts (standard or
    conversational, explicit or implicit prompt), so an id here equals the one ``perpair prepare`` gives."""
    return [record.pair_id for record in _records(dataset)]


def _records(dataset: Dataset) -> list:
    from perpair.data.readers import ColumnMap, ReadContext, detect_format, read_hh_rlhf, read_preference
    from perpair.data.rows import Degenerate
    from perpair.data.sources import RowProblem

    lacking = [c for c in ("chosen", "rejected") if c not in dataset.column_names]
    if lacking:  # a tokenized-only dataset (prompt_ids, …): without the text no pair can be matched to the plan
        raise PerpairError(f"train_dataset has no {' or '.join(repr(c) for c in lacking)} column (it has "
                           f"{', '.join(dataset.column_names) or 'none'}); pairs are matched to the plan by their "
                           "text, so pass the dataset before tokenization (TRL tokenizes it itself)")
    # (tools: part of a pair's id, as they are of the prompt TRL renders)
    names = [c for c in ("prompt", "chosen", "rejected", "system", "tools") if c in dataset.column_names]
    columns = ColumnMap(prompt="prompt" if "prompt" in names else None)
    rows = dataset.select_columns(names)
    # HH-RLHF transcripts, which TRL reads with an implicit prompt, are parsed into turns as prepare parses them
    read = read_hh_rlhf if len(rows) and detect_format(rows[0]) == "hh-rlhf" else read_preference
    records = []
    for row, example in enumerate(rows, start=1):
        try:
            records.append(read(example, ReadContext(source="train_dataset", row=row, columns=columns)))
        except RowProblem as problem:
            raise PerpairError(f"train_dataset row {row}, field '{problem.field}': {problem.problem}") from None
        except Degenerate as problem:  # HH-RLHF transcripts that differ before their last turn, say
            raise PerpairError(f"train_dataset row {row}: {problem.detail}, {LEFT_OUT}") from None
    return records


def read_plan(path: str | Path) -> dict[str, dict[str, Any]]:
    """The plan's per-pair values by pair_id. Not :func:`perpair.plan.decode.plan_arrays`, which aligns a plan to
    the rows of the very pairs file it was built from (checked by hash): here the plan meets a TRL dataset, any
    copy of the data, and pairs are matched by their content hash alone."""
    from perpair.artifacts import read_artifact
    from perpair.plan.build import KIND, SCHEMA_VERSION

    table, _ = read_artifact(path, kind=KIND, schema_version=SCHEMA_VERSION)
    missing = [c for c in ("pair_id", *PLAN_COLUMNS, "flipped") if c not in table.column_names]
    if missing:
        raise PerpairError(f"file {path}: the plan lacks column(s) {', '.join(missing)}")
    # A hand-edited plan is refused where perpair train's reader refuses it (plan.decode._rows, plan.build.load_plan),
    # not read with its last row winning or a null flipped read as false.
    values: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for row, r in enumerate(table.select(["pair_id", *PLAN_COLUMNS, "flipped"]).to_pylist(), start=1):
        pid = r.pop("pair_id")
        if pid in seen:
            raise InputError(f"pair {pid!r} appears twice (rows {seen[pid]} and {row}); a plan needs unique pair "
                             "ids", file=str(path), row=row, field="pair_id")
        if r["flipped"] is None:
            raise InputError(f"pair {pid!r} has no flipped value (null); every pair has one, true or false",
                             file=str(path), row=row, field="flipped")
        seen[pid] = row
        values[pid] = r
    return values


@dataclass(frozen=True)
class PlanSummary:
    pairs: int  # trained pairs (after drop)
    dropped: int
    sft: int
    flipped: int
    # the plan file's curriculum kind; None for plan columns the dataset carries (their order is the order asked for)
    curriculum: str | None = None
    repeated: int = 0  # rows whose pair an earlier row holds: trained once

    @property
    def ordered(self) -> bool:
        """Whether the plan fixes the order the pairs are read in (a curriculum, or an order carried in columns):
        a plan without a curriculum (``none``) leaves it to TRL's sampler, random unless told, as stock TRL."""
        return self.curriculum != "none"


def apply_plan(dataset: Dataset, plan: str | Path | None) -> tuple[Dataset, PlanSummary]:
    """The training dataset as the plan trains it: drop pairs removed, flipped pairs swapped, rows in the plan's
    order, and the per-pair columns ``perpair_beta``, ``perpair_sft``, ``perpair_label_smoothing`` and
    ``perpair_pair_id`` added."""
    records = _records(dataset)
    ids = [record.pair_id for record in records]
    first: dict[str, int] = {}
    repeated: list[int] = []  # rows whose pair an earlier row holds (with a plan file: trained once, as prepare)
    for row, pid in enumerate(ids, start=1):
        if pid in first:
            if plan is None:  # each row carries its own values: which would be the pair's is not known
                raise PerpairError(f"train_dataset: pair {pid} appears twice (rows {first[pid]} and {row}); plan "
                                   "columns need each pair once")
            repeated.append(row)
            continue
        first[pid] = row
    if repeated:
        pid = ids[repeated[0] - 1]
        warnings.warn(f"train_dataset: {len(repeated)} row(s) repeat an earlier row's pair (first: pair {pid}, rows "
                      f"{first[pid]} and {repeated[0]}); each pair is trained once, as perpair prepare keeps the "
                      "first of identical pairs", stacklevel=3)
    carried = [c for c in PLAN_COLUMNS if c in dataset.column_names]
    if plan is not None:
        if given := [c for c in CARRIED if c in dataset.column_names]:  # a flipped column the plan's would override
            raise PerpairError(f"train_dataset carries plan column(s) {', '.join(given)} and a plan was given; "
                               "pass one of the two")
        values = read_plan(plan)
        where = f"plan {plan}"
        absent = [row for row, pid in enumerate(ids, start=1) if pid not in values]
        # identical or empty responses: prepare's own test, so that the message says why the pair is not there
        left_out = [(row, problem) for row in absent if (problem := _generic_degenerate(records[row - 1]))]
        if left_out:
            row, problem = left_out[0]
            raise PerpairError(f"pair {ids[row - 1]} (train_dataset row {row}) is not in {where}: "
                               f"{problem.detail}, {LEFT_OUT} ({len(left_out)} such row(s))")
        if absent:
            raise PerpairError(f"pair {ids[absent[0] - 1]} (train_dataset row {absent[0]}) is not in {where} "
                               f"({len(absent)} such pair(s)); the plan was made from other data (or another split "
                               "of it)")
        extra = [pid for pid in values if pid not in first]
        if extra:
            raise PerpairError(f"pair {extra[0]} of {where} is not in train_dataset ({len(extra)} such pair(s)); "
                               "the plan was made from other data")
        per_row = [values[pid] for pid in ids]
        for row in repeated:
            per_row[row - 1] = {**per_row[row - 1], "route": "drop"}
    else:
        if len(carried) != len(PLAN_COLUMNS):
            absent = [c for c in PLAN_COLUMNS if c not in carried]
            raise PerpairError(f"no plan: pass plan='plan.parquet', or a train_dataset with the columns "
                               f"{', '.join(PLAN_COLUMNS)} (lacks {', '.join(absent)})")
        where = "train_dataset"
        names = [*PLAN_COLUMNS, *(["flipped"] if "flipped" in dataset.column_names else [])]
        per_row = dataset.select_columns(names).to_list()
    keep, order = [], []
    for row, (pid, v) in enumerate(zip(ids, per_row, strict=True), start=1):
        route = v["route"]
        if route not in ROUTES:
            raise PerpairError(f"{where}: pair {pid} (row {row}) has route {route!r}; expected one of {ROUTES}")
        if "flipped" in v and v["flipped"] is None:  # a column given is read for every pair, never null as false
            raise PerpairError(f"{where}: pair {pid} (row {row}) has no flipped value (null); a flipped column needs "
                               "one for every pair, true or false (without the column no pair is flipped)")
        if route == "drop":
            continue
        for name in ("beta", "order", "label_smoothing"):  # columns a user made (a CSV's text, say)
            if v[name] is not None and (isinstance(v[name], bool) or not isinstance(v[name], int | float)):
                raise PerpairError(f"{where}: pair {pid} (row {row}) has {name} {v[name]!r}; expected a number")
        if v.get("flipped") is not None and not isinstance(v["flipped"], bool):  # bool("False") would flip it
            raise PerpairError(f"{where}: pair {pid} (row {row}) has flipped {v['flipped']!r}; expected true or "
                               "false")
        if v["order"] is None or not np.isfinite(v["order"]):
            raise PerpairError(f"{where}: pair {pid} (row {row}) is routed {route} but has no order "
                               f"({v['order']})")
        beta, eps = v["beta"], v["label_smoothing"]
        if route == "preference" and (beta is None or not np.isfinite(beta) or beta <= 0):
            raise PerpairError(f"{where}: pair {pid} (row {row}) has beta {beta}; a preference pair needs β > 0")
        if eps is None or not 0.0 <= eps < 0.5:
            raise PerpairError(f"{where}: pair {pid} (row {row}) has label_smoothing {eps}; expected 0 ≤ ε < 0.5")
        keep.append(row - 1)
        order.append(v["order"])
    if not keep:
        raise PerpairError(f"{where}: no pair is trained (all dropped)")
    if len(set(order)) != len(order):
        raise PerpairError(f"{where}: two trained pairs share an order position; the order must be a ranking")
    rows = [keep[i] for i in np.argsort(order, kind="stable")]
    routes = [per_row[i]["route"] for i in rows]
    flipped = [bool(per_row[i].get("flipped") or False) for i in rows]
    out = dataset.remove_columns(carried + (["flipped"] if plan is None and "flipped" in dataset.column_names
                                            else [])).select(rows)
    if any(flipped):  # the plan judged the pair mislabeled: it is trained with chosen and rejected swapped
        out = out.map(lambda ex, i: {"chosen": ex["rejected"], "rejected": ex["chosen"]} if flipped[i] else {},
                      with_indices=True)
    # β of an SFT pair is never read; 1.0 keeps the column finite.
    out = out.add_column(BETA, [float(per_row[i]["beta"]) if r == "preference" else 1.0
                                for i, r in zip(rows, routes, strict=True)])
    out = out.add_column(SFT, [r == "sft" for r in routes])
    out = out.add_column(EPS, [float(per_row[i]["label_smoothing"]) if r == "preference" else 0.0
                               for i, r in zip(rows, routes, strict=True)])
    out = out.add_column(PAIR, [ids[i] + (" flipped" if flip else "") for i, flip in zip(rows, flipped, strict=True)])
    return out, PlanSummary(len(rows), len(ids) - len(rows) - len(repeated), routes.count("sft"), sum(flipped),
                            _curriculum(plan) if plan is not None else None, len(repeated))


def _curriculum(plan: str | Path) -> str:
    """The plan file's curriculum kind, from its provenance."""
    from perpair.artifacts import read_header

    return str(read_header(plan)["provenance"].get("schedule", {}).get("curriculum", {}).get("kind", ""))


# --------------------------------------------------------------------------------------------- the trainer

def check_config(args: DPOConfig) -> None:
    """Refuse, at construction, what this trainer cannot apply a plan to."""
    if set(args.loss_type) == {"sft"}:
        raise PerpairError("loss_type 'sft' alone reads no β and no label_smoothing: the plan's would change "
                           "nothing; take a preference loss (the plan's SFT routes train their pairs by SFT)")
    for loss in args.loss_type:
        if loss in REFUSED_LOSSES:
            raise PerpairError(f"loss_type {loss!r} cannot take a per-pair β: {REFUSED_LOSSES[loss]}")
        if loss not in PER_PAIR_LOSSES:
            raise PerpairError(f"loss_type {loss!r} is not one PerPairDPOTrainer knows how β enters; supported: "
                               f"{', '.join(sorted(PER_PAIR_LOSSES))}")
    strategy = getattr(args, "train_sampling_strategy", "random")
    if strategy not in ("random", "sequential"):
        raise PerpairError(f"train_sampling_strategy {strategy!r} reorders the pairs; the plan fixes their order, "
                           "so PerPairDPOTrainer reads them sequentially: leave the default or set 'sequential'")
    if args.auto_find_batch_size:
        # Transformers retries its whole training loop with half the batch after an out-of-memory error: from the
        # plan's first pair again, on weights the failed attempt already updated, and with args'
        # per_device_train_batch_size unchanged, so a checkpoint would record the wrong number of pairs a step.
        raise PerpairError("auto_find_batch_size is not supported: after an out-of-memory error Transformers restarts "
                           "training from the plan's first pair on weights already updated (pairs trained twice), "
                           "with a batch size its checkpoints do not record, so a resume would skip other pairs of "
                           "the plan; set per_device_train_batch_size to one that fits (and "
                           "gradient_accumulation_steps for the effective batch)")
    if args.dataloader_num_workers > 0 and not getattr(args, "dataloader_in_order", True):
        raise PerpairError("dataloader_in_order=False with dataloader_num_workers > 0 yields each batch when its "
                           "worker has it ready, not in the plan's order; leave dataloader_in_order True (the "
                           "default), or set dataloader_num_workers=0")


def check_beta(args: DPOConfig, dataset: Dataset, evaluation) -> None:
    """DPOConfig.beta is TRL's global β: with a plan every training step reads the pairs' own β_i, and only
    evaluation reads DPOConfig.beta. Set to another value than TRL's default (and the plan's) with nothing to
    evaluate, it would change nothing."""
    default = next(f.default for f in fields(DPOConfig) if f.name == "beta")
    beta = np.asarray(dataset[BETA], dtype=float)[~np.asarray(dataset[SFT], dtype=bool)]
    if evaluation is not None and np.any(beta != args.beta):  # (TRL's eval curves beside the training ones)
        warnings.warn(f"evaluation scores every pair with DPOConfig.beta = {args.beta:g}, training with the plan's β "
                      f"({_values(beta)}): eval_loss and eval_rewards/* are on another scale than the training "
                      "metrics", stacklevel=3)
    if args.beta != default and evaluation is None and np.any(beta != args.beta):
        raise PerpairError(f"DPOConfig.beta = {args.beta:g} would change nothing: the plan gives every preference "
                           f"pair its own β ({_values(beta)}), which training reads, and only evaluation reads "
                           f"DPOConfig.beta (there is no eval_dataset); leave it at TRL's default {default:g}, or "
                           "make the plan with that β (perpair plan --beta)")


def check_smoothing(args: DPOConfig, dataset: Dataset) -> None:
    """The plan's ε must reach a loss that reads it, and must not contradict DPOConfig.label_smoothing."""
    eps = np.asarray(dataset[EPS], dtype=float)[~np.asarray(dataset[SFT], dtype=bool)]
    readers = [loss for loss in args.loss_type if loss in SMOOTHING_LOSSES or loss == CDPO]
    ignoring = [loss for loss in args.loss_type if loss not in readers and loss != "sft"]
    if np.any(eps > 0) and ignoring:
        raise PerpairError(f"the plan sets label_smoothing > 0, which TRL's loss_type {ignoring[0]!r} ignores "
                           "(TRL 1.16 smooths only robust and exo_pair, and PerPairDPOTrainer makes sigmoid cDPO); "
                           "use one of those or a plan without ε")
    if np.any(eps > 0) and CDPO in readers and len(readers) > 1:
        raise PerpairError(f"loss_type {args.loss_type}: with the plan's ε, sigmoid is cDPO, computed by TRL's robust "
                           "code at another ε, so it cannot share a step with robust or exo_pair; take one of them")
    if "exo_pair" in readers and (args.label_smoothing <= 0 or np.any(eps != args.label_smoothing)):
        # TRL refuses exo_pair without DPOConfig.label_smoothing > 0 before any pair is seen
        raise PerpairError(f"loss_type 'exo_pair' needs DPOConfig.label_smoothing > 0 (TRL checks it), equal to "
                           f"the plan's ε on every preference pair (DPOConfig {args.label_smoothing}, plan "
                           f"{_values(eps)}); per-pair ε values take loss_type 'robust'")
    if args.label_smoothing != 0 and np.any(eps != args.label_smoothing):
        said = "the plan's values are used" if readers else f"TRL's loss_type {args.loss_type[0]!r} ignores it"
        raise PerpairError(f"DPOConfig.label_smoothing = {args.label_smoothing} differs from the plan's per-pair "
                           f"label_smoothing ({_values(eps)}); {said}, so leave it at 0 (or equal to the plan's)")


def check_eval_dataset(evaluation) -> None:
    """Plan columns in an evaluation dataset would go unread: evaluation scores every pair with DPOConfig.beta,
    as stock TRL does."""
    for name, part in (evaluation.items() if isinstance(evaluation, dict) else [("eval_dataset", evaluation)]):
        # (and the columns the plug-in adds: trainer.evaluate(trainer.train_dataset) would score the planned pairs
        # with DPOConfig.beta)
        carried = [c for c in (*CARRIED, BETA, SFT, EPS, PAIR) if c in (getattr(part, "column_names", None) or [])]
        if carried:
            raise PerpairError(f"{name} carries plan columns ({', '.join(carried)}), which evaluation does not "
                               "read: it scores every pair with DPOConfig.beta, as stock TRL does; remove them")


def _values(eps: np.ndarray) -> str:
    low, high = (float(eps.min()), float(eps.max())) if eps.size else (0.0, 0.0)
    return f"{low:g}" if low == high else f"{low:g} to {high:g}"


def _bits(values: list[float]) -> torch.Tensor:
    """Floats as the bits of float64 in an int64 tensor: Trainer._prepare_input casts every float tensor of a batch
    to the model's dtype under DeepSpeed, which would round β_i and ε_i to bf16; integers pass unchanged."""
    return torch.tensor(values, dtype=torch.float64).view(torch.int64)


def _floats(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(torch.float64).float()


class PlanCollator:
    """TRL's collator plus the per-pair tensors ``perpair_beta`` (float, as :func:`_bits`), ``perpair_sft`` (bool)
    and ``perpair_label_smoothing`` (float, as :func:`_bits`), one entry per pair in the batch's order."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if BETA not in examples[0]:  # an evaluation dataset is not planned: TRL's batch as it is
            return self.inner(examples)
        plan = {k: [ex[k] for ex in examples] for k in (BETA, SFT, EPS)}
        batch = self.inner([{k: v for k, v in ex.items() if k not in plan} for ex in examples])
        batch[BETA] = _bits(plan[BETA])
        batch[SFT] = torch.tensor(plan[SFT], dtype=torch.bool)
        batch[EPS] = _bits(plan[EPS])
        return batch


ROUTER_SFT = ("a Mixture-of-Experts router loss with SFT-routed pairs is not supported; set router_aux_loss_coef=0 "
              "or use a plan without SFT routes")


def router_loss(model: Any, args: Any) -> bool:
    """Whether TRL's constructor will add a Mixture-of-Experts router loss (its ``aux_loss_enabled``), read before
    it runs: from the model's config, or the config a model id names as TRL loads it (``model_init_kwargs``, whose
    settings other than loading ones override the file's). Where that config cannot be read here, False: TRL's own
    decision is checked after its constructor."""
    config = getattr(model, "config", None)
    if isinstance(model, str):
        from transformers import AutoConfig

        init = dict(args.model_init_kwargs or {})
        config = init.pop("config", None)
        loading = {key: init.pop(key) for key in ("revision", "token", "cache_dir") if key in init}
        try:
            config = config or AutoConfig.from_pretrained(
                model, trust_remote_code=init.pop("trust_remote_code", args.trust_remote_code), **loading)
        except Exception:  # noqa: BLE001 - whatever stops it here stops TRL's own load, which says why
            return False
        for key in ("output_router_logits", "router_aux_loss_coef"):
            if key in init:  # (from_pretrained sets a config attribute named in its keyword arguments)
                setattr(config, key, init[key])
    if config is None:
        return False
    text = config.get_text_config()
    coef = args.router_aux_loss_coef
    coef = getattr(text, "router_aux_loss_coef", 0.0) if coef is None else coef
    return hasattr(text, "output_router_logits") and coef != 0.0


class PerPairDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with perpair's per-pair β, ε, routes and order (see the module docstring).

    ``plan`` is a ``perpair plan`` file; without it ``train_dataset`` must carry the columns ``beta``,
    ``route``, ``order`` and ``label_smoothing`` (and optionally ``flipped``). The evaluation dataset is not
    planned: it is scored as stock TRL does, with ``DPOConfig.beta``.
    """

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None,
                 train_dataset: Dataset | None = None, *, plan: str | Path | None = None, **kwargs):
        check_trl_version(trl.__version__)
        if args is None:
            raise PerpairError("PerPairDPOTrainer needs args=DPOConfig(...)")
        check_config(args)
        if not isinstance(train_dataset, Dataset):
            raise PerpairError("PerPairDPOTrainer needs train_dataset as a datasets.Dataset (a plan orders and "
                               f"selects its rows), got {type(train_dataset).__name__}")
        if any(c in train_dataset.column_names for c in ("image", "images")):
            raise PerpairError("PerPairDPOTrainer does not support vision datasets (their collator differs)")
        check_eval_dataset(kwargs.get("eval_dataset"))
        train_dataset, self.plan_summary = apply_plan(train_dataset, plan)
        if args.dataloader_drop_last and self.plan_summary.ordered:  # (without a curriculum: TRL's sampler, as stock)
            raise PerpairError("dataloader_drop_last=True drops the last incomplete batch of every epoch: with the "
                               "plan's order those are the plan's last pairs (the hardest of an easy-to-hard "
                               "curriculum), never trained; leave it False (the last step of an epoch then has fewer "
                               "pairs), or drop pairs in the plan (route drop)")
        check_beta(args, train_dataset, kwargs.get("eval_dataset"))
        check_smoothing(args, train_dataset)
        if args.world_size > 1 and self.plan_summary.sft:  # (before TRL's tokenization and reference pass)
            raise PerpairError(SFT_PROCESSES)
        if self.plan_summary.sft and router_loss(model, args):  # likewise; TRL's own decision is checked after it
            raise PerpairError(ROUTER_SFT)
        super().__init__(model, ref_model, args, data_collator, train_dataset, **kwargs)
        if self.aux_loss_enabled and self.plan_summary.sft:
            raise PerpairError(ROUTER_SFT)
        if self.accelerator.num_processes > 1 and self.plan_summary.sft:
            # Each process would split its batch differently between TRL's forward and the SFT forward, and
            # TRL's metric gathers inside its forward would then not line up across processes.
            raise PerpairError(SFT_PROCESSES)
        self.data_collator = PlanCollator(self.data_collator)
        # The pairs TRL kept (it drops those whose prompt fills max_length), in the plan's order
        self._planned = {pid: position for position, pid in enumerate(self.train_dataset[PAIR])}
        self._plan_digest = self._digest()

    def _digest(self) -> str:
        """The pairs the training dataset trains, in order, with their plan values (what a checkpoint records)."""
        trained = self.train_dataset.select_columns([PAIR, BETA, SFT, EPS])
        return hashlib.sha256(json.dumps(list(trained.to_dict().values())).encode()).hexdigest()

    def _check_order(self) -> bool:
        """The training dataset, if replaced after construction (``trainer.train_dataset = ...``), must still read the
        planned pairs in the plan's order: the sequential sampler reads its rows as they come, so a shuffle would
        replace the curriculum without a word. A filter or select that keeps the order is fine. False where the
        dataset carries no plan values (the batch check refuses it); refused where it keeps some of the columns
        the plug-in added but not all (without perpair_pair_id a shuffle would go unseen)."""
        dataset = self.train_dataset
        if not isinstance(dataset, Dataset):
            return False
        added = (PAIR, BETA, SFT, EPS)
        kept = [c for c in added if c in dataset.column_names]
        if not {BETA, SFT, EPS} & set(kept):
            return False
        if len(kept) < len(added):
            lacking = ", ".join(c for c in added if c not in kept)
            raise PerpairError(f"trainer.train_dataset keeps {', '.join(kept)} but lacks {lacking}, which "
                               f"PerPairDPOTrainer added with the plan ({PAIR} names each row's pair, so that a "
                               f"change of the plan's order is seen); keep all of {', '.join(added)} when changing "
                               "the dataset after construction, or pass the dataset to the constructor")
        last, previous = -1, None
        for row, pid in enumerate(dataset[PAIR], start=1):
            position = self._planned.get(pid)
            if position is None:
                raise PerpairError(f"trainer.train_dataset row {row} holds pair {pid}, which PerPairDPOTrainer did not "
                                   "plan: the training dataset was changed after the plan was applied to it; pass "
                                   "the dataset to the constructor")
            if position <= last and self.plan_summary.ordered:  # (without a curriculum the order is TRL's)
                raise PerpairError(f"trainer.train_dataset was reordered after PerPairDPOTrainer applied the plan: row "
                                   f"{row} holds pair {pid}, which the plan's order puts before pair {previous} of "
                                   f"row {row - 1}; the rows are read as they come, so the plan's curriculum would be "
                                   "lost; leave them in the order the trainer set (a filter or select that keeps it "
                                   "is fine), or make the plan with the order you want")
            last, previous = position, pid
        return True

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if self._check_order():  # what this run trains, if the dataset was filtered since construction
            self._plan_digest = self._digest()
        if resume_from_checkpoint and not self.args.ignore_data_skip:
            checkpoint = (get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True
                          else resume_from_checkpoint)
            if checkpoint is not None and Path(checkpoint).is_dir():  # (else Transformers says there is none)
                self._check_resumed_plan(Path(checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        if not isinstance(eval_dataset, str):  # (a name: one of the datasets checked at construction)
            check_eval_dataset(eval_dataset)
        return super().evaluate(eval_dataset, *args, **kwargs)

    def _pairs_per_step(self) -> int:
        """Pairs one optimizer step reads, as Transformers counts its batches (``_train_batch_size``, which
        DataParallel's ``n_gpu`` multiplies, × accumulation × data-parallel processes), except under
        ``accelerator_config.split_batches``, where one batch of that size is split across the processes, which
        Transformers' own total does not count."""
        pairs = self._train_batch_size * self.args.gradient_accumulation_steps
        if self.args.accelerator_config.split_batches:
            return pairs
        return self.get_total_train_batch_size(self.args)  # (Transformers >= 4.56.2, as TRL 1.16 requires)

    def _check_resumed_plan(self, checkpoint: Path) -> None:
        """Transformers resumes by skipping the batches the checkpoint trained: in this plan's order, that is the
        position the checkpoint reached only if it trained the same pairs in the same order, as many a step."""
        restart = "or set ignore_data_skip=True to read the current epoch of this plan from its first pair"
        try:
            record = json.loads((checkpoint / PLAN_RECORD).read_text())
        except FileNotFoundError:
            raise PerpairError(f"checkpoint {checkpoint} has no {PLAN_RECORD}: it was not saved by "
                               "PerPairDPOTrainer, so where it stopped in the plan's order is unknown; resume one that "
                               f"was, {restart}") from None
        if record["plan"] != self._plan_digest:
            raise PerpairError(f"checkpoint {checkpoint} was trained on other pairs or another plan ({record['pairs']}"
                               f" pairs; this run {len(self.train_dataset)}): skipping its batches would skip other "
                               "pairs of this run's order; resume with the plan, dataset and max_length it was "
                               f"trained with, {restart}")
        if record["pairs_per_step"] != self._pairs_per_step():
            raise PerpairError(f"checkpoint {checkpoint} trained {record['pairs_per_step']} pairs a step, this run "
                               f"{self._pairs_per_step()} (per_device_train_batch_size × gradient_accumulation_steps"
                               " × processes; under split_batches the batch is split across them): skipping its "
                               f"steps would land elsewhere in the plan's order; resume with its batch size, {restart}")

    def _save_checkpoint(self, model, trial):
        if self.args.should_save:  # written first, so that a checkpoint pushed or copied from here has it
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / PLAN_RECORD).write_text(json.dumps({"plan": self._plan_digest, "pairs": len(self.train_dataset),
                                                          "pairs_per_step": self._pairs_per_step()}) + "\n")
        super()._save_checkpoint(model, trial)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, BETA, SFT, EPS]

    def _get_train_sampler(self, train_dataset=None):
        if not self.plan_summary.ordered:  # curriculum none: TRL's own sampler (train_sampling_strategy), as stock
            return super()._get_train_sampler(train_dataset)
        # The plan's order is the order of the dataset's rows (apply_plan sorted them).
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    @contextlib.contextmanager
    def _per_pair(self, beta: torch.Tensor, eps: torch.Tensor):
        """``self.beta`` (and ``self.label_smoothing`` where a loss reads it) as per-pair tensors for one call;
        ``sigmoid`` with ε > 0 as cDPO: TRL's robust code at ε' = −ε / (1−2ε) (see the module's docstring)."""
        saved = self.beta, self.label_smoothing, self.loss_types
        self.beta = beta
        if any(loss in SMOOTHING_LOSSES for loss in self.loss_types):
            self.label_smoothing = eps
        elif CDPO in self.loss_types and bool((eps > 0).any()):
            self.loss_types = ["robust" if loss == CDPO else loss for loss in self.loss_types]
            self.label_smoothing = -eps / (1 - 2 * eps)
        try:
            with warnings.catch_warnings():  # exo_pair wraps label_smoothing in torch.tensor(), harmless here
                warnings.filterwarnings("ignore", message="To copy construct from a tensor")
                yield
        finally:
            self.beta, self.label_smoothing, self.loss_types = saved

    def _compute_loss(self, model, inputs, return_outputs):
        if BETA not in inputs:
            if model.training:  # a dataset swapped in after construction, say: it would train with DPOConfig.beta
                raise PerpairError("a training batch carries no plan values: the training dataset was replaced after "
                                   "PerPairDPOTrainer applied the plan to it; pass the dataset to the constructor")
            return super()._compute_loss(model, inputs, return_outputs)  # evaluation (not planned): stock TRL
        if return_outputs:
            raise PerpairError("PerPairDPOTrainer computes planned batches for the loss only")
        beta, sft, eps = _floats(inputs.pop(BETA)), inputs.pop(SFT).bool(), _floats(inputs.pop(EPS))
        n = beta.numel()
        pref_index = torch.nonzero(~sft).flatten()
        sft_index = torch.nonzero(sft).flatten()
        mode = "train" if self.model.training else "eval"
        loss = 0.0
        if pref_index.numel():
            batch = inputs if not sft_index.numel() else _take_pairs(inputs, pref_index, n, self.args)
            with self._per_pair(beta[pref_index], eps[pref_index]):
                loss = super()._compute_loss(model, batch, False) * (pref_index.numel() / n)
        sums = {"pref": float(pref_index.numel()), "sft": float(sft_index.numel()),
                "beta": beta[pref_index].sum().item(), "sft_logps": 0.0, "sft_nll": 0.0, "sft_tokens": 0.0}
        if sft_index.numel():
            nll, chosen_logps, tokens = self._sft_losses(model, inputs, sft_index)
            loss = loss + nll.sum() / n
            sums.update(sft_logps=chosen_logps.sum().item(), sft_nll=nll.detach().sum().item(),
                        sft_tokens=float(tokens))
        self._log_plan_metrics(mode, sums)
        return loss

    def _sft_losses(self, model, inputs, index: torch.Tensor):
        """perpair's ``sft`` loss for the SFT pairs: −log π(y_w|x)/|y_w|, prompt masked, from a forward of the
        chosen sequences alone. Returns (per-pair NLL, summed chosen log-probs, tokens forwarded)."""
        attention = inputs["attention_mask"][index]
        width = _width(attention, self.args)
        ids, attention = inputs["input_ids"][index, :width], attention[:, :width]
        completion = inputs["completion_mask"][index, :width]
        labels = ids.masked_fill(completion == 0, -100)
        outputs = model(input_ids=ids, attention_mask=attention, labels=labels, use_cache=False, fused_lm_head=True)
        mask = completion[:, 1:]
        logps = (outputs.log_probs[:, -mask.size(1):] * mask).sum(dim=1)
        return -logps / mask.sum(dim=1).clamp(min=1), logps.detach(), attention.sum()

    def _log_plan_metrics(self, mode: str, sums: dict[str, float]) -> None:
        """β mean over preference pairs, route shares, the SFT loss; ``logps/chosen`` over every pair of the
        batch (TRL's definition, now also counting the SFT pairs' chosen responses, as perpair's log does).
        One gather of the per-process sums, so every process makes the same collective calls."""
        device = self.accelerator.device
        totals = dict(zip(sums, self.accelerator.gather_for_metrics(
            torch.tensor([list(sums.values())], dtype=torch.float64, device=device)).sum(dim=0).tolist(),
            strict=True))
        metrics = self._metrics[mode]
        pairs = totals["pref"] + totals["sft"]
        metrics["route/preference_share"].append(totals["pref"] / pairs)
        metrics["route/sft_share"].append(totals["sft"] / pairs)
        if totals["pref"]:
            metrics["beta/mean"].append(totals["beta"] / totals["pref"])
        if totals["sft"]:
            metrics["loss/sft"].append(totals["sft_nll"] / totals["sft"])
            # super() appended the preference pairs' mean just now (when there were any)
            pref_sum = metrics["logps/chosen"].pop() * totals["pref"] if totals["pref"] else 0.0
            metrics["logps/chosen"].append((pref_sum + totals["sft_logps"]) / pairs)
            if mode == "train":
                self._total_train_tokens += int(totals["sft_tokens"])
            metrics["num_tokens"] = [self._total_train_tokens]


def _width(attention_mask: torch.Tensor, args: DPOConfig) -> int:
    """Columns needed for these right-padded rows (rounded up as the collator's pad_to_multiple_of asks)."""
    width = int(attention_mask.sum(dim=1).max().item())
    multiple = args.pad_to_multiple_of
    if multiple:
        width = min(attention_mask.size(1), -(-width // multiple) * multiple)
    return width


def _take_pairs(inputs: dict[str, Any], index: torch.Tensor, n: int, args: DPOConfig) -> dict[str, Any]:
    """The batch of TRL's collator restricted to the pairs ``index``: rows [chosen…, rejected…] of the
    sequence tensors, entries of the per-pair ones."""
    rows = torch.cat([index, index + n])
    out: dict[str, Any] = {}
    width = _width(inputs["attention_mask"][rows], args)
    for key, value in inputs.items():
        if key in ("input_ids", "attention_mask", "completion_mask"):
            out[key] = value[rows, :width]
        elif key in ("ref_chosen_logps", "ref_rejected_logps"):
            out[key] = value[index]
        else:
            raise PerpairError(f"PerPairDPOTrainer cannot split the batch field {key!r} between routes (a custom "
                               "collator?); use TRL's default collator")
    return out
