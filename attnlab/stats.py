"""Statistics shared by the causal test, the intervention harness and the head searches (numpy only).

- ``bootstrap_ci``: seeded percentile bootstrap interval of a mean (resample the values with replacement
  ``n_boot`` times, take the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the resampled means);
- ``paired_bootstrap``: the same for two paired arms and their difference, with one resampling of the item indices
  shared by both arms, so the difference's interval accounts for the pairing;
- ``spearman``: Spearman rank correlation (average ranks for ties).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def _resampled_means(arrays: Sequence[np.ndarray], n_boot: int, seed: int) -> list[np.ndarray]:
    """Means of ``n_boot`` resamples (with replacement) of equal-length arrays, the same indices for all."""
    n = len(arrays[0])
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    return [a[idx].mean(1) for a in arrays]


def _interval(means: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.percentile(means, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def bootstrap_ci(
    values: Sequence[float], *, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (a single value gives a zero-width interval; no values: NaN, NaN)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    (means,) = _resampled_means([v], n_boot, seed)
    return _interval(means, level)


def paired_bootstrap(
    baseline: Sequence[float], intervened: Sequence[float], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Means of two paired per-item scores, their difference, and seeded percentile bootstrap intervals.

    One draw resamples item indices with replacement and uses them for both arms, so the difference's interval
    accounts for the pairing (identical arms give a difference of exactly 0 with interval [0, 0]).
    """
    a, b = np.asarray(baseline, dtype=float), np.asarray(intervened, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired scores need two equal-length non-empty 1-D arrays, got {a.shape} and {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    ma, mb = _resampled_means([a, b], n_boot, seed)
    lo_a, hi_a = _interval(ma, level)
    lo_b, hi_b = _interval(mb, level)
    lo_d, hi_d = _interval(mb - ma, level)
    return {
        "baseline": float(a.mean()),
        "baseline_lo": lo_a,
        "baseline_hi": hi_a,
        "intervened": float(b.mean()),
        "intervened_lo": lo_b,
        "intervened_hi": hi_b,
        "diff": float(b.mean() - a.mean()),
        "diff_lo": lo_d,
        "diff_hi": hi_d,
        "n": int(len(a)),
    }


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two arrays (NaN pairs dropped; NaN if fewer than 3 pairs or no spread)."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    ra, rb = pd.Series(a[ok]).rank().to_numpy(), pd.Series(b[ok]).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])
