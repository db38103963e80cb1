"""Completion log-probabilities with no wasted work.

* **Packing, no padding.** The pairs of one forward are concatenated into a single row. Each pair is laid out
  as ``prompt · chosen · rejected`` with *tree attention*: the rejected tokens see the prompt and themselves,
  never the chosen tokens, and their positions restart after the prompt. So the prompt is computed once for
  both responses (prompt sharing) and the result equals two separate ``prompt + response`` sequences.
  A pair never attends to another pair in the same row. Not one padding token is computed.
* **One pair per forward: three continuations.** A row with a single pair (the default, ``tokens_per_forward``
  0) needs no mask: the backbone runs the prompt (causal, SDPA's fast path), then the chosen and the rejected
  tokens each as a continuation of the prompt's keys and values. The same numbers as the masked row, without
  the quadratic mask and without attending over ``(prompt + chosen + rejected)²`` positions.
* **Logits only at completion positions**: the backbone's hidden states are gathered at the positions that
  predict a completion token, and only those go through the vocabulary projection.
* **Chunked projection**: :class:`ChunkedTokenLogps` projects and log-softmaxes ``chunk_size`` positions at a
  time and recomputes the chunk in the backward pass, so the ``[tokens, vocab]`` float32 tensor never exists
  whole, neither in the forward nor saved for the backward.

The reusable entry point for other stages is :func:`sequence_logps`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch
from torch import Tensor, nn

from perpair.train.tokenize import TokenizedPair, tokenize_pair

DEFAULT_CHUNK = 256


class ChunkedTokenLogps(torch.autograd.Function):
    """``log_softmax(hidden @ weightᵀ + bias)[target]`` per row, computed ``chunk`` rows at a time.

    The backward recomputes each chunk's logits instead of saving them: it costs one extra projection of the
    completion tokens and saves ``rows × vocab × 4`` bytes of memory (the same trade as Liger's fused losses).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, chunk: int) -> Tensor:
        # log-softmax in float32 at least, whatever the autocast dtype of the hidden states
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = hidden.new_empty(hidden.shape[0], dtype=acc)
        lse = hidden.new_empty(hidden.shape[0], dtype=acc)
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            logits = _project(hidden[part], weight, bias)
            lse[part] = torch.logsumexp(logits, dim=-1)
            out[part] = logits.gather(1, target[part, None]).squeeze(1) - lse[part]
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = lse.dtype
        grad_weight = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if bias is not None and ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            logits = _project(hidden[part], weight, bias)
            # d log p[t] / d logits = onehot(t) − softmax(logits), scaled by the incoming gradient.
            grad_logits = torch.exp(logits - lse[part, None]).mul_(-grad_out[part, None])
            grad_logits.scatter_add_(1, target[part, None], grad_out[part, None])
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[part] = grad_logits @ weight.to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().to(acc), hidden[part].to(acc))
            if grad_bias is not None:
                grad_bias += grad_logits.to(acc).sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = hidden @ weight.to(hidden.dtype).t()
    if bias is not None:
        logits = logits + bias.to(hidden.dtype)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@dataclass
class Packed:
    """One row holding several pairs. ``gather``/``target`` list the completion tokens: the position whose
    hidden state predicts each one and its id; ``owner`` = (pair index in the pack, 0 chosen / 1 rejected)."""

    input_ids: Tensor  # [1, T]
    position_ids: Tensor  # [1, T]
    attention_mask: Tensor | None  # [1, 1, T, T] bool, True = may attend; None with ``split``
    gather: Tensor  # [N] positions in the row
    target: Tensor  # [N] token ids
    owner: Tensor  # [N] 2 * pair + side
    pairs: int
    split: tuple[int, ...] | None = None  # one pair: (prompt, chosen[, rejected]) lengths, run as continuations

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


