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
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from perpair.artifacts import read_header, temporary_beside, write_artifact
from perpair.config_files import NumbersNotBools
from perpair.data.llamafactory import REQUIRED, DatasetEntry, load_dataset_entry
from perpair.data.readers import FORMATS, PAIRS_LAYOUT, detect_format, read_pairs_row, reader_for
from perpair.data.rows import (
    MISSING,
    ROLES,
    ColumnMap,
    Degenerate,
    ReadContext,
    check_no_media,
    fields_hint,
    get,
)
from perpair.data.schema import KIND, SCHEMA_VERSION, TEMPLATE_MARKUP, PairRecord, normalise_text, records_to_table
from perpair.data.sources import RowProblem, Source, describe, folder_files, iter_rows, resolve_source
from perpair.errors import InputError, PerpairError

# The layouts whose reader takes its column names from --prompt-col/--chosen-col/...
COLUMN_FORMATS = ("columns", "trl", "ultrafeedback")
# Layouts of fixed fields whose reader takes the score columns from --score-chosen-col/--score-rejected-col
SCORE_COLUMN_FORMATS = ("hh-rlhf",)
# Row numbers kept per reason in the provenance; the count is always exact.
MAX_ROWS_LISTED = 1000
# Fields a row with an implicit prompt may have beside its responses without being asked about (see
# _source_columns); any other might be the prompt under another name.
IMPLICIT_PROMPT_ALSO = ("score_chosen", "score_rejected", "metadata", "tools")


