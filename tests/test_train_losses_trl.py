"""The loss catalogue against TRL 1.16's own ``DPOTrainer._compute_loss``: loss value and gradient with respect to
the policy's per-token log-probs, in float64, for every loss type, f-divergence, WPO weighting, LD-DPO and
weighted combinations; per-pair β equal to a constant gives the global result exactly, and distinct β_i give
each pair TRL's loss on that pair alone at β = β_i.

TRL is called, not re-typed: its trainer method runs on a stand-in object carrying the attributes it reads, with a
stand-in model whose forward returns the given per-token log-probs (and, for WPO, log Σ_v π(v)²)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from perpair.train.losses import LOSSES, Logps, LossParams, objective, wpo_weights

trl = pytest.importorskip("trl")
if not trl.__version__.startswith("1.16."):
    pytest.skip(f"these tests pin TRL 1.16's losses; installed: {trl.__version__}", allow_module_level=True)

N = 6
LENGTH = 12
DTYPE = torch.float64
TOL = 1e-9

PER_PAIR = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
            "apo_down", "discopop", "sigmoid_norm"]
BATCH_LEVEL = ["aot", "aot_unpaired"]
SMOOTHED = {"robust": 0.2, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}  # ε where TRL reads it
F_LOSSES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"]


@dataclass
class Batch:
    """TRL's padded batch: rows 0..n-1 chosen, n..2n-1 rejected, ``mask`` marks completion tokens."""

    token: torch.Tensor  # policy per-token log-probs (leaf; gradients are compared on it)
    ref_token: torch.Tensor
    log_sum_sq: torch.Tensor  # log Σ_v π(v)² per position, for WPO
    mask: torch.Tensor

    @property
    def n(self) -> int:
        return self.mask.shape[0] // 2


def make_batch(seed: int, n: int = N, dtype=DTYPE) -> Batch:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, LENGTH, (2 * n,), generator=g)
    mask = (torch.arange(LENGTH)[None, :] < counts[:, None]).long()
    token = (-torch.rand(2 * n, LENGTH, generator=g, dtype=DTYPE) * 0.6).to(dtype)
    # the reference differs by a random per-token shift, so log-ratios of both signs occur
    ref_token = (token + torch.randn(2 * n, LENGTH, generator=g, dtype=DTYPE) * 0.3).to(dtype)
    log_sum_sq = token - torch.rand(2 * n, LENGTH, generator=g, dtype=DTYPE).to(dtype)  # a ≤ 0 aligned log-prob
    return Batch(token.requires_grad_(True), ref_token, log_sum_sq, mask)


def pair_subset(batch: Batch, rows: list[int]) -> Batch:
    index = torch.tensor(rows + [batch.n + r for r in rows])
    return Batch(batch.token.detach()[index].clone().requires_grad_(True), batch.ref_token[index],
                 batch.log_sum_sq[index], batch.mask[index])


def trl_loss(batch: Batch, loss_types: list[str], beta: float, *, weights: list[float] | None = None,
             eps: float = 0.0, f_divergence: str = "reverse_kl", f_alpha: float = 0.5, tau: float = 0.05,
             use_weighting: bool = False, ld_alpha: float | None = None) -> torch.Tensor:
    """TRL 1.16's ``_compute_loss`` with the reference computed by TRL too (``precompute_ref_log_probs=False``)."""
    from accelerate import Accelerator
    from trl import DPOTrainer

    rows = 2 * batch.n
    mask = batch.mask

    class StandIn(torch.nn.Module):
        """A model whose forward returns the given per-token log-probs (zero outside completions, as TRL's
        fused head gives at label −100)."""

        is_gradient_checkpointing = False

        def __init__(self, per_token):
            super().__init__()
            self.per_token = per_token

        def forward(self, **kwargs):
            return SimpleNamespace(log_probs=self.per_token * mask, entropy=torch.zeros_like(self.per_token),
                                   mean_logits=torch.zeros_like(self.per_token),
                                   is_top1=torch.zeros_like(mask).bool(), log_sum_sq_probs=batch.log_sum_sq)

    model = StandIn(batch.token)
    trainer = object.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=model, ref_model=StandIn(batch.ref_token), accelerator=Accelerator(cpu=True), aux_loss_enabled=False,
        ld_alpha=ld_alpha, precompute_ref_logps=False, f_divergence_type=f_divergence,
        f_alpha_divergence_coef=f_alpha, loss_types=loss_types, loss_weights=weights or [1.0] * len(loss_types),
        beta=beta, label_smoothing=eps, use_weighting=use_weighting, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
        args=SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None))
    inputs = {"input_ids": torch.zeros(rows, LENGTH + 1, dtype=torch.long),
              "attention_mask": torch.ones(rows, LENGTH + 1, dtype=torch.long),
              # token t of a completion is predicted at position t − 1: TRL shifts the mask by one
              "completion_mask": torch.cat([torch.zeros(rows, 1, dtype=torch.long), mask], 1)}
    return trainer._compute_loss(model, inputs, return_outputs=False)