def pack(pairs: Sequence[TokenizedPair], share_prompt: bool = True, continuations: bool = True) -> Packed:
    """Lay out ``pairs`` in one row (see the module docstring). ``share_prompt=False`` repeats the prompt
    before the rejected response, as a padded batch would compute it (kept for comparison).
    ``continuations``: a single pair is run as prompt, then chosen and rejected over the prompt's cache, instead
    of one masked row (off with gradient checkpointing, which runs without a cache)."""
    ids: list[int] = []
    positions: list[int] = []
    segment: list[int] = []  # a sequence that attends only inside itself
    branch: list[int] = []  # 0 prompt (seen by both responses), 1 chosen, 2 rejected
    gather: list[int] = []
    target: list[int] = []
    owner: list[int] = []
    seg = 0
    for index, pair in enumerate(pairs):
        responses = [(0, pair.chosen)] + ([(1, pair.rejected)] if pair.rejected else [])
        groups = [responses] if share_prompt else [[r] for r in responses]
        for group in groups:
            start = len(ids)
            ids += pair.prompt
            positions += range(len(pair.prompt))
            segment += [seg] * len(pair.prompt)
            branch += [0] * len(pair.prompt)
            last_prompt = start + len(pair.prompt) - 1
            for side, tokens in group:
                first = len(ids)
                ids += tokens
                positions += range(len(pair.prompt), len(pair.prompt) + len(tokens))
                segment += [seg] * len(tokens)
                branch += [1 + side] * len(tokens)
                # token k of the response is predicted by the hidden state of the token before it; the first by
                # the last prompt token (shared by both responses).
                gather += [last_prompt] + list(range(first, first + len(tokens) - 1))
                target += tokens
                owner += [2 * index + side] * len(tokens)
            seg += 1
    if continuations and share_prompt and len(pairs) == 1 and pairs[0].prompt:
        pair = pairs[0]
        split = (len(pair.prompt), len(pair.chosen)) + ((len(pair.rejected),) if pair.rejected else ())
        return Packed(input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]), attention_mask=None,
                      gather=torch.tensor(gather), target=torch.tensor(target), owner=torch.tensor(owner), pairs=1,
                      split=split)
    seg_t, br_t = torch.tensor(segment), torch.tensor(branch)
    n = len(ids)
    causal = torch.ones(n, n, dtype=torch.bool).tril_()
    same_seq = seg_t[:, None] == seg_t[None, :]
    visible = (br_t[None, :] == 0) | (br_t[:, None] == br_t[None, :])
    return Packed(
        input_ids=torch.tensor([ids]), position_ids=torch.tensor([positions]),
        attention_mask=(causal & same_seq & visible)[None, None],
        gather=torch.tensor(gather), target=torch.tensor(target), owner=torch.tensor(owner), pairs=len(pairs))


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body and the output embedding of a causal LM (plain or PEFT-wrapped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


class CompletionLogps(nn.Module):
    """Wraps a causal LM so that ``forward(packed)`` returns per-pair summed completion log-probs.

    Being an ``nn.Module`` whose forward runs the whole computation, it can be handed to Accelerate (DDP, FSDP).
    """

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None, gather: Tensor,
                target: Tensor, owner: Tensor, pairs: int,
                split: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
        """``(sums [pairs, 2], counts [pairs, 2])``: summed log-probs and token counts of chosen (column 0) and
        rejected (column 1)."""
        backbone, head = backbone_and_head(self.model)
        if split is None:
            hidden = backbone(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                              use_cache=False).last_hidden_state[0]
        else:
            hidden = _continuations(backbone, input_ids, position_ids, split)
        token_logps = ChunkedTokenLogps.apply(hidden[gather], head.weight, head.bias, target, self.chunk_size)
        sums = token_logps.new_zeros(2 * pairs).index_add(0, owner, token_logps)
        counts = torch.bincount(owner, minlength=2 * pairs)
        return sums.view(pairs, 2), counts.view(pairs, 2)


def _continuations(backbone: nn.Module, input_ids: Tensor, position_ids: Tensor, split: tuple[int, ...]) -> Tensor:
    """Hidden states ``[T, hidden]`` of the row ``prompt · chosen · rejected``: the prompt once, each response
    over a copy of the prompt's key/value cache (the copies share the prompt's tensors, so gradients from both
    responses reach the prompt)."""
    from transformers import DynamicCache

    prompt = split[0]
    first = backbone(input_ids=input_ids[:, :prompt], position_ids=position_ids[:, :prompt], use_cache=True)
    parts, start = [first.last_hidden_state], prompt
    for length in split[1:]:
        cache = DynamicCache(config=backbone.config)
        for index, layer in enumerate(first.cache.layers):
            cache.update(layer.keys, layer.values, index)
        end = start + length
        out = backbone(input_ids=input_ids[:, start:end], position_ids=position_ids[:, start:end], cache=cache,
                       use_cache=True)
        parts.append(out.last_hidden_state)
        start = end
    return torch.cat(parts, dim=1)[0]


def run_packed(module: nn.Module, packed: Packed, device: torch.device) -> tuple[Tensor, Tensor]:
    mask = None if packed.attention_mask is None else packed.attention_mask.to(device)
    return module(packed.input_ids.to(device), packed.position_ids.to(device), mask, packed.gather.to(device),
                  packed.target.to(device), packed.owner.to(device), packed.pairs, packed.split)


LOGPS_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("chosen_logps", pa.float64(), nullable=False),
    pa.field("chosen_tokens", pa.int64(), nullable=False),
    pa.field("rejected_logps", pa.float64(), nullable=False),
    pa.field("rejected_tokens", pa.int64(), nullable=False),
])