class PrepareOptions(NumbersNotBools):
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
    system_col: str | None = Field(None, description="column of a system message (default: 'system' where present)")
    limit: int | None = Field(None, ge=1, description="keep at most this many pairs (before the split)")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of pairs put in the test file")
    seed: int = Field(0, description="seed of the test split and of raw UltraFeedback binarization")
    skip_invalid: bool = False
    strict: bool = False
    # text rendered with a chat template already (TRL's standard string format, tokenized by TRL as it is): kept and
    # counted instead of refused; perpair train refuses such pairs
    keep_template_markup: bool = False
    role_map: dict[str, str] | None = Field(
        None, description="source role name -> system/user/assistant/tool ('human=user,gpt=assistant')")
    dataset_info: str | None = Field(None, description="LLaMA-Factory dataset_info.json to read --dataset from")
    dataset: str | None = Field(None, description="name of a ranking dataset in --dataset-info")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        # a field's own check, so that the error names the key the user wrote (--format, data.format)
        if value is not None and value not in FORMATS:
            raise ValueError(f"unknown format '{value}'; known formats: {', '.join(FORMATS)}")
        return value

    @field_validator("role_map", mode="before")
    @classmethod
    def _parse_role_map(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
        if not pairs or any(len(pair) != 2 or not pair[0].strip() for pair in pairs):
            raise ValueError(f"write it as NAME=ROLE,NAME=ROLE (e.g. human=user,gpt=assistant), got {value!r}")
        names = [name.strip() for name, _ in pairs]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"{twice[0]} is mapped twice in {value!r}; map each name once")
        return {name.strip(): role.strip() for name, role in pairs}

    @model_validator(mode="after")
    def _check(self) -> PrepareOptions:
        if (self.score_chosen_col is None) != (self.score_rejected_col is None):
            raise ValueError("give both --score-chosen-col and --score-rejected-col, or neither")
        if self.score_chosen_col is not None and self.score_chosen_col == self.score_rejected_col:
            raise ValueError(f"--score-chosen-col and --score-rejected-col both name '{self.score_chosen_col}': "
                             "every pair's margin would be 0")
        if self.chosen_col is not None and self.chosen_col == self.rejected_col:
            raise ValueError(f"--chosen-col and --rejected-col both name '{self.chosen_col}': every pair would be "
                             "a response against itself")
        if self.column_map is not None and self.format not in (None, *COLUMN_FORMATS) and not (
                self.format in SCORE_COLUMN_FORMATS and self.names_only_scores):
            raise ValueError(f"--format {self.format} does not read --*-col options (they apply to "
                             f"{', '.join(COLUMN_FORMATS)}; --score-*-col to {', '.join(SCORE_COLUMN_FORMATS)} too)")
        for name, role in (self.role_map or {}).items():
            if role not in ROLES:
                raise ValueError(f"--role-map {name}={role}: the role must be one of {', '.join(ROLES)}")
        if (self.dataset_info is None) != (self.dataset is None):
            raise ValueError("give both --dataset-info and --dataset, or neither")
        if self.dataset_info is not None and (self.format is not None or self.column_map is not None):
            raise ValueError("--dataset-info describes the layout itself; leave out --format and the --*-col "
                             "options")
        return self

    @property
    def column_map(self) -> ColumnMap | None:
        """The columns named by the ``--*-col`` options, the usual names for the others (a ``prompt`` column is
        read where the data has one); None when no option names a column."""
        mapped = (self.prompt_col, self.chosen_col, self.rejected_col, self.score_chosen_col, self.system_col)
        if all(value is None for value in mapped):
            return None
        return ColumnMap(prompt=self.prompt_col or "prompt", chosen=self.chosen_col or "chosen",
                         rejected=self.rejected_col or "rejected", score_chosen=self.score_chosen_col,
                         score_rejected=self.score_rejected_col, prompt_optional=self.prompt_col is None,
                         system=self.system_col or "system")

    @property
    def names_only_scores(self) -> bool:
        """Whether the ``--*-col`` options name the score columns and no other."""
        return self.score_chosen_col is not None and all(
            value is None for value in (self.prompt_col, self.chosen_col, self.rejected_col, self.system_col))

    def named_columns(self) -> list[tuple[str, str]]:
        """``(column, option)`` for every column the user named, which the data must have."""
        named = [(self.prompt_col, "--prompt-col"), (self.chosen_col, "--chosen-col"),
                 (self.rejected_col, "--rejected-col"), (self.score_chosen_col, "--score-chosen-col"),
                 (self.score_rejected_col, "--score-rejected-col"), (self.system_col, "--system-col")]
        return [(column, option) for column, option in named if column is not None]


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
    notes: Tally = field(default_factory=Tally)       # kept pairs read in a way worth counting (a function call)
    columns: ColumnMap | None = None                  # for the column layouts: this source's, from its first row
    limited: bool = False                             # --limit was reached before its end
    unread: dict[str, int] = field(default_factory=dict)  # field → rows read where it held something no reader took

    def as_dict(self) -> dict[str, Any]:
        return {**self.source, "format": self.format, "rows_read": self.rows_read,
                "pairs_kept": self.pairs_kept, "invalid": self.invalid.as_dict(),
                "degenerate": self.degenerate.as_dict(), "duplicates": self.duplicates.as_dict(),
                "notes": self.notes.as_dict(), "limit_reached": self.limited,
                "unread_fields": dict(sorted(self.unread.items()))}

    def unread_line(self, shown: int = 8) -> str | None:
        """The fields no reader took, most rows first (``chosen_rating × 994, …``); None when there are none."""
        fields = sorted(self.unread.items(), key=lambda item: (-item[1], item[0]))
        more = f" and {len(fields) - shown} more" if len(fields) > shown else ""
        return ", ".join(f"{k} × {n:,}" for k, n in fields[:shown]) + more if fields else None


