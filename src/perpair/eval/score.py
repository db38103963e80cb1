"""``perpair eval score``: leaderboard metrics of one AlpacaEval annotations file.

I/O (files, Hub) is done here and in :mod:`perpair.eval.sources`; the numbers come from the pure functions of
:mod:`perpair.eval.metrics` and :mod:`perpair.eval.lc`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from perpair.errors import InputError
from perpair.eval import sources
from perpair.eval.lc import GamedRows, LCResult, fit_length_controlled, predict_from_weights, std_delta_len
from perpair.eval.metrics import average_length, win_rate_metrics

OFFLINE_NOTE = ("approximation: offline, the GLM is fitted without the two gamed baselines' rows (df_gamed.csv is "
                "on the Hub only) and with reconstructed instruction difficulties; such a refit is known to differ "
                "from the official LC win rate by 0.5 to 3 points")
BASELINE_NAME = "gpt4_1106_preview"


class ScoreOptions(BaseModel):
    """Where the LC inputs come from."""

    model_config = ConfigDict(extra="forbid")

    offline: bool | None = None  # None: online unless HF_HUB_OFFLINE is set
    difficulty: Path | None = None  # offline fallback for instruction_difficulty.csv
    glm_weights: Path | None = None  # published GLM weights (glm_weights_length_controlled_v1.csv)
    baseline: str = BASELINE_NAME  # the baseline's row in the published weights
    fit: bool = True  # fit the GLM (otherwise only the published-weights prediction)


def _lc_dict(result: LCResult) -> dict[str, Any]:
    return {"length_controlled_winrate": result.length_controlled_winrate,
            "lc_standard_error": result.lc_standard_error, "weights": result.weights,
            **({"C": result.C} if result.C is not None else {})}


def score_frame(frame, options: ScoreOptions, *, name: str | None = None, file: str | None = None) -> dict[str, Any]:
    """Leaderboard metrics of annotations already read (columns: instruction, output_1, output_2, preference)."""
    generator = name or (str(frame["generator_2"].iloc[0]) if "generator_2" in frame else None) or "model"
    row: dict[str, Any] = {"name": generator, **win_rate_metrics(frame["preference"]),
                           "avg_length": average_length(frame["output_2"].tolist())}
    gamed = sources.load_gamed_rows(offline=options.offline) if options.fit else None
    if gamed is not None:
        # the official fit reads the difficulties from df_gamed.csv itself (one value per instruction index)
        difficulty_all = gamed.drop_duplicates("index").set_index("index")["instruction_difficulty"]
        difficulty_all = difficulty_all.sort_index().to_numpy(float)
        difficulty_source, exact = f"hub:{sources.ALPACA_EVAL_REPO}/{sources.HUB_GAMED}", True
    else:
        fallback = options.difficulty or sources.local_alpaca_eval_file(sources.LOCAL_DIFFICULTY)
        difficulty_all, difficulty_source, exact = sources.load_instruction_difficulty(fallback,
                                                                                       offline=options.offline)
    n = len(frame)
    if n > len(difficulty_all):
        raise InputError(f"{n} annotations but only {len(difficulty_all)} instruction difficulties; the rows must be "
                         "AlpacaEval's instructions in their official order", file=file)
    # alpaca_eval maps each annotation to a difficulty by its row position (df.reset_index()["index"]).
    difficulty = difficulty_all[:n]

    fitted = published = None
    if options.fit and n >= 5:
        fitted = fit_length_controlled(frame["preference"].to_numpy(float),
                                       std_delta_len(frame["output_1"].tolist(), frame["output_2"].tolist()),
                                       difficulty, GamedRows.from_frame(gamed) if gamed is not None else None)
    weights_path = options.glm_weights or sources.local_alpaca_eval_file(sources.LOCAL_GLM_WEIGHTS)
    if weights_path is not None:
        weights = sources.load_glm_weights(weights_path)
        if generator in weights.index:
            baseline = weights.loc[options.baseline] if options.baseline in weights.index else None
            published = predict_from_weights(weights.loc[generator], difficulty, baseline)

    if fitted is not None and exact:
        headline, method, note = fitted, "fit", None
    elif published is not None:
        headline, method = published, "published_weights"
        note = None if exact else ("published GLM weights with reconstructed instruction difficulties (reproduce "
                                   "the published LC of 194 of 199 models to 1e-6)")
    elif fitted is not None:
        headline, method, note = fitted, "fit_offline_approximation", OFFLINE_NOTE
    else:
        headline, method, note = None, None, "no LC: fewer than 5 annotations and no published weights"
    row["length_controlled_winrate"] = headline.length_controlled_winrate if headline else math.nan
    row["lc_standard_error"] = headline.lc_standard_error if headline else math.nan
    row["lc_method"] = method
    row["lc_is_approximation"] = not exact and method != "published_weights"
    row["lc_note"] = note
    row["instruction_difficulty_source"] = difficulty_source
    row["lc_fit"] = _lc_dict(fitted) if fitted else None
    if fitted is not None and not exact:
        row["lc_fit"]["note"] = OFFLINE_NOTE
    row["lc_published_weights"] = _lc_dict(published) if published else None
    if file:
        row["file"] = file
    row["glm_preference"] = headline.glm_preference.tolist() if headline else None
    return row


def score_annotations(path: str | Path, options: ScoreOptions | None = None) -> dict[str, Any]:
    """Read an annotations file and return one JSON-ready object whose keys are the leaderboard's column names
    (``win_rate``, ``standard_error``, ``n_wins``, ``n_wins_base``, ``n_draws``, ``n_total``,
    ``discrete_win_rate``, ``avg_length``, ``length_controlled_winrate``, ``lc_standard_error``) plus how the LC
    was obtained. The per-instruction GLM probabilities are under ``glm_preference``."""
    frame = sources.read_annotations(path)
    return score_frame(frame, options or ScoreOptions(), file=str(path))


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
