"""Reference log-probabilities, computed once and cached on disk, so training holds no reference model.

The cache is a Parquet artifact (kind ``reference_logps``; columns of
:data:`perpair.plan.difficulty.REFERENCE_LOGPS_SCHEMA`, the table the plan stage reads for reference margins) named by
the SHA-256 of its key: the reference model's files, the tokenizer, the pairs file and the length settings.
Change any of them and the key changes. A run that needs pairs the cache lacks computes only those and
rewrites the file with the union, so runs over growing prefixes of a corpus reuse each other's work.
Values are always stored in the pair's own orientation (chosen as in the pairs file).

A pass saves what it computed as it goes (at most every :data:`SAVE_SECONDS`, and when it stops on an error or
Ctrl-C): each process into a part file of its own beside the cache file, without a collective (the processes'
shares end at different times), read with the file by every reader and folded into it at the end of the pass. A
pass killed (preempted, out of memory) and run again computes only the pairs not yet saved.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from perpair.artifacts import file_sha256, write_artifact
from perpair.models import model_fingerprint, tokenizer_fingerprint
from perpair.paths import cache_root
from perpair.plan.difficulty import logps_table
from perpair.plan.reference import part_files, read_cache
from perpair.train.logprobs import logps_of_tokenized
from perpair.train.tokenize import TokenizedPair

KIND = "reference_logps"
SCHEMA_VERSION = 1
KEY_VERSION = 2  # bump when the way log-probs are computed changes (2: logit scales applied, e.g. Cohere, Granite)
# bf16 keys only: what autocast runs in which dtype. 2: the output projection in bf16 (as autocast runs an
# nn.Linear head), the CPU tree attention in fp32; the bf16 values of 1 are other numbers. fp32 keys are unchanged.
AUTOCAST_RULES = 2
# A killed pass loses at most this much work (and the forward under way). Each save rewrites the process's values
# so far: for 60k pairs a 2 MB part file, 0.04 s, a 0.07% cost at this period; one process whose pass is shorter
# writes none (the cache file at its end only): the pass of a small run is as fast as it was.
SAVE_SECONDS = 60.0


def cache_key(*, model: str, tokenizer: str, pairs_sha256: str, max_length: int,
              ld_alpha: float | None = None, precision: str = "fp32") -> dict[str, object]:
    key: dict[str, object] = {"version": KEY_VERSION, "model": model, "tokenizer": tokenizer,
                              "pairs_sha256": pairs_sha256, "max_length": max_length, "truncation": "keep_start",
                              "template": "trl"}
    if ld_alpha is not None:  # LD-DPO's weighted sums are other values; plain runs keep their existing keys
        key["ld_alpha"] = ld_alpha
    if precision != "fp32":  # bf16 log-probs differ by up to ~0.5%: never served to an fp32 run (or back)
        key["precision"] = precision
        key["autocast_rules"] = AUTOCAST_RULES
    return key


def cache_path(cache_dir: Path, key: dict[str, object]) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / f"{name}.parquet"


def cache_file(cache_dir: Path, model: str, tokenizer, pairs: str | Path, max_length: int, *,
               ld_alpha: float | None = None, precision: str = "fp32") -> tuple[Path, dict[str, object]]:
    """The cache file in ``cache_dir`` of the reference model ``model`` (a resolved folder or Hub id) over the pairs
    file ``pairs``, and its key (:func:`cache_key`)."""
    key = cache_key(model=model_fingerprint(model), tokenizer=tokenizer_fingerprint(tokenizer),
                    pairs_sha256=file_sha256(pairs), max_length=max_length, ld_alpha=ld_alpha, precision=precision)
    return cache_path(cache_dir, key), key


def default_cache_dir() -> Path:
    return cache_root() / "reference"


def load_cached(path: Path) -> dict[str, tuple[float, int, float, int]]:
    """The values cached at ``path`` (pair id → chosen log-prob, tokens, rejected log-prob, tokens), with those of
    its part files (a stopped pass's)."""
    return read_cache(path)[0]


def save_cached(path: Path, key: dict[str, object], values: dict[str, tuple[float, int, float, int]],
                left_out: Collection[str] = (), model_name: str | None = None) -> None:
    """Write the cache file (or a part) ``path``; ``model_name``: the model as the run named it (its key holds a
    folder's content hash), which a plan reading the cache prints."""
    ids = sorted(values)
    rows = [values[i] for i in ids]
    table = logps_table(ids, *([r[k] for r in rows] for k in range(4)))
    # (recorded when empty too: a file without the record is an earlier perpair's, see read_reference_logps)
    provenance = {"key": key, "left_out": sorted(left_out)}
    if model_name is not None:
        provenance["model_name"] = model_name
    write_artifact(path, table, kind=KIND, schema_version=SCHEMA_VERSION, provenance=provenance)


def reference_logps(path: Path, key: dict[str, object], pair_ids: Sequence[str],
                    tokenized: Sequence[TokenizedPair], load_model, *, device: torch.device,
                    tokens_per_forward: int, chunk_size: int, autocast_dtype: torch.dtype | None = None,
                    on_progress=None, ld_alpha: float | None = None,
                    deferred: frozenset[str] = frozenset(), share: tuple[int, int] = (0, 1),
                    agree: Callable[[dict], dict] | None = None, gather: Callable[[dict], dict] | None = None,
                    write: bool = True, left_out: Collection[str] = (),
                    model_name: str | None = None) -> tuple[np.ndarray, int]:
    """``[n, 2]`` reference log-probs (chosen, rejected) of ``pair_ids`` (tokenized in their own orientation),
    from the cache at ``path``; the missing ones are computed with ``load_model()`` and added to the cache, except
    those of ``deferred`` (the caller gets them otherwise), whose rows are NaN. ``on_progress(done, to_compute)``
    follows the computation. ``left_out``: ids of pairs that have no value (their prompt alone fills max_length),
    recorded in the cache, so that a plan tells them from pairs not computed yet. Several processes: ``agree`` gives
    every process the first one's reading of the cache (another run may write it between their reads), process
    ``share[0]`` of ``share[1]`` computes every ``share[1]``-th missing pair, ``gather`` merges every process's
    values, and only the process with ``write`` writes the cache. Each process saves its values as it goes into a
    part file of its own. Returns the values and how many pairs were computed (by all processes)."""
    cached, provenance = read_cache(path, key)
    # a stopped pass's parts to fold into the file, or pairs left out that it does not record yet
    unsaved = bool(part_files(path)) or not set(left_out) <= set(provenance["left_out"] if provenance else ())
    if agree is not None:
        cached = agree(cached)
    missing = sorted({i for i, pid in enumerate(pair_ids) if pid not in cached and pid not in deferred},
                     key=lambda i: tokenized[i].tokens)  # similar lengths together: fewer wasted packs
    index, processes = share
    mine = missing[index::processes]  # every process gets pairs of every length: shares that take as long
    computed: dict[str, tuple[float, int, float, int]] = {}
    if mine:
        model = load_model()
        part = path.with_name(f"{path.name}.part-{index}-{uuid.uuid4().hex[:8]}")  # this pass's, this process's
        sums = torch.zeros(len(mine), 2, dtype=torch.float64)
        counts = torch.zeros(len(mine), 2, dtype=torch.int64)
        done, saved = 0, time.monotonic()

        def so_far() -> dict[str, tuple[float, int, float, int]]:  # the values of the first `done` rows, computed
            return {pair_ids[i]: (s[0], c[0], s[1], c[1])
                    for i, s, c in zip(mine[:done], sums[:done].tolist(), counts[:done].tolist(), strict=True)}

        def progress(end: int) -> None:
            nonlocal done, saved
            done = end
            if time.monotonic() - saved >= SAVE_SECONDS:
                save_cached(part, key, so_far(), left_out, model_name)
                saved = time.monotonic()
            if on_progress:
                on_progress(end, len(mine))

        try:
            logps_of_tokenized(model, [tokenized[i] for i in mine], device=device,
                               tokens_per_forward=tokens_per_forward, chunk_size=chunk_size,
                               autocast_dtype=autocast_dtype, ld_alpha=ld_alpha, on_progress=progress,
                               out=(sums, counts))
        finally:  # stopped (an error, Ctrl-C), or one of several processes: its values are kept in its part
            computed = so_far()
            if computed and (done < len(mine) or gather is not None or not write):
                save_cached(part, key, computed, left_out, model_name)
        del model
    if gather is not None:
        computed = gather(computed)
    cached.update(computed)
    if write and (missing or unsaved):
        add_cached(path, key, computed, left_out, model_name)
    nan = (float("nan"), 0, float("nan"), 0)
    values = np.array([[(v := cached.get(pid, nan))[0], v[2]] for pid in pair_ids], dtype=np.float64).reshape(-1, 2)
    return values, len(missing)


def add_cached(path: Path, key: dict[str, object], values: dict[str, tuple[float, int, float, int]],
               left_out: Collection[str] = (), model_name: str | None = None) -> None:
    """Add ``values`` (pair id → chosen log-prob, tokens, rejected log-prob, tokens) and the ids ``left_out`` to the
    cache at ``path``, with the values of its part files, which are then removed (folded in). A part that another
    pass (a run sharing the cache) rewrote since it was read is kept: it holds values this file lacks, and removed,
    they were lost if that pass was killed before its next save. (A rewrite between the check and the removal, a
    window of microseconds, is not caught: that would take a lock.)"""
    parts = {part: _version(part) for part in part_files(path)}  # (before the reading: each one removed was read)
    cached, provenance = read_cache(path, key)
    cached.update(values)
    save_cached(path, key, cached, set(left_out) | set(provenance["left_out"] if provenance else ()),
                model_name or (provenance or {}).get("model_name"))
    for part, read in parts.items():
        if read is not None and _version(part) == read:  # each save renames a new file into place: another inode
            part.unlink(missing_ok=True)


def _version(file: Path) -> tuple[int, int, int] | None:
    """What tells one write of ``file`` from another (None: there is none)."""
    try:
        stat = file.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass
class RunReference:
    """A run's reference log-probs: ``values[row] = (chosen, rejected)`` in the trained orientation, for the rows
    that need them (preference pairs of a loss with a reference; ``needed`` is False when no row does).

    ``from_first_step`` lists rows of the run's first step that the reference pass left out: there the policy *is*
    the reference (the initial weights, and nothing stochastic in the forward), so that step's own forward gives
    their log-probs. :meth:`values_for` takes them from it, as the same forward's detached sums, and
    :meth:`save_taken` adds them to the cache. They are the function a separate pass computes, on the same
    weights, packed otherwise: they differ from that pass by float rounding only."""

    values: dict[int, tuple[float, float]] = field(default_factory=dict)
    needed: bool = False
    computed: int = 0  # pairs the reference pass computed
    from_first_step: set[int] = field(default_factory=set)
    # adds rows' values (trained orientation) to the cache; None: values taken are kept for this run only
    cache: Callable[[dict[int, tuple[float, float]]], None] | None = None
    _taken: dict[int, tuple[float, float]] = field(default_factory=dict)

    def values_for(self, rows: Sequence[int], chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """``[len(rows), 2]`` reference (chosen, rejected) of ``rows``, in ``chosen``'s dtype and device; a row of
        :attr:`from_first_step` takes the policy's own ``chosen`` / ``rejected`` (this forward's sums), and a row
        without reference (SFT) 0."""
        for i, row in enumerate(rows):
            if row in self.from_first_step:
                self.from_first_step.discard(row)
                self.values[row] = self._taken[row] = (float(chosen[i]), float(rejected[i]))
        return torch.tensor([self.values.get(r, (0.0, 0.0)) for r in rows], dtype=chosen.dtype,
                            device=chosen.device)

    def save_taken(self) -> int:
        """Add the values taken from the first step's forward since the last call to the cache; returns how many."""
        taken, self._taken = self._taken, {}
        if taken and self.cache is not None:
            self.cache(taken)
        return len(taken)
