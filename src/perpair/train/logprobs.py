"""Completion log-probabilities with no wasted work.

* **Packing, no padding.** The pairs of one forward are concatenated into a single row, each laid out as
  ``prompt · chosen · rejected``; the positions of the rejected tokens restart after the prompt. Not one padding
  token is computed, and every linear layer runs once over the whole row.
* **Tree attention, no mask over the row** (:mod:`perpair.train.attention`). :func:`tree_attention`
  (registered with Transformers'
  ``AttentionInterface``) runs attention block by block: a pair's prompt attends causally to itself, its chosen
  tokens to the prompt and themselves, its rejected tokens to the prompt and themselves, never to the chosen
  ones, and no pair sees another. So the prompt is computed once for both responses (prompt sharing), the
  result equals two separate ``prompt + response`` sequences, and attention costs what those sequences cost,
  not ``(prompt + chosen + rejected)²`` per pair, and no mask is ever built. On a GPU each block is one SDPA
  call with PyTorch's lower-right causal bias, which its flash or memory-efficient kernel runs
  (:func:`tree_attention_sdpa`). On a CPU the blocks become mask-free pieces (both responses on the prompt at
  once, each response causally on itself) run by PyTorch's flash-attention kernels and merged by their
  log-sum-exps (:class:`CpuTreeAttention`).
* **Logits only at completion positions**: the backbone's hidden states are gathered at the positions that
  predict a completion token, and only those go through the vocabulary projection.
* **Projection in blocks**: :class:`ChunkedTokenLogps` projects all of a forward's completion positions onto a
  block of vocabulary columns at a time, into one reused buffer of at most ``chunk_size × vocab`` values, and
  merges the blocks' log-sum-exps, so the ``[tokens, vocab]`` float32 tensor never exists whole, neither in the
  forward nor saved for the backward. A frozen output layer (LoRA) gets its ``[tokens, hidden]`` gradient
  direction in the forward, from the logits at hand; a trained one has each block projected again in the
  backward.

The reusable entry point for other stages is :func:`sequence_logps`.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import torch
from torch import Tensor, nn

from perpair import onednn
from perpair.errors import PerpairError
from perpair.plan.difficulty import logps_table
from perpair.train.attention import Block, TreeLayout, autocast_dtype, use_tree_attention, window_error
from perpair.train.batches import greedy_groups
from perpair.train.lean import LEAN_FORWARDS, cached_cast
from perpair.train.tokenize import TokenizedPair, pair_tools, refuse_markup, tokenize_pair

DEFAULT_CHUNK = 256


class ChunkedTokenLogps(torch.autograd.Function):
    """``log_softmax(hidden @ weightᵀ + bias)[target]`` per row, the vocabulary projected in blocks.

    The ``[rows, vocab]`` logits never exist whole, neither in the forward nor saved for the backward: every row
    is projected onto a block of vocabulary columns at a time (:class:`_Columns`), into one reused buffer of at
    most ``chunk × vocab`` values. Blocks of columns rather than of rows: a product of all of a forward's rows
    with a few thousand columns of the weight runs near a CPU's matrix peak, where one of 256 rows with the whole
    49,152 × 576 embedding ran at 70% of it; the block's log-sum-exps are merged as flash attention merges key
    blocks. What the backward needs depends on what is trained:

    * **A frozen projection** (a LoRA run's, or any whose weight and bias need no gradient): the gradient of a
      row's log-prob with respect to its hidden state, ``(onehot(t) − softmax) @ weight``, does not depend on
      the incoming gradient, which only scales the row. So the forward computes it from each block's logits at
      hand (one more product with the block's weight, rescaled as the running maximum moves) and keeps that
      ``[rows, hidden]`` tensor; the backward is one multiplication, with no projection onto the vocabulary.
    * **A trained projection** (full fine-tuning, a tied embedding): its weight's gradient needs the incoming
      gradient inside the vocabulary-sized product, so the backward projects each block again (one extra
      projection of the completion tokens; the same trade as Liger's fused losses) and writes the block's rows
      of the weight's gradient once, with no accumulation over chunks.

    A forward without gradients on oneDNN's packed weight (``packed``: the reference pass on a CPU) projects
    ``chunk`` rows at a time with it instead. With ``grad_into`` (training in one process) a trained weight's
    gradient goes straight into its ``.grad``, in a tensor reused by every step (:class:`WeightGradInto`).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, chunk: int,
                packed: Tensor | None = None, grad_into: WeightGradInto | None = None) -> Tensor:
        if packed is not None:
            return _packed_logps(hidden, bias, target, chunk, packed)
        columns = _Columns(hidden, weight, bias, chunk)
        picked = columns.acc_empty(hidden.shape[0])  # the target's logit per row
        frozen = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
        if frozen:  # −d out / d hidden per row = softmax @ weight − weight[t], the softmax's block by block
            top = columns.acc_full(hidden.shape[0], -torch.inf)  # running maximum and sum of exp(logit − top)
            total = columns.acc_full(hidden.shape[0], 0.0)
            direction = columns.acc_full((hidden.shape[0], hidden.shape[1]), 0.0)
            for cols, rows, at in columns.blocks(target):
                logits = columns.logits(cols)
                picked[rows] = logits[rows, at]
                new_top = torch.maximum(top, logits.amax(1))
                shrink = (top - new_top).exp_()  # what the sums so far become under the new maximum
                probs = logits.sub_(new_top[:, None]).exp_()
                total.mul_(shrink).add_(probs.sum(1))
                columns.add_times_weight(direction.mul_(shrink[:, None]), probs, cols)
                top = new_top
            direction.div_(total[:, None]).sub_(columns.weight[target].to(direction.dtype))
            ctx.save_for_backward(direction.to(hidden.dtype))
            ctx.frozen = True
            return picked - (top + total.log())
        parts = columns.acc_empty((len(columns.slices), hidden.shape[0]))  # each block's log-sum-exps
        for j, (cols, rows, at) in enumerate(columns.blocks(target)):
            logits = columns.logits(cols)
            picked[rows] = logits[rows, at]
            parts[j] = log_sum_exp_(logits)
        lse = torch.logsumexp(parts, 0)
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.chunk, ctx.frozen, ctx.grad_into = chunk, False, grad_into
        return picked - lse

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.frozen:
            (direction,) = ctx.saved_tensors
            grad_hidden = (direction.to(grad_out.dtype) * -grad_out[:, None]).to(direction.dtype)
            return grad_hidden, None, None, None, None, None, None
        hidden, weight, bias, target, lse = ctx.saved_tensors
        columns = _Columns(hidden, weight, bias, ctx.chunk)
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = columns.acc_full(hidden.shape, 0.0) if want_hidden else None
        into = ctx.grad_into if want_weight and ctx.grad_into and ctx.grad_into.takes(weight, columns.acc) else None
        grad_weight, accumulate = (into.target(weight) if into else
                                   (columns.acc_empty(weight.shape) if want_weight else None, False))
        grad_bias = columns.acc_empty(bias.shape) if bias is not None and want_bias else None
        rows_acc = hidden.to(columns.acc) if want_weight else None
        for cols, rows, at in columns.blocks(target):
            # d log p[t] / d logits = onehot(t) − softmax(logits), scaled by the incoming gradient.
            grad_logits = columns.logits(cols).sub_(lse[:, None]).exp_().mul_(-grad_out[:, None])
            grad_logits[rows, at] += grad_out[rows]
            if grad_hidden is not None:
                columns.add_times_weight(grad_hidden, grad_logits, cols)
            if accumulate:  # onto the gradient of an earlier forward of the step
                grad_weight[cols].addmm_(grad_logits.t(), rows_acc)
            elif grad_weight is not None:  # this block's rows of the gradient, written once
                torch.mm(grad_logits.t(), rows_acc, out=grad_weight[cols])
            if grad_bias is not None:
                grad_bias[cols] = grad_logits.sum(0)
        if into:
            into.written(weight, grad_weight)
            grad_weight = None
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None)


class WeightGradInto:
    """Where :class:`ChunkedTokenLogps` puts a trained output layer's weight gradient in training: straight into
    the parameter's ``.grad``, in one tensor kept for the run, instead of handing autograd a new ``[vocab, hidden]``
    tensor at every backward.

    That tensor is the largest a step allocates (SmolLM2's 49,152 × 576: 108 MiB), at the start of the backward,
    while every activation of the forward is alive; and with a tied input embedding, whose gradient is sparse,
    autograd adds the two out of place at the end of the backward: a second such tensor. Two fresh blocks of that
    size per step seldom fit among the activations' freed buffers, so a CPU allocator's heap grew by one at several
    steps: on ``benchmarks/vs_trl.py``'s workload tcmalloc's heap peaked at 2.69 GiB for 2.49 GiB in use, 2.56
    with this (peak RSS 3.02-3.06 → 2.93 GiB), at the same speed and to the same bits. The tensor stays allocated
    between steps (``zero_grad(set_to_none=True)`` drops only the parameter's reference to it), where the sparse
    embedding gradient is added into it in place.

    One process only: the gradient bypasses autograd, so DDP's hooks would not see it. Not for
    ``torch.autograd.grad`` either, which reads gradients from autograd, not ``.grad``.
    """

    def __init__(self):
        self.buffer: Tensor | None = None

    @staticmethod
    def takes(weight: Tensor, accumulated: torch.dtype) -> bool:
        """A parameter (a leaf) whose gradient is accumulated in its own dtype (float32, not a bfloat16 weight)."""
        return weight.is_leaf and weight.dtype == accumulated

    def target(self, weight: Tensor) -> tuple[Tensor, bool]:
        """The tensor to write the gradient into, and whether to add to it (a dense gradient of an earlier forward
        of the step) rather than overwrite it (no gradient yet, or only a sparse one)."""
        grad = weight.grad
        if grad is not None and not grad.is_sparse:
            return grad, True
        if self.buffer is None or self.buffer.shape != weight.shape or self.buffer.dtype != weight.dtype:
            self.buffer = torch.empty_like(weight, memory_format=torch.contiguous_format)
        return self.buffer, False

    def written(self, weight: Tensor, grad: Tensor) -> None:
        if weight.grad is None:
            weight.grad = grad
        elif weight.grad.is_sparse:  # the input embedding's gradient came first
            weight.grad = grad.add_(weight.grad)


def log_sum_exp_(logits: Tensor) -> Tensor:
    """``logsumexp(logits, 1)``, overwriting ``logits`` (a scratch buffer) instead of allocating its size again."""
    top = logits.amax(1)
    return logits.sub_(top[:, None]).exp_().sum(1).log_().add_(top)


@torch.no_grad()
def log_sum_sq_probs(hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk: int) -> Tensor:
    """log Σ_v π(v)² per row of ``hidden`` (WPO's alignment term: the log-probability that two samples of the
    policy agree), a block of vocabulary columns at a time like :class:`ChunkedTokenLogps`; not differentiated."""
    columns = _Columns(hidden, weight, bias, chunk)
    plain, doubled = (columns.acc_empty((len(columns.slices), hidden.shape[0])) for _ in range(2))
    for j, cols in enumerate(columns.slices):
        logits = columns.logits(cols)
        doubled[j] = torch.logsumexp(2 * logits, 1)
        plain[j] = log_sum_exp_(logits)
    return torch.logsumexp(doubled, 0) - 2 * torch.logsumexp(plain, 0)


# Vocabulary columns per block of ChunkedTokenLogps' projection, at most. On a 2-core CPU (SmolLM2-135M, 400 to
# 1,400 completion positions) blocks of 2,048 to 12,288 columns ran the forward product at 150-180 GFLOP/s and
# the backward's at 180-200; a block the width of the vocabulary for 256 rows at 138 and 146.
COLUMNS = 4096


class _Columns:
    """The logits of every row of ``hidden`` for a block of ``width`` vocabulary entries at a time, into one
    reused buffer (float32 at least) of at most ``chunk × vocab`` values: on a CPU a fresh buffer of that size
    is a fresh mapping of memory, and faulting its pages in cost more than the softmax."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk: int):
        self.hidden = hidden
        self.weight = weight.to(hidden.dtype)  # cast once (autocast), not once per block
        self.bias = None if bias is None else bias.to(hidden.dtype)
        self.acc = torch.promote_types(hidden.dtype, torch.float32)
        rows, vocab = hidden.shape[0], weight.shape[0]
        self.width = max(1, min(COLUMNS, vocab, chunk * vocab // max(rows, 1)))
        self.slices = [slice(start, min(start + self.width, vocab)) for start in range(0, vocab, self.width)]
        self.buffer = hidden.new_empty(rows * self.width)  # in the hidden states' dtype, for torch.mm's out=

    def acc_empty(self, shape) -> Tensor:
        return self.hidden.new_empty(shape, dtype=self.acc)

    def acc_full(self, shape, value: float) -> Tensor:
        return self.hidden.new_full(shape if isinstance(shape, tuple) else (shape,), value, dtype=self.acc)

    def blocks(self, target: Tensor):
        """Per block: its columns, the rows whose target is among them and the target's place in the block."""
        block = target // self.width
        sizes = torch.bincount(block, minlength=len(self.slices)).tolist()  # one device sync, not one per block
        for cols, rows in zip(self.slices, torch.argsort(block).split(sizes), strict=True):
            yield cols, rows, target[rows] - cols.start

    def logits(self, cols: slice) -> Tensor:
        rows = self.hidden.shape[0]
        out = self.buffer[:rows * (cols.stop - cols.start)].view(rows, cols.stop - cols.start)
        logits = torch.mm(self.hidden, self.weight[cols].t(), out=out)
        if self.bias is not None:
            logits += self.bias[cols]
        return logits if logits.dtype == self.acc else logits.to(self.acc)

    def add_times_weight(self, into: Tensor, values: Tensor, cols: slice) -> None:
        """``into += values @ weight[cols]`` (``values`` ``[rows, block]``, ``into`` in float32 at least), the
        product in the hidden states' dtype as autocast would run it."""
        if self.hidden.dtype == into.dtype:
            into.addmm_(values, self.weight[cols])
        else:
            into.add_(torch.mm(values.to(self.hidden.dtype), self.weight[cols]))


def _packed_logps(hidden: Tensor, bias: Tensor | None, target: Tensor, chunk: int, packed: Tensor) -> Tensor:
    """:class:`ChunkedTokenLogps`' forward without gradients on oneDNN's packed weight, ``chunk`` rows at a time."""
    out = hidden.new_empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32))
    bias = None if bias is None else bias.to(hidden.dtype)
    for start in range(0, hidden.shape[0], chunk):
        part = slice(start, start + chunk)
        logits = onednn.linear(hidden[part], packed, bias).to(out.dtype)
        out[part] = logits.gather(1, target[part, None]).squeeze(1) - torch.logsumexp(logits, 1)
    return out


