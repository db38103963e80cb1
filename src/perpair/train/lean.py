"""Leaner activations for training: save fewer tensors for the backward, recompute cheap ones.

Autograd keeps, per decoder layer, every intermediate that some backward formula reads. Two of them are pure
elementwise work and cost almost nothing to recompute, yet they hold a quarter to a third of the activations:

* **SwiGLU + down projection** (``down(silu(gate) · up)``): autograd saves ``gate``, ``silu(gate)``, ``up`` and
  the product, four ``[tokens, intermediate]`` tensors. :class:`SwiGLUDown` saves ``gate`` and ``up`` only and
  recomputes ``silu(gate) · up`` in the backward (no matmul is recomputed).
* **SwiGLU, recomputed** (``recompute_mlp``): :class:`RecomputedSwiGLU` saves only the MLP's input and
  recomputes ``gate`` and ``up`` in the backward: two more matmuls of ``tokens × hidden × intermediate`` per
  layer (about a sixth more matmul work per step) for about 40% less activation memory than the above. With a
  ``keep_budget``, the last MLPs of the model keep ``gate`` and ``up`` instead, as many as that forward's outputs
  fit in the budget (:func:`keeps_gate_up`): short forwards recompute nothing, long ones recompute in the first
  layers only. The last layers are the ones to keep: their backward runs first, so what they keep is freed while
  few gradients exist yet.
* **RMSNorm** (``w · x / rms(x)``): autograd saves ``x`` and ``x / rms(x)``; :class:`RMSNormFn` saves ``x`` and
  the per-row ``1 / rms(x)``.
* **The layers that read a norm's output** (the attention's query, key and value projections, the MLP's gate and
  up projections): each saves its input, the norm's ``[tokens, hidden]`` output, beside the norm's own input: two
  such tensors per layer, about 30% of a Llama layer's activations once the above are lean. Here
  (:class:`LinearOnNorm`, and :class:`RecomputedSwiGLU` and :class:`LoraLinear` when their input is a norm's
  output) they save nothing of it: the norm's output carries a :class:`NormSource` (the norm's input and
  ``1 / rms``, which the norm keeps anyway), and the backward recomputes it from that, once for all the layers
  that read it.
* **A LoRA linear layer** (``x Wᵀ + s · (x Aᵀ) Bᵀ``, PEFT's ``lora.Linear``): as modules, the frozen layer and
  the adapter each cast ``x`` under autocast, and the scaling and the sum are two more passes over the
  ``[tokens, out]`` output (and two more in the backward). :class:`LoraLinear` casts ``x`` once, scales the
  rank-``r`` intermediate instead and adds the adapter's product into the output in one ``addmm``; it keeps the
  tensors autograd keeps (benchmarks/RESULTS.md, `make demo`: with the bf16 output projection and float32
  short-sequence attention, the demo's LoRA training 1.37x faster).
* **Casts under autocast**: the readers of a norm's output share one cast of it (:meth:`NormSource.cast`; in the
  backward, :class:`Recomputed` casts once), and with ``cache_casts`` (training's setting) a frozen weight is cast
  once for the run instead of in every forward (:func:`_cast`). Same bits; 5.7% off a forward + backward of the
  demo's LoRA step on a CPU without AMX (benchmarks/RESULTS.md, `make demo`).
* **A LoRA layer's frozen weight packed** (``pack_frozen``, training's setting, on a CPU): instead of that cast,
  the frozen weight is laid out once for oneDNN's prepacked product (:mod:`perpair.onednn`), as the forward reads it
  and transposed, as the backward's input gradient reads it (:class:`FrozenPacks`), where ``F.linear`` and ``@``
  lay it out anew at every call (bfloat16) or hand it to MKL (float32). The same losses to 5 decimals; the demo's
  dpo arm 1.07-1.13x faster a step (README, "Quickstart: `perpair train`").

:func:`lean_activations` patches the modules of a model that compute exactly these functions (checked numerically
on a small random input, once for each set of twins, so a module with other semantics is left alone) and returns
what it patched (:class:`LeanPatches`, which also undoes the patches; :func:`applied` scopes them to a ``with``
block). The results equal the plain modules' up to float rounding, in float32 and under autocast alike: there the
lean functions get their inputs cast as autocast would cast them and run in that dtype. Under LoRA the frozen
modules are patched as well (their activations are still saved, for the gradients of the adapters below them),
except an MLP whose down projection carries an adapter; gate and up projections with adapters leave the MLP patched
without the recomputation, which needs plain linear layers.
"""

