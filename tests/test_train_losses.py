"""Losses: maths by hand, per-pair β, routing, and the
packed / chunked log-prob path against a plain forward (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from perpair.train.logprobs import ChunkedTokenLogps, CompletionLogps, pack, run_packed
from perpair.train.losses import LOSSES, ROUTE_PREFERENCE, ROUTE_SFT, Logps, LossParams, routed_losses
from perpair.train.tokenize import TokenizedPair

N = 6


def _logps(seed: int) -> tuple[Logps, Logps, torch.Tensor, torch.Tensor]:
    """Random per-token log-probs for N pairs laid out as a padded batch, and the summed Logps. (The comparison
    with TRL, values and gradients, is tests/test_train_losses_trl.py.)"""
    g = torch.Generator().manual_seed(seed)
    length = 12
    token = -torch.rand(2 * N, length, generator=g, dtype=torch.float64) * 3
    counts = torch.randint(1, length, (2 * N,), generator=g)
    mask = (torch.arange(length)[None, :] < counts[:, None]).long()
    sums = (token * mask).sum(1)
    ref = sums + torch.randn(2 * N, generator=g, dtype=torch.float64) * 2
    policy = Logps(sums[:N], sums[N:], counts[:N], counts[N:])
    reference = Logps(ref[:N], ref[N:], counts[:N], counts[N:])
    return policy, reference, token * mask, mask


def _ours(name: str, policy: Logps, reference: Logps, beta, eps=0.0, gamma=0.0) -> torch.Tensor:
    params = LossParams(torch.full((N,), beta, dtype=torch.float64) if isinstance(beta, float) else beta,
                        torch.full((N,), eps, dtype=torch.float64), gamma)
    return LOSSES[name].fn(policy, reference, params).losses


def test_simpo_is_the_paper_formula():
    policy, _, _, _ = _logps(seed=4)
    beta, gamma = 2.0, 0.7
    ours = _ours("simpo", policy, None, beta, gamma=gamma)
    for i in range(N):
        logits = (beta / int(policy.chosen_tokens[i]) * float(policy.chosen[i])
                  - beta / int(policy.rejected_tokens[i]) * float(policy.rejected[i]) - gamma)
        assert ours[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-logits))), rel=1e-12)


def test_dpo_by_hand():
    """log π: chosen −10 (ref −12), rejected −9 (ref −8): Δ = 2 − (−1) = 3; β = 0.5 → −log σ(1.5)."""
    one = torch.tensor([1.0], dtype=torch.float64)
    policy = Logps(-10 * one, -9 * one, 5 * one, 4 * one)
    reference = Logps(-12 * one, -8 * one, 5 * one, 4 * one)
    out = LOSSES["sigmoid"].fn(policy, reference, LossParams(0.5 * one, 0 * one))
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(1.0) and out.rejected_rewards.item() == pytest.approx(-0.5)
    smoothed = LOSSES["sigmoid"].fn(policy, reference, LossParams(0.5 * one, 0.1 * one)).losses.item()
    assert smoothed == pytest.approx(0.9 * math.log1p(math.exp(-1.5)) + 0.1 * math.log1p(math.exp(1.5)))


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "robust"])
def test_per_pair_beta_is_each_pairs_own_formula(name):
    """SP²DPO: pair i's loss with β_i equals the global-β loss evaluated at β = β_i."""
    policy, reference, _, _ = _logps(seed=5)
    betas = torch.tensor([0.01, 0.05, 0.1, 0.3, 1.0, 2.0], dtype=torch.float64)
    eps = 0.1 if name == "robust" else 0.0
    per_pair = _ours(name, policy, reference, betas, eps)
    for i, b in enumerate(betas.tolist()):
        assert per_pair[i].item() == pytest.approx(_ours(name, policy, reference, b, eps)[i].item(), rel=1e-12)
    # and the DPO gradient weight is β_i σ(−β_i Δ_i) (Rafailov et al. Eq. 8), so β_i scales the push per pair
    if name == "sigmoid":
        chosen = policy.chosen.clone().requires_grad_(True)
        loss = LOSSES[name].fn(Logps(chosen, policy.rejected, policy.chosen_tokens, policy.rejected_tokens),
                               reference, LossParams(betas, torch.zeros(N, dtype=torch.float64))).losses.sum()
        loss.backward()
        delta = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
        assert torch.allclose(-chosen.grad, betas * torch.sigmoid(-betas * delta))


