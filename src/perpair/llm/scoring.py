"""Likelihood scoring of a fixed set of options after a prompt, with a local Hugging Face causal LM.

A model that only has to *rank* given answers cannot produce an invalid one, so even a 135M-parameter
model gives a usable label. Cost is dominated by the prompt, so each prompt is run once and its KV cache is
read by all of its options: the options are packed side by side in one second, short pass with a
block-causal mask (each option sees the prompt and itself, at the positions it would have right after the
prompt), so neither the prompt nor its cache is repeated per option, and the vocabulary is projected only
where a score is read. Prompts are batched by similar length (less padding); on a CPU one prompt per pass
(no padding at all) is usually fastest. When every option is one token and nothing follows, the options are
read off the prompt's last logits with no second forward pass (the AlpacaEval-style ``m`` vs ``M`` judge).

Prompts that begin alike across calls and processes (AlpacaEval's judge prompts: the same template, instruction and
baseline output before each evaluated model's answer) can keep the key/value cache of their beginning in a
:class:`PrefixStore` on disk: a prompt given a ``shared`` beginning always runs as that beginning, then the rest on
its cache, so its scores are the same bits whether the beginning's cache was computed now or read.

Nothing here knows what the options mean.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from perpair.artifacts import temporary_beside
from perpair.errors import PerpairError


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


class PrefixStore:
    """Key/value caches of prompt beginnings, one safetensors file each in ``folder``, named by ``identity`` (what
    decides the cache besides the tokens: the model's weights and dtype) and the beginning's token ids. Processes
    scoring with the same model share them; a file is written under a temporary name and renamed, so a reader never
    sees half of one."""

    def __init__(self, folder: Path, identity: Sequence[str]):
        self.folder, self.identity = Path(folder), list(identity)

    def path(self, ids: Sequence[int]) -> Path:
        digest = hashlib.sha256(json.dumps([self.identity, list(ids)]).encode()).hexdigest()
        return self.folder / f"{digest}.safetensors"

    def load(self, ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer (keys, values) of the beginning ``ids``, or None when not stored."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path(ids)
        if not path.is_file():
            return None
        # one cut short (renamed into place just before a node went down) or of another shape was safetensors' or a
        # KeyError's traceback in the middle of judging; the judgments so far are in the results cache
        try:
            tensors = load_file(path)
            return [(tensors[f"keys.{i}"], tensors[f"values.{i}"]) for i in range(len(tensors) // 2)]
        except (SafetensorError, OSError, KeyError) as exc:
            raise PerpairError(f"judge prefix cache {path}: cannot be read ({exc}); remove it, and the next run "
                               "computes it again") from None

    def save(self, ids: Sequence[int], layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        from safetensors.torch import save_file

        path = self.path(ids)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, (keys, values) in enumerate(layers):
            tensors[f"keys.{i}"], tensors[f"values.{i}"] = keys.contiguous(), values.contiguous()
        tmp = temporary_beside(path)
        save_file(tensors, tmp)
        os.replace(tmp, path)


PREFIX_MARGIN = 8  # tokens left out of a shared beginning, where the text after it may tokenize differently


class OptionScorer:
    """Scores options after prompts with ``model`` (a ``*ForCausalLM``) and its ``tokenizer``.

    ``max_length`` caps a prompt's tokens; longer prompts lose their *beginning* (the question to answer
    sits at the end of a prompt). With a ``prefix_store`` and one prompt per pass, the beginnings given as ``shared``
    to :meth:`score` are read from the store (or computed and stored) instead of run with the rest.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: int = 2048,
                 prefix_store: PrefixStore | None = None):
        self.model = model.eval()
        self.prefix_store = prefix_store
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
              then: Sequence[str] | None = None, shared: Sequence[str] | None = None) -> list[OptionScores]:
        """Score every option after every prompt.

        ``suffix`` is appended after each option and conditions ``then`` without being scored (e.g. the
        words that introduce the next question); ``then`` lists single-token continuations scored after
        option + suffix (a second question answered in the same pass). ``shared[i]`` is a text whose beginning
        prompt ``i`` shares with prompts of other calls (e.g. the prompt with the part that varies left empty): the
        tokens both begin with, but the last :data:`PREFIX_MARGIN`, have their key/value cache in the prefix store
        (needs one prompt per pass).
        """
        if not options:
            raise ValueError("no options to score")
        option_ids = [self.encode(o) for o in options]
        if any(not ids for ids in option_ids):
            raise ValueError("an option is empty after tokenization")
        suffix_ids = self.encode(suffix) if suffix else []
        then_ids = [self._single_token(t) for t in then] if then else None
        encoded = [self.encode(p)[-self.max_length:] for p in prompts]
        prefixes = [0] * len(encoded)
        if shared is not None and self.prefix_store is not None:
            if self.batch_size != 1:
                raise ValueError("shared prompt beginnings need one prompt per pass (batch_size 1)")
            prefixes = [_shared_length(ids, self.encode(text)) for ids, text in zip(encoded, shared, strict=True)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        results: list[OptionScores | None] = [None] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            for i, scores in zip(batch, self._score_batch([encoded[i] for i in batch], option_ids, suffix_ids,
                                                          then_ids, prefixes[batch[0]]), strict=True):
                results[i] = scores
        return results  # type: ignore[return-value]

    def _prefix_cache(self, ids: list[int]):
        """The key/value cache of the beginning ``ids``: read from the prefix store, or computed and stored."""
        from transformers import DynamicCache

        layers = self.prefix_store.load(ids)
        if layers is not None:
            return DynamicCache([(k.to(self.device), v.to(self.device)) for k, v in layers])
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1)
        cache = _cache_of(out)
        layers = list(cache) if type(cache) is DynamicCache else []
        # only a plain cache of keys and values per layer is stored (not sliding windows nor recurrent states, which
        # it would not restore): other models compute their beginnings every time, the same computation
        if layers and all(len(layer) == 2 or layer[2] is None for layer in layers):
            self.prefix_store.save(ids, [(layer[0].cpu(), layer[1].cpu()) for layer in layers])
        return cache

    def _score_batch(self, prompts: list[list[int]], option_ids: list[list[int]], suffix_ids: list[int],
                     then_ids: list[int] | None, prefix: int = 0) -> list[OptionScores]:
        """``prefix`` (one prompt): its first ``prefix`` tokens run as :meth:`_prefix_cache`, the rest on that."""
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
        past = {self._cache_arg: self._prefix_cache(prompts[0][:prefix])} if prefix else {}
        out = self.model(input_ids=input_ids[:, prefix:], attention_mask=mask, position_ids=positions[:, prefix:],
                         use_cache=not single, logits_to_keep=1, **past)
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


def _shared_length(ids: list[int], shared: list[int]) -> int:
    """Tokens of ``ids`` to take from the prefix store: those it begins with in common with ``shared``, but the last
    :data:`PREFIX_MARGIN` (a text running on after the shared part can merge into its last tokens differently, and
    each call's beginning should be the same tokens to be found again); 0 when that leaves none."""
    common = 0
    for a, b in zip(ids, shared, strict=False):
        if a != b:
            break
        common += 1
    return max(0, min(common, len(ids) - 1) - PREFIX_MARGIN)


def _cache_of(output):
    """The KV cache a forward pass returned (``cache`` from Transformers 5.x, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
