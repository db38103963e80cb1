"""``perpair.integrations.trl``: perpair plans inside TRL's own DPOTrainer.

Parity is checked against the implementations themselves: TRL's stock ``DPOTrainer`` for a plan that changes
nothing, ``perpair train`` for an SP²DPO+MixDPO plan (per-pair β, SFT routes, flips, a curriculum order)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

import trl  # noqa: E402
from datasets import Dataset  # noqa: E402

from conftest import HH_TEST, NO_DATA, UF_TRAIN, run_cli, save_tiny_llama  # noqa: E402
from perpair.artifacts import write_artifact  # noqa: E402
from perpair.data import prepare, read_pairs  # noqa: E402
from perpair.data.schema import SCHEMA_VERSION  # noqa: E402
from perpair.errors import PerpairError  # noqa: E402
from perpair.integrations import trl as plugin  # noqa: E402
from perpair.plan import build_plan, resolve_schedule, write_plan  # noqa: E402
from plan_helpers import random_annotations  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


@pytest.fixture(scope="module")
def small_pairs(uf_pairs, tmp_path_factory) -> Path:
    """The first 24 UltraFeedback pairs as a pairs file of their own (plans cover every pair of their file)."""
    table, provenance = read_pairs(str(uf_pairs))
    path = tmp_path_factory.mktemp("small") / "pairs.parquet"
    write_artifact(path, table.slice(0, 24), kind="pairs", schema_version=SCHEMA_VERSION, provenance=provenance)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", hidden=64)


def _dataset(pairs: Path) -> Dataset:
    table, _ = read_pairs(str(pairs))
    return Dataset.from_list(table.select(["prompt", "chosen", "rejected"]).to_pylist())


def _plan(pairs: Path, out: Path, preset: str, overrides: dict | None = None, beta: float | None = None) -> Path:
    annotations = None
    if preset.startswith("sp2dpo"):
        annotations = out.with_name(out.stem + "_ann.parquet")
        random_annotations(annotations, pairs, read_pairs(str(pairs))[0].column("pair_id").to_pylist(), seed=3)
    result = build_plan(pairs, annotations, resolve_schedule(preset, overrides=overrides, beta=beta), preset=preset)
    write_plan(result, out)
    return out


def _args(out: Path, batch: int, max_length: int, lr: float, **options):
    from trl import DPOConfig

    defaults = dict(max_steps=STEPS, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, report_to=[],
                    save_strategy="no", seed=0, use_cpu=True, dataloader_num_workers=0, bf16=False, disable_tqdm=True)
    # bf16=False: TRL autocasts to bf16 even on CPU
    return DPOConfig(output_dir=str(out), per_device_train_batch_size=batch, learning_rate=lr, max_length=max_length,
                     **{**defaults, **options})


def _train(trainer_class, model_dir: Path, args, dataset, trainers: list | None = None, **extra) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    trainer = trainer_class(model=model, args=args, train_dataset=dataset,
                            processing_class=AutoTokenizer.from_pretrained(model_dir), **extra)
    if trainers is not None:
        trainers.append(trainer)
    trainer.train()
    return [h for h in trainer.state.log_history if "route/sft_share" in h or "logps/rejected" in h]


# --------------------------------------------------------------------------------------------------- parity

@pytest.mark.slow
def test_perpair_train_and_a_constant_beta_plan_reproduce_stock_trl(small_pairs, tmp_path):
    """Three steps of TRL's stock DPOTrainer on SmolLM2 (the pairs in file order, fp32), run once for two
    claims: ``perpair train`` on the same pairs reproduces its logged log-probs (1e-3) and losses (1e-4), and TRL
    with the plug-in and a plan that changes nothing (β = 0.1 for every pair, in file order) logs the same
    losses, log-probs, margins and gradient norms (1e-6)."""
    from torch.utils.data import SequentialSampler
    from trl import DPOTrainer

    from perpair.models import resolve_model

    class FileOrderDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):  # the pairs in file order, as perpair without a plan
            return SequentialSampler(self.train_dataset)

    batch, max_length, lr, beta = 2, 128, 1e-6, 0.1
    model = resolve_model("smollm2")
    stock = _train(FileOrderDPOTrainer, model, _args(tmp_path / "stock", batch, max_length, lr, beta=beta),
                   _dataset(small_pairs))
    assert len(stock) == STEPS

    run_cli("train", "--model", "smollm2", "--data", small_pairs, "--steps", STEPS, "--batch-size", batch,
            "--max-length", max_length, "--beta", beta, "--lr", lr, "--lr-schedule", "constant",
            "--out", tmp_path / "perpair", "--set", f"reference_cache={tmp_path / 'cache'}", "--set",
            "save_model=false", "--set", "final_checkpoint=false")  # (SmolLM2's weights and Adam state: 6 s to write)
    trained = [json.loads(line) for line in (tmp_path / "perpair" / "metrics.jsonl").read_text().splitlines()]
    assert len(trained) == STEPS
    for mine, theirs in zip(trained, stock, strict=True):
        assert mine["logps_chosen"] == pytest.approx(theirs["logps/chosen"], rel=1e-3)
        assert mine["logps_rejected"] == pytest.approx(theirs["logps/rejected"], rel=1e-3)
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
        assert mine["reward_accuracy"] == pytest.approx(theirs["rewards/accuracies"], abs=1e-6)

    plan = _plan(small_pairs, tmp_path / "plan.parquet", "dpo", beta=beta)  # (no curriculum: TRL's sampler)
    ours = _train(plugin.PerPairDPOTrainer, model, _args(tmp_path / "ours", batch, max_length, lr, beta=beta,
                                                         train_sampling_strategy="sequential"),
                  _dataset(small_pairs), plan=plan)
    assert len(ours) == STEPS
    for mine, theirs in zip(ours, stock, strict=True):
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6), key
        assert mine["beta/mean"] == pytest.approx(0.1, rel=1e-6)
        assert mine["route/sft_share"] == 0.0


@pytest.mark.slow
def test_a_plan_without_a_curriculum_keeps_trls_shuffled_order(small_pairs, tiny_model, tmp_path):
    """A plan whose curriculum is none (the dpo, sp2dpo presets: "file order") was read in the pairs file's order by
    a sequential sampler, where stock TRL shuffles (train_sampling_strategy "random", its default, accepted and
    ignored). Now such a plan leaves the order to TRL: with β 0.1 for every pair, three steps equal stock TRL's
    (same seed); a plan with a curriculum is still read in its order."""
    from torch.utils.data import RandomSampler, SequentialSampler
    from trl import DPOTrainer

    batch, max_length, lr = 4, 192, 1e-3
    stock_trainers, ours_trainers = [], []
    stock = _train(DPOTrainer, tiny_model, _args(tmp_path / "stock", batch, max_length, lr), _dataset(small_pairs),
                   trainers=stock_trainers)
    plan = _plan(small_pairs, tmp_path / "plan.parquet", "dpo", beta=0.1)
    ours = _train(plugin.PerPairDPOTrainer, tiny_model, _args(tmp_path / "ours", batch, max_length, lr),
                  _dataset(small_pairs), plan=plan, trainers=ours_trainers)
    assert isinstance(ours_trainers[0]._get_train_sampler(), RandomSampler)
    assert len(ours) == len(stock) == STEPS
    for mine, theirs in zip(ours, stock, strict=True):
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6), key
    sequential = plugin.PerPairDPOTrainer(model=str(tiny_model), args=_args(
        tmp_path / "seq", batch, max_length, lr, train_sampling_strategy="sequential"), train_dataset=_dataset(
        small_pairs), plan=plan)
    assert isinstance(sequential._get_train_sampler(), SequentialSampler)
    curriculum = _plan(small_pairs, tmp_path / "mixdpo.parquet", "mixdpo", {"routing": {"tau": None}})
    ordered = plugin.PerPairDPOTrainer(model=str(tiny_model), args=_args(tmp_path / "cur", batch, max_length, lr),
                                       train_dataset=_dataset(small_pairs), plan=curriculum)
    assert ordered.plan_summary.curriculum == "easy_to_hard"
    assert isinstance(ordered._get_train_sampler(), SequentialSampler)


def _perpair_train(model: Path, pairs: Path, plan: Path, out: Path, loss: str, batch: int, max_length: int,
                   lr: float, *extra) -> list[dict]:
    run_cli("train", "--model", model, "--data", pairs, "--plan", plan, "--loss", loss, "--steps", STEPS,
            "--batch-size", batch, "--max-length", max_length, "--lr", lr, "--lr-schedule", "constant",
            "--warmup-ratio", 0, "--out", out, "--threads", 1, "--set", f"reference_cache={out / 'cache'}",
            "--set", "save_model=false", *extra)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("loss, smoothing", [("sigmoid", 0.0), ("robust", 0.1), ("sigmoid", 0.1)])
def test_sp2dpo_mixdpo_plan_equals_perpair_train(loss, smoothing, small_pairs, tiny_model, tmp_path):
    """An SP²DPO+MixDPO plan (per-pair β, τ routing to SFT, flips, a shuffled curriculum; with ε also the plan's
    label smoothing: rDPO for robust, cDPO for sigmoid, MixDPO's loss, which TRL's sigmoid alone ignores): three
    steps through TRL with the plug-in equal ``perpair train`` on the same plan, fp32."""
    overrides = {"routing": {"tau": 1.0}, "curriculum": {"kind": "random"}, "label_smoothing": smoothing}
    plan = _plan(small_pairs, tmp_path / "plan.parquet", "sp2dpo+mixdpo", overrides)
    batch, max_length, lr = 4, 192, 1e-3  # 18 of the 24 prompts fit: 3 steps in one epoch
    ours = _perpair_train(tiny_model, small_pairs, plan, tmp_path / "ours", loss, batch, max_length, lr)
    trl_logs = _train(plugin.PerPairDPOTrainer, tiny_model, _args(tmp_path / "trl", batch, max_length, lr,
                                                                  loss_type=[loss]),
                      _dataset(small_pairs), plan=plan)
    # the plan exercises what it should: mixed routes within a step and distinct β within a step
    assert any(0 < m["pairs_sft"] < m["pairs"] for m in ours)
    assert any(m["beta_min"] is not None and m["beta_min"] < m["beta_max"] for m in ours)
    assert len(trl_logs) == len(ours) == STEPS
    for mine, theirs in zip(ours, trl_logs, strict=True):
        assert theirs["loss"] == pytest.approx(mine["loss"], rel=1e-4)
        assert theirs["logps/chosen"] == pytest.approx(mine["logps_chosen"], rel=1e-3)
        if mine["pairs_preference"]:
            assert theirs["logps/rejected"] == pytest.approx(mine["logps_rejected"], rel=1e-3)
            assert theirs["rewards/margins"] == pytest.approx(mine["reward_margin"], rel=1e-3, abs=1e-7)
            assert theirs["beta/mean"] == pytest.approx(mine["beta_mean"], rel=1e-6)
        if mine["pairs_sft"]:
            assert theirs["loss/sft"] == pytest.approx(mine["loss_sft"], rel=1e-4)
        assert theirs["route/sft_share"] == mine["pairs_sft"] / mine["pairs"]


@pytest.mark.slow
def test_a_peft_lora_adapter_trains_as_perpair_train_lora(small_pairs, tiny_model, tmp_path):
    """``peft_config`` passes through to TRL: the plan applies to the adapter's training and TRL's reference is the
    base model with the adapter off (perpair's reference is the initial weights, the adapter a zero update), so
    three steps of an SP²DPO+MixDPO plan (per-pair β, SFT routes) equal ``perpair train --lora`` with the same
    adapter (r 4, α 32, all linear layers, the same seed before wrapping), fp32."""
    from peft import LoraConfig, PeftModel

    plan = _plan(small_pairs, tmp_path / "plan.parquet", "sp2dpo+mixdpo",
                 {"routing": {"tau": 1.0}, "curriculum": {"kind": "random"}, "label_smoothing": 0.0})
    batch, max_length, lr = 4, 192, 1e-2
    ours = _perpair_train(tiny_model, small_pairs, plan, tmp_path / "ours", "sigmoid", batch, max_length, lr,
                          "--lora", "--set", "lora.r=4", "--set", "lora.alpha=32")
    peft_config = LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainers = []
    trl_logs = _train(plugin.PerPairDPOTrainer, tiny_model, _args(tmp_path / "trl", batch, max_length, lr),
                      _dataset(small_pairs), plan=plan, peft_config=peft_config, trainers=trainers)
    assert isinstance(trainers[0].model, PeftModel) and trainers[0].ref_model is None
    assert any(0 < m["pairs_sft"] < m["pairs"] for m in ours) and ours[-1]["reward_margin"] != 0
    assert len(trl_logs) == len(ours) == STEPS
    for mine, theirs in zip(ours, trl_logs, strict=True):
        assert theirs["loss"] == pytest.approx(mine["loss"], rel=1e-4)
        assert theirs["logps/chosen"] == pytest.approx(mine["logps_chosen"], rel=1e-3)
        # a margin is β times a difference of log-prob sums of ~10³ nats, each float32 sum off by ~1e-4 nats between
        # two kernels' summation orders: 1e-5 absolute at β ≤ 0.1 (on an AVX2-only CPU they differed by 3.5e-6,
        # 1.04e-3 relative, in a margin of 3.3e-3; on the AVX-512 host by less)
        assert theirs["rewards/margins"] == pytest.approx(mine["reward_margin"], rel=1e-3, abs=1e-5)
        assert theirs["loss/sft"] == pytest.approx(mine["loss_sft"], rel=1e-4)
    trained = [n for n, p in trainers[0].model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)  # the base stays frozen
    assert any(p.abs().max() > 0 for n, p in trainers[0].model.named_parameters() if "lora_B" in n)


def test_each_loss_gets_each_pairs_beta(small_pairs, tiny_model, tmp_path):
    """For every TRL loss the plug-in supports: the loss of a batch with distinct β_i (and ε_i) equals the mean of
    stock TRL's loss on each pair alone with β = β_i, ε = ε_i (TRL called, not a copy of its formulas); for sigmoid,
    which reads ε as cDPO, (1 − ε_i) × stock sigmoid on the pair + ε_i × stock sigmoid on it with its responses
    swapped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    rows = _dataset(small_pairs).select([5, 7])  # two short pairs
    betas, eps = [0.05, 0.4], [0.02, 0.2]
    planned = rows.add_column("beta", betas).add_column("route", ["preference"] * 2)
    planned = planned.add_column("order", [0, 1]).add_column("label_smoothing", eps)

    def build(cls, dataset, **extra):
        return cls(model=AutoModelForCausalLM.from_pretrained(tiny_model), args=_args(tmp_path, 2, 256, 1e-3,
                   loss_type=["robust"], label_smoothing=extra.pop("label_smoothing", 0.0)), train_dataset=dataset,
                   processing_class=AutoTokenizer.from_pretrained(tiny_model), **extra)

    ours = build(plugin.PerPairDPOTrainer, planned)
    stock = build(DPOTrainer, rows, label_smoothing=0.1)
    for trainer in (ours, stock):  # the same move away from the reference, so that the margins are not 0
        torch.manual_seed(1)
        with torch.no_grad():
            for parameter in trainer.model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    assert len(stock.train_dataset) == len(ours.train_dataset) == 2
    batch = next(iter(ours.get_train_dataloader()))
    singles = [stock.data_collator([stock.train_dataset[i]]) for i in range(2)]

    def swapped(example):  # the pair with chosen and rejected exchanged, as stock TRL tokenized it
        return {k.replace("chosen", "\0").replace("rejected", "chosen").replace("\0", "rejected"): v
                for k, v in example.items()}

    flipped = [stock.data_collator([swapped(stock.train_dataset[i])]) for i in range(2)]
    assert any("chosen" in key for key in stock.train_dataset[0])
    for loss in sorted(plugin.PER_PAIR_LOSSES - {"sft"}):
        ours.loss_types = stock.loss_types = [loss]
        ours.loss_weights = stock.loss_weights = [1.0]
        with torch.no_grad():
            got = ours.compute_loss(ours.model, dict(batch)).item()
            expected = []
            for single, other, beta, smoothing in zip(singles, flipped, betas, eps, strict=True):
                stock.beta, stock.label_smoothing = beta, smoothing
                expected.append(stock.compute_loss(stock.model, dict(single)).item())
                if loss == "sigmoid":
                    expected[-1] = (1 - smoothing) * expected[-1] + smoothing * stock.compute_loss(
                        stock.model, dict(other)).item()
        assert expected[0] != pytest.approx(expected[1], rel=1e-3), loss  # the two pairs differ
        assert got == pytest.approx(sum(expected) / 2, rel=1e-5), loss


def test_plan_values_survive_deepspeeds_cast_of_float_inputs(small_pairs, tiny_model, tmp_path, monkeypatch):
    """Under DeepSpeed, Transformers' _prepare_input casts every float tensor of a batch to the model's dtype (bf16
    here): β_i and ε_i were rounded to bf16 (β 0.0137 became 0.013702…) before TRL's loss read them."""
    from types import SimpleNamespace

    import torch
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    planned = _dataset(small_pairs).select([5, 7]).add_column("beta", [0.0137, 0.4])
    planned = planned.add_column("route", ["preference"] * 2).add_column("order", [0, 1])
    planned = planned.add_column("label_smoothing", [0.0123, 0.2])
    trainer = plugin.PerPairDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model),
                                       args=_args(tmp_path, 2, 256, 1e-3, loss_type=["robust"]), train_dataset=planned,
                                       processing_class=AutoTokenizer.from_pretrained(tiny_model))
    torch.manual_seed(1)
    with torch.no_grad():  # away from the reference, so that β_i and ε_i matter
        for parameter in trainer.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        exact = trainer.compute_loss(trainer.model, trainer._prepare_inputs(dict(batch))).item()
        monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
        bf16 = SimpleNamespace(hf_ds_config=SimpleNamespace(dtype=lambda: torch.bfloat16))
        monkeypatch.setattr(AcceleratorState, "deepspeed_plugin", property(lambda self: bf16))
        cast = trainer.compute_loss(trainer.model, trainer._prepare_inputs(dict(batch))).item()
    assert cast == pytest.approx(exact, rel=1e-7)


