"""LLaMA-Factory's preference layouts (``ranking: true``): sharegpt and alpaca, and its ``dataset_info.json``.

* **sharegpt**: ``conversations`` is a list of ``{"from", "value"}`` turns (``human``, ``gpt``, ``system``,
  ``observation``, ``function_call``); ``chosen`` and ``rejected`` are one such turn each; optional top-level
  ``system`` (a system prompt) and ``tools`` (tool descriptions, a JSON string) columns.
* **alpaca**: ``instruction`` and ``input`` (joined by a newline into the last user turn, as LLaMA-Factory
  does), ``chosen`` and ``rejected`` strings, optional ``system``, ``history`` (``[user, assistant]`` pairs
  before the instruction) and ``tools``.

Roles map to perpair's four: ``human`` -> user, ``gpt`` -> assistant, ``system`` -> system,
``observation`` (a tool's result) -> tool, and ``function_call`` -> assistant, since it is the model's own
turn. Its content, the call as JSON text, is kept as the message's text (LLaMA-Factory's templates render a
call in each model's own format, which a pair of role and content cannot hold), and prepare counts the pairs
that have one (``function_call_as_text``). ``tools`` (a JSON list of function descriptions) becomes the pair's
``tools``, given to the chat template with the prompt; a bare description ``{"name", ...}`` is wrapped as
``{"type": "function", "function": ...}``, the form chat templates take (and LLaMA-Factory's Qwen, Llama 3 and
Mistral tool formats write).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perpair.data.rows import (
    MISSING,
    ReadContext,
    as_content,
    as_role,
    as_text,
    as_tools,
    check_message_fields,
    get,
    optional_text,
    type_name,
    with_system,
)
from perpair.data.schema import Message, PairRecord
from perpair.data.sources import RowProblem
from perpair.errors import InputError

# LLaMA-Factory's default tag names, and the perpair role each one becomes.
DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool",
             "function_tag": "assistant", "system_tag": "system"}
# dataset_info ``columns`` keys perpair reads, per formatting, with LLaMA-Factory's defaults.
COLUMNS = {
    "sharegpt": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "system": None,
                 "tools": None},
    "alpaca": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected",
               "system": None, "history": None, "tools": None},
}
REQUIRED = {"sharegpt": ("messages", "chosen", "rejected"), "alpaca": ("prompt", "chosen", "rejected")}
MEDIA_COLUMNS = ("images", "videos", "audios")
# dataset_info entry keys: those perpair reads, and other places of the data (where LLaMA-Factory would read
# the rows from one of them, the entry is refused). Any other key (subset, folder,
# num_samples, ...) changes what is read and is refused rather than ignored.
READ_KEYS = {"file_name", "hf_hub_url", "split", "formatting", "ranking", "columns", "tags"}
OTHER_SOURCES = {"ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"}
UNPAIRED = "these rows are unpaired (KTO) data; perpair needs pairs (a chosen and a rejected response to " \
           "the same prompt)"


@dataclass(frozen=True)
class Layout:
    """Where a LLaMA-Factory row keeps each part. ``named`` lists the columns the user (or a
    dataset_info entry) named, which must be present in the data; the others are read where present."""

    formatting: str
    columns: dict[str, str | None]
    tags: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TAGS))
    named: tuple[str, ...] = ()

    @property
    def roles(self) -> dict[str, str]:
        return {self.tags[tag]: role for tag, role in TAG_ROLES.items() if tag in self.tags}

    def column(self, key: str) -> str | None:
        return self.columns.get(key)


def default_layout(formatting: str) -> Layout:
    defaults = dict(COLUMNS[formatting])
    # Detected from the data, the optional columns are read under their usual names where a row has them.
    for key in ("system", "tools", "history"):
        if key in defaults:
            defaults[key] = key
    return Layout(formatting, defaults)


def is_unpaired(row: dict[str, Any]) -> bool:
    """KTO rows: a boolean ``label`` on a single response (``messages`` or ``prompt``/``completion``)."""
    return (isinstance(row.get("label"), bool) and not ("chosen" in row and "rejected" in row)
            and ("messages" in row or "completion" in row or "conversations" in row))


# ---------------------------------------------------------------------------------------------- readers

def _turn(value: Any, where: str, layout: Layout, roles: dict[str, str]) -> Message:
    code = f"wrong_type:{where.split('[')[0]}"
    if not isinstance(value, dict):
        raise RowProblem(code, f"expected a message object, got {type_name(value)}", where)
    role_tag, content_tag = layout.tags["role_tag"], layout.tags["content_tag"]
    if role_tag not in value and "role" in value and "content" in value:
        role_tag, content_tag = "role", "content"   # OpenAI-style turns in a sharegpt file
    if (role_tag, content_tag) == ("role", "content"):  # found so, or named so by the entry's tags
        # OpenAI-style turns' other fields (tool_calls, a tool's name, …) are part of the conversation, as in any
        # message list
        check_message_fields(value, ("role", "content"), where)
    return {"role": as_role(value.get(role_tag), code, f"{where}.{role_tag}", roles),
            "content": as_content(value.get(content_tag), code, f"{where}.{content_tag}")}


def _check_order(prompt: list[Message], chosen: Message, rejected: Message, names: tuple[str, str, str]) -> None:
    if not any(m["role"] != "system" for m in prompt):
        raise RowProblem(f"wrong_type:{names[0]}", "the conversation has no user turn", names[0])
    if prompt[-1]["role"] not in ("user", "tool"):
        raise RowProblem(f"wrong_type:{names[0]}", f"the conversation must end with a user (or observation) "
                                                   f"turn, got role '{prompt[-1]['role']}'", names[0])
    # after a leading system turn, user (or observation) and assistant (or function call) turns alternate, as
    # LLaMA-Factory's converter requires (it drops other rows)
    start = 1 if prompt[0]["role"] == "system" else 0
    for index, message in enumerate(prompt[start:], start=start):
        expected = ("user", "tool") if (index - start) % 2 == 0 else ("assistant",)
        if message["role"] not in expected:
            raise RowProblem(f"wrong_type:{names[0]}", f"a {message['role']} turn where the turns must alternate "
                                                       f"(expected {' or '.join(expected)}: turn {index + 1} of the "
                                                       f"conversation, a system message included)", names[0])
    for name, message in zip(names[1:], (chosen, rejected), strict=True):
        if message["role"] != "assistant":
            raise RowProblem(f"wrong_type:{name}", f"the response must be an assistant turn, got role "
                                                   f"'{message['role']}'", name)


def read_sharegpt(row: dict[str, Any], ctx: ReadContext) -> PairRecord:
    layout: Layout = ctx.layout or default_layout("sharegpt")
    roles = {**layout.roles, **ctx.role_map}
    name, chosen_name, rejected_name = (layout.column("messages"), layout.column("chosen"),
                                        layout.column("rejected"))
    turns = get(row, name)
    if not isinstance(turns, list) or not turns:
        what = "an empty list" if isinstance(turns, list) else type_name(turns)
        raise RowProblem(f"wrong_type:{name}", f"expected a list of turns, got {what}", name)
    prompt = [_turn(turn, f"{name}[{i}]", layout, roles) for i, turn in enumerate(turns)]
    prompt = with_system(prompt, optional_text(row, layout.column("system")), layout.column("system"))
    chosen = _turn(get(row, chosen_name), chosen_name, layout, roles)
    rejected = _turn(get(row, rejected_name), rejected_name, layout, roles)
    _check_order(prompt, chosen, rejected, (name, chosen_name, rejected_name))
    function_tag = layout.tags.get("function_tag")
    turns_read = [*turns, get(row, chosen_name), get(row, rejected_name)]
    calls = any(isinstance(t, dict) and t.get(layout.tags["role_tag"], t.get("role")) == function_tag
                for t in turns_read)
    return PairRecord(prompt=prompt, chosen=[chosen], rejected=[rejected], source=ctx.source,
                      source_row=ctx.row, tools=_tools(row, layout), notes=["function_call_as_text"] if calls else [])


def _tools(row: dict[str, Any], layout: Layout) -> str | None:
    """The row's tool descriptions (its ``tools`` column, a JSON list), each as chat templates take it."""
    name = layout.column("tools")
    tools = as_tools(get(row, name, required=False), name) if name else None
    if tools is None:
        return None
    described = json.loads(tools)
    # LLaMA-Factory treats an empty list as no tools
    return json.dumps([t if t.get("type") == "function" else {"type": "function", "function": t}
                       for t in described], ensure_ascii=False) if described else None


