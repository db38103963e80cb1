"""Reading source rows: JSON Lines (optionally gzip), JSON arrays, Parquet, and Hugging Face datasets.

Every source yields ``(row_number, value, text)`` with 1-based row numbers (the line number in a JSON
Lines file, the position in an array or table) and, for JSON Lines, the row's own text (kept as the
pair's untouched ``meta``). A row that cannot be decoded is yielded as a ``RowProblem`` in place of its
value, so the caller decides whether it stops the run or is skipped and counted.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perpair.artifacts import file_sha256
from perpair.errors import InputError

HUB_ID = re.compile(r"^(hub:)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


class RowProblem(Exception):
    """A malformed row: ``code`` is the short reason it is counted under, ``field`` what is wrong."""

    def __init__(self, code: str, problem: str, field: str | None = None):
        super().__init__(problem)
        self.code = code
        self.problem = problem
        self.field = field


@dataclass(frozen=True)
class Source:
    """Where rows come from: a local file, or a dataset loaded through ``datasets.load_dataset``."""

    spec: str                  # as the user gave it
    kind: str                  # "file" or "dataset"
    split: str | None = None
    revision: str | None = None
    name: str | None = None    # the label, where the file's name alone is not it (see folder_files)

    @property
    def label(self) -> str:
        """Short, machine-independent name stored in each pair's ``source`` column."""
        if self.name:
            return self.name
        if self.kind == "file":
            return Path(self.spec).name
        name = self.spec.removeprefix("hub:")
        return f"{name}:{self.split}" if self.split else name


def resolve_source(spec: str, split: str | None = None, revision: str | None = None) -> Source:
    """A local file if ``spec`` names one; a Hub dataset id (``owner/name`` or ``hub:owner/name``) or a
    local dataset folder otherwise (both go through ``datasets.load_dataset``)."""
    path = Path(spec)
    if path.is_file():
        if path.name.lower().removesuffix(".gz").endswith((".csv", ".tsv")):
            raise InputError("CSV files are not read (their cells carry no types, so a score and an answer "
                             "such as '4' look alike): convert it to JSON Lines or Parquet first",
                             file=spec)
        suffix = path.suffix.lower()
        if suffix in (".zst", ".bz2", ".xz", ".zip", ".arrow"):  # read as JSON Lines, each line would be "not UTF-8"
            raise InputError(f"{suffix[1:]} files are not read: perpair reads JSON Lines or JSON (plain or gzip) and "
                             f"Parquet files, and folders written by save_to_disk", file=spec)
        return Source(spec, "file")
    if path.is_dir() or spec.startswith("hub:"):
        return Source(spec, "dataset", split or "train", revision)
    if HUB_ID.match(spec) and not looks_local(spec):
        return Source(spec, "dataset", split or "train", revision)
    if HUB_ID.match(spec):
        raise InputError(f"no such file (it looks like a file path, so it was not looked up as a Hugging Face "
                         f"dataset id; write hub:{spec} for that)", file=spec)
    raise InputError("no such file, and not a Hugging Face dataset id (owner/name)", file=spec)


# Endings of data files: a path that has one names a local file, never a Hub dataset.
DATA_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet", ".pq", ".csv", ".tsv", ".txt", ".arrow", ".zst",
                 ".bz2", ".xz", ".zip")


def looks_local(spec: str) -> bool:
    """A spec written as a path (``./x``, ``../x``, ``/x``, ``~/x``, or ending in a data file suffix)."""
    return spec.startswith(("./", "../", "/", "~")) or spec.lower().endswith(DATA_SUFFIXES)