@dataclass
class Packed:
    """One row holding several pairs. ``gather``/``target`` list the completion tokens: the position whose
    hidden state predicts each one and its id; ``owner`` = (pair index in the pack, 0 chosen / 1 rejected)."""

    input_ids: Tensor  # [1, T]
    position_ids: Tensor  # [1, T]
    layout: TreeLayout
    gather: Tensor  # [N] positions in the row
    target: Tensor  # [N] token ids
    owner: Tensor  # [N] 2 * pair + side
    pairs: int

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


def pack(pairs: Sequence[TokenizedPair]) -> Packed:
    """Lay out ``pairs`` in one row (see the module docstring): each pair's prompt once, then both responses."""
    ids: list[int] = []
    positions: list[int] = []
    blocks: list[Block] = []
    gather: list[int] = []
    target: list[int] = []
    owner: list[int] = []
    for index, pair in enumerate(pairs):
        responses = [(0, pair.chosen)] + ([(1, pair.rejected)] if pair.rejected else [])
        start = len(ids)
        ids += pair.prompt
        positions += range(len(pair.prompt))
        prompt = (start, len(ids))
        if pair.prompt:
            blocks.append(Block(prompt))
        for side, tokens in responses:
            first = len(ids)
            ids += tokens
            positions += range(len(pair.prompt), len(pair.prompt) + len(tokens))
            blocks.append(Block((first, len(ids)), prompt if pair.prompt else None))
            # token k of the response is predicted by the hidden state of the token before it; the first by
            # the last prompt token (shared by both responses).
            gather += [prompt[1] - 1] + list(range(first, first + len(tokens) - 1))
            target += tokens
            owner += [2 * index + side] * len(tokens)
    return Packed(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]),
                  layout=TreeLayout(tuple(blocks)), gather=torch.tensor(gather), target=torch.tensor(target),
                  owner=torch.tensor(owner), pairs=len(pairs))


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body and the output embedding of a causal LM (plain or PEFT-wrapped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def _on_meta(model: nn.Module) -> bool:
    """Weights not loaded in this process (an FSDP rank that receives them from the first): nothing to run the
    checks' forwards on; the first process checks the model."""
    return any(p.is_meta for p in model.parameters())


@contextmanager
def _probing(model: nn.Module) -> Iterator[None]:
    """A check's forward on a few tokens: in eval mode, without gradients, and leaving no cast or packed weight
    behind in the lean modules' caches (made in the check's dtype, perhaps not the run's)."""
    caches = [(cache, set(cache)) for m in model.modules() if (cache := vars(m).get("_lean_casts")) is not None]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)
        for cache, keys in caches:
            for key in set(cache) - keys:
                del cache[key]


