"""Tokenization of preference pairs exactly as TRL's ``DPOTrainer`` does it, so a pair gives the same tokens here
and there.

For a conversation: ``prompt_ids`` = the prompt rendered with the chat template and the generation prompt;
``chosen_ids`` / ``rejected_ids`` = the rest of the templated ``prompt + response`` conversation. Where the
prompt alone does not tokenize as a prefix of the full conversation, the completion starts where they diverge
(TRL's ``common_prefix_length``). Truncation is TRL's default ``keep_start`` applied to ``prompt + completion``
separately for each response; pairs whose prompt alone fills ``max_length`` are skipped, as TRL skips them.
A pair's ``tools`` (JSON text of tool descriptions) go to the chat template with every rendering, as TRL passes
a ``tools`` column. Text that holds a chat template's turn markers or the tokenizer's special tokens is refused, before
any pair is tokenized (:func:`refuse_markup`, which the callers run over their pairs): it was rendered with a template
already (TRL tokenizes it as it is, templating it twice), and the tokenizer would read the markers as its special
tokens, not as text.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from perpair.data.schema import TEMPLATE_MARKUP
from perpair.errors import PerpairError


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]  # empty for a pair routed to SFT (its rejected response is never computed)
    truncated: bool = field(default=False, compare=False)  # a response was cut to fit max_length
    # the prompt rendered alone is no prefix of prompt + response (a generation prompt the template does not render
    # before a response, tokens merged across the boundary): trained on their common start, as TRL does
    prompt_cut: bool = field(default=False, compare=False)

    @property
    def tokens(self) -> int:
        """Unique tokens of the pair when the prompt is shared by both responses."""
        return len(self.prompt) + len(self.chosen) + len(self.rejected)

    @property
    def longest(self) -> int:
        """Tokens of its longest sequence, the prompt and one response (what attention runs over)."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def _ids(tokenizer: Any, messages: list[dict[str, str]], tools: list[dict] | None, *,
         generation_prompt: bool = False) -> list[int]:
    from jinja2 import TemplateError

    if hasattr(tokenizer, "chat_template") and not tokenizer.chat_template:  # (None, or an empty file's "")
        raise PerpairError("the tokenizer has no chat template; perpair tokenizes conversations with it, as TRL does")
    try:
        # (tools=None is the default; not passed, so a template call without tools is the one it was before)
        extra = {"tools": tools} if tools is not None else {}
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            add_generation_prompt=generation_prompt, **extra)
    except TemplateError as exc:  # the template's own refusal (Gemma's "System role not supported", …)
        roles = ", ".join(m["role"] for m in messages)
        raise PerpairError(f"the tokenizer's chat template refuses the conversation ({roles}): {exc}") from None
    return list(out["input_ids"])


