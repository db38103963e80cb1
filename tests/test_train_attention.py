"""The GPU path of tree attention (one SDPA call per block with a lower-right causal bias, no mask) against the
reference with explicit masks, and which path a call takes. Runs on a CPU: SDPA applies the bias there too."""

from __future__ import annotations

import pytest
import torch

from perpair.train import attention
from perpair.train.attention import tree_attention_masked, tree_attention_sdpa
from perpair.train.logprobs import CompletionLogps, pack, run_packed
from perpair.train.tokenize import TokenizedPair

# a shared prompt, a pair without a prompt, a pair without a rejected response
PAIRS = [TokenizedPair([1, 2, 3, 4, 5], [5, 6, 7], [8, 9, 10, 11]), TokenizedPair([], [12, 13], [14]),
         TokenizedPair([3, 3], [4, 4, 4], [])]


def _outputs_and_grads(attention, q, k, v, layout, weights):
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*inputs, layout, scaling=0.3)
    (out.float() * weights).sum().backward()
    return [out.detach()] + [t.grad for t in inputs]


@pytest.mark.parametrize("kv_heads", [6, 2])  # 2: grouped-query attention, three query heads per key/value head
def test_bias_path_equals_masked_blocks_in_float64(kv_heads):
    """Outputs and query/key/value gradients of the mask-free path equal one masked SDPA call per block."""
    layout = pack(PAIRS).layout
    length = layout.blocks[-1].queries[1]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, 8, dtype=torch.float64, generator=generator)
               for heads in (6, kv_heads, kv_heads))
    weights = torch.randn(1, length, 6, 8, dtype=torch.float64, generator=generator)
    got = _outputs_and_grads(tree_attention_sdpa, q, k, v, layout, weights)
    expected = _outputs_and_grads(tree_attention_masked, q, k, v, layout, weights)
    for a, b in zip(got, expected, strict=True):
        assert (a - b).abs().max() <= 1e-10


def test_bias_path_in_bfloat16_shares_key_heads_and_matches_float64():
    """In half precision the grouped key/value heads go to SDPA as they are (flash attention shares them); the
    result is the float64 reference's up to bfloat16 rounding, as close as the masked path in bfloat16 is."""
    layout = pack(PAIRS).layout
    length = layout.blocks[-1].queries[1]
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, length, 16, dtype=torch.float64, generator=generator) for heads in (4, 2, 2))
    weights = torch.randn(1, length, 4, 16, dtype=torch.float64, generator=generator)
    exact = _outputs_and_grads(tree_attention_masked, q, k, v, layout, weights)
    half = [t.bfloat16() for t in (q, k, v)]
    got = _outputs_and_grads(tree_attention_sdpa, *half, layout, weights.float())
    masked = _outputs_and_grads(tree_attention_masked, *half, layout, weights.float())
    for a, b, m in zip(got, exact, masked, strict=True):
        assert a.dtype == torch.bfloat16
        assert torch.allclose(a.double(), b, rtol=2e-2, atol=2e-2)
        assert (a.double() - b).abs().max() <= 2 * (m.double() - b).abs().max() + 1e-3


def test_a_non_cpu_device_takes_the_bias_path_and_a_cpu_the_pieces(monkeypatch):
    """The dispatch: tensors off the CPU (here on the meta device, as a GPU's would be) go to the mask-free SDPA
    path; on the CPU, the flash pieces, unless dropout is asked for (the pieces apply none)."""
    taken = []
    monkeypatch.setattr(attention, "tree_attention_sdpa", lambda *a, **k: taken.append("sdpa") or a[0])
    monkeypatch.setattr(attention.CpuTreeAttention, "apply", lambda *a, **k: taken.append("pieces") or a[0])
    layout = pack(PAIRS).layout
    length = layout.blocks[-1].queries[1]
    for device, dropout in (("meta", 0.0), ("cpu", 0.0), ("cpu", 0.1)):
        q = torch.zeros(1, 4, length, 8, device=device)
        kv = torch.zeros(1, 2, length, 8, device=device)
        attention.tree_attention(torch.nn.Identity(), q, kv, kv, None, dropout=dropout, perpair_tree=layout)
    assert taken == ["sdpa", "pieces", "sdpa"]