def logit_multiplier(model: nn.Module) -> float | None:
    """What ``model``'s causal-LM forward does to its output layer's logits, which perpair's log-probs (the output
    layer applied to the backbone's last hidden states, :class:`ChunkedTokenLogps`) must do as well: None (nothing),
    or a factor (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``, …), applied to the hidden states (the
    same logits, the layer having no bias). Anything else is refused: a final-logit soft-capping (Gemma 2/3) by its
    setting, any other transformation by a check on a short input (the model's own logits against the output
    layer's, times the factor), so that no architecture trains on log-probs its own forward would not give."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    name = type(base).__name__
    if (cap := getattr(config, "final_logit_softcapping", None)) is not None:
        raise PerpairError(f"{name} soft-caps its logits (final_logit_softcapping {cap}); perpair's log-probs read "
                           "the output layer directly and do not apply it")
    def number(name: str) -> float | None:
        value = getattr(config, name, None)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    # the settings TRL's fused output layer reads too: a factor (Cohere's logit_scale, Falcon-H1's
    # lm_head_multiplier), or logits_scaling, a divisor (Granite) except in HyperCLOVA X, which multiplies by it
    factor = next((v for v in map(number, ("logit_scale", "output_multiplier", "lm_head_multiplier"))
                   if v is not None), None)
    if (scaling := number("logits_scaling")) is not None:
        factor = (factor or 1.0) * (scaling if config.model_type == "hyperclovax" else 1 / scaling)
    factor = None if factor == 1 else factor
    backbone, head = backbone_and_head(model)
    if _on_meta(model):
        return factor
    embedding = base.get_input_embeddings()
    ids = (torch.arange(3, 11) * 7919 % embedding.num_embeddings)[None].to(embedding.weight.device)
    hidden: list[Tensor] = []  # the backbone's output within the model's own forward
    hook = backbone.register_forward_hook(lambda module, args, out: hidden.append(out[0]))
    try:
        with _probing(model):
            own = base(input_ids=ids, use_cache=False).logits.float()
            if not hidden:  # the causal LM called a part of the backbone (OPT its decoder): the backbone, then
                hidden.append(backbone(input_ids=ids, use_cache=False).last_hidden_state)
            mine = head(hidden[0] if factor is None else hidden[0] * factor).float()
    finally:
        hook.remove()
    tolerance = 64 * torch.finfo(head.weight.dtype).eps
    if own.shape != mine.shape or not torch.allclose(own, mine, rtol=tolerance,
                                                     atol=tolerance * max(1.0, own.abs().max().item())):
        raise PerpairError(f"{name} computes its logits with more than its output layer (its own logits differ "
                           "from the output layer's on its last hidden states); perpair's log-probs cannot "
                           "reproduce them")
    return factor


def rope_length_limit(model: nn.Module) -> tuple[int, str] | None:
    """``(tokens, rope_type)`` when ``model``'s rotary embedding changes with the length of the sequence beyond
    ``tokens`` (Transformers' ``dynamic`` and ``longrope`` types read the row's largest position): a packed row
    holds sequences of several lengths, so beyond that a sequence would get another's frequencies. None if not."""
    limits = []
    for module in model.modules():
        types = getattr(module, "rope_type", None)
        config = getattr(module, "config", None)
        if config is None or not isinstance(types, str | dict):
            continue
        for layer_type, rope_type in (types.items() if isinstance(types, dict) else [(None, types)]):
            if "dynamic" in rope_type:
                limit = getattr(module, "original_max_seq_len", None) or config.max_position_embeddings
            elif rope_type == "longrope":
                params = config.rope_parameters if layer_type is None else config.rope_parameters[layer_type]
                limit = params.get("original_max_position_embeddings") or \
                    getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
            else:
                continue
            limits.append((int(limit), rope_type))
    return min(limits) if limits else None


