"""``prepare``: read preference sources, validate every row, and write the canonical pairs artifact.

Two kinds of bad rows, neither silently lost:

* **malformed** rows (undecodable, missing or mistyped fields) stop the run with file, row and field;
  with ``skip_invalid`` they are left out and counted by reason (with their row numbers) in the provenance;
* **degenerate** pairs that carry no preference signal (an empty prompt or response, identical responses,
  transcripts that disagree before the final turn) are left out and counted by reason; with ``strict``
  they stop the run instead.

Exact duplicates (same ``pair_id``) are collapsed to their first occurrence and counted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from perpair.artifacts import write_artifact
from perpair.data.readers import (
    FORMATS,
    ColumnMap,
    Degenerate,
    ReadContext,
    detect_format,
    reader_for,
)
from perpair.data.schema import KIND, SCHEMA_VERSION, PairRecord, normalise_text, records_to_table
from perpair.data.sources import RowProblem, Source, describe, iter_rows, resolve_source
from perpair.errors import InputError

# Row numbers kept per reason in the provenance; the count is always exact.
MAX_ROWS_LISTED = 1000


class PrepareOptions(BaseModel):
    """Everything that decides the content of a pairs file (recorded in its provenance)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str | None = Field(None, description="source layout; detected from the first row when unset")
    split: str | None = Field(None, description="split of a Hugging Face dataset source (default: train)")
    revision: str | None = Field(None, description="revision of a Hugging Face dataset source")
    prompt_col: str | None = None
    chosen_col: str | None = None
    rejected_col: str | None = None
    score_chosen_col: str | None = None
    score_rejected_col: str | None = None
    limit: int | None = Field(None, ge=1, description="keep at most this many pairs (before the split)")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of pairs put in the test file")
    seed: int = Field(0, description="seed of the test split and of raw UltraFeedback binarization")
    skip_invalid: bool = False
    strict: bool = False

    @model_validator(mode="after")
    def _check(self) -> PrepareOptions:
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"unknown format '{self.format}'; known formats: {', '.join(FORMATS)}")
        if (self.score_chosen_col is None) != (self.score_rejected_col is None):
            raise ValueError("give both --score-chosen-col and --score-rejected-col, or neither")
        return self

    @property
    def column_map(self) -> ColumnMap | None:
        mapped = (self.prompt_col, self.chosen_col, self.rejected_col, self.score_chosen_col)
        if all(value is None for value in mapped):
            return None
        return ColumnMap(prompt=self.prompt_col, chosen=self.chosen_col or "chosen",
                         rejected=self.rejected_col or "rejected", score_chosen=self.score_chosen_col,
                         score_rejected=self.score_rejected_col)


@dataclass
class Tally:
    """Counts by reason, with the row numbers behind each count (up to ``MAX_ROWS_LISTED``)."""

    counts: dict[str, int] = field(default_factory=dict)
    rows: dict[str, list[int]] = field(default_factory=dict)

    def add(self, reason: str, row: int) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        listed = self.rows.setdefault(reason, [])
        if len(listed) < MAX_ROWS_LISTED:
            listed.append(row)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {reason: {"count": self.counts[reason], "rows": self.rows[reason]}
                for reason in sorted(self.counts)}


@dataclass
class SourceReport:
    source: dict[str, Any]
    format: str | None = None
    rows_read: int = 0
    pairs_kept: int = 0
    invalid: Tally = field(default_factory=Tally)
    degenerate: Tally = field(default_factory=Tally)
    duplicates: Tally = field(default_factory=Tally)

    def as_dict(self) -> dict[str, Any]:
        return {**self.source, "format": self.format, "rows_read": self.rows_read,
                "pairs_kept": self.pairs_kept, "invalid": self.invalid.as_dict(),
                "degenerate": self.degenerate.as_dict(), "duplicates": self.duplicates.as_dict()}


@dataclass
class PrepareResult:
    outputs: dict[str, Path]          # "train" (and "test") -> path written
    counts: dict[str, int]            # pairs per output
    sources: list[SourceReport]


def _generic_degenerate(record: PairRecord) -> Degenerate | None:
    """Checks that hold whatever the layout: empty parts and identical responses."""
    for name in ("prompt", "chosen", "rejected"):
        if not any(normalise_text(m["content"]) for m in getattr(record, name)):
            return Degenerate(f"empty_{name}", f"the {name} is empty", name)
    chosen = [(m["role"], normalise_text(m["content"])) for m in record.chosen]
    rejected = [(m["role"], normalise_text(m["content"])) for m in record.rejected]
    if chosen == rejected:
        return Degenerate("identical_responses", "chosen and rejected are identical", "rejected")
    return None