def read_alpaca(row: dict[str, Any], ctx: ReadContext) -> PairRecord:
    layout: Layout = ctx.layout or default_layout("alpaca")
    prompt: list[Message] = []
    history_name = layout.column("history")
    history = get(row, history_name, required=False) if history_name else MISSING
    if history not in (MISSING, None):
        if not isinstance(history, list):
            raise RowProblem(f"wrong_type:{history_name}", f"expected a list of [user, assistant] pairs, got "
                                                           f"{type_name(history)}", history_name)
        for i, turn in enumerate(history):
            where = f"{history_name}[{i}]"
            if not isinstance(turn, list) or len(turn) != 2:
                raise RowProblem(f"wrong_type:{history_name}", "expected a [user, assistant] pair", where)
            prompt += [{"role": "user", "content": as_text(turn[0], f"{where}[0]")},
                       {"role": "assistant", "content": as_text(turn[1], f"{where}[1]")}]
    instruction_name = layout.column("prompt")
    parts = [as_text(get(row, instruction_name), instruction_name), optional_text(row, layout.column("query"))]
    prompt.append({"role": "user", "content": "\n".join(p for p in parts if p)})
    prompt = with_system(prompt, optional_text(row, layout.column("system")), layout.column("system"))
    chosen_name, rejected_name = layout.column("chosen"), layout.column("rejected")
    return PairRecord(prompt=prompt,
                      chosen=[{"role": "assistant", "content": as_text(get(row, chosen_name), chosen_name)}],
                      rejected=[{"role": "assistant", "content": as_text(get(row, rejected_name), rejected_name)}],
                      source=ctx.source, source_row=ctx.row, tools=_tools(row, layout))


