"""Lean activations where training runs them: under bf16 autocast (every GPU run), under LoRA adapters, and
scoped (the patches are undone after ``applied`` and after ``train``)."""

from __future__ import annotations

import copy

import pytest
import torch

from perpair.train.lean import applied, lean_activations, lean_patches
from perpair.train.logprobs import CompletionLogps, pack, run_packed
from perpair.train.tokenize import TokenizedPair

PAIRS = [TokenizedPair([1, 2, 3, 4], [5, 6, 7], [8, 9]), TokenizedPair([10, 11], [12], [13, 14, 15, 16])]
WEIGHTS = torch.tensor([[1.0, -2.0], [0.5, 3.0]])


def _llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(dtype)


def _saving(fn, autocast: bool):
    """``fn()`` under bf16 autocast or not, and the bytes autograd saved for the backward (each tensor once)."""
    saved = {}

    def keep(tensor):
        saved[tensor.untyped_storage().data_ptr(), tensor.dtype] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return fn(), sum(saved.values())


def _sums_grads_saved(model, autocast: bool):
    """Summed log-probs, every trainable parameter's gradient, and the bytes autograd saved for the backward."""
    (sums, _), saved = _saving(lambda: run_packed(CompletionLogps(model, chunk_size=4), pack(PAIRS),
                                                  torch.device("cpu")), autocast)
    (sums * WEIGHTS.to(sums.dtype)).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return sums.detach(), grads, saved


@pytest.mark.parametrize("recompute_mlp", [False, True])
def test_under_bf16_autocast_lean_equals_plain_and_saves_less(recompute_mlp):
    """Under autocast the lean modules run (they used to hand over to the plain forward there, saving nothing):
    each module's output has the plain one's dtype and values, and a packed forward + backward gives the plain
    model's log-probs and gradients up to bfloat16 rounding while autograd keeps fewer bytes."""
    plain = _llama()
    lean = copy.deepcopy(plain)
    assert sum(lean_activations(lean, recompute_mlp).counts().values()) == 7
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    for name in ("model.layers.0.mlp", "model.layers.0.input_layernorm"):
        a, plain_bytes = _saving(lambda name=name: plain.get_submodule(name)(x), autocast=True)
        b, lean_bytes = _saving(lambda name=name: lean.get_submodule(name)(x), autocast=True)
        assert a.dtype == b.dtype, name
        assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2), name
        assert lean_bytes < plain_bytes, (name, lean_bytes, plain_bytes)
    expected, expected_grads, plain_bytes = _sums_grads_saved(plain, autocast=True)
    sums, grads, lean_bytes = _sums_grads_saved(lean, autocast=True)
    assert torch.allclose(sums, expected, rtol=1e-2, atol=5e-2), (sums, expected)
    for name, grad in grads.items():
        scale = expected_grads[name].abs().max()
        assert (grad - expected_grads[name]).abs().max() <= 3e-2 * scale + 1e-6, name
    assert lean_bytes < 0.95 * plain_bytes, (lean_bytes, plain_bytes)


@pytest.mark.parametrize(("targets", "counts"), [
    # adapted down projections: MLPs left alone; every adapted layer (7 a layer) one LoraLinear
    ("all-linear", {"mlp": 0, "mlp_recomputed": 0, "norm": 5, "lora": 14}),
    (["gate_proj", "up_proj"], {"mlp": 2, "mlp_recomputed": 0, "norm": 5, "lora": 4}),  # no recomputation through
    (["q_proj", "v_proj"], {"mlp": 0, "mlp_recomputed": 2, "norm": 5, "lora": 4}),  # adapters; plain MLPs: lean
])
def test_under_lora_lean_equals_plain_adapters(targets, counts, tmp_path):
    """``prepare_policy`` with LoRA patches what it can once the adapters are in (it used to patch nothing under
    LoRA, silently) and reports it; log-probs and every adapter's gradient equal those of the same adapters
    without lean activations (float64)."""
    from perpair.train.config import load_config
    from perpair.train.setup import prepare_policy

    base = _llama(torch.float64)
    results = []
    for lean in (True, False):
        config = load_config(None, {"model": "x", "data": "x", "out": str(tmp_path), "steps": 1,
                                    "lora": {"r": 4, "target_modules": targets}, "lean_activations": lean})
        model = prepare_policy(config, copy.deepcopy(base), single_process=True)
        assert lean_patches(model).counts() == (counts if lean else dict.fromkeys(counts, 0))
        torch.manual_seed(1)  # adapters away from their zero start, the same in both models
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        results.append(_sums_grads_saved(model, autocast=False))
    (sums, grads, _), (expected, expected_grads, _) = results
    assert grads and all("lora_" in name for name in grads)
    assert torch.allclose(sums, expected, atol=1e-10)
    for name, grad in grads.items():
        # Llama's RMSNorm computes in float32 even in a float64 model: float32 rounding differences
        assert torch.allclose(grad, expected_grads[name], rtol=1e-5, atol=1e-6), name


def test_applied_undoes_the_patches_even_on_error():
    model = _llama()
    mlp = model.model.layers[0].mlp
    own = type(mlp).forward
    with pytest.raises(RuntimeError, match="inside"), applied(model) as patches:
        assert sum(patches.counts().values()) == 7 and mlp.forward.__func__ is not own
        raise RuntimeError("inside")
    assert not lean_patches(model).modules
    assert all("forward" not in vars(m) and not any(k.startswith(("_lean", "_plain")) for k in vars(m))
               for m in model.modules())
    assert mlp.forward.__func__ is own


