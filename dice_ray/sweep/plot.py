"""The summary plot of a sweep: metrics against one swept field, one line per value of another."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dice_ray.results import write_atomic
from dice_ray.sweep.spec import PlotSpec


def _key(value: Any) -> tuple[int, Any]:
    """Sort numbers by value and anything else by its text, numbers first."""
    return (0, value) if isinstance(value, int | float) and not isinstance(value, bool) else (1, str(value))


def plot_trials(rows: list[dict[str, Any]], plot: PlotSpec, path: Path) -> Path:
    """Draw one panel per metric of ``plot.y`` against the field ``plot.x``, one line per value of
    ``plot.by``; each point is the mean over the ok trials sharing (x, by) (e.g. over swept seeds).
    Failed trials and missing values are left out. Writes a PNG to ``path`` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    lines = sorted({r["params"].get(plot.by) if plot.by else None for r in ok}, key=_key)
    fig, axes = plt.subplots(1, len(plot.y), figsize=(4.2 * len(plot.y), 3.4), constrained_layout=True,
                             squeeze=False)
    for ax, metric in zip(axes[0], plot.y, strict=True):
        for line in lines:
            points: dict[Any, list[float]] = {}
            for r in ok:
                value = r["metrics"].get(metric, r.get(metric))
                if (not plot.by or r["params"].get(plot.by) == line) and value is not None:
                    points.setdefault(r["params"][plot.x], []).append(value)
            xs = sorted(points, key=_key)
            label = f"{plot.by.split('.')[-1]} = {line}" if plot.by else None
            ax.plot([str(x) if _key(x)[0] else x for x in xs], [np.mean(points[x]) for x in xs], marker="o",
                    label=label)
        if plot.logx:
            ax.set_xscale("log")
        ax.set_xlabel(plot.x)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if plot.by:
            ax.legend(fontsize=8)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path
