"""The reference log-probs a plan's ``margin.source: reference`` reads: the train stage's cache.

``perpair train`` caches the reference model's summed log-probs per pair (kind ``reference_logps``, one file
per model, tokenizer, pairs file and length settings, in ``$PERPAIR_CACHE/reference/``; a ``perpair run``
keeps its own in ``WORKDIR/reference/``). A plan reads one file, or finds in a folder the one made from its
pairs file, and refuses a file made from another pairs file, or one that lacks pairs of it: those would get no
margin, never routed and last in the curriculum, in a plan that reads as complete.

A reference pass saves what it computed as it goes, each process into part files beside the cache file
(``NAME.part-RANK-TOKEN``), folded into it when the pass ends: the parts left are those of a stopped pass, read
with the file.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from perpair.artifacts import missing_field, read_artifact, read_header, read_parquet
from perpair.errors import ArtifactMismatch, InputError, PerpairError
from perpair.plan.difficulty import REFERENCE_LOGPS_SCHEMA, logps_table

# The kind and version perpair.train.reference writes (not imported from there: that module loads torch).
KIND = "reference_logps"
SCHEMA_VERSION = 1


def read_reference_logps(path: str | os.PathLike, pairs_sha256: str, pairs_file: str,
                         given_as: str = "reference log-probs") -> tuple[pa.Table, Path, str]:
    """The reference log-prob table for the pairs file whose SHA-256 is ``pairs_sha256``, the file it came from,
    and what computed it (:func:`computed_by`: the model, max length, precision). ``path`` is a cache file, or a
    folder holding cache files (the one of these pairs is taken); ``given_as`` names it in messages (the option that
    gave it: ``--reference-logps``). A file that lacks pairs of ``pairs_file`` (but those the pass found too long
    for max_length) is refused, and so is one of LD-DPO's weighted sums, which are no log-probs."""
    path = Path(path)
    if path.is_dir():
        values, provenance, path = _find(path, pairs_sha256, pairs_file, given_as)
    else:
        values, provenance = read_cache(path)
        if provenance is None:
            raise InputError(f"{given_as} {path}: no such file or folder")
        made_from = _pairs_sha(provenance)
        if made_from != pairs_sha256:
            raise ArtifactMismatch(f"reference log-probs {path} were computed for another pairs file "
                                   f"(pairs_sha256 {str(made_from)[:12]}…), not {pairs_file} ({pairs_sha256[:12]}…); "
                                   f"run perpair train on {pairs_file} to compute them")
    if (alpha := (provenance["key"] or {}).get("ld_alpha")) is not None:
        raise InputError(f"{given_as} {path}: computed for LD-DPO (ld_alpha {alpha}): its values weigh each response's "
                         "tokens past the shorter one's length by ld_alpha, and a margin reads log-probs; train once "
                         "without ld_alpha to cache them")
    known = values.keys() | set(provenance["left_out"])
    pair_ids = read_parquet(pairs_file, ["pair_id"]).column("pair_id").to_pylist()
    lacking = [pid for pid in pair_ids if pid not in known]
    if lacking:
        stopped = " (a reference pass did not finish: stopped, or still running)" if part_files(path) else ""
        # an earlier perpair's cache does not tell the pairs too long for max_length from those never computed
        earlier = "" if provenance["left_out_recorded"] else (
            " This cache was written by an earlier perpair, which did not record the pairs whose prompt alone fills "
            "max_length (no value, trained by none): those count as lacking until the run below records them, "
            "computing none of them.")
        raise InputError(f"{given_as} {path}: lacks {len(lacking):,} of the {len(pair_ids):,} pairs of "
                         f"{pairs_file}{stopped}, e.g. "
                         f"{', '.join(map(str, lacking[:3]))}; a plan would give them no margin.{earlier} Compute "
                         f"them with perpair train --data {pairs_file} over every pair (no --plan, no --steps: one "
                         "epoch) with the model and max_length of the cache: its reference pass computes only those "
                         "lacking, and the cache holds them all once its first step is done")
    ids = sorted(values)
    rows = [values[i] for i in ids]
    return logps_table(ids, *([r[k] for r in rows] for k in range(4))), path, computed_by(provenance)


def computed_by(provenance: dict) -> str:
    """What computed a cache: ``model M, max_length N`` (and ``bf16`` where it was); the model as the run named it,
    or, in a cache an earlier perpair wrote, as its key holds it (a folder by a hash of its files)."""
    key = provenance["key"] if isinstance(provenance.get("key"), dict) else {}
    model = provenance.get("model_name") or str(key.get("model"))[:24] + " (the hash of its files)"
    return (f"model {model}, max_length {key.get('max_length')}"
            + (f", {key['precision']}" if key.get("precision") else ""))


