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
* **Chunked projection**: :class:`ChunkedTokenLogps` projects and log-softmaxes ``chunk_size`` positions at a
  time into one reused buffer, so the ``[tokens, vocab]`` float32 tensor never exists whole, neither in the
  forward nor saved for the backward. A frozen output layer (LoRA) gets its ``[tokens, hidden]`` gradient
  direction in the forward, from the logits at hand; a trained one has each chunk recomputed in the backward.

The reusable entry point for other stages is :func:`sequence_logps`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch
from torch import Tensor, nn

from perpair import onednn
from perpair.errors import PerpairError
from perpair.plan.difficulty import logps_table
from perpair.train.attention import Block, TreeLayout, autocast_dtype, use_tree_attention
from perpair.train.batches import greedy_groups
from perpair.train.lean import cached_cast
from perpair.train.tokenize import TokenizedPair, tokenize_pair

DEFAULT_CHUNK = 256


class ChunkedTokenLogps(torch.autograd.Function):
    """``log_softmax(hidden @ weightᵀ + bias)[target]`` per row, computed ``chunk`` rows at a time.

    Every chunk is written into the same ``[chunk, vocab]`` buffer and worked on in place: on a CPU a fresh buffer
    of that size is a fresh mapping of memory, and faulting its pages in cost more than the softmax. The
    ``[rows, vocab]`` logits are never kept for the backward; what it needs depends on what is trained:

    * **A frozen projection** (a LoRA run's, or any whose weight and bias need no gradient): the gradient of a
      row's log-prob with respect to its hidden state, ``(onehot(t) − softmax) @ weight``, does not depend on
      the incoming gradient, which only scales the row. So the forward computes it from the chunk's logits at
      hand (one more product with the weight) and keeps that ``[rows, hidden]`` tensor; the backward is one
      multiplication. The other way, the backward would project the chunk again, redo its softmax and then
      take that product: one projection onto the vocabulary fewer per step, and its elementwise passes.
    * **A trained projection** (full fine-tuning, a tied embedding): its weight's gradient needs the incoming
      gradient inside the vocabulary-sized product, so the backward recomputes each chunk's logits (one extra
      projection of the completion tokens; the same trade as Liger's fused losses).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, chunk: int,
                packed: Tensor | None = None) -> Tensor:
        # log-softmax in float32 at least, whatever the autocast dtype of the hidden states
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = hidden.new_empty(hidden.shape[0], dtype=acc)
        project = _Projection(hidden, weight, bias, chunk, packed)
        frozen = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
        if frozen:  # −d out / d hidden per row, in the dtype of the hidden states (the gradient's)
            direction = torch.empty_like(hidden)
            for part in project.parts():
                t = target[part, None]
                logp = torch.log_softmax(project(part), dim=-1)
                out[part] = logp.gather(1, t).squeeze(1)
                # softmax − onehot(t): −d out / d logits, in place of the log-probs
                step = logp.exp_().scatter_add_(1, t, logp.new_full(t.shape, -1.0))
                torch.mm(step.to(hidden.dtype), project.weight, out=direction[part])
            ctx.save_for_backward(direction)
            ctx.frozen = True
            return out
        lse = hidden.new_empty(hidden.shape[0], dtype=acc)
        for part in project.parts():
            logits = project(part)
            lse[part] = torch.logsumexp(logits, dim=-1)
            out[part] = logits.gather(1, target[part, None]).squeeze(1) - lse[part]
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.chunk, ctx.frozen = chunk, False
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.frozen:
            (direction,) = ctx.saved_tensors
            grad_hidden = (direction.to(grad_out.dtype) * -grad_out[:, None]).to(direction.dtype)
            return grad_hidden, None, None, None, None, None
        hidden, weight, bias, target, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = lse.dtype
        grad_weight = grad_bias = None
        project = _Projection(hidden, weight, bias, ctx.chunk)
        for part in project.parts():
            # d log p[t] / d logits = onehot(t) − softmax(logits), scaled by the incoming gradient.
            grad_logits = project(part).sub_(lse[part, None]).exp_().mul_(-grad_out[part, None])
            grad_logits.scatter_add_(1, target[part, None], grad_out[part, None])
            if grad_hidden is not None:
                torch.mm(grad_logits.to(hidden.dtype), project.weight, out=grad_hidden[part])
            if ctx.needs_input_grad[1]:  # accumulated in place: no [vocab, hidden] temporary per chunk
                if grad_weight is None:
                    grad_weight = grad_logits.t() @ hidden[part].to(acc)
                else:
                    grad_weight.addmm_(grad_logits.t(), hidden[part].to(acc))
            if bias is not None and ctx.needs_input_grad[2]:
                term = grad_logits.sum(0)
                grad_bias = term if grad_bias is None else grad_bias.add_(term)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


@torch.no_grad()
def log_sum_sq_probs(hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk: int) -> Tensor:
    """log Σ_v π(v)² per row of ``hidden`` (WPO's alignment term: the log-probability that two samples of the
    policy agree), ``chunk`` rows at a time like :class:`ChunkedTokenLogps`; not differentiated."""
    project = _Projection(hidden, weight, bias, chunk)
    out = []
    for part in project.parts():
        logits = project(part)
        out.append(torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1))
    return torch.cat(out)


class _Projection:
    """Logits of ``chunk`` rows of ``hidden`` at a time, written into one reused buffer (float32 at least); with
    ``packed`` (the weight as :func:`perpair.onednn.pack_linears` packs it, for a forward without gradients) by
    oneDNN's prepacked product, into a buffer of its own."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk: int, packed: Tensor | None = None):
        self.hidden, self.chunk, self.packed = hidden, chunk, packed
        self.weight = weight.to(hidden.dtype)  # cast once (autocast), not once per chunk
        self.bias = None if bias is None else bias.to(hidden.dtype)
        rows = min(chunk, hidden.shape[0])
        # in the hidden states' dtype, for torch.mm's out=
        self.buffer = hidden.new_empty(rows, weight.shape[0]) if packed is None else None
        self.acc = torch.promote_types(hidden.dtype, torch.float32)

    def parts(self) -> list[slice]:
        return [slice(start, start + self.chunk) for start in range(0, self.hidden.shape[0], self.chunk)]

    def __call__(self, part: slice) -> Tensor:
        h = self.hidden[part]
        if self.packed is not None:
            logits = onednn.linear(h, self.packed, self.bias)
        else:
            logits = torch.mm(h, self.weight.t(), out=self.buffer[:h.shape[0]])
            if self.bias is not None:
                logits += self.bias
        return logits if logits.dtype == self.acc else logits.to(self.acc)


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