def folder_files(source: Source) -> list[Source]:
    """A local dataset folder as the files of its split that Datasets would load, where they are files perpair
    reads itself (JSON Lines, JSON arrays, Parquet): then each row is named by its own file and row (not by its
    position among all the folder's rows), and its ``meta`` is its own text (not a row widened with the other
    files' columns). Each is labelled ``FOLDER/PATH``. Any other folder stays one source, which Datasets loads."""
    folder = Path(source.spec)
    if source.kind != "dataset" or source.spec.startswith("hub:") or not folder.is_dir():
        return [source]
    import datasets

    try:
        with _quiet_datasets():
            builder = datasets.load_dataset_builder(source.spec)
    except Exception:  # noqa: BLE001 - loading it reports the problem in its own words (see _iter_dataset)
        return [source]
    files = [files for split, files in (builder.config.data_files or {}).items() if str(split) == source.split]
    if builder.name not in ("json", "parquet") or getattr(builder.config, "field", None) or not files:
        return [source]
    root = folder.resolve()
    loaded = {Path(path).resolve() for split_files in builder.config.data_files.values() for path in split_files}
    _refuse_files_left_out(folder, builder.name, loaded)
    parts = []
    for path in map(Path, files[0]):
        if path.resolve().is_relative_to(root):  # named as the user named the folder
            inside = path.resolve().relative_to(root)
            parts.append(Source(str(folder / inside), "file", name=f"{root.name}/{inside.as_posix()}"))
        else:
            parts.append(Source(str(path), "file", name=f"{root.name}/{path.name}"))
    return parts


# Files of a dataset folder that hold no rows (Datasets reads them as the folder's description).
FOLDER_METADATA = ("dataset_info.json", "dataset_dict.json", "state.json")


def _refuse_files_left_out(folder: Path, module: str, loaded: set[Path]) -> None:
    """A data file of ``folder`` that Datasets would load in none of its splits (a Parquet file beside JSON Lines
    files: it loads the files of one format) is refused, not left out with its rows; unless the folder's README
    chooses its files (``configs`` in its YAML header, as on the Hub), which says the others are no part of it."""
    readme = folder / "README.md"
    header = readme.read_text(encoding="utf-8", errors="replace").split("\n---", 1)[0] if readme.is_file() else ""
    if header.startswith("---") and "\nconfigs:" in header:
        return
    left = sorted(path.relative_to(folder) for path in folder.rglob("*")
                  if path.is_file() and path.resolve() not in loaded and path.name not in FOLDER_METADATA
                  and path.name.lower().endswith(tuple(s for s in DATA_SUFFIXES if s != ".txt"))
                  and not any(part.startswith((".", "_")) for part in path.relative_to(folder).parts))
    if left:
        more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
        raise InputError(f"the folder also holds {left[0].as_posix()}{more}, a data file Datasets would not load with "
                         f"the others (it loads the folder's {module} files only): give the files to read as "
                         f"sources, or move the others out", file=str(folder))


def describe(source: Source) -> dict[str, Any]:
    """Provenance of a source: the file's SHA-256, or the dataset's id, split and revision."""
    if source.kind == "file":
        return {"path": source.spec, "sha256": file_sha256(source.spec), "bytes": os.path.getsize(source.spec)}
    return {"dataset": source.spec.removeprefix("hub:"), "split": source.split, "revision": source.revision}


def iter_rows(source: Source, provenance: dict[str, Any] | None = None) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(row_number, value_or_RowProblem, text_or_None)`` for every row of ``source``. For a dataset source, its
    fingerprint (which identifies the loaded data) is added to ``provenance`` once it is loaded."""
    if source.kind == "dataset":
        yield from _iter_dataset(source, provenance if provenance is not None else {})
        return
    name = source.spec.lower()
    if name.endswith((".parquet", ".pq")):
        yield from _iter_parquet(source.spec)
        return
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(source.spec, "rb") as handle:
            first = _first_byte(handle)
        with opener(source.spec, "rb") as handle:
            if first == b"[":
                yield from _iter_json_array(source.spec, handle)
            else:
                yield from _iter_json_lines(source.spec, handle)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"compressed file is truncated or corrupt ({exc})", file=source.spec) from None


class _KeyTwice(dict):
    """A decoded JSON object that names ``key`` twice."""

    key = ""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict (``object_pairs_hook``); one that names a key twice is marked, not read as its
    last value (Python's json takes that one, Arrow and so Datasets refuse the file: which one the data means is
    unknown)."""
    value = dict(pairs)
    if len(value) < len(pairs):
        keys = [key for key, _ in pairs]
        value = _KeyTwice(value)
        value.key = next(key for index, key in enumerate(keys) if key in keys[:index])
    return value


