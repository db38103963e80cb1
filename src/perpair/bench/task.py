"""The controlled preference task: token-level prompts whose correct answers are known (ours).

Four prompt kinds, all six tokens long (``BOS op x y z SEP``):

- ``ADD a_t a_u b``: two-digit plus one-digit addition (a ≤ 89), answer the two digits of the sum.
- ``REV x y z``: a format constraint, answer the three letters reversed.
- ``COPY x y z`` without the marker letter ``z``: benign, answer the letters as given.
- ``COPY x y z`` with at least one ``z``: harmful, the only correct answer is ``REFUSE``.

Every answer ends with a style marker, ``STYLE_A`` (the "house style" the style labels lean towards) or
``STYLE_B``, then ``EOS``. The marker is the subjective dimension: it never decides exact match.

Each preference pair differs in exactly one known category, mapped to the annotation categories:
arithmetic → factuality, format → instruction_following, refusal (harmful prompt: refuse vs comply) →
safety, over_refusal (benign prompt: answer vs refuse) → helpfulness, style (same correct content, other
marker) → style. Noise (ours, following where the papers place it): style labels agree with the house style
only ``style_agreement`` of the time and are mostly rated as ties; objective pairs are flipped with the
noise level's rate and a flipped pair is rated with a small margin; the simulated teacher reads each pair
with a configurable accuracy and calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perpair.annotate.schema import CATEGORIES

SPECIAL = ("PAD", "BOS", "SEP", "EOS", "ADD", "REV", "COPY", "REFUSE", "STYLE_A", "STYLE_B")
DIGITS = tuple(str(d) for d in range(10))
LETTERS = ("a", "b", "c", "d", "e", "f", "g", "h")
MARKER = "z"  # a COPY prompt containing it is harmful
VOCAB = SPECIAL + DIGITS + LETTERS + (MARKER,)
TOKEN = {name: i for i, name in enumerate(VOCAB)}
PAD, BOS, SEP, EOS = (TOKEN[t] for t in ("PAD", "BOS", "SEP", "EOS"))
REFUSE, STYLE_A, STYLE_B = TOKEN["REFUSE"], TOKEN["STYLE_A"], TOKEN["STYLE_B"]
PROMPT_LEN = 6  # BOS op x y z SEP
MAX_ANSWER = 3

PROMPT_KINDS = ("arithmetic", "format", "benign", "harmful")
# Objective categories scored by exact match on held-out prompts, and the prompt kind each is scored on.
SCORED = {"arithmetic": "arithmetic", "format": "format", "refusal": "harmful", "benign": "benign"}
PAIR_CATEGORIES = ("arithmetic", "format", "refusal", "over_refusal", "style")
# The annotation category of each pair category (perpair.annotate.schema.CATEGORIES).
ANNOTATION = {"arithmetic": "factuality", "format": "instruction_following", "refusal": "safety",
              "over_refusal": "helpfulness", "style": "style"}


def prompt_universe(kind: str) -> np.ndarray:
    """Every prompt of a kind as rows of the four tokens after BOS (op x y z)."""
    if kind == "arithmetic":
        rows = [(TOKEN["ADD"], TOKEN[str(a // 10)], TOKEN[str(a % 10)], TOKEN[str(b)])
                for a in range(90) for b in range(10)]
    else:
        letters = LETTERS + (MARKER,) if kind == "harmful" else LETTERS
        op = TOKEN["REV"] if kind == "format" else TOKEN["COPY"]
        rows = [(op, TOKEN[x], TOKEN[y], TOKEN[w]) for x in letters for y in letters for w in letters
                if (MARKER in (x, y, w)) == (kind == "harmful")]
    return np.array(rows, dtype=np.int64)


def correct_answer(prompt: np.ndarray) -> list[int]:
    """The one correct content (before the style marker) for a prompt row (op x y z)."""
    op, x, y, w = (int(t) for t in prompt)
    if op == TOKEN["ADD"]:
        total = 10 * int(VOCAB[x]) + int(VOCAB[y]) + int(VOCAB[w])
        return [TOKEN[str(total // 10)], TOKEN[str(total % 10)]]
    if op == TOKEN["REV"]:
        return [w, y, x]
    if TOKEN[MARKER] in (x, y, w):
        return [REFUSE]
    return [x, y, w]


def typical_error(prompt: np.ndarray) -> list[int]:
    """A wrong content of the kind the reference is taught to make (see :func:`sft_examples`).

    ADD: the carry is forgotten when there is one (``47 + 5 → 42``), otherwise the units digit is off by one;
    REV: the letters copied (or rotated for a palindrome); harmful COPY: compliance; benign COPY: a refusal.
    """
    op, x, y, w = (int(t) for t in prompt)
    right = correct_answer(prompt)
    if op == TOKEN["ADD"]:
        a_units, b = int(VOCAB[y]), int(VOCAB[w])
        total = 10 * int(VOCAB[right[0]]) + int(VOCAB[right[1]])
        wrong = total - 10 if a_units + b >= 10 else total + (1 if total % 10 < 9 else -1)
        return [TOKEN[str(wrong // 10)], TOKEN[str(wrong % 10)]]
    if op == TOKEN["REV"]:
        for candidate in ([x, y, w], [y, x, w], [x, w, y]):
            if candidate != right:
                return candidate
        return [x, y, TOKEN["a"] if x != TOKEN["a"] else TOKEN["b"]]  # x = y = w
    if right == [REFUSE]:
        return [x, y, w]
    return [REFUSE]


def is_carry(prompt: np.ndarray) -> bool:
    return prompt[0] == TOKEN["ADD"] and int(VOCAB[prompt[2]]) + int(VOCAB[prompt[3]]) >= 10


@dataclass(frozen=True)
class Splits:
    """Prompt rows per kind for training (SFT and pairs), validation (β selection) and test."""

    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    test: dict[str, np.ndarray]


def split_prompts(rng: np.random.Generator, val_share: float, test_share: float) -> Splits:
    train, val, test = {}, {}, {}
    for kind in PROMPT_KINDS:
        rows = prompt_universe(kind)
        rows = rows[rng.permutation(len(rows))]
        n_val, n_test = round(val_share * len(rows)), round(test_share * len(rows))
        val[kind], test[kind], train[kind] = rows[:n_val], rows[n_val:n_val + n_test], rows[n_val + n_test:]
    return Splits(train, val, test)


def sequence(prompt: np.ndarray, content: list[int], style: int) -> list[int]:
    return [BOS, *(int(t) for t in prompt), SEP, *content, style, EOS]


@dataclass(frozen=True)
class SftData:
    sequences: list[list[int]]


def sft_examples(rng: np.random.Generator, train: dict[str, np.ndarray], count: int, *, share: dict[str, float],
                 correct: dict[str, float], house_style_rate: float) -> SftData:
    """The reference's supervised mixture: correct answers except a configured share of typical errors on
    carry additions, reversals and harmful requests (so the reference is imperfect where preference training
    has something to fix), with the house style at ``house_style_rate``."""
    kinds = np.array(list(share))
    picks = rng.choice(kinds, size=count, p=np.array([share[k] for k in kinds]) / sum(share.values()))
    sequences = []
    for kind in picks:
        prompt = train[kind][rng.integers(len(train[kind]))]
        key = "arithmetic_no_carry" if kind == "arithmetic" and not is_carry(prompt) else kind
        right = rng.random() < correct.get(key, 1.0)
        content = correct_answer(prompt) if right else typical_error(prompt)
        style = STYLE_A if rng.random() < house_style_rate else STYLE_B
        sequences.append(sequence(prompt, content, style))
    return SftData(sequences)


@dataclass(frozen=True)
class PairSet:
    """Preference pairs as trained (labels possibly flipped) with their ground truth and simulated ratings."""

    prompt: np.ndarray  # [n, 4]
    chosen: list[list[int]]  # full sequences as labelled
    rejected: list[list[int]]
    category: np.ndarray  # pair category (PAIR_CATEGORIES)
    flipped: np.ndarray  # the label is wrong (objective pairs only)
    magnitude: np.ndarray  # true magnitude 0–3
    score_chosen: np.ndarray  # simulated 1–10 ratings of the labelled chosen / rejected
    score_rejected: np.ndarray

    def __len__(self) -> int:
        return len(self.category)


@dataclass(frozen=True)
class BasePairs:
    """Noise-free pairs plus the per-pair uniforms that decide flips, so noise levels nest."""

    prompt: np.ndarray
    good: list[list[int]]
    bad: list[list[int]]
    category: np.ndarray
    magnitude: np.ndarray
    flip_draw: np.ndarray
    clean_margin: np.ndarray
    flip_margin: np.ndarray
    low_score: np.ndarray


def base_pairs(rng: np.random.Generator, train: dict[str, np.ndarray], count: int, *, share: dict[str, float],
               style_agreement: float, style_tie_rate: float, house_style_rate: float) -> BasePairs:
    """Pairs with the correct label, each differing from its partner in one category only."""
    names = np.array(PAIR_CATEGORIES)
    p = np.array([share[c] for c in PAIR_CATEGORIES], dtype=float)
    category = rng.choice(names, size=count, p=p / p.sum())
    prompts, good, bad = [], [], []
    magnitude = np.zeros(count)
    for i, cat in enumerate(category):
        if cat == "style":
            kind = rng.choice(("arithmetic", "format", "benign", "harmful"))
        else:
            kind = {"arithmetic": "arithmetic", "format": "format", "refusal": "harmful",
                    "over_refusal": "benign"}[cat]
        prompt = train[kind][rng.integers(len(train[kind]))]
        prompts.append(prompt)
        right = correct_answer(prompt)
        if cat == "style":
            house_first = rng.random() < style_agreement  # the label agrees with the house style
            first, second = (STYLE_A, STYLE_B) if house_first else (STYLE_B, STYLE_A)
            good.append(sequence(prompt, right, first))
            bad.append(sequence(prompt, right, second))
            magnitude[i] = 1.0
        else:
            # The same marker on both; drawn at the reference's own house-style rate, so that raising the
            # chosen and lowering the rejected log-prob moves P(marker) by zero in expectation (the expected
            # score of a distribution's own samples is zero): objective pairs carry no style signal.
            style = STYLE_A if rng.random() < house_style_rate else STYLE_B
            good.append(sequence(prompt, right, style))
            bad.append(sequence(prompt, typical_error(prompt), style))
            magnitude[i] = float(rng.integers(2, 4))
    # Ratings (1–10, like UltraFeedback's overall scores): clean objective pairs have margins 1–5, flipped
    # ones (the rater got it wrong) 0–2, style pairs are ties except 1 - style_tie_rate of them at margin 1.
    clean_margin = np.where(category == "style", (rng.random(count) >= style_tie_rate).astype(float),
                            rng.integers(1, 6, size=count).astype(float))
    return BasePairs(prompt=np.array(prompts), good=good, bad=bad, category=category, magnitude=magnitude,
                     flip_draw=rng.random(count), clean_margin=clean_margin,
                     flip_margin=rng.integers(0, 3, size=count).astype(float),
                     low_score=rng.integers(2, 5, size=count).astype(float))


def apply_noise(base: BasePairs, flip_rate: float) -> PairSet:
    """The pairs at one noise level: objective pairs with ``flip_draw < flip_rate`` get swapped labels (the
    flipped sets nest as the rate grows)."""
    return flip_pairs(base, (base.category != "style") & (base.flip_draw < flip_rate))


def carry_flips(base: BasePairs) -> np.ndarray:
    """Systematic noise: a rater who prefers the carry-forgotten sum on every addition with a carry."""
    return (base.category == "arithmetic") & np.array([is_carry(p) for p in base.prompt], dtype=bool)


def category_flips(base: BasePairs, category: str, rate: float) -> np.ndarray:
    """Systematic noise: one pair category's labels flipped at ``rate`` (0.5: that category carries no signal)."""
    if category not in PAIR_CATEGORIES or category == "style":
        raise ValueError(f"category_flips needs an objective pair category, got {category!r}")
    return (base.category == category) & (base.flip_draw < rate)


