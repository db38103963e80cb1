"""Tree attention: a packed row of pairs attended block by block, with no mask over the row.

A pair's prompt attends causally to itself, its chosen tokens to the prompt and themselves, its rejected tokens
to the prompt and themselves (never to the chosen ones), and no pair sees another. So the prompt is computed
once for both responses and the result equals two separate ``prompt + response`` sequences. :func:`tree_attention`
is registered with Transformers' ``AttentionInterface`` by :func:`use_tree_attention`. On a GPU each block is one
SDPA call with PyTorch's lower-right causal bias, which its flash or memory-efficient kernel runs
(:func:`tree_attention_sdpa`); on a CPU the blocks become mask-free pieces run by PyTorch's flash-attention
kernels and merged by their log-sum-exps (:class:`CpuTreeAttention`). :func:`tree_attention_masked` is the
plain masked version, kept as the reference the tests compare with.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perpair.errors import PerpairError

TREE_ATTENTION = "perpair_tree"


@dataclass(frozen=True)
class Block:
    """Rows of a packed row that attend together: ``queries`` attend causally to themselves, after all of
    ``prefix`` (e.g. a response after its prompt)."""

    queries: tuple[int, int]  # [start, end)
    prefix: tuple[int, int] | None = None


@dataclass(frozen=True)
class Piece:
    """One mask-free attention call: ``queries`` attend to ``keys``, causally (the same rows) or to all of them.
    ``first``: the first piece of these queries (the others are merged into it)."""

    queries: tuple[int, int]
    keys: tuple[int, int]
    causal: bool
    first: bool


@dataclass
class TreeLayout:
    """What :func:`tree_attention` needs to run a packed row: its blocks, in row order. ``calls`` counts the
    attention layers that used it (a model that bypasses the attention interface leaves it at 0)."""

    blocks: tuple[Block, ...]
    calls: int = 0
    window: tuple[int, str] | None = None  # the shortest sliding window a layer attended within, and its class

    @property
    def longest(self) -> int:
        """Tokens of the longest sequence in the row (a prefix and its block)."""
        return max((b.queries[1] - b.queries[0] + (b.prefix[1] - b.prefix[0] if b.prefix else 0)
                    for b in self.blocks), default=0)

    @cached_property
    def pieces(self) -> tuple[Piece, ...]:
        """The blocks as mask-free pieces: every block causal on itself, then every block on its prefix, with
        adjacent blocks of the same prefix in one piece (a pair's two responses on their shared prompt)."""
        pieces = [Piece(b.queries, b.queries, causal=True, first=True) for b in self.blocks]
        on_prefix: list[Piece] = []
        for b in self.blocks:
            if b.prefix is None:
                continue
            last = on_prefix[-1] if on_prefix else None
            if last is not None and last.keys == b.prefix and last.queries[1] == b.queries[0]:
                on_prefix[-1] = Piece((last.queries[0], b.queries[1]), b.prefix, causal=False, first=False)
            else:
                on_prefix.append(Piece(b.queries, b.prefix, causal=False, first=False))
        return tuple(pieces + on_prefix)


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast computes in on ``x``'s device now, or None when autocast is off there."""
    device = x.device.type
    on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    return torch.get_autocast_dtype(device) if on else None


# Under autocast on a CPU, a row whose longest sequence (prompt + response) has at most this many tokens is
# attended in float32 (see tree_attention).
CPU_FLOAT32_ATTENTION_MAX = 512

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class CpuTreeAttention(torch.autograd.Function):
    """Tree attention on a CPU, piece by piece (:attr:`TreeLayout.pieces`) with PyTorch's flash-attention kernels.

    A response's softmax runs over two disjoint key sets, its prompt and itself; each piece returns its output
    and log-sum-exp, and the two are merged as flash attention merges key blocks. The backward runs each piece's
    flash backward with the *merged* output and log-sum-exp, which gives exactly that piece's share of the
    gradients (the decomposition ring attention uses), accumulated into one gradient per input. Compared with a
    masked call per block, no mask is built or read, the causal half of each response is skipped, the prompt's
    keys are not copied beside each response's, and one output is saved instead of one per block.
    """

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, pieces: tuple[Piece, ...],
                scale: float | None) -> Tensor:
        heads, length, dim = query.shape[1:]
        out = query.new_empty(1, length, heads, dim).transpose(1, 2)  # [1, heads, T, dim] over [1, T, heads, dim]
        lse = None
        for piece in pieces:
            q, k = slice(*piece.queries), slice(*piece.keys)
            o, piece_lse = _FLASH_CPU(query[:, :, q], key[:, :, k], value[:, :, k], 0.0, piece.causal, scale=scale)
            if lse is None:
                lse = piece_lse.new_empty(1, heads, length)
            if piece.first:
                out[:, :, q], lse[:, :, q] = o, piece_lse
                continue
            merged = torch.logaddexp(lse[:, :, q], piece_lse)
            out[:, :, q] = (out[:, :, q] * (lse[:, :, q] - merged).exp_().unsqueeze(-1)
                            + o * (piece_lse - merged).exp_().unsqueeze(-1))
            lse[:, :, q] = merged
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.pieces, ctx.scale = pieces, scale
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        query, key, value, out, lse = ctx.saved_tensors
        grad_out = grad_out.transpose(1, 2)
        grad_q, grad_k, grad_v = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        for piece in ctx.pieces:
            q, k = slice(*piece.queries), slice(*piece.keys)
            dq, dk, dv = _FLASH_CPU_BACKWARD(grad_out[:, :, q], query[:, :, q], key[:, :, k], value[:, :, k],
                                             out[:, :, q], lse[:, :, q], 0.0, piece.causal, scale=ctx.scale)
            grad_q[:, :, q] += dq
            grad_k[:, :, k] += dk
            grad_v[:, :, k] += dv
        return grad_q, grad_k, grad_v, None, None


