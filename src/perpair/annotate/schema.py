"""The annotations artifact: one semantic-gap annotation per preference pair.

A perpair artifact of kind ``annotations`` (schema version 1) with one row per pair and at least the
columns of :data:`ARROW_SCHEMA`. ``category`` is null when the pair got no annotation (the pair is then
treated as unannotated); otherwise ``magnitude`` and ``confidence`` are required. ``category`` is
:data:`UNKNOWN` when the size of the gap is known but not its kind (the ratings teacher with an overall score
only): the plan gives such pairs their own prior. Its provenance holds
``pairs_sha256``, the :func:`perpair.artifacts.file_sha256` of the pairs file that was annotated, so a plan
can refuse annotations made from another pairs file. Extra columns (rationale, teacher id, raw response,
...) are allowed and carried along untouched.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from perpair.artifacts import cast_column, read_artifact
from perpair.errors import ArtifactMismatch, InputError

KIND = "annotations"
SCHEMA_VERSION = 1

# Ordered by how objective the failure is (DESIGN, "Annotations"); `mislabeled` means the rejected
# response is in fact the better one.
CATEGORIES: tuple[str, ...] = (
    "safety",
    "factuality",
    "instruction_following",
    "helpfulness",
    "style",
    "no_clear_gap",
    "mislabeled",
)
# Not a category a teacher LLM can answer: the gap's size is known (an overall score margin), its kind is not.
UNKNOWN = "unknown"
MAGNITUDE_MIN, MAGNITUDE_MAX = 0.0, 3.0  # none, minor, moderate, severe
CONFIDENCE_MIN, CONFIDENCE_MAX = 0.0, 1.0

ARROW_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("category", pa.string()),
    pa.field("magnitude", pa.float64()),
    pa.field("confidence", pa.float64()),
])


def read_annotations(path: str | os.PathLike) -> tuple[pa.Table, dict[str, Any]]:
    """Read and validate an annotations artifact; returns ``(table, provenance)``.

    The required columns are cast to the types of :data:`ARROW_SCHEMA` (integers are accepted as
    floats). Any out-of-range or missing value raises :class:`~perpair.errors.InputError` naming the
    file, the row (1-based) and the field.
    """
    table, provenance = read_artifact(path, kind=KIND, schema_version=SCHEMA_VERSION)
    file = str(path)
    pairs_sha = provenance.get("pairs_sha256")
    if not isinstance(pairs_sha, str) or not pairs_sha:
        raise InputError("provenance has no 'pairs_sha256' (the hash of the annotated pairs file)",
                         file=file, field="pairs_sha256")
    for field in ARROW_SCHEMA:
        if field.name not in table.column_names:
            raise InputError("required column is missing", file=file, field=field.name)
        table = cast_column(table, field, file=file, expected=f"expected {field.type}")
    _validate_rows(table, file)
    return table, provenance


def align_to_pairs(annotations_path: str | os.PathLike, annotations: pa.Table, provenance: dict[str, Any],
                   pairs_file: str, pairs_sha256: str, pair_ids: pa.Array) -> pa.Array:
    """The row of each pair's annotation (``pair_ids``, the pairs file's ids in its order; null where the pair has
    none), after refusing annotations made from another pairs file (their recorded ``pairs_sha256``) or holding
    pairs that are not in it. ``perpair plan``, ``perpair train`` (through the plan) and ``perpair eval
    preference`` refuse with these same words."""
    if provenance["pairs_sha256"] != pairs_sha256:
        raise ArtifactMismatch(
            f"annotations {annotations_path} were made from another pairs file "
            f"(pairs_sha256 {provenance['pairs_sha256'][:12]}…), not {pairs_file} "
            f"({pairs_sha256[:12]}…); re-annotate this pairs file")
    index = pc.index_in(pair_ids, value_set=annotations.column("pair_id").combine_chunks())
    unmatched = annotations.num_rows - int(pc.count(index).as_py())
    if unmatched:
        raise ArtifactMismatch(f"annotations {annotations_path} hold {unmatched} pair(s) that are not in "
                               f"{pairs_file}")
    return index


def _validate_rows(table: pa.Table, file: str) -> None:
    pair_ids = table.column("pair_id").to_pylist()
    categories = table.column("category").to_pylist()
    magnitudes = table.column("magnitude").to_pylist()
    confidences = table.column("confidence").to_pylist()
    seen: dict[str, int] = {}
    known = {*CATEGORIES, UNKNOWN}
    for i, (pair_id, category, magnitude, confidence) in enumerate(
            zip(pair_ids, categories, magnitudes, confidences, strict=True)):
        row = i + 1
        if not pair_id:
            raise InputError("pair_id is empty", file=file, row=row, field="pair_id")
        if pair_id in seen:
            raise InputError(f"pair {pair_id} is annotated twice (first at row {seen[pair_id]})",
                             file=file, row=row, field="pair_id")
        seen[pair_id] = row
        if category is None:
            continue  # unknown gap: the plan treats the pair as unannotated
        if category not in known:
            raise InputError(f"unknown category {category!r}; expected one of {', '.join((*CATEGORIES, UNKNOWN))}",
                             file=file, row=row, field="category")
        for name, value, low, high in (("magnitude", magnitude, MAGNITUDE_MIN, MAGNITUDE_MAX),
                                       ("confidence", confidence, CONFIDENCE_MIN, CONFIDENCE_MAX)):
            if value is None or math.isnan(value):
                raise InputError(f"{name} is missing for category {category!r}",
                                 file=file, row=row, field=name)
            if not low <= value <= high:
                raise InputError(f"{name} {value!r} is outside [{low:g}, {high:g}]",
                                 file=file, row=row, field=name)
