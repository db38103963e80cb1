"""AlpacaEval head-to-head metrics from per-instruction preferences, as the official implementation computes them.

A preference is a float in [1, 2]: 1 = the baseline (``output_1``) wins, 2 = the evaluated model (``output_2``)
wins, values in between come from the judge's token probabilities; 0 and 1.5 mean a draw (0 is the legacy code
for identical outputs); NaN means the judge gave no usable answer and the row is not counted.

Source of every formula: alpaca_eval 0.6.6, ``metrics/winrate.py`` (``get_winrate``) and ``metrics/helpers.py``
(``AbsoluteScoringRule`` for the weighted win rate, ``ZeroOneScoringRule`` for the discrete one). Pure functions:
no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def clean_preferences(preferences: Sequence[float | None] | np.ndarray | pd.Series) -> pd.Series:
    """Float preferences with the legacy draw code 0 mapped to 1.5 (alpaca_eval ``preprocess_predictions``)."""
    values = pd.Series(preferences, dtype="float64").reset_index(drop=True)
    return values.replace({0.0: 1.5})


def _is_valid(values: pd.Series) -> pd.Series:
    # alpaca_eval ``validate_alpacaeval_preference(is_allow_nan=False)``: a number in [1, 2].
    return values.notna() & (values >= 1.0) & (values <= 2.0)


def win_rate_metrics(preferences: Sequence[float | None] | np.ndarray | pd.Series) -> dict[str, float | int]:
    """Raw (weighted) win rate, its standard error, counts and the discrete win rate, in the leaderboard's keys.

    - ``win_rate`` = 100 · mean(preference − 1) over valid preferences (AbsoluteScoringRule.describe_head2head);
    - ``standard_error`` = 100 · the standard error of that mean (pandas ``sem``: ddof = 1);
    - ``n_wins`` / ``n_wins_base``: preference − 1 above / below 0.5; ``n_draws``: preferences equal to 1.5 (or 0);
    - ``discrete_win_rate``: the same mean after rounding each preference to 1, 1.5 (draw) or 2 (ZeroOneScoringRule:
      ``round()`` of the value, a draw counting one half).
    """
    values = clean_preferences(preferences)
    valid = values[_is_valid(values)]
    shifted = valid - 1.0
    n_draws = int((values == 1.5).sum())
    # ZeroOneScoringRule rounds half to even (pandas round), so 1.5 (a draw) must be handled before rounding: it is
    # first mapped to 0, rounds to 0 and comes back as 1.5.
    discrete = values.where(values != 1.5, 0.0).round().replace({0.0: 1.5})
    discrete = discrete[_is_valid(discrete)] - 1.0
    return {
        "win_rate": float(shifted.mean() * 100) if len(shifted) else float("nan"),
        "standard_error": float(shifted.sem() * 100) if len(shifted) > 1 else float("nan"),
        "n_wins": int((shifted > 0.5).sum()),
        "n_wins_base": int((shifted < 0.5).sum()),
        "n_draws": n_draws,
        "n_total": int(len(shifted)),
        "discrete_win_rate": float(discrete.mean() * 100) if len(discrete) else float("nan"),
    }


def average_length(outputs: Sequence[str]) -> int:
    """Mean length in characters of the model's outputs, truncated to an integer as on the leaderboard
    (alpaca_eval ``main.evaluate``: ``df_leaderboard["avg_length"] = model_outputs["output"].str.len().mean()``,
    stored as int)."""
    if not len(outputs):
        return 0
    return int(np.mean([len(o) for o in outputs]))
