"""Reading a stage's YAML file and describing why its values were refused: one place, so every stage names the
file, the line and the key the same way."""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, ValidationInfo, field_validator

from perpair.errors import InputError


def load_yaml(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The mapping at the top of the YAML file ``path`` (``{}`` for an empty file).

    ``what`` names the file's role in messages ("run config", "schedule"). A missing or unreadable file, a
    syntax error (with its line and column) or a top level that is not a mapping raises
    :class:`~perpair.errors.InputError` naming the file.
    """
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"no such {what} file", file=file) from None
    except IsADirectoryError:
        raise InputError(f"the {what} is a folder, not a YAML file", file=file) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"the {what} is not valid UTF-8 (byte offset {exc.start})", file=file) from None
    except OSError as exc:
        raise InputError(f"cannot read the {what} ({exc.strerror})", file=file) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except _DuplicateKey as exc:
        raise InputError(f"the {what} has the key {exc.key!r} twice in one mapping, at lines {exc.first} and "
                         f"{exc.line} (YAML would silently keep the last): remove one", file=file) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InputError(f"the {what} is not valid YAML{where}: {exc.problem or exc.context}", file=file) from None
    except yaml.YAMLError as exc:
        raise InputError(f"the {what} is not valid YAML ({exc})", file=file) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"the {what} must be a mapping of keys to values, got a {type(data).__name__}", file=file)
    return data


def _number_not_bool(annotation: Any) -> bool:
    """Whether a field of this type takes a number and not a truth value (``int``, ``float | None``, …)."""
    if annotation is bool:
        return False
    if typing.get_origin(annotation) is typing.Annotated:  # (a tuple's items: Annotated[float, Field(ge=0)])
        return _number_not_bool(typing.get_args(annotation)[0])
    if annotation in (int, float):
        return True
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    return any(_number_not_bool(a) for a in args) and bool not in args


def _numbers_not_bools(annotation: Any) -> bool:
    """Whether a field of this type is a list or tuple of numbers (``tuple[float, float]``, ``list[int]``)."""
    if typing.get_origin(annotation) not in (list, tuple):
        return False
    args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    return bool(args) and all(_number_not_bool(a) for a in args)


class NumbersNotBools(BaseModel):
    """A config model whose number fields refuse ``true``/``false``: pydantic reads them as 1 and 0, so ``lr: true``
    trained at 1.0, ``steps: yes`` (YAML's true) one step and ``workers: true`` one worker, silently."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is None:
            return value
        if isinstance(value, bool) and _number_not_bool(field.annotation):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        if isinstance(value, list | tuple) and _numbers_not_bools(field.annotation):
            for item in value:
                if isinstance(item, bool):
                    raise ValueError(f"expected numbers, got {str(item).lower()} in {_short(repr(value))}")
        return value


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.line = key, first, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a mapping that holds a key twice: PyYAML silently keeps the last one,
    so a setting written twice (an edit appended below the original) would quietly change or do nothing. Keys
    that a merge (``<<: *anchor``) brings in may be overridden, as YAML says."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML's own error says so
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise _DuplicateKey(key, first, line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def format_validation_error(exc: ValidationError, prefix: str = "", command_line: dict[str, Any] | None = None,
                            options: dict[str, str] | None = None) -> str:
    """Every problem pydantic found, on one line, each naming its dotted key (under ``prefix``, e.g. the
    config section the values came from); a key whose value came from ``command_line`` (the values of ``--set``
    and the options, nested like the file's, ``prefix`` included) says so. With ``options`` (a command's values,
    validated without a file) a key is named as the option that gave it: ``--max-new-tokens``, or
    ``options[key]`` where the names differ."""
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        if options is not None and loc:
            loc[0] = options.get(loc[0], "--" + loc[0].replace("_", "-"))
        key = ".".join(part for part in (prefix, *loc) if part)
        there = " (from the command line)" if _given(command_line, (*prefix.split("."), *error["loc"]) if prefix
                                                     else error["loc"]) else ""
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'{there}")
            continue
        # A validator's ValueError reads "Value error, <our message>"; our messages need no prefix.
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        # The value the user gave helps with a scalar; a missing key's "input" is its whole parent section.
        scalar = isinstance(value, str | int | float | bool | None)
        shown = (f" (got {_short(repr(value))})" if scalar and error["type"] not in ("missing", "value_error")
                 else "")
        problems.append(f"{key}: {message}{shown}{there}" if key else message)
    return "; ".join(problems)


def invalid_config(exc: ValidationError, what: str, path: str | os.PathLike | None,
                   command_line: dict[str, Any] | None, file_values: dict[str, Any] | None = None) -> InputError:
    """The error for values pydantic refused in a config read from ``path`` (``file_values``: what it holds) and
    overridden by ``command_line``: it names the file unless every refused key was given on the command line. A
    key missing from a section that only the command line made (``--set arms.dop.train.lr=1``: a misspelt arm) is
    the command line's too."""
    def given(error: dict[str, Any]) -> bool:
        loc = error["loc"]
        if error["type"] == "missing" and file_values is not None and loc[:-1]:
            return _given(command_line, loc[:-1]) and not _given(file_values, loc[:-1])
        return _given(command_line, loc)

    every = all(given(error) for error in exc.errors())
    return InputError(f"invalid {what}: {format_validation_error(exc, command_line=command_line)}",
                      file=None if path is None or every else str(path))


def _given(values: dict[str, Any] | None, loc: tuple) -> bool:
    """Whether the key at ``loc`` is set in the nested ``values`` (a rule over several keys, ``loc`` empty: no)."""
    if not values or not loc:
        return False
    node: Any = values
    for part in loc:
        if isinstance(node, list):  # an item of a list given there (report_to.0): the list is the key's value
            return True
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"
