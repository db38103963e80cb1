"""Arena-Hard-Auto v0.1: judge prompt, verdict parser, battles, Bradley–Terry score against the baseline with a
bootstrap 95% interval, and optional style control.

Sources: Li et al. (2024), "From Crowdsourced Data to High-Quality Benchmarks: Arena-Hard and BenchBuilder",
arXiv 2406.11939; lm-sys/arena-hard-auto v0.1 (``config/judge_config.yaml`` for the prompt, ``gen_judgment.py``
for the verdict parser and the one retry, ``show_result.py`` for battles, weights and the bootstrap); style
control after the LMSYS post "Does Style Matter?" (2024-08-29): Bradley–Terry with normalised differences of
answer length and markdown counts as extra covariates. The maths below are pure functions; generation and judging
live in :mod:`perpair.eval.arena_run`.

What differs from show_result.py: the score without style control is the closed-form MLE (equal to the fitted
logistic regression's prediction, see :func:`bradley_terry_score`); the bootstrap draws the same indices as
pandas ``battles.sample(frac=1.0, replace=True, random_state=RandomState(seed))`` round after round, but the
official script draws from numpy's global state (seeded once, shared with its other random calls) over a battles
frame that holds every model, so intervals agree in distribution, not draw for draw.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user prompt displayed below. You will be given assistant A's answer and assistant B's answer. Your job is "
    "to evaluate which assistant's answer is better.\n\nBegin your evaluation by generating your own answer to the "
    "prompt. You must provide your answers before judging any answers.\n\nWhen evaluating the assistants' answers, "
    "compare both assistants' answers with your answer. You must identify and correct any mistakes or inaccurate "
    "information.\n\nThen consider if the assistant's answers are helpful, relevant, and concise. Helpful means the "
    "answer correctly responds to the prompt or follows the instructions. Note when user prompt has any ambiguity "
    "or more than one interpretation, it is more helpful and appropriate to ask for clarifications or more "
    "information from the user than providing an answer based on assumptions. Relevant means all parts of the "
    "response closely connect or are appropriate to what is being asked. Concise means the response is clear and "
    "not verbose or excessive.\n\nThen consider the creativity and novelty of the assistant's answers when needed. "
    "Finally, identify any missing important information in the assistants' answers that would be beneficial to "
    "include when responding to the user prompt.\n\nAfter providing your explanation, you must output only one of "
    "the following choices as your final verdict with a label:\n\n1. Assistant A is significantly better: "
    "[[A>>B]]\n2. Assistant A is slightly better: [[A>B]]\n3. Tie, relatively the same: [[A=B]]\n4. Assistant B is "
    "slightly better: [[B>A]]\n5. Assistant B is significantly better: [[B>>A]]\n\nExample output: \"My final "
    "verdict is tie: [[A=B]]\"."
)
USER_TEMPLATE = ("<|User Prompt|>\n{question}\n\n<|The Start of Assistant A's Answer|>\n{answer_a}\n<|The End of "
                 "Assistant A's Answer|>\n\n<|The Start of Assistant B's Answer|>\n{answer_b}\n<|The End of "
                 "Assistant B's Answer|>")
RETRY_MESSAGE = "continue your judgment and finish by outputting a final verdict label"
VERDICT_PATTERN = re.compile(r"\[\[([AB<>=]+)\]\]")
STRONG_WEIGHT = 3  # show_result.py: WEIGHT = 3 for [[A>>B]] / [[B>>A]]
BASELINE = "gpt-4-0314"
N_BOOTSTRAP = 100


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(question=question, answer_a=answer_a,
                                                             answer_b=answer_b)}]


@dataclass(frozen=True)
class Verdict:
    label: str | None  # "A>>B", "A>B", "A=B", "B>A", "B>>A", another [[...]] label, or None
    retry: bool  # no verdict at all: ask the judge once more (gen_judgment.py)
    conflicting: bool = False


def parse_verdict(judgment: str) -> Verdict:
    """The ``[[...]]`` label of a judgment (gen_judgment.py ``get_score``): one distinct label → it; none → no
    verdict and retry; several different labels → no verdict (conflicting), no retry."""
    labels = {m.strip("\n") for m in VERDICT_PATTERN.findall(judgment) if m != ""}
    if not labels:
        return Verdict(None, retry=True)
    if len(labels) > 1:
        return Verdict(None, retry=False, conflicting=True)
    return Verdict(labels.pop(), retry=False)


# (winner in game-1 orientation: +1 model, -1 baseline, 0 tie; weight). Game 1: A = baseline, B = model.
_OUTCOMES = {"A>>B": (-1, STRONG_WEIGHT), "A>B": (-1, 1), "A=B": (0, 1), "B>A": (1, 1), "B>>A": (1, STRONG_WEIGHT)}
OUTCOME_LABELS = frozenset(_OUTCOMES)


def game_outcome(label: str | None, model_is_a: bool) -> tuple[int, int]:
    """``(outcome for the model: +1 win, 0 tie, −1 loss; weight)``; an unknown or missing label weighs 0."""
    if label not in _OUTCOMES:
        return 0, 0
    outcome, weight = _OUTCOMES[label]
    return (-outcome if model_is_a else outcome), weight


@dataclass(frozen=True)
class Battles:
    """One row per counted battle (strong verdicts appear ``STRONG_WEIGHT`` times, as show_result.py expands them):
    the model's outcome (+1 / 0 / −1) and, for style control, its answer's and the baseline's style features."""

    outcome: np.ndarray
    model_features: np.ndarray | None = None  # (n, k)
    baseline_features: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.outcome)


