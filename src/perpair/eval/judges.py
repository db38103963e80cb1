"""Judges and the official AlpacaEval 2.0 weighted judging protocol.

Protocol (alpaca_eval 0.6.6, ``weighted_alpaca_eval_gpt4_turbo``): the ChatML prompt ``alpaca_eval_clf.txt`` shows
the two outputs as models ``m`` (first) and ``M`` (second); the judge answers one token; the preference in the
shown order is ``2 − P(m) / (P(m) + P(M))`` from the token log-probabilities (``completion_parsers.logprob_parser``
with numerator ``m``, denominators ``m``, ``M``, not binarised). The order is decided per instruction by
``random.Random("is_switched_outputs" + instruction + "0").choices([False, True])``
(``RandomSwitchTwoColumnsProcessor`` with the annotator's seed 0): when switched the model's output is shown first
and the preference is mapped back with ``3 − x``. Identical outputs are a draw (1.5) without a call.

Judges: :class:`LocalLogprobJudge` (a local Hugging Face model; P(m), P(M) read off its next-token distribution
through :class:`perpair.llm.scoring.OptionScorer`) and :class:`ApiLogprobJudge` (any OpenAI-compatible server
returning ``top_logprobs``, through :class:`perpair.llm.client.ChatClient`). Arena-Hard needs free-form judgments:
:class:`LocalChatJudge` and :class:`ApiChatJudge`.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perpair.errors import PerpairError

Messages = list[dict[str, str]]
SWITCH_COLUMN = "is_switched_outputs"
SWITCH_SEED = 0  # PairwiseAnnotator(seed=0) passes its seed to the processors
NUMERATOR, DENOMINATORS = "m", ("m", "M")


def is_switched(instruction: str, seed: int = SWITCH_SEED) -> bool:
    """Whether the official protocol shows the model's output first for this instruction."""
    return random.Random(SWITCH_COLUMN + instruction + str(seed)).choices([False, True], k=1)[0]


def fill_template(template: str, instruction: str, output_1: str, output_2: str) -> str:
    """alpaca_eval ``make_prompts``: each placeholder replaced once, in order of first appearance (not
    ``str.format``, so braces in outputs are safe)."""
    values = {"instruction": instruction, "output_1": output_1, "output_2": output_2}
    order = sorted(values, key=lambda k: template.find("{" + k + "}"))
    for name in order:
        template = template.replace("{" + name + "}", values[name], 1)
    return template


def chatml_to_messages(prompt: str) -> Messages:
    """alpaca_eval ``prompt_to_chatml``: ``<|im_start|>role\\ncontent<|im_end|>`` blocks to chat messages."""
    prompt = prompt.strip()
    if not prompt.startswith("<|im_start|>") or not prompt.endswith("<|im_end|>"):
        raise PerpairError("the judge prompt is not in ChatML (<|im_start|>role ... <|im_end|>)")
    messages = []
    for block in prompt.split("<|im_start|>")[1:]:
        role, _, rest = block.partition("\n")
        messages.append({"role": role.strip(), "content": rest.split("<|im_end|>", 1)[0].strip()})
    return messages


def preference_from_logprobs(logprobs: dict[str, float]) -> float:
    """``2 − P(m) / (P(m) + P(M))``; a missing token has probability 0; neither present → NaN."""
    present = {t: lp for t, lp in logprobs.items() if t in DENOMINATORS and lp is not None}
    if not present:
        return math.nan
    top = max(present.values())
    denominator = sum(math.exp(lp - top) for lp in present.values())
    p_first = math.exp(present.get(NUMERATOR, -math.inf) - top) / denominator
    return 2 - p_first


def judged_preference(logprobs: dict[str, float], switched: bool) -> float:
    """The preference in the file's order (1 = baseline ``output_1`` wins, 2 = model ``output_2`` wins)."""
    value = preference_from_logprobs(logprobs)
    return 3 - value if switched and not math.isnan(value) else value


