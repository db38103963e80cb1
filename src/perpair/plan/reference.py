"""The reference log-probs a plan's ``margin.source: reference`` reads: the train stage's cache.

``perpair train`` caches the reference model's summed log-probs per pair (kind ``reference_logps``, one file
per model, tokenizer, pairs file and length settings, in ``$PERPAIR_CACHE/reference/``; a ``perpair run``
keeps its own in ``WORKDIR/reference/``). A plan reads one file, or finds in a folder the one made from its
pairs file, and refuses a file made from another pairs file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from perpair.artifacts import read_artifact
from perpair.errors import ArtifactMismatch, InputError, PerpairError

# The kind and version perpair.train.reference writes (not imported from there: that module loads torch).
KIND = "reference_logps"
SCHEMA_VERSION = 1


def read_reference_logps(path: str | os.PathLike, pairs_sha256: str, pairs_file: str,
                         given_as: str = "reference log-probs") -> tuple[pa.Table, Path]:
    """The reference log-prob table for the pairs file whose SHA-256 is ``pairs_sha256``, and the file it came
    from. ``path`` is a cache file, or a folder holding cache files (the one of these pairs is taken);
    ``given_as`` names it in messages (the option that gave it: ``--reference-logps``)."""
    path = Path(path)
    if path.is_dir():
        return _find(path, pairs_sha256, pairs_file, given_as)
    if not path.exists():
        raise InputError(f"{given_as} {path}: no such file or folder")
    table, provenance = read_artifact(path, kind=KIND, schema_version=SCHEMA_VERSION)
    made_from = _pairs_sha(provenance)
    if made_from != pairs_sha256:
        raise ArtifactMismatch(f"reference log-probs {path} were computed for another pairs file "
                               f"(pairs_sha256 {str(made_from)[:12]}…), not {pairs_file} ({pairs_sha256[:12]}…); "
                               f"run perpair train on {pairs_file} to compute them")
    return table, path


def _find(folder: Path, pairs_sha256: str, pairs_file: str, given_as: str) -> tuple[pa.Table, Path]:
    found = []
    for candidate in sorted(folder.glob("*.parquet")):
        try:
            table, provenance = read_artifact(candidate, kind=KIND, schema_version=SCHEMA_VERSION)
        except PerpairError:
            continue  # another kind of file in the folder: not a candidate
        if _pairs_sha(provenance) == pairs_sha256:
            found.append((table, candidate, provenance["key"].get("model")))
    if not found:
        raise InputError(f"{given_as} {folder}: no reference log-probs of {pairs_file} here; run perpair train on "
                         "it first (its reference pass fills this cache)")
    if len(found) > 1:
        listed = "; ".join(f"{p} (model {m})" for _, p, m in found)
        raise InputError(f"{given_as} {folder}: {len(found)} reference log-prob files for {pairs_file} (different "
                         f"models or settings): name one of {listed}")
    table, candidate, _ = found[0]
    return table, candidate


def _pairs_sha(provenance: dict) -> str | None:
    key = provenance.get("key")
    return key.get("pairs_sha256") if isinstance(key, dict) else None