# ------------------------------------------------------------------------------- plan matching, refusals

def test_dataset_columns_are_the_plan(small_pairs, tmp_path):
    """A dataset carrying beta/route/order/label_smoothing (and flipped) is applied exactly as the plan file."""
    import pyarrow.parquet as pq

    plan = _plan(small_pairs, tmp_path / "plan.parquet", "sp2dpo+mixdpo",
                 {"routing": {"tau": 1.0}, "curriculum": {"kind": "random"}})
    table = pq.read_table(plan)
    by_id = {r["pair_id"]: r for r in table.to_pylist()}
    dataset = _dataset(small_pairs)
    ids = plugin.pair_ids(dataset)
    assert ids == read_pairs(str(small_pairs))[0].column("pair_id").to_pylist()  # perpair's own ids
    columns = dataset
    for name in ("beta", "route", "order", "label_smoothing", "flipped"):
        columns = columns.add_column(name, [by_id[i][name] for i in ids])
    from_plan, summary = plugin.apply_plan(dataset, plan)
    from_columns, _ = plugin.apply_plan(columns, None)
    assert from_plan.to_list() == from_columns.to_list()
    trained = sorted((r for r in table.to_pylist() if r["route"] != "drop"), key=lambda r: r["order"])
    assert from_plan[plugin.BETA] == [r["beta"] if r["route"] == "preference" else 1.0 for r in trained]
    assert from_plan[plugin.SFT] == [r["route"] == "sft" for r in trained]
    assert summary.sft == sum(r["route"] == "sft" for r in trained) > 0
    assert summary.dropped == len(table) - len(trained)
    for planned, row in zip(trained, from_plan, strict=True):  # plan order; flipped pairs swapped
        source = dataset[ids.index(planned["pair_id"])]
        swap = planned["flipped"]
        assert (row["chosen"], row["rejected"]) == ((source["rejected"], source["chosen"]) if swap
                                                    else (source["chosen"], source["rejected"]))