def _summed(per_token: torch.Tensor, batch: Batch, ld_alpha: float | None) -> Logps:
    """Per-pair summed log-probs; with LD-DPO the split at each pair's shared length min(|y_w|, |y_l|)."""
    n = batch.n
    counts = batch.mask.sum(1)
    full = (per_token * batch.mask).sum(1)
    if ld_alpha is not None:
        shared_len = torch.minimum(counts[:n], counts[n:]).repeat(2)
        head = torch.arange(LENGTH)[None, :] < shared_len[:, None]
        # LD-DPO (Liu et al. 2024, Eq. 9): shared + α·(full − shared); perpair computes it in the packed
        # forward (logprobs.ld_token_weights), here on TRL's padded batch
        shared = (per_token * batch.mask * head).sum(1)
        full = shared + ld_alpha * (full - shared)
    return Logps(full[:n], full[n:], counts[:n], counts[n:])


def ours(batch: Batch, loss_types: list[str], beta, *, weights=None, eps=0.0, f_divergence="reverse_kl",
         f_alpha=0.5, tau=0.05, use_weighting=False, ld_alpha=None, reduce=True) -> torch.Tensor:
    """perpair's loss on the same batch: the mean over pairs (the loop's sum / pairs), or per pair."""
    n = batch.n
    dtype = batch.token.dtype
    beta = torch.full((n,), beta, dtype=dtype) if isinstance(beta, float) else beta
    weight = None
    if use_weighting:
        aligned = ((batch.token - batch.log_sum_sq) * batch.mask).sum(1)
        counts = batch.mask.sum(1)
        weight = wpo_weights(aligned[:n], counts[:n], aligned[n:], counts[n:])
    params = LossParams(beta, torch.full((n,), eps, dtype=dtype), f_divergence=f_divergence, f_alpha=f_alpha,
                        discopop_tau=tau, pair_weight=weight)
    spec = objective(loss_types, weights)
    losses = spec.fn(_summed(batch.token, batch, ld_alpha), _summed(batch.ref_token, batch, ld_alpha), params).losses
    return losses.mean() if reduce else losses


def assert_same(batch: Batch, loss_types: list[str], beta: float, tol: float = TOL, **kwargs) -> None:
    """Value and gradient (w.r.t. the policy's per-token log-probs) of ours and TRL's, to ``tol``."""
    if "exo_pair" in loss_types:
        # TRL 1.16 builds EXO's ε as a float32 tensor (torch.tensor(label_smoothing)), so its log ε and log(1 − ε)
        # carry float32 rounding (~1e-7 relative) into an otherwise float64 loss
        tol = max(tol, 1e-6)
    theirs = trl_loss(batch, loss_types, beta, **kwargs)
    (their_grad,) = torch.autograd.grad(theirs, batch.token)
    mine = ours(batch, loss_types, beta, **kwargs)
    (my_grad,) = torch.autograd.grad(mine, batch.token)
    assert mine.item() == pytest.approx(theirs.item(), abs=tol, rel=tol)
    assert their_grad.abs().sum() > 0  # the comparison is not between two zero gradients
    torch.testing.assert_close(my_grad, their_grad, atol=tol, rtol=tol)


def test_the_catalogue_is_trls():
    """Every loss type TRL 1.16 lists is registered here (plus perpair's own simpo)."""
    import inspect

    from trl import DPOConfig

    listed = inspect.signature(DPOConfig).parameters  # the options exist in this TRL version
    options = {"loss_type", "loss_weights", "ld_alpha", "f_divergence_type", "use_weighting", "discopop_tau"}
    assert options <= set(listed) and "rpo_alpha" not in listed  # RPO is sigmoid + weighted sft in TRL 1.16
    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    trl_types = {t.strip("`' ") for t in help_text.split("values are:")[1].split(". If")[0].split(",")}
    assert trl_types == set(PER_PAIR + BATCH_LEVEL + ["sft"])
    assert trl_types | {"simpo"} == set(LOSSES)


