"""Stage 1, data: read preference corpora in any supported layout into canonical pairs.

Entry point: ``prepare(sources, output, options)``; ``read_pairs(path)`` loads the artifact back.
"""

from __future__ import annotations

import pyarrow as pa

from perpair.artifacts import cast_column, read_artifact
from perpair.data.prepare import PrepareOptions, PrepareResult, prepare
from perpair.data.schema import ARROW_SCHEMA, KIND, SCHEMA_VERSION, PairRecord, compute_pair_id
from perpair.errors import InputError, PerpairError

REQUIRED = ("pair_id", "prompt", "chosen", "rejected")  # what the stages read of every pair


def read_pairs(path: str) -> tuple[pa.Table, dict]:
    """The pairs table and its provenance; refuses files that are not a pairs artifact of this version, and those
    an earlier perpair wrote with tool descriptions left in ``meta`` (they would be tokenized without them)."""
    table, provenance = read_artifact(path, kind=KIND, schema_version=SCHEMA_VERSION)
    # a file with our header and other columns (written by another program, or edited) ended each stage in a
    # traceback, or was annotated without its responses
    for field in ARROW_SCHEMA:
        if field.name not in table.column_names:
            if field.name in REQUIRED:
                raise InputError(f"no column '{field.name}'; a pairs file holds {', '.join(REQUIRED)}", file=path)
            continue
        table = cast_column(table, field, file=path, expected=f"a pairs file's is {field.type}")
        if field.name in REQUIRED and table.column(field.name).null_count:
            raise InputError("column holds nulls; no pair lacks it", file=path, field=field.name)
    stale = sum(s.get("notes", {}).get("tools_in_meta_only", {}).get("count", 0)
                for s in provenance.get("sources", []) if isinstance(s, dict))
    if stale and "tools" not in table.column_names:
        raise PerpairError(f"file {path}: {stale} pair(s) describe tools that this file keeps in 'meta' only (an "
                           "earlier perpair wrote it); the chat template would render their prompts without them: "
                           "run perpair prepare on the source again")
    return table, provenance


__all__ = ["PairRecord", "PrepareOptions", "PrepareResult", "compute_pair_id", "prepare", "read_pairs"]