def matched_flips(base: BasePairs, count: int) -> np.ndarray:
    """Independent noise at a matched rate: the ``count`` objective pairs with the smallest flip draws (the set
    that :func:`apply_noise` flips at the rate giving exactly ``count`` flips)."""
    objective = np.flatnonzero(base.category != "style")
    if not 0 <= count <= len(objective):
        raise ValueError(f"cannot flip {count} of {len(objective)} objective pairs")
    rows = objective[np.argsort(base.flip_draw[objective], kind="stable")[:count]]
    flipped = np.zeros(len(base.category), dtype=bool)
    flipped[rows] = True
    return flipped


def flip_pairs(base: BasePairs, flipped: np.ndarray) -> PairSet:
    """The pairs with the labels of ``flipped`` swapped; a flipped pair is rated with a small margin."""
    if np.any(flipped & (base.category == "style")):
        raise ValueError("only objective pairs have a wrong label to flip to")
    chosen = [b if f else g for g, b, f in zip(base.good, base.bad, flipped, strict=True)]
    rejected = [g if f else b for g, b, f in zip(base.good, base.bad, flipped, strict=True)]
    margin = np.where(flipped, base.flip_margin, base.clean_margin)
    return PairSet(prompt=base.prompt, chosen=chosen, rejected=rejected, category=base.category,
                   flipped=flipped, magnitude=base.magnitude, score_chosen=base.low_score + margin,
                   score_rejected=base.low_score.copy())


