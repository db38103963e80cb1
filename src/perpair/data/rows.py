"""What every reader shares: the read context, field access, and the checks on messages and roles.

A reader raises ``RowProblem`` (from :mod:`perpair.data.sources`) for a malformed row and ``Degenerate``
for a well-formed row that carries no preference signal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from perpair.data.schema import Message
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
    """Where the parts of a pair are in a row; dotted names reach into nested objects. With
    ``prompt_optional`` a missing prompt means an implicit prompt (the responses' shared start); without
    it (the user named the column), a missing prompt is an error."""

    prompt: str | None = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    score_chosen: str | None = None
    score_rejected: str | None = None
    prompt_optional: bool = True


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
        value = value[part]
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
    return value


def as_score(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowProblem(f"wrong_type:{name}", f"expected a number, got {type_name(value)}", name)
    if not math.isfinite(value):
        raise RowProblem(f"wrong_type:{name}", f"expected a finite number, got {value}", name)
    return float(value)


def as_content(value: Any, code: str, where: str) -> str:
    """A message's content: a string, or a list of parts of which only text parts
    (``{"type": "text", "text": ...}``) are read. The text parts are concatenated as they are, with nothing
    added between them (they are pieces of one text, as chat APIs treat them)."""
    if isinstance(value, str):
        return value
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
        texts.append(part["text"])
    return "".join(texts)


def as_role(value: Any, code: str, where: str, role_map: Mapping[str, str]) -> str:
    """A role name mapped to one of ``ROLES``; anything else is an error naming the field, with the fix."""
    if not isinstance(value, str) or not value:
        raise RowProblem(code, f"message has no string role, got {type_name(value)!s}", where)
    role = role_map.get(value, value)
    if role not in ROLES:
        raise RowProblem("bad_role", f"role {value!r} is not one of {', '.join(ROLES)}; map it with "
                                     f"--role-map {value}=ROLE", where)
    return role


def as_messages(value: Any, name: str, default_role: str,
                role_map: Mapping[str, str] | None = None) -> list[Message]:
    """A string (one message of ``default_role``) or a non-empty list of ``{"role", "content"}`` objects."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else type_name(value)
        raise RowProblem(f"wrong_type:{name}", f"expected a string or a list of messages, got {what}", name)
    messages = []
    for index, message in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(message, dict):
            raise RowProblem(f"wrong_type:{name}", f"expected a message object, got {type_name(message)}",
                             where)
        role = as_role(message.get("role"), f"wrong_type:{name}", f"{where}.role", role_map or {})
        content = as_content(message.get("content"), f"wrong_type:{name}", f"{where}.content")
        messages.append({"role": role, "content": content})
    return messages
