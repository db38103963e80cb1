"""perpair's packed forward on architectures other than Llama: tiny random models of each, built from their
Transformers config classes. Where the packed row can be exact, its log-probs and gradients equal a plain forward
of every ``prompt + response`` sequence alone; where it cannot, the model is refused by name, never trained on
log-probs its own forward would not give."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from perpair.errors import PerpairError
from perpair.train.attention import use_tree_attention
from perpair.train.lean import lean_activations
from perpair.train.logprobs import CompletionLogps, pack, run_packed
from perpair.train.tokenize import TokenizedPair

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GPT = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2)

ARCHITECTURES = {
    "llama-untied-biases": lambda: T.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True,
                                                 tie_word_embeddings=False),
    "mistral-window-covers": lambda: T.MistralConfig(**COMMON, sliding_window=17),  # the longest sequence: 17
    "qwen2-biases": lambda: T.Qwen2Config(**COMMON),
    "qwen3-qk-norm": lambda: T.Qwen3Config(**COMMON, head_dim=8),
    "gemma-scaled-embedding": lambda: T.GemmaConfig(**COMMON, head_dim=8),
    "gemma3-local-global": lambda: T.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=64),
    "phi3-fused": lambda: T.Phi3Config(**COMMON),
    "phi-parallel": lambda: T.PhiConfig(**{k: v for k, v in COMMON.items() if k != "num_key_value_heads"}),
    "gpt2-learned-positions": lambda: T.GPT2Config(**GPT, scale_attn_by_inverse_layer_idx=True),
    "gpt-neox-parallel": lambda: T.GPTNeoXConfig(**{k: v for k, v in COMMON.items() if k != "num_key_value_heads"}),
    "opt-learned-positions": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                 num_attention_heads=4, max_position_embeddings=256,
                                                 word_embed_proj_dim=32, pad_token_id=0),
    "olmo2-qk-norm": lambda: T.Olmo2Config(**COMMON),
    "mixtral-moe": lambda: T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2-moe": lambda: T.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=32),
    "phimoe-window-covers": lambda: T.PhimoeConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                                   sliding_window=17),
    "cohere-logit-scale": lambda: T.CohereConfig(**COMMON, logit_scale=0.5),
    "granite-logits-scaling": lambda: T.GraniteConfig(**COMMON, logits_scaling=4.0),
    "hyperclovax-logits-scaling": lambda: T.HyperCLOVAXConfig(**COMMON, logits_scaling=3.0),  # a factor here
}

# three pairs in one row: sequences of 5 to 17 tokens
PAIRS = [TokenizedPair([5, 9, 13, 17, 21, 25, 29], [31, 37, 41, 43, 47], [53, 59, 61, 67, 71, 73, 79, 83, 89]),
         TokenizedPair([3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33], [36, 39, 42, 45, 48, 51], [54, 57, 60, 63]),
         TokenizedPair([7, 14, 28], [35, 42, 49, 56, 63, 70, 77, 84], [91, 4])]


def _model(config, attention: str = "sdpa"):
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


def _separate(model, pairs):
    """Summed response log-probs of every ``prompt + response`` alone, by the model's own forward."""
    sums = []
    for pair in pairs:
        for response in (pair.chosen, pair.rejected):
            logits = model(input_ids=torch.tensor([pair.prompt + response]), use_cache=False).logits[0]
            logps = logits[len(pair.prompt) - 1:-1].log_softmax(-1)
            sums.append(logps.gather(1, torch.tensor(response)[:, None]).sum())
    return torch.stack(sums).view(len(pairs), 2)


def _grads(model, compute):
    model.zero_grad(set_to_none=True)
    sums = compute()
    (sums * torch.tensor([[1.0, -0.7]], dtype=sums.dtype)).sum().backward()
    return sums.detach(), {n: p.grad.to_dense().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_packed_logps_and_gradients_equal_separate_forwards(name):
    """A row of three pairs through the training forward (lean activations on, as training runs) gives each
    response's log-prob sum and every parameter's gradient as the model's own forward of the sequence alone."""
    model = _model(ARCHITECTURES[name]())
    expected, expected_grads = _grads(model, lambda: _separate(model, PAIRS))
    lean_activations(model)
    module = CompletionLogps(model, chunk_size=8)
    try:
        got, grads = _grads(model, lambda: run_packed(module, pack(PAIRS), torch.device("cpu"))[0])
    finally:
        module.release()
    assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()  # float32 (sums of ~-80)
    assert grads.keys() == expected_grads.keys()
    for key, grad in expected_grads.items():
        assert torch.allclose(grads[key], grad, rtol=1e-4, atol=2e-5), (key, (grads[key] - grad).abs().max())


@pytest.mark.parametrize("config, attention, feature", [
    (lambda: T.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=64, final_logit_softcapping=5.0), "sdpa",
     "Gemma3ForCausalLM soft-caps its logits \\(final_logit_softcapping 5.0\\)"),
    (lambda: T.Gemma2Config(**COMMON, head_dim=8, sliding_window=64, attn_logit_softcapping=None), "eager",
     "Gemma2ForCausalLM soft-caps its logits \\(final_logit_softcapping 30.0\\)"),
])
def test_a_final_logit_soft_capping_is_refused(config, attention, feature):
    """The soft-capping sits in the causal LM's forward, after the output layer that perpair's log-probs apply
    themselves: refused, not trained on uncapped logits."""
    with pytest.raises(PerpairError, match=feature):
        CompletionLogps(_model(config(), attention))


