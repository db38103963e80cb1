"""Stage 1, data: read preference corpora in any supported layout into canonical pairs.

Entry point: ``prepare(sources, output, options)``; ``read_pairs(path)`` loads the artifact back.
"""

from __future__ import annotations

import pyarrow as pa

from perpair.artifacts import read_artifact
from perpair.data.prepare import PrepareOptions, PrepareResult, prepare
from perpair.data.schema import KIND, SCHEMA_VERSION, PairRecord, compute_pair_id
from perpair.errors import PerpairError


def read_pairs(path: str) -> tuple[pa.Table, dict]:
    """The pairs table and its provenance; refuses files that are not a pairs artifact of this version, and those
    an earlier perpair wrote with tool descriptions left in ``meta`` (they would be tokenized without them)."""
    table, provenance = read_artifact(path, kind=KIND, schema_version=SCHEMA_VERSION)
    stale = sum(s.get("notes", {}).get("tools_in_meta_only", {}).get("count", 0)
                for s in provenance.get("sources", []) if isinstance(s, dict))
    if stale and "tools" not in table.column_names:
        raise PerpairError(f"file {path}: {stale} pair(s) describe tools that this file keeps in 'meta' only (an "
                           "earlier perpair wrote it); the chat template would render their prompts without them: "
                           "run perpair prepare on the source again")
    return table, provenance


__all__ = ["PairRecord", "PrepareOptions", "PrepareResult", "compute_pair_id", "prepare", "read_pairs"]