def _key_twice(value: Any) -> RowProblem | None:
    """The problem of a decoded row where an object names a key twice; None where none does."""
    if isinstance(value, _KeyTwice):
        return RowProblem("duplicate_key", f"the row names the key {value.key!r} twice (in one object), so which of "
                                           f"the two values it means is unknown", value.key)
    for child in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        if problem := _key_twice(child):
            return problem
    return None


def _first_byte(handle: io.BufferedIOBase) -> bytes:
    while chunk := handle.read(4096):
        stripped = chunk.lstrip()
        if stripped.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
            stripped = stripped[3:].lstrip()
        if stripped:
            return stripped[:1]
    return b""


def _refuse_one_object(path: str) -> None:
    """A file whose first line is not JSON may be one JSON object written over many lines (``{"train": [...]}``),
    not JSON Lines: that is said, rather than that its first line is corrupt."""
    try:
        with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as handle:
            value = json.loads(handle.read().decode("utf-8-sig"))
    except (ValueError, RecursionError, OSError, EOFError, zlib.error):  # not one JSON value: JSON Lines cut short
        return
    if isinstance(value, dict):
        keys = ", ".join(sorted(map(str, value))[:8]) + (", …" if len(value) > 8 else "")
        raise InputError(f"the file holds one JSON object (keys: {keys or 'none'}), not rows: perpair reads JSON Lines "
                         f"(one row per line) or a JSON array of rows", file=path)


def _iter_json_lines(path: str, handle: io.BufferedIOBase) -> Iterator[tuple[int, Any, str | None]]:
    number = 0
    first = 0  # the number of the first line that is not blank
    while True:
        try:
            line = handle.readline()
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise InputError(f"compressed file is truncated or corrupt after row {number} ({exc})",
                             file=path) from None
        if not line:
            return
        number += 1
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if not line.strip():
            continue
        first = first or number
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, RowProblem("not_utf8", f"line is not valid UTF-8 (byte {line[exc.start]:#04x} at "
                                                 f"position {exc.start})"), None
            continue
        try:  # without its line break: a line cut short is reported at its end, not at "column 1" of a next line
            value = json.loads(text.rstrip("\r\n"), object_pairs_hook=_object)
        except json.JSONDecodeError as exc:
            # (a short first line, as such an object opens: not a row of JSON Lines cut short, whose file is not read
            # whole for this)
            if number == first and text.lstrip().startswith("{") and len(text.strip()) <= 100:
                _refuse_one_object(path)
            yield number, RowProblem("undecodable_json", f"line is not valid JSON, truncated or corrupt "
                                                         f"({exc.msg.removesuffix(' at')} at column {exc.colno})"), None
            continue
        except RecursionError:
            yield number, RowProblem("nested_too_deeply", "line is JSON nested too deeply to read"), None
            continue
        yield number, _key_twice(value) or value, text.strip()


def _iter_json_array(path: str, handle: io.BufferedIOBase) -> Iterator[tuple[int, Any, str | None]]:
    raw = handle.read()
    try:
        values = json.loads(raw.decode("utf-8-sig"), object_pairs_hook=_object)
    except UnicodeDecodeError as exc:
        raise InputError(f"file is not valid UTF-8 (byte offset {exc.start})", file=path) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON, truncated or corrupt ({exc.msg} at line {exc.lineno}, "
                         f"column {exc.colno})", file=path) from None
    except RecursionError:
        raise InputError("JSON nested too deeply to read", file=path) from None
    if not isinstance(values, list):
        raise InputError("a JSON file must hold an array of rows (or be JSON Lines)", file=path)
    for number, value in enumerate(values, start=1):
        yield number, _key_twice(value) or value, None


