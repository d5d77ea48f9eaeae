"""Agreement between two series of numbers, over their finite pairs: the statistics every report prints."""

from __future__ import annotations

import numpy as np
from scipy import stats


def compare(gt: np.ndarray, est: np.ndarray) -> dict[str, int | float | None]:
    """Return the number of finite pairs (``probes``), Pearson, Spearman and Kendall correlation of ``est`` with
    ``gt`` (None below 3 pairs or for a constant side) and the relative error Σ|GT − E| / Σ|GT|."""
    ok = np.isfinite(gt) & np.isfinite(est)
    g, e = gt[ok], est[ok]
    enough = ok.sum() >= 3 and np.ptp(g) > 0 and np.ptp(e) > 0
    return {"probes": int(ok.sum()),
            "pearson": float(stats.pearsonr(g, e).statistic) if enough else None,
            "spearman": float(stats.spearmanr(g, e).statistic) if enough else None,
            "kendall": float(stats.kendalltau(g, e).statistic) if enough else None,
            "relative_error": float(np.abs(g - e).sum() / np.abs(g).sum()) if np.abs(g).sum() > 0 else None}


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation of ``a`` and ``b`` over their finite pairs (None below 3, or a constant side)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    return float(stats.spearmanr(a[ok], b[ok]).statistic)


def by_participant(values: dict[int, float], n: int) -> np.ndarray:
    """A graph measure of participants 0..n-1 (networkx's dict) as an array, rounded to 12 digits: on a graph where
    every participant has the same value (a ring, an exponential graph, a torus), networkx's sums differ in the last
    bits (2.8e-17 measured), which ranks would turn into a correlation of noise."""
    return np.round([values[j] for j in range(n)], 12)


def ratios(a: np.ndarray, b: np.ndarray) -> dict[str, float] | None:
    """The ratio a/b over the pairs where both are finite and b is not 0: its ``median`` and quartiles ``low`` and
    ``high`` (a near-zero b makes one ratio huge, which quartiles do not report); None without such a pair."""
    ok = np.isfinite(a) & np.isfinite(b) & (b != 0)
    if not ok.any():
        return None
    low, median, high = np.percentile(a[ok] / b[ok], [25, 50, 75])
    return {"median": float(median), "low": float(low), "high": float(high)}


def rank_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    """Spearman and Kendall rank correlation of ``a`` and ``b`` over their finite pairs (None as ``spearman``)."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return {"spearman": None, "kendall": None}
    return {"spearman": float(stats.spearmanr(a[ok], b[ok]).statistic),
            "kendall": float(stats.kendalltau(a[ok], b[ok]).statistic)}
