"""Parquet artifacts with embedded provenance.

Every artifact perpair writes is a Parquet file whose schema metadata holds, under the key ``perpair``,
a JSON object with the artifact ``kind``, its ``schema_version`` and its ``provenance`` (input hashes,
configuration, counts). Files are written to a temporary name and renamed, so a crash never leaves a
half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from perpair.errors import InputError, PerpairError

METADATA_KEY = b"perpair"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def path_identity(path: str | os.PathLike) -> str | list:
    """What a file or folder the user gave holds, for a key: a file's SHA-256; a folder's path with the names and
    SHA-256 of its files (a file of it rewritten in place, added or removed is other data)."""
    folder = Path(path)
    if folder.is_file():
        return file_sha256(folder)
    return [os.fspath(path), sorted([str(p.relative_to(folder)), file_sha256(p)] for p in folder.rglob("*")
                                    if p.is_file())]


def temporary_beside(path: Path) -> Path:
    """A name beside ``path`` to write it under before renaming it over ``path``: this process's and this thread's
    own, so concurrent writers (processes, or threads of one: ``perpair run``'s arms side by side) never share one."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


@contextlib.contextmanager
def writing(path: Path, tmp: Path) -> Iterator[None]:
    """Around writing ``tmp`` and renaming it over ``path``: an error names ``path``, the file the user asked for,
    never the temporary name beside it (``.NAME.tmp-PID-THREAD``, which the user never gave and never sees)."""
    try:
        yield
    except OSError as exc:
        raise _naming(exc, path, tmp) from None


def _naming(exc: OSError, path: Path, tmp: Path) -> OSError:
    """``exc`` about ``path`` instead of ``tmp``. Arrow's errors carry no errno or filename, only a message such
    as ``Failed to open local file '…/.x.tmp-1-2'. Detail: [errno 30] Read-only file system``: its errno is read
    back from the message."""
    number = exc.errno
    if number is None:
        found = re.search(r"\[errno (\d+)\]", str(exc))
        number = int(found.group(1)) if found else None
    if number is not None:
        return OSError(number, os.strerror(number), str(path))
    text = str(exc).replace(str(tmp), str(path)).replace(tmp.name, path.name)
    return OSError(errno.EIO, text, str(path))


@contextlib.contextmanager
def folder_lock(folder: Path, busy: str, advice: str) -> Iterator[None]:
    """Hold ``FOLDER/.lock`` (an exclusive ``flock``) while the block runs: a second process that would write the
    same folder at once is refused, ``busy (process PID); advice``. The lock goes with the process that holds it: a
    killed one leaves none behind (its file stays and blocks nothing). A folder this call created that holds only
    the lock file at the end (the work failed before writing) is removed, as if never started."""
    import fcntl
    import shutil

    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            raise PerpairError(f"{busy}" + (f" (process {holder})" if holder else "") + f"; {advice}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            if created and [p.name for p in folder.iterdir()] == [".lock"]:
                shutil.rmtree(folder, ignore_errors=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


SQLITE_MAGIC = b"SQLite format 3\x00"  # the first bytes of every SQLite 3 database file


def check_output_file(path: Path, option: str, example: str, kind: str | None = None) -> None:
    """Refuse, before any work, an output file that cannot be written: a folder (``-o .``, ``-o DIR``), a path
    under a file, or one in a folder that cannot be written (read-only, no permission); with ``kind``, a perpair
    artifact of another kind (``perpair plan -o ann.parquet`` would replace the annotations)."""
    if path.is_dir() or path.name in ("", ".", ".."):
        raise PerpairError(f"{option} {path}: a folder; name a file (e.g. {example})")
    if kind is not None:
        refuse_other_artifact(path, option, kind)
    _check_writable(path, option)


def refuse_other_artifact(path: Path, option: str, kind: str) -> None:
    """Refuse writing a ``kind`` artifact over a perpair artifact of another kind, or over an SQLite database (the
    answer cache of ``perpair annotate``, the results cache of an evaluation: the answers paid for); another file is
    replaced."""
    if not path.is_file():
        return
    try:
        with path.open("rb") as handle:
            database = handle.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:  # not readable: refused as unwritable, or replaced, below
        database = False
    if database:
        raise PerpairError(f"{option} {path}: an SQLite database (perpair's caches are: an answer cache holds every "
                           f"answer paid for), which writing {kind} there would destroy; name another file")
    try:
        held = read_header(path).get("kind")
    except PerpairError:  # not an artifact (or not readable): replaced as any file is
        return
    if held != kind:
        raise PerpairError(f"{option} {path}: holds perpair {held}, which writing {kind} there would destroy; "
                           f"name another file")


def check_output_folder(path: Path, option: str) -> None:
    """Refuse, before any work, an output folder that cannot be written: an existing file, a path under a file,
    or one in a folder that cannot be written."""
    if path.exists() and not path.is_dir():
        raise PerpairError(f"{option} {path}: a file, not a folder; name a folder")
    _check_writable(path, option)


def _check_writable(path: Path, option: str) -> None:
    """The nearest existing folder at or above ``path`` must be a folder in which a file can be created (tried
    with a nameless temporary file, gone when closed: permissions, a read-only file system, a full quota)."""
    target = path.absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if existing == target and not target.is_dir():  # a file to replace: its folder is written
        existing = target.parent
    if not existing.is_dir():
        raise PerpairError(f"{option} {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise PerpairError(f"{option} {path}: cannot write in {existing} ({exc.strerror or exc})") from None


def write_artifact(path: str | os.PathLike, table: pa.Table, *, kind: str, schema_version: int,
                   provenance: dict[str, Any]) -> None:
    """Write ``table`` to ``path`` atomically, with kind, schema version and provenance embedded.

    The output is byte-for-byte reproducible: no timestamps, deterministic key order.
    """
    header = {"kind": kind, "schema_version": schema_version, "provenance": provenance}
    metadata = dict(table.schema.metadata or {})
    metadata[METADATA_KEY] = json.dumps(header, sort_keys=True, ensure_ascii=False).encode()
    table = table.replace_schema_metadata(metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        with writing(path, tmp):
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: a reader (or a run killed
    mid-write) never sees half a file."""
    tmp = temporary_beside(path)
    try:
        with writing(path, tmp):
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The ``{kind, schema_version, provenance}`` header of a perpair artifact."""
    if not Path(path).exists():
        raise PerpairError(f"file {path}: not found")
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as exc:
        raise PerpairError(f"file {path}: not a readable Parquet file ({exc})") from None
    if METADATA_KEY not in metadata:
        raise PerpairError(f"file {path}: not a perpair artifact (no '{METADATA_KEY.decode()}' metadata)")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except ValueError:  # (UnicodeDecodeError too)
        header = None
    # another program's metadata under our key, or ours edited: every reader takes the header's fields as written
    if not isinstance(header, dict) or not isinstance(header.get("provenance"), dict) or "kind" not in header:
        raise PerpairError(f"file {path}: not a perpair artifact (its '{METADATA_KEY.decode()}' metadata is not the "
                           "header perpair writes)")
    return header


def missing_field(table: pa.Table, schema: pa.Schema) -> pa.Field | None:
    """The first field of ``schema`` that ``table`` lacks, by name and type (None: it has them all): a file of the
    right kind written by another program, or edited. Nullability and field metadata do not count."""
    return next((f for f in schema if f.name not in table.schema.names or table.schema.field(f.name).type != f.type),
                None)


def cast_column(table: pa.Table, field: pa.Field, *, file: str, expected: str) -> pa.Table:
    """``table`` with its column ``field.name`` read as ``field.type`` (int32 scores as int64, …), or one error naming
    ``file`` and the field, ``expected`` saying what it should be: values of another kind (text for messages, "no" for
    a flag) in a file another program wrote, or one edited."""
    held = table.schema.field(field.name).type
    if held == field.type:
        return table
    try:
        column = table.column(field.name).cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(f"column has type {held}, {expected} ({exc})", file=file, field=field.name) from None
    return table.set_column(table.schema.get_field_index(field.name), field.name, column)


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file as a table (``columns``: only these top-level columns); a file that cannot be read (corrupt
    pages) or lacks one of ``columns`` is an error naming it, where ``ParquetFile.read`` would leave the column
    out. Not ``pq.read_table``, which reads through ``pyarrow.dataset``, and that imports pandas: 37 MB more at a
    training run's peak memory for nothing a single file needs."""
    try:
        with pq.ParquetFile(path) as parquet:
            missing = [name for name in columns or () if name not in parquet.schema_arrow.names]
            if not missing:
                return parquet.read(columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise PerpairError(f"file {path}: not a readable Parquet file ({exc})") from None
    raise PerpairError(f"file {path}: no column {', '.join(map(repr, missing))}")


def read_artifact(path: str | os.PathLike, *, kind: str,
                  schema_version: int) -> tuple[pa.Table, dict[str, Any]]:
    """Read an artifact of the expected kind and schema version; returns ``(table, provenance)``."""
    header = read_header(path)
    if header.get("kind") != kind:
        raise PerpairError(f"file {path}: is a '{header.get('kind')}' artifact, expected '{kind}'")
    if header.get("schema_version") != schema_version:
        raise PerpairError(
            f"file {path}: {kind} schema version {header.get('schema_version')}, this perpair reads "
            f"version {schema_version}; re-create it with this version"
        )
    return read_parquet(path), header["provenance"]


def refuse_overwrite(outputs: dict[str, str | os.PathLike], inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse a run whose output would replace one of its inputs (``-o`` naming the input file)."""
    for out_name, out_path in outputs.items():
        for in_name, in_path in inputs.items():
            if in_path is not None and Path(out_path).resolve() == Path(in_path).resolve():
                raise PerpairError(f"{out_name} {out_path} is the {in_name}: writing it would overwrite the "
                                   "input; choose another output path")
