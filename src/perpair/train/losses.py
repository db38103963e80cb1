"""Preference and SFT losses as pure functions of per-pair log-probabilities.

Every loss has one signature, ``loss(policy, reference, params) -> PairLosses``, and returns **per-pair**
values: the caller reduces, dividing the sum by the number of pairs in the *whole* optimizer batch, so
gradient accumulation, packing and the number of processes change nothing (Liger's convention).

``Δ`` below is the DPO log-ratio margin ``(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))``
with summed completion log-probabilities (Rafailov et al., 2023, Eq. 7). β and the label smoothing ε are
per-pair tensors: SP²DPO replaces DPO's global β by β_i (He et al., 2026) and MixDPO sets ε per route
(Pang et al., 2026). With all β_i equal the losses equal TRL 1.16's ``DPOTrainer`` ones, value and gradient
(tested against TRL's own ``_compute_loss``), except ``sigmoid`` with ε > 0 (cDPO, which TRL 1.16 ignores) and
``sft`` (per pair here, a batch token mean in TRL: equal when lengths are equal).

Which loss accepts a non-zero ε is declared with the loss (``smoothing=True``); a config that gives ε to a loss
that would ignore it is rejected when it is loaded, never silently dropped. The same holds for the
f-divergence (``f_divergence=True``: the losses built on the chosen − rejected score difference, where the
f-DPO reparameterisation's log Z(x) cancels; Wang et al. 2023). A *batch-level* loss (``aot``,
``aot_unpaired``) couples the pairs of a batch by sorting, so the caller must hand it the whole optimizer batch
at once. :func:`objective` builds the weighted sum of several losses (TRL's ``loss_weights``: MPO, RPO).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Logps:
    """Summed completion log-probs and completion token counts, one entry per pair."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class LossParams:
    """Per-pair β and ε (tensors of the batch's size) and the scalar settings of some losses: SimPO's target
    margin γ, the f-divergence and its α, DiscoPOP's τ. ``pair_weight`` (per pair, detached) multiplies every
    pair's loss: WPO's weights (:func:`wpo_weights`)."""

    beta: Tensor
    label_smoothing: Tensor
    gamma: float = 0.0
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5
    discopop_tau: float = 0.05
    pair_weight: Tensor | None = None


@dataclass(frozen=True)
class PairLosses:
    """Per-pair loss and implicit rewards (detached)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


LossFn = Callable[[Logps, "Logps | None", LossParams], PairLosses]


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: LossFn
    reference_free: bool  # the loop then needs no reference log-probs (SimPO, SFT)
    smoothing: bool  # the loss has a meaning for ε > 0
    description: str
    needs_smoothing: bool = False  # ε = 0 is undefined (EXO's log ε)
    f_divergence: bool = False  # accepts an f-divergence other than reverse KL
    batch_level: bool = False  # couples the pairs of a batch: computed over the whole optimizer batch at once


LOSSES: dict[str, LossSpec] = {}


def register(name: str, *, reference_free: bool = False, smoothing: bool = False, description: str = "",
             needs_smoothing: bool = False, f_divergence: bool = False, batch_level: bool = False):
    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = LossSpec(name, fn, reference_free, smoothing, description or (fn.__doc__ or "").strip(),
                                needs_smoothing, f_divergence, batch_level)
        return fn
    return wrap


def _logratios(policy: Logps, reference: Logps | None) -> tuple[Tensor, Tensor]:
    if reference is None:
        raise ValueError("this loss needs reference log-probs")
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def _rewards(beta: Tensor, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    return (beta * chosen).detach(), (beta * rejected).detach()


def f_score(logratio: Tensor, params: LossParams) -> Tensor:
    """f′(π/π_ref) of the f-DPO reparameterisation (Wang et al. 2023, Table 1), as a function of the log-ratio
    u = log π/π_ref: reverse KL u (DPO); forward KL 1 − e^(−u); Jensen–Shannon log 2 + log σ(u); α-divergence
    (e^((α−1)u) − 1)/(α − 1), which tends to u as α → 1."""
    kind = params.f_divergence
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return -torch.expm1(-logratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if kind == "alpha_divergence":
        alpha = params.f_alpha
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        t = (alpha - 1.0) * logratio
        # exp overflows float16 past 11 and float32/bfloat16 past 88; the cap (TRL's) keeps the score finite, so
        # a pair far from the reference saturates instead of turning the batch's loss into inf or NaN.
        cap = 11.0 if t.dtype == torch.float16 else 80.0
        return torch.expm1(t.clamp(max=cap)) / (alpha - 1.0)
    raise ValueError(f"unknown f-divergence {kind!r}; choose one of {', '.join(F_DIVERGENCES)}")


def _scores(policy: Logps, reference: Logps | None, params: LossParams) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(chosen log-ratio, rejected log-ratio, chosen score, rejected score): the scores are the log-ratios under
    the f-divergence of ``params`` (the log-ratios themselves for DPO's reverse KL)."""
    chosen, rejected = _logratios(policy, reference)
    return chosen, rejected, f_score(chosen, params), f_score(rejected, params)