def _load_hf(model: str, dtype: str = "auto"):
    """The model in ``dtype``; ``auto``: bfloat16 on a GPU, float32 on a CPU."""
    import torch

    from perpair.eval.generate import torch_dtype
    from perpair.models import load_causal_lm, load_tokenizer
    from perpair.onednn import PROMPT_ROWS, note_emulated_bf16, pack_linears

    tokenizer = load_tokenizer(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_model = load_causal_lm(model, dtype=torch_dtype(dtype)).to(device).eval()
    pack_linears(hf_model, rows=PROMPT_ROWS)
    note_emulated_bf16(hf_model.dtype, device, f"the local judge {model}", "the judge's dtype float32")
    return hf_model, tokenizer


class LocalLogprobJudge:
    """A local causal LM as the AlpacaEval judge: P(m) and P(M) as its next token after the judge prompt.

    With a ``prefix_cache`` folder and one prompt per pass, the beginnings :meth:`judge` is told its prompts share
    with other evaluations' (the template, the instruction and, where it is shown first, the baseline's output: half
    of the demo's judge prompt tokens) have their key/value caches kept there
    (:class:`perpair.llm.scoring.PrefixStore`): the next evaluation of the same instructions computes only the rest."""

    def __init__(self, model: str, *, batch_size: int | None = None, max_prompt_tokens: int = 8192,
                 dtype: str = "auto", prefix_cache: Path | None = None):
        from perpair.llm.scoring import OptionScorer, PrefixStore, default_batch_size
        from perpair.models import model_fingerprint

        self.name = f"local:{model}"
        hf_model, self.tokenizer = _load_hf(model, dtype)
        self.batch_size = batch_size or default_batch_size(hf_model.device.type == "cpu")
        store = None
        if prefix_cache is not None and self.batch_size == 1:
            store = PrefixStore(prefix_cache, [model_fingerprint(model), str(next(hf_model.parameters()).dtype)])
        self.scorer = OptionScorer(hf_model, self.tokenizer, batch_size=self.batch_size,
                                   max_length=max_prompt_tokens, prefix_store=store)

    def judge(self, prompts: Sequence[Messages], shared: Sequence[Messages] | None = None) -> list[dict[str, Any]]:
        """``shared[i]``: prompt ``i`` with what varies between evaluations left out (its beginning is cached)."""
        def render(messages: Messages) -> str:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

        texts = [render(m) for m in prompts]
        beginnings = [render(m) for m in shared] if shared is not None and self.scorer.prefix_store else None
        results = []
        for scores in self.scorer.score(texts, list(DENOMINATORS), shared=beginnings):
            logprobs = dict(zip(DENOMINATORS, scores.logprob, strict=True))
            # stored in the shape of an OpenAI completion's logprobs, as alpaca_eval annotations carry it
            top = [{"token": t, "logprob": lp} for t, lp in sorted(logprobs.items(), key=lambda kv: -kv[1])]
            results.append({"logprobs": logprobs, "raw_completion": {
                "logprobs": {"content": [{**top[0], "top_logprobs": top}]}, "text": top[0]["token"]}})
        return results


def _run(coro):
    return asyncio.run(coro)


# Marks a judgment that is no verdict (an API judge's reply without top log-probabilities): a re-run asks again, where
# a cached null would stay null after the server is fixed.
UNCACHED = "uncached"
# The statuses of a request the server refuses for itself (too long for its context, too large, a content filter's
# 400): that prompt's missing judgment, asked again next run; any other failure (401, 404: a wrong key or model name)
# would fail every request, and stops the evaluation
REFUSED_REQUEST = frozenset({400, 413, 422})


class ApiLogprobJudge:
    """An OpenAI-compatible server as the AlpacaEval judge: ``max_tokens=1``, ``logprobs``, ``top_logprobs=5``,
    temperature 1 (the official completion settings)."""

    def __init__(self, config):
        self.config = config
        self.name = f"api:{config.model}"

    def judge(self, prompts: Sequence[Messages], shared: Sequence[Messages] | None = None) -> list[dict[str, Any]]:
        """``shared`` is not used: a server keeps (or not) its own prompt cache."""
        from perpair.llm.client import ChatClient

        async def run() -> list[dict[str, Any]]:
            async with ChatClient(self.config) as client:
                return list(await asyncio.gather(*(self._one(client, m) for m in prompts)))

        return _run(run())

    async def _one(self, client, messages: Messages) -> dict[str, Any]:
        from perpair.llm.client import ChatError

        try:
            result = await client.chat(messages, max_tokens=1, temperature=1.0, logprobs=True, top_logprobs=5)
        except ChatError as exc:
            if exc.status not in REFUSED_REQUEST:  # (a wrong key or model, the server down: every call would fail)
                raise
            # one request the server refuses (a prompt over its context, a content filter: HTTP 400) is no verdict
            # for that instruction, not the end of the evaluation (the others' judgments were lost with it)
            return {"logprobs": {}, "raw_completion": {}, UNCACHED: f"the server refused the request: {exc}"}
        logprobs: dict[str, float] = {}
        top = (result.logprobs[0].get("top_logprobs") or []) if result.logprobs else []
        # only the top log-probabilities give P(m) and P(M) (alpaca_eval's logprob_parser reads them alone): the
        # sampled token by itself (temperature 1) would make a coin flip a certain verdict, so a server that
        # leaves them out gives no judgment, counted as such
        for entry in top:
            token = entry.get("token")
            if token in DENOMINATORS and token not in logprobs:
                logprobs[token] = float(entry["logprob"])
        choice = (result.response.get("choices") or [{}])[0]
        if not top:  # the server's settings, not the judge's verdict: not kept as the judgment of this prompt
            return {"logprobs": logprobs, "raw_completion": choice, UNCACHED: "the server returned no top_logprobs"}
        return {"logprobs": logprobs, "raw_completion": choice}


class LocalChatJudge:
    """A local model writing free-form judgments (Arena-Hard), greedy."""

    def __init__(self, model: str, *, batch_size: int | None = None, max_prompt_tokens: int = 8192,
                 dtype: str = "auto"):
        from perpair.eval.generate import GenerationConfig, TransformersGenerator

        self.name = f"local:{model}"
        self.batch_size = batch_size or 4
        self._config = GenerationConfig(batch_size=self.batch_size, max_prompt_tokens=max_prompt_tokens, dtype=dtype)
        self._generator = TransformersGenerator(model, self._config)

    def complete(self, conversations: Sequence[Messages], max_tokens: int) -> list[str]:
        self._generator.config = self._config.model_copy(update={"max_new_tokens": max_tokens})
        return self._generator.generate(conversations)


class ApiChatJudge:
    """An OpenAI-compatible server writing free-form judgments (Arena-Hard: temperature 0).

    An empty reply (``content`` null or ``""``: a reasoning judge that spent ``max_tokens`` thinking, a content
    filter), or a request the server refuses (HTTP 400: a prompt over its context), is ``None``, not ``""``: the
    server gave no judgment, which a re-run asks for again rather than keeping as the judge's verdict-less one."""

    def __init__(self, config):
        self.config = config
        self.name = f"api:{config.model}"

    def complete(self, conversations: Sequence[Messages], max_tokens: int) -> list[str | None]:
        from perpair.llm.client import ChatClient, ChatError

        async def one(client, messages: Messages) -> str | None:
            try:
                return (await client.chat(messages, max_tokens=max_tokens, temperature=0.0)).content or None
            except ChatError as exc:
                if exc.status not in REFUSED_REQUEST:  # (a wrong key or model, the server down: stop, as before)
                    raise
                return None  # a request the server refuses (over its context: HTTP 400): no judgment, asked again

        async def run() -> list[str | None]:
            async with ChatClient(self.config) as client:
                return list(await asyncio.gather(*(one(client, m) for m in conversations)))

        return _run(run())
