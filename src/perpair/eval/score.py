"""``perpair eval score``: leaderboard metrics of one AlpacaEval annotations file.

Every input (files, Hub) is read by :mod:`perpair.eval.sources` before scoring starts; :func:`score_frame` only
computes, from the pure functions of :mod:`perpair.eval.metrics` and :mod:`perpair.eval.lc`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from perpair.errors import InputError, PerpairError
from perpair.eval import sources
from perpair.eval.lc import N_SPLITS, LCResult, fit_length_controlled, predict_from_weights, std_delta_len
from perpair.eval.metrics import average_length, win_rate_metrics

OFFLINE_NOTE = ("approximation: offline, the GLM is fitted without the two gamed baselines' rows (df_gamed.csv is "
                "on the Hub only) and with reconstructed instruction difficulties; such a refit is known to differ "
                "from the official LC win rate by 0.5 to 3 points")
BASELINE_NAME = "gpt4_1106_preview"
# AlpacaEval 2.0's judge, the weighted_alpaca_eval_gpt4_turbo annotator (gpt-4-1106-preview): it judged the gamed
# baselines' rows the length-controlled GLM is fitted with (df_gamed.csv) and the leaderboard's annotations, on which
# the instruction difficulties and published weights were fitted. An annotations file names its judge in
# ``annotator``: alpaca_eval's annotator's name, or perpair's ``weighted_alpaca_eval:api|local:MODEL``.
OFFICIAL_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
OFFICIAL_JUDGE_MODEL = "gpt-4-1106-preview"
OFFICIAL_ANNOTATORS = (OFFICIAL_ANNOTATOR, f"weighted_alpaca_eval:api:{OFFICIAL_JUDGE_MODEL}")


class ScoreOptions(BaseModel):
    """Where the LC inputs come from."""

    model_config = ConfigDict(extra="forbid")

    offline: bool | None = None  # None: online unless HF_HUB_OFFLINE is set
    data_dir: Path | None = None  # a folder laid out as ../shared/data/alpaca_eval (the files below, by name)
    difficulty: Path | None = None  # instruction difficulties (default: the Hub's online, the data folder's offline)
    glm_weights: Path | None = None  # published GLM weights (glm_weights_length_controlled_v1.csv)
    leaderboard: Path | None = None  # the published leaderboard, to check a file against its model's row
    baseline: str = BASELINE_NAME  # the baseline's row in the published weights
    fit: bool = True  # fit the GLM (otherwise only the published-weights prediction)

    def resolve(self) -> sources.LCInputs:
        """Read (and download, online) every LC input, before any file is scored."""
        return sources.resolve_lc_inputs(offline=self.offline, fit=self.fit, difficulty=self.difficulty,
                                         glm_weights=self.glm_weights, leaderboard=self.leaderboard,
                                         data_dir=self.data_dir)


def _lc_dict(result: LCResult) -> dict[str, Any]:
    return {"length_controlled_winrate": result.length_controlled_winrate,
            "lc_standard_error": result.lc_standard_error, "weights": result.weights,
            **({"C": result.C} if result.C is not None else {})}


# A file is the one a model's published weights were fitted on when it has that model's leaderboard row: the
# same number of judged instructions, the same average length (an int on the leaderboard) and raw win rate.
AVG_LENGTH_TOLERANCE = 1.0
WIN_RATE_TOLERANCE = 1e-3


def published_weights_for(row: dict[str, Any], inputs: sources.LCInputs) -> str | None:
    """Why the published weights of ``row["name"]`` do not apply to the scored file, or None when they do."""
    name = row["name"]
    if inputs.weights is None:
        return "no published GLM weights file (--glm-weights or --data-dir)"
    if name not in inputs.weights.index:
        return f"no published GLM weights for {name!r}"
    if inputs.leaderboard is None:
        return (f"no leaderboard file to check that this is the file {name!r}'s weights were fitted on "
                "(--leaderboard or --data-dir)")
    if name not in inputs.leaderboard.index:
        return f"{name!r} is not on the leaderboard, so this file cannot be checked against its row"
    published = inputs.leaderboard.loc[name]
    if (row["n_total"] != published["n_total"]
            or abs(row["avg_length"] - published["avg_length"]) > AVG_LENGTH_TOLERANCE
            or abs(row["win_rate"] - published["win_rate"]) > WIN_RATE_TOLERANCE):
        return (f"this file is not {name!r}'s leaderboard file (n_total {row['n_total']} vs "
                f"{published['n_total']:g}, average length {row['avg_length']} vs {published['avg_length']:g}, "
                f"win rate {row['win_rate']:.3f} vs {published['win_rate']:.3f}); use --name to name the model")
    return None


def score_frame(frame, inputs: sources.LCInputs, *, name: str, fit: bool = True, baseline: str = BASELINE_NAME,
                file: str | None = None, unchecked: str | None = None) -> dict[str, Any]:
    """Leaderboard metrics of annotations already read (columns: instruction, output_1, output_2, preference),
    from LC inputs already resolved (:meth:`ScoreOptions.resolve`): no I/O here. ``unchecked``: why the rows cannot
    be checked against the official ones when they must be (no LC then, as for rows that differ)."""
    row: dict[str, Any] = {"name": name, **win_rate_metrics(frame["preference"]),
                           "avg_length": average_length(frame["output_2"].tolist())}
    n = len(frame)
    if row["n_total"] == 0:
        raise InputError(f"no judged instruction: the preference of each of the {n} annotation(s) is null (the judge "
                         "gave no usable answer); there is no win rate to report", file=file)
    # rows whose judge gave no usable answer (null preference) are left out of every figure, as alpaca_eval leaves
    # them out: said, so a partial evaluation does not read as a complete one
    row["n_unjudged"] = n - row["n_total"]
    row["judgment_note"] = (f"{row['n_unjudged']} of {n} instructions have no judgment (null preference) and are "
                            f"not counted: the win rates are over {row['n_total']}") if row["n_unjudged"] else None
    # alpaca_eval maps each annotation to a difficulty by its row position (df.reset_index()["index"]): row k must
    # be instruction k, or every figure of the LC reads another instruction's difficulty. More rows than there are
    # difficulties (a row twice, another instruction set) get no LC either, their raw figures standing: it was an
    # error, which ended an alpaca-eval run on such a --reference after every answer was generated and judged
    mismatch = unchecked or _not_official(frame, inputs) or (
        f"{n} rows, and there are {len(inputs.difficulty)} instruction difficulties (one per AlpacaEval "
        "instruction)" if n > len(inputs.difficulty) else None)
    if mismatch is not None:
        for key in ("length_controlled_winrate", "lc_standard_error"):
            row[key] = math.nan
        row.update({"lc_method": None, "lc_is_approximation": False, "lc_note": f"no LC: {mismatch}",
            "lc_judge_note": None, "instruction_difficulty_source": inputs.difficulty_source, "lc_fit": None,
            "lc_published_weights": None, "glm_preference": None})
        if file:
            row["file"] = file
        return row
    difficulty = inputs.difficulty[:n]
    exact = inputs.exact

    fitted = published = None
    # the fit's 5-fold cross-validation needs 5 judged rows (the gamed baselines' rows count, as they are fitted too)
    if fit and row["n_total"] + (len(inputs.gamed) if inputs.gamed is not None else 0) >= N_SPLITS:
        fitted = fit_length_controlled(frame["preference"].to_numpy(float),
                                       std_delta_len(frame["output_1"].tolist(), frame["output_2"].tolist()),
                                       difficulty, inputs.gamed)
    not_published = published_weights_for(row, inputs)
    if not_published is None:
        weights = inputs.weights
        base = weights.loc[baseline] if baseline in weights.index else None
        published = predict_from_weights(weights.loc[name], difficulty, base)

    if fitted is not None and exact:
        headline, method, note = fitted, "fit", None
    elif published is not None:
        headline, method = published, "published_weights"
        note = None if inputs.difficulty_is_official else (
            "published GLM weights with reconstructed instruction difficulties (reproduce the published LC of 194 "
            "of 199 models to 1e-6)")
    elif fitted is not None:
        headline, method = fitted, "fit_offline_approximation"
        note = f"{OFFLINE_NOTE}. Published weights not used: {not_published}"
    else:
        headline, method = None, None
        # the reason the published weights were not used last, in the words the fit's note has them (a run's table
        # shows one note for every arm, up to that reason, which names the arm)
        why = "--no-fit" if not fit else f"fewer than {N_SPLITS} judged instructions"  # (805 of them, --no-fit)
        note = f"no LC: {why} and no published weights. Published weights not used: {not_published}"
    row["length_controlled_winrate"] = headline.length_controlled_winrate if headline else math.nan
    row["lc_standard_error"] = headline.lc_standard_error if headline else math.nan
    row["lc_method"] = method
    row["lc_is_approximation"] = method not in ("fit", "published_weights")
    row["lc_note"] = note
    # computed as alpaca_eval 0.6.6 computes it whoever the judge, but measured against gpt-4-turbo's judgments
    row["lc_judge_note"] = judge_note(frame) if headline is not None else None
    row["instruction_difficulty_source"] = inputs.difficulty_source
    row["lc_fit"] = _lc_dict(fitted) if fitted else None
    if fitted is not None and not exact:
        row["lc_fit"]["note"] = OFFLINE_NOTE
    row["lc_published_weights"] = _lc_dict(published) if published else None
    if file:
        row["file"] = file
    row["glm_preference"] = headline.glm_preference.tolist() if headline else None
    return row


def judge_note(frame) -> str | None:
    """Why an LC figure of these annotations is not comparable to the leaderboard's: their judge (``annotator``) is
    not AlpacaEval 2.0's, or not named; None when it is."""
    annotators = sorted(map(str, frame["annotator"].dropna().unique())) if "annotator" in frame else []
    if annotators and all(a in OFFICIAL_ANNOTATORS for a in annotators):
        return None
    judged_by = (f"these annotations were judged by {', '.join(map(repr, annotators))}" if annotators else
                 "these annotations do not name their judge (no annotator)")
    return (f"the LC fit's reference rows (df_gamed.csv) and the instruction difficulties were judged by AlpacaEval "
            f"2.0's gpt-4-turbo annotator ({OFFICIAL_ANNOTATOR}, {OFFICIAL_JUDGE_MODEL}); {judged_by}, so the LC "
            "figure, computed as alpaca_eval computes it, is not comparable to the leaderboard's")