def _smoothed(logits: Tensor, eps: Tensor) -> Tensor:
    """−(1−ε) log σ(z) − ε log σ(−z): the logistic loss with the label flipped with probability ε (cDPO)."""
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


@register("sigmoid", smoothing=True, f_divergence=True, description="DPO; with ε > 0 conservative DPO (cDPO)")
def sigmoid(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """DPO, Rafailov et al. 2023 Eq. 7: −log σ(β_i Δ). With ε > 0, cDPO (Mitchell 2023): the label is
    assumed flipped with probability ε, giving −(1−ε) log σ(β_i Δ) − ε log σ(−β_i Δ) (MixDPO uses ε = 0.1)."""
    chosen, rejected, s_chosen, s_rejected = _scores(policy, reference, params)
    losses = _smoothed(params.beta * (s_chosen - s_rejected), params.label_smoothing)
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("robust", smoothing=True, f_divergence=True)
def robust(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """Robust DPO, Chowdhury et al. 2024 Eq. 8: an unbiased estimate of the clean loss under label noise ε,
    (−(1−ε) log σ(β_i Δ) + ε log σ(−β_i Δ)) / (1 − 2ε)."""
    chosen, rejected, s_chosen, s_rejected = _scores(policy, reference, params)
    logits = params.beta * (s_chosen - s_rejected)
    eps = params.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("hinge", f_divergence=True)
def hinge(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """SLiC-HF hinge, Zhao et al. 2023 Eq. 3 with the DPO log-ratios: max(0, 1 − β_i Δ)."""
    chosen, rejected, s_chosen, s_rejected = _scores(policy, reference, params)
    losses = torch.relu(1 - params.beta * (s_chosen - s_rejected))
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


def _per_token(score: Tensor, tokens: Tensor) -> Tensor:
    return score / tokens.clamp(min=1)


@register("ipo", f_divergence=True)
def ipo(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """IPO, Azar et al. 2023 Eq. 17: (Δ̄ − 1/(2τ))² with τ = β_i. Δ̄ uses log-ratios averaged per completion
    token, as TRL does (the form the IPO authors confirmed), so the square does not grow with length."""
    chosen, rejected, s_chosen, s_rejected = _scores(policy, reference, params)
    delta = _per_token(s_chosen, policy.chosen_tokens) - _per_token(s_rejected, policy.rejected_tokens)
    losses = (delta - 1 / (2 * params.beta)) ** 2
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("sigmoid_norm", f_divergence=True)
def sigmoid_norm(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """DPO on log-ratios averaged per completion token: −log σ(β_i (u_w/|y_w| − u_l/|y_l|)), so a long
    response's margin does not dominate by its length alone (TRL's ``sigmoid_norm``)."""
    chosen, rejected, s_chosen, s_rejected = _scores(policy, reference, params)
    delta = _per_token(s_chosen, policy.chosen_tokens) - _per_token(s_rejected, policy.rejected_tokens)
    return PairLosses(-F.logsigmoid(params.beta * delta), *_rewards(params.beta, chosen, rejected))


@register("exo_pair", smoothing=True, needs_smoothing=True, f_divergence=True)
def exo_pair(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """EXO-pref, Ji et al. 2024 Eq. 16 for two responses: KL(q ‖ p) between the policy's softmax over
    {y_w, y_l} of β_i·log-ratios, q = (σ(β_i Δ), σ(−β_i Δ)), and the smoothed label p = (1 − ε_i, ε_i). Needs
    ε_i > 0 (log ε; the paper suggests 1e-3)."""
    chosen, rejected, s_chosen, s_rejected = _scores(policy, reference, params)
    logits = params.beta * (s_chosen - s_rejected)
    eps = params.label_smoothing
    losses = (torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-eps))
              + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(eps)))
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("discopop", f_divergence=True)
def discopop(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """DiscoPOP's log-ratio modulated loss, Chris Lu et al. 2024 Eq. 5: with z = β_i Δ and m = σ(z/τ),
    (1 − m)·(−log σ(z)) + m·e^(−z); τ = ``discopop_tau`` (0.05 in the paper)."""
    chosen, rejected, s_chosen, s_rejected = _scores(policy, reference, params)
    logits = params.beta * (s_chosen - s_rejected)
    mix = torch.sigmoid(logits / params.discopop_tau)
    losses = -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("nca_pair")
def nca_pair(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """NCA for a pair, Chen et al. 2024 Eq. 11 with K = 1: with rewards r = β_i u,
    −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l): the chosen reward is pushed up in absolute terms, not only
    relative to the rejected one."""
    chosen, rejected = _logratios(policy, reference)
    r_w, r_l = params.beta * chosen, params.beta * rejected
    losses = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("bco_pair")
def bco_pair(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """BCO on pairs, Jung et al. 2024: each response classified on its own reward r = β_i u,
    −log σ(r_w) − log σ(−r_l). TRL 1.16 keeps no running reward mean (earlier TRL shifted r by one), so there is
    no state to carry between steps."""
    chosen, rejected = _logratios(policy, reference)
    losses = -F.logsigmoid(params.beta * chosen) - F.logsigmoid(-params.beta * rejected)
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("sppo_hard")
def sppo_hard(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """SPPO with hard win probabilities, Wu et al. 2024 Eq. 4.7 with P = 1 for the winner and 0 for the loser:
    (u_w − 1/(2β_i))² + (u_l + 1/(2β_i))²."""
    chosen, rejected = _logratios(policy, reference)
    half = 0.5 / params.beta
    losses = (chosen - half) ** 2 + (rejected + half) ** 2
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("apo_zero")
def apo_zero(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """APO-zero, D'Oosterlinck et al. 2024 Eq. 7: (1 − σ(β_i u_w)) + σ(β_i u_l); for chosen responses better than
    the model's own: raise the chosen likelihood, lower the rejected one."""
    chosen, rejected = _logratios(policy, reference)
    losses = 1 - torch.sigmoid(params.beta * chosen) + torch.sigmoid(params.beta * rejected)
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("apo_down")
def apo_down(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """APO-down, D'Oosterlinck et al. 2024 Eq. 8: σ(β_i u_w) + (1 − σ(β_i (u_w − u_l))); for chosen responses
    worse than the model's own: lower both likelihoods, the rejected one more."""
    chosen, rejected = _logratios(policy, reference)
    losses = torch.sigmoid(params.beta * chosen) + 1 - torch.sigmoid(params.beta * (chosen - rejected))
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


def _sorted_pairs(first: Tensor, second: Tensor, params: LossParams) -> Tensor:
    """AOT's coupling: the k-th smallest of ``first`` against the k-th smallest of ``second``, with the β and ε
    of the pair that owns the k-th smallest ``first`` value; the term is that pair's loss."""
    first_sorted, owner = torch.sort(first, dim=0)
    delta = first_sorted - torch.sort(second, dim=0).values
    terms = _smoothed(params.beta[owner] * delta, params.label_smoothing[owner])
    return torch.zeros_like(terms).index_put((owner,), terms)


@register("aot", smoothing=True, batch_level=True)
def aot(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """AOT (paired), Melnyk et al. 2024: first-order stochastic dominance of the policy's chosen − rejected
    log-prob margins over the reference's, by sorting both across the batch and applying cDPO's smoothed logistic
    loss to the k-th smallest of each. Per-pair β/ε: the k-th term takes β_i, ε_i of the pair whose *policy*
    margin is k-th smallest, and counts as that pair's loss (with one β for all, TRL's loss exactly)."""
    chosen, rejected = _logratios(policy, reference)
    assert reference is not None  # _logratios checked
    losses = _sorted_pairs(policy.chosen - policy.rejected, reference.chosen - reference.rejected, params)
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("aot_unpaired", smoothing=True, batch_level=True)
def aot_unpaired(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """AOT (unpaired), Melnyk et al. 2024: the sorted chosen log-ratios of the batch against its sorted rejected
    log-ratios, with cDPO's smoothed logistic loss. Per-pair β/ε: the k-th term takes β_i, ε_i of the pair whose
    *chosen* log-ratio is k-th smallest, and counts as that pair's loss."""
    chosen, rejected = _logratios(policy, reference)
    return PairLosses(_sorted_pairs(chosen, rejected, params), *_rewards(params.beta, chosen, rejected))


@register("simpo", reference_free=True, smoothing=True)
def simpo(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """SimPO, Meng et al. 2024 Eq. 6: −log σ(β/|y_w| log π(y_w|x) − β/|y_l| log π(y_l|x) − γ). Reference-free:
    the implicit reward is the length-normalised log-likelihood. ε > 0 smooths the label as in cDPO."""
    chosen = _per_token(policy.chosen, policy.chosen_tokens)
    rejected = _per_token(policy.rejected, policy.rejected_tokens)
    losses = _smoothed(params.beta * (chosen - rejected) - params.gamma, params.label_smoothing)
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("sft", reference_free=True, f_divergence=True)
def sft(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """MixDPO's SFT route: the length-normalised NLL of the chosen response, −log π(y_w|x) / |y_w| (prompt
    masked). The rejected response is not used; its rewards are reported as NaN. (f-divergence: no effect, it is
    accepted so that ``sft`` can join a combination, as in TRL.)"""
    losses = -_per_token(policy.chosen, policy.chosen_tokens)
    nan = torch.full_like(losses, float("nan")).detach()
    return PairLosses(losses, nan, nan)


def wpo_weights(chosen_aligned: Tensor, chosen_tokens: Tensor, rejected_aligned: Tensor,
                rejected_tokens: Tensor) -> Tensor:
    """WPO's per-pair weight, Zhou et al. 2024 Eq. 2 with the aligned token probabilities of their §3.2:
    w = exp(mean_t a_t(y_w)) · exp(mean_t a_t(y_l)) with a_t = log π(y_t) − log Σ_v π(v)², a response's
    length-normalised probability under the policy relative to a sample of its own. ``*_aligned`` are the
    per-response sums of a_t. Detached: the weight rescales a pair's loss, it is not trained."""
    chosen = chosen_aligned / chosen_tokens.clamp(min=1)
    rejected = rejected_aligned / rejected_tokens.clamp(min=1)
    return torch.exp(chosen + rejected).detach()


def objective(names: str | Sequence[str], weights: Sequence[float] | None = None) -> LossSpec:
    """The loss a run trains with: one registered loss, or the weighted sum Σ_k w_k·loss_k of several per pair
    (TRL's ``loss_type`` list with ``loss_weights``; e.g. MPO = sigmoid + bco_pair + sft with weights 0.8, 0.2,
    1.0; RPO = sigmoid + sft with weights 1 and α). The rewards reported are the first loss's that has rewards
    (an ``sft`` term has none: ``[sft, sigmoid]`` reports sigmoid's). With
    ``params.pair_weight`` (WPO) every pair's total is multiplied by its weight, as TRL weights each term."""
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0] * len(names) if weights is None else list(weights)
    if not names or len(weights) != len(names):
        raise ValueError(f"{len(weights)} loss weights for {len(names)} losses")
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        raise ValueError(f"loss {unknown[0]!r} is unknown; choose one of {', '.join(sorted(LOSSES))}")
    specs = [LOSSES[n] for n in names]

    def fn(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
        first = None
        total = None
        for spec, weight in zip(specs, weights, strict=True):
            part = spec.fn(policy, reference, params)
            if first is None or (first.chosen_rewards.isnan().all() and not part.chosen_rewards.isnan().all()):
                first = part
            total = part.losses * weight if total is None else total + part.losses * weight
        assert first is not None and total is not None
        if params.pair_weight is not None:
            total = total * params.pair_weight
        return PairLosses(total, first.chosen_rewards, first.rejected_rewards)

    if len(names) == 1 and weights == [1.0]:
        name, description = names[0], specs[0].description
    else:
        name = " + ".join(f"{w:g}·{n}" for n, w in zip(names, weights, strict=True))
        description = f"weighted sum: {name}"
    return LossSpec(name, fn, all(s.reference_free for s in specs), any(s.smoothing for s in specs), description,
                    any(s.needs_smoothing for s in specs), all(s.f_divergence for s in specs),
                    any(s.batch_level for s in specs))


ROUTE_PREFERENCE = 0
ROUTE_SFT = 1


def routed_losses(loss: str | LossSpec, policy: Logps, reference: Logps | None, params: LossParams,
                  route: Tensor, sft: LossSpec | None = None) -> PairLosses:
    """Per-pair losses where each pair's route picks its objective (MixDPO's hard per-sample switch):
    route 0 → ``loss`` (a registered name or an :func:`objective`), route 1 → ``sft`` (default: the ``sft`` loss;
    a run whose loss is sft terms alone gives its weighted sum). Each objective sees only its own pairs, so the
    values of the other route's missing fields (an SFT pair has no rejected log-prob) never enter a computation or
    a gradient."""
    preference = objective(loss) if isinstance(loss, str) else loss  # (objective: a WPO weight applies)
    n = route.shape[0]
    out_losses = policy.chosen.new_zeros(n)
    out_chosen = policy.chosen.new_full((n,), float("nan")).detach()
    out_rejected = out_chosen.clone()
    for code, spec in ((ROUTE_PREFERENCE, preference), (ROUTE_SFT, sft or LOSSES["sft"])):
        index = torch.nonzero(route == code).flatten()
        if index.numel() == 0:
            continue
        weight = None if params.pair_weight is None else params.pair_weight[index]
        part = spec.fn(_take(policy, index), None if reference is None else _take(reference, index),
                       replace(params, beta=params.beta[index], label_smoothing=params.label_smoothing[index],
                               pair_weight=weight))
        out_losses = out_losses.index_put((index,), part.losses)
        out_chosen[index] = part.chosen_rewards
        out_rejected[index] = part.rejected_rewards
    return PairLosses(out_losses, out_chosen, out_rejected)


def _take(logps: Logps, index: Tensor) -> Logps:
    return Logps(logps.chosen[index], logps.rejected[index], logps.chosen_tokens[index],
                 logps.rejected_tokens[index])
