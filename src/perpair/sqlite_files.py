"""The SQLite files perpair's caches live in (teacher answers; generations and judgments): opened in WAL mode by
several processes at once, and every SQLite error on them one line naming the file."""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from perpair.errors import PerpairError

BUSY_TIMEOUT_S = 60  # how long a process waits for another's write to the same file


@contextlib.contextmanager
def refused_as(what: str, path: Path, failed: str) -> Iterator[None]:
    """SQLite's errors inside as one :class:`PerpairError` naming ``what``, ``path`` and what ``failed`` ("cannot be
    written"): a file that is no database, a disk that filled, a folder that may not be written."""
    try:
        yield
    except sqlite3.Error as exc:
        raise PerpairError(f"{what} {path}: {failed} ({exc})") from None


def connect(path: str | os.PathLike, *, what: str, tables: dict[str, tuple[str, ...]], remedy: str,
            check: Callable[[sqlite3.Connection], str | None] = lambda db: None) -> sqlite3.Connection:
    """Open (or create) the database at ``path`` for a cache whose tables and their columns are ``tables``,
    autocommitting (``isolation_level=None``: each statement, or each ``BEGIN`` … ``COMMIT``, its own durable
    transaction), in WAL mode with ``synchronous=NORMAL`` (a killed process loses nothing committed; only a power
    cut can lose the last commits). A database without these tables and columns (another program's), or that
    ``check`` finds a reason to refuse (a format), is refused before anything is written to it; ``what`` names the
    cache in the errors, ``remedy`` says what to do then."""
    path = Path(path)
    with refused_as(what, path, "cannot be opened"):
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        try:
            problem = _foreign(db, tables, check)
            if problem is not None:
                raise PerpairError(f"{what} {path}: not a perpair {what} ({problem}); {remedy}")
            _to_wal(db, deadline=time.monotonic() + BUSY_TIMEOUT_S)
            db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            db.close()
            raise
    return db


def _foreign(db: sqlite3.Connection, tables: dict[str, tuple[str, ...]],
             check: Callable[[sqlite3.Connection], str | None]) -> str | None:
    """Why an existing database does not hold these tables, or ``check`` refuses it (None: neither, or it is
    empty)."""
    found = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not found:
        return None
    if not set(tables) <= found:
        return f"its tables are {', '.join(sorted(found))}"
    for table, columns in tables.items():
        held = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
        if held != list(columns):
            return f"its {table} table has the columns {', '.join(held)}"
    return check(db)


def _to_wal(db: sqlite3.Connection, deadline: float) -> None:
    """Switch ``db`` to WAL mode, waiting for the others that open the same new file at once (shards started
    together). Two of them holding a shared lock and asking for the exclusive one the switch needs is a deadlock,
    which SQLite breaks by answering "database is locked" at once, without its busy timeout (one of eight threads
    opening a new cache together, about one time in 20): tried again after a random pause."""
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(random.uniform(0.002, 0.02))