class _TakenFields(dict):
    """A row that remembers which of its fields the reader took (``row[name]``, ``row.get(name)``), so a source's
    report names the fields that held something and were read by nothing: ratings or a system prompt under
    another name than the layout's would otherwise be dropped without a word (each pair's ``meta`` keeps the row)."""

    def __init__(self, value: dict[str, Any]):
        super().__init__(value)
        self.taken: set[str] = set()
        self.parts: dict[str, set[str]] = {}  # a field of which only some keys were read (metadata.score_chosen)

    def note_read(self, path: str) -> None:
        top, _, rest = path.partition(".")
        if rest:
            self.parts.setdefault(top, set()).add(rest.split(".")[0])
        else:
            self.taken.add(top)

    def unread(self) -> list[str]:
        """The fields that hold something no reader took; of a field read in part, its keys not read."""
        found = []
        for name, held in self.items():
            if name in self.taken or _empty(held):
                continue
            if name in self.parts and isinstance(held, dict):
                found += [f"{name}.{key}" for key, inner in held.items()
                          if key not in self.parts[name] and not _empty(inner)]
            else:
                found.append(name)
        return found

    def __getitem__(self, key):
        self.taken.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.taken.add(key)
        return super().get(key, default)


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | dict) and not value)


@dataclass
class PrepareResult:
    outputs: dict[str, Path]          # "train" (and "test") -> path written
    counts: dict[str, int]            # pairs per output
    sources: list[SourceReport]


def _generic_degenerate(record: PairRecord) -> Degenerate | None:
    """Checks that hold whatever the layout: empty parts (a prompt of a system message alone is empty) and
    identical responses."""
    for name in ("prompt", "chosen", "rejected"):
        messages = getattr(record, name)
        if name == "prompt":
            messages = [m for m in messages if m["role"] != "system"]
        if not any(normalise_text(m["content"]) for m in messages):
            return Degenerate(f"empty_{name}", f"the {name} is empty" + (" (beside a system message)" if
                                                                           messages != getattr(record, name) else ""),
                              name)
    chosen = [(m["role"], normalise_text(m["content"])) for m in record.chosen]
    rejected = [(m["role"], normalise_text(m["content"])) for m in record.rejected]
    if chosen == rejected:
        return Degenerate("identical_responses", "chosen and rejected are identical", "rejected")
    return None


def _template_markup(record: PairRecord, keep: bool) -> RowProblem | None:
    """A message whose text holds a chat template's turn markers: the data was templated (a ChatML string, say)
    before it came here, and ``perpair train`` would template it again, the markers read as the model's special
    tokens. Kept (and counted) with ``keep``: TRL's standard string format tokenizes such text as it is."""
    for name in ("prompt", "chosen", "rejected"):
        for index, message in enumerate(getattr(record, name)):
            if found := TEMPLATE_MARKUP.search(message["content"]):
                if keep:
                    record.notes.append("chat_template_markup")
                    return None
                return RowProblem("chat_template_markup", f"the text holds a chat template's turn marker "
                                                          f"'{found.group()}': it was rendered with a template "
                                                          "already, and perpair train renders the pair's messages "
                                                          "with the model's; give the turns as messages, without "
                                                          "the template's markers (or --keep-template-markup for a "
                                                          "plan used inside TRL, which tokenizes such text as it "
                                                          "is)", f"{name}[{index}].content")
    return None