def battles_from_games(games: Sequence[tuple[str | None, bool]],
                       model_features: Sequence[Sequence[float]] | None = None,
                       baseline_features: Sequence[Sequence[float]] | None = None) -> Battles:
    """``games``: ``(verdict label, model_is_a)`` per game; features per game (optional) for style control."""
    rows, idx = [], []
    for i, (label, model_is_a) in enumerate(games):
        outcome, weight = game_outcome(label, model_is_a)
        rows += [outcome] * weight
        idx += [i] * weight
    take = np.array(idx, int)
    mf = np.asarray(model_features, float)[take] if model_features is not None else None
    bf = np.asarray(baseline_features, float)[take] if baseline_features is not None else None
    return Battles(np.array(rows, float), mf, bf)


def _style_covariates(battles: Battles) -> np.ndarray:
    # Normalised difference (model − baseline) / (model + baseline), scaled to unit standard deviation, as in the
    # style-control post. Ours: not centred, because with one model against the baseline centring would move the
    # point "no style difference" to "the average style difference" and leave the model's style advantage in its
    # strength.
    m, b = battles.model_features, battles.baseline_features
    total = m + b
    diff = np.divide(m - b, total, out=np.zeros_like(total), where=total != 0)
    std = diff.std(axis=0)
    return diff / np.where(std > 0, std, 1.0)


def bradley_terry_score(battles: Battles, style_control: bool = False) -> float:
    """Score = 100 · P(model beats baseline) under the fitted Bradley–Terry model (show_result.py
    ``compute_mle_elo`` + ``predict_win_rate``; ties count half a win for each side).

    Without style control and with one model against the baseline, the maximum-likelihood probability is the
    weighted win rate ``(wins + ties / 2) / battles`` itself (closed form). With style control the model strength
    is fitted jointly with the style coefficients and the score is σ(strength), style differences at 0."""
    n = len(battles)
    if n == 0:
        return float("nan")
    y = battles.outcome
    if not style_control:
        return float(100 * np.mean((y + 1) / 2))
    # each battle is a "model wins" row with weight P and a "model loses" row with weight 1 − P (ties: ½, ½)
    win = (y + 1) / 2
    X = np.column_stack([np.ones(n), _style_covariates(battles)])
    X2, y2 = np.vstack([X, X]), np.concatenate([np.ones(n), np.zeros(n)])
    w2 = np.concatenate([win, 1 - win])
    if w2[:n].sum() == 0 or w2[n:].sum() == 0:  # all losses or all wins: the MLE is at the boundary
        return float(100 * win.mean())
    model = LogisticRegression(C=np.inf, fit_intercept=False, tol=1e-8, max_iter=1000)
    model.fit(X2, y2, sample_weight=w2)
    return float(100 * expit(model.coef_[0][0]))