def _construct(model_dir: Path, dataset, plan, out: Path, **options):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return plugin.PerPairDPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                                    args=_args(out, 2, 64, 1e-3, **options), train_dataset=dataset,
                                    processing_class=AutoTokenizer.from_pretrained(model_dir), plan=plan)


def test_sft_routes_with_several_processes_are_refused_before_trl_prepares_anything(small_pairs, tiny_model,
                                                                                      tmp_path, monkeypatch):
    """The refusal came after TRL's constructor: its tokenization, and with precompute_ref_log_probs a reference pass
    over the whole dataset, done for nothing. Now it comes first (the world size patched: one process here)."""
    from trl import DPOConfig, DPOTrainer

    plan = _plan(small_pairs, tmp_path / "plan.parquet", "mixdpo", {"routing": {"tau": 1.0}})
    monkeypatch.setattr(DPOConfig, "world_size", property(lambda self: 2))

    def never(*args, **kwargs):
        raise AssertionError("TRL's constructor ran")

    monkeypatch.setattr(DPOTrainer, "__init__", never)
    with pytest.raises(PerpairError, match=r"SFT-routed pairs with several processes are not supported"):
        _construct(tiny_model, _dataset(small_pairs), plan, tmp_path)


def test_a_moe_router_loss_with_sft_routes_is_refused_before_trl_prepares_anything(small_pairs, tiny_model,
                                                                                   tmp_path, monkeypatch):
    """The router-loss refusal came after TRL's constructor (its tokenization, a reference pass with
    precompute_ref_log_probs); now it comes first, read from the model's config as TRL reads it; a plan without SFT
    routes is not refused."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM
    from trl import DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           output_router_logits=True, router_aux_loss_coef=0.02)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    routed = _plan(small_pairs, tmp_path / "plan.parquet", "mixdpo", {"routing": {"tau": 1.0}})

    def never(*args, **kwargs):
        raise AssertionError("TRL's constructor ran")

    monkeypatch.setattr(DPOTrainer, "__init__", never)
    with pytest.raises(PerpairError, match=r"a Mixture-of-Experts router loss with SFT-routed pairs is not supported"):
        _construct(tmp_path / "moe", _dataset(small_pairs), routed, tmp_path)
    assert plugin.router_loss(str(tmp_path / "moe"), _args(tmp_path, 2, 64, 1e-3))  # a model id: its config read
    assert not plugin.router_loss(str(tmp_path / "moe"), _args(tmp_path, 2, 64, 1e-3, router_aux_loss_coef=0.0))
    # the model's own setting overridden where TRL loads it, and a config that cannot be read (TRL then says why)
    assert not plugin.router_loss(str(tmp_path / "moe"), _args(tmp_path, 2, 64, 1e-3, model_init_kwargs={
        "router_aux_loss_coef": 0.0}))
    assert not plugin.router_loss(str(tmp_path / "nothing"), _args(tmp_path, 2, 64, 1e-3))
    plain = _plan(small_pairs, tmp_path / "plain.parquet", "dpo", beta=0.1)
    with pytest.raises(AssertionError, match="TRL's constructor ran"):  # no SFT route: on to TRL
        _construct(tmp_path / "moe", _dataset(small_pairs), plain, tmp_path)


def test_a_pair_the_data_holds_twice_is_trained_once_as_prepare_keeps_it(small_pairs, tmp_path):
    """`perpair prepare` keeps the first of identical pairs, so a plan made from raw data with a pair twice has it
    once; the same raw data given to the trainer was refused ("a plan needs each pair once"), the README's workflow
    failing. Now the later rows are trained once, with a warning naming them; plan columns carried by such data,
    one row's values against the other's, are still refused."""
    from datasets import concatenate_datasets

    plan = _plan(small_pairs, tmp_path / "plan.parquet", "dpo", beta=0.1)
    dataset = _dataset(small_pairs)
    doubled = concatenate_datasets([dataset, dataset.select([2])])
    with pytest.warns(UserWarning, match=r"train_dataset: 1 row\(s\) repeat an earlier row's pair \(first: pair "
                                         r"[0-9a-f]{16}, rows 3 and 25\); each pair is trained once"):
        out, summary = plugin.apply_plan(doubled, plan)
    single, expected = plugin.apply_plan(dataset, plan)
    assert (summary.pairs, summary.dropped, summary.repeated) == (expected.pairs, expected.dropped, 1)
    assert out[plugin.PAIR] == single[plugin.PAIR]
    carried = doubled.add_column("beta", [0.1] * 25).add_column("route", ["preference"] * 25)
    carried = carried.add_column("order", list(range(25))).add_column("label_smoothing", [0.0] * 25)
    with pytest.raises(PerpairError, match=r"appears twice \(rows 3 and 25\); plan columns need each pair once"):
        plugin.apply_plan(carried, None)


def test_refusals_at_construction(small_pairs, tiny_model, tmp_path, monkeypatch):
    plan = _plan(small_pairs, tmp_path / "plan.parquet", "dpo", beta=0.1)
    dataset = _dataset(small_pairs)
    with pytest.raises(PerpairError, match=r"loss_type 'aot' cannot take a per-pair β: it sorts"):
        _construct(tiny_model, dataset, plan, tmp_path, loss_type=["aot"])
    with pytest.raises(PerpairError, match=r"train_sampling_strategy 'group_by_length' reorders the pairs"):
        _construct(tiny_model, dataset, plan, tmp_path, train_sampling_strategy="group_by_length")
    # a pair edited in the data: its id is not in the plan, and the plan's pair is not in the data
    ids = plugin.pair_ids(dataset)
    edited = dataset.map(lambda ex, i: {"chosen": [{"role": "assistant", "content": "edited"}]} if i == 5 else {},
                         with_indices=True)
    new_id = plugin.pair_ids(edited)[5]
    with pytest.raises(PerpairError, match=rf"pair {new_id} \(train_dataset row 6\) is not in plan"):
        _construct(tiny_model, edited, plan, tmp_path)
    with pytest.raises(PerpairError, match=rf"pair {ids[5]} of plan .* is not in train_dataset"):
        _construct(tiny_model, edited.select([i for i in range(len(edited)) if i != 5]), plan, tmp_path)
    # the plan's ε reaching a TRL loss that ignores it
    smoothed = _plan(small_pairs, tmp_path / "smoothed.parquet", "mixdpo", {"routing": {"tau": None}})
    with pytest.raises(PerpairError, match=r"label_smoothing > 0, which TRL's loss_type 'hinge' ignores"):
        _construct(tiny_model, dataset, smoothed, tmp_path, loss_type=["hinge"])
    with pytest.raises(PerpairError, match=r"with the plan's ε, sigmoid is cDPO, computed by TRL's robust code"):
        _construct(tiny_model, dataset, smoothed, tmp_path, loss_type=["sigmoid", "robust"])
    assert _construct(tiny_model, dataset, smoothed, tmp_path).plan_summary.pairs > 0  # sigmoid: cDPO
    with pytest.raises(PerpairError, match=r"no plan: pass plan="):
        _construct(tiny_model, dataset, None, tmp_path)
    # a loss that reads no β; a DPOConfig ε that the plan contradicts, read or ignored by the loss; exo_pair, which
    # TRL refuses without DPOConfig's ε > 0, with a plan of another ε
    with pytest.raises(PerpairError, match=r"loss_type 'sft' alone reads no β and no label_smoothing"):
        _construct(tiny_model, dataset, plan, tmp_path, loss_type=["sft"])
    for loss in ("sigmoid", "robust"):
        with pytest.raises(PerpairError, match=r"DPOConfig.label_smoothing = 0.2 differs from the plan's per-pair "
                                               r"label_smoothing \(0\)"):
            _construct(tiny_model, dataset, plan, tmp_path, loss_type=[loss], label_smoothing=0.2)
    for config_eps in (0.0, 0.2):
        with pytest.raises(PerpairError, match=rf"loss_type 'exo_pair' needs DPOConfig.label_smoothing > 0 .*"
                                               rf"\(DPOConfig {config_eps}, plan 0.1\)"):
            _construct(tiny_model, dataset, smoothed, tmp_path, loss_type=["exo_pair"], label_smoothing=config_eps)
    assert _construct(tiny_model, dataset, smoothed, tmp_path, loss_type=["exo_pair"],
                      label_smoothing=0.1).plan_summary.pairs > 0
    # an evaluation dataset carrying plan columns: evaluation would not read them
    with pytest.raises(PerpairError, match=r"eval_dataset carries plan columns \(beta\), which evaluation does not "):
        plugin.PerPairDPOTrainer(model=tiny_model, args=_args(tmp_path, 2, 64, 1e-3), train_dataset=dataset,
                                 eval_dataset=dataset.add_column("beta", [1.0] * len(dataset)), plan=plan)
    # plan columns carried by the dataset: an order that is no number
    carried = dataset.add_column("beta", [0.1] * len(dataset)).add_column("route", ["preference"] * len(dataset))
    carried = carried.add_column("label_smoothing", [0.0] * len(dataset))
    with pytest.raises(PerpairError, match=r"pair .* \(row 2\) is routed preference but has no order \(nan\)"):
        _construct(tiny_model, carried.add_column("order", [0.0, float("nan"), *range(2, len(dataset))]), None,
                   tmp_path)
    # a TRL outside the supported range is named before anything else happens
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(PerpairError, match=r"supports trl>=1.16,<1.17 .* found trl 1.17.0"):
        _construct(tiny_model, dataset, plan, tmp_path)


def test_a_flipped_column_beside_a_plan_is_refused(small_pairs, tmp_path):
    """A dataset whose own flipped column says to swap its pairs, given with a plan: the plan's flips were applied
    and the column was left unread (every pair marked flipped, none trained swapped), where the other plan columns
    beside a plan are refused. An evaluation dataset with it is refused as with the others."""
    plan = _plan(small_pairs, tmp_path / "plan.parquet", "dpo", beta=0.1)
    dataset = _dataset(small_pairs)
    marked = dataset.add_column("flipped", [True] * len(dataset))
    with pytest.raises(PerpairError, match=r"train_dataset carries plan column\(s\) flipped and a plan was given"):
        plugin.apply_plan(marked, plan)
    with pytest.raises(PerpairError, match=r"eval_dataset carries plan columns \(flipped\)"):
        plugin.check_eval_dataset(marked)
    assert plugin.apply_plan(dataset, plan)[1].flipped == 0


def test_a_hand_edited_plan_is_refused_as_perpair_train_refuses_it(small_pairs, tmp_path):
    """A plan edited by hand: a pair given a second row was read with the last row winning (its β, route and order
    trained, the first row's ignored), and a null flipped was read as not flipped, where ``perpair train`` refuses
    both; a dataset's own flipped column with a null was read so too."""
    import pyarrow as pa

    from perpair.artifacts import read_artifact

    plan = _plan(small_pairs, tmp_path / "plan.parquet", "dpo", beta=0.1)
    table, provenance = read_artifact(plan, kind="plan", schema_version=1)
    dataset = _dataset(small_pairs)
    pid = table.column("pair_id")[0].as_py()

    def edited(name: str, edit) -> Path:
        path = tmp_path / name
        write_artifact(path, edit(table), kind="plan", schema_version=1, provenance=provenance)
        return path

    doubled = edited("doubled.parquet", lambda t: pa.concat_tables([t, t.slice(0, 1)]))
    with pytest.raises(PerpairError, match=rf"file .*doubled.parquet, row 25, field 'pair_id': pair '{pid}' appears "
                                           r"twice \(rows 1 and 25\); a plan needs unique pair ids"):
        plugin.apply_plan(dataset, doubled)
    flips = [False] * len(table)
    flips[1] = None
    unknown = edited("null.parquet", lambda t: t.set_column(t.schema.get_field_index("flipped"), "flipped",
                                                             pa.array(flips, pa.bool_())))
    with pytest.raises(PerpairError, match=r"file .*null.parquet, row 2, field 'flipped': pair '\w+' has no flipped "
                                           r"value \(null\); every pair has one, true or false"):
        plugin.apply_plan(dataset, unknown)
    n = len(dataset)
    carried = dataset.add_column("beta", [0.1] * n).add_column("route", ["preference"] * n)
    carried = carried.add_column("order", list(range(n))).add_column("label_smoothing", [0.0] * n)
    with pytest.raises(PerpairError, match=r"train_dataset: pair \w+ \(row 2\) has no flipped value \(null\); a "
                                           r"flipped column needs one for every pair"):
        plugin.apply_plan(carried.add_column("flipped", flips), None)
    assert plugin.apply_plan(carried.add_column("flipped", [False] * n), None)[1].flipped == 0


def test_options_that_would_leave_the_plans_order_are_refused(small_pairs, tiny_model, tmp_path, monkeypatch):
    """Trainer options that change which pairs a step reads, or in which order: auto_find_batch_size (after an
    out-of-memory error Transformers restarted from the plan's first pair with a batch size its checkpoints did not
    record), dataloader_drop_last (the plan's last pairs, the hardest of a curriculum, never trained) and
    dataloader_in_order=False with workers (batches as workers finish them) all trained without a word. Under
    split_batches one batch is split across the processes, so a checkpoint's pairs a step is not that batch times
    the processes (which it recorded)."""
    with pytest.raises(PerpairError, match=r"auto_find_batch_size is not supported: after an out-of-memory error "
                                           r"Transformers restarts training from the plan's first pair"):
        plugin.check_config(_args(tmp_path, 2, 64, 1e-3, auto_find_batch_size=True))
    # (with a curriculum; a plan without one leaves the order, and the last batch, to TRL, as stock)
    curriculum = _plan(small_pairs, tmp_path / "mixdpo.parquet", "mixdpo", {"routing": {"tau": None}})
    with pytest.raises(PerpairError, match=r"dataloader_drop_last=True drops the last incomplete batch of every "
                                           r"epoch: with the plan's order those are the plan's last pairs"):
        _construct(tiny_model, _dataset(small_pairs), curriculum, tmp_path, dataloader_drop_last=True)
    unordered = _plan(small_pairs, tmp_path / "dpo.parquet", "dpo", beta=0.1)
    assert _construct(tiny_model, _dataset(small_pairs), unordered, tmp_path, dataloader_drop_last=True).args \
        .dataloader_drop_last
    with pytest.raises(PerpairError, match=r"dataloader_in_order=False with dataloader_num_workers > 0 yields each "
                                           r"batch when its worker has it ready, not in the plan's order"):
        plugin.check_config(_args(tmp_path, 2, 64, 1e-3, dataloader_num_workers=2, dataloader_in_order=False))
    for options in ({"dataloader_num_workers": 2}, {"dataloader_in_order": False}):  # each alone keeps the order
        plugin.check_config(_args(tmp_path, 2, 64, 1e-3, **options))

    plan = _plan(small_pairs, tmp_path / "plan.parquet", "dpo", beta=0.1)
    split = _construct(tiny_model, _dataset(small_pairs), plan, tmp_path, gradient_accumulation_steps=3,
                       accelerator_config={"split_batches": True})
    whole = _construct(tiny_model, _dataset(small_pairs), plan, tmp_path, gradient_accumulation_steps=3)
    monkeypatch.setattr(type(split.args), "world_size", property(lambda self: 2))  # two processes
    assert split._pairs_per_step() == 2 * 3  # one batch of 2 a micro-step, split between the two
    assert whole._pairs_per_step() == 2 * 3 * 2  # one batch of 2 each


def test_a_tokenized_dataset_is_refused_by_name(small_pairs, tmp_path):
    """A dataset with TRL's token columns only: there is no text to match the plan by. It was refused as if the plan
    were made from other data (or, with plan columns, a zip() traceback)."""
    plan = _plan(small_pairs, tmp_path / "plan.parquet", "dpo", beta=0.1)
    tokenized = _dataset(small_pairs).map(lambda ex: {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]},
                                          remove_columns=["prompt", "chosen", "rejected"])
    carried = tokenized.add_column("beta", [0.1] * 24).add_column("route", ["preference"] * 24)
    carried = carried.add_column("order", list(range(24))).add_column("label_smoothing", [0.0] * 24)
    for dataset, given in ((tokenized, plan), (carried, None)):
        with pytest.raises(PerpairError, match=r"train_dataset has no 'chosen' or 'rejected' column \(it has "
                                               r"prompt_ids, chosen_ids, rejected_ids.*before tokenization"):
            plugin.apply_plan(dataset, given)