@pytest.mark.parametrize("loss_type", PER_PAIR + BATCH_LEVEL)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_each_loss_equals_trl_value_and_gradient(loss_type, beta):
    batch = make_batch(seed=int(beta * 10) + len(loss_type))
    assert_same(batch, [loss_type], beta, eps=SMOOTHED.get(loss_type, 0.0))


def test_sft_equals_trl_for_equal_lengths():
    """TRL's sft is the token mean over the batch; ours is per pair (MixDPO), equal when lengths are equal."""
    batch = make_batch(seed=3)
    batch.mask = torch.ones_like(batch.mask)
    assert_same(batch, ["sft"], 0.1)


@pytest.mark.parametrize("f_divergence", ["forward_kl", "js_divergence"])
@pytest.mark.parametrize("loss_type", F_LOSSES)
def test_f_divergences_equal_trl(loss_type, f_divergence):
    assert_same(make_batch(seed=11), [loss_type], 0.3, eps=SMOOTHED.get(loss_type, 0.0), f_divergence=f_divergence)


@pytest.mark.parametrize("f_alpha", [0.5, 1.5])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "exo_pair"])
def test_alpha_divergence_equals_trl_in_float32(loss_type, f_alpha):
    """TRL 1.16 computes the α-divergence only for float16/bfloat16/float32 (a float64 input is a KeyError in its
    clamp table), so this comparison runs in float32, to float32's precision."""
    batch = make_batch(seed=12, dtype=torch.float32)
    batch.log_sum_sq = batch.log_sum_sq.float()
    assert_same(batch, [loss_type], 0.3, tol=2e-5, eps=SMOOTHED.get(loss_type, 0.0),
                f_divergence="alpha_divergence", f_alpha=f_alpha)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "bco_pair", "apo_zero", "exo_pair"])
def test_wpo_weighting_equals_trl(loss_type):
    assert_same(make_batch(seed=13), [loss_type], 0.2, eps=SMOOTHED.get(loss_type, 0.0), use_weighting=True)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "nca_pair", "aot"])
def test_ld_dpo_equals_trl(loss_type, ld_alpha):
    assert_same(make_batch(seed=14), [loss_type], 0.2, eps=SMOOTHED.get(loss_type, 0.0), ld_alpha=ld_alpha)


def test_discopop_tau_equals_trl():
    assert_same(make_batch(seed=15), ["discopop"], 0.5, tau=0.3)


@pytest.mark.parametrize(("loss_types", "weights"), [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
    (["sigmoid", "sft"], [1.0, 0.5]),  # RPO with α = 0.5
    (["ipo", "hinge", "apo_down"], None),
])
def test_weighted_combinations_equal_trl(loss_types, weights):
    batch = make_batch(seed=16)
    batch.mask = torch.ones_like(batch.mask)  # sft: per pair here, a batch token mean in TRL (see above)
    assert_same(batch, loss_types, 0.2, weights=weights)


@pytest.mark.parametrize(("loss_types", "weights"), [(["sigmoid", "bco_pair"], [0.8, 0.2]),
                                                     (["ipo", "apo_down", "nca_pair"], None)])
def test_weighted_combinations_with_wpo_equal_trl(loss_types, weights):
    """WPO weights every term. (TRL 1.16 cannot run WPO with ``sft`` or ``hinge`` at all: its in-place ``*=`` hits
    sft's expanded scalar and the ReLU output autograd saved; perpair's weighting is out of place.)"""
    assert_same(make_batch(seed=20), loss_types, 0.2, weights=weights, use_weighting=True)


@pytest.mark.parametrize("loss_type", PER_PAIR + BATCH_LEVEL)
def test_constant_per_pair_beta_is_the_global_loss_exactly(loss_type):
    batch = make_batch(seed=17)
    eps = SMOOTHED.get(loss_type, 0.0)
    vector = torch.full((N,), 0.3, dtype=DTYPE)
    assert torch.equal(ours(batch, [loss_type], vector, eps=eps, reduce=False),
                       ours(batch, [loss_type], 0.3, eps=eps, reduce=False))


