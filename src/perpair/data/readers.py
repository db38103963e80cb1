"""Readers: one function per source layout, turning a decoded row into a ``PairRecord``.

A reader raises ``RowProblem`` for a malformed row (a missing or mistyped field) and ``Degenerate`` for a
well-formed row that carries no preference signal (checked here only where it depends on the layout, such
as HH-RLHF transcripts that disagree before the final turn; the generic checks live in ``prepare``).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from perpair.data.llamafactory import UNPAIRED, is_unpaired, read_alpaca, read_sharegpt
from perpair.data.rows import (
    MISSING,
    ColumnMap,
    Degenerate,
    ReadContext,
    as_messages,
    as_score,
    as_text,
    as_tools,
    get,
    optional_text,
    type_name,
    unicode_text,
    with_system,
)
from perpair.data.schema import Message, PairRecord, normalise_text
from perpair.data.sources import RowProblem
from perpair.errors import InputError

Reader = Callable[[dict[str, Any], ReadContext], PairRecord]


def _same(a: list[Message], b: list[Message]) -> bool:
    return len(a) == len(b) and all(
        x["role"] == y["role"] and normalise_text(x["content"]) == normalise_text(y["content"])
        for x, y in zip(a, b, strict=True)
    )


def _repeats(messages: list[Message], prompt: list[Message]) -> bool:
    """Whether a response is a whole conversation that starts with the prompt (the HuggingFaceH4 layout stores
    ``chosen = [user prompt, assistant answer]``)."""
    return len(messages) > len(prompt) and _same(messages[: len(prompt)], prompt)


def _completion(messages: list[Message], prompt: list[Message], name: str) -> list[Message]:
    """The assistant part of a response; a conversation that repeats the prompt first has it removed."""
    if _repeats(messages, prompt):
        messages = messages[len(prompt):]
    if messages[0]["role"] != "assistant":
        raise RowProblem(f"wrong_type:{name}", f"response must start with an assistant message, got role "
                                               f"'{messages[0]['role']}' (and it does not repeat the prompt)",
                         f"{name}[0].role")
    return messages


def _scores(row: dict[str, Any], columns: ColumnMap, required: bool) -> tuple[float | None, float | None]:
    """Scores from the mapped columns (both numbers in every row), else from ``score_*`` or ``metadata.score_*``
    where a row has them: both numbers, or both null (no scores); one without the other is an error, and so are
    they where the responses are read from other fields than ``chosen`` and ``rejected``, which they score."""
    if columns.score_chosen and columns.score_rejected:
        chosen_key, rejected_key = columns.score_chosen, columns.score_rejected
        return as_score(get(row, chosen_key), chosen_key), as_score(get(row, rejected_key), rejected_key)
    for chosen_key, rejected_key in (("score_chosen", "score_rejected"),
                                     ("metadata.score_chosen", "metadata.score_rejected")):
        found = (get(row, chosen_key, required=False), get(row, rejected_key, required=False))
        if found[0] is MISSING and found[1] is MISSING:
            continue
        if found[0] is None and found[1] is None and not required:
            return None, None
        if (columns.chosen, columns.rejected) != ("chosen", "rejected"):  # they score other fields
            raise RowProblem("scores_of_other_fields", f"the row's {chosen_key} and {rejected_key} score its 'chosen' "
                                                       f"and 'rejected' fields, and the responses are read from "
                                                       f"'{columns.chosen}' and '{columns.rejected}': name the scores "
                                                       f"with --score-chosen-col and --score-rejected-col", chosen_key)
        return as_score(get(row, chosen_key), chosen_key), as_score(get(row, rejected_key), rejected_key)
    if required:
        raise RowProblem("missing_field:score_chosen",
                         "field is missing (looked for score_chosen and metadata.score_chosen)", "score_chosen")
    return None, None


# ---------------------------------------------------------------------------------------------- readers

def read_preference(row: dict[str, Any], ctx: ReadContext, *, scores_required: bool = False) -> PairRecord:
    """TRL standard or conversational rows, explicit or implicit prompt, and the UltraFeedback binarized
    layouts (``trl-lib``: strings + ``metadata.score_*``; ``HuggingFaceH4``: message lists + ``score_*``)."""
    columns = ctx.columns
    chosen_raw = get(row, columns.chosen)
    rejected_raw = get(row, columns.rejected)
    roles = ctx.role_map
    prompt_raw = MISSING
    if columns.prompt:
        prompt_raw = get(row, columns.prompt, required=not columns.prompt_optional)
        if prompt_raw is None:
            raise RowProblem(f"missing_field:{columns.prompt}", "field is null", columns.prompt)
    for name, raw in ((columns.prompt, prompt_raw), (columns.chosen, chosen_raw), (columns.rejected, rejected_raw)):
        if isinstance(raw, str) and _starts_transcript(raw) and "\n\nAssistant:" in raw:
            raise RowProblem("hh_transcript", "an HH-RLHF transcript ('\\n\\nHuman: …\\n\\nAssistant: …'), which "
                                              "this layout reads as one message, its turns and their markers as "
                                              "text: read the file with --format hh-rlhf (which takes "
                                              "--score-chosen-col and --score-rejected-col too)", name)
    if prompt_raw is MISSING:
        prompt, chosen, rejected = _split_implicit(chosen_raw, rejected_raw, columns, roles)
    else:
        prompt = as_messages(prompt_raw, columns.prompt or "prompt", "user", roles)
        chosen = as_messages(chosen_raw, columns.chosen, "assistant", roles)
        rejected = as_messages(rejected_raw, columns.rejected, "assistant", roles)
        if _repeats(chosen, prompt) and _repeats(rejected, prompt):
            # two whole conversations: all they share is the prompt, which goes on past the prompt column where they
            # share later turns too (the column holds the first user turn of a longer conversation)
            shared, chosen, rejected = _split_conversations(chosen, rejected, columns)
            prompt = prompt + shared[len(prompt):]
        else:
            chosen = _completion(chosen, prompt, columns.chosen)
            rejected = _completion(rejected, prompt, columns.rejected)
    prompt = with_system(prompt, optional_text(row, columns.system), columns.system)
    score_chosen, score_rejected = _scores(row, columns, scores_required)
    _no_template_kwargs(row)
    return PairRecord(prompt=prompt, chosen=chosen, rejected=rejected, source=ctx.source, source_row=ctx.row,
                      score_chosen=score_chosen, score_rejected=score_rejected,
                      tools=as_tools(get(row, "tools", required=False), "tools"))


def _no_template_kwargs(row: dict[str, Any]) -> None:
    """TRL passes a row's ``chat_template_kwargs`` (``enable_thinking``, …) to the chat template; a pair has no place
    for them, and tokenizing without them would train on other tokens than TRL's, so a row that sets one is
    malformed (a struct column's null fields set nothing)."""
    kwargs = get(row, "chat_template_kwargs", required=False)
    if kwargs is MISSING or kwargs is None or (isinstance(kwargs, dict) and all(v is None for v in kwargs.values())):
        return
    raise RowProblem("unsupported_field", "chat_template_kwargs are not read: TRL passes them to the chat template, "
                                          "perpair's pairs have no place for them; remove the column to train "
                                          "without them", "chat_template_kwargs")


def _split_implicit(chosen_raw: Any, rejected_raw: Any, columns: ColumnMap,
                    roles: Mapping[str, str]) -> tuple[list[Message], list[Message], list[Message]]:
    """Implicit prompt: the part the two responses share. Message lists split at the first message that
    differs; plain strings at the first differing character, backed up to the last whitespace so that a
    word is not cut in two (TRL's convention keeps the shared prefix as the prompt too)."""
    if isinstance(chosen_raw, str) and isinstance(rejected_raw, str):
        unicode_text(chosen_raw, columns.chosen)
        unicode_text(rejected_raw, columns.rejected)
        end = 0
        limit = min(len(chosen_raw), len(rejected_raw))
        while end < limit and chosen_raw[end] == rejected_raw[end]:
            end += 1
        # also where one text is a start of the other ("… 4" / "… 42"): the shared text ends inside a word there too
        while end > 0 and not chosen_raw[end - 1].isspace():
            end -= 1
        prefix = chosen_raw[:end]
        return ([{"role": "user", "content": prefix}],
                [{"role": "assistant", "content": chosen_raw[end:]}],
                [{"role": "assistant", "content": rejected_raw[end:]}])
    return _split_conversations(as_messages(chosen_raw, columns.chosen, "assistant", roles),
                                as_messages(rejected_raw, columns.rejected, "assistant", roles), columns)


def _split_conversations(chosen: list[Message], rejected: list[Message],
                         columns: ColumnMap) -> tuple[list[Message], list[Message], list[Message]]:
    """Two whole conversations split at the first message that differs: the prompt, and the two responses."""
    shared = 0
    while (shared < min(len(chosen), len(rejected)) - 1
           and _same(chosen[shared:shared + 1], rejected[shared:shared + 1])):
        shared += 1
    prompt = chosen[:shared]
    if not prompt:
        raise RowProblem(f"missing_field:{columns.prompt or 'prompt'}",
                         "no prompt field, and the two conversations share no leading messages",
                         columns.prompt or "prompt")
    # After the first difference, a user (or tool) turn: the conversations differ before their final assistant
    # turn, and the turns after the difference answer no shared prompt (as HH-RLHF transcripts that diverge)
    if any(m["role"] != "assistant" for m in chosen[shared:] + rejected[shared:]):
        raise Degenerate("transcripts_diverge", "the two conversations differ before their final assistant turn")
    return prompt, chosen[shared:], rejected[shared:]


def read_ultrafeedback(row: dict[str, Any], ctx: ReadContext) -> PairRecord:
    """UltraFeedback binarized: as ``read_preference``, and the two GPT-4 overall scores are required."""
    return read_preference(row, ctx, scores_required=True)


_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _starts_transcript(text: str) -> bool:
    """Whether ``text`` starts as an HH-RLHF transcript: ``"\\n\\nHuman:"``, or ``"Human:"`` where a copy stripped
    it."""
    return text.lstrip().startswith("Human:")


def _parse_transcript(text: str, name: str) -> list[Message]:
    if _starts_transcript(text):  # a copy that stripped the transcript's leading "\n\n"
        text = "\n\n" + text.lstrip()
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowProblem(f"wrong_type:{name}", "not an HH-RLHF transcript (expected '\\n\\nHuman: ...' "
                                               "followed by '\\n\\nAssistant: ...')", name)
    return [{"role": _HH_ROLES[speaker], "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2], strict=True)]


def _is_hh_prompt(value: Any) -> bool:
    """An HH-RLHF transcript cut before the final turns' text (``"\\n\\nHuman: …\\n\\nAssistant:"``)."""
    return isinstance(value, str) and _starts_transcript(value) and value.rstrip().endswith("\n\nAssistant:")


def read_hh_rlhf(row: dict[str, Any], ctx: ReadContext) -> PairRecord:
    """Anthropic HH-RLHF: two full transcripts; the prompt is their shared conversation, parsed into
    messages, and the responses are the final assistant turns. Copies that cut the transcript before the final
    turns' text (a ``prompt`` ending ``"\\n\\nAssistant:"``, the responses' text in ``chosen`` and ``rejected``) are
    read as the transcripts they join into."""
    texts = [as_text(get(row, name), name) for name in ("chosen", "rejected")]
    prompt = get(row, "prompt", required=False)
    if prompt is not MISSING:
        if not _is_hh_prompt(prompt):
            raise RowProblem("wrong_type:prompt", "not an HH-RLHF prompt (expected '\\n\\nHuman: ...' ending with "
                                                  "'\\n\\nAssistant:')", "prompt")
        texts = [text if text.startswith(prompt) else prompt + text for text in texts]
    chosen = _parse_transcript(texts[0], "chosen")
    rejected = _parse_transcript(texts[1], "rejected")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise RowProblem(f"wrong_type:{name}", "transcript does not end with an Assistant turn", name)
    score_chosen, score_rejected = _scores(row, ctx.columns, False)
    record = PairRecord(prompt=chosen[:-1], chosen=chosen[-1:], rejected=rejected[-1:], source=ctx.source,
                        source_row=ctx.row, score_chosen=score_chosen, score_rejected=score_rejected)
    if not _same(chosen[:-1], rejected[:-1]):
        raise Degenerate("transcripts_diverge", "the two transcripts differ before the final Assistant turn")
    return record


# What OpenAI's preference layout puts in ``input``; ``parallel_tool_calls`` (whether the model may call several
# tools at once) is an API setting that chat templates do not take, and a pair holds no tool call it could change.
OPENAI_INPUT = ("messages", "tools", "parallel_tool_calls")


def read_openai(row: dict[str, Any], ctx: ReadContext) -> PairRecord:
    """OpenAI preference fine-tuning layout: ``input.messages``, ``preferred_output``,
    ``non_preferred_output`` (lists of assistant messages)."""
    roles = ctx.role_map
    prompt = as_messages(get(row, "input.messages"), "input.messages", "user", roles)
    for key, value in get(row, "input").items():  # a misspelt "tool" would leave the tools out
        if key not in OPENAI_INPUT and value not in (None, "", [], {}):
            raise RowProblem("unsupported_field", f"input.{key} is not part of OpenAI's preference layout (input holds "
                                                  f"{', '.join(OPENAI_INPUT)})", f"input.{key}")
    chosen = _completion(as_messages(get(row, "preferred_output"), "preferred_output", "assistant", roles),
                         prompt, "preferred_output")
    rejected = _completion(as_messages(get(row, "non_preferred_output"), "non_preferred_output", "assistant",
                                       roles), prompt, "non_preferred_output")
    tools = as_tools(get(row, "input.tools", required=False), "input.tools")
    # An empty list is OpenAI's "no tools" (its own examples write `"tools": []` for a conversation without any), not
    # a list to render: a template that renders any list (Llama 3.1's `tools is not none`) would put a tool-calling
    # preamble without a function into every such prompt.
    return PairRecord(prompt=prompt, chosen=chosen, rejected=rejected, source=ctx.source, source_row=ctx.row,
                      tools=None if tools == "[]" else tools)


ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


def _aspect_ratings(completion: dict[str, Any], where: str) -> dict[str, float]:
    """Per-aspect GPT-4 ratings of one raw UltraFeedback completion (``"N/A"`` ratings are left out)."""
    annotations = completion.get("annotations")
    if annotations is None:
        return {}
    if not isinstance(annotations, dict):
        raise RowProblem("wrong_type:completions", f"expected an object, got {type_name(annotations)}",
                         f"{where}.annotations")
    ratings = {}
    for aspect in ASPECTS:
        entry = annotations.get(aspect)
        if isinstance(entry, list):  # some releases wrap each aspect in a one-element list
            entry = entry[0] if entry else None
        if entry is None:
            continue
        rating = entry.get("Rating") if isinstance(entry, dict) else None
        if rating in (None, "N/A", ""):
            continue
        try:
            value = float(rating)
        except (TypeError, ValueError, OverflowError):
            shown = repr(rating)
            shown = shown if len(shown) <= 40 else f"{shown[:20]}… ({len(shown)} characters)"
            raise RowProblem("wrong_type:completions", f"rating {shown} is not a number",
                             f"{where}.annotations.{aspect}.Rating") from None
        if not math.isfinite(value):
            raise RowProblem("wrong_type:completions", f"rating {rating!r} is not finite",
                             f"{where}.annotations.{aspect}.Rating")
        ratings[aspect] = value
    return ratings


def read_ultrafeedback_raw(row: dict[str, Any], ctx: ReadContext) -> PairRecord:
    """Raw UltraFeedback (``instruction`` + four rated ``completions``), binarized deterministically as the
    HuggingFaceH4 recipe does: the best ``overall_score`` is chosen (the first in list order on a tie), and
    the rejected response is a seeded choice among the others. The choice depends only on ``--seed`` and
    the instruction text, never on row order. Both responses keep their per-aspect ratings."""
    instruction = as_text(get(row, "instruction"), "instruction")
    completions = get(row, "completions")
    if not isinstance(completions, list):
        raise RowProblem("wrong_type:completions", f"expected a list, got {type_name(completions)}",
                         "completions")
    parsed = []
    for index, completion in enumerate(completions):
        where = f"completions[{index}]"
        if not isinstance(completion, dict):
            raise RowProblem("wrong_type:completions", f"expected an object, got {type_name(completion)}",
                             where)
        response = as_text(get(completion, "response"), f"{where}.response")
        score = as_score(get(completion, "overall_score"), f"{where}.overall_score")
        parsed.append((response, score, _aspect_ratings(completion, where)))
    if len(parsed) < 2:
        raise Degenerate("too_few_responses", f"{len(parsed)} completion(s); a pair needs two", "completions")
    best = max(range(len(parsed)), key=lambda i: (parsed[i][1], -i))
    others = [i for i in range(len(parsed)) if i != best]
    digest = hashlib.sha256(f"{ctx.seed}\x00{instruction}".encode()).digest()
    worse = others[int.from_bytes(digest[:8], "big") % len(others)]
    return PairRecord(
        prompt=[{"role": "user", "content": instruction}],
        chosen=[{"role": "assistant", "content": parsed[best][0]}],
        rejected=[{"role": "assistant", "content": parsed[worse][0]}],
        source=ctx.source, source_row=ctx.row,
        score_chosen=parsed[best][1], score_rejected=parsed[worse][1],
        ratings_chosen=parsed[best][2], ratings_rejected=parsed[worse][2],
    )


READERS: dict[str, Reader] = {
    "ultrafeedback": read_ultrafeedback,
    "ultrafeedback-raw": read_ultrafeedback_raw,
    "hh-rlhf": read_hh_rlhf,
    "openai": read_openai,
    "sharegpt": read_sharegpt,
    "alpaca": read_alpaca,
    "trl": read_preference,
    "columns": read_preference,
}
FORMATS = tuple(READERS)


def detect_format(row: dict[str, Any]) -> str | None:
    """The layout a row is in, from its fields; ``None`` when it is none we know. Unpaired (KTO) rows
    are refused here, with their own message."""
    if is_unpaired(row):
        raise InputError(UNPAIRED)
    if "instruction" in row and "completions" in row:
        return "ultrafeedback-raw"
    if "input" in row and "preferred_output" in row:
        return "openai"
    if "chosen" in row and "rejected" in row:
        if "conversations" in row:
            return "sharegpt"
        if "instruction" in row:
            return "alpaca"
        if _is_hh_prompt(row.get("prompt")):
            return "hh-rlhf"
        if "prompt" in row:
            # (null scores, as a Parquet column gives a row without them, are none: TRL's layout, scores optional)
            has_scores = row.get("score_chosen") is not None or (
                isinstance(row.get("metadata"), dict) and row["metadata"].get("score_chosen") is not None)
            return "ultrafeedback" if has_scores else "trl"
        chosen = row["chosen"]
        if isinstance(chosen, str) and "\n\nAssistant:" in chosen and ("\n\nHuman:" in chosen
                                                                     or _starts_transcript(chosen)):
            return "hh-rlhf"
        return "trl"
    return None


# A perpair pairs file given as data (to merge, re-split or cut it): not a layout one names with --format
PAIRS_LAYOUT = "perpair pairs"


def read_pairs_row(row: dict[str, Any], ctx: ReadContext) -> PairRecord:
    """A row of a perpair pairs file as the pair it is: its messages, scores, per-aspect ratings, tools, and the
    source row it was prepared from (``source``, ``source_row``, ``meta``), not this file's."""
    def optional(name: str) -> Any:
        value = get(row, name, required=False)
        return None if value is MISSING else value

    def messages(name: str) -> list[Message]:
        return as_messages(get(row, name), name, "user" if name == "prompt" else "assistant")

    def ratings(name: str) -> dict[str, float] | None:
        if (value := optional(name)) is None:
            return None
        items = value.items() if isinstance(value, dict) else value  # (a Parquet map column reads as pairs)
        return {str(key): as_score(score, name) for key, score in items}

    origin = {"source": str, "source_row": int, "meta": str}
    for name, kind in origin.items():
        if not isinstance(get(row, name), kind):
            raise RowProblem(f"wrong_type:{name}", f"a pairs file's {name} is a {kind.__name__}", name)
    optional("pair_id")  # (computed again from the contents)
    scores = [None if (value := optional(name)) is None else as_score(value, name)
              for name in ("score_chosen", "score_rejected")]
    return PairRecord(prompt=messages("prompt"), chosen=messages("chosen"), rejected=messages("rejected"),
                      source=row["source"], source_row=row["source_row"], meta=row["meta"],
                      score_chosen=scores[0], score_rejected=scores[1], ratings_chosen=ratings("ratings_chosen"),
                      ratings_rejected=ratings("ratings_rejected"), tools=optional("tools"))


def reader_for(name: str) -> Reader:
    if name not in READERS:
        raise InputError(f"unknown format '{name}'; known formats: {', '.join(FORMATS)}")
    return READERS[name]