from __future__ import annotations

import types
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perpair import onednn
from perpair.train.attention import autocast_dtype


class SwiGLUDown(torch.autograd.Function):
    """``(silu(gate) · up) @ weightᵀ + bias`` saving ``gate`` and ``up`` only."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        hidden = F.silu(gate).mul_(up)
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        return F.linear(hidden, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        gate, up, weight = ctx.saved_tensors
        act = F.silu(gate)
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_weight = grad_2d.t() @ (act * up).reshape(-1, up.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_2d.sum(0)
        grad_hidden = grad_out @ weight
        grad_up = grad_hidden * act if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad_hidden.mul_(up), gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, grad_weight, grad_bias


class RecomputedSwiGLU(torch.autograd.Function):
    """``down(silu(gate(x)) · up(x))`` saving ``x`` only (nothing of it when it is a lean norm's output with a
    :class:`NormSource`): the backward recomputes the gate and up projections (two of the MLP's three matrix
    multiplications) instead of keeping their ``[tokens, intermediate]`` outputs."""

    @staticmethod
    def forward(ctx, x: Tensor, w_gate: Tensor, b_gate: Tensor | None, w_up: Tensor, b_up: Tensor | None,
                w_down: Tensor, b_down: Tensor | None, source: NormSource | None = None) -> Tensor:
        ctx.in_dtype = x.dtype
        x = source.cast(x, w_gate.dtype) if source else x.to(w_gate.dtype)  # (under autocast: weights cast already)
        hidden = F.silu(F.linear(x, w_gate, b_gate)).mul_(F.linear(x, w_up, b_up))
        ctx.save_for_backward(None if source else x, w_gate, b_gate, w_up, b_up, w_down,
                              *(source.tensors if source else ()))
        ctx.recomputed, ctx.has_down_bias = source and source.claim(), b_down is not None
        return F.linear(hidden, w_down, b_down)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, w_gate, b_gate, w_up, b_up, w_down, *norm = ctx.saved_tensors
        if ctx.recomputed is not None:
            x = ctx.recomputed.value(*norm, w_gate.dtype)
        gate, up = F.linear(x, w_gate, b_gate), F.linear(x, w_up, b_up)
        act = F.silu(gate)
        need = ctx.needs_input_grad
        g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w_down = g2.t() @ (act * up).reshape(-1, up.shape[-1]) if need[5] else None
        grad_b_down = g2.sum(0) if ctx.has_down_bias and need[6] else None
        grad_hidden = grad_out @ w_down
        grad_up = grad_hidden * act
        grad_gate = torch.ops.aten.silu_backward(grad_hidden.mul_(up), gate)
        del gate, up, act, grad_hidden
        grad_x = (grad_gate @ w_gate + grad_up @ w_up).to(ctx.in_dtype) if need[0] else None
        gg2, gu2 = grad_gate.reshape(-1, grad_gate.shape[-1]), grad_up.reshape(-1, grad_up.shape[-1])
        grad_w_gate = gg2.t() @ x2 if need[1] else None
        grad_b_gate = gg2.sum(0) if b_gate is not None and need[2] else None
        grad_w_up = gu2.t() @ x2 if need[3] else None
        grad_b_up = gu2.sum(0) if b_up is not None and need[4] else None
        return grad_x, grad_w_gate, grad_b_gate, grad_w_up, grad_b_up, grad_w_down, grad_b_down, None


class RMSNormFn(torch.autograd.Function):
    """``weight · x · rsqrt(mean(x²) + eps)`` (in float32, as Llama's RMSNorm) saving ``x`` and the rsqrt.
    Returns the output and the rsqrt (not differentiable): with the input, what :class:`NormSource` carries for
    :class:`Recomputed` to compute the output again."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return _normed(x, weight, rstd), rstd

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_rstd: Tensor | None):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad_out * weight).float()
            grad_x = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


def _normed(x: Tensor, weight: Tensor, rstd: Tensor) -> Tensor:
    """RMSNorm's output from its input and rsqrt: what :class:`RMSNormFn` returns and :class:`NormSource`
    recomputes, with the same operations (so the same bits)."""
    return weight * (x.float() * rstd).to(x.dtype)