def _not_official(frame, inputs: sources.LCInputs) -> str | None:
    """Why the annotations are not AlpacaEval 2.0's rows (the official instructions in order, the baseline's
    outputs as ``output_1``), or cannot be told to be (the official rows not at hand), or None when they are."""
    if inputs.instructions is None:  # offline without the data folder's copy: unchecked rows get no LC either
        return (f"offline, the rows cannot be checked against AlpacaEval's instructions in the official order and "
                f"the {BASELINE_NAME} baseline's outputs, whose positions the length-controlled GLM reads: give a "
                f"data folder holding {sources.LOCAL_REFERENCE} (--data-dir), or score online")
    instructions, baseline = frame["instruction"].tolist(), frame["output_1"].tolist()
    for k, (ours, theirs) in enumerate(zip(instructions, inputs.instructions, strict=False)):
        if ours != theirs:
            return (f"the rows are not AlpacaEval's instructions in the official order (row {k + 1} is "
                    f"{_clip(ours)!r}, instruction {k + 1} is {_clip(theirs)!r}); the length-controlled GLM reads "
                    "each instruction's difficulty by its row position, as alpaca_eval does, so it would read other "
                    "instructions' difficulties")
    if len(instructions) > len(inputs.instructions):
        return f"{len(instructions)} rows, and AlpacaEval has {len(inputs.instructions)} instructions"
    for k, (ours, theirs) in enumerate(zip(baseline, inputs.baseline_outputs or [], strict=False)):
        if ours != theirs:
            return (f"row {k + 1}'s output_1 is not the AlpacaEval 2.0 baseline's ({BASELINE_NAME}) output to its "
                    "instruction; the instruction difficulties, the gamed baselines' rows and the published weights "
                    "are measured against that baseline")
    return None


