"""perpair.onednn: linear layers prepacked for oneDNN compute what the plain layers compute, only where they may."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import save_tiny_llama, tiny_llama
from perpair import onednn
from perpair.onednn import PackedLinear, pack_linears, supported, unpack_linears

pytestmark = pytest.mark.skipif(not supported(torch.float32),
                                reason="this PyTorch build has no prepacked oneDNN linear")
BF16 = pytest.mark.skipif(not supported(torch.bfloat16), reason="no oneDNN bfloat16 on this CPU")


def linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def ids(rows: int = 2, length: int = 19) -> torch.Tensor:
    return torch.randint(0, 1000, (rows, length), generator=torch.Generator().manual_seed(1))


def test_a_packed_model_computes_the_plain_models_logits_and_unpacks_to_the_same_module():
    model, _ = tiny_llama(hidden=64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(ids()).logits
    count = pack_linears(model, rows=8)
    assert count == len(linears(model)) == 2 * 7 + 1  # every projection of both layers and the output layer
    assert all(type(m) is PackedLinear for m in linears(model))
    with torch.no_grad():
        packed = model(ids()).logits
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    assert model.state_dict().keys() == state.keys()
    unpack_linears(model)
    assert all(type(m) is nn.Linear and not hasattr(m, "_packs") for m in linears(model))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_packed_product_is_the_one_that_runs_without_gradients_and_not_with_them(monkeypatch):
    model, _ = tiny_llama(hidden=64)
    pack_linears(model)
    calls = []
    real = onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        model(ids())
    assert len(calls) == 2 * 7 + 1
    calls.clear()
    model(ids()).logits.sum().backward()  # parameters that want gradients: the layers' own forward, autograd's
    assert not calls
    packed_grads = [m.weight.grad.clone() for m in linears(model)]
    unpack_linears(model)
    model.zero_grad()
    model(ids()).logits.sum().backward()
    for got, want in zip(packed_grads, (m.weight.grad for m in linears(model)), strict=True):
        torch.testing.assert_close(got, want)


def test_a_weight_changed_in_place_is_packed_again():
    layer = nn.Linear(48, 40)
    model = nn.Sequential(layer)
    pack_linears(model)
    x = torch.randn(5, 48)
    with torch.no_grad():
        before = model(x)
        layer.weight.mul_(2)
        after = model(x)
        torch.testing.assert_close(after, nn.functional.linear(x, layer.weight, layer.bias))
    assert not torch.allclose(before, after)


def test_inputs_plain_linear_refuses_are_refused_the_same_way():
    model = nn.Sequential(nn.Linear(16, 8)).to(torch.float64)  # float64: not a dtype oneDNN packs
    assert pack_linears(model) == 0 and type(model[0]) is nn.Linear
    model = nn.Sequential(nn.Linear(16, 8))
    pack_linears(model)
    with torch.no_grad(), pytest.raises(RuntimeError):  # F.linear's dtype error, not a silent cast
        model(torch.randn(3, 16, dtype=torch.float64))


@BF16
def test_under_autocast_a_packed_float32_model_computes_what_autocast_computes():
    model, _ = tiny_llama(hidden=64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(ids()).logits
    assert pack_linears(model, dtype=torch.bfloat16) == 2 * 7 + 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = model(ids()).logits
    assert packed.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(packed.float(), plain.float(), rtol=2e-2, atol=2e-2)
    assert [list(m._packs) for m in linears(model)] == [[torch.bfloat16]] * len(linears(model))


@BF16
def test_greedy_generation_gives_the_same_answers_packed():
    model, tokenizer = tiny_llama(hidden=64)
    model = model.to(torch.bfloat16)
    prompt = ids(rows=3, length=7)

    def generate():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)

    plain = generate()
    pack_linears(model, rows=3)
    assert torch.equal(generate(), plain)


def test_nothing_is_packed_when_the_copies_would_not_fit_in_memory(monkeypatch):
    model, _ = tiny_llama(hidden=64)
    monkeypatch.setattr(onednn, "available_memory", lambda: 1000)
    assert pack_linears(model) == 0
    assert not any(type(m) is PackedLinear for m in model.modules())


def test_completion_logps_project_the_output_layer_packed_and_equal_the_plain_ones(monkeypatch):
    from perpair.train import logprobs
    from perpair.train.logprobs import logps_of_tokenized
    from perpair.train.tokenize import TokenizedPair

    model, _ = tiny_llama(hidden=64)
    g = torch.Generator().manual_seed(3)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, 1000, (n,), generator=g).tolist()

    pairs = [TokenizedPair(prompt=tokens(p), chosen=tokens(c), rejected=tokens(r))
             for p, c, r in [(7, 30, 20), (12, 9, 300), (4, 11, 13)]]  # 300: more than one 256-row chunk
    plain, counts = logps_of_tokenized(model, pairs, tokens_per_forward=1024)
    pack_linears(model)
    heads = []
    real = onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda x, w, b=None: heads.append(w.shape) or real(x, w, b))
    # only the forward's products counted, not those of the wrapper's checks of the model (a few short forwards)
    monkeypatch.setattr(logprobs, "_check_packing", lambda model: None)
    monkeypatch.setattr(logprobs, "logit_multiplier", lambda model: None)
    packed, packed_counts = logps_of_tokenized(model, pairs, tokens_per_forward=1024)
    assert torch.equal(counts, packed_counts)
    torch.testing.assert_close(packed, plain, rtol=1e-6, atol=1e-4)
    assert len(heads) == 2 * 7 + 2  # the body's layers, and the output layer's two chunks of completion rows


def test_the_inference_stages_load_their_models_packed(tmp_path):
    from perpair.eval.generate import GenerationConfig, TransformersGenerator
    from perpair.eval.judges import LocalLogprobJudge
    from perpair.eval.preference import _load

    folder = save_tiny_llama(tmp_path / "model", hidden=32)
    evaluated, _ = _load(str(folder))
    judge = LocalLogprobJudge(str(folder), dtype="float32")
    generator = TransformersGenerator(str(folder), GenerationConfig(dtype="float32"))
    for model in (evaluated, judge.scorer.model, generator.model):
        assert {type(m) for m in linears(model)} == {PackedLinear}


@pytest.fixture
def bf16_units(monkeypatch):
    """Sets whether this CPU has bfloat16 units, as PyTorch's probes report them."""
    def set_units(units: bool) -> None:
        monkeypatch.setattr(onednn.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: units)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        monkeypatch.setattr(onednn, "_NOTED", set())
        onednn.bf16_units.cache_clear()

    yield set_units
    onednn.bf16_units.cache_clear()


