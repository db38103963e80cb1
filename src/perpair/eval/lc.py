"""Length-controlled AlpacaEval 2.0 win rate: the official GLM, fitted or evaluated from published weights.

Source: Dubois et al. (2024), "Length-Controlled AlpacaEval: A Simple Way to Debias Automatic Evaluators",
arXiv 2404.04475, §3; the settings below are those of alpaca_eval 0.6.6 ``metrics/glm_winrate.py``
(``GLM_INFO["length_controlled_v1"]`` and ``fit_LogisticRegressionCV``), re-implemented here as pure functions.

The model (patsy formula of the official implementation, no intercept)::

    logit P(model beats baseline) = θ_len · tanh(std_delta_len) + θ_diff · instruction_difficulty + θ_model · 1

with ``std_delta_len = (len(baseline) − len(model)) / std`` in characters (sample std over this model's rows), the
preference rescaled to a probability ``preference − 1``, and the model's rows stacked with the rows of two "gamed"
baselines (not_gamed_baseline = 0) weighted 0.2 / 2 = 0.1 each, which shrinks θ_len towards what length gaming
alone produces. Fitting: L1-regularised logistic regression (liblinear, no intercept, random_state 123), C chosen
from ``logspace(-4, 4, 10)`` by 5-fold CV grouped by row, scored by the weighted cross-entropy. The
length-controlled win rate is the prediction with the length term at 0: ``100 · mean σ(θ_diff·d_i + θ_model)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold

from perpair.errors import PerpairError
from perpair.eval.metrics import clean_preferences

# Column names of the official design matrix (and of the published weights CSV), in its order.
LENGTH_TERM = "np.tanh(std_delta_len)"
DIFFICULTY_TERM = "instruction_difficulty"
MODEL_TERM = "not_gamed_baseline.astype(float)"
FEATURES = (LENGTH_TERM, DIFFICULTY_TERM, MODEL_TERM)

GAMED_ROWS_WEIGHT = 0.2 / 2  # regularize_to_baseline_lambda = 0.2, "divided by 2 because there are two gamed baselines"
CS = np.logspace(-4, 4, 10)  # LogisticRegressionCV(Cs=10)
N_SPLITS = 5
RANDOM_STATE = 123
_LOG_CLIP = 1e-15  # the official CV scorer clips predictions to [1e-15, 1 − 1e-15]


@dataclass(frozen=True)
class GamedRows:
    """Annotations of the gamed baselines, already featurised (the Hub file ``df_gamed.csv``)."""

    preference: np.ndarray  # in [0, 1]
    std_delta_len: np.ndarray
    instruction_difficulty: np.ndarray

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> GamedRows:
        return cls(frame["preference"].to_numpy(float), frame["std_delta_len"].to_numpy(float),
                   frame["instruction_difficulty"].to_numpy(float))

    def __len__(self) -> int:
        return len(self.preference)


@dataclass(frozen=True)
class LCResult:
    """A length-controlled win rate, how it was obtained, and the per-instruction GLM probabilities."""

    length_controlled_winrate: float
    lc_standard_error: float
    glm_preference: np.ndarray = field(repr=False)  # P(model wins) per instruction, length term at 0
    weights: dict[str, float]
    method: str  # "fit" or "published_weights"
    C: float | None = None
    cv_scores: np.ndarray | None = field(default=None, repr=False)  # (n_splits, len(CS)), higher is better
    n_gamed_rows: int = 0


def std_delta_len(baseline_outputs: Sequence[str], model_outputs: Sequence[str]) -> np.ndarray:
    """``(len(output_1) − len(output_2)) / std`` in characters, the std over all rows (ddof = 1, pandas)."""
    delta = np.array([len(a) for a in baseline_outputs], float) - np.array([len(b) for b in model_outputs], float)
    std = delta.std(ddof=1) if len(delta) > 1 else 0.0
    if not std > 0:
        # every row has the same length difference: the feature is constant 0 after centring-free scaling
        return np.zeros_like(delta)
    return delta / std


def _design(sdl: np.ndarray, difficulty: np.ndarray, not_gamed: np.ndarray) -> np.ndarray:
    return np.column_stack([np.tanh(sdl), difficulty, not_gamed]).astype(float)


def _liblinear(C: float) -> LogisticRegression:
    return LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", fit_intercept=False, random_state=RANDOM_STATE)


def _weighted_cross_entropy(p: np.ndarray, q: np.ndarray, w: np.ndarray) -> float:
    q = np.clip(q, _LOG_CLIP, 1 - _LOG_CLIP)
    return float(-np.mean(w * (p * np.log(q) + (1 - p) * np.log(1 - q))))


def fit_length_controlled(preferences: Sequence[float | None] | np.ndarray, sdl: np.ndarray,
                          instruction_difficulty: np.ndarray, gamed: GamedRows | None = None,
                          n_splits: int = N_SPLITS) -> LCResult:
    """Fit the length-controlled GLM on one model's rows (plus the gamed baselines' rows when given).

    ``preferences`` are AlpacaEval preferences in [1, 2] (NaN = unjudged, left out of the fit but predicted);
    ``sdl`` comes from :func:`std_delta_len`; ``instruction_difficulty`` is per row.
    """
    y = (clean_preferences(preferences) - 1.0).to_numpy()
    sdl = np.asarray(sdl, float)
    difficulty = np.asarray(instruction_difficulty, float)
    if not (len(y) == len(sdl) == len(difficulty)):
        raise PerpairError(f"LC fit: {len(y)} preferences, {len(sdl)} length features, "
                           f"{len(difficulty)} difficulties; they must be per row")
    X_model = _design(sdl, difficulty, np.ones_like(sdl))
    if gamed is not None and len(gamed):
        X = np.vstack([_design(gamed.std_delta_len, gamed.instruction_difficulty, np.zeros(len(gamed))), X_model])
        p = np.concatenate([gamed.preference, y])
        w = np.concatenate([np.full(len(gamed), GAMED_ROWS_WEIGHT), np.ones(len(y))])
    else:
        X, p, w = X_model, y, np.ones(len(y))
    keep = ~np.isnan(p)
    X, p, w = X[keep], p[keep], w[keep]
    n = len(p)
    if n < n_splits:
        raise PerpairError(f"the length-controlled win rate needs at least {n_splits} judged instructions, got {n}")

    # liblinear takes class labels, not probabilities: each row enters twice, as class 1 with weight w·p and as
    # class 0 with weight w·(1 − p), so the weighted log-likelihood is the cross-entropy of the soft label p.
    # The two copies share a CV group, and the second copy's soft label is 1 − (1 − p) as the official scorer has it.
    X2 = np.vstack([X, X])
    y2 = np.concatenate([np.ones(n, int), np.zeros(n, int)])
    p2 = np.concatenate([p, 1 - (1 - p)])
    w2 = np.concatenate([w, w])
    sample_weight = np.concatenate([p * w, (1 - p) * w])
    groups = np.tile(np.arange(n), 2)

    scores = np.empty((n_splits, len(CS)))
    for k, (train, test) in enumerate(GroupKFold(n_splits=n_splits).split(X2, y2, groups)):
        for j, C in enumerate(CS):
            model = _liblinear(C).fit(X2[train], y2[train], sample_weight=sample_weight[train])
            scores[k, j] = -_weighted_cross_entropy(p2[test], expit(X2[test] @ model.coef_[0]), w2[test])
    best = int(np.argmax(scores.sum(axis=0)))  # first best C on ties, as LogisticRegressionCV(refit=True)
    coef = _liblinear(CS[best]).fit(X2, y2, sample_weight=sample_weight).coef_[0]

    X_test = _design(np.zeros_like(sdl), difficulty, np.ones_like(sdl))  # "if there was no length difference"
    glm = expit(X_test @ coef)
    return LCResult(
        length_controlled_winrate=float(glm.mean() * 100), lc_standard_error=_sem(glm) * 100, glm_preference=glm,
        weights=dict(zip(FEATURES, map(float, coef), strict=True)), method="fit", C=float(CS[best]),
        cv_scores=scores, n_gamed_rows=int(gamed is not None and len(gamed)))


def predict_from_weights(model_weights: Mapping[str, float], instruction_difficulty: np.ndarray,
                         baseline_weights: Mapping[str, float] | None = None) -> LCResult:
    """LC win rate from published GLM weights (alpaca_eval ``predict_winrate``): the model's weights minus the
    baseline's (zero for the AlpacaEval 2.0 baseline itself), length term at 0, averaged over instructions."""
    if baseline_weights is None:
        baseline_weights = dict.fromkeys(FEATURES, 0.0)
    delta = {f: float(model_weights[f]) - float(baseline_weights[f]) for f in (DIFFICULTY_TERM, MODEL_TERM)}
    glm = expit(delta[MODEL_TERM] + delta[DIFFICULTY_TERM] * np.asarray(instruction_difficulty, float))
    weights = {f: float(model_weights[f]) for f in FEATURES}
    return LCResult(length_controlled_winrate=float(glm.mean() * 100), lc_standard_error=_sem(glm) * 100,
                    glm_preference=glm, weights=weights, method="published_weights")


def _sem(values: np.ndarray) -> float:
    return float(pd.Series(values).sem()) if len(values) > 1 else float("nan")
