"""A tiny causal LM on the controlled task's vocabulary, its SFT and preference loops, and greedy decoding.

The product's training loop (:mod:`perpair.train.loop`) is built for Hugging Face chat models, tokenizers
and on-disk artifacts; this benchmark trains hundreds of small runs in minutes, so it has its own minimal
tensor loop. What it optimises is the product's: per-pair log-probs go through
:func:`perpair.train.losses.routed_losses` with the plan's β_i, ε_i and routes, pairs are read in the plan's
order, and flipped pairs are swapped as the product loop does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from perpair.bench import task
from perpair.train.losses import Logps, LossParams, routed_losses


def tiny_model(seed: int, *, hidden: int, layers: int, heads: int):
    """A randomly initialised Llama (Transformers) sized for the task's 29-token vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(task.VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=16, pad_token_id=task.PAD, bos_token_id=task.BOS,
                         eos_token_id=task.EOS, tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def pad(sequences: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded ids and the completion mask (tokens after SEP), both ``[n, max_len]``.

    Right padding needs no attention mask in a causal model: a pad only follows the real tokens.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), task.PAD, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, task.PROMPT_LEN:len(s)] = True
    return ids, mask


def completion_logps(model, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the completion tokens and their counts, per row."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
    target_mask = mask[:, 1:]
    return (logp * target_mask).sum(1), target_mask.sum(1).to(logp.dtype)


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    """Cosine with linear warm-up (MixDPO's published schedule shape)."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def train_sft(model, sequences: list[list[int]], *, steps: int, batch: int, lr: float, seed: int) -> None:
    """Reference by SFT from scratch: completion NLL (per token) on the supervised mixture."""
    ids, mask = pad(sequences)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        rows = torch.randint(len(sequences), (batch,), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, 0.05)
        sums, counts = completion_logps(model, ids[rows], mask[rows])
        loss = -(sums.sum() / counts.sum())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def pair_logps(model, chosen: list[list[int]], rejected: list[list[int]], batch: int = 1024) -> Logps:
    """Completion log-probs of every pair (the reference's are computed once and reused by every arm)."""
    parts = []
    for start in range(0, len(chosen), batch):
        c_ids, c_mask = pad(chosen[start:start + batch])
        r_ids, r_mask = pad(rejected[start:start + batch])
        parts.append((*completion_logps(model, c_ids, c_mask), *completion_logps(model, r_ids, r_mask)))
    cat = [torch.cat([p[k] for p in parts]) for k in range(4)]
    return Logps(cat[0], cat[2], cat[1], cat[3])


def train_preference(model, chosen: list[list[int]], rejected: list[list[int]], reference: Logps, *,
                     order: np.ndarray, beta: np.ndarray, label_smoothing: np.ndarray, route: np.ndarray,
                     epochs: int, batch: int, lr: float, warmup: float) -> list[float]:
    """Per-pair DPO / cDPO / SFT (by route) over ``order``, ``epochs`` times in the same order (as the product
    loop reads a plan's curriculum). The batch loss is the sum of per-pair losses over the batch's size."""
    c_ids, c_mask = pad(chosen)
    r_ids, r_mask = pad(rejected)
    beta_t = torch.as_tensor(beta, dtype=torch.float32)
    eps_t = torch.as_tensor(label_smoothing, dtype=torch.float32)
    route_t = torch.as_tensor(route, dtype=torch.long)
    steps_per_epoch = math.ceil(len(order) / batch)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(total):
        start = (step % steps_per_epoch) * batch
        rows = torch.as_tensor(order[start:start + batch], dtype=torch.long)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, lr, warmup)
        ids = torch.cat([c_ids[rows], r_ids[rows]])
        mask = torch.cat([c_mask[rows], r_mask[rows]])
        sums, counts = completion_logps(model, ids, mask)
        n = len(rows)
        policy = Logps(sums[:n], sums[n:], counts[:n], counts[n:])
        ref = Logps(reference.chosen[rows], reference.rejected[rows], reference.chosen_tokens[rows],
                    reference.rejected_tokens[rows])
        result = routed_losses("sigmoid", policy, ref, LossParams(beta_t[rows], eps_t[rows]), route_t[rows])
        loss = result.losses.sum() / n
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def greedy(model, prompts: np.ndarray, max_new: int = task.MAX_ANSWER + 2) -> list[list[int]]:
    """Greedy completions (no KV cache: the sequences are at most 11 tokens)."""
    ids = torch.cat([torch.full((len(prompts), 1), task.BOS), torch.as_tensor(prompts, dtype=torch.long),
                     torch.full((len(prompts), 1), task.SEP)], dim=1)
    for _ in range(max_new):
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, task.PROMPT_LEN:].tolist()


@torch.no_grad()
def house_style_probability(model, prompts: np.ndarray) -> np.ndarray:
    """P(STYLE_A) / (P(STYLE_A) + P(STYLE_B)) at the marker position after the correct content."""
    sequences = [task.sequence(p, task.correct_answer(p), task.STYLE_A) for p in prompts]
    out = np.empty(len(prompts))
    for length in sorted({len(s) for s in sequences}):
        rows = [i for i, s in enumerate(sequences) if len(s) == length]
        ids = torch.tensor([sequences[i] for i in rows])
        logits = model(input_ids=ids).logits[:, length - 3]  # predicts the marker (…, content, marker, EOS)
        pair = torch.log_softmax(logits[:, [task.STYLE_A, task.STYLE_B]].float(), dim=-1)
        out[rows] = pair[:, 0].exp().numpy()
    return out