@dataclass(frozen=True)
class ArenaScore:
    score: float
    lower: float
    upper: float
    n_battles: int
    style_control: bool

    def as_dict(self) -> dict[str, float | int | bool | None]:
        """JSON-ready: with no battle (no verdict at all) the score and interval are ``None``, not NaN."""
        def value(x: float) -> float | None:
            return None if np.isnan(x) else x

        return {"score": value(self.score), "rating_q025": value(self.lower), "rating_q975": value(self.upper),
                "n_battles": self.n_battles, "style_control": self.style_control}


def arena_score(battles: Battles, *, style_control: bool = False, n_rounds: int = N_BOOTSTRAP,
                seed: int = 42) -> ArenaScore:
    """Score with a bootstrap 95% interval: battles resampled with replacement ``n_rounds`` times
    (show_result.py ``get_bootstrap_result``: ``battles.sample(frac=1.0, replace=True)``; the indices here are
    exactly those pandas draws with ``random_state=np.random.RandomState(seed)`` kept across rounds), interval =
    the 2.5% and 97.5% percentiles on the Elo scale (:func:`_percentile_on_elo_scale`). No battle → NaN score and
    interval."""
    score = bradley_terry_score(battles, style_control)
    rng = np.random.RandomState(seed)
    n = len(battles)
    samples = []
    for _ in range(n_rounds if n else 0):
        take = rng.choice(n, size=n, replace=True)  # pandas.core.sample.sample with replace=True, no weights
        sample = Battles(battles.outcome[take],
                         None if battles.model_features is None else battles.model_features[take],
                         None if battles.baseline_features is None else battles.baseline_features[take])
        samples.append(bradley_terry_score(sample, style_control))
    lower, upper = ((_percentile_on_elo_scale(samples, 0.025), _percentile_on_elo_scale(samples, 0.975)) if samples
                    else (np.nan, np.nan))
    return ArenaScore(score, float(lower), float(upper), n, style_control)


def _percentile_on_elo_scale(samples: Sequence[float], q: float) -> float:
    """The ``q`` percentile of bootstrap scores as show_result.py takes it: ``np.percentile`` (linear) of the Elo
    ratings, then their win rate against the baseline. The Elo is linear in the logit of the win rate, so this is the
    linear interpolation between the two neighbouring order statistics done on the logit scale (on the win rate
    itself it differs by up to a few hundredths of a point). Between a score of 0 or 100 and another (the fit at the
    boundary, where the official solver stops at some large finite Elo) the interpolation is on the win rate."""
    ordered = np.sort(np.asarray(samples, float)) / 100
    h = (len(ordered) - 1) * q
    i = int(np.floor(h))
    j = min(i + 1, len(ordered) - 1)
    a, b, g = ordered[i], ordered[j], h - i
    if g == 0 or a == b:
        return float(100 * a)
    if 0 < a and b < 1:
        la, lb = np.log(a / (1 - a)), np.log(b / (1 - b))
        return float(100 * expit(la + (lb - la) * g))
    return float(100 * (a + (b - a) * g))


_HEADER = re.compile(r"^#{1,6}\s", re.MULTILINE)
_LIST = re.compile(r"^\s*(?:[-*+]|\d+\.)\s", re.MULTILINE)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")


def style_features(answer: str, n_tokens: int | None = None) -> list[float]:
    """Answer length (tokens when counted, else characters) and counts of markdown headers, list items and bold
    spans (the style-control covariates)."""
    length = n_tokens if n_tokens is not None else len(answer)
    return [float(length), float(len(_HEADER.findall(answer))), float(len(_LIST.findall(answer))),
            float(len(_BOLD.findall(answer)))]
