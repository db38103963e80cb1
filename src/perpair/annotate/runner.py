"""The annotate stage's entry points: :func:`annotate` (one run, resumable) and :func:`merge` (shards).

A run lists its calls (pair × teacher × template), asks teachers only for calls the cache lacks, commits
every answer to the cache as it arrives, and then rebuilds both artifacts from the cache:

- the aggregated per-pair table at ``output`` (kind ``annotations``, schema version 1, read by the plan
  stage through :func:`perpair.annotate.schema.read_annotations`), and
- the per-call table beside it (``NAME.calls.parquet``, kind ``annotation_calls``): one row per pair and
  teacher call, with the raw response, attempts, re-asks, usage, and the reason of any failure.

Rows are sorted by pair id, teacher and template, and hold nothing that depends on timing, so a resumed run
writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from perpair.annotate.aggregate import aggregate
from perpair.annotate.cache import AnswerCache, CallRecord
from perpair.annotate.config import AnnotateConfig
from perpair.annotate.schema import KIND, SCHEMA_VERSION, UNKNOWN, read_annotations
from perpair.annotate.teachers import RATING_COLUMNS, Call, RatingsTeacher, call_key, make_teacher
from perpair.annotate.templates import TEMPLATES, get_template, is_swapped
from perpair.artifacts import (
    check_output_file,
    file_sha256,
    missing_field,
    read_artifact,
    refuse_other_artifact,
    refuse_overwrite,
    write_artifact,
)
from perpair.data import read_pairs
from perpair.errors import InputError, PerpairError

CALLS_KIND = "annotation_calls"
CALLS_SCHEMA_VERSION = 1
LOCAL_CHUNK_BATCHES = 4  # local-teacher batches per cache commit: a kill loses at most this much work
PAIR_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected",
                "ratings_chosen", "ratings_rejected")

CALLS_SCHEMA = pa.schema([
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("teacher", pa.string(), nullable=False),
    pa.field("template", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("category", pa.string()),
    pa.field("magnitude", pa.float64()),
    pa.field("confidence", pa.float64()),
    pa.field("rationale", pa.string()),
    pa.field("preferred", pa.string()),
    pa.field("gap_category", pa.string()),
    pa.field("swapped", pa.bool_()),
    pa.field("reason", pa.string()),
    pa.field("raw_response", pa.string()),
    pa.field("attempts", pa.int64()),
    pa.field("reasks", pa.int64()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("cost", pa.float64()),
])


def calls_path(output: str | os.PathLike) -> Path:
    """Where the per-call table of the aggregated table ``output`` lives."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".parquet") + ".calls.parquet")


def default_cache_path(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name.removesuffix(".parquet") + ".cache.sqlite")


@dataclass
class Progress:
    """What a progress display shows; ``done`` counts cached calls too."""

    total: int
    done: int = 0
    cached: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    tokens: int = 0
    cost: float = 0.0
    phase: str = ""


@dataclass
class AnnotateResult:
    output: Path
    calls_output: Path
    pairs: int
    calls: int
    cached: int  # calls found in the cache at the start
    status: dict[str, int]  # calls by status (ok, failed, unknown)
    annotated_pairs: int  # pairs with a category
    prompt_tokens: int
    completion_tokens: int
    cost: float
    requests: int  # HTTP requests this run sent
    elapsed_s: float
    failures: dict[str, int] = field(default_factory=dict)  # reason -> count
    unanswered: dict[str, int] = field(default_factory=dict)  # reason -> count of calls a teacher could not answer
    retried: int = 0  # cached failures asked again (--retry-failed)
    unknown_pairs: int = 0  # pairs whose category is "unknown" (a gap of known size only)
    min_valid_share: float = 0.0
    # in an ensemble: teacher id (and template, for a teacher of several) -> (its valid calls, its calls)
    teacher_calls: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def shortfall(self) -> str | None:
        """Why the run did not give the user what they asked for, or None: see :func:`shortfall`."""
        return shortfall(self.pairs, self.annotated_pairs, self.min_valid_share, self.teacher_calls)