def _unrouted(backbone: nn.Module) -> str:
    return (f"{type(backbone).__name__} does not compute attention through Transformers' AttentionInterface, "
            "which perpair's packed rows need")


def _check_packing(model: nn.Module) -> tuple[int, str] | None:
    """Refuse, before any work, a model whose packed row is not its sequences run alone: two pairs (sequences of 2
    to 5 tokens) through the backbone packed, then three of its ``prompt + response`` sequences alone (all but the
    second pair's chosen response, the rows after both kinds of boundary), hidden state by hidden state. Returns
    the shortest sliding window its attention layers applied in the packed forward, and the layer's class (None:
    none, or weights not in this process).
    A model that computes attention its own way runs the row without calling tree attention, or fails on the row's
    placeholder mask (ALiBi models, which build their bias from the mask: Bloom, Falcon); one with a layer that
    mixes tokens other than by attention (a state-space, convolution or recurrent layer: Jamba, LFM2) lets a
    sequence see the one before it in the row."""
    backbone, _ = backbone_and_head(model)
    parents = {id(child): type(parent).__name__ for parent in backbone.modules() for child in parent.children()}
    mixers = sorted({parents[id(m)] for m in backbone.modules() if isinstance(m, nn.Conv1d) and m.kernel_size[0] > 1})
    if mixers:  # a convolution over the sequence (Mamba's, a short convolution's): reads the sequence before
        raise PerpairError(f"{type(backbone).__name__}: {', '.join(mixers)} mixes tokens by a convolution over the "
                           "sequence, which in a packed row would read the pair before; perpair's packed rows cannot "
                           "train it")
    if _on_meta(model):
        return None
    embedding = backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None
    device = embedding.weight.device if embedding is not None else next(model.parameters()).device
    vocab = embedding.num_embeddings if isinstance(embedding, nn.Embedding) else 2
    tokens = [(7 * i + 3) % vocab for i in range(11)]
    pairs = [TokenizedPair(tokens[:3], tokens[3:5], tokens[5:6]), TokenizedPair(tokens[6:8], tokens[8:9], tokens[9:])]
    row = pack(pairs)
    layout = TreeLayout(row.layout.blocks)
    try:
        with _probing(model):
            packed = backbone(input_ids=row.input_ids.to(device), position_ids=row.position_ids.to(device),
                              attention_mask=_NO_MASK.to(device), use_cache=False,
                              perpair_tree=layout).last_hidden_state[0].float()
            alone = []  # the packed row's hidden states from its sequences alone, but the second pair's chosen
            for sequence, rows in ((pairs[0].prompt + pairs[0].chosen, slice(None)),
                                   (pairs[0].prompt + pairs[0].rejected, slice(len(pairs[0].prompt), None)),
                                   (pairs[1].prompt + pairs[1].rejected, slice(None))):
                ids = torch.tensor([sequence], device=device)
                alone.append(backbone(input_ids=ids, use_cache=False).last_hidden_state[0, rows].float())
    except (ValueError, TypeError, IndexError, RuntimeError) as exc:
        if layout.calls:
            raise
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise PerpairError(f"{_unrouted(backbone)} (it fails on a packed row: {first})") from exc
    if not layout.calls:
        raise PerpairError(_unrouted(backbone))
    alone = torch.cat(alone)
    skipped = pairs[0].tokens + len(pairs[1].prompt)  # where the second pair's chosen response starts
    packed = torch.cat((packed[:skipped], packed[skipped + len(pairs[1].chosen):]))
    # float32: the models that pack exactly differed by at most 6e-7 of the largest value, tiny random Jamba and
    # LFM2 by 2e-4 to 9e-4 (tests/test_train_architectures.py)
    dtype = embedding.weight.dtype if embedding is not None else packed.dtype
    tolerance = 2e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    scale = max(1.0, alone.abs().max().item())
    if packed.shape != alone.shape or not torch.allclose(packed, alone, rtol=tolerance, atol=tolerance * scale):
        raise PerpairError(f"{type(backbone).__name__}: a packed row of pairs does not give each sequence the hidden "
                           "states it has alone (a layer mixes tokens other than by attention: a state-space, "
                           "convolution or recurrent layer); perpair's packed rows cannot train it")
    return layout.window