def tree_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                   dropout: float = 0.0, scaling: float | None = None, perpair_tree: TreeLayout | None = None,
                   fallback: str = "sdpa", **kwargs) -> tuple[Tensor, None]:
    """Attention over a packed row of pairs, block by block (see the module docstring). Query ``[1, heads, T,
    dim]``, key and value ``[1, kv_heads, T, dim]``; returns ``[1, T, heads, dim]``, as Transformers' attention
    functions do. Called without a layout (generation, a padded batch), it is the model's own attention."""
    if perpair_tree is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        own = _eager_attention(module) if fallback == "eager" else None
        return (own or ALL_ATTENTION_FUNCTIONS[fallback if fallback in ALL_ATTENTION_FUNCTIONS else "sdpa"])(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise PerpairError(f"{type(module).__name__} uses a soft-capped or sink attention; perpair's packed tree "
                           "attention supports plain causal attention only")
    window = sliding_window(module, kwargs)
    if window:
        # A window longer than every sequence changes nothing, and a shorter one is refused: no path applies a window.
        if perpair_tree.longest > window:
            raise window_error(type(module).__name__, window, f"a sequence of this row ({perpair_tree.longest})")
        if perpair_tree.window is None or window < perpair_tree.window[0]:
            perpair_tree.window = (window, type(module).__name__)
    perpair_tree.calls += 1
    if (autocast := autocast_dtype(query)) is not None:
        # What autocast does for SDPA but not for what these paths hand the call to (the CPU kernel ops; the
        # causal bias, which picks its kernel before autocast casts): under it the rotary embedding leaves the
        # query and key in float32 beside a bfloat16 value, which the kernels refuse (the bias would then fall
        # back to building a mask). Short sequences on a CPU take float32 instead: there PyTorch's bfloat16 flash
        # kernels are slower (2.2x at the demo's ~200-token sequences, 1.3x at ~400; faster from ~800:
        # benchmarks/cpu_kernels.py), and float32 attention is the more exact.
        short = _runs_pieces(query, dropout) and perpair_tree.longest <= CPU_FLOAT32_ATTENTION_MAX
        dtype = torch.float32 if short else autocast
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if _runs_pieces(query, dropout):
        return CpuTreeAttention.apply(query, key, value, perpair_tree.pieces, scaling), None
    return tree_attention_sdpa(query, key, value, perpair_tree, dropout, scaling), None


def window_error(layer: str, window: int, sequence: str) -> PerpairError:
    return PerpairError(f"{layer} attends within a sliding window of {window} tokens, shorter than {sequence}; lower "
                        f"max_length to {window}")


def sliding_window(module: nn.Module, kwargs: dict) -> int | None:
    """The sliding window this attention layer attends within, None for none: the one handed to the attention
    function, else the layer's own or its config's (Qwen2-MoE and PhiMoE apply theirs through the mask alone, which a
    packed row does not build), where the config's layer types, if it has them, make this layer a sliding one."""
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window:
        return window
    config = getattr(module, "config", None)
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    types, index = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    if types is not None and index is not None and index < len(types):
        return window if types[index] == "sliding_attention" else None
    return window


def _eager_attention(module: nn.Module) -> Callable | None:
    """The model's own ``eager`` attention function (``eager_attention_forward`` of its modeling module), which is
    in no registry: SDPA in its place would drop what only it computes (Gemma 2's soft-capping)."""
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return own if callable(own) else None


def _runs_pieces(query: Tensor, dropout: float) -> bool:
    """Whether :class:`CpuTreeAttention` computes this call: its kernels are PyTorch's CPU ones and apply no
    dropout. Everywhere else (a GPU) :func:`tree_attention_sdpa` does."""
    return query.device.type == "cpu" and not dropout


def _block_keys(key: Tensor, value: Tensor, block: Block) -> tuple[Tensor, Tensor]:
    """The keys and values a block attends to: its prefix's, then its own."""
    qs = slice(*block.queries)
    if block.prefix is None:
        return key[:, :, qs], value[:, :, qs]
    ps = slice(*block.prefix)
    if block.prefix[1] == block.queries[0]:  # the prefix right before: one contiguous slice, no copy
        return key[:, :, ps.start:qs.stop], value[:, :, ps.start:qs.stop]
    return torch.cat((key[:, :, ps], key[:, :, qs]), dim=2), torch.cat((value[:, :, ps], value[:, :, qs]), dim=2)


# Flash attention, the kernel that shares key/value heads among query heads (GQA) without copying them, runs in
# half precision only; the memory-efficient kernel that serves other dtypes does not share heads.
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def tree_attention_sdpa(query: Tensor, key: Tensor, value: Tensor, layout: TreeLayout, dropout: float = 0.0,
                        scaling: float | None = None) -> Tensor:
    """Tree attention as one ``scaled_dot_product_attention`` call per block, without a mask: a block after a
    prefix attends with PyTorch's lower-right causal bias (query ``i`` sees the prefix and queries ``≤ i``),
    which SDPA hands to its flash or memory-efficient kernel instead of building a ``[queries, keys]`` mask;
    a block without prefix is plainly causal. The GPU path (any device, with dropout); returns
    ``[1, T, heads, dim]``."""
    from torch.nn.attention.bias import causal_lower_right

    gqa = query.shape[1] != key.shape[1]
    if gqa and query.dtype not in _FLASH_DTYPES:
        # repeated heads let the memory-efficient kernel run; SDPA would otherwise fall back to the math kernel,
        # which keeps a [heads, queries, keys] matrix per block: far more than the copies
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        gqa = False
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])  # [1, T, heads, dim]
    for block in layout.blocks:
        qs = slice(*block.queries)
        k, v = _block_keys(key, value, block)
        rows = qs.stop - qs.start
        bias = None if block.prefix is None else causal_lower_right(rows, k.shape[2])
        o = F.scaled_dot_product_attention(query[:, :, qs], k, v, attn_mask=bias, is_causal=bias is None,
                                           dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        out[:, qs] = o.transpose(1, 2)
    return out


def tree_attention_masked(query: Tensor, key: Tensor, value: Tensor, layout: TreeLayout, dropout: float = 0.0,
                          scaling: float | None = None) -> Tensor:
    """The reference the other paths are tested against (``tests``, ``benchmarks/gpu_attention_check.py``): one
    SDPA call per block with an explicit boolean mask over its prefix and itself. Not used in training: the mask
    rules out the flash kernel. Returns ``[1, T, heads, dim]``."""
    gqa = query.shape[1] != key.shape[1]
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for block in layout.blocks:
        qs = slice(*block.queries)
        k, v = _block_keys(key, value, block)
        rows = qs.stop - qs.start
        mask = torch.ones(rows, k.shape[2], dtype=torch.bool, device=query.device).tril_(k.shape[2] - rows)
        o = F.scaled_dot_product_attention(query[:, :, qs], k, v, attn_mask=mask, dropout_p=dropout,
                                           scale=scaling, enable_gqa=gqa)
        out[:, qs] = o.transpose(1, 2)
    return out


_USERS: Counter[str] = Counter()  # registered attention name → models routed through it now


def use_tree_attention(model: nn.Module) -> Callable[[], None]:
    """Route ``model``'s attention through :func:`tree_attention` until the returned function is called, which
    gives the model its own attention back and drops the registration once no model uses it. Without a packed
    layout the routed model keeps computing its own attention, so generation and padded batches are unchanged.
    On a model routed already it does nothing (and returns a function that does nothing): the first caller
    restores."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = base.config._attn_implementation or "sdpa"
    if current.startswith(TREE_ATTENTION):
        return lambda: None
    name = f"{TREE_ATTENTION}:{current}"  # the name carries the model's own attention, for the fallback
    if not _USERS[name]:
        # "eager" is each model's own function, not in the registry (tree_attention finds it in the model's module)
        fallback = current if current in ALL_ATTENTION_FUNCTIONS or current == "eager" else "sdpa"
        AttentionInterface.register(name, partial(tree_attention, fallback=fallback))
        masks = ALL_MASK_ATTENTION_FUNCTIONS
        AttentionMaskInterface.register(name, masks[current] if current in masks else masks["sdpa"])
    _USERS[name] += 1
    # the config objects of every sub-model (one for a plain causal LM)
    configs = [c for c in {id(c): c for c in (getattr(m, "config", None) for m in base.modules())}.values()
               if c is not None and getattr(c, "_attn_implementation", None) == current]
    for config in configs:
        config._attn_implementation = name

    def restore() -> None:
        if not configs:
            return
        for config in configs:
            config._attn_implementation = current
        configs.clear()
        _USERS[name] -= 1
        if not _USERS[name]:  # Transformers has no unregister: the class-wide mappings register() writes to
            AttentionInterface._global_mapping.pop(name, None)
            AttentionMaskInterface._global_mapping.pop(name, None)

    return restore
