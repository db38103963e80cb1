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

from perpair import sqlite_files

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


def _another_format(db: sqlite3.Connection) -> str | None:
    """Why a cache with the answer cache's tables cannot be read here (None: its format is this perpair's)."""
    held = db.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
    if held is None or held[0] != str(CACHE_FORMAT):
        return f"format {held[0] if held else 'unknown'}, this perpair reads format {CACHE_FORMAT}"
    return None


class AnswerCache:
    """``AnswerCache(path)``; ``put`` commits at once; ``get_many`` reads back by key."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._db = sqlite_files.connect(self.path, what="answer cache", remedy="name another --cache",
                                        tables={"meta": ("name", "value"), "calls": _CALL_COLUMNS},
                                        check=_another_format)
        try:
            with self._refused("cannot be opened"):
                # One transaction: a process opening the same new cache sees both tables and the format, or none.
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
                self._db.execute("CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, pair_id TEXT NOT NULL, "
                                 "teacher TEXT NOT NULL, template TEXT NOT NULL, status TEXT NOT NULL, "
                                 "record TEXT NOT NULL)")
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(CACHE_FORMAT),))
                self._db.execute("COMMIT")
        except BaseException:
            self._db.close()
            raise

    def _refused(self, failed: str):
        return sqlite_files.refused_as("answer cache", self.path, failed)

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
        with self._refused("cannot be written"), self._db:  # one transaction for a batch (the local teacher's)
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?, ?)", rows)

    def get_many(self, keys: Sequence[str]) -> dict[str, CallRecord]:
        found: dict[str, CallRecord] = {}
        with self._refused("cannot be read"):
            for start in range(0, len(keys), 500):  # SQLite's bound on query parameters
                chunk = list(keys[start:start + 500])
                marks = ",".join("?" * len(chunk))
                for key, text in self._db.execute(f"SELECT key, record FROM calls WHERE key IN ({marks})", chunk):
                    found[key] = CallRecord.from_json(text)
        return found

    def count(self) -> int:
        with self._refused("cannot be read"):
            return self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def stats(self) -> dict[str, Any]:
        with self._refused("cannot be read"):
            return dict(self._db.execute("SELECT status, COUNT(*) FROM calls GROUP BY status").fetchall())