def _special_tokens(tokenizer: Any) -> re.Pattern | None:
    """The tokenizer's special added tokens (``<|im_end|>``, ``</s>``, a model's own), as one pattern: in a
    message's text, the tokenizer would read them as those tokens."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return _pattern(tuple(sorted({token.content for token in decoder.values()
                                  if getattr(token, "special", False) and token.content}, key=len, reverse=True)))


@functools.lru_cache(maxsize=8)
def _pattern(texts: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def markup_problem(tokenizer: Any, parts: dict[str, list[dict[str, Any]] | None]) -> str | None:
    """Why a pair's messages cannot be tokenized as text (a chat template's turn marker, one of the tokenizer's
    special tokens), naming the field; None where they can."""
    special = _special_tokens(tokenizer)
    for name, messages in parts.items():
        for index, message in enumerate(messages or []):
            if found := TEMPLATE_MARKUP.search(message["content"]):
                why = ("a chat template's turn marker: the text was rendered with a template already, and perpair "
                       "renders the pair's messages with the model's chat template")
            elif special is not None and (found := special.search(message["content"])):
                why = "one of the tokenizer's special tokens, which tokenization would read as that token, not as text"
            else:
                continue
            return f"field '{name}[{index}].content': the text holds '{found.group()}', {why}"
    return None


def refuse_markup(tokenizer: Any, pairs: Iterable[tuple[str, dict[str, list[dict[str, Any]] | None]]], where: str,
                  among: str) -> None:
    """Refuse every pair (``(pair_id, {"prompt": …, "chosen": …, "rejected": …})``) whose text cannot be tokenized as
    text (:func:`markup_problem`), named at once before any is tokenized (the first of them stopped the run: one run per
    pair to find them all). ``where`` starts the message (the pairs file); ``among`` says of which pairs they are."""
    marked = [(pair_id, problem) for pair_id, parts in pairs if (problem := markup_problem(tokenizer, parts))]
    if marked:
        pair_id, problem = marked[0]
        others = ", ".join(p for p, _ in marked[1:6]) + (" …" if len(marked) > 6 else "")
        raise PerpairError(f"{where}pair {pair_id}: {problem}; {len(marked)} pair(s) {among} hold such text"
                           + (f" (the others: {others})" if others else "") + "; give the turns as messages without "
                           "the markers, or leave the pairs out")


def pair_tools(pairs: Any) -> list[str | None]:
    """Each pair's ``tools`` of a pairs table; None throughout for a pairs file written before the column."""
    return pairs.column("tools").to_pylist() if "tools" in pairs.column_names else [None] * len(pairs)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(tokenizer: Any, prompt: list[dict[str, str]], chosen: list[dict[str, str]],
                  rejected: list[dict[str, str]] | None, max_length: int | None,
                  tools: str | None = None) -> TokenizedPair | None:
    """The pair's token ids (TRL-compatible), truncated to ``max_length``; ``None`` when the prompt alone fills
    ``max_length`` (no completion token would be left). ``rejected=None`` skips the rejected response. ``tools``:
    the pair's tool descriptions (JSON text), or None."""
    prompt = [_message(m) for m in prompt]
    described = json.loads(tools) if tools is not None else None
    prompt_ids = _ids(tokenizer, prompt, described, generation_prompt=True)
    if described and prompt_ids == _ids(tokenizer, prompt, None, generation_prompt=True):
        # TRL drops them the same way, without a word: the model would learn to call tools it is never shown
        raise PerpairError(f"the pair describes {len(described)} tool(s), which the tokenizer's chat template does "
                           "not render (it ignores its 'tools' input): the model would be trained without the "
                           "tool descriptions; use a model whose template renders tools, or leave the tools column "
                           "out of the data to train without them")
    full_chosen = _ids(tokenizer, prompt + [_message(m) for m in chosen], described)
    full_rejected = (_ids(tokenizer, prompt + [_message(m) for m in rejected], described)
                     if rejected is not None else None)
    cut = _common_prefix(prompt_ids, full_chosen)
    if full_rejected is not None:
        cut = min(cut, _common_prefix(prompt_ids, full_rejected))
    if cut == 0:
        # no token before the response: its first token would be scored from whatever precedes the pair in a packed
        # row (another pair's last token), or not at all
        raise PerpairError("the chat template renders no token of the prompt before the response (the prompt rendered "
                           "alone and prompt + response start differently, or the prompt renders as nothing): the "
                           "response's first token has nothing to be predicted from; give the pair a prompt, or "
                           "use a chat template that renders the prompt before the response")
    prompt_cut = cut < len(prompt_ids)
    prompt_ids = prompt_ids[:cut]
    chosen_ids = full_chosen[cut:]
    rejected_ids = full_rejected[cut:] if full_rejected is not None else []
    if max_length is not None:
        if len(prompt_ids) >= max_length:
            return None
        room = max_length - len(prompt_ids)
        truncated = len(chosen_ids) > room or len(rejected_ids) > room
        return TokenizedPair(prompt_ids, chosen_ids[:room], rejected_ids[:room], truncated, prompt_cut)
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, prompt_cut=prompt_cut)


def _message(message: dict[str, Any]) -> dict[str, str]:
    return {"role": message["role"], "content": message["content"]}