@dataclass(frozen=True)
class Architecture:
    """What :func:`check_architecture` found of a model that perpair's packed forward computes right."""

    logit_multiplier: float | None  # see logit_multiplier
    window: tuple[int, str] | None  # the shortest sliding window of its attention layers (tokens, layer class)
    rope_limit: tuple[int, str] | None  # see rope_length_limit

    def check_sequence(self, model: nn.Module, tokens: int, sequence: str) -> None:
        """Refuse a sequence of ``tokens`` tokens (``sequence`` names it) that the window or the rotary embedding
        cannot take: the refusals of a forward holding it (:func:`tree_attention`, :meth:`CompletionLogps.forward`),
        before one runs."""
        if self.window and tokens > self.window[0]:
            raise window_error(self.window[1], self.window[0], sequence)
        if self.rope_limit and tokens > self.rope_limit[0]:
            raise _rope_error(model, *self.rope_limit, sequence)


def check_architecture(model: nn.Module) -> Architecture:
    """Refuse a model whose log-probs perpair's packed forward would get wrong (:func:`logit_multiplier`,
    :func:`_check_packing`; their forwards took 0.4 s on SmolLM2-135M), once per model object while nothing they
    read changes (:func:`_checks_key`): a run wraps the same policy for the reference pass, then for training."""
    key, known = _checks_key(model), _CHECKED.get(model)
    if known is not None and known[0] == key:
        return known[1]
    factor = logit_multiplier(model)
    restore = use_tree_attention(model)
    try:
        window = _check_packing(model)
    finally:
        restore()
    checked = Architecture(factor, window, rope_length_limit(model))
    _CHECKED[model] = (key, checked)
    return checked


