"""Parity with TRL's DPOTrainer on SmolLM2-135M-Instruct: same 3 batches in the same order, same optimizer."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from perpair.data import read_pairs
from perpair.models import resolve_model

STEPS, BATCH, MAX_LENGTH, LR, BETA = 3, 2, 128, 1e-6, 0.1


def _trl_run(pairs_path, out_dir) -> list[dict]:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class SequentialDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):  # the pairs in file order, like perpair without a plan
            return SequentialSampler(self.train_dataset)

    table, _ = read_pairs(str(pairs_path))
    rows = table.select(["prompt", "chosen", "rejected"]).slice(0, 60).to_pylist()
    model_dir = resolve_model("smollm2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(output_dir=str(out_dir), per_device_train_batch_size=BATCH, max_steps=STEPS,
                     learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                     report_to=[], save_strategy="no", max_length=MAX_LENGTH, beta=BETA, seed=0, use_cpu=True,
                     dataloader_num_workers=0, bf16=False, disable_tqdm=True)
    trainer = SequentialDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                   processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
    return [h for h in trainer.state.log_history if "logps/chosen" in h]


@pytest.mark.slow
def test_three_steps_match_trl(uf_pairs, tmp_path):
    trl_logs = _trl_run(uf_pairs, tmp_path / "trl")
    run_cli("train", "--model", "smollm2", "--data", uf_pairs, "--steps", STEPS, "--batch-size", BATCH,
            "--max-length", MAX_LENGTH, "--beta", BETA, "--lr", LR, "--lr-schedule", "constant",
            "--out", tmp_path / "ours", "--set", f"reference_cache={tmp_path / 'cache'}", "--set", "save_model=false")
    ours = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    assert len(ours) == len(trl_logs) == STEPS
    for mine, theirs in zip(ours, trl_logs, strict=True):
        assert mine["logps_chosen"] == pytest.approx(theirs["logps/chosen"], rel=1e-3)
        assert mine["logps_rejected"] == pytest.approx(theirs["logps/rejected"], rel=1e-3)
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
        assert mine["reward_accuracy"] == pytest.approx(theirs["rewards/accuracies"], abs=1e-6)