@pytest.mark.parametrize("units", [False, True])
def test_bfloat16_on_a_cpu_without_its_units_is_noted_by_each_stage_that_computes_in_it(units, bf16_units, tmp_path,
                                                                                         capsys):
    """Without bfloat16 units (an AVX2 CPU) bfloat16 products are emulated, several times slower than float32 (the
    demo's teacher 6.2x): a stage asked to compute in bfloat16 there said nothing of it. Now training, the local
    teacher, the local judge and generation each say so, naming the setting that computes in float32; on a CPU
    with the units, and in float32, nothing is said."""
    from perpair.annotate.config import LocalTeacherConfig
    from perpair.annotate.teachers import LocalTeacher
    from perpair.eval.generate import GenerationConfig, TransformersGenerator
    from perpair.eval.judges import LocalLogprobJudge
    from perpair.train import load_config
    from perpair.train.setup import setup_accelerator

    bf16_units(units)
    folder = save_tiny_llama(tmp_path / "model", hidden=32)
    for dtype in ("float32", "bfloat16"):
        LocalTeacher(LocalTeacherConfig(model=str(folder), dtype=dtype))._load()
        LocalLogprobJudge(str(folder), dtype=dtype).scorer  # noqa: B018 - loads the model
        TransformersGenerator(str(folder), GenerationConfig(dtype=dtype))
        precision = "fp32" if dtype == "float32" else "bf16"
        setup_accelerator(load_config(None, {"model": str(folder), "data": str(tmp_path / "pairs.parquet"),
                                             "out": str(tmp_path / "out"), "precision": precision}))
        notes = [line for line in capsys.readouterr().err.splitlines() if "bfloat16 units" in line]
        if units or dtype == "float32":
            assert notes == []
            continue
        tail = ("computes in bfloat16 on a CPU without bfloat16 units (AVX512-BF16 or AMX), where its products are "
                "emulated, several times slower than in float32 (6x for the demo's local teacher on an AVX2 CPU); ")
        assert notes == [f"note: the local teacher {folder} {tail}its dtype: float32 is faster here",
                         f"note: the local judge {folder} {tail}the judge's dtype float32 is faster here",
                         f"note: generation with {folder} {tail}dtype float32 is faster here",
                         f"note: training (precision bf16) {tail}precision: fp32 is faster here"]
    LocalLogprobJudge(str(folder), dtype="bfloat16").scorer  # noqa: B018 - another arm's judge: said once
    assert "bfloat16 units" not in capsys.readouterr().err


def test_bfloat16_units_are_not_judged_off_x86(bf16_units, monkeypatch):
    """The probes read x86 features: on an ARM CPU with bfloat16 instructions (Graviton 3) they say no, and a note
    would call it emulated."""
    bf16_units(False)
    assert not onednn.bf16_units()
    monkeypatch.setattr(onednn.platform, "machine", lambda: "aarch64")
    onednn.bf16_units.cache_clear()
    assert onednn.bf16_units() and onednn.emulated_bf16_note("training", "precision: fp32") is None