def test_mistral_with_a_sliding_window_on_the_bias_path(monkeypatch):
    """A Mistral model whose window covers every sequence of the row, run through the mask-free path: log-probs
    and every weight's gradient equal those of the masked reference (float64, 1e-10). A shorter window is refused
    before any path runs (tests/test_train_losses.py), so no path needs to apply one."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=50, sliding_window=9, attn_implementation="sdpa")
    model = MistralForCausalLM(config).double()
    module = CompletionLogps(model, chunk_size=2)
    monkeypatch.setattr(attention, "_runs_pieces", lambda query, dropout: False)  # the GPU's path, on the CPU
    weights = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.0]], dtype=torch.float64)
    results = []
    for implementation in (tree_attention_sdpa, tree_attention_masked):
        calls = []

        def record(*args, implementation=implementation, calls=calls, **kwargs):
            calls.append(1)
            return implementation(*args, **kwargs)

        monkeypatch.setattr(attention, "tree_attention_sdpa", record)
        sums, _ = run_packed(module, pack(PAIRS), torch.device("cpu"))
        (sums * weights).sum().backward()
        results.append([sums.detach()] + [p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        assert len(calls) == config.num_hidden_layers
    for a, b in zip(*results, strict=True):
        assert (a - b).abs().max() <= 1e-10


def test_routing_is_undone_per_model_and_the_registration_with_the_last():
    """``CompletionLogps`` routes a model's attention through tree attention until ``release``; the registered
    name stays while another model uses it and goes with the last one; ``logps_of_tokenized`` (the reference
    pass, evaluation) leaves the caller's model as it found it."""
    from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

    from perpair.train.logprobs import logps_of_tokenized

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                            attn_implementation="sdpa")).double()

    name = "perpair_tree:sdpa"
    others = attention._USERS[name]  # models other tests routed and never released
    first, second = llama(), llama()
    pairs = [PAIRS[0], PAIRS[2]]  # with prompts: a response without one has no position predicting its first token
    expected, _ = logps_of_tokenized(first, pairs)
    assert first.config._attn_implementation == "sdpa" and attention._USERS[name] == others
    a, b = CompletionLogps(first), CompletionLogps(second)
    assert CompletionLogps(first)._restore_attention() is None  # routed already: the first wrapper restores
    assert first.config._attn_implementation == second.config._attn_implementation == name
    assert attention._USERS[name] == others + 2
    a.release()
    assert first.config._attn_implementation == "sdpa" and name in AttentionInterface._global_mapping
    sums, _ = run_packed(b, pack(pairs), torch.device("cpu"))  # the other model still runs tree attention
    assert torch.allclose(sums, expected, atol=1e-10)
    b.release()
    b.release()  # twice: nothing more
    assert second.config._attn_implementation == "sdpa" and attention._USERS[name] == others
    assert (name in AttentionInterface._global_mapping) == (others > 0)


def _tiny_llama_and_fp32_sums():
    """A tiny random Llama wrapped for packed log-probs, two pairs, and their float32 sums (the autocast tests'
    reference)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                         attn_implementation="sdpa"))
    module = CompletionLogps(model, chunk_size=2)
    pairs = [PAIRS[0], PAIRS[2]]
    expected, _ = run_packed(module, pack(pairs), torch.device("cpu"))
    return module, pairs, expected


def test_under_autocast_the_bias_path_gets_one_dtype(monkeypatch):
    """Under bf16 autocast the rotary embedding leaves query and key in float32 beside a bfloat16 value; the bias
    would then miss the flash / memory-efficient kernels (they need one dtype) and build a mask. Tree attention
    casts all three to autocast's dtype, as autocast does for SDPA, and the log-probs stay those of the float32
    model up to bfloat16 rounding."""
    module, pairs, expected = _tiny_llama_and_fp32_sums()
    monkeypatch.setattr(attention, "_runs_pieces", lambda query, dropout: False)  # the GPU's path, on the CPU
    dtypes = []

    def record(query, key, value, *args, **kwargs):
        dtypes.append((query.dtype, key.dtype, value.dtype))
        return tree_attention_sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(attention, "tree_attention_sdpa", record)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums, _ = run_packed(module, pack(pairs), torch.device("cpu"))
    assert dtypes == [(torch.bfloat16,) * 3] * 2
    assert torch.allclose(sums, expected, rtol=2e-2, atol=0.1), (sums, expected)


def test_under_cpu_autocast_attention_is_float32_and_the_output_projection_bfloat16(monkeypatch):
    """Under bf16 autocast on a CPU the tree attention's flash kernels get float32 query, key and value while its
    sequences are short (the CPU's bfloat16 kernels are slower there: benchmarks/cpu_kernels.py), bfloat16 past
    CPU_FLOAT32_ATTENTION_MAX tokens; meanwhile the output projection gets bfloat16 hidden
    states, as autocast gives a model's own ``nn.Linear`` head (it used to get the final norm's float32: an ~8x
    slower product). The log-probs stay those of the float32 model up to bfloat16 rounding."""
    from perpair.train import logprobs

    module, pairs, expected = _tiny_llama_and_fp32_sums()
    seen = {"attention": [], "head": []}
    pieces, chunked = attention.CpuTreeAttention.apply, logprobs.ChunkedTokenLogps.apply

    def attend(query, key, value, *args):
        seen["attention"].append((query.dtype, key.dtype, value.dtype))
        return pieces(query, key, value, *args)

    def project(hidden, weight, *args):
        seen["head"].append(hidden.dtype)
        return chunked(hidden, weight, *args)

    monkeypatch.setattr(attention.CpuTreeAttention, "apply", attend)
    monkeypatch.setattr(logprobs.ChunkedTokenLogps, "apply", project)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums, _ = run_packed(module, pack(pairs), torch.device("cpu"))
    assert seen == {"attention": [(torch.float32,) * 3] * 2, "head": [torch.bfloat16]}
    assert sums.dtype == torch.float32  # the log-softmax and the sums stay float32
    assert torch.allclose(sums, expected, rtol=2e-2, atol=0.1), (sums, expected)
    seen = {"attention": [], "head": []}
    run_packed(module, pack(pairs), torch.device("cpu"))  # without autocast nothing is cast
    assert seen == {"attention": [(torch.float32,) * 3] * 2, "head": [torch.float32]}
    monkeypatch.setattr(attention, "CPU_FLOAT32_ATTENTION_MAX", 4)  # longer sequences: autocast's bfloat16
    seen = {"attention": [], "head": []}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run_packed(module, pack(pairs), torch.device("cpu"))
    assert seen == {"attention": [(torch.bfloat16,) * 3] * 2, "head": [torch.bfloat16]}