class NormSource:
    """What a lean RMSNorm's output is recomputed from: the norm's input, rsqrt and weight (tensors the norm's own
    backward keeps), attached to the output for the layers that read it. Each of them saves these tensors (with
    ``save_for_backward``, so gradient checkpointing's hooks see them) and holds the :class:`Recomputed` of
    :meth:`claim`, which computes the output once for all of them."""

    __slots__ = ("tensors", "version", "recomputed", "_casts")

    def __init__(self, x: Tensor, rstd: Tensor, weight: Tensor, version: int):
        self.tensors, self.version = (x, rstd, weight), version
        self.recomputed = Recomputed()
        self._casts: dict[torch.dtype, Tensor] = {}

    def claim(self) -> Recomputed:
        self.recomputed.claims += 1
        return self.recomputed

    def cast(self, normed: Tensor, dtype: torch.dtype) -> Tensor:
        """``normed`` (the output this source is attached to) in ``dtype``, cast once for all its readers: under
        autocast the query, key and value projections (gate and up) each cast the same output. Held as long as
        the output is (the forward of the block that reads it)."""
        if normed.dtype == dtype:
            return normed
        if (cast := self._casts.get(dtype)) is None:
            cast = self._casts[dtype] = normed.to(dtype)
        return cast


class Recomputed:
    """A norm's output in the backward, shared by the layers that read it: the first of their backwards to need it
    computes it (:meth:`value`), in the dtype it asks for, the last drops it, so it lives only while those backwards
    run. Holds no tensor before or after."""

    __slots__ = ("claims", "_values")

    def __init__(self):
        self.claims = 0
        self._values: dict[torch.dtype | None, Tensor] = {}

    def value(self, x: Tensor, rstd: Tensor, weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The output, cast to ``dtype`` if given (under autocast every reader asks for the same one: one cast)."""
        if (value := self._values.get(dtype)) is None:
            value = _normed(x, weight, rstd)
            value = value if dtype is None else value.to(dtype)
        self.claims -= 1
        if self.claims > 0:
            self._values[dtype] = value
        else:
            self._values.clear()
        return value


def norm_source(x: Tensor) -> NormSource | None:
    """The :class:`NormSource` of ``x`` if ``x`` is a lean RMSNorm's output, unchanged since (a tensor modified in
    place after the norm is saved as it is), and a backward will need it; else None."""
    source = getattr(x, "_perpair_norm", None)
    if source is None or x._version != source.version or not (torch.is_grad_enabled() and x.requires_grad):
        return None
    return source


class LinearOnNorm(torch.autograd.Function):
    """``normed @ weightᵀ + bias`` where ``normed`` is a lean RMSNorm's output: saves ``weight`` and the norm's
    tensors (:class:`NormSource`), not ``normed``, which the weight's gradient recomputes."""

    @staticmethod
    def forward(ctx, normed: Tensor, weight: Tensor, bias: Tensor | None, source: NormSource) -> Tensor:
        ctx.save_for_backward(weight, *source.tensors)
        ctx.recomputed, ctx.has_bias, ctx.in_dtype = source.claim(), bias is not None, normed.dtype
        return F.linear(source.cast(normed, weight.dtype), weight, bias)  # (autocast: weight and bias cast already)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, *norm = ctx.saved_tensors
        need = ctx.needs_input_grad
        normed = ctx.recomputed.value(*norm, weight.dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_normed = (grad_out @ weight).to(ctx.in_dtype) if need[0] else None
        grad_weight = g2.t() @ normed.reshape(-1, normed.shape[-1]) if need[1] else None
        grad_bias = g2.sum(0) if ctx.has_bias and need[2] else None
        return grad_normed, grad_weight, grad_bias, None


class FrozenPacks(NamedTuple):
    """A frozen weight ``[out, in]`` packed for oneDNN (:mod:`perpair.onednn`) in ``dtype``, as the forward reads it
    and transposed, as the backward's input gradient reads it."""

    forward: Tensor
    backward: Tensor
    dtype: torch.dtype


class LoraLinear(torch.autograd.Function):
    """``x @ weightᵀ + bias + scale · (x @ aᵀ) @ bᵀ``, saving ``x`` once and the ``[tokens, r]`` intermediate. With
    ``packs`` (a frozen weight, on a CPU) the two products with the weight run prepacked, and ``weight`` is None."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, a: Tensor, b: Tensor, scale: float,
                source: NormSource | None = None, packs: FrozenPacks | None = None) -> Tensor:
        ctx.in_dtype = x.dtype
        dtype = packs.dtype if packs is not None else weight.dtype
        x = source.cast(x, dtype) if source else x.to(dtype)  # (under autocast: weights cast already)
        x2 = x.reshape(-1, x.shape[-1])
        low = (x2 @ a.t()).mul_(scale)
        base = F.linear(x2, weight, bias) if packs is None else onednn.linear(x2, packs.forward, bias)
        out = torch.addmm(base, low, b.t())
        ctx.save_for_backward(None if source else x, weight, a, b, low, *(source.tensors if source else ()))
        ctx.scale, ctx.has_bias, ctx.recomputed = scale, bias is not None, source and source.claim()
        ctx.packs, ctx.dtype = packs, dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, a, b, low, *norm = ctx.saved_tensors
        if ctx.recomputed is not None:
            x = ctx.recomputed.value(*norm, ctx.dtype)
        need = ctx.needs_input_grad
        g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_low = (g2 @ b).mul_(ctx.scale)  # the gradient of x @ aᵀ: [tokens, r]
        grad_x = None
        if need[0]:
            through = g2 @ weight if ctx.packs is None else onednn.linear(g2.contiguous(), ctx.packs.backward)
            grad_x = torch.addmm(through, grad_low, a).view(x.shape).to(ctx.in_dtype)
        grad_weight = g2.t() @ x2 if need[1] else None
        grad_bias = g2.sum(0) if ctx.has_bias and need[2] else None
        grad_a = grad_low.t() @ x2 if need[3] else None
        grad_b = g2.t() @ low if need[4] else None
        return grad_x, grad_weight, grad_bias, grad_a, grad_b, None, None, None


DEFAULT_RECOMPUTE_MLP = True  # lean_activations' default; a run's (TrainConfig.recompute_mlp null) is budgeted:
# the last MLPs keep gate/up within this share of the training state (weights, gradients, AdamW moments), counted
# in each forward. On the README's benchmark (SmolLM2-135M fp32, max length 512) that is 308 MiB: a 1,540-token
# forward keeps them in the last 17 of 30 layers, a 464-token one in all; keeping every layer's would take 0.23 GiB
# more at the peak. (10% until the output layer's gradient got one tensor for the run, logprobs.WeightGradInto:
# 15% peaks where 10% did before it, with steps 2.4% faster.)
RECOMPUTE_SHARE = 0.15
KINDS = ("mlp", "mlp_recomputed", "norm", "lora", "linear")  # what a patched module computes (its ``_lean_kind``)
# what patching sets on a module, removed again by LeanPatches.undo (or at once if the module is left unpatched)
PATCH_ATTRIBUTES = ("_plain_forward", "_plain_forward_own", "_lean_kind", "_lean_eps", "_lean_rank", "_lean_budget",
                    "_lean_casts", "_lean_pack")


def _cast(module: nn.Module, tensors: tuple[Tensor | None, ...], dtype: torch.dtype) -> tuple[Tensor | None, ...]:
    """``tensors`` in ``dtype``, as autocast casts them. With :func:`lean_activations`' ``cache_casts``, the cast
    of a frozen parameter (a LoRA run's base weights) is kept on the module and reused while the parameter is
    unchanged, instead of cast again in every forward: autocast caches only the casts of trainable weights, and
    only within one ``autocast`` block. At the peak of a step this holds no more than before (each forward's
    casts were saved for its backward); :meth:`LeanPatches.undo` drops them."""
    cache = vars(module).get("_lean_casts")
    return tuple(None if t is None else cached_cast(cache, t, dtype) if cache is not None else t.to(dtype)
                 for t in tensors)


def cached_cast(cache: dict, t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``; for a frozen parameter, the cast kept in ``cache`` while the parameter is unchanged."""
    if not isinstance(t, nn.Parameter) or t.requires_grad or t.dtype == dtype:
        return t.to(dtype)
    return _kept(cache, (id(t), dtype), t, lambda: t.to(dtype))


def _kept(cache: dict, key: tuple, t: Tensor, make):
    """``make()``, kept in ``cache`` under ``key`` while ``t`` (a frozen tensor it is made from) is unchanged."""
    state = (t._version, t.data_ptr())  # a change in place moves the version; a new ``.data`` the storage
    entry = cache.get(key)
    if entry is None or entry[0]() is not t or entry[1] != state:
        entry = cache[key] = (weakref.ref(t), state, make())
    return entry[2]


def _mlp_forward(self, x: Tensor) -> Tensor:
    # gate and up are the module's own layers (with their adapters under LoRA), cast by autocast if it is on
    args = (self.gate_proj(x), self.up_proj(x), self.down_proj.weight, self.down_proj.bias)
    if (dtype := autocast_dtype(x)) is None:
        return SwiGLUDown.apply(*args)
    # autocast would run the down projection in its dtype: cast as it would, then keep it out of the function
    with torch.autocast(x.device.type, enabled=False):
        return SwiGLUDown.apply(*_cast(self, args, dtype))


def _recomputed_mlp_forward(self, x: Tensor) -> Tensor:
    if keeps_gate_up(self, x):
        return _mlp_forward(self, x)
    g, u, d = self.gate_proj, self.up_proj, self.down_proj
    weights = (g.weight, g.bias, u.weight, u.bias, d.weight, d.bias)
    if (dtype := autocast_dtype(x)) is None:
        return RecomputedSwiGLU.apply(x, *weights, norm_source(x))
    with torch.autocast(x.device.type, enabled=False):  # the three projections in autocast's dtype, as autocast
        return RecomputedSwiGLU.apply(x, *_cast(self, weights, dtype), norm_source(x))


def _norm_forward(self, x: Tensor) -> Tensor:
    # RMSNorm computes in float32 whatever autocast says (as the plain module does: its ops are float32 ones)
    with torch.autocast(x.device.type, enabled=False):
        out, rstd = RMSNormFn.apply(x, self.weight, float(self._lean_eps))
    if out.requires_grad:  # the layers reading it save this instead of it (see norm_source)
        out._perpair_norm = NormSource(x, rstd, self.weight, out._version)
    return out


def _linear_forward(self, x: Tensor) -> Tensor:
    if (source := norm_source(x)) is None:
        return self._plain_forward(x)
    if (dtype := autocast_dtype(x)) is None:
        return LinearOnNorm.apply(x, self.weight, self.bias, source)
    with torch.autocast(x.device.type, enabled=False):  # the product in autocast's dtype, as autocast would
        return LinearOnNorm.apply(x, *_cast(self, (self.weight, self.bias), dtype), source)


def _plain_lora_adapter(module: nn.Module) -> str | None:
    """The one active adapter of a PEFT ``lora.Linear`` in its plain form (no dropout, variant such as DoRA,
    adapter bias, merge or mixed batch), or None. Asked at every call: adapters can be merged or switched later."""
    active = getattr(module, "active_adapters", None)
    if getattr(module, "merged", True) or getattr(module, "disable_adapters", True) or not active or len(active) != 1:
        return None
    name = active[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}) or \
            not isinstance(module.lora_dropout[name], nn.Identity) or module.lora_B[name].bias is not None or \
            module.lora_A[name].bias is not None:
        return None
    return name


def _lora_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    if args or kwargs or (name := _plain_lora_adapter(self)) is None:
        return self._plain_forward(x, *args, **kwargs)
    base = self.base_layer
    dtype = autocast_dtype(x)
    packs = _frozen_packs(self, base.weight, dtype or base.weight.dtype, x)
    weights = (None if packs else base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight)
    scale, source = float(self.scaling[name]), norm_source(x)
    if dtype is None:
        return LoraLinear.apply(x, *weights, scale, source, packs)
    with torch.autocast(x.device.type, enabled=False):  # every product in autocast's dtype, as autocast would
        return LoraLinear.apply(x, *_cast(self, weights, dtype), scale, source, packs)


def _frozen_packs(module: nn.Module, weight: Tensor, dtype: torch.dtype, x: Tensor) -> FrozenPacks | None:
    """With ``pack_frozen`` (:func:`lean_activations`): a frozen weight on the CPU packed for oneDNN in ``dtype``,
    once for the run (kept in the module's cast cache while the weight is unchanged, like :func:`cached_cast`)."""
    cache = vars(module).get("_lean_casts")
    if cache is None or not vars(module).get("_lean_pack") or weight.requires_grad or x.device.type != "cpu" \
            or weight.device.type != "cpu" or not onednn.supported(dtype):
        return None

    def make() -> FrozenPacks:
        w, rows = weight.detach().to(dtype), x.numel() // x.shape[-1]
        return FrozenPacks(onednn.pack(w, rows), onednn.pack(w.t().contiguous(), rows), dtype)

    return _kept(cache, ("packs", id(weight), dtype), weight, make)


LEAN_FORWARDS = {"mlp": _mlp_forward, "mlp_recomputed": _recomputed_mlp_forward, "norm": _norm_forward,
                 "lora": _lora_forward, "linear": _linear_forward}


def _is_lora_linear(module: nn.Module) -> bool:
    """A PEFT ``lora.Linear`` over a plain ``nn.Linear`` whose adapter is plain now (see _plain_lora_adapter)."""
    return type(getattr(module, "base_layer", None)) is nn.Linear and hasattr(module, "lora_A") and \
        hasattr(module, "scaling") and _plain_lora_adapter(module) is not None


def _mlp_kind(module: nn.Module, recompute_mlp: bool) -> str | None:
    """How a SwiGLU MLP can be patched: ``mlp_recomputed`` needs three plain linear layers, ``mlp`` a plain down
    projection (gate and up may carry LoRA adapters); None if it is no SwiGLU MLP or its down projection is
    adapted (the lean function reads the down projection's weight, which would skip the adapter)."""
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    if not all(isinstance(p, nn.Module) for p in parts) or type(parts[2]) is not nn.Linear or not callable(act):
        return None
    probe = torch.linspace(-6, 6, 49)
    try:  # nn.SiLU, transformers' SiLUActivation, …: any activation that computes silu
        if not torch.equal(act(probe), F.silu(probe)):
            return None
    except (RuntimeError, TypeError):
        return None
    return "mlp_recomputed" if recompute_mlp and all(type(p) is nn.Linear for p in parts) else "mlp"


def keeps_gate_up(module: nn.Module, x: Tensor) -> bool:
    """Does this recomputing MLP keep its gate and up outputs for input ``x`` (see :func:`keeps_for`)?"""
    return keeps_for(module, x.numel() // x.shape[-1], (autocast_dtype(x) or x.dtype).itemsize)


def keeps_for(module: nn.Module, tokens: int, element_size: int) -> bool:
    """Whether the gate and up outputs of a ``tokens``-token forward, of the MLPs from this one to the model's last
    (``_lean_rank`` + 1 of them, all of one size), fit in its ``_lean_budget`` bytes."""
    per_mlp = 2 * tokens * module.down_proj.in_features * element_size
    return bool(module._lean_budget) and (module._lean_rank + 1) * per_mlp <= module._lean_budget


def kept_gate_up(model: nn.Module, tokens: int, element_size: int) -> tuple[int, int]:
    """``(keeping, recomputing)``: how many of ``model``'s recomputing MLPs keep their gate and up outputs in a
    ``tokens``-token forward, and how many there are."""
    mlps = [m for m in model.modules() if vars(m).get("_lean_kind") == "mlp_recomputed"]
    return sum(keeps_for(m, tokens, element_size) for m in mlps), len(mlps)


def training_state_bytes(model: nn.Module) -> int:
    """The memory a run holds whatever its forwards: the weights, and for each trained one its gradient and
    AdamW's two moments (in the parameter's dtype, as torch's AdamW keeps them)."""
    return sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for p in model.parameters())


def mlp_keep_budget(model: nn.Module) -> int:
    """``recompute_mlp`` unset: the bytes the last MLPs may keep their gate and up outputs in, in any forward,
    :data:`RECOMPUTE_SHARE` of :func:`training_state_bytes` (call with the trained parameters marked, LoRA
    adapters in)."""
    return int(RECOMPUTE_SHARE * training_state_bytes(model))


def _not_reading_norms(model: nn.Module) -> set[int]:
    """Linear layers not to give the ``linear`` forward: the output embedding (perpair's log-probs read its weight;
    its input is the last norm's output gathered at completion positions, a copy) and the layers inside a LoRA
    layer, frozen or adapter (the LoRA layer is patched as ``lora``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    inner = {id(part) for m in model.modules() if hasattr(m, "lora_A") for part in m.modules() if part is not m}
    return inner | ({id(head)} if head is not None else set())


def _norm_eps(module: nn.Module) -> float | None:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or not isinstance(eps, float):
        return None
    return eps if type(module).__name__.endswith("RMSNorm") else None


def _same(module: nn.Module, lean, width: int) -> bool:
    """Does the lean forward give the module's own result (and gradient) on a random input? (In eval mode: an
    adapter's dropout would make two calls differ.)"""
    param = next(module.parameters())
    x = torch.randn(3, 5, width, dtype=param.dtype, device=param.device, generator=torch.Generator().manual_seed(0)
                    if param.device.type == "cpu" else None)
    training = module.training
    module.eval()
    try:
        with torch.enable_grad():
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            plain, mine = module._plain_forward(a), lean(module, b)
            (plain * x[..., :1]).sum().backward()
            (mine * x[..., :1]).sum().backward()
    finally:
        module.train(training)
        module.zero_grad(set_to_none=True)
    return plain.shape == mine.shape and torch.allclose(plain, mine, rtol=1e-4, atol=1e-5) and \
        torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5)


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_MODULE_STATE = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", *_HOOKS, *PATCH_ATTRIBUTES}