def in_test_split(pair_id: str, seed: int, fraction: float) -> bool:
    """Deterministic split: a pair is in the test split when the SHA-256 of ``"{seed}:{pair_id}"``, read
    as a number in [0, 1), is below ``fraction``. It depends on the pair alone, not on file order."""
    digest = hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def prepare(sources: list[str], output: str | Path, options: PrepareOptions | None = None,
            on_progress: Callable[[int], None] | None = None) -> PrepareResult:
    """Read ``sources`` (files or dataset ids), validate, and write the pairs artifact to ``output``.

    With ``options.dataset_info`` the source is the named entry of that LLaMA-Factory ``dataset_info.json``
    (and ``sources`` must be empty). With ``options.test_fraction`` > 0 the test pairs go to
    ``<output stem>.test.parquet`` beside it. ``on_progress`` is called with the number of rows read so far
    (every 1,000 rows). A run that keeps no pair writes nothing and raises ``InputError``.
    """
    options = options or PrepareOptions()
    entry = None
    if options.dataset_info is not None:
        if sources:
            raise InputError("--dataset-info names the data itself; give no other source")
        entry = load_dataset_entry(options.dataset_info, options.dataset or "")
        sources = [entry.source]
        if entry.split and options.split and entry.split != options.split:  # the entry's was read, --split unread
            info = Path(options.dataset_info)
            raise InputError(f"dataset '{options.dataset}' names split '{entry.split}' itself, and --split says "
                             f"'{options.split}': LLaMA-Factory reads the entry's; drop --split, or change the "
                             f"entry's split", file=str(info / "dataset_info.json" if info.is_dir() else info),
                             field="split")
    if not sources:
        raise InputError("no source given")
    output = Path(output)
    outputs = _output_paths(output, options)
    resolved = [resolve_source(spec, entry.split if entry and entry.split else options.split, options.revision)
                for spec in sources]
    given = [f"{option} {value!r}" for option, value in (("--split", options.split), ("--revision", options.revision))
             if value]
    if given and all(source.kind == "file" for source in resolved):  # nothing they could select from
        raise InputError(f"{' and '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to a Hub dataset or a dataset "
                         f"folder, not to a file: drop {'them' if len(given) > 1 else 'it'} (data.split, "
                         f"data.revision in a run config)", file=resolved[0].spec)
    if options.revision and entry is None and all(s.kind == "file" or Path(s.spec).is_dir() for s in resolved):
        folder = next(s.spec for s in resolved if s.kind != "file")  # (files alone: refused above)
        raise InputError(f"--revision {options.revision!r} applies to a Hub dataset, and {folder} is a local folder, "
                         "read as it is: drop it (data.revision in a run config)", file=folder)
    _refuse_overwriting_inputs(resolved, outputs, options.dataset_info)
    in_folder = _entry_folder(resolved[0], options) if entry else None
    resolved = _named_apart(in_folder or [part for source in resolved for part in folder_files(source)])
    pairs_files = _refuse_other_artifacts(resolved)
    if pairs_files and (options.format is not None or options.column_map is not None or options.role_map):
        raise InputError("a perpair pairs file is read as the pairs it holds, every column kept: drop --format, the "
                         "--*-col options and --role-map (or give the data it was prepared from)",
                         file=sorted(pairs_files)[0])
    records: list[PairRecord] = []
    seen: dict[str, tuple] = {}  # pair_id -> the kept pair's scores
    reports = []
    rows_total = 0
    for source in resolved:
        report = SourceReport(describe(source))
        if source.spec in pairs_files:  # its pairs as they are: ratings, the original source rows and meta kept
            report.format = PAIRS_LAYOUT
        reports.append(report)
        label = source.label
        unseen = dict(_named_columns(options, entry, required=False))
        complete = True
        for number, value, text in iter_rows(source, report.source):
            if options.limit is not None and len(records) >= options.limit:
                complete, report.limited = False, True
                break
            if unseen and isinstance(value, dict):
                unseen = {c: who for c, who in unseen.items() if get(value, c, required=False) is MISSING}
            report.rows_read += 1
            rows_total += 1
            if on_progress and rows_total % 1000 == 0:
                on_progress(rows_total)
            record = _read_row(source, label, number, value, options, report, entry)
            if record is None:
                continue
            if report.format != PAIRS_LAYOUT:  # (a pairs file's pairs keep the rows they were prepared from)
                record.meta = text if text is not None else _meta(value)
            scores = (record.score_chosen, record.score_rejected, record.ratings_chosen, record.ratings_rejected)
            if record.pair_id in seen:
                # the same texts with other scores: the first pair's are kept, and the count says so
                report.duplicates.add("duplicate" if seen[record.pair_id] == scores else
                                      "duplicate_other_scores", number)
                continue
            seen[record.pair_id] = scores
            records.append(record)
            report.pairs_kept += 1
            for note in record.notes:
                report.notes.add(note, number)
        if unseen and complete:
            column, who = next(iter(unseen.items()))
            raise InputError(f"{who} names column '{column}', which no row has", file=source.spec, field=column)
    if not records:
        raise InputError(f"no pairs kept, nothing written: {_excluded_summary(reports)}",
                         file=", ".join(sources))
    extra = {"dataset_info": {"path": options.dataset_info, "dataset": options.dataset, "entry": entry.entry}} \
        if entry else {}
    return _write(records, outputs, options, reports, extra)