def shortfall(pairs: int, annotated: int, min_valid_share: float,
              by_teacher: dict[str, tuple[int, int]], setting: str = "--min-valid, min_valid_share") -> str | None:
    """Why annotations are not what the user asked for (exit 3), or None: no pair, or fewer than ``min_valid_share``
    of them, annotated; or, in an ensemble, a teacher (or template) with no valid answer at all, or with valid answers
    in fewer than ``min_valid_share`` of its calls (the pairs' annotations are then not the ensemble's: any teacher's
    category counts a pair as annotated). ``by_teacher``: :func:`teacher_calls`; ``setting``: the names the user set the
    share by, as the message says them."""
    if pairs == 0:
        return None
    share = annotated / pairs
    if annotated == 0:
        return f"no pair of {pairs:,} got a valid annotation"
    if share < min_valid_share:
        return (f"{annotated:,} of {pairs:,} pairs ({share:.1%}) got a valid annotation, "
                f"fewer than the {min_valid_share:.1%} asked for ({setting})")
    short = []
    for teacher, (valid, calls) in by_teacher.items():
        if not valid:
            short.append(f"teacher {teacher} gave no valid annotation in {calls:,} calls (the pairs' annotations "
                         "come from the rest of the ensemble alone)")
        elif valid / calls < min_valid_share:
            short.append(f"teacher {teacher} gave a valid annotation in {valid:,} of {calls:,} calls "
                         f"({valid / calls:.1%}), fewer than the {min_valid_share:.1%} asked for ({setting}; "
                         "the other pairs' annotations come from the rest of the ensemble alone)")
    return "; ".join(short) or None


def teacher_calls(rows: Iterable[tuple[str, str, str]]) -> dict[str, tuple[int, int]]:
    """From the calls' (teacher, template, status): each teacher's (and template's, for a teacher of several) valid
    calls and calls, by teacher id and template. Empty for one teacher of one template: its share is the pairs'."""
    counts: dict[tuple[str, str], tuple[int, int]] = {}
    for teacher, template, status in rows:
        valid, calls = counts.get((teacher, template), (0, 0))
        counts[teacher, template] = (valid + (status == "ok"), calls + 1)
    if len(counts) < 2:
        return {}
    templates = Counter(teacher for teacher, _ in counts)
    return {(f"{teacher} with template {template}" if templates[teacher] > 1 else teacher): count
            for (teacher, template), count in sorted(counts.items())}