@torch.no_grad()
def logps_of_tokenized(model: nn.Module, pairs: Sequence[TokenizedPair], *, tokens_per_forward: int = 0,
                       chunk_size: int = DEFAULT_CHUNK, device: torch.device | str = "cpu",
                       autocast_dtype: torch.dtype | None = None,
                       on_progress: Callable[[int], None] | None = None) -> tuple[Tensor, Tensor]:
    """``(sums [n, 2], counts [n, 2])`` for already tokenized pairs, packing pairs up to ``tokens_per_forward``
    tokens per forward (a pair longer than that gets a forward of its own; 0 = one pair per forward)."""
    device = torch.device(device)
    module = CompletionLogps(model, chunk_size)
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(pairs), 2, dtype=torch.float64)
    counts = torch.zeros(len(pairs), 2, dtype=torch.int64)
    start = 0
    try:
        while start < len(pairs):
            end, total = start, 0
            while end < len(pairs) and (end == start or total + pairs[end].tokens <= tokens_per_forward):
                total += pairs[end].tokens
                end += 1
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                s, c = run_packed(module, pack(pairs[start:end]), device)
            sums[start:end], counts[start:end] = s.double().cpu(), c.cpu()
            start = end
            if on_progress:
                on_progress(end)
    finally:
        model.train(was_training)
    return sums, counts


def sequence_logps(model: nn.Module, tokenizer, pairs: pa.Table, *, max_length: int | None = 1024,
                   tokens_per_forward: int = 0, chunk_size: int = DEFAULT_CHUNK,
                   device: torch.device | str = "cpu",
                   on_progress: Callable[[int], None] | None = None) -> pa.Table:
    """Summed completion log-probs and completion token counts of every pair of a pairs table under ``model``.

    Tokenization is TRL's (chat template, prompt masked, ``keep_start`` truncation of prompt + response to
    ``max_length``). Returns a table with :data:`LOGPS_SCHEMA` columns ``pair_id, chosen_logps, chosen_tokens,
    rejected_logps, rejected_tokens`` (the schema the plan stage reads for reference margins); pairs whose
    prompt alone fills ``max_length`` are left out. Runs without gradients, in the model's dtype.

    Example (implicit-reward accuracy of a trained policy against its reference)::

        table, _ = perpair.data.read_pairs("test.parquet")
        policy = sequence_logps(trained, tokenizer, table).to_pandas()
        reference = sequence_logps(initial, tokenizer, table).to_pandas()
        margin = (policy.chosen_logps - reference.chosen_logps) - (policy.rejected_logps - reference.rejected_logps)
        accuracy = (margin > 0).mean()
    """
    ids, tokenized = [], []
    for pair_id, prompt, chosen, rejected in zip(*(pairs.column(c).to_pylist() for c in
                                                   ("pair_id", "prompt", "chosen", "rejected")), strict=True):
        tok = tokenize_pair(tokenizer, prompt, chosen, rejected, max_length)
        if tok is not None:
            ids.append(pair_id)
            tokenized.append(tok)
    sums, counts = logps_of_tokenized(model, tokenized, tokens_per_forward=tokens_per_forward,
                                      chunk_size=chunk_size, device=device, on_progress=on_progress)
    return pa.table({
        "pair_id": pa.array(ids, pa.string()),
        "chosen_logps": pa.array(sums[:, 0].numpy(), pa.float64()),
        "chosen_tokens": pa.array(counts[:, 0].numpy(), pa.int64()),
        "rejected_logps": pa.array(sums[:, 1].numpy(), pa.float64()),
        "rejected_tokens": pa.array(counts[:, 1].numpy(), pa.int64()),
    }, schema=LOGPS_SCHEMA)