def _entry_folder(source: Source, options: PrepareOptions) -> list[Source] | None:
    """The files of a dataset_info entry whose ``file_name`` is a local folder, read as LLaMA-Factory reads them: every
    file in it (not in its subfolders), in one split, whatever their names (Datasets, which reads other folders, would
    put ``test.json`` in a split of its own, and leave its rows out). None for an entry read otherwise."""
    folder = Path(source.spec)
    if source.kind != "dataset" or source.spec.startswith("hub:") or not folder.is_dir():
        return None
    if source.split != "train":
        raise InputError(f"dataset '{options.dataset}': split {source.split!r}: LLaMA-Factory loads the files of a "
                         f"folder given by file_name as one split, 'train'", file=options.dataset_info, field="split")
    if options.revision:
        raise InputError(f"--revision {options.revision!r} applies to a Hub dataset, not to the folder dataset "
                         f"'{options.dataset}' names: drop it", file=source.spec)
    files = sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))
    if not files:
        raise InputError(f"dataset '{options.dataset}': the folder its file_name names holds no files",
                         file=source.spec)
    return [replace(resolve_source(str(path)), name=f"{folder.name}/{path.name}") for path in files]


def _excluded_summary(reports: list[SourceReport]) -> str:
    rows = sum(r.rows_read for r in reports)
    if rows == 0:
        return "the source has no rows"
    parts = []
    for label, attribute in (("malformed", "invalid"), ("degenerate", "degenerate"), ("duplicate", "duplicates")):
        counts: dict[str, int] = {}
        for report in reports:
            for reason, count in getattr(report, attribute).counts.items():
                counts[reason] = counts.get(reason, 0) + count
        if counts:
            parts.append(f"{label}: " + ", ".join(f"{reason} × {count}" for reason, count in sorted(counts.items())))
    return f"{rows:,} row{'s' if rows != 1 else ''} read, none kept ({'; '.join(parts)})"


def _output_paths(output: Path, options: PrepareOptions) -> dict[str, Path]:
    """The files prepare will write, checked before any reading so that a bad ``-o`` costs nothing."""
    outputs = {"train": output}
    if options.test_fraction > 0:
        outputs["test"] = output.with_name(output.name.removesuffix(".parquet") + ".test.parquet")
    for path in outputs.values():
        if path.is_dir():
            raise InputError("the output is a folder; name a file (e.g. pairs.parquet)", file=str(path))
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise InputError(f"cannot create the output: {parent} is a file, not a folder", file=str(path))
    return outputs


def _named_apart(sources: list[Source]) -> list[Source]:
    """The sources, none given twice (its every pair would be a duplicate, and its report would replace the
    first's), and files of the same name (``a/p.jsonl``, ``b/p.jsonl``) labelled by as much of their paths as
    tells them apart, so a pair's ``source`` and ``source_row`` name one row."""
    for index, source in enumerate(sources):
        for earlier in sources[:index]:
            same = earlier.spec == source.spec or (earlier.kind == source.kind == "file"
                                                   and Path(earlier.spec).samefile(source.spec))
            if same:
                raise InputError("this source is given twice", file=source.spec)
    given = [source.label for source in sources]
    labels = list(given)
    for index, source in enumerate(sources):
        if source.kind != "file" or given.count(source.label) == 1:
            continue
        parts = Path(source.spec).resolve().parts
        rivals = [Path(other.spec).resolve().parts for other in sources if other.kind == "file" and other is not source
                  and other.label == source.label]
        depth = next(n for n in range(2, len(parts) + 1) if all(other[-n:] != parts[-n:] for other in rivals))
        labels[index] = "/".join(parts[-depth:])
    return [replace(source, name=label) if label != source.label else source
            for source, label in zip(sources, labels, strict=True)]