def annotate(pairs_path: str | os.PathLike, config: AnnotateConfig, output: str | os.PathLike, *,
             cache_path: str | os.PathLike | None = None, on_progress: Callable[[Progress], None] | None = None,
             teacher_overrides: dict[str, dict[str, Any]] | None = None) -> AnnotateResult:
    """Annotate the pairs in ``pairs_path`` with ``config``'s teachers; write ``output`` and its calls table.

    ``teacher_overrides`` maps a teacher id to extra constructor arguments (tests inject a model or an
    HTTP transport).
    """
    started = time.monotonic()
    output = Path(output)
    check_output_file(output, "-o/--output", "ann.parquet")  # a folder has no name to put the others beside
    cache_path = Path(cache_path or default_cache_path(output))
    for name, path in (("-o/--output", output), ("calls table of -o/--output", calls_path(output))):
        if cache_path.resolve() == path.resolve():  # the artifact would replace every answer the run paid for
            raise PerpairError(f"--cache {cache_path} is the {name}: writing it would destroy the answer cache; "
                               "name another --cache (or leave it out: NAME.cache.sqlite beside -o)")
    refuse_overwrite({"output": output, "calls table": calls_path(output), "cache": cache_path},
                     {"pairs file": pairs_path})
    refuse_other_artifact(output, "-o/--output", KIND)  # (after the input check, whose words say more)
    check_output_file(calls_path(output), "the calls table of -o/--output", "ann.parquet")
    check_output_file(cache_path, "--cache", "ann.cache.sqlite")
    table, _ = read_pairs(str(pairs_path))
    pairs_sha = file_sha256(pairs_path)
    pairs = _select_pairs(table, config, str(pairs_path))
    teachers = [make_teacher(t, **(teacher_overrides or {}).get(t.id, {})) for t in config.teachers]
    for teacher in teachers:  # before the cache exists: a bad teacher leaves nothing behind
        teacher.check()
    _refuse_idle_weight(teachers, table if config.limit is None else table.slice(0, config.limit))

    calls: list[tuple[Any, Call]] = []
    for pair in pairs:
        for teacher in teachers:
            for template_id in teacher.templates:
                material = teacher.key_material(pair) if hasattr(teacher, "key_material") else None
                key = call_key(pair["pair_id"], teacher.id, teacher.fingerprint, template_id, config.seed, material)
                calls.append((teacher, Call(key=key, pair_id=pair["pair_id"], teacher=teacher.id,
                                            template=template_id, swapped=is_swapped(pair["pair_id"], template_id,
                                                                                     config.seed), pair=pair)))

    cache = AnswerCache(cache_path)
    try:
        cached = cache.get_many([c.key for _, c in calls])
        cached.update(_legacy_answers(cache, [(t, c) for t, c in calls if c.key not in cached], config.seed))
        todo = [(t, c) for t, c in calls
                if c.key not in cached or (config.retry_failed and cached[c.key].status == "failed")
                or not getattr(t, "reusable", lambda _: True)(cached[c.key])]
        retried = sum(1 for _, c in todo if c.key in cached)
        progress = Progress(total=len(calls), done=len(calls) - len(todo), cached=len(calls) - len(todo))
        report = on_progress or (lambda _: None)
        report(progress)
        api_stats = []
        for teacher in teachers:
            work = [c for t, c in todo if t is teacher]
            if not work:
                continue
            progress.phase = teacher.id
            if teacher.asynchronous:
                api_stats.append(teacher.client.stats)
                asyncio.run(_run_async(teacher, work, cache, progress, report))
            elif hasattr(teacher, "annotate_batch"):
                chunk = teacher.batch_size * LOCAL_CHUNK_BATCHES
                for start in range(0, len(work), chunk):
                    _save(cache, teacher.annotate_batch(work[start:start + chunk]), progress, report)
            else:
                for start in range(0, len(work), 1000):
                    _save(cache, [teacher.annotate(c) for c in work[start:start + 1000]], progress, report)
        records = cache.get_many([c.key for _, c in calls])
    finally:
        cache.close()
    missing = [c.key for _, c in calls if c.key not in records]
    if missing:  # only a bug gets here: every call was either cached or just written
        raise PerpairError(f"{len(missing)} calls have no cached answer after the run (first: {missing[0]})")
    ordered = sorted((records[c.key] for _, c in calls), key=lambda r: (r.pair_id, r.teacher, r.template))
    pair_ids = sorted(p["pair_id"] for p in pairs)
    weights = {t.id: t.weight for t in teachers}
    aggregated = aggregate(pair_ids, ordered, weights)
    calls_table = pa.Table.from_pylist([asdict(r) for r in ordered], schema=CALLS_SCHEMA)

    status: dict[str, int] = {}
    failures: dict[str, int] = {}
    unanswered: dict[str, int] = {}
    for record in ordered:
        status[record.status] = status.get(record.status, 0) + 1
        if record.status == "failed":
            failures[record.reason or "?"] = failures.get(record.reason or "?", 0) + 1
        elif record.status == "unknown":
            unanswered[record.reason or "?"] = unanswered.get(record.reason or "?", 0) + 1
    usage = {"prompt_tokens": sum(r.prompt_tokens for r in ordered),
             "completion_tokens": sum(r.completion_tokens for r in ordered),
             "cost": round(sum(r.cost for r in ordered), 10)}
    categories = aggregated.column("category").to_pylist()
    annotated = sum(1 for c in categories if c is not None)
    provenance = {
        "pairs_sha256": pairs_sha,
        "pairs_file": Path(pairs_path).name,
        "teachers": [_describe(t.config, t) for t in teachers],
        "templates": {tid: _template_sha(tid) for tid in sorted({c.template for _, c in calls})},
        "seed": config.seed,
        "limit": config.limit,
        "shard": config.shard,
        "counts": {"pairs": len(pairs), "calls": len(calls), "annotated_pairs": annotated, **status},
        "usage": usage,
    }
    write_artifact(output, aggregated, kind=KIND, schema_version=SCHEMA_VERSION, provenance=provenance)
    write_artifact(calls_path(output), calls_table, kind=CALLS_KIND, schema_version=CALLS_SCHEMA_VERSION,
                   provenance=provenance)
    return AnnotateResult(
        output=output, calls_output=calls_path(output), pairs=len(pairs), calls=len(calls),
        cached=progress.cached, status=status, annotated_pairs=annotated, prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"], cost=usage["cost"],
        requests=sum(s.requests for s in api_stats), elapsed_s=time.monotonic() - started, failures=failures,
        retried=retried, unknown_pairs=categories.count(UNKNOWN), min_valid_share=config.min_valid_share,
        unanswered=unanswered, teacher_calls=teacher_calls((r.teacher, r.template, r.status) for r in ordered))