def test_logits_changed_beyond_the_output_layer_without_a_known_setting_are_refused():
    """Cohere scales its logits by the ``logit_scale`` it read at construction: with the config's value changed
    since, the setting says 1 but the model still scales, and the check on a short input refuses it."""
    model = _model(T.CohereConfig(**COMMON, logit_scale=0.5))
    model.config.logit_scale = 1.0
    with pytest.raises(PerpairError, match="CohereForCausalLM computes its logits with more than its output layer"):
        CompletionLogps(model)


def test_a_model_wrapped_again_is_checked_again_only_if_something_the_checks_read_changed(monkeypatch):
    """A run wraps its policy twice (the reference pass, then training): the second wrap of the same object,
    unchanged or given lean forwards or oneDNN's packed linear layers (each the same function), does not run the
    checks' forwards again. Another object, a changed config (Cohere's logit_scale, refused as above), a hook or
    another dtype is checked again."""
    from perpair import onednn
    from perpair.train import logprobs

    checked = []
    check = logprobs._check_packing
    monkeypatch.setattr(logprobs, "_check_packing", lambda model: (checked.append(model), check(model))[1])

    def wrap(model):
        CompletionLogps(model).release()
        return len(checked)

    model = _model(T.CohereConfig(**COMMON, logit_scale=0.5))
    assert wrap(model) == 1
    if onednn.pack_linears(model):  # 0 where oneDNN cannot
        assert wrap(model) == 1
    onednn.unpack_linears(model)
    assert sum(lean_activations(model).counts().values())
    assert wrap(model) == 1
    assert wrap(_model(T.CohereConfig(**COMMON, logit_scale=0.5))) == 2  # a twin, but another object
    handle = model.model.layers[0].register_forward_hook(lambda *args: None)
    assert wrap(model) == 3
    handle.remove()
    model.double()
    assert wrap(model) == 4
    assert wrap(model) == 4
    model.config.logit_scale = 1.0  # the model still scales by 0.5
    with pytest.raises(PerpairError, match="CohereForCausalLM computes its logits with more than its output layer"):
        CompletionLogps(model)


@pytest.mark.parametrize("config, limit, kind", [
    (lambda: T.Phi3Config(**COMMON, original_max_position_embeddings=16, rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [4.0] * 4}), 16, "longrope"),
    (lambda: T.LlamaConfig(**{**COMMON, "max_position_embeddings": 16}, rope_scaling={"rope_type": "dynamic",
                                                                                     "factor": 2.0}), 16, "dynamic"),
])
def test_a_rotary_embedding_scaled_by_the_sequence_length_is_refused_beyond_it(config, limit, kind):
    """Longrope and dynamic RoPE pick their frequencies by the largest position of the forward: in a packed row a
    sequence of 16 tokens would get those of a 17-token one beside it. Refused beyond the length where they start
    to scale; exact within it."""
    model = _model(config())
    module = CompletionLogps(model, chunk_size=8)
    with pytest.raises(PerpairError, match=f"beyond {limit} tokens \\({kind} RoPE\\).*lower max_length to {limit}"):
        run_packed(module, pack(PAIRS), torch.device("cpu"))
    short = [TokenizedPair(p.prompt[:4], p.chosen[:6], p.rejected[:6]) for p in PAIRS]  # 10 tokens at most
    with torch.no_grad():
        got = run_packed(module, pack(short), torch.device("cpu"))[0]
        assert torch.allclose(got, _separate(model, short), atol=2e-5)


@pytest.mark.parametrize("config, attention", [
    (lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            alibi=True), "sdpa"),
    (lambda: T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4), "eager"),
])
def test_alibi_models_are_refused_with_one_error(config, attention):
    """Falcon with ALiBi and Bloom build their attention bias from the mask and fail on the packed row before
    any attention layer runs: one error naming the model when wrapped, not a traceback from inside it."""
    model = _model(config(), attention)
    with pytest.raises(PerpairError, match="Model does not compute attention through Transformers' "
                                           "AttentionInterface.*fails on a packed row"):
        CompletionLogps(model, chunk_size=8)
    assert not model.config._attn_implementation.startswith("perpair_tree")  # refused: its own attention back