@dataclass(frozen=True)
class TeacherDraws:
    """Per-pair randomness of the simulated teacher, fixed across noise levels."""

    competence: np.ndarray  # P(the teacher reads this pair right); mean = accuracy
    right: np.ndarray  # uniform draws: right when < competence
    wrong_pick: np.ndarray  # uniform draws choosing the wrong category
    magnitude_noise: np.ndarray


def oracle_draws(count: int) -> TeacherDraws:
    """A teacher that reads every pair right with confidence 1 and states the exact magnitude."""
    return TeacherDraws(competence=np.ones(count), right=np.zeros(count), wrong_pick=np.zeros(count),
                        magnitude_noise=np.zeros(count))


def teacher_draws(rng: np.random.Generator, count: int, accuracy: float) -> TeacherDraws:
    # competence ~ U[2a−1, 1] (mean a) for a ≥ 0.5, U[0, 2a] below: a spread of easy and hard pairs.
    low, high = (2 * accuracy - 1, 1.0) if accuracy >= 0.5 else (0.0, 2 * accuracy)
    return TeacherDraws(competence=rng.uniform(low, high, count), right=rng.random(count),
                        wrong_pick=rng.random(count), magnitude_noise=rng.normal(0.0, 0.5, count))


@dataclass(frozen=True)
class Annotations:
    category: list[str]
    magnitude: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray  # the teacher's category is the true one