# --------------------------------------------------------------------------------------- dataset_info.json

@dataclass(frozen=True)
class DatasetEntry:
    """One ranking dataset of a ``dataset_info.json``: where its rows are and how to read them."""

    source: str                 # a local path (resolved against the json's folder) or a Hub dataset id
    split: str | None
    format: str                 # "sharegpt" or "alpaca"
    layout: Layout
    entry: dict[str, Any]       # as written, for the provenance


def load_dataset_entry(info_path: str, name: str) -> DatasetEntry:
    """The entry ``name`` of LLaMA-Factory's ``dataset_info.json`` at ``info_path``, validated."""
    path = Path(info_path)
    if path.is_dir():
        path = path / "dataset_info.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("no such file", file=str(path)) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"file is not valid UTF-8 (byte offset {exc.start})", file=str(path)) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
                         file=str(path)) from None
    except RecursionError:
        raise InputError("JSON nested too deeply to read", file=str(path)) from None
    if not isinstance(info, dict):
        raise InputError("a dataset_info.json holds an object of named datasets", file=str(path))
    ranking = sorted(n for n, e in info.items() if isinstance(e, dict) and e.get("ranking") is True)
    listing = f"ranking datasets there: {', '.join(ranking)}" if ranking else "it has no ranking dataset"
    entry = info.get(name)
    if not isinstance(entry, dict):
        raise InputError(f"no dataset '{name}' in it; {listing}", file=str(path))

    def fail(problem: str, key: str | None = None) -> InputError:
        return InputError(f"dataset '{name}': {problem}", file=str(path), field=key)

    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise fail("'columns' and 'tags' must be objects")
    if "kto_tag" in columns:
        raise fail(UNPAIRED, "columns.kto_tag")
    if entry.get("ranking") is not True:
        raise fail(f"not a preference dataset (no \"ranking\": true), so it has no pairs; {listing}", "ranking")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in COLUMNS:
        raise fail(f"formatting {formatting!r} is not one perpair reads (alpaca, sharegpt)", "formatting")
    for key in columns:
        if key in MEDIA_COLUMNS:
            raise fail(f"a '{key}' column: perpair reads text only", f"columns.{key}")
        if key not in COLUMNS[formatting]:
            raise fail(f"column key '{key}' is not one of {formatting}'s: {', '.join(COLUMNS[formatting])}",
                       f"columns.{key}")
    for key, value in [*columns.items(), *tags.items()]:
        if not isinstance(value, str) or not value:
            raise fail(f"'{key}' must name a column or tag, got {value!r}", key)
    for key in tags:
        if key not in DEFAULT_TAGS:
            raise fail(f"tag '{key}' is not one of {', '.join(DEFAULT_TAGS)}", f"tags.{key}")
    if formatting == "alpaca" and tags:
        raise fail("'tags' apply to sharegpt datasets only", "tags")
    unsupported = sorted(set(entry) - READ_KEYS - OTHER_SOURCES)
    if unsupported:
        raise fail(f"perpair does not read {', '.join(map(repr, unsupported))} (it reads "
                   f"{', '.join(sorted(READ_KEYS))}); remove it or prepare the data yourself", unsupported[0])
    layout = Layout(formatting, {**COLUMNS[formatting], **columns}, {**DEFAULT_TAGS, **tags},
                    named=tuple(dict.fromkeys([*REQUIRED[formatting], *columns])))
    # where the rows are, in LLaMA-Factory's order (get_dataset_list): a Hub id before any other place, file_name
    # last, so an entry naming several is read where LLaMA-Factory reads it, or refused
    elsewhere = sorted(OTHER_SOURCES & set(entry))
    if "hf_hub_url" in entry:
        source = "hub:" + str(entry["hf_hub_url"])
    elif elsewhere or "file_name" not in entry:
        read_from = f"LLaMA-Factory reads it from {elsewhere[0]!r}, and " if elsewhere else ""
        raise fail(f"{read_from}perpair reads datasets given by 'file_name' or 'hf_hub_url'; download the data and "
                   "name it with file_name alone", elsewhere[0] if elsewhere else "file_name")
    else:
        source = str(path.parent / str(entry["file_name"]))
    return DatasetEntry(source, entry.get("split"), formatting, layout, entry)
