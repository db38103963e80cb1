"""A resumable cache of generations and judgments: SQLite, one row per item, committed the moment it is made,
so a killed run loses at most the batch in flight and a re-run repeats nothing that was finished."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from perpair import sqlite_files


def cache_key(*parts: Any) -> str:
    """A stable key from JSON-serialisable parts (model, settings, inputs)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ResultCache:
    """``cache.get(kind, key)`` / ``cache.put_many(kind, [(key, value), …])``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._db = sqlite_files.connect(self.path, what="results cache", tables={"results": ("kind", "key", "value")},
                                        remedy="remove it, or name another output folder")
        try:
            with self._refused("cannot be opened"):
                self._db.execute("CREATE TABLE IF NOT EXISTS results (kind TEXT NOT NULL, key TEXT NOT NULL, "
                                 "value TEXT NOT NULL, PRIMARY KEY (kind, key))")
        except BaseException:
            self._db.close()
            raise

    def _refused(self, failed: str):
        return sqlite_files.refused_as("results cache", self.path, failed)

    def get(self, kind: str, key: str) -> Any | None:
        with self._refused("cannot be read"):
            row = self._db.execute("SELECT value FROM results WHERE kind = ? AND key = ?", (kind, key)).fetchone()
        return None if row is None else json.loads(row[0])

    def put_many(self, kind: str, items: list[tuple[str, Any]]) -> None:
        rows = [(kind, key, json.dumps(value, ensure_ascii=False)) for key, value in items]
        with self._refused("cannot be written"), self._db:  # one transaction for the batch
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO results (kind, key, value) VALUES (?, ?, ?)", rows)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