def test_a_malformed_row_is_refused_by_row_and_field():
    """A row perpair's reader refuses (a role outside the four): it ended in an AttributeError traceback."""
    row = {"prompt": [{"role": "human", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
           "rejected": [{"role": "assistant", "content": "Go"}]}
    with pytest.raises(PerpairError, match=r"train_dataset row 1, field 'prompt\[0\]\.role': role 'human' is not one"):
        plugin.pair_ids(Dataset.from_list([row]))


def test_plan_columns_of_another_type_are_refused(small_pairs):
    """Plan columns a user made (read from a CSV as text, say): a flipped of "False" flipped every pair, and a
    beta, order or label_smoothing of text ended in a numpy TypeError."""
    dataset = _dataset(small_pairs)
    n = len(dataset)
    columns = {"beta": [0.1] * n, "route": ["preference"] * n, "order": list(range(n)), "label_smoothing": [0.0] * n}

    def carrying(**changed):
        out = dataset
        for name, values in {**columns, **changed}.items():
            out = out.add_column(name, values)
        return out

    assert plugin.apply_plan(carrying(flipped=[False] * n), None)[1].flipped == 0
    for name, values, shown in (("flipped", ["False"] * n, "'False'"), ("beta", ["0.1"] * n, "'0.1'"),
                                ("order", [str(i) for i in range(n)], "'0'"), ("label_smoothing", ["0"] * n, "'0'")):
        with pytest.raises(PerpairError, match=rf"train_dataset: pair \w+ \(row 1\) has {name} {shown}; expected"):
            plugin.apply_plan(carrying(**{name: values}), None)


def test_resume_continues_the_plan_it_stopped_in(small_pairs, tiny_model, tmp_path):
    """A resumed run skips the batches its checkpoint trained: with the same plan it continues where it stopped
    (steps 3 and 4 as in one run); with another plan, or as many steps over other pairs a step, the skipped batches
    would be other pairs, so it is refused (it resumed silently)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = _plan(small_pairs, tmp_path / "plan.parquet", "sp2dpo+mixdpo",
                 {"routing": {"tau": 1.0}, "curriculum": {"kind": "random"}, "label_smoothing": 0.0})
    other = _plan(small_pairs, tmp_path / "other.parquet", "dpo", beta=0.1)
    out = tmp_path / "run"

    def run(plan, batch=2, resume=None, **options):
        trainer = plugin.PerPairDPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_model),
            args=_args(out, batch, 128, 1e-3, max_steps=4, save_strategy="steps", save_steps=2, **options),
            train_dataset=_dataset(small_pairs), processing_class=AutoTokenizer.from_pretrained(tiny_model), plan=plan)
        trainer.train(resume_from_checkpoint=resume)
        return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}

    whole = run(plan)
    checkpoint = out / "checkpoint-2"
    assert run(plan, resume=str(checkpoint)) == pytest.approx(whole, rel=1e-6)
    with pytest.raises(PerpairError, match=r"checkpoint .*checkpoint-2 was trained on other pairs or another plan"):
        run(other, resume=str(checkpoint))
    with pytest.raises(PerpairError, match=r"checkpoint .*checkpoint-2 trained 2 pairs a step, this run 4"):
        run(plan, batch=4, resume=str(checkpoint))
    stock = tmp_path / "stock-checkpoint"
    shutil.copytree(checkpoint, stock)
    (stock / plugin.PLAN_RECORD).unlink()
    with pytest.raises(PerpairError, match=r"has no perpair_plan.json: it was not saved by PerPairDPOTrainer"):
        run(plan, resume=str(stock))
    with pytest.raises(ValueError, match=r"Can't find a valid checkpoint at"):  # Transformers' own message
        run(plan, resume=str(tmp_path / "no-such-checkpoint"))


def test_evaluate_refuses_plan_columns_as_construction_does(small_pairs, tiny_model, tmp_path):
    """A dataset with plan columns given to evaluate() later: its β went unread as silently as the one refused at
    construction would have."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dataset = _dataset(small_pairs)
    trainer = plugin.PerPairDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model),
                                       args=_args(tmp_path, 2, 256, 1e-3), train_dataset=dataset,
                                       processing_class=AutoTokenizer.from_pretrained(tiny_model),
                                       plan=_plan(small_pairs, tmp_path / "plan.parquet", "dpo", beta=0.1))
    held_out = dataset.select([5, 7])  # two short pairs
    with pytest.raises(PerpairError, match=r"eval_dataset carries plan columns \(beta\), which evaluation does not"):
        trainer.evaluate(held_out.add_column("beta", [0.5, 0.5]))
    with pytest.raises(PerpairError, match=r"probe carries plan columns \(route\)"):
        trainer.evaluate({"probe": held_out.add_column("route", ["sft", "sft"])})
    # the planned training dataset, with the columns the plug-in added: scored with DPOConfig.beta, silently
    with pytest.raises(PerpairError, match=r"eval_dataset carries plan columns \(perpair_beta, perpair_sft, "
                                           r"perpair_label_smoothing, perpair_pair_id\), which evaluation does not"):
        trainer.evaluate(trainer.train_dataset)
    assert "eval_loss" in trainer.evaluate(held_out)