def _meta(value: Any) -> str:
    """A decoded row as JSON text (its ``meta``); with ASCII escapes where it holds text that is not valid
    Unicode (a lone surrogate in a field no reader reads), which UTF-8 cannot store."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, default=str)
    return text


def _refuse_other_artifacts(sources: list[Source]) -> set[str]:
    """A perpair artifact other than pairs (a plan, annotations, their calls) given as data is named as what it is:
    its columns are no layout, and the error said only that the layout could not be told from them. Returns the
    sources that are perpair pairs files."""
    pairs_files = set()
    for source in sources:
        if source.kind != "file" or not source.spec.lower().endswith(".parquet"):
            continue
        try:
            kind = read_header(source.spec).get("kind")
        except PerpairError:  # another program's Parquet file: data, read as such
            continue
        if kind != KIND:
            raise InputError(f"a perpair {kind} file, not pairs or data of pairs: give the pairs file (perpair "
                             "prepare's output) or the data it was prepared from", file=source.spec)
        pairs_files.add(source.spec)
    return pairs_files


def _refuse_overwriting_inputs(sources: list[Source], outputs: dict[str, Path], dataset_info: str | None) -> None:
    """``-o`` may not name an input (a source file, the ``dataset_info.json``) nor lie inside a source folder,
    where the next run would read it as data."""
    for path in outputs.values():
        inputs = [source.spec for source in sources if source.kind == "file"] + ([dataset_info] if dataset_info
                                                                                  else [])
        if path.exists() and any(path.samefile(spec) for spec in inputs):
            raise InputError("the output is also an input; writing it would destroy the input, choose "
                             "another -o", file=str(path))
        for source in sources:
            folder = Path(source.spec)
            if source.kind == "dataset" and not source.spec.startswith("hub:") and folder.is_dir() \
                    and folder.resolve() in path.resolve().parents:
                raise InputError(f"the output is inside the input folder {source.spec}, whose next read would "
                                 f"take it for data; choose another -o", file=str(path))


def _named_columns(options: PrepareOptions, entry: DatasetEntry | None,
                   required: bool) -> list[tuple[str, str]]:
    """``(column, who named it)`` for the columns the user or a dataset_info entry named: the required
    ones (every row has them), or the optional ones (at least one row must have each)."""
    if entry is None:
        # a system column, as a dataset_info entry's, may be absent from rows without a system message
        return [(column, option) for column, option in options.named_columns()
                if (option != "--system-col") == required]
    keys = [key for key in entry.layout.named if (key in REQUIRED[entry.format]) == required]
    return [(entry.layout.columns[key], f"dataset '{options.dataset}' (columns.{key})")
            for key in keys if entry.layout.columns.get(key)]


def _check_named_columns(value: dict[str, Any], source: Source, number: int, options: PrepareOptions,
                         entry: DatasetEntry | None) -> None:
    """A required column the user (or a dataset_info entry) named must be in the first row: no fallback."""
    for column, option in _named_columns(options, entry, required=True):
        if get(value, column, required=False) is MISSING:
            raise InputError(f"{option} names column '{column}', which is not in the data"
                             f"{fields_hint(value)}", file=source.spec, row=number, field=column)


def _read_row(source: Source, label: str, number: int, value: Any, options: PrepareOptions,
              report: SourceReport, entry: DatasetEntry | None = None) -> PairRecord | None:
    """One row to a record; ``None`` when it is skipped (and counted). Raises on what must stop the run."""
    try:
        if isinstance(value, RowProblem):
            raise value
        if not isinstance(value, dict):
            raise RowProblem("not_an_object", f"row must be a JSON object, got {type(value).__name__}")
        if report.format is None:
            report.format = _layout_of(value, source, number, options, entry)
            _check_named_columns(value, source, number, options, entry)
        if report.columns is None:  # decided at the first row that has the responses
            report.columns = _source_columns(value, report.format, options, source, number)
        columns = report.columns or options.column_map or ColumnMap()
        if columns.prompt is None and get(value, "prompt", required=False) is not MISSING:
            raise RowProblem("unexpected_field:prompt", "the row has a prompt, but the source's first row has "
                                                        "none, so its pairs' prompts are the shared start of "
                                                        "their responses (TRL's implicit prompt)", "prompt")
        context = ReadContext(source=label, row=number, columns=columns, seed=options.seed,
                              role_map=options.role_map or {}, layout=entry.layout if entry else None)
        check_no_media(value)
        if entry is None and options.format is None and options.column_map is None and report.format != PAIRS_LAYOUT:
            _same_layout(value, report.format)  # (before the reader, whose refusal would say less)
        fields = _TakenFields(value)
        record = (read_pairs_row if report.format == PAIRS_LAYOUT else reader_for(report.format))(fields, context)
        for name in fields.unread():
            report.unread[name] = report.unread.get(name, 0) + 1
        if (markup := _template_markup(record, options.keep_template_markup)) is not None:
            raise markup
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


def _source_columns(value: dict[str, Any], layout: str, options: PrepareOptions, source: Source,
                    number: int) -> ColumnMap | None:
    """The columns of a source in a column layout (None for the others, and for a row without the chosen
    response, which cannot tell), decided once from its first row that has the responses. An
    implicit prompt (the responses' shared start, TRL's convention) only where that row has no prompt field,
    and then no row may have one. Responses written as strings share a start by chance as well (two answers
    "The answer is 4" / "The answer is 5"), so there an implicit prompt also needs a row that has no field
    that could be the prompt under another name (a misspelt ``promt``, a ``question`` column), or ``--format
    trl`` saying the data is TRL's implicit layout."""
    if layout not in COLUMN_FORMATS:
        return None
    columns = options.column_map or ColumnMap()
    chosen = get(value, columns.chosen, required=False)
    if chosen is MISSING:
        return None
    if not columns.prompt_optional or get(value, columns.prompt, required=False) is not MISSING:
        return replace(columns, prompt_optional=False)
    if options.format != "trl" and isinstance(chosen, str):
        read = {c.split(".")[0] for c in (columns.chosen, columns.rejected, columns.score_chosen,
                                          columns.score_rejected, columns.system) if c}
        others = sorted(str(k) for k in value if k not in read and k not in IMPLICIT_PROMPT_ALSO)
        if others:
            shown = ", ".join(others[:8]) + (", …" if len(others) > 8 else "")
            raise InputError(f"the row has no 'prompt' field, and fields that are not read ({shown}): name the "
                             f"prompt's column with --prompt-col, or give --format trl to take each pair's prompt "
                             f"as the shared start of its two responses (TRL's implicit prompt)",
                             file=source.spec, row=number)
    return replace(columns, prompt=None)