def _iter_parquet(path: str) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        twice = _named_twice(list(parquet.schema_arrow))
        if twice:  # a row would hold the last one's value (Datasets refuses the file)
            raise InputError("the column is named twice in the file's schema, so which one a row means is unknown",
                             file=path, field=twice)
        number = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield number, row, None
    except (OSError, pa.ArrowInvalid) as exc:
        raise InputError(f"not a readable Parquet file ({exc})", file=path) from None


def _named_twice(fields: list[Any], prefix: str = "") -> str | None:
    """The first of ``fields`` (Arrow fields; inside a struct, or a list of structs, dotted) whose name another
    field beside it has too."""
    import pyarrow as pa

    names = [field.name for field in fields]
    for field in fields:
        if names.count(field.name) > 1:
            return prefix + field.name
        kind = field.type
        while pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            kind = kind.value_type
        if pa.types.is_struct(kind):
            found = _named_twice([kind.field(i) for i in range(kind.num_fields)], f"{prefix}{field.name}.")
            if found:
                return found
    return None


DETAIL_CHARS = 400  # of a Datasets error, in the one error line


@contextlib.contextmanager
def _quiet_datasets():
    """Datasets' progress bars and notices (and the Hub library's, which reads a folder's README) off for the
    block, then as they were."""
    from datasets.utils import logging as ds_logging
    from huggingface_hub.utils import logging as hub_logging

    bars, verbosity, hub = ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity(), hub_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        hub_logging.set_verbosity(hub)
        if bars:
            ds_logging.enable_progress_bar()


def _iter_dataset(source: Source, provenance: dict[str, Any]) -> Iterator[tuple[int, Any, str | None]]:
    import datasets

    name = source.spec.removeprefix("hub:")
    folder = not source.spec.startswith("hub:") and Path(name).is_dir()
    saved = folder and (Path(name) / "state.json").is_file()  # by Dataset.save_to_disk: load_dataset refuses it
    if saved and source.split != "train":
        raise InputError(f"--split {source.split!r}: this folder, written by Dataset.save_to_disk, holds one dataset, "
                         f"without splits", file=source.spec)
    if not folder:
        from perpair.models import hub_commit

        # asked first, as for a model: where the Hub cannot be reached and its cache has the dataset, Datasets reads
        # its caches at once instead of after five retries (hub_commit says so in one line)
        hub_commit(name, "dataset", source.revision)
    try:
        with _quiet_datasets() if folder else contextlib.nullcontext():  # a folder: no download to follow
            dataset = datasets.load_from_disk(name) if saved else \
                datasets.load_dataset(name, split=source.split, revision=source.revision)
    except Exception as exc:  # noqa: BLE001 - datasets raises many unrelated types; report them as input errors
        local = "" if source.spec.startswith("hub:") or folder else \
            "there is no local file or folder of that name, and "
        detail = " ".join(str(exc).split())
        if len(detail) > DETAIL_CHARS:  # Datasets may list every file of a folder: its start and its advice
            head, tail = detail[:DETAIL_CHARS - 150].rstrip(), detail[-150:].lstrip()
            detail = f"{head} … ({len(detail) - len(head) - len(tail):,} characters cut) … {tail}"
        raise InputError(f"{local}loading it as a dataset (split {source.split!r}) failed: "
                         f"{type(exc).__name__}: {detail}", file=source.spec) from None
    provenance["fingerprint"] = getattr(dataset, "_fingerprint", None)
    for number, row in enumerate(dataset, start=1):
        yield number, row, None
