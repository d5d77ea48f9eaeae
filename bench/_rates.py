"""Seconds per round from the round-end timestamps a driver sees, when rounds arrive in chunks.

The Ray engine hands short rounds to one actor in chunks (``RayEngine.run_rounds``: ~0.1 s of rounds per task), so
the driver sees a chunk's rounds end together: a burst of timestamps. A rate taken between two arbitrary rounds
would count a burst's near-zero gaps; it is taken between the ends of two bursts instead.
"""

from __future__ import annotations

import numpy as np


def burst_rate(ends: list[float], lo: int, hi: int) -> tuple[float | None, int]:
    """(seconds per round between the first and the last burst end among ``ends[lo..hi]``, rounds in between); a
    burst ends where the gap to the next timestamp is over 0.3 of the largest gap there. (None, 0) if fewer than two
    bursts end in the window (too few rounds to tell)."""
    if hi - lo < 2:
        return None, 0
    gaps = np.diff(ends[lo: hi + 1])
    threshold = 0.3 * float(gaps.max())
    bursts = [lo + i for i, gap in enumerate(gaps) if gap > threshold]
    if len(bursts) < 2:
        return None, 0
    first, last = bursts[0], bursts[-1]
    return (ends[last] - ends[first]) / (last - first), last - first