def test_train_under_lora_reports_the_patched_modules_and_undoes_them(tmp_path, monkeypatch):
    """``perpair train --lora`` (adapters on every linear layer, so on the MLPs' down projections): its log says
    which modules ran lean, summary.json records them, and the model has its own forwards and attention back at
    the end (run in this process to see the model)."""
    import json

    from typer.testing import CliRunner

    from conftest import UF_TRAIN, save_tiny_llama
    from perpair.cli import app
    from perpair.train import loop

    models = []
    load = loop.load_model
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: models.append(load(*a, **k)) or models[-1])
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "train", "--model", str(save_tiny_llama(tmp_path / "model")), "--data", str(UF_TRAIN), "--out", str(out),
        "--steps", "1", "--batch-size", "1", "--max-length", "48", "--threads", "1", "--lora",
        "--set", "lora.r=4", "--set", f"reference_cache={tmp_path / 'cache'}", "--set", "save_model=false",
        "--set", "final_checkpoint=false"])
    assert result.exit_code == 0, result.output
    assert "lean activations: 5 norm, 14 lora" in result.output
    assert json.loads((out / "summary.json").read_text())["lean_activations"] == {"mlp": 0, "mlp_recomputed": 0,
                                                                                  "norm": 5, "lora": 14}
    (model,) = models
    assert not lean_patches(model).modules
    assert all("forward" not in vars(m) for m in model.modules())
    assert not model.config._attn_implementation.startswith("perpair_tree")  # its own attention again


def test_kept_mlp_bytes_is_what_recomputing_saves():
    """The estimate behind recompute_mlp's default: the bytes autograd keeps with the MLPs saving gate and up,
    less those it keeps with them recomputed, measured in a forward + backward of 37 tokens."""
    from perpair.train.lean import kept_mlp_bytes

    plain = _llama()
    ids = torch.randint(0, 50, (1, 37), generator=torch.Generator().manual_seed(2))
    saved = {}
    for recompute in (False, True):
        model = copy.deepcopy(plain)
        assert lean_activations(model, recompute).counts()["mlp_recomputed" if recompute else "mlp"] == 2
        _, saved[recompute] = _saving(lambda model=model: model(ids).logits, autocast=False)
    assert saved[False] - saved[True] == kept_mlp_bytes(plain, 37, 4) > 0


@pytest.mark.parametrize(("update", "recomputed"), [
    # 21,792 parameters in float32 trained with AdamW hold 16 × 21,792 = 348,672 bytes; 10% is 34,867. Gate and up
    # of 2 layers × 64 wide keep 1,024 bytes a token; the longest forward is the default 4 × max_length tokens.
    ({"max_length": 8}, False),  # 32 tokens: 32,768 bytes, kept
    ({"max_length": 9}, True),  # 36 tokens: 36,864 bytes, recomputed
    ({"max_length": 17, "tokens_per_forward": 0}, False),  # one pair per forward: at most 2 × 17 = 34 tokens
    ({"max_length": 17, "tokens_per_forward": 36}, True),  # a longer packing budget counts
    ({"max_length": 9, "recompute_mlp": False}, False),  # set: as set
    ({"max_length": 8, "recompute_mlp": True}, True),
])
def test_recompute_mlp_default_is_chosen_by_memory(update, recomputed, tmp_path):
    from perpair.train.config import load_config
    from perpair.train.setup import prepare_policy

    model = _llama()
    assert sum(p.numel() for p in model.parameters()) == 21_792
    config = load_config(None, {"model": "x", "data": "x", "out": str(tmp_path), "steps": 1, **update})
    model = prepare_policy(config, model, single_process=True)
    assert lean_patches(model).counts()["mlp_recomputed" if recomputed else "mlp"] == 2


def _lora(model, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():  # adapters away from their zero start: their products count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def test_lora_linear_under_bf16_autocast_equals_peft():
    """Under autocast every adapted layer runs as one LoraLinear in bfloat16 (its input cast once, not once by the
    frozen layer and once by the adapter): the log-probs and each adapter's gradient are PEFT's up to bfloat16
    rounding. (The float64 equality is test_under_lora_lean_equals_plain_adapters.)"""
    plain = _lora(_llama())
    lean = copy.deepcopy(plain)
    assert lean_activations(lean).counts()["lora"] == 14
    expected, expected_grads, _ = _sums_grads_saved(plain, autocast=True)
    sums, grads, _ = _sums_grads_saved(lean, autocast=True)
    assert torch.allclose(sums, expected, rtol=1e-2, atol=5e-2), (sums, expected)
    assert expected_grads.keys() == grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name  # the adapters stay float32
        scale = expected_grads[name].abs().max()
        assert (grad - expected_grads[name]).abs().max() <= 3e-2 * scale + 1e-6, name


def test_lora_linear_hands_over_to_peft_when_the_adapter_is_not_plain():
    """An adapter with dropout is not patched; a patched layer whose adapter is merged (or disabled) later runs
    PEFT's own forward, so the adapter is never applied twice or skipped."""
    assert lean_activations(_lora(_llama(), dropout=0.1)).counts()["lora"] == 0
    model = _lora(_llama(torch.float64))
    lean_activations(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32, dtype=torch.float64)
    before = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), before) and torch.allclose(layer(x), layer.base_layer(x))
    layer.unmerge()
    with model.disable_adapter():
        assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.allclose(layer(x), before, rtol=0, atol=1e-12)


def test_lora_setup_shows_no_dependency_notice(tmp_path):
    """PEFT 0.21 reads a property Transformers 5 renamed; the FutureWarning it triggers was printed once per trained
    arm of `make demo`, addressed to PEFT's authors, not to our user."""
    import warnings

    from perpair.train.config import load_config
    from perpair.train.setup import prepare_policy

    config = load_config(None, {"model": "x", "data": "x", "out": str(tmp_path), "steps": 1, "lora": {"r": 4}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_policy(config, _llama(), single_process=True)
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