@pytest.mark.skipif(not HH_TEST.exists(), reason=NO_DATA)
def test_hh_rlhf_transcripts_match_the_pairs_prepare_made(tmp_path):
    """TRL reads HH-RLHF's transcripts with an implicit prompt; the plug-in parses them as prepare does, so a plan
    made from prepare's pairs finds every row."""
    rows = [json.loads(line) for line in gzip.open(HH_TEST, "rt")][:40]
    source = tmp_path / "hh.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prepare([str(source)], tmp_path / "pairs.parquet")
    table, _ = read_pairs(str(tmp_path / "pairs.parquet"))
    kept = set(table.column("pair_id").to_pylist())
    ids = plugin.pair_ids(Dataset.from_list(rows))
    assert len(kept) > 30 and kept <= set(ids)
    assert [ids[row - 1] for row in table.column("source_row").to_pylist()] == table.column("pair_id").to_pylist()


def test_rows_prepare_leaves_out_are_named_as_such(uf_pairs, tmp_path):
    """The raw data the plan's pairs were prepared from: a row prepare leaves out (identical responses) was
    reported as if the plan were made from other data."""
    rows = [json.loads(line) for line in gzip.open(UF_TRAIN, "rt")][300:310]
    source = tmp_path / "uf.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prepare([str(source)], tmp_path / "pairs.parquet")
    assert len(read_pairs(str(tmp_path / "pairs.parquet"))[0]) == 9  # row 7 (306 of the file) is left out
    plan = _plan(tmp_path / "pairs.parquet", tmp_path / "plan.parquet", "dpo", beta=0.1)
    with pytest.raises(PerpairError, match=r"\(train_dataset row 7\) is not in plan .*: chosen and rejected are "
                                           r"identical, a pair perpair prepare leaves out.*\(1 such row\(s\)\)"):
        plugin.apply_plan(Dataset.from_list(rows), plan)


