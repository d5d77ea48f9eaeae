"""Comparisons of two runs' tables shared by the benches (``python bench/<name>.py`` puts this folder on
``sys.path``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


def on_scale(x: np.ndarray, y: np.ndarray) -> float:
    """max |x − y| / max |x| (inf where NaN is on one side only; NaN where both are all NaN)."""
    if not np.array_equal(np.isnan(x), np.isnan(y)):
        return math.inf
    both = ~np.isnan(x)
    if not both.any():
        return math.nan
    return float(np.max(np.abs(x[both] - y[both])) / (np.max(np.abs(x[both])) or 1.0))


def error_growth(base: pd.DataFrame, moved: pd.DataFrame, estimate: str, truth: str) -> float:
    """How DICE-E's own error grows from one run's dice table to another's, rows aligned: median |truth − estimate|
    in ``moved`` over the same in ``base`` (NaN where ``base`` has no such error)."""
    def error(table: pd.DataFrame) -> float:
        return float(np.nanmedian(np.abs(table[truth].to_numpy(np.float64) - table[estimate].to_numpy(np.float64))))

    before = error(base) if not base[truth].isna().all() and not base[estimate].isna().all() else math.nan
    return error(moved) / before if math.isfinite(before) and before > 0 else math.nan