def in_test_split(pair_id: str, seed: int, fraction: float) -> bool:
    """Deterministic split: a pair is in the test split when the SHA-256 of ``"{seed}:{pair_id}"``, read
    as a number in [0, 1), is below ``fraction``. It depends on the pair alone, not on file order."""
    digest = hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def prepare(sources: list[str], output: str | Path, options: PrepareOptions | None = None,
            on_progress: Callable[[int], None] | None = None) -> PrepareResult:
    """Read ``sources`` (files or dataset ids), validate, and write the pairs artifact to ``output``.

    With ``options.test_fraction`` > 0 the test pairs go to ``<output stem>.test.parquet`` beside it.
    ``on_progress`` is called with the number of rows read so far (every 1,000 rows).
    """
    options = options or PrepareOptions()
    if not sources:
        raise InputError("no source given")
    records: list[PairRecord] = []
    seen: set[str] = set()
    reports = []
    rows_total = 0
    for spec in sources:
        source = resolve_source(spec, options.split, options.revision)
        report = SourceReport(describe(source))
        reports.append(report)
        label = source.label
        for number, value, text in iter_rows(source, report.source):
            if options.limit is not None and len(records) >= options.limit:
                break
            report.rows_read += 1
            rows_total += 1
            if on_progress and rows_total % 1000 == 0:
                on_progress(rows_total)
            record = _read_row(source, label, number, value, options, report)
            if record is None:
                continue
            record.meta = text if text is not None else json.dumps(value, ensure_ascii=False, default=str)
            if record.pair_id in seen:
                report.duplicates.add("duplicate", number)
                continue
            seen.add(record.pair_id)
            records.append(record)
            report.pairs_kept += 1
    return _write(records, Path(output), options, reports)


def _read_row(source: Source, label: str, number: int, value: Any, options: PrepareOptions,
              report: SourceReport) -> PairRecord | None:
    """One row to a record; ``None`` when it is skipped (and counted). Raises on what must stop the run."""
    try:
        if isinstance(value, RowProblem):
            raise value
        if not isinstance(value, dict):
            raise RowProblem("not_an_object", f"row must be a JSON object, got {type(value).__name__}")
        if report.format is None:
            report.format = options.format or ("columns" if options.column_map else detect_format(value))
            if report.format is None:
                raise InputError(
                    f"cannot tell the layout from the fields {sorted(value)[:12]}; name it with --format "
                    f"({', '.join(FORMATS)}) or map columns with --prompt-col/--chosen-col/--rejected-col",
                    file=source.spec, row=number)
        context = ReadContext(source=label, row=number, columns=options.column_map or ColumnMap(),
                              seed=options.seed)
        record = reader_for(report.format)(value, context)
        problem = _generic_degenerate(record)
        if problem is not None:
            raise problem
        return record
    except RowProblem as exc:
        if not options.skip_invalid:
            raise InputError(f"{exc.problem} (use --skip-invalid to skip and count malformed rows)",
                             file=source.spec, row=number, field=exc.field) from None
        report.invalid.add(exc.code, number)
    except Degenerate as exc:
        if options.strict:
            raise InputError(f"degenerate pair ({exc.reason}): {exc.detail} (without --strict such pairs "
                             f"are excluded and counted)", file=source.spec, row=number,
                             field=exc.field) from None
        report.degenerate.add(exc.reason, number)
    return None


def _write(records: list[PairRecord], output: Path, options: PrepareOptions,
           reports: list[SourceReport]) -> PrepareResult:
    splits: dict[str, list[PairRecord]] = {"train": records}
    outputs = {"train": output}
    if options.test_fraction > 0:
        test = [r for r in records if in_test_split(r.pair_id, options.seed, options.test_fraction)]
        test_ids = {r.pair_id for r in test}
        splits = {"train": [r for r in records if r.pair_id not in test_ids], "test": test}
        outputs["test"] = output.with_name(output.name.removesuffix(".parquet") + ".test.parquet")
    provenance_base = {
        "reader": "perpair.data.prepare",
        "options": options.model_dump(),
        "sources": [report.as_dict() for report in reports],
        "counts": {name: len(part) for name, part in splits.items()},
    }
    for name, part in splits.items():
        write_artifact(outputs[name], records_to_table(part), kind=KIND, schema_version=SCHEMA_VERSION,
                       provenance={**provenance_base, "split": name})
    return PrepareResult(outputs=outputs, counts=provenance_base["counts"], sources=reports)
