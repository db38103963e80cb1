"""The answer cache: the source of truth of an annotation run.

Every teacher answer (or final failure) is committed to SQLite the moment it arrives, so a run killed by
Ctrl-C or SIGKILL loses only the requests that were in flight, and a re-run asks only for what is missing.
WAL mode with ``synchronous=NORMAL`` survives a killed process (only a power cut can lose the last
commits), and lets several processes on one machine share the file. The artifacts are rebuilt from here.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from perpair.errors import PerpairError

CACHE_FORMAT = 1
_CALL_COLUMNS = ("key", "pair_id", "teacher", "template", "status", "record")


@dataclass
class CallRecord:
    """One teacher call on one pair with one template: a row of the calls table.

    ``status``: ``ok`` (a valid annotation), ``failed`` (no annotation after the bounded retries; ``reason``
    says why) or ``unknown`` (the teacher cannot tell the category, e.g. ratings with only an overall
    score; ``reason`` says why).
    """

    key: str
    pair_id: str
    teacher: str
    template: str
    status: str
    category: str | None = None
    magnitude: float | None = None
    confidence: float | None = None
    rationale: str | None = None
    preferred: str | None = None
    gap_category: str | None = None
    swapped: bool | None = None
    reason: str | None = None
    raw_response: str | None = None
    attempts: int = 0
    reasks: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    @classmethod
    def from_json(cls, text: str) -> CallRecord:
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)


class AnswerCache:
    """``AnswerCache(path)``; ``put`` commits at once; ``get_many`` reads back by key."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: autocommit, each put is its own durable transaction.
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
            problem = self._foreign()
            if problem is not None:  # before anything is written to it: another program's database stays as it was
                self._db.close()
                raise PerpairError(f"answer cache {self.path}: not a perpair answer cache ({problem}); name another "
                                   "--cache")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # One transaction: a process opening the same new cache sees both tables and the format, or none.
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, pair_id TEXT NOT NULL, "
                             "teacher TEXT NOT NULL, template TEXT NOT NULL, status TEXT NOT NULL, "
                             "record TEXT NOT NULL)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(CACHE_FORMAT),))
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:  # a folder that cannot be written, a file that is no SQLite database
            raise PerpairError(f"answer cache {self.path}: cannot be opened ({exc})") from None

    def _foreign(self) -> str | None:
        """Why an existing database is not an answer cache of this format (None: it is one, or it is empty)."""
        tables = {name for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return None
        if not {"meta", "calls"} <= tables:
            return f"its tables are {', '.join(sorted(tables))}"
        columns = [row[1] for row in self._db.execute("PRAGMA table_info(calls)")]
        if columns != list(_CALL_COLUMNS):
            return f"its calls table has the columns {', '.join(columns)}"
        held = self._db.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
        if held is None or held[0] != str(CACHE_FORMAT):
            return f"format {held[0] if held else 'unknown'}, this perpair reads format {CACHE_FORMAT}"
        return None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, record: CallRecord) -> None:
        self.put_many([record])

    def put_many(self, records: Iterable[CallRecord]) -> None:
        rows = [(r.key, r.pair_id, r.teacher, r.template, r.status, r.to_json()) for r in records]
        if not rows:
            return
        with self._db:  # one transaction for a batch (the local teacher's)
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?, ?)", rows)

    def get_many(self, keys: Sequence[str]) -> dict[str, CallRecord]:
        found: dict[str, CallRecord] = {}
        for start in range(0, len(keys), 500):  # SQLite's bound on query parameters
            chunk = list(keys[start:start + 500])
            marks = ",".join("?" * len(chunk))
            for key, text in self._db.execute(f"SELECT key, record FROM calls WHERE key IN ({marks})", chunk):
                found[key] = CallRecord.from_json(text)
        return found

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def stats(self) -> dict[str, Any]:
        return dict(self._db.execute("SELECT status, COUNT(*) FROM calls GROUP BY status").fetchall())