def _refuse_idle_weight(teachers: list, table: pa.Table) -> None:
    """Refuse a ``weight`` on the ratings teacher of an ensemble where it would change nothing: where the pairs give it
    no category to vote with (overall scores only, each in favour of the chosen response), its answers are all
    ``unknown``, which count only where no other teacher names a category (:mod:`perpair.annotate.aggregate`), and
    a single vote weighs the same whatever its weight. Decided on the pairs of the file (up to ``limit``), not of
    one shard, so that every shard of a run decides alike."""
    ratings = [t for t in teachers if isinstance(t, RatingsTeacher)]
    if len(ratings) != 1 or len(teachers) < 2 or "weight" not in ratings[0].config.model_fields_set:
        return  # (two ratings teachers weigh their `unknown` votes against each other where no model names one)
    teacher = ratings[0]
    columns = [c for c in ("pair_id", *RATING_COLUMNS) if c in table.column_names]
    for pair in table.select(columns).to_pylist():
        call = Call(key="", pair_id=pair["pair_id"], teacher=teacher.id, template=teacher.templates[0],
                    swapped=False, pair=pair)
        record = teacher.annotate(call)
        if record.status == "ok" and record.category != UNKNOWN:
            return
    if table.num_rows:
        raise PerpairError(
            f"teacher {teacher.id}: weight {teacher.weight:g} would change nothing: it names no category for any of "
            f"the {table.num_rows:,} pairs (they hold overall scores only, each in favour of the chosen response, or "
            "no scores), and its 'unknown' answers count only where no other teacher names a category, whatever "
            "their weight; drop the weight (its answers still stand in where the other teachers give none)")


def _select_pairs(table: pa.Table, config: AnnotateConfig, file: str) -> list[dict[str, Any]]:
    first: dict[str, int] = {}
    for row, pair_id in enumerate(table.column("pair_id").to_pylist(), start=1):
        if pair_id in first:  # its annotations would hold the pair twice, which the plan stage refuses
            raise InputError(f"pair {pair_id} appears twice (rows {first[pair_id]} and {row}); annotations need "
                             "unique pair ids (perpair prepare keeps the first of identical pairs)",
                             file=file, row=row, field="pair_id")
        first[pair_id] = row
    columns = [c for c in PAIR_COLUMNS if c in table.column_names]
    if config.limit is not None:
        table = table.slice(0, config.limit)  # the first N of the file, then the shard's share of them
    pairs = table.select(columns).to_pylist()
    if (shard := config.shard_index) is not None:
        index, count = shard
        chosen = []
        for row, pair in enumerate(pairs, start=1):
            try:
                number = int(pair["pair_id"], 16)
            except ValueError:
                raise InputError(f"pair_id {pair['pair_id']!r} is not hexadecimal; --shard splits pairs by the "
                                 "hex ids perpair prepare writes (re-prepare the file, or run without --shard)",
                                 file=file, row=row, field="pair_id") from None
            if number % count == index:
                chosen.append(pair)
        pairs = chosen
    return pairs


def _save(cache: AnswerCache, records: list[CallRecord], progress: Progress, report) -> None:
    cache.put_many(records)
    progress.done += len(records)
    progress.failed += sum(1 for r in records if r.status == "failed")
    report(progress)