# Handed to the backbone as its attention mask: Transformers passes a 4D mask through untouched, so no
# [tokens, tokens] mask is built for a row whose attention tree_attention computes from the layout.
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


class CompletionLogps(nn.Module):
    """Wraps a causal LM so that ``forward(packed)`` returns per-pair summed completion log-probs.

    Being an ``nn.Module`` whose forward runs the whole computation, it can be handed to Accelerate (DDP, FSDP).
    Wrapping routes the model's attention through :func:`tree_attention` until :meth:`release`.
    """

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK, ld_alpha: float | None = None,
                 wpo: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.ld_alpha = ld_alpha  # LD-DPO: the sums weight tokens past the pair's shared length (ld_token_weights)
        # WPO: forward also returns each response's summed aligned log-probs Σ_t (log π(y_t) − log Σ_v π(v)²),
        # detached, at the price of one more (gradient-free) pass over the vocabulary projection
        self.wpo = wpo
        self._restore_attention = use_tree_attention(model)
        self._casts: dict = {}  # a frozen output layer's weights in the autocast dtype, cast once (cached_cast)

    def release(self) -> None:
        """Give the model its own attention back (see :func:`use_tree_attention`)."""
        self._restore_attention()
        self._casts.clear()

    def forward(self, input_ids: Tensor, position_ids: Tensor, layout: TreeLayout, gather: Tensor,
                target: Tensor, owner: Tensor, pairs: int) -> tuple[Tensor, Tensor]:
        """``(sums [pairs, 2], counts [pairs, 2])``: summed log-probs and token counts of chosen (column 0) and
        rejected (column 1); with ``wpo`` a third ``[pairs, 2]``, the summed aligned log-probs."""
        backbone, head = backbone_and_head(self.model)
        layout = TreeLayout(layout.blocks)  # this forward's own call count
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=_NO_MASK.to(input_ids.device),
                          use_cache=False, perpair_tree=layout).last_hidden_state[0]
        if not layout.calls:
            raise PerpairError(f"{type(backbone).__name__} does not compute attention through Transformers' "
                               "AttentionInterface, which perpair's packed rows need")
        completion = hidden[gather]
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
                                              onednn.packed_weight(head, completion.dtype))
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
                       ld_alpha: float | None = None) -> tuple[Tensor, Tensor]:
    """``(sums [n, 2], counts [n, 2])`` for already tokenized pairs, packing pairs up to ``tokens_per_forward``
    tokens per forward (a pair longer than that gets a forward of its own; 0 = one pair per forward); with
    ``ld_alpha`` the LD-DPO sums (:func:`ld_token_weights`)."""
    device = torch.device(device)
    module = CompletionLogps(model, chunk_size, ld_alpha)
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(pairs), 2, dtype=torch.float64)
    counts = torch.zeros(len(pairs), 2, dtype=torch.int64)
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
    for pair_id, prompt, chosen, rejected in zip(*(pairs.column(c).to_pylist() for c in
                                                   ("pair_id", "prompt", "chosen", "rejected")), strict=True):
        tok = tokenize_pair(tokenizer, prompt, chosen, rejected, max_length)
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
