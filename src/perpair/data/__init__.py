"""Stage 1, data: read preference corpora in any supported layout into canonical pairs.

Entry point: ``prepare(sources, output, options)``; ``read_pairs(path)`` loads the artifact back.
"""

from __future__ import annotations

import pyarrow as pa

from perpair.artifacts import read_artifact
from perpair.data.prepare import PrepareOptions, PrepareResult, prepare
from perpair.data.schema import KIND, SCHEMA_VERSION, PairRecord, compute_pair_id


def read_pairs(path: str) -> tuple[pa.Table, dict]:
    """The pairs table and its provenance; refuses files that are not a pairs artifact of this version."""
    return read_artifact(path, kind=KIND, schema_version=SCHEMA_VERSION)


__all__ = ["PairRecord", "PrepareOptions", "PrepareResult", "compute_pair_id", "prepare", "read_pairs"]
