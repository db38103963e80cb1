"""Likelihood scoring of a fixed set of options after a prompt, with a local Hugging Face causal LM.

A model that only has to *rank* given answers cannot produce an invalid one, so even a 135M-parameter
model gives a usable label. Cost is dominated by the prompt, so each prompt is run once and its KV cache is
read by all of its options: the options are packed side by side in one second, short pass with a
block-causal mask (each option sees the prompt and itself, at the positions it would have right after the
prompt), so neither the prompt nor its cache is repeated per option, and the vocabulary is projected only
where a score is read. Prompts are batched by similar length (less padding); on a CPU one prompt per pass
(no padding at all) is usually fastest. When every option is one token and nothing follows, the options are
read off the prompt's last logits with no second forward pass (the AlpacaEval-style ``m`` vs ``M`` judge).

Nothing here knows what the options mean.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class OptionScores:
    """Per prompt: ``logprob[k]`` = log p(option k | prompt), summed over the option's tokens, and, when
    ``then`` was given, ``then_logprob[k][j]`` = log p(then[j] | prompt, option k, suffix) for one token."""

    logprob: list[float]
    then_logprob: list[list[float]] | None = None

    def probabilities(self) -> list[float]:
        """The options' probabilities normalised over the options (a softmax of ``logprob``)."""
        return torch.softmax(torch.tensor(self.logprob, dtype=torch.float64), 0).tolist()


def default_batch_size(on_cpu: bool) -> int:
    """Prompts per pass when none is configured: 1 on a CPU, where prompts of different lengths run faster one by one
    than padded and masked in a batch (``benchmarks/judge_batch.py``), 8 on an accelerator."""
    return 1 if on_cpu else 8


class OptionScorer:
    """Scores options after prompts with ``model`` (a ``*ForCausalLM``) and its ``tokenizer``.

    ``max_length`` caps a prompt's tokens; longer prompts lose their *beginning* (the question to answer
    sits at the end of a prompt).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: int = 2048):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            self.pad_id = 0
        # The forward pass's name for an input KV cache (``past_key_values`` became ``cache`` in Transformers 5).
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _single_token(self, text: str) -> int:
        ids = self.encode(text)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens for this tokenizer; 'then' needs single tokens")
        return ids[0]

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], options: Sequence[str], *, suffix: str = "",
              then: Sequence[str] | None = None) -> list[OptionScores]:
        """Score every option after every prompt.

        ``suffix`` is appended after each option and conditions ``then`` without being scored (e.g. the
        words that introduce the next question); ``then`` lists single-token continuations scored after
        option + suffix (a second question answered in the same pass).
        """
        if not options:
            raise ValueError("no options to score")
        option_ids = [self.encode(o) for o in options]
        if any(not ids for ids in option_ids):
            raise ValueError("an option is empty after tokenization")
        suffix_ids = self.encode(suffix) if suffix else []
        then_ids = [self._single_token(t) for t in then] if then else None
        encoded = [self.encode(p)[-self.max_length:] for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[OptionScores | None] = [None] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            for i, scores in zip(batch, self._score_batch([encoded[i] for i in batch], option_ids, suffix_ids,
                                                          then_ids), strict=True):
                results[i] = scores
        return results  # type: ignore[return-value]

    def _score_batch(self, prompts: list[list[int]], option_ids: list[list[int]], suffix_ids: list[int],
                     then_ids: list[int] | None) -> list[OptionScores]:
        batch, width = len(prompts), max(len(p) for p in prompts)
        # Left padding puts every prompt's last token in the last column.
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Single-token options with nothing read after them (a suffix alone conditions nothing): one pass.
        single = then_ids is None and all(len(ids) == 1 for ids in option_ids)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=not single, logits_to_keep=1)
        last = torch.log_softmax(out.logits[:, -1].float(), -1)  # [batch, vocab]
        if single:
            firsts = torch.tensor([ids[0] for ids in option_ids], device=self.device)
            return [OptionScores(logprob=last[row, firsts].tolist()) for row in range(batch)]

        # Second pass: all options (+ suffix) of a prompt packed side by side in one row after its cache, each
        # attending to the prompt and to its own earlier tokens only (a block-causal mask), at the positions it
        # would have right after the prompt. The cache is neither copied per option nor per prompt, and the
        # vocabulary is projected only where a score is read.
        sequences = [ids + suffix_ids for ids in option_ids]
        starts = [0]
        for seq in sequences[:-1]:
            starts.append(starts[-1] + len(seq))
        length = starts[-1] + len(sequences[-1])
        branch = torch.zeros(length, dtype=torch.long)
        offset = torch.zeros(length, dtype=torch.long)
        for k, (start, seq) in enumerate(zip(starts, sequences, strict=True)):
            branch[start:start + len(seq)] = k
            offset[start:start + len(seq)] = torch.arange(len(seq))
        own = (branch[:, None] == branch[None, :]) & (offset[:, None] >= offset[None, :])  # [length, length]
        cont = torch.tensor([t for seq in sequences for t in seq], device=self.device).expand(batch, length)
        attend = torch.cat([mask.bool()[:, None, :].expand(batch, length, width),
                            own.to(self.device)[None].expand(batch, length, length)], -1)[:, None]
        cont_positions = mask.sum(-1)[:, None] + offset.to(self.device)[None, :]
        # Read: option k's token j (j >= 1) at row start_k + j - 1; ``then`` after its last token.
        reads = sorted({starts[k] + j - 1 for k, ids in enumerate(option_ids) for j in range(1, len(ids))}
                       | ({starts[k] + len(seq) - 1 for k, seq in enumerate(sequences)} if then_ids else set()))
        at = {position: i for i, position in enumerate(reads)}
        logits = self.model(input_ids=cont, attention_mask=attend, position_ids=cont_positions,
                            use_cache=False, logits_to_keep=torch.tensor(reads, device=self.device),
                            **{self._cache_arg: _cache_of(out)}).logits
        logp = torch.log_softmax(logits.float(), -1)  # [batch, len(reads), vocab]

        results = []
        for row in range(batch):
            logprobs, thens = [], []
            for k, ids in enumerate(option_ids):
                total = last[row, ids[0]]
                for j in range(1, len(ids)):
                    total = total + logp[row, at[starts[k] + j - 1], ids[j]]
                logprobs.append(float(total))
                if then_ids is not None:
                    thens.append(logp[row, at[starts[k] + len(sequences[k]) - 1], then_ids].tolist())
            results.append(OptionScores(logprob=logprobs, then_logprob=thens if then_ids is not None else None))
        return results


def _cache_of(output):
    """The KV cache a forward pass returned (``cache`` from Transformers 5.x, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