@pytest.mark.skipif(not HH_TEST.exists(), reason=NO_DATA)
def test_hh_rlhf_transcripts_that_diverge_are_refused_by_row(small_pairs, tmp_path):
    """HH-RLHF rows whose transcripts differ before the last turn (5 of the harmless test split) have no pair_id:
    the plug-in ended in a Degenerate traceback."""
    rows = [json.loads(line) for line in gzip.open(HH_TEST, "rt")][1250:1256]
    plan = _plan(small_pairs, tmp_path / "plan.parquet", "dpo", beta=0.1)
    with pytest.raises(PerpairError, match=r"train_dataset row 5: the two transcripts differ before the final "
                                           r"Assistant turn, a pair perpair prepare leaves out"):
        plugin.apply_plan(Dataset.from_list(rows), plan)


def test_a_training_batch_without_plan_values_is_refused(small_pairs, tiny_model, tmp_path):
    """A training dataset swapped in after construction (here: the planned one without its plan columns) trained
    with DPOConfig.beta, as stock TRL, without a word."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = plugin.PerPairDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model),
                                       args=_args(tmp_path, 2, 128, 1e-3, max_steps=1),
                                       train_dataset=_dataset(small_pairs),
                                       processing_class=AutoTokenizer.from_pretrained(tiny_model),
                                       plan=_plan(small_pairs, tmp_path / "plan.parquet", "dpo", beta=0.3))
    trainer.train_dataset = trainer.train_dataset.remove_columns([plugin.BETA, plugin.SFT, plugin.EPS])
    with pytest.raises(PerpairError, match=r"a training batch carries no plan values: the training dataset was "):
        trainer.train()


def test_a_dpoconfig_beta_that_no_step_reads_is_refused(small_pairs, tiny_model, tmp_path):
    """DPOConfig.beta beside a plan: training reads each pair's β_i and only evaluation reads DPOConfig.beta, so with
    no eval_dataset a β of 0.5 trained with the plan's β without a word (``perpair train`` refuses --beta beside a
    plan). With an eval_dataset it is the β evaluation scores with; equal to the plan's β it contradicts nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = _plan(small_pairs, tmp_path / "plan.parquet", "dpo", beta=0.3)
    dataset = _dataset(small_pairs)
    with pytest.raises(PerpairError, match=r"DPOConfig.beta = 0.5 would change nothing: the plan gives every "
                                           r"preference pair its own β \(0.3\).*no eval_dataset.*TRL's default "
                                           r"0.1"):
        _construct(tiny_model, dataset, plan, tmp_path, beta=0.5)
    assert _construct(tiny_model, dataset, plan, tmp_path, beta=0.3).beta == 0.3
    # with an evaluation set DPOConfig.beta is read there: taken, and said to differ from the training β
    with pytest.warns(UserWarning, match=r"evaluation scores every pair with DPOConfig.beta = 0.5, training with the "
                                         r"plan's β \(0.3\): eval_loss and eval_rewards/\* are on another scale"):
        trainer = plugin.PerPairDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model),
                                           args=_args(tmp_path, 2, 64, 1e-3, beta=0.5), train_dataset=dataset,
                                           eval_dataset=dataset.select([5, 7]),
                                           processing_class=AutoTokenizer.from_pretrained(tiny_model), plan=plan)
    assert trainer.beta == 0.5 and set(trainer.train_dataset[plugin.BETA]) == {0.3}