def _twin_key(module: nn.Module, kind: str) -> tuple | None:
    """What :func:`_same`'s verdict on ``module`` depends on, so that twins (the 30 MLPs of a 30-layer model, its 210
    linear layers of four shapes) are checked once, not 300 times (1.2 s of every run): for the module and each
    submodule, its class, the shapes, dtypes and devices of its parameters and buffers, and its other attributes
    (values where plain, identity otherwise: a shared config or function is one object). Not the weights' values,
    which the lean and plain forwards read alike. None (check it alone) where a forward set on the instance or a
    hook could make it differ from its twins (a hook on a submodule, which a lean forward reading the submodule's
    weights would bypass)."""
    key: list = [kind]
    for name, m in module.named_modules():
        if "forward" in vars(m) or any(vars(m).get(h) for h in _HOOKS):
            return None
        tensors = tuple((n, type(t), tuple(t.shape), t.dtype, t.device, t.requires_grad) if t is not None else (n,)
                        for n, t in (*m._parameters.items(), *m._buffers.items()))
        attributes = tuple((k, _plain_value(v)) for k, v in sorted(vars(m).items())
                           if k not in _MODULE_STATE)
        key.append((name, type(m), tensors, attributes))
    return tuple(key)


def _plain_value(value):
    """``value`` as a hashable key part: plain values as they are, containers of them element by element, tensors by
    shape and dtype, anything else by identity."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, dict):
        return ("dict", tuple((_plain_value(k), _plain_value(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return (type(value).__name__, tuple(_plain_value(v) for v in items))
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    return ("object", id(value))


@dataclass(frozen=True)
class LeanPatches:
    """Modules given a lean forward, and of which kind (:data:`KINDS`); :meth:`undo` gives them back their own."""

    modules: tuple[nn.Module, ...]
    kinds: tuple[str, ...]

    @classmethod
    def of(cls, modules: list[nn.Module]) -> LeanPatches:
        return cls(tuple(modules), tuple(m._lean_kind for m in modules))

    def counts(self) -> dict[str, int]:
        """How many modules of each kind run their lean forward now: all 0 = the option did nothing here (or
        something has set other forwards since)."""
        kinds = Counter(kind for module, kind in zip(self.modules, self.kinds, strict=True) if _in_place(module))
        return {kind: kinds[kind] for kind in KINDS}

    def undo(self) -> None:
        for module in self.modules:
            if "_lean_kind" not in vars(module):
                continue  # undone already
            if _in_place(module):  # else a forward set since (a hook, Transformers' kernels) stays
                if module._plain_forward_own:  # the instance had a forward of its own (a hook's): put it back
                    module.forward = module._plain_forward
                else:
                    del module.forward  # the class's forward again
            for name in PATCH_ATTRIBUTES:
                vars(module).pop(name, None)


def _in_place(module: nn.Module) -> bool:
    """The module's forward is still the lean one patching gave it."""
    forward = vars(module).get("forward")
    return "_lean_kind" in vars(module) and getattr(forward, "__self__", None) is module and \
        getattr(forward, "__func__", None) is LEAN_FORWARDS[module._lean_kind]


