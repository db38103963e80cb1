"""Preference and SFT losses as pure functions of per-pair log-probabilities.

Every loss has one signature, ``loss(policy, reference, params) -> PairLosses``, and returns **per-pair**
values: the caller reduces, dividing the sum by the number of pairs in the *whole* optimizer batch, so
gradient accumulation, packing and the number of processes change nothing (Liger's convention).

``Δ`` below is the DPO log-ratio margin ``(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))``
with summed completion log-probabilities (Rafailov et al., 2023, Eq. 7). β and the label smoothing ε are
per-pair tensors: SP²DPO replaces DPO's global β by β_i (He et al., 2026) and MixDPO sets ε per route
(Pang et al., 2026). With all β_i equal the losses equal TRL's ``DPOTrainer`` ones (tested).

Which loss accepts a non-zero ε is declared with the loss (``smoothing=True``); a config that gives ε to a loss
that would ignore it is rejected when it is loaded, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class LossParams:
    """Per-pair β and ε (tensors of the batch's size) and SimPO's target margin γ."""

    beta: Tensor
    label_smoothing: Tensor
    gamma: float = 0.0


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


LOSSES: dict[str, LossSpec] = {}


def register(name: str, *, reference_free: bool = False, smoothing: bool = False, description: str = ""):
    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = LossSpec(name, fn, reference_free, smoothing, description or (fn.__doc__ or "").strip())
        return fn
    return wrap


def _logratios(policy: Logps, reference: Logps | None) -> tuple[Tensor, Tensor]:
    if reference is None:
        raise ValueError("this loss needs reference log-probs")
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def _rewards(beta: Tensor, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    return (beta * chosen).detach(), (beta * rejected).detach()


@register("sigmoid", smoothing=True, description="DPO; with ε > 0 conservative DPO (cDPO)")
def sigmoid(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """DPO, Rafailov et al. 2023 Eq. 7: −log σ(β_i Δ). With ε > 0, cDPO (Mitchell 2023): the label is
    assumed flipped with probability ε, giving −(1−ε) log σ(β_i Δ) − ε log σ(−β_i Δ) (MixDPO uses ε = 0.1)."""
    chosen, rejected = _logratios(policy, reference)
    logits = params.beta * (chosen - rejected)
    eps = params.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("robust", smoothing=True)
def robust(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """Robust DPO, Chowdhury et al. 2024 Eq. 8: an unbiased estimate of the clean loss under label noise ε,
    (−(1−ε) log σ(β_i Δ) + ε log σ(−β_i Δ)) / (1 − 2ε)."""
    chosen, rejected = _logratios(policy, reference)
    logits = params.beta * (chosen - rejected)
    eps = params.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("hinge")
def hinge(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """SLiC-HF hinge, Zhao et al. 2023 Eq. 3 with the DPO log-ratios: max(0, 1 − β_i Δ)."""
    chosen, rejected = _logratios(policy, reference)
    losses = torch.relu(1 - params.beta * (chosen - rejected))
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("ipo")
def ipo(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """IPO, Azar et al. 2023 Eq. 17: (Δ̄ − 1/(2τ))² with τ = β_i. Δ̄ uses log-ratios averaged per completion
    token, as TRL does (the form the IPO authors confirmed), so the square does not grow with length."""
    chosen, rejected = _logratios(policy, reference)
    delta = chosen / policy.chosen_tokens.clamp(min=1) - rejected / policy.rejected_tokens.clamp(min=1)
    losses = (delta - 1 / (2 * params.beta)) ** 2
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("simpo", reference_free=True, smoothing=True)
def simpo(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """SimPO, Meng et al. 2024 Eq. 6: −log σ(β/|y_w| log π(y_w|x) − β/|y_l| log π(y_l|x) − γ). Reference-free:
    the implicit reward is the length-normalised log-likelihood. ε > 0 smooths the label as in cDPO."""
    chosen = policy.chosen / policy.chosen_tokens.clamp(min=1)
    rejected = policy.rejected / policy.rejected_tokens.clamp(min=1)
    logits = params.beta * (chosen - rejected) - params.gamma
    eps = params.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return PairLosses(losses, *_rewards(params.beta, chosen, rejected))


@register("sft", reference_free=True)
def sft(policy: Logps, reference: Logps | None, params: LossParams) -> PairLosses:
    """MixDPO's SFT route: the length-normalised NLL of the chosen response, −log π(y_w|x) / |y_w| (prompt
    masked). The rejected response is not used; its rewards are reported as NaN."""
    losses = -policy.chosen / policy.chosen_tokens.clamp(min=1)
    nan = torch.full_like(losses, float("nan")).detach()
    return PairLosses(losses, nan, nan)


ROUTE_PREFERENCE = 0
ROUTE_SFT = 1


def routed_losses(loss: str, policy: Logps, reference: Logps | None, params: LossParams,
                  route: Tensor) -> PairLosses:
    """Per-pair losses where each pair's route picks its objective (MixDPO's hard per-sample switch):
    route 0 → ``loss``, route 1 → ``sft``. Each objective sees only its own pairs, so the values of the other
    route's missing fields (an SFT pair has no rejected log-prob) never enter a computation or a gradient."""
    n = route.shape[0]
    out_losses = policy.chosen.new_zeros(n)
    out_chosen = policy.chosen.new_full((n,), float("nan")).detach()
    out_rejected = out_chosen.clone()
    for code, name in ((ROUTE_PREFERENCE, loss), (ROUTE_SFT, "sft")):
        index = torch.nonzero(route == code).flatten()
        if index.numel() == 0:
            continue
        part = LOSSES[name].fn(_take(policy, index), None if reference is None else _take(reference, index),
                               LossParams(params.beta[index], params.label_smoothing[index], params.gamma))
        out_losses = out_losses.index_put((index,), part.losses)
        out_chosen[index] = part.chosen_rewards
        out_rejected[index] = part.rejected_rewards
    return PairLosses(out_losses, out_chosen, out_rejected)


def _take(logps: Logps, index: Tensor) -> Logps:
    return Logps(logps.chosen[index], logps.rejected[index], logps.chosen_tokens[index],
                 logps.rejected_tokens[index])