def test_routes_pick_the_objective_and_sft_pairs_never_touch_rejected():
    policy, reference, _, _ = _logps(seed=6)
    route = torch.tensor([ROUTE_PREFERENCE, ROUTE_SFT] * (N // 2))
    nan = torch.full((N,), float("nan"), dtype=torch.float64)
    sft_rows = route == ROUTE_SFT
    # the SFT pairs' rejected log-probs and reference are NaN: they must not leak into any value or gradient
    chosen = policy.chosen.clone().requires_grad_(True)
    rejected = torch.where(sft_rows, nan, policy.rejected).requires_grad_(True)
    ref = Logps(torch.where(sft_rows, nan, reference.chosen), torch.where(sft_rows, nan, reference.rejected),
                reference.chosen_tokens, reference.rejected_tokens)
    params = LossParams(torch.full((N,), 0.1, dtype=torch.float64), torch.full((N,), 0.1, dtype=torch.float64))
    out = routed_losses("sigmoid", Logps(chosen, rejected, policy.chosen_tokens, policy.rejected_tokens), ref,
                        params, route)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(chosen.grad).all()
    assert torch.isfinite(rejected.grad).all() and (rejected.grad[sft_rows] == 0).all()
    sft = -policy.chosen / policy.chosen_tokens
    assert torch.allclose(out.losses[sft_rows], sft[sft_rows].to(out.losses.dtype))
    dpo = _ours("sigmoid", policy, reference, 0.1, 0.1)
    assert torch.allclose(out.losses[~sft_rows], dpo[~sft_rows])


def test_a_weighted_sum_reports_the_rewards_of_a_term_that_has_them_and_a_name_keeps_the_wpo_weight():
    """`loss: [sft, sigmoid]` (RPO with its terms the other way round) reported the sft term's rewards, NaN: the
    rewards and margins NaN, the accuracy 0 (TRL reports β·log-ratio whatever the order). And routed_losses given a
    loss by name dropped params.pair_weight (WPO) without a word, where objective() applies it."""
    from perpair.train.losses import objective

    policy, reference, _, _ = _logps(seed=7)
    params = LossParams(torch.full((N,), 0.1, dtype=torch.float64), torch.zeros(N, dtype=torch.float64))
    sigmoid = LOSSES["sigmoid"].fn(policy, reference, params)
    mixed = objective(["sft", "sigmoid"], [0.5, 1.0]).fn(policy, reference, params)
    assert torch.equal(mixed.chosen_rewards, sigmoid.chosen_rewards)
    assert torch.equal(mixed.rejected_rewards, sigmoid.rejected_rewards)
    weight = torch.linspace(0.5, 2.0, N, dtype=torch.float64)
    route = torch.full((N,), ROUTE_PREFERENCE)
    weighted = routed_losses("sigmoid", policy, reference, LossParams(params.beta, params.label_smoothing,
                                                                       pair_weight=weight), route)
    assert torch.allclose(weighted.losses, sigmoid.losses * weight)
    # a loss of sft terms alone, every pair on the SFT route: its weights apply there (they were dropped)
    sft_route = torch.full((N,), ROUTE_SFT)
    plain = routed_losses("sigmoid", policy, reference, params, sft_route)
    summed = routed_losses("sigmoid", policy, reference, params, sft_route, sft=objective(["sft", "sft"], [1.0, 0.5]))
    assert torch.allclose(summed.losses, 1.5 * plain.losses)


def test_chunked_projection_gradients():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(13, 5, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.randint(0, 13, (9,), generator=g)
    assert torch.autograd.gradcheck(lambda h, w: ChunkedTokenLogps.apply(h, w, None, target, 4), (hidden, weight))
    full = F.log_softmax(hidden @ weight.t(), -1).gather(1, target[:, None]).squeeze(1)
    assert torch.allclose(ChunkedTokenLogps.apply(hidden, weight, None, target, 4), full)
    bias = torch.randn(13, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w, b: ChunkedTokenLogps.apply(h, w, b, target, 4), (hidden, weight, bias))


@pytest.mark.parametrize("chunk", [1, 3, 256])
@pytest.mark.parametrize("frozen", [False, True])
def test_the_projection_in_blocks_of_columns_equals_the_whole_one(chunk, frozen, monkeypatch):
    """Blocks of vocabulary columns (several targets in one block, a shorter last block, blocks one column wide)
    give the log-probs and gradients of the whole ``[rows, vocab]`` log-softmax, and the reused buffer never
    holds more than ``chunk × vocab`` values."""
    from perpair.train import logprobs

    monkeypatch.setattr(logprobs, "COLUMNS", 7)  # a last block of 40 % 7 = 5 columns
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(11, 6, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(40, 6, dtype=torch.float64, generator=g, requires_grad=not frozen)
    bias = torch.randn(40, dtype=torch.float64, generator=g, requires_grad=not frozen)
    target = torch.tensor([0, 39, 3, 3, 6, 7, 13, 14, 35, 36, 20])
    buffers = []
    columns = logprobs._Columns.__init__
    monkeypatch.setattr(logprobs._Columns, "__init__", lambda self, *a: columns(self, *a) or buffers.append(self))
    out = ChunkedTokenLogps.apply(hidden, weight, bias, target, chunk)
    grad_out = torch.randn(11, dtype=torch.float64, generator=g)
    inputs = (hidden,) if frozen else (hidden, weight, bias)
    ours = torch.autograd.grad(out, inputs, grad_out)
    full = F.log_softmax(hidden @ weight.t() + bias, -1).gather(1, target[:, None]).squeeze(1)
    assert torch.allclose(out, full)
    for a, b in zip(ours, torch.autograd.grad(full, inputs, grad_out), strict=True):
        assert torch.allclose(a, b)
    assert buffers and all(b.buffer.numel() <= chunk * 40 for b in buffers)
    assert buffers[0].width == min(7, max(1, chunk * 40 // 11))


def test_a_frozen_projection_takes_its_gradient_in_the_forward(monkeypatch):
    """With the weight frozen (a LoRA run's output layer) the hidden states' gradient comes from the forward's
    logits: the backward projects nothing onto the vocabulary again, and the gradient is the plain one."""
    from perpair.train import logprobs

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, generator=g)
    weight = torch.randn(13, 5, dtype=torch.float64, generator=g)
    target = torch.randint(0, 13, (9,), generator=g)
    assert torch.autograd.gradcheck(lambda h: ChunkedTokenLogps.apply(h, weight, bias, target, 4), (hidden,))
    projections = []
    project = logprobs._Columns.logits
    monkeypatch.setattr(logprobs._Columns, "logits", lambda self, cols: projections.append(cols) or
                        project(self, cols))
    grad_out = torch.randn(9, dtype=torch.float64, generator=g)
    out = ChunkedTokenLogps.apply(hidden, weight, bias, target, 4)
    # 13 columns in blocks of 5 (a buffer of at most chunk × vocab = 4 × 13 values for 9 rows), in the forward
    assert projections == [slice(0, 5), slice(5, 10), slice(10, 13)]
    (ours,) = torch.autograd.grad(out, hidden, grad_out)
    assert len(projections) == 3  # none in the backward
    plain = hidden.detach().requires_grad_()
    full = F.log_softmax(plain @ weight.t() + bias, -1).gather(1, target[:, None]).squeeze(1)
    assert torch.allclose(out, full)
    (expected,) = torch.autograd.grad(full, plain, grad_out)
    assert torch.allclose(ours, expected)
    trained = weight.clone().requires_grad_()  # a trained weight: the backward projects each chunk again
    torch.autograd.grad(ChunkedTokenLogps.apply(hidden, trained, bias, target, 4), (hidden, trained), grad_out)
    assert len(projections) == 9


def test_a_trained_projection_writes_its_weight_gradient_into_one_tensor_for_the_run():
    """With a ``WeightGradInto`` the weight's gradient lands in ``.grad`` (autograd gets none for it), in one tensor
    reused after ``.grad`` is set to None; added to a dense gradient of an earlier forward, and a sparse one (a tied
    input embedding's) added into it; the hidden states' gradient as without it."""
    from perpair.train.logprobs import WeightGradInto

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(13, 5, dtype=torch.float64, generator=g))
    target = torch.randint(0, 13, (9,), generator=g)
    into = WeightGradInto()

    def expected(grad_out):  # the gradients of the whole log-softmax, by autograd
        full = F.log_softmax(hidden @ weight.t(), -1).gather(1, target[:, None]).squeeze(1)
        return torch.autograd.grad(full, (hidden, weight), grad_out)

    def backward(grad_out):
        (ChunkedTokenLogps.apply(hidden, weight, None, target, 4, None, into) * grad_out).sum().backward()

    first, second = (torch.randn(9, dtype=torch.float64, generator=g) for _ in range(2))
    backward(first)
    assert weight.grad is into.buffer and torch.allclose(weight.grad, expected(first)[1])
    assert torch.allclose(hidden.grad, expected(first)[0])
    weight.grad, hidden.grad = None, None  # zero_grad(set_to_none=True)
    backward(second)  # overwrites the buffer: nothing of the first step left
    assert weight.grad is into.buffer and torch.allclose(weight.grad, expected(second)[1])
    backward(first)  # a second forward of the same step adds to it
    assert torch.allclose(weight.grad, expected(first)[1] + expected(second)[1])
    sparse = torch.sparse_coo_tensor(torch.tensor([[2, 7]]), torch.randn(2, 5, dtype=torch.float64, generator=g),
                                     (13, 5), check_invariants=True)
    weight.grad = sparse  # a tied input embedding's gradient, come first
    backward(first)
    assert not weight.grad.is_sparse and torch.allclose(weight.grad, expected(first)[1] + sparse.to_dense())


def test_a_tied_embedding_takes_the_same_gradients_written_into_one_tensor():
    """A tied embedding (sparse input gradient, as training in one process sets it): every parameter's gradient
    equals autograd's own over two steps, and the output layer's tensor is the same at both."""
    from transformers import LlamaConfig, LlamaForCausalLM

    pairs = [TokenizedPair([1, 2, 3], [4, 5, 9], [6, 7]), TokenizedPair([3, 1], [8, 2], [5, 5, 5, 4])]
    grads = []
    for into in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                             tie_word_embeddings=True))
        model.get_input_embeddings().sparse = True
        module = CompletionLogps(model, chunk_size=3, grad_into_weight=into)
        steps = []
        for step in range(2):
            sums, _ = run_packed(module, pack(pairs[step:] + pairs[:step]), torch.device("cpu"))
            (sums * torch.tensor([[1.0, -0.5]])).sum().backward()
            steps.append({n: p.grad.to_dense().clone() for n, p in model.named_parameters()})
            if into:
                assert model.get_output_embeddings().weight.grad is module._grad_into.buffer
            model.zero_grad(set_to_none=True)
        module.release()
        grads.append(steps)
    assert grads[0][0].keys() == grads[1][0].keys() and "model.embed_tokens.weight" in grads[0][0]
    for plain, written in zip(grads[0], grads[1], strict=True):
        for name in plain:
            assert torch.allclose(plain[name], written[name], atol=1e-6), name


def test_a_frozen_output_layer_is_cast_once_under_autocast(monkeypatch):
    """Under bf16 autocast a frozen head's weight reaches the projection in bfloat16, one cast for every forward
    of the module, cast again when the weight changes; a trained head's as the float32 parameter itself (its
    gradient accumulated in float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from perpair.train import logprobs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                         tie_word_embeddings=False))
    seen = []
    chunked = logprobs.ChunkedTokenLogps.apply
    monkeypatch.setattr(logprobs.ChunkedTokenLogps, "apply",
                        lambda hidden, weight, *args: seen.append(weight) or chunked(hidden, weight, *args))
    module = CompletionLogps(model, chunk_size=2)
    pairs = [TokenizedPair([1, 2, 3], [4, 5], [6, 7, 8])]
    head = model.get_output_embeddings().weight
    head.requires_grad_(False)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sums, _ = run_packed(module, pack(pairs), torch.device("cpu"))
        sums.sum().backward()
    assert seen[0].dtype == torch.bfloat16 and seen[0] is seen[1]
    assert torch.equal(seen[0], head.to(torch.bfloat16))
    with torch.no_grad():
        head.mul_(2)  # changed in place: cast again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run_packed(module, pack(pairs), torch.device("cpu"))
    assert seen[2] is not seen[1] and torch.equal(seen[2], head.to(torch.bfloat16))
    head.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums, _ = run_packed(module, pack(pairs), torch.device("cpu"))
    assert seen[3] is head
    (grad,) = torch.autograd.grad(sums.sum(), head)
    assert grad.dtype == torch.float32
    module.release()
    assert not module._casts


def _separate_sequence_logps(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Summed log-probs of ``tokens`` after ``prompt``, from a plain forward of that one sequence."""
    logits = model(torch.tensor([prompt + tokens])).logits[0].log_softmax(-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
    return logits[positions, torch.tensor(tokens)].sum()


@pytest.mark.parametrize("frozen_head", [False, True])
def test_packed_tree_attention_equals_separate_sequences(frozen_head):
    """Prompt sharing and packing give each response exactly the log-probs and gradients of its own sequence;
    with the output layer frozen (as under LoRA) too, its gradient then taken in the forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, attn_implementation="sdpa",
                         tie_word_embeddings=not frozen_head)
    model = LlamaForCausalLM(config).double()
    model.get_output_embeddings().weight.requires_grad_(not frozen_head)
    pairs = [TokenizedPair([1, 2, 3, 4], [5, 6, 7], [8, 9]), TokenizedPair([10, 11], [12], [13, 14, 15, 16]),
             TokenizedPair([3, 3], [4, 4, 4], [])]
    sums, counts = run_packed(CompletionLogps(model, chunk_size=3), pack(pairs), torch.device("cpu"))
    (sums * torch.arange(1.0, 7.0, dtype=torch.float64).view(3, 2)).sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    expected = torch.zeros(3, 2, dtype=torch.float64)
    for i, pair in enumerate(pairs):
        for side, tokens in enumerate((pair.chosen, pair.rejected)):
            if tokens:
                expected[i, side] = _separate_sequence_logps(model, pair.prompt, tokens)
    (expected * torch.arange(1.0, 7.0, dtype=torch.float64).view(3, 2)).sum().backward()
    assert torch.allclose(sums, expected.detach(), atol=1e-10)
    assert counts.tolist() == [[3, 2], [1, 4], [3, 0]]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(trained) == len(packed_grads) == len(list(model.parameters())) - frozen_head
    for a, p in zip(packed_grads, trained, strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-6, atol=1e-6), (a - p.grad).abs().max()


def _separate_token_logps(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Per-token log-probs of ``tokens`` after ``prompt``, from a plain forward of that one sequence."""
    logits = model(torch.tensor([prompt + tokens])).logits[0].log_softmax(-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
    return logits[positions, torch.tensor(tokens)]


def test_packed_ld_dpo_sums_weight_the_tokens_past_the_shared_length():
    """LD-DPO in the packed layout: each response's first min(|y_w|, |y_l|) tokens count 1, the rest α, values
    and gradients equal to splitting separate sequences' token log-probs; a pair without a rejected response (SFT)
    keeps its plain sum."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).double()
    pairs = [TokenizedPair([1, 2, 3, 4], [5, 6, 7], [8, 9]), TokenizedPair([10, 11], [12], [13, 14, 15, 16]),
             TokenizedPair([3, 3], [4, 4, 4], []), TokenizedPair([7], [8, 9], [10, 11])]
    alpha = 0.3
    weights = torch.arange(1.0, 9.0, dtype=torch.float64).view(4, 2)
    sums, _ = run_packed(CompletionLogps(model, chunk_size=3, ld_alpha=alpha), pack(pairs),
                         torch.device("cpu"))
    (sums * weights).sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = torch.zeros(4, 2, dtype=torch.float64)
    for i, pair in enumerate(pairs):
        shared = min(len(pair.chosen), len(pair.rejected)) if pair.rejected else len(pair.chosen)
        for side, tokens in enumerate((pair.chosen, pair.rejected)):
            if tokens:
                token = _separate_token_logps(model, pair.prompt, tokens)
                expected[i, side] = token[:shared].sum() + alpha * token[shared:].sum()
    (expected * weights).sum().backward()
    assert torch.allclose(sums, expected.detach(), atol=1e-10)
    for a, p in zip(packed_grads, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-6, atol=1e-6)


def test_log_sum_sq_probs_equals_trls_kernel():
    """WPO's alignment term log Σ_v π(v)², chunked as our log-probs are, against TRL 1.16's own chunked kernel."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    from perpair.train.logprobs import log_sum_sq_probs

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 5, generator=g) * 2
    weight = torch.randn(13, 5, generator=g)
    bias = torch.randn(13, generator=g)
    target = torch.randint(0, 13, (9,), generator=g)
    theirs = ChunkedLogProbFunction.apply(hidden, weight, bias, target, 1.0, 4, None, 1.0, ("log_sum_sq_probs",))[2]
    assert torch.allclose(log_sum_sq_probs(hidden, weight, bias, 4), theirs, atol=1e-5)


def test_packed_wpo_aligned_sums_equal_separate_sequences():
    """With ``wpo`` the packed forward also returns each response's Σ_t (log π(y_t) − log Σ_v π(v)²), detached,
    and leaves the log-probs unchanged."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).double()
    pairs = [TokenizedPair([1, 2, 3, 4], [5, 6, 7], [8, 9]), TokenizedPair([3, 3], [4, 4, 4], [])]
    plain, _ = run_packed(CompletionLogps(model, chunk_size=3), pack(pairs), torch.device("cpu"))
    sums, _, aligned = run_packed(CompletionLogps(model, chunk_size=3, wpo=True), pack(pairs), torch.device("cpu"))
    assert torch.equal(sums, plain) and not aligned.requires_grad
    for i, pair in enumerate(pairs):
        for side, tokens in enumerate((pair.chosen, pair.rejected)):
            expected = 0.0
            if tokens:
                logits = model(torch.tensor([pair.prompt + tokens])).logits[0].double()
                positions = torch.arange(len(pair.prompt) - 1, len(pair.prompt) + len(tokens) - 1)
                logp = logits[positions].log_softmax(-1)
                sq = torch.logsumexp(2 * logp, -1)  # log Σ_v π(v)²
                expected = (logp[torch.arange(len(tokens)), torch.tensor(tokens)] - sq).sum().item()
            assert aligned[i, side].item() == pytest.approx(expected, abs=1e-9)


def test_cpu_tree_attention_pieces_equal_one_masked_call_per_block():
    """The CPU path (mask-free flash pieces merged by log-sum-exp) gives the outputs and the query, key and value
    gradients of one masked SDPA call per block, for a row of several pairs and a pair alone, a pair without a
    prompt and grouped-query heads."""
    from perpair.train.attention import CpuTreeAttention, Piece, tree_attention_masked

    pairs = [TokenizedPair([1, 2, 3, 4, 5], [5, 6, 7], [8, 9, 10, 11]), TokenizedPair([], [12, 13], [14]),
             TokenizedPair([3, 3], [4, 4, 4], [])]
    for layout in (pack(pairs).layout, pack(pairs[:1]).layout):  # several pairs in a row, and one
        length = layout.blocks[-1].queries[1]
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, length, 8, dtype=torch.float64, generator=generator)
                   for heads in (6, 2, 2))
        weights = torch.randn(1, length, 6, 8, dtype=torch.float64, generator=generator)
        results = []
        for pieces in (True, False):
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            out = (CpuTreeAttention.apply(*inputs, layout.pieces, 0.3) if pieces
                   else tree_attention_masked(*inputs, layout, scaling=0.3))
            (out * weights).sum().backward()
            results.append([out.detach()] + [t.grad for t in inputs])
        for a, b in zip(*results, strict=True):
            assert torch.allclose(a, b, atol=1e-12)
    # the shared prompt: both responses attend to it in one piece, each response causally to itself
    assert pack(pairs[:1]).layout.pieces == (Piece((0, 5), (0, 5), True, True), Piece((5, 8), (5, 8), True, True),
                                             Piece((8, 12), (8, 12), True, True), Piece((5, 12), (0, 5), False, False))


@pytest.mark.parametrize("recompute_mlp", [False, True])
def test_one_pair_with_lean_activations_equals_separate_sequences(recompute_mlp):
    """One pair per forward (the default) with the lean SwiGLU / RMSNorm backward patched in (the MLP saving
    gate and up, or only its input): log-probs and gradients still equal those of plain separate sequences."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from perpair.train.lean import lean_activations

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, attn_implementation="sdpa")
    plain = LlamaForCausalLM(config).double()
    lean = copy.deepcopy(plain)
    mlp = "mlp_recomputed" if recompute_mlp else "mlp"
    # two MLPs, two norms per layer and the final norm
    expected = {"mlp": 0, "mlp_recomputed": 0, "norm": 5, "lora": 0, "linear": 14, mlp: 2}
    assert lean_activations(lean, recompute_mlp).counts() == expected
    mlp = lean.model.layers[0].mlp
    assert mlp.forward.__func__.__name__ == ("_recomputed_mlp_forward" if recompute_mlp else "_mlp_forward")
    pairs = [TokenizedPair([1, 2, 3, 4], [5, 6, 7], [8, 9]), TokenizedPair([3, 3], [4, 4, 4], [])]
    for pair in pairs:
        packed = pack([pair])
        sums, _ = run_packed(CompletionLogps(lean, chunk_size=2), packed, torch.device("cpu"))
        (sums * torch.tensor([[1.0, -2.0]], dtype=torch.float64)).sum().backward()
        expected = torch.zeros(1, 2, dtype=torch.float64)
        for side, tokens in enumerate((pair.chosen, pair.rejected)):
            if tokens:
                expected[0, side] = _separate_sequence_logps(plain, pair.prompt, tokens)
        (expected * torch.tensor([[1.0, -2.0]], dtype=torch.float64)).sum().backward()
        assert torch.allclose(sums, expected.detach(), atol=1e-10)
        for (name, a), b in zip(lean.named_parameters(), plain.parameters(), strict=True):
            # Llama's RMSNorm computes in float32 even in a float64 model: float32 rounding differences
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6), name
        lean.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)