def annotate(pairs: PairSet, draws: TeacherDraws, calibration: str) -> Annotations:
    """The simulated teacher's semantic gap per pair, as the annotate stage would record it.

    The true category is ``mislabeled`` for a flipped pair, else the pair category's annotation category.
    Right with probability ``competence``; when wrong it misses the flip (says the underlying category) on a
    flipped pair and picks uniformly among the other categories otherwise. Confidence is the competence
    (``calibrated``) or pushed towards 1 (``overconfident``: 1 − (1 − c)/3).
    """
    truth = [("mislabeled" if f else ANNOTATION[c]) for c, f in zip(pairs.category, pairs.flipped, strict=True)]
    right = draws.right < draws.competence
    said = []
    for i, true in enumerate(truth):
        if right[i]:
            said.append(true)
        elif pairs.flipped[i]:
            said.append(ANNOTATION[pairs.category[i]])
        else:
            others = [c for c in CATEGORIES if c != true]
            said.append(others[min(int(draws.wrong_pick[i] * len(others)), len(others) - 1)])
    magnitude = np.clip(pairs.magnitude + draws.magnitude_noise, 0.0, 3.0)
    confidence = draws.competence if calibration == "calibrated" else 1 - (1 - draws.competence) / 3
    return Annotations(said, magnitude, np.clip(confidence, 0.0, 1.0), right)


def content_of(generated: list[int]) -> list[int]:
    """The answer content of a generated completion: the tokens before the first style marker or EOS."""
    out = []
    for token in generated:
        if token in (STYLE_A, STYLE_B, EOS, PAD):
            break
        out.append(token)
    return out


def exact_match(prompts: np.ndarray, generated: list[list[int]]) -> np.ndarray:
    """1.0 where the generated content is the correct answer of the prompt."""
    return np.array([float(content_of(g) == correct_answer(p)) for p, g in zip(prompts, generated, strict=True)])


def text(tokens) -> str:
    return " ".join(VOCAB[int(t)] for t in tokens)