def _rope_error(model: nn.Module, limit: int, rope_type: str, sequence: str) -> PerpairError:
    backbone, _ = backbone_and_head(model)
    return PerpairError(f"{type(backbone).__name__} scales its rotary embedding by the sequence's length beyond "
                        f"{limit} tokens ({rope_type} RoPE), which a row of packed sequences of several lengths would "
                        f"get wrong ({sequence}); lower max_length to {limit}")


# model → (its _checks_key, what check_architecture found). Weak: kept no longer than the model.
_CHECKED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Architecture]] = weakref.WeakKeyDictionary()


def _checks_key(model: nn.Module) -> tuple:
    """What the checks of :func:`check_architecture` read of ``model``, but its weights' values (they compare the
    model with itself): its configuration and attention implementation, the class of every module, the
    name, shape, dtype and device of every parameter, any forward or hook set on a module instance, and the
    autocast in effect. A model changed in any of these is checked again. Two module changes that compute the same
    function do not count: oneDNN's prepacked linear layers (:func:`perpair.onednn.pack_linears`, the reference
    pass's) are ``nn.Linear`` here, and the forwards of :func:`~perpair.train.lean.lean_activations` are none,
    each checked to give its module's own result and gradient when patched."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = []
    for name, m in model.named_modules():
        forward = vars(m).get("forward")
        function = getattr(forward, "__func__", forward)
        own = None if forward is None or function in LEAN_FORWARDS.values() else id(function)
        hooks = tuple(tuple(vars(m).get(h) or ()) for h in _HOOKS)  # the handles' ids
        modules.append((name, nn.Linear if type(m) is onednn.PackedLinear else type(m), own, hooks))
    parameters = tuple((n, tuple(p.shape), p.dtype, p.device) for n, p in model.named_parameters())
    device = parameters[0][3].type if parameters else "cpu"
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device) and \
        torch.get_autocast_dtype(device)
    return (json.dumps(base.config.to_dict(), sort_keys=True, default=str), base.config._attn_implementation,
            tuple(modules), parameters, autocast)


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


# Handed to the backbone as its attention mask: Transformers passes a 4D mask through untouched, so no
# [tokens, tokens] mask is built for a row whose attention tree_attention computes from the layout.
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


class CompletionLogps(nn.Module):
    """Wraps a causal LM so that ``forward(packed)`` returns per-pair summed completion log-probs.

    Being an ``nn.Module`` whose forward runs the whole computation, it can be handed to Accelerate (DDP, FSDP).
    Wrapping routes the model's attention through :func:`tree_attention` until :meth:`release`.
    """

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK, ld_alpha: float | None = None,
                 wpo: bool = False, grad_into_weight: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.ld_alpha = ld_alpha  # LD-DPO: the sums weight tokens past the pair's shared length (ld_token_weights)
        # WPO: forward also returns each response's summed aligned log-probs Σ_t (log π(y_t) − log Σ_v π(v)²),
        # detached, at the price of one more (gradient-free) pass over the vocabulary projection
        self.wpo = wpo
        self.architecture = check_architecture(model)  # refuses a model whose log-probs it would get wrong
        self.logit_multiplier = self.architecture.logit_multiplier
        self._restore_attention = use_tree_attention(model)
        self._casts: dict = {}  # a frozen output layer's weights in the autocast dtype, cast once (cached_cast)
        # a trained output layer's weight gradient written into its .grad, in one tensor for the run (one process,
        # gradients by .backward(): WeightGradInto)
        self._grad_into = WeightGradInto() if grad_into_weight else None

    def release(self) -> None:
        """Give the model its own attention back (see :func:`use_tree_attention`)."""
        self._restore_attention()
        self._casts.clear()
        self._grad_into = None

    def forward(self, input_ids: Tensor, position_ids: Tensor, layout: TreeLayout, gather: Tensor,
                target: Tensor, owner: Tensor, pairs: int) -> tuple[Tensor, Tensor]:
        """``(sums [pairs, 2], counts [pairs, 2])``: summed log-probs and token counts of chosen (column 0) and
        rejected (column 1); with ``wpo`` a third ``[pairs, 2]``, the summed aligned log-probs."""
        backbone, head = backbone_and_head(self.model)
        layout = TreeLayout(layout.blocks)  # this forward's own call count
        if (rope := self.architecture.rope_limit) and layout.longest > rope[0]:
            raise _rope_error(self.model, *rope, f"a sequence here has {layout.longest}")
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=_NO_MASK.to(input_ids.device),
                          use_cache=False, perpair_tree=layout).last_hidden_state[0]
        if not layout.calls:
            raise PerpairError(_unrouted(backbone))
        completion = hidden[gather]
        if self.logit_multiplier is not None:  # (logits * s) = (hidden * s) @ weightᵀ, the layer having no bias
            completion = completion * self.logit_multiplier
        if (autocast := autocast_dtype(completion)) is not None:
            # What autocast does to a model's own output layer (an ``nn.Linear``): the projection in the autocast
            # dtype, which the custom function below would otherwise run in the norm's float32. Its log-softmax
            # stays float32. On a CPU with bfloat16 matrix units this projection is 5-8x faster than in float32.
            completion = completion.to(autocast)
        # A frozen output layer (a LoRA run's) is cast to that dtype once, not in every forward and backward: on a
        # CPU casting SmolLM2's 49,152 × 576 embedding takes as long as projecting 150 positions onto it.
        # (A trained one is handed over as it is: its gradient is accumulated in float32 either way.)
        weight, bias = (p if p is None or p.requires_grad else cached_cast(self._casts, p, completion.dtype)
                        for p in (head.weight, head.bias))
        token_logps = ChunkedTokenLogps.apply(completion, weight, bias, target, self.chunk_size,
                                              onednn.packed_weight(head, completion.dtype), self._grad_into)
        aligned = None
        if self.wpo:
            term = token_logps.detach() - log_sum_sq_probs(completion, weight, bias, self.chunk_size)
            aligned = term.new_zeros(2 * pairs).index_add(0, owner, term).view(pairs, 2)
        if self.ld_alpha is not None:
            token_logps = token_logps * ld_token_weights(owner, pairs, self.ld_alpha).to(token_logps.dtype)
        sums = token_logps.new_zeros(2 * pairs).index_add(0, owner, token_logps)
        counts = torch.bincount(owner, minlength=2 * pairs)
        if aligned is not None:
            return sums.view(pairs, 2), counts.view(pairs, 2), aligned
        return sums.view(pairs, 2), counts.view(pairs, 2)


def ld_token_weights(owner: Tensor, pairs: int, alpha: float) -> Tensor:
    """LD-DPO's token weights (Liu et al. 2024 Eq. 9) in a packed row: 1 for a response's first
    min(|y_w|, |y_l|) tokens, α after them, so the longer response's excess counts α. A pair without a rejected
    response (an SFT pair) has no shared length to cut at: all its tokens weigh 1."""
    counts = torch.bincount(owner, minlength=2 * pairs).view(pairs, 2)
    shared = torch.where(counts[:, 1] > 0, counts.min(1).values, counts[:, 0])
    # pack() lays each response's tokens out contiguously: a token's place in its response is its index minus the
    # index of the response's first token
    index = torch.arange(owner.numel(), device=owner.device)
    first = torch.full((2 * pairs,), owner.numel(), device=owner.device).scatter_reduce(0, owner, index, "amin")
    inside = (index - first[owner]) < shared[owner // 2]
    return torch.where(inside, 1.0, alpha)


def run_packed(module: nn.Module, packed: Packed, device: torch.device) -> tuple[Tensor, ...]:
    return module(packed.input_ids.to(device), packed.position_ids.to(device), packed.layout,
                  packed.gather.to(device), packed.target.to(device), packed.owner.to(device), packed.pairs)


@torch.no_grad()
def logps_of_tokenized(model: nn.Module, pairs: Sequence[TokenizedPair], *, tokens_per_forward: int = 0,
                       chunk_size: int = DEFAULT_CHUNK, device: torch.device | str = "cpu",
                       autocast_dtype: torch.dtype | None = None,
                       on_progress: Callable[[int], None] | None = None,
                       ld_alpha: float | None = None,
                       out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``(sums [n, 2], counts [n, 2])`` for already tokenized pairs, packing pairs up to ``tokens_per_forward``
    tokens per forward (a pair longer than that gets a forward of its own; 0 = one pair per forward); with
    ``ld_alpha`` the LD-DPO sums (:func:`ld_token_weights`). ``on_progress(done)`` follows: the first ``done`` rows
    are computed; ``out``: the (float64, int64) tensors to fill, whose rows a caller can read as they are."""
    device = torch.device(device)
    module = CompletionLogps(model, chunk_size, ld_alpha)
    was_training = model.training
    model.eval()
    sums, counts = out if out is not None else (torch.zeros(len(pairs), 2, dtype=torch.float64),
                                                torch.zeros(len(pairs), 2, dtype=torch.int64))
    try:
        for group in greedy_groups([pair.tokens for pair in pairs], tokens_per_forward):
            start, end = group[0], group[-1] + 1
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                s, c = run_packed(module, pack(pairs[start:end]), device)
            sums[start:end], counts[start:end] = s.double().cpu(), c.cpu()
            if on_progress:
                on_progress(end)
    finally:
        model.train(was_training)
        module.release()
    return sums, counts