def lean_patches(model: nn.Module) -> LeanPatches:
    """The modules of ``model`` patched now (by one or several :func:`lean_activations` calls)."""
    return LeanPatches.of([m for m in model.modules() if "_lean_kind" in vars(m)])


def lean_activations(model: nn.Module, recompute_mlp: bool = DEFAULT_RECOMPUTE_MLP,
                     keep_budget: int = 0, cache_casts: bool = False, pack_frozen: bool = False) -> LeanPatches:
    """Patch the SwiGLU MLPs, RMSNorms and linear layers of ``model`` in place (see the module docstring); returns
    the modules this call patched. Modules whose result the lean version does not reproduce are left unchanged.
    ``recompute_mlp``: the MLPs save only their input and recompute the gate and up projections in the backward,
    but the last ones keep them while that forward's fit in ``keep_budget`` bytes (see :func:`keeps_gate_up`).
    A model wrapped in LoRA adapters must be patched after wrapping (an MLP patched before would run its down
    projection without its adapter). ``cache_casts``: under autocast, the patched modules cast each frozen weight
    once and keep the cast until :meth:`LeanPatches.undo` (see :func:`_cast`), for a caller that changes frozen
    weights meanwhile only through the parameters themselves (a write through ``.data`` is not seen; training does
    not change them at all). ``pack_frozen`` (with ``cache_casts``): on a CPU the frozen base weights of LoRA layers
    are packed for oneDNN once, as the forward and the backward read them (:class:`FrozenPacks`), instead of being
    laid out anew by every product, if the two copies fit in half of the memory available."""
    patched = []
    pack = pack_frozen and cache_casts and 2 * 2 * 4 * sum(  # two copies of each, float32 at most
        m.base_layer.weight.numel() for m in model.modules() if _is_lora_linear(m)
        and not m.base_layer.weight.requires_grad) <= onednn.available_memory()
    not_linear = _not_reading_norms(model)
    recomputing = [m for m in model.modules() if "_lean_kind" not in vars(m) and
                   _mlp_kind(m, recompute_mlp) == "mlp_recomputed"]
    for rank, module in enumerate(reversed(recomputing)):
        module._lean_rank, module._lean_budget = rank, keep_budget
    verdicts: dict[tuple, bool] = {}  # _twin_key → what _same said of the first module with that key
    for module in model.modules():
        if "_lean_kind" in vars(module):
            continue
        if (kind := _mlp_kind(module, recompute_mlp)) is not None:
            width = module.down_proj.out_features  # the hidden size (gate_proj may be an adapter wrapper)
        elif (eps := _norm_eps(module)) is not None:
            kind, width = "norm", module.weight.shape[0]
            module._lean_eps = eps
        elif _is_lora_linear(module):
            kind, width = "lora", module.base_layer.in_features
        elif type(module) is nn.Linear and id(module) not in not_linear:
            kind, width = "linear", module.in_features
        else:
            continue
        lean = LEAN_FORWARDS[kind]
        module._plain_forward_own = "forward" in vars(module)
        module._plain_forward = module.forward
        twins = _twin_key(module, kind)
        same = verdicts.get(twins) if twins is not None else None
        if same is None:
            same = _same(module, lean, width)
            if twins is not None:
                verdicts[twins] = same
        if same:
            module.forward = types.MethodType(lean, module)
            module._lean_kind = kind
            if cache_casts:
                module._lean_casts = {}
                if kind == "lora" and pack:
                    module._lean_pack = True
            patched.append(module)
        else:
            for name in PATCH_ATTRIBUTES:
                vars(module).pop(name, None)
    return LeanPatches.of(patched)


@contextmanager
def applied(model: nn.Module, recompute_mlp: bool = DEFAULT_RECOMPUTE_MLP) -> Iterator[LeanPatches]:
    """:func:`lean_activations` for the duration of a ``with`` block: the patched modules get their own forward
    back at its end, whatever happens inside."""
    patches = lean_activations(model, recompute_mlp)
    try:
        yield patches
    finally:
        patches.undo()