def test_a_wrapped_eager_model_keeps_its_own_attention_without_a_layout():
    """Gemma 2 soft-caps its attention in its eager function only: routed through tree attention, a call without
    a packed layout still runs that function (SDPA in its place refused the soft-capping)."""
    model = _model(T.Gemma2Config(**COMMON, head_dim=8, sliding_window=64, attn_logit_softcapping=0.5,
                                  final_logit_softcapping=None), "eager")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    before = model(input_ids=ids).logits
    restore = use_tree_attention(model)
    try:
        assert model.config._attn_implementation == "perpair_tree:eager"
        assert torch.equal(model(input_ids=ids).logits, before)
    finally:
        restore()
    with pytest.raises(PerpairError, match="Gemma2Attention uses a soft-capped"):  # a packed row: refused
        CompletionLogps(model)


def test_a_model_without_sdpa_loads_with_its_own_attention(tmp_path):
    """Training loads models with SDPA attention; one Transformers has no SDPA version of (Gemma 2) loads with its
    own instead of failing with Transformers' error."""
    from types import SimpleNamespace

    from perpair.train.setup import load_model

    _model(T.Gemma2Config(**COMMON, head_dim=8, sliding_window=64), "eager").save_pretrained(tmp_path)
    model = load_model(str(tmp_path), SimpleNamespace(device=torch.device("cpu")))
    assert type(model).__name__ == "Gemma2ForCausalLM" and model.config._attn_implementation == "eager"


@pytest.mark.parametrize("config, name", [
    (lambda window: T.PhimoeConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=window),
     "PhimoeAttention"),
    (lambda window: T.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                     shared_expert_intermediate_size=32, use_sliding_window=True,
                                     sliding_window=window, max_window_layers=2), "Qwen2MoeAttention"),
])
def test_a_sliding_window_applied_through_the_mask_alone_is_refused_when_shorter(config, name):
    """PhiMoE and Qwen2-MoE apply their sliding window through the mask only (they do not hand it to the attention
    function), and a packed row builds no mask: a window shorter than a sequence of the row is refused as
    Mistral's is (they trained with no window at all); one that covers every sequence is exact."""
    model = _model(config(16))  # the longest sequence: 17 tokens
    module = CompletionLogps(model, chunk_size=8)
    with pytest.raises(PerpairError, match=f"{name} attends within a sliding window of 16 tokens.*lower "
                                           "max_length to 16"):
        run_packed(module, pack(PAIRS), torch.device("cpu"))
    module.release()
    model = _model(config(17))
    with torch.no_grad():
        got = run_packed(CompletionLogps(model, chunk_size=8), pack(PAIRS), torch.device("cpu"))[0]
        assert torch.allclose(got, _separate(model, PAIRS), atol=2e-5)


@pytest.mark.parametrize("config, mixer", [
    (lambda: T.JambaConfig(**COMMON, attn_layer_offset=1, attn_layer_period=2, expert_layer_offset=0,
                           expert_layer_period=4, mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4), "JambaMambaMixer"),
    (lambda: T.Lfm2Config(**{k: v for k, v in COMMON.items() if k != "max_position_embeddings"},
                          layer_types=["conv", "full_attention"]), "Lfm2ShortConv"),
])
def test_a_convolution_over_the_sequence_is_refused(config, mixer):
    """Hybrid models mix tokens outside attention too (Mamba's and LFM2's short convolutions): in a packed row a
    sequence would read the end of the pair before it. They trained on those log-probs; now refused by name."""
    with pytest.raises(PerpairError, match=f"{mixer} mixes tokens by a convolution over the sequence"):
        CompletionLogps(_model(config()))


def test_any_other_mixing_of_tokens_is_refused_by_the_packed_check():
    """A layer that mixes tokens neither by attention nor by a convolution (here a running mean over the sequence
    added to the first MLP's output): the packed row of two pairs, compared with each sequence alone, refuses it."""

    class RunningMean(torch.nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)[None, :, None]
            return self.mlp(x) + 0.5 * x.cumsum(1) / steps

    model = _model(ARCHITECTURES["llama-untied-biases"]())
    model.model.layers[0].mlp = RunningMean(model.model.layers[0].mlp)
    with pytest.raises(PerpairError, match="LlamaModel: a packed row of pairs does not give each sequence the hidden "
                                           "states it has alone"):
        CompletionLogps(model)


def test_a_model_on_the_meta_device_is_wrapped_without_the_checks_forwards():
    """An FSDP rank that receives its weights from the first holds them on the meta device: wrapping it runs none
    of the checks' forwards (there is nothing to compute them with; the first process checks the model)."""
    with torch.device("meta"):
        model = T.LlamaForCausalLM(ARCHITECTURES["llama-untied-biases"]())
    module = CompletionLogps(model)
    assert model.config._attn_implementation.startswith("perpair_tree")
    module.release()
