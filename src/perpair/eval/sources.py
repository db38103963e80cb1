"""The loader layer of the evaluation stage: every file read and every Hub download happens here.

Hub files (the ``tatsu-lab/alpaca_eval`` dataset repository) are fetched with ``huggingface_hub`` when online; with
``offline=True`` (or ``HF_HUB_OFFLINE=1``), or when the download fails, the caller gets ``None`` and falls back
explicitly to a local file it names.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from perpair.errors import InputError, PerpairError
from perpair.eval.lc import FEATURES

log = logging.getLogger(__name__)

ALPACA_EVAL_REPO = "tatsu-lab/alpaca_eval"
HUB_GAMED = "df_gamed.csv"
HUB_DIFFICULTY = "instruction_difficulty.csv"
HUB_REFERENCE = "alpaca_eval_gpt4_baseline.json"  # the AlpacaEval 2.0 baseline (gpt4_1106_preview) outputs
ANNOTATION_FIELDS = ("instruction", "output_1", "output_2", "preference")


def is_offline(offline: bool | None = None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def hub_file(filename: str, *, offline: bool | None = None, repo_id: str = ALPACA_EVAL_REPO) -> Path | None:
    """A file of a Hub dataset repository, or ``None`` when offline or unreachable (the caller falls back)."""
    if is_offline(offline):
        return None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset"))
    except Exception as exc:  # noqa: BLE001 - any failure to download means "use the offline fallback"
        log.warning("could not download %s from %s (%s); using the offline fallback", filename, repo_id, exc)
        return None


def read_json_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A JSON list of objects (``.json`` or ``.json.gz``), as alpaca_eval writes outputs and annotations."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", file=str(path))
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            records = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not a readable JSON file ({exc})", file=str(path)) from None
    if not isinstance(records, list):
        raise InputError("expected a JSON list of objects", file=str(path))
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError("expected a JSON object", file=str(path), row=i + 1)
    return records


def write_json_records(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Write records as alpaca_eval does (indented JSON list), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    text = json.dumps(records, indent=2, ensure_ascii=False)
    try:
        if path.suffix == ".gz":
            with gzip.open(tmp, "wt", encoding="utf-8") as handle:
                handle.write(text)
        else:
            tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_annotations(path: str | os.PathLike) -> pd.DataFrame:
    """AlpacaEval annotations (alpaca_eval's ``annotations.json`` or ours): one row per instruction with
    ``instruction``, ``output_1`` (baseline), ``output_2`` (model), ``preference`` (number in [1, 2], 0 = draw, or
    null), optionally ``generator_1``, ``generator_2``, ``dataset``. Bad rows are reported by file, row and field."""
    records = read_json_records(path)
    if not records:
        raise InputError("no annotations", file=str(path))
    for i, record in enumerate(records):
        for name in ANNOTATION_FIELDS:
            if name not in record:
                raise InputError("missing field", file=str(path), row=i + 1, field=name)
        for name in ("instruction", "output_1", "output_2"):
            if not isinstance(record[name], str):
                raise InputError(f"expected a string, got {type(record[name]).__name__}", file=str(path),
                                 row=i + 1, field=name)
        value = record["preference"]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not (value == 0 or 1 <= value <= 2):
            raise InputError(f"expected a number in [1, 2] (or 0 for a draw, or null), got {value!r}",
                             file=str(path), row=i + 1, field="preference")
    frame = pd.DataFrame.from_records(records)
    frame["preference"] = pd.to_numeric(frame["preference"], errors="coerce").astype(float)
    for name in ("generator_1", "generator_2"):
        if name in frame:
            values = frame[name].dropna().unique()
            if len(values) > 1:
                raise InputError(f"several generators in one file ({', '.join(map(str, values[:3]))})",
                                 file=str(path), field=name)
    return frame


def read_outputs(path: str | os.PathLike) -> pd.DataFrame:
    """AlpacaEval model outputs: records with ``instruction`` and ``output`` (and ``generator``, ``dataset``)."""
    records = read_json_records(path)
    for i, record in enumerate(records):
        for name in ("instruction", "output"):
            if not isinstance(record.get(name), str):
                raise InputError("missing or not a string", file=str(path), row=i + 1, field=name)
    return pd.DataFrame.from_records(records)


def load_reference_outputs(source: str | os.PathLike | None, *, offline: bool | None = None) -> tuple[pd.DataFrame,
                                                                                                        str]:
    """The 805 instructions with the baseline's outputs: a local file, or the Hub when ``source`` is None."""
    if source is None:
        path = hub_file(HUB_REFERENCE, offline=offline)
        if path is None:
            raise PerpairError("the AlpacaEval reference outputs are on the Hub and this run is offline: pass a "
                               "local file with --reference (e.g. reference_outputs_gpt4_1106_preview.json.gz)")
        return read_outputs(path), f"hub:{ALPACA_EVAL_REPO}/{HUB_REFERENCE}"
    return read_outputs(source), str(source)


def load_gamed_rows(*, offline: bool | None = None) -> pd.DataFrame | None:
    """The gamed baselines' featurised annotations (``df_gamed.csv``), or None when they cannot be had."""
    path = hub_file(HUB_GAMED, offline=offline)
    if path is None:
        return None
    frame = pd.read_csv(path)
    for name in ("index", "preference", "std_delta_len", "instruction_difficulty"):
        if name not in frame:
            raise InputError("missing column", file=str(path), field=name)
    return frame


def read_difficulty_csv(path: str | os.PathLike) -> np.ndarray:
    """Per-instruction difficulty by row position: a two-column CSV (index, instruction_difficulty)."""
    try:
        frame = pd.read_csv(path, index_col=0)
    except (OSError, ValueError) as exc:
        raise InputError(f"not a readable CSV ({exc})", file=str(path)) from None
    if frame.shape[1] != 1:
        raise InputError(f"expected one value column, got {frame.shape[1]}", file=str(path))
    values = pd.to_numeric(frame.iloc[:, 0], errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy())
    if len(bad):
        raise InputError("not a number", file=str(path), row=int(bad[0]) + 1, field=str(frame.columns[0]))
    return values.to_numpy(float)


def load_instruction_difficulty(fallback: str | os.PathLike | None, *,
                                offline: bool | None = None) -> tuple[np.ndarray, str, bool]:
    """``(difficulty by instruction position, where it came from, is_exact)``: the Hub file when online, else
    ``fallback`` (e.g. instruction_difficulty_reconstructed.csv)."""
    path = hub_file(HUB_DIFFICULTY, offline=offline)
    if path is not None:
        return read_difficulty_csv(path), f"hub:{ALPACA_EVAL_REPO}/{HUB_DIFFICULTY}", True
    if fallback is None:
        raise PerpairError("instruction difficulties are on the Hub and this run is offline: pass a local file "
                           "with --difficulty (e.g. instruction_difficulty_reconstructed.csv)")
    return read_difficulty_csv(fallback), str(fallback), False


def load_glm_weights(path: str | os.PathLike) -> pd.DataFrame:
    """Published length-controlled GLM weights: one row per model, the three official feature columns."""
    try:
        frame = pd.read_csv(path, index_col=0)
    except (OSError, ValueError) as exc:
        raise InputError(f"not a readable CSV ({exc})", file=str(path)) from None
    for name in FEATURES:
        if name not in frame:
            raise InputError("missing column", file=str(path), field=name)
    return frame


# Where the offline fallbacks are looked for when not given: the data folder laid beside a perpair checkout
# (``../shared/data/alpaca_eval``), or the folder named by $PERPAIR_ALPACA_EVAL_DATA.
LOCAL_DIFFICULTY = "instruction_difficulty_reconstructed.csv"
LOCAL_GLM_WEIGHTS = "glm_weights_length_controlled_v1.csv"
LOCAL_REFERENCE = "reference_outputs_gpt4_1106_preview.json.gz"


def local_alpaca_eval_file(name: str) -> Path | None:
    folders = [os.environ.get("PERPAIR_ALPACA_EVAL_DATA"), Path.cwd().parent / "shared" / "data" / "alpaca_eval"]
    for folder in folders:
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    return None
