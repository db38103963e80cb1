"""The loader layer of the evaluation stage: every file read and every Hub download happens here, before any
metric runs.

Hub files (the ``tatsu-lab/alpaca_eval`` and ``lmarena-ai/arena-hard-auto`` dataset repositories) are fetched with
``huggingface_hub`` when online. A download that fails is an error that says how to run offline: never a silent
switch to other files. Offline (``offline=True`` or ``HF_HUB_OFFLINE=1``) every file comes from a path given, or
from a data folder given (the layout of ``../shared/data/alpaca_eval`` and ``../shared/data/arena_hard``); nothing
is looked up relative to the current folder.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from perpair.artifacts import file_sha256, temporary_beside, writing
from perpair.errors import InputError, PerpairError
from perpair.eval.lc import FEATURES, GamedRows

ALPACA_EVAL_REPO = "tatsu-lab/alpaca_eval"
HUB_GAMED = "df_gamed.csv"
HUB_DIFFICULTY = "instruction_difficulty.csv"
HUB_REFERENCE = "alpaca_eval_gpt4_baseline.json"  # the AlpacaEval 2.0 baseline (gpt4_1106_preview) outputs
ANNOTATION_FIELDS = ("instruction", "output_1", "output_2", "preference")


def is_offline(offline: bool | None = None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def hub_file(filename: str, *, repo_id: str = ALPACA_EVAL_REPO, hint: str) -> tuple[Path, str]:
    """A file of a Hub dataset repository (the caller has checked that this run is online), downloaded at the commit
    main points to now, and its source for a results row: ``hub:REPO/FILE@COMMIT`` (two results read the same file
    when their sources are equal). ``hint`` says how to go without it (e.g. the offline option and the local file
    to pass)."""
    from huggingface_hub import hf_hub_download

    from perpair.models import hub_commit

    commit = hub_commit(repo_id, "dataset")
    try:
        path = Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", revision=commit))
    except OSError as exc:  # huggingface_hub's HTTP, not-found and no-connection errors are all OSErrors
        raise PerpairError(f"could not download {filename} from the Hub dataset {repo_id} ({exc}); {hint}") from None
    return path, f"hub:{repo_id}/{filename}@{commit or 'unresolved'}"


def read_json_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """A JSON list of objects (``.json`` or ``.json.gz``), as alpaca_eval writes outputs and annotations."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", file=str(path))
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            records = json.load(handle)
    # a .gz cut short or damaged: gzip's EOFError and zlib.error (neither an OSError; click takes an EOFError for
    # the end of input at a prompt)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, EOFError, zlib.error) as exc:
        raise InputError(f"not a readable JSON file ({exc})", file=str(path)) from None
    except RecursionError:  # (else the command's one line named no file)
        raise InputError("not a readable JSON file (nested too deeply)", file=str(path)) from None
    if not isinstance(records, list):
        raise InputError("expected a JSON list of objects", file=str(path))
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError("expected a JSON object", file=str(path), row=i + 1)
    return records


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """JSON Lines (``.jsonl`` or ``.jsonl.gz``) of objects, as arena-hard-auto writes questions, answers and
    judgments; a bad line is reported by file and row (its line number)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise InputError(f"not JSON ({exc})", file=str(path), row=number) from None
                if not isinstance(row, dict):
                    raise InputError("expected a JSON object", file=str(path), row=number)
                rows.append(row)
    except FileNotFoundError:
        raise InputError("no such file", file=str(path)) from None
    except (OSError, UnicodeDecodeError, EOFError, zlib.error) as exc:
        raise InputError(f"not a readable JSON Lines file ({exc})", file=str(path)) from None
    return rows


def name_of_file(path: str | os.PathLike) -> str:
    """A model's name from its file's name, its ``.json`` / ``.jsonl`` and ``.gz`` endings dropped:
    ``claude-2.1.json.gz`` is ``claude-2.1`` (cut at the first dot it was ``claude-2``, another model's name)."""
    name = Path(path).name.removesuffix(".gz")
    for suffix in (".jsonl", ".json"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name.removesuffix(suffix)
    return name


def write_json_records(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Write records as alpaca_eval does (indented JSON list), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    text = json.dumps(records, indent=2, ensure_ascii=False)
    try:
        with writing(path, tmp):
            if path.suffix == ".gz":
                with gzip.open(tmp, "wt", encoding="utf-8") as handle:
                    handle.write(text)
            else:
                tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def model_identity(model: str) -> str:
    """What a results row names its model by, to tell two models apart: a local folder's absolute path (two runs'
    ``checkpoint-100`` folders are two models), else the Hub id."""
    path = Path(model)
    return str(path.resolve()) if path.is_dir() else model


def check_results_owner(path: Path, benchmark: str | None, option: str, model: str | None = None) -> None:
    """Refuse, before any work, to write ``path`` (a ``results.json``) where it holds what another command wrote,
    which it would replace: ``benchmark`` (an evaluation's, e.g. ``alpaca_eval_2``) refuses another benchmark's
    results and a report's table (a ``report.html`` beside it); ``None`` (``perpair eval report``) refuses an
    evaluation's results (rows with more than the report's columns). ``eval preference -o eval/dpo`` replaced the
    AlpacaEval results there without a word (``eval report`` then showed no AlpacaEval row); ``arena-hard run`` and
    ``eval report`` did the same. With ``model`` (:func:`model_identity`; the CLI passes it for an output folder it
    chose), the results of the same benchmark for another model are refused too: two folders of one name
    (``a/checkpoint-100``, ``b/checkpoint-100``) share a default output folder, where the second's results replaced
    the first's without a word."""
    if not path.is_file():
        return
    from perpair.eval.report import COLUMNS

    rows = read_json_records(path)
    benchmarks = {str(row["benchmark"]) if row.get("benchmark") is not None else "rows of no benchmark"
                  for row in rows}
    if benchmark is None:
        if (path.parent / "report.html").is_file() or not any(set(row) - set(COLUMNS) for row in rows):
            return
        what = f"an evaluation's results ({', '.join(sorted(benchmarks))})"
    elif (path.parent / "report.html").is_file():
        what = "a report's table (perpair eval report)"
    else:
        others = sorted(benchmarks - {benchmark})
        if others:
            what = f"the results of another evaluation ({', '.join(others)})"
        else:
            held = sorted({str(row["model_path"]) for row in rows
                           if row.get("benchmark") == benchmark and row.get("model_path") is not None} - {model})
            # (a folder that is gone, moved with the project, say, is no other model to keep the results of)
            held = [h for h in held if Path(h).is_dir() or not Path(h).is_absolute()]
            if model is None or not held:
                return
            what = f"the {benchmark} results of another model ({', '.join(held)}; this one is {model})"
    where = path.parent if path.name == "results.json" else path
    raise PerpairError(f"{option} {where}: {path.name} there holds {what}, which this command would replace; give "
                       "it another folder" + (" with -o/--output (and --name, to tell the two apart in a report)"
                                              if model is not None and not others else ""))


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
                # a model outputs file (alpaca_eval's model_outputs.json) given where annotations go: said so
                outputs = "output" in record and not any(f in record for f in ("output_1", "output_2", "preference"))
                raise InputError("missing field" + (
                    ": a model's outputs (instruction, output), not annotations (instruction, output_1, output_2, "
                    "preference: alpaca_eval's annotations.json, or perpair eval alpaca-eval's)" if outputs else ""),
                    file=str(path), row=i + 1, field=name)
        for name in ("instruction", "output_1", "output_2"):
            if not isinstance(record[name], str):
                raise InputError(f"expected a string, got {type(record[name]).__name__}", file=str(path),
                                 row=i + 1, field=name)
        for name in ("generator_1", "generator_2", "dataset", "annotator"):  # (a list: pandas' traceback)
            if record.get(name) is not None and not isinstance(record[name], str):
                raise InputError(f"expected a string or null, got {type(record[name]).__name__}", file=str(path),
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
    if not records:  # (an empty reference was a KeyError traceback, after the output folder was made)
        raise InputError("no outputs", file=str(path))
    for i, record in enumerate(records):
        for name in ("instruction", "output"):
            if not isinstance(record.get(name), str):
                raise InputError("missing or not a string", file=str(path), row=i + 1, field=name)
        for name in ("generator", "dataset"):  # (copied into the annotations: refused there, after every judgment)
            if record.get(name) is not None and not isinstance(record[name], str):
                raise InputError(f"expected a string or null, got {type(record[name]).__name__}", file=str(path),
                                 row=i + 1, field=name)
    return pd.DataFrame.from_records(records)


# The files of an AlpacaEval data folder (``--data-dir``: the layout of ../shared/data/alpaca_eval).
LOCAL_DIFFICULTY = "instruction_difficulty_reconstructed.csv"
LOCAL_GLM_WEIGHTS = "glm_weights_length_controlled_v1.csv"
LOCAL_LEADERBOARD = "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv"
LOCAL_REFERENCE = "reference_outputs_gpt4_1106_preview.json.gz"
LOCAL_JUDGE_PROMPT = "judge_prompt_alpaca_eval_clf.txt"


def data_file(given: str | os.PathLike | None, data_dir: str | os.PathLike | None, name: str) -> Path | None:
    """``given`` when set (it must exist), else ``data_dir/name`` when that exists, else None."""
    if given is not None:
        if not Path(given).is_file():
            raise InputError("no such file", file=str(given))
        return Path(given)
    if data_dir is None:
        return None
    if not Path(data_dir).is_dir():
        raise InputError("no such data folder", file=str(data_dir))
    candidate = Path(data_dir) / name
    # there but not a file (a folder, a link to nothing): refused, not taken for absent (the LC then went on
    # without the published weights, or without the instruction order, saying there was no such file)
    if not candidate.is_file() and (candidate.exists() or candidate.is_symlink()):
        raise InputError("not a readable file (a folder, or a link to nothing)", file=str(candidate))
    return candidate if candidate.is_file() else None


def load_reference_outputs(given: Path | None, data_dir: Path | None,
                           offline: bool | None) -> tuple[pd.DataFrame, str, str]:
    """The 805 instructions with the baseline's outputs: the file given, else the Hub (online), else the data
    folder's copy (offline); with where they came from and the file's SHA-256 (what it held)."""
    if given is not None:
        path, source = Path(given), str(given)
    elif not is_offline(offline):
        path, source = hub_file(HUB_REFERENCE, hint=f"pass --reference {LOCAL_REFERENCE}, or --offline with "
                                                    f"--data-dir")
    else:
        path = data_file(None, data_dir, LOCAL_REFERENCE)
        if path is None:
            raise PerpairError(f"offline, the AlpacaEval reference outputs come from a local file: pass --reference "
                               f"({LOCAL_REFERENCE}) or --data-dir (a folder holding it)")
        source = str(path)
    return read_outputs(path), source, file_sha256(path)


def read_gamed_rows(path: str | os.PathLike) -> pd.DataFrame:
    """The gamed baselines' featurised annotations (``df_gamed.csv``)."""
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"not a readable CSV ({exc})", file=str(path)) from None
    for name in ("index", "preference", "std_delta_len", "instruction_difficulty"):
        if name not in frame:
            raise InputError("missing column", file=str(path), field=name)
    return frame


def read_difficulty_csv(path: str | os.PathLike) -> np.ndarray:
    """Per-instruction difficulty by instruction index: a two-column CSV (index, instruction_difficulty) whose
    index holds 0 … N-1 once each, as alpaca_eval reads it (by label: rows in another order are the same file)."""
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
    # read by position, rows in another order gave each instruction another's difficulty, and every LC figure moved
    index = pd.to_numeric(pd.Series(frame.index), errors="coerce").to_numpy(float)
    order = np.argsort(index, kind="stable")
    bad = np.flatnonzero(index[order] != np.arange(len(index)))
    if len(bad):
        row = int(order[bad[0]])
        raise InputError(f"expected the instruction indices 0 to {len(index) - 1} once each, got "
                         f"{frame.index[row]}", file=str(path), row=row + 1, field=str(frame.index.name or "index"))
    return values.to_numpy(float)[order]


def _read_model_table(path: str | os.PathLike, columns: tuple[str, ...]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, index_col=0)
    except (OSError, ValueError) as exc:
        raise InputError(f"not a readable CSV ({exc})", file=str(path)) from None
    for name in columns:
        if name not in frame:
            raise InputError("missing column", file=str(path), field=name)
        # a cell not a number (or empty) was a traceback, or a NaN weight that left the LC without a word
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy())
        if len(bad):
            value = frame[name].iloc[bad[0]]
            raise InputError("empty" if pd.isna(value) else f"not a number ({value!r})", file=str(path),
                             row=int(bad[0]) + 1, field=name)
        frame[name] = values
    # a model on two rows: which weights or figures are its is unknown (it was pandas' traceback)
    twice = np.flatnonzero(frame.index.duplicated())
    if len(twice):
        raise InputError(f"model {frame.index[twice[0]]} on two rows", file=str(path), row=int(twice[0]) + 1)
    return frame


def load_glm_weights(path: str | os.PathLike) -> pd.DataFrame:
    """Published length-controlled GLM weights: one row per model, the three official feature columns."""
    return _read_model_table(path, FEATURES)


LEADERBOARD_CHECKED = ("n_total", "avg_length", "win_rate")


def load_leaderboard(path: str | os.PathLike) -> pd.DataFrame:
    """The published AlpacaEval 2.0 leaderboard: one row per model (``win_rate``, ``n_total``, ``avg_length``…)."""
    return _read_model_table(path, LEADERBOARD_CHECKED)


@dataclass(frozen=True)
class LCInputs:
    """What the length-controlled win rate reads, resolved before any annotation is scored."""

    difficulty: np.ndarray  # by instruction position
    difficulty_source: str
    difficulty_is_official: bool  # the Hub's file (else a local file, e.g. the reconstructed copy)
    gamed: GamedRows | None  # the two gamed baselines' rows (on the Hub only): with them the fit is the official one
    weights: pd.DataFrame | None  # published GLM weights by model
    leaderboard: pd.DataFrame | None  # the published leaderboard: is a file the one a model's weights were fit on?
    instructions: list[str] | None = None  # AlpacaEval's instructions in the official order (the data folder's copy)
    baseline_outputs: list[str] | None = None  # and the AlpacaEval 2.0 baseline's outputs to them, in that order

    @property
    def exact(self) -> bool:
        return self.gamed is not None


def resolve_lc_inputs(*, offline: bool | None, fit: bool, difficulty: Path | None = None,
                      glm_weights: Path | None = None, leaderboard: Path | None = None,
                      data_dir: Path | None = None) -> LCInputs:
    """Online and without ``difficulty``: the official files from the Hub (``df_gamed.csv`` for the fit, else
    ``instruction_difficulty.csv``). Otherwise the difficulties given or the data folder's reconstructed copy.
    Published weights and the leaderboard: the files given, else the data folder's, else none; the official
    instruction order: the data folder's reference outputs, else the Hub's online, else none."""
    hint = f"pass --offline with --difficulty {LOCAL_DIFFICULTY} or --data-dir"
    gamed = None
    if difficulty is None and not is_offline(offline):
        if fit:
            path, source = hub_file(HUB_GAMED, hint=hint)
            frame = read_gamed_rows(path)
            gamed = GamedRows.from_frame(frame)
            # the official fit reads the difficulties from df_gamed.csv itself (one value per instruction index)
            values = frame.drop_duplicates("index").set_index("index")["instruction_difficulty"]
            values = values.sort_index().to_numpy(float)
        else:
            path, source = hub_file(HUB_DIFFICULTY, hint=hint)
            values = read_difficulty_csv(path)
    else:
        path = data_file(difficulty, data_dir, LOCAL_DIFFICULTY)
        if path is None:
            raise PerpairError(f"offline, the instruction difficulties come from a local file: pass --difficulty "
                               f"({LOCAL_DIFFICULTY}) or --data-dir (a folder holding it)")
        values, source = read_difficulty_csv(path), str(path)
    weights_path = data_file(glm_weights, data_dir, LOCAL_GLM_WEIGHTS)
    board_path = data_file(leaderboard, data_dir, LOCAL_LEADERBOARD)
    # the difficulties are by position in the official order: with the data folder's copy of the instructions (else
    # online the Hub's), a file in another order, or missing some, is told apart from one whose row k is instruction k
    reference_path = data_file(None, data_dir, LOCAL_REFERENCE)
    if reference_path is None and not is_offline(offline):
        reference_path, _ = hub_file(HUB_REFERENCE, hint=f"pass --offline with --data-dir (a folder holding "
                                                         f"{LOCAL_REFERENCE})")
    reference = read_outputs(reference_path) if reference_path else None
    return LCInputs(values, source, source.startswith("hub:"), gamed,
                    load_glm_weights(weights_path) if weights_path else None,
                    load_leaderboard(board_path) if board_path else None,
                    *((reference["instruction"].tolist(), reference["output"].tolist()) if reference is not None
                      else (None, None)))