# Layouts one reader reads alike: a TRL source whose first row has no scores reads those of later rows.
SAME_LAYOUT = {"ultrafeedback": "trl"}


def _same_layout(value: dict[str, Any], layout: str) -> None:
    """A row of a source whose layout was detected (from its first row) that is in another layout, which the
    source's reader read all the same (a transcript cut before the final turns, ``prompt`` ending
    ``"\\n\\nAssistant:"``, in a TRL file: one user message holding the transcript), is malformed: a file that mixes
    layouts row by row would give such rows wrong pairs."""
    found = _detected(value)
    if found is not None and SAME_LAYOUT.get(found, found) != SAME_LAYOUT.get(layout, layout):
        raise RowProblem("other_layout", f"the row is in the {found} layout, and the source in the {layout} layout "
                                         f"(from its first row), as which it would be read wrongly: give the rows of "
                                         f"each layout their own file")


# Where each detected layout takes its prompt from; a row that also holds another layout's prompt field is not told
# apart by its fields (a TRL file with an 'instruction' column beside 'prompt' was read as alpaca, 'prompt' unread).
PROMPT_FIELDS = {"alpaca": "instruction", "sharegpt": "conversations"}
RIVAL_PROMPTS = {"alpaca": ("prompt",), "sharegpt": ("prompt", "instruction")}