def tokenize_table(tokenizer, pairs: pa.Table, max_length: int | None) -> tuple[list[str], list[TokenizedPair]]:
    """``(pair_ids, tokenized)`` of a pairs table, tokenized as training does; pairs whose prompt alone fills
    ``max_length`` are left out."""
    ids, tokenized = [], []
    columns = [pairs.column(c).to_pylist() for c in ("pair_id", "prompt", "chosen", "rejected")]
    refuse_markup(tokenizer, ((pair_id, {"prompt": prompt, "chosen": chosen, "rejected": rejected})
                              for pair_id, prompt, chosen, rejected in zip(*columns, strict=True)), "", "given")
    for pair_id, prompt, chosen, rejected, tools in zip(*columns, pair_tools(pairs), strict=True):
        try:
            tok = tokenize_pair(tokenizer, prompt, chosen, rejected, max_length, tools)
        except PerpairError as exc:
            raise PerpairError(f"pair {pair_id}: {exc}") from None
        if tok is not None:
            ids.append(pair_id)
            tokenized.append(tok)
    return ids, tokenized


def sequence_logps(model: nn.Module, tokenizer, pairs: pa.Table, *, max_length: int | None = 1024,
                   tokens_per_forward: int = 0, chunk_size: int = DEFAULT_CHUNK,
                   device: torch.device | str = "cpu",
                   on_progress: Callable[[int], None] | None = None) -> pa.Table:
    """Summed completion log-probs and completion token counts of every pair of a pairs table under ``model``.

    Tokenization is TRL's (chat template, prompt masked, ``keep_start`` truncation of prompt + response to
    ``max_length``). Returns a table in :data:`~perpair.plan.difficulty.REFERENCE_LOGPS_SCHEMA` (columns
    ``pair_id, chosen_logps, chosen_tokens, rejected_logps, rejected_tokens``; the schema the plan stage reads
    for reference margins); pairs whose prompt alone fills ``max_length`` are left out. Runs without gradients,
    in the model's dtype.

    Example (implicit-reward accuracy of a trained policy against its reference)::

        table, _ = perpair.data.read_pairs("test.parquet")
        policy = sequence_logps(trained, tokenizer, table).to_pandas()
        reference = sequence_logps(initial, tokenizer, table).to_pandas()
        margin = (policy.chosen_logps - reference.chosen_logps) - (policy.rejected_logps - reference.rejected_logps)
        accuracy = (margin > 0).mean()
    """
    ids, tokenized = tokenize_table(tokenizer, pairs, max_length)
    sums, counts = logps_of_tokenized(model, tokenized, tokens_per_forward=tokens_per_forward,
                                      chunk_size=chunk_size, device=device, on_progress=on_progress)
    return logps_table(ids, sums[:, 0].numpy(), counts[:, 0].numpy(), sums[:, 1].numpy(), counts[:, 1].numpy())