@pytest.mark.parametrize("loss_type", PER_PAIR)
def test_distinct_betas_give_each_pair_trls_loss_on_that_pair_alone(loss_type):
    """SP²DPO: pair i's loss (and its gradient) with β_i, and ε_i where the loss reads ε, equals TRL's on pair i
    alone at β = β_i, ε = ε_i."""
    batch = make_batch(seed=18)
    betas = torch.tensor([0.02, 0.05, 0.1, 0.3, 1.0, 2.0], dtype=DTYPE)
    base = SMOOTHED.get(loss_type, 0.0)
    epsilons = [base * (1 + i / 4) for i in range(N)]  # distinct ε_i for robust and exo_pair, 0 elsewhere
    params = LossParams(betas, torch.tensor(epsilons, dtype=DTYPE))
    per_pair = LOSSES[loss_type].fn(_summed(batch.token, batch, None), _summed(batch.ref_token, batch, None),
                                    params).losses
    tol = 1e-6 if loss_type == "exo_pair" else TOL  # TRL's float32 ε (see assert_same)
    for i, (b, eps) in enumerate(zip(betas.tolist(), epsilons, strict=True)):
        (mine,) = torch.autograd.grad(per_pair[i], batch.token, retain_graph=True)
        alone = pair_subset(batch, [i])
        theirs = trl_loss(alone, [loss_type], b, eps=eps)
        (their_grad,) = torch.autograd.grad(theirs, alone.token)
        assert per_pair[i].item() == pytest.approx(theirs.item(), abs=tol, rel=tol)
        torch.testing.assert_close(mine[[i, N + i]], their_grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("loss_type", BATCH_LEVEL)
def test_batch_level_per_pair_beta_follows_the_sorted_owner(loss_type):
    """AOT sorts across the batch, so no pair has a loss of its own. The documented rule: the k-th sorted term takes
    the β of the pair owning the k-th smallest policy margin (aot) / chosen log-ratio (aot_unpaired) and counts as
    that pair's. The owners do not depend on β, so with distinct β_i pair i's term is the term it gets when every
    pair has β_i; and that uniform-β batch is TRL's loss (TRL reports only the mean)."""
    batch = make_batch(seed=19)
    betas = torch.tensor([0.02, 0.05, 0.1, 0.3, 1.0, 2.0], dtype=DTYPE)
    per_pair = ours(batch, [loss_type], betas, eps=0.1, reduce=False)
    for i, b in enumerate(betas.tolist()):
        uniform = ours(batch, [loss_type], b, eps=0.1, reduce=False)
        assert per_pair[i].item() == pytest.approx(uniform[i].item(), abs=TOL)
        assert uniform.mean().item() == pytest.approx(trl_loss(batch, [loss_type], b, eps=0.1).item(), abs=TOL)


def test_loss_flags_and_combination_errors():
    assert LOSSES["exo_pair"].needs_smoothing and not LOSSES["sigmoid"].needs_smoothing
    assert LOSSES["aot"].batch_level and LOSSES["aot_unpaired"].batch_level and not LOSSES["sigmoid"].batch_level
    assert {n for n, s in LOSSES.items() if s.f_divergence} == set(F_LOSSES) | {"sft"}
    combined = objective(["sigmoid", "aot"], [1.0, 0.5])
    assert combined.batch_level and combined.smoothing and not combined.f_divergence
    with pytest.raises(ValueError, match="2 loss weights for 1 losses"):
        objective(["sigmoid"], [1.0, 2.0])
    with pytest.raises(ValueError, match="'nope' is unknown"):
        objective(["sigmoid", "nope"])


def test_trl_ignores_label_smoothing_for_sigmoid_and_ours_is_cdpo():
    """The README's claim: TRL 1.16's sigmoid loss is the same with ε = 0.1 as with 0, while perpair's sigmoid with
    ε is cDPO, −(1−ε) log σ(z) − ε log σ(−z) with z = βΔ. Checked through TRL: (1−2ε)·robust is
    −(1−ε) log σ(z) + ε log σ(−z), so cDPO = (1−2ε)·robust + 2ε·(TRL's sigmoid with chosen and rejected swapped)."""
    batch = make_batch(seed=21)
    assert trl_loss(batch, ["sigmoid"], 0.3, eps=0.1).item() == trl_loss(batch, ["sigmoid"], 0.3).item()
    cdpo = ours(batch, ["sigmoid"], 0.3, eps=0.1)
    assert abs(cdpo.item() - ours(batch, ["sigmoid"], 0.3).item()) > 1e-3
    robust = trl_loss(batch, ["robust"], 0.3, eps=0.1)
    n = batch.n
    swap = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])  # chosen ↔ rejected: z → −z
    swapped = Batch(batch.token.detach()[swap].requires_grad_(True), batch.ref_token[swap], batch.log_sum_sq[swap],
                    batch.mask[swap])
    minus = trl_loss(swapped, ["sigmoid"], 0.3)
    assert cdpo.item() == pytest.approx((0.8 * robust + 0.2 * minus).item(), abs=TOL)
