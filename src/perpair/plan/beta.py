"""The per-pair β schedule (SP²DPO's idea; the formula is ours, see DESIGN "Plan").

Reading of the DPO gradient behind it: a pair's weight is β·σ(−β·Δ), whose integral over the margin Δ
is log 2 whatever β is, while the margin at which the pair stops pushing scales as 1/β. So a small β_i
enforces the preference further (high-signal pairs) and a large β_i keeps the policy near the reference
(low-signal or doubtful pairs). All functions are pure and vectorised over pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def magnitude_gain(magnitude: np.ndarray, table: Sequence[float]) -> np.ndarray:
    """g(magnitude) from its values at 0, 1, 2, 3, linear in between.

    At an integer magnitude the table entry is returned exactly (no interpolation round-off), so a
    human reading the table reproduces g bit for bit; in between, ``g(j) + t·(g(j+1) − g(j))``.
    """
    magnitude = np.asarray(magnitude, dtype=np.float64)
    values = np.asarray(table, dtype=np.float64)
    low = np.clip(np.floor(np.nan_to_num(magnitude)), 0, len(values) - 2).astype(np.int64)
    t = magnitude - low
    between = values[low] + t * (values[low + 1] - values[low])
    return np.where(t == 0, values[low], np.where(t == 1, values[low + 1], between))


def signal_strength(prior: np.ndarray, gain: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """s = prior(category) · g(magnitude) · confidence, in [0, 1] when each factor is."""
    return np.asarray(prior) * np.asarray(gain) * np.asarray(confidence)


def interpolate_beta(signal: np.ndarray, beta_min: float, beta_max: float) -> np.ndarray:
    """β = β_max^(1−s) · β_min^s: log-linear from β_max (no signal) to β_min (full signal)."""
    signal = np.asarray(signal, dtype=np.float64)
    return np.power(beta_max, 1.0 - signal) * np.power(beta_min, signal)


def geometric_mean(values: np.ndarray) -> float:
    return float(np.exp(np.mean(np.log(np.asarray(values, dtype=np.float64)))))


def normalisation_factor(betas: np.ndarray, target: float) -> float:
    """The c for which the geometric mean of c·β_i is ``target`` (so a known-good global β carries over)."""
    return target / geometric_mean(betas)


def random_assignment(count: int, seed: int) -> np.ndarray:
    """The seeded permutation for the random-β control: position k receives the β of ``perm[k]``.

    PCG64 seeded through SeedSequence gives the same permutation on every platform; the caller applies it
    to pairs sorted by pair_id, so the assignment depends only on content and the seed.
    """
    return np.random.default_rng([seed, _STREAM_BETA]).permutation(count)


_STREAM_BETA = 1  # independent random streams per use of the one configured seed