def part_files(path: Path) -> list[Path]:
    """The part files of the cache file ``path`` that a reference pass saved as it went, not yet folded into it."""
    return sorted(path.parent.glob(f"{glob.escape(path.name)}.part-*"))


def read_cache(path: Path, key: dict | None = None) -> tuple[dict[str, tuple[float, int, float, int]], dict | None]:
    """The values of the cache file ``path`` and of its part files, by pair id, and their provenance (None: none of
    them exists): the key, and ``left_out``, the pairs a pass found without a value (their prompt alone fills
    max_length: trained by none), which files an earlier perpair wrote do not record (``left_out_recorded``). A
    part made with another key than ``key`` (or than the file's) is refused."""
    values: dict[str, tuple[float, int, float, int]] = {}
    left_out: set[str] = set()
    found, recorded, model_name = False, True, None
    for file in ([path] if path.is_file() else []) + part_files(path):
        try:
            table, provenance = read_artifact(file, kind=KIND, schema_version=SCHEMA_VERSION)
        except PerpairError as exc:
            if not file.exists():  # a part folded into the file (and removed) since it was listed
                continue
            # (a pairs file, or a file not named as a cache, given as --reference-logps: not one to remove)
            if _other_kind(file) or ".parquet" not in file.name:
                raise
            # a file renamed into place just before a node went down can be empty (the rename reached the disk, its
            # data did not): it holds nothing to keep
            raise InputError(f"reference log-probs of {path}: {exc}; remove it, and the next reference pass "
                             "computes its pairs again") from None
        key = provenance.get("key") if key is None else key
        if provenance.get("key") != key:
            raise ArtifactMismatch(f"reference log-probs {file}: computed with other settings than {path}; "
                                   "remove it")
        # (another program's file, or one edited: its values would be read by position, or not at all)
        wrong = missing_field(table, REFERENCE_LOGPS_SCHEMA)
        if wrong is not None:
            raise InputError(f"reference log-probs {file}: no column '{wrong.name}' of {wrong.type} values; remove it, "
                             "and the next reference pass computes its pairs again")
        listed = provenance.get("left_out", [])  # (a string was read as its letters, a number as a traceback)
        if not isinstance(listed, list) or not all(isinstance(pid, str) for pid in listed):
            raise InputError(f"reference log-probs {file}: its provenance's left_out is not a list of pair ids; "
                             "remove it, and the next reference pass computes its pairs again")
        cols = [table.column(n).to_pylist() for n in REFERENCE_LOGPS_SCHEMA.names]
        values.update((row[0], tuple(row[1:])) for row in zip(*cols, strict=True))
        left_out.update(listed)
        recorded = recorded and "left_out" in provenance
        model_name = model_name or provenance.get("model_name")
        found = True
    return values, {"key": key, "left_out": sorted(left_out), "left_out_recorded": recorded,
                    "model_name": model_name} if found else None


def _find(folder: Path, pairs_sha256: str, pairs_file: str, given_as: str) -> tuple[dict, dict, Path]:
    found = []
    # cache files, and those of which only parts exist (the first pass over them was stopped)
    for candidate in sorted({folder / p.name.partition(".part-")[0] for p in folder.glob("*.parquet*")
                             if not p.name.startswith(".")}):  # (.NAME.tmp-…: a file being written)
        try:
            values, provenance = read_cache(candidate)
        except PerpairError:
            if part_files(candidate) or not _other_kind(candidate):
                raise  # a cache file or part that cannot be read is never passed over for another model's cache
            continue  # another kind of file in the folder (a pairs file, a plan): not a candidate
        if provenance is not None and _pairs_sha(provenance) == pairs_sha256:
            found.append((values, provenance, candidate))
    if not found:
        raise InputError(f"{given_as} {folder}: no reference log-probs of {pairs_file} here; run perpair train on "
                         "it first (its reference pass fills this cache)")
    if len(found) > 1:
        listed = "; ".join(f"{p} (model {provenance['key'].get('model')})" for _, provenance, p in found)
        raise InputError(f"{given_as} {folder}: {len(found)} reference log-prob files for {pairs_file} (different "
                         f"models or settings): name one of {listed}")
    return found[0]


def _other_kind(path: Path) -> bool:
    """Whether ``path`` is a readable Parquet file that is not a reference log-prob file (a pairs file, a plan, a
    file not perpair's); not one that cannot be read, which may be the cache asked for, cut short."""
    try:
        kind = read_header(path).get("kind")
    except PerpairError:
        try:
            pq.read_schema(path)
        except (OSError, pa.ArrowException):
            return False
        return True  # no perpair header
    return kind != KIND


def _pairs_sha(provenance: dict) -> str | None:
    key = provenance.get("key")
    return key.get("pairs_sha256") if isinstance(key, dict) else None