def _layout_of(value: dict[str, Any], source: Source, number: int, options: PrepareOptions,
               entry: DatasetEntry | None) -> str:
    if entry is not None:
        return entry.format
    if options.format:
        return options.format
    if options.column_map:
        # HH-RLHF transcripts with reward columns: read as transcripts, not as one user message each
        if options.names_only_scores and (found := _detected(value)) in SCORE_COLUMN_FORMATS:
            return found
        return "columns"
    try:
        found = detect_format(value)
    except InputError as exc:   # unpaired (KTO) rows: the same message, placed at this row
        raise InputError(exc.problem, file=source.spec, row=number) from None
    if found is None:
        raise InputError(
            f"cannot tell the layout from the fields {sorted(value)[:12]}; name it with --format "
            f"({', '.join(FORMATS)}) or map columns with --prompt-col/--chosen-col/--rejected-col",
            file=source.spec, row=number)
    if rivals := [name for name in RIVAL_PROMPTS.get(found, ()) if value.get(name) is not None]:
        own = PROMPT_FIELDS[found]
        other = detect_format({k: v for k, v in value.items() if k != own and k not in rivals[1:]}) or "columns"
        raise InputError(f"the row has both '{own}' (the {found} layout's prompt) and '{rivals[0]}': which holds the "
                         f"prompt is not clear; name the layout with --format {found} (prompt from '{own}') or "
                         f"--format {other} (prompt from '{rivals[0]}')", file=source.spec, row=number)
    return found


def _detected(value: dict[str, Any]) -> str | None:
    try:
        return detect_format(value)
    except InputError:  # (unpaired rows: refused where the layout they are read as finds no pair)
        return None


def _write(records: list[PairRecord], outputs: dict[str, Path], options: PrepareOptions,
           reports: list[SourceReport], extra: dict[str, Any]) -> PrepareResult:
    splits: dict[str, list[PairRecord]] = {"train": records}
    if options.test_fraction > 0:
        test = [r for r in records if in_test_split(r.pair_id, options.seed, options.test_fraction)]
        test_ids = {r.pair_id for r in test}
        splits = {"train": [r for r in records if r.pair_id not in test_ids], "test": test}
        for name, part in splits.items():
            if not part:
                raise InputError(f"the {name} split is empty ({len(records):,} pairs, --test-fraction "
                                 f"{options.test_fraction}); nothing written")
    provenance_base = {
        "reader": "perpair.data.prepare",
        "options": options.model_dump(),
        "sources": [report.as_dict() for report in reports],
        "counts": {name: len(part) for name, part in splits.items()},
        **extra,
    }
    # The train and test files belong together: both are written beside their names first and renamed once
    # both are complete, so a failure (or Ctrl-C) leaves the files of a run before as they were.
    staged: dict[str, Path] = {}
    try:
        for name, part in splits.items():
            staged[name] = temporary_beside(outputs[name])
            write_artifact(staged[name], records_to_table(part), kind=KIND, schema_version=SCHEMA_VERSION,
                           provenance={**provenance_base, "split": name})
        for name, path in staged.items():
            os.replace(path, outputs[name])
    except OSError as exc:
        raise InputError(f"cannot write it ({exc.strerror or exc})", file=str(outputs[list(staged)[-1]])) from None
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    return PrepareResult(outputs=outputs, counts=provenance_base["counts"], sources=reports)