@pytest.mark.parametrize("tied", [True, False])
def test_checkpointing_and_sparse_embedding_gradients_change_nothing(tied, tmp_path):
    """What ``prepare_policy`` switches on for speed or memory — gradient checkpointing (recomputing the tree
    attention in the backward), the sparse input-embedding gradient of a single process (tied to the output
    embedding or not) — gives the log-probs and, once densified, the gradients of the plain model."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from perpair.train.config import load_config
    from perpair.train.loop import densify_gradients
    from perpair.train.setup import prepare_policy

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, tie_word_embeddings=tied, attn_implementation="sdpa")
    plain = LlamaForCausalLM(config).double()
    pairs = [TokenizedPair([1, 2, 3, 4], [5, 6, 7], [8, 9]), TokenizedPair([10, 11], [12], [13, 14, 15, 16])]
    weights = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)

    def grads(model):
        sums, _ = run_packed(CompletionLogps(model, chunk_size=2), pack(pairs), torch.device("cpu"))
        (sums * weights).sum().backward()
        sparse = model.get_input_embeddings().weight.grad.is_sparse
        densify_gradients(model.parameters())
        return sums.detach(), {n: p.grad for n, p in model.named_parameters()}, sparse

    expected, expected_grads, was_sparse = grads(plain)
    assert not was_sparse
    for checkpointing in (True, False):
        train_config = load_config(None, {"model": "x", "data": "x", "out": str(tmp_path), "steps": 1,
                                          "gradient_checkpointing": checkpointing, "lean_activations": False})
        model = copy.deepcopy(plain)
        model.zero_grad(set_to_none=True)
        model = prepare_policy(train_config, model, single_process=True)
        assert model.get_input_embeddings().sparse
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        sums, got, sparse = grads(model)
        assert sparse == (not tied)  # tied: the dense output-embedding gradient absorbs the sparse one
        assert torch.allclose(sums, expected, atol=1e-10)
        for name, grad in got.items():
            assert not grad.is_sparse and torch.allclose(grad, expected_grads[name], atol=1e-8), name


def test_sliding_window_longer_than_every_sequence_changes_nothing_and_a_shorter_one_is_refused():
    """Mistral passes its sliding window to the attention function: tree attention runs it when the window covers
    every sequence of the row (then it changes nothing) and refuses it, with the fix, when it does not."""
    from transformers import MistralConfig, MistralForCausalLM

    from perpair.errors import PerpairError

    torch.manual_seed(0)
    pair = TokenizedPair([1, 2, 3, 4], [5, 6, 7], [8, 9])
    for window, ok in ((7, True), (6, False)):  # the longest sequence: prompt 4 + chosen 3 = 7 tokens
        config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=50, sliding_window=window,
                               attn_implementation="eager")  # eager: not in the registry, falls back to SDPA
        model = MistralForCausalLM(config).double()
        module = CompletionLogps(model, chunk_size=2)
        if not ok:
            with pytest.raises(PerpairError, match="sliding window of 6 tokens.*lower max_length to 6"):
                run_packed(module, pack([pair]), torch.device("cpu"))
            continue
        sums, _ = run_packed(module, pack([pair]), torch.device("cpu"))
        for side, tokens in enumerate((pair.chosen, pair.rejected)):
            assert torch.allclose(sums[0, side], _separate_sequence_logps(model, pair.prompt, tokens), atol=1e-10)


def test_a_wrapped_model_still_computes_its_own_attention_without_a_layout():
    """Wrapping routes the model's attention through tree attention; a call without a packed layout (a padded
    batch, as generation and evaluation run) gives exactly what the model gave before."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).double().eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    before = model(input_ids=ids, attention_mask=mask).logits
    CompletionLogps(model)
    assert model.config._attn_implementation == "perpair_tree:sdpa"
    after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before[mask.bool()], after[mask.bool()])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8)