def test_a_training_dataset_reordered_after_construction_is_refused(small_pairs, tiny_model, tmp_path):
    """``trainer.train_dataset`` shuffled after the plan was applied: each pair kept its β, but the sequential sampler
    read the shuffled rows, so the plan's curriculum was replaced without a word. A select that keeps the plan's
    order trains."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plan = _plan(small_pairs, tmp_path / "plan.parquet", "sp2dpo+mixdpo",
                 {"routing": {"tau": 1.0}, "curriculum": {"kind": "random"}, "label_smoothing": 0.0})
    trainer = plugin.PerPairDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model),
                                       args=_args(tmp_path, 2, 128, 1e-3, max_steps=1),
                                       train_dataset=_dataset(small_pairs),
                                       processing_class=AutoTokenizer.from_pretrained(tiny_model), plan=plan)
    planned = trainer.train_dataset
    trainer.train_dataset = planned.shuffle(seed=0)
    assert trainer.train_dataset[plugin.PAIR] != planned[plugin.PAIR]
    with pytest.raises(PerpairError, match=r"trainer.train_dataset was reordered after PerPairDPOTrainer applied the "
                                           r"plan: row \d+ holds pair \w+, which the plan's order puts before pair"):
        trainer.train()
    assert trainer.state.global_step == 0
    # without the pair ids the shuffle could not be seen: it trained the shuffled pairs
    trainer.train_dataset = planned.remove_columns([plugin.PAIR]).shuffle(seed=0)
    with pytest.raises(PerpairError, match=r"trainer.train_dataset keeps perpair_beta, perpair_sft, "
                                           r"perpair_label_smoothing but lacks perpair_pair_id, which "
                                           r"PerPairDPOTrainer added with the plan .* keep all of perpair_pair_id, "):
        trainer.train()
    assert trainer.state.global_step == 0
    trainer.train_dataset = planned.select(range(1, len(planned), 2))  # every other pair, in the plan's order
    trainer.train()
    assert trainer.state.global_step == 1


def test_collator_leaves_unplanned_batches_to_trl():
    """Evaluation batches carry no plan columns: TRL's collator output, unchanged; planned ones get the tensors."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    inner = DataCollatorForPreference(pad_token_id=0)
    examples = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
                {"prompt_ids": [6], "chosen_ids": [7, 8], "rejected_ids": [9]}]
    collator = plugin.PlanCollator(inner)
    plain = collator(examples)
    assert set(plain) == set(inner(examples)) and all((plain[k] == inner(examples)[k]).all() for k in plain)
    planned = collator([{**ex, plugin.BETA: b, plugin.SFT: s, plugin.EPS: 0.0}
                        for ex, b, s in zip(examples, [0.1, 0.3], [False, True], strict=True)])
    assert plugin._floats(planned[plugin.BETA]).tolist() == pytest.approx([0.1, 0.3])
    assert planned[plugin.SFT].tolist() == [False, True]
    assert (planned["input_ids"] == plain["input_ids"]).all()