def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width] + "…"


def model_name(frame, path: str | Path) -> str:
    """The model an annotations file is about: its ``generator_2`` (one value per file), else the file's name."""
    if "generator_2" in frame and frame["generator_2"].notna().any():
        return str(frame["generator_2"].dropna().iloc[0])
    return sources.name_of_file(path)


def score_files(paths: list[str | Path], options: ScoreOptions | None = None, *,
                name: str | None = None) -> list[dict[str, Any]]:
    """Score annotations files (see :func:`score_annotations`): every file is read and checked, then every LC
    input resolved, before the first metric runs. ``name`` names the model of a single file."""
    if name is not None and len(paths) != 1:
        raise PerpairError(f"--name names one file's model; {len(paths)} files were given")
    options = options or ScoreOptions()
    frames = [sources.read_annotations(path) for path in paths]
    inputs = options.resolve()
    return [score_frame(frame, inputs, name=name or model_name(frame, path), fit=options.fit,
                        baseline=options.baseline, file=str(path)) for frame, path in zip(frames, paths, strict=True)]


def score_annotations(path: str | Path, options: ScoreOptions | None = None, *,
                      name: str | None = None) -> dict[str, Any]:
    """Read an annotations file and return one JSON-ready object whose keys are the leaderboard's column names
    (``win_rate``, ``standard_error``, ``n_wins``, ``n_wins_base``, ``n_draws``, ``n_total``,
    ``discrete_win_rate``, ``avg_length``, ``length_controlled_winrate``, ``lc_standard_error``) plus how the LC
    was obtained. The per-instruction GLM probabilities are under ``glm_preference``. ``name`` (default: the
    file's ``generator_2``) picks the published weights, used only when the file matches that model's
    leaderboard row."""
    return score_files([path], options, name=name)[0]


def json_ready(value: Any) -> Any:
    """NaN → None and numpy scalars → Python, recursively, for strict JSON."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
