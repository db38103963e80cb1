from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
UF_TRAIN = SHARED_DATA / "ultrafeedback" / "train_1k.jsonl.gz"
HH_TEST = SHARED_DATA / "hh_rlhf" / "harmless_base_test.jsonl.gz"
ORCA = SHARED_DATA / "orca_dpo" / "validation_284.jsonl.gz"


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``perpair`` as a user would, in a fresh process."""
    result = subprocess.run([sys.executable, "-m", "perpair", *map(str, args)], capture_output=True,
                            text=True, env={**os.environ, "COLUMNS": "200"})
    if check and result.returncode != 0:
        raise AssertionError(f"perpair {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def tiny_llama(*, seed: int = 0, hidden: int = 32, layers: int = 2, max_positions: int = 2048):
    """A randomly initialised Llama with SmolLM2's tokenizer and chat template, for fast tests:
    ``(model in eval mode, tokenizer)``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from perpair.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def save_tiny_llama(path: Path, **options) -> Path:
    """``tiny_llama`` saved as a model folder (weights, config, tokenizer) at ``path``."""
    model, tokenizer = tiny_llama(**options)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def uf_pairs(tmp_path_factory) -> Path:
    """The UltraFeedback sample prepared once per test session."""
    path = tmp_path_factory.mktemp("uf") / "uf.parquet"
    run_cli("prepare", UF_TRAIN, "-o", path)
    return path