def test_version_check_range():
    plugin.check_trl_version("1.16.0")
    plugin.check_trl_version("1.16.3")
    plugin.check_trl_version("1.16.4.dev0")  # a development build of 1.16.x: inside >=1.16,<1.17, as pip reads it
    # pre-releases of 1.17 (TRL's main branch) sort below 1.17, but pip's <1.17 excludes them
    for bad in ("1.15.2", "1.16.0rc1", "1.17.0.dev0", "1.17.0rc1", "1.17.0", "2.0.0"):
        with pytest.raises(PerpairError, match=f"found trl {bad}"):
            plugin.check_trl_version(bad)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pairs file", "TRL implicit prompt"])
def test_example_script_runs(small_pairs, tiny_model, tmp_path, layout):
    """The example in examples/trl runs end to end (a few steps), typed as its docstring says: without --cpu,
    which it needed on a machine without a GPU (Transformers refused its bf16 there); on the pairs file with its
    default model (SmolLM2), and on a TRL dataset of the same pairs with an implicit prompt (conversational
    chosen/rejected only), which the example read as prompt/chosen/rejected columns and stopped on with a pyarrow
    traceback (reading the data does not depend on the model: a tiny one, SmolLM2's tokenizer and template)."""
    plan = _plan(small_pairs, tmp_path / "plan.parquet", "mixdpo", {"routing": {"tau": 1.0}})  # ε 0.1, as documented
    data, model = small_pairs, []
    if layout == "TRL implicit prompt":
        rows = read_pairs(str(small_pairs))[0].to_pylist()
        data = tmp_path / "implicit.parquet"
        Dataset.from_list([{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                           for r in rows]).to_parquet(str(data))
        model = ["--model", str(tiny_model)]
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "trl" / "train_dpo.py"), "--pairs",
                             str(data), "--plan", str(plan), "--output-dir", str(out),
                             "--max-steps", "2", "--max-length", "96", *model], capture_output=True, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    steps = [h for h in logs if "route/sft_share" in h]
    assert len(steps) == 2 and all(h["loss"] == h["loss"] for h in steps)  # finite, not NaN