async def _run_async(teacher, work: list[Call], cache: AnswerCache, progress: Progress, report) -> None:
    """``concurrency`` workers pull calls; each answer is committed before the worker takes the next call."""
    queue: asyncio.Queue[Call] = asyncio.Queue()
    for call in work:
        queue.put_nowait(call)
    stats = teacher.client.stats
    base = (progress.requests, progress.retries, progress.tokens, progress.cost)

    async def worker() -> None:
        while True:
            try:
                call = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            record = await teacher.annotate(call)
            cache.put(record)  # committed now: a kill after this line never repeats this call
            progress.done += 1
            progress.failed += record.status == "failed"
            progress.requests, progress.retries = base[0] + stats.requests, base[1] + stats.retries
            progress.tokens, progress.cost = base[2] + stats.tokens, base[3] + stats.cost
            report(progress)

    async with teacher.client:
        workers = [asyncio.create_task(worker()) for _ in range(min(teacher.client.config.concurrency, len(work)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()


# A teacher's settings that shape no answer (the bound on re-asks, the prices the cost is counted at): shards that
# differ in them merge (a shard re-run with more re-asks to recover its failures, say).
NOT_ANSWERS = frozenset({"max_reasks", "price_prompt_per_1k", "price_completion_per_1k"})


def _answering(value: Any, key: str) -> Any:
    """A provenance entry with the teachers' settings of :data:`NOT_ANSWERS` left out."""
    if key != "teachers" or not isinstance(value, list):
        return value
    return [{k: v for k, v in t.items() if k not in NOT_ANSWERS} if isinstance(t, dict) else t for t in value]


def _legacy_answers(cache: AnswerCache, missing: list[tuple[Any, Call]], seed: int) -> dict[str, CallRecord]:
    """The answers of ``missing`` calls cached under a teacher's keys of before (``legacy_fingerprints``: an API
    teacher's held ``max_reasks`` until 7 Dec 2026, whatever value the run that wrote them had), stored again under
    today's keys; of several, a valid answer first, else the failure with the most re-asks."""
    missing = [(t, c) for t, c in missing if hasattr(t, "legacy_fingerprints")]
    if not missing or not cache.count():  # (a new cache: nothing of before to find)
        return {}
    legacy = {call_key(c.pair_id, t.id, fingerprint, c.template, seed,
                       t.key_material(c.pair) if hasattr(t, "key_material") else None): c.key
              for t, c in missing for fingerprint in t.legacy_fingerprints}
    found: dict[str, CallRecord] = {}
    for key, record in cache.get_many(list(legacy)).items():
        best = found.get(legacy[key])
        if best is None or (record.status == "ok", record.reasks) > (best.status == "ok", best.reasks):
            found[legacy[key]] = replace(record, key=legacy[key])
    cache.put_many(found.values())
    return found


# How a teacher is reached, not what it answers: left out of provenance, so a rerun against another server,
# or shards run against different servers, carry the same provenance (and merge).
TRANSPORT_SETTINGS = frozenset({"base_urls", "concurrency", "timeout_s", "connect_timeout_s", "max_retries",
                                "backoff_initial_s", "backoff_max_s", "retry_after_max_s", "api_key_env",
                                "batch_size", "threads"})


# What a teacher's settings do not say of its answers: the contents of a local teacher's model (weights; tokenizer and
# chat template). In provenance, so that shards annotated by other models at the same path (another machine's copy,
# a retraining between shards) do not merge.
CONTENT_IDENTITY = ("weights", "tokenizer")


def _describe(config, teacher) -> dict[str, Any]:
    # The settings that shape the answers (never a key: configs hold at most the variable's name), plus the id.
    described = {"id": config.id, **config.model_dump(mode="json", exclude_none=True, exclude=TRANSPORT_SETTINGS)}
    return {**described, **{k: teacher.fingerprint[k] for k in CONTENT_IDENTITY if k in teacher.fingerprint}}


def _template_sha(template_id: str) -> str | None:
    base = template_id.partition("@")[0]
    return get_template(template_id).sha256 if base in TEMPLATES else None


@dataclass
class MergeResult:
    output: Path
    calls_output: Path
    shards: int
    pairs: int
    calls: int
    status: dict[str, int]  # calls by status (ok, failed, unknown)
    annotated_pairs: int  # pairs with a category
    unanswered: dict[str, int] = field(default_factory=dict)  # reason -> count of calls a teacher could not answer
    min_valid_share: float = 0.0
    teacher_calls: dict[str, tuple[int, int]] = field(default_factory=dict)  # as AnnotateResult's

    @property
    def shortfall(self) -> str | None:
        """What a run of the merged shards' pairs would have exited 3 for, or None: see :func:`shortfall`."""
        return shortfall(self.pairs, self.annotated_pairs, self.min_valid_share, self.teacher_calls, "--min-valid")


def merge(outputs: list[str | os.PathLike], target: str | os.PathLike, *, min_valid_share: float = 0.0) -> MergeResult:
    """Join the outputs of ``--shard i/n`` runs (each with its calls table beside it) into ``target``.

    Refuses shards of different pairs files or settings, a missing or repeated shard, and overlapping pairs. The
    result's :attr:`MergeResult.shortfall` applies a run's rule (``min_valid_share``) to the merged pairs: a
    shard whose calls all failed makes a merge short as it would have made one run short.
    """
    if not outputs:
        raise PerpairError("merge needs at least one annotations file")
    if not 0 <= min_valid_share <= 1:
        raise PerpairError(f"--min-valid {min_valid_share:g} is not a share of the pairs (0 to 1)")
    check_output_file(Path(target), "-o/--output", "ann.parquet", kind=KIND)
    refuse_overwrite({"output": target, "calls table": calls_path(target)},
                     {f"shard {path}": path for path in outputs})
    check_output_file(calls_path(target), "the calls table of -o/--output", "ann.parquet")
    aggregated, calls, provenances = [], [], []
    for path in outputs:
        read_annotations(path)  # its columns and values checked (files of others were pyarrow's traceback)
        table, provenance = read_artifact(path, kind=KIND, schema_version=SCHEMA_VERSION)  # as written: not cast
        call_table, _ = read_artifact(calls_path(path), kind=CALLS_KIND, schema_version=CALLS_SCHEMA_VERSION)
        wrong = missing_field(call_table, CALLS_SCHEMA)
        if wrong is not None:
            raise InputError(f"not a calls table: no column '{wrong.name}' of {wrong.type} values",
                             file=str(calls_path(path)))
        for file, held, first, first_file in ((path, table, aggregated, outputs[0]),
                                              (calls_path(path), call_table, calls, calls_path(outputs[0]))):
            if first and not held.schema.remove_metadata().equals(first[0].schema.remove_metadata()):
                raise InputError(f"its columns differ from those of {first_file}", file=str(file))
        aggregated.append(table)
        calls.append(call_table)
        provenances.append(provenance)
    first = provenances[0]
    for path, provenance in zip(outputs, provenances, strict=True):
        for key in ("pairs_sha256", "teachers", "templates", "seed", "limit"):
            if _answering(provenance.get(key), key) != _answering(first.get(key), key):
                what = " (their settings, or a local teacher's model files)" if key == "teachers" else ""
                raise PerpairError(f"file {path}: its {key}{what} differs from {outputs[0]}'s; shards must come from "
                                   "one pairs file and one configuration")
    shards = [p.get("shard") for p in provenances]
    if any(s is None for s in shards):
        raise PerpairError("merge joins the outputs of --shard runs; one file is not a shard")
    for path, shard in zip(outputs, shards, strict=True):
        if not (isinstance(shard, str) and re.fullmatch(r"\d+/\d+", shard)):
            raise InputError(f"its provenance's shard {shard!r} is not i/n", file=str(path))
    counts = {int(s.split("/")[1]) for s in shards}
    indexes = sorted(int(s.split("/")[0]) for s in shards)
    if len(counts) != 1 or indexes != list(range(counts.pop())):
        raise PerpairError(f"shards {', '.join(shards)} are not exactly 0/n … n-1/n")
    merged = pa.concat_tables(aggregated).sort_by("pair_id")
    merged_calls = pa.concat_tables(calls).sort_by([("pair_id", "ascending"), ("teacher", "ascending"),
                                                    ("template", "ascending")])
    ids = merged.column("pair_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise PerpairError("the shards overlap: a pair is annotated in two of them")
    status: dict[str, int] = {}
    unanswered: dict[str, int] = {}
    rows = merged_calls.select(["teacher", "template", "status", "reason"]).to_pylist()
    for row in rows:
        status[row["status"]] = status.get(row["status"], 0) + 1
        if row["status"] == "unknown":
            unanswered[row["reason"] or "?"] = unanswered.get(row["reason"] or "?", 0) + 1
    annotated = sum(1 for c in merged.column("category").to_pylist() if c)
    usage = {key: sum(p["usage"][key] for p in provenances) for key in first["usage"]}
    provenance = {**{k: v for k, v in first.items() if k not in ("shard", "counts", "usage")},
                  "merged_from": [str(s) for s in shards],
                  "counts": {"pairs": len(ids), "calls": merged_calls.num_rows, "annotated_pairs": annotated, **status},
                  "usage": usage, "shard": None}
    write_artifact(target, merged, kind=KIND, schema_version=SCHEMA_VERSION, provenance=provenance)
    write_artifact(calls_path(target), merged_calls, kind=CALLS_KIND, schema_version=CALLS_SCHEMA_VERSION,
                   provenance=provenance)
    return MergeResult(
        output=Path(target), calls_output=calls_path(target), shards=len(outputs), pairs=len(ids),
        calls=merged_calls.num_rows, status=status, annotated_pairs=annotated, unanswered=unanswered,
        min_valid_share=min_valid_share,
        teacher_calls=teacher_calls((r["teacher"], r["template"], r["status"]) for r in rows))
