"""What every reader shares: the read context, field access, and the checks on messages and roles.

A reader raises ``RowProblem`` (from :mod:`perpair.data.sources`) for a malformed row and ``Degenerate``
for a well-formed row that carries no preference signal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from perpair.data.schema import Message, normalise_text
from perpair.data.sources import RowProblem

# The roles a pair's messages may have once read; chat templates know these four.
ROLES = ("system", "user", "assistant", "tool")


class Degenerate(Exception):
    """A well-formed pair with no preference signal; ``reason`` is the counted reason."""

    def __init__(self, reason: str, detail: str, field: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.field = field


@dataclass(frozen=True)
class ColumnMap:
    """Where the parts of a pair are in a row; dotted names reach into nested objects. ``prompt`` None: the
    prompt is implicit (the responses' shared start). With ``prompt_optional`` a row without the prompt
    field has an implicit prompt (``prepare`` decides that once per source, from its first row); without it
    (the user named the column), a missing prompt is an error. A null prompt is an error either way.
    ``system``: a column whose text, where a row has it, is the prompt's system message."""

    prompt: str | None = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    score_chosen: str | None = None
    score_rejected: str | None = None
    prompt_optional: bool = True
    system: str | None = "system"


@dataclass(frozen=True)
class ReadContext:
    source: str
    row: int
    columns: ColumnMap = field(default_factory=ColumnMap)
    seed: int = 0
    role_map: Mapping[str, str] = field(default_factory=dict)   # source role name -> one of ROLES
    layout: Any = None                                          # a reader's own column/tag description


MISSING = object()


def get(row: dict[str, Any], path: str, *, required: bool = True) -> Any:
    """``row[path]`` where ``path`` may be dotted (``metadata.score_chosen``). A missing field's message
    lists the fields that are there, so a misspelt column name is seen at once."""
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            if required:
                raise RowProblem(f"missing_field:{path}", "field is missing" + fields_hint(value), path)
            return MISSING
        value = dict.__getitem__(value, part)
    if (note := getattr(row, "note_read", None)) is not None:  # a row that keeps count of what was read of it
        note(path)
    if value is None and required:
        raise RowProblem(f"missing_field:{path}", "field is null", path)
    return value


def fields_hint(value: Any, limit: int = 20) -> str:
    if not isinstance(value, dict):
        return f" (found {type_name(value)}, not an object)"
    names = sorted(map(str, value))
    shown = ", ".join(names[:limit]) + (", …" if len(names) > limit else "")
    return f" (the row has: {shown})" if names else " (the row has no fields)"


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def as_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RowProblem(f"wrong_type:{name}", f"expected a string, got {type_name(value)}", name)
    return unicode_text(value, name)


def unicode_text(text: str, where: str) -> str:
    """``text``, which must be Unicode that UTF-8 can store: a lone surrogate (from a ``\\ud83d`` escape in JSON,
    half of an emoji) is not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowProblem("not_unicode", f"the text holds U+{ord(exc.object[exc.start]):04X}, half of a surrogate "
                                        f"pair without its other half, which is not a character", where) from None
    return text


def as_score(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowProblem(f"wrong_type:{name}", f"expected a number, got {type_name(value)}", name)
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float's range
        raise RowProblem(f"wrong_type:{name}", f"expected a finite number, got an integer of "
                                               f"{len(str(abs(value)))} digits", name) from None
    if not math.isfinite(number):
        raise RowProblem(f"wrong_type:{name}", f"expected a finite number, got {value}", name)
    return number


def optional_text(row: dict[str, Any], column: str | None) -> str:
    """The text of an optional column: "" where the row lacks it or it is null."""
    if not column:
        return ""
    value = get(row, column, required=False)
    if value is MISSING or value is None:
        return ""
    return as_text(value, column)


def with_system(prompt: list[Message], system: str, column: str | None) -> list[Message]:
    """``prompt`` after the system message ``system`` (a system column's text), unless it is empty or the
    prompt starts with the same system message; a different one is an error (one of them would be lost)."""
    if not system:
        return prompt
    if prompt and prompt[0]["role"] == "system":
        if normalise_text(prompt[0]["content"]) != normalise_text(system):
            raise RowProblem("two_system_prompts", "the row has a system column and a different system turn; "
                                                   "perpair would have to drop one", column)
        return prompt
    return [{"role": "system", "content": system}, *prompt]


def as_content(value: Any, code: str, where: str) -> str:
    """A message's content: a string, or a list of parts of which only text parts
    (``{"type": "text", "text": ...}``) are read. The text parts are concatenated as they are, with nothing
    added between them (they are pieces of one text, as chat APIs treat them)."""
    if isinstance(value, str):
        return unicode_text(value, where)
    if not isinstance(value, list):
        raise RowProblem(code, f"content must be a string or a list of text parts, got {type_name(value)}",
                         where)
    texts = []
    for index, part in enumerate(value):
        if not isinstance(part, dict):
            raise RowProblem(code, f"content part must be an object, got {type_name(part)}", f"{where}[{index}]")
        kind = part.get("type")
        if kind != "text":
            shown = kind if isinstance(kind, str) else type_name(kind)
            raise RowProblem("non_text_content", f"content part of type '{shown}': perpair reads text only "
                                                 f"(images and other media are not supported)",
                             f"{where}[{index}].type")
        if not isinstance(part.get("text"), str):
            raise RowProblem(code, f"text part has no string 'text', got {type_name(part.get('text'))}",
                             f"{where}[{index}].text")
        texts.append(unicode_text(part["text"], f"{where}[{index}].text"))
    return "".join(texts)


def as_tools(value: Any, name: str) -> str | None:
    """A row's tool descriptions as a pair stores them (JSON text), read as TRL's ``DPOTrainer`` reads a ``tools``
    column: a list of objects, or that list as JSON text, passed to the chat template as it is (an empty list
    too: some templates render it), but for the null fields of objects. None where the row has none (no field,
    null, empty text)."""
    if value is MISSING or value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowProblem(f"wrong_type:{name}", f"tools are not JSON text ({exc.msg}, character {exc.pos})",
                             name) from None
    else:
        # A struct column (Parquet, a Hub dataset) gives every description each field that any description of the
        # column has, null where it has none: another function's parameters ("city": null), "required": null. The
        # data never wrote them (TRL renders them into the prompt); without them the pair is the one its JSON gives.
        value = _without_nulls(value)
    if not isinstance(value, list):
        raise RowProblem(f"wrong_type:{name}", f"expected a list of tool descriptions, got {type_name(value)}", name)
    for index, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise RowProblem(f"wrong_type:{name}", f"expected a tool description (an object), got "
                                                   f"{type_name(tool)}", f"{name}[{index}]")
    text = json.dumps(value, ensure_ascii=False)
    unicode_text(text, name)
    return text


def _without_nulls(value: Any) -> Any:
    """``value`` without the null fields of its objects, at every depth (a list keeps its null items)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# Row fields that hold a pair's media, whatever the layout: TRL's vision data (``images``), LLaMA-Factory's
# (``images``, ``videos``, ``audios``), and ``image`` as RLAIF-V and other vision sets name it.
MEDIA_FIELDS = ("images", "image", "videos", "video", "audios", "audio")


def holds_something(value: Any) -> bool:
    """Whether ``value`` holds data: not null, empty, nor a list or object of such (a struct column's nulls)."""
    if isinstance(value, dict):
        return any(holds_something(v) for v in value.values())
    if isinstance(value, list):
        return any(holds_something(v) for v in value)
    return value not in (None, "")


def check_no_media(row: dict[str, Any]) -> None:
    """A row with media (an ``images`` column, …) is vision (or audio) data: read as text alone, its pair would
    train on a prompt that refers to a picture the model never sees, so it is malformed, as an image part is."""
    for key in MEDIA_FIELDS:
        if key in row and holds_something(row[key]):
            raise RowProblem("non_text_content", f"the row has {key}: perpair reads text only (images, video and audio "
                                                 f"are not supported), and the pair read without them would be "
                                                 f"another pair", key)


def as_role(value: Any, code: str, where: str, role_map: Mapping[str, str]) -> str:
    """A role name mapped to one of ``ROLES``; anything else is an error naming the field, with the fix."""
    if not isinstance(value, str) or not value:
        raise RowProblem(code, f"message has no string role, got {type_name(value)!s}", where)
    role = role_map.get(value, value)
    if role not in ROLES:
        raise RowProblem("bad_role", f"role {value!r} is not one of {', '.join(ROLES)}; map it with "
                                     f"--role-map {value}=ROLE", where)
    return role


def check_message_fields(message: dict[str, Any], read: tuple[str, ...], where: str) -> None:
    """A message field besides role and content that holds something (a tool call, a tool's name or call id,
    reasoning text, …) is refused: a pair keeps each message's role and content only, and dropping the field
    would train on another conversation than the data's."""
    for key, value in message.items():
        if key not in read and value not in (None, "", [], {}):
            raise RowProblem("unsupported_message_field", f"message field '{key}' is not read: perpair's pairs "
                                                          f"keep a message's role and content only, and dropping it "
                                                          f"would change the conversation", f"{where}.{key}")


def as_messages(value: Any, name: str, default_role: str,
                role_map: Mapping[str, str] | None = None) -> list[Message]:
    """A string (one message of ``default_role``) or a non-empty list of ``{"role", "content"}`` objects."""
    if isinstance(value, str):
        return [{"role": default_role, "content": unicode_text(value, name)}]
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else type_name(value)
        raise RowProblem(f"wrong_type:{name}", f"expected a string or a list of messages, got {what}", name)
    messages = []
    for index, message in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(message, dict):
            raise RowProblem(f"wrong_type:{name}", f"expected a message object, got {type_name(message)}",
                             where)
        if "role" not in message:  # another program's turns ({"from", "value"}): not fields to drop, but no message
            shown = ", ".join(sorted(map(str, message))) or "none"
            raise RowProblem(f"wrong_type:{name}", f"message has no 'role' field (its fields: {shown}); a message is "
                                                   f"written {{\"role\": …, \"content\": …}}", f"{where}.role")
        check_message_fields(message, ("role", "content"), where)
        role = as_role(message.get("role"), f"wrong_type:{name}", f"{where}.role", role_map or {})
        content = as_content(message.get("content"), f"wrong_type:{name}", f"{where}.content")
        messages.append({"role": role, "content": content})
    return messages
