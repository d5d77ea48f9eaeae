"""The summary plot of a sweep: metrics against one swept field, one line per value of another."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from dice_ray.results import write_atomic
from dice_ray.sweep.metrics import STATISTICS
from dice_ray.sweep.spec import PlotSpec


def _key(value: Any) -> tuple[int, Any]:
    """Sort numbers by value and anything else by its text, numbers first."""
    return (0, value) if isinstance(value, int | float) and not isinstance(value, bool) else (1, str(value))


ALIGNMENT_METRIC = re.compile(rf"({'|'.join((*STATISTICS, 'correction'))})_h(\d+)_(\w+)")
WORDS = {"acc": "accuracy", "auc": "ROC AUC", "heldout": "held-out"}


def metric_title(metric: str) -> str:
    """A panel's title: ``spearman_h2_curvature`` reads "Spearman, hop 2 (curvature)", ``auc_dice_e`` "ROC AUC,
    DICE-E", any other name its words with the abbreviations spelled out (``final_heldout_acc``: "final held-out
    accuracy")."""
    aligned = ALIGNMENT_METRIC.fullmatch(metric)
    if aligned:
        statistic, hop, variant = aligned.groups()
        return f"{statistic.replace('_', ' ').capitalize()}, hop {hop} ({variant.replace('_', '-')})"
    if metric in ("auc_dice_e", "auc_dice_gt"):
        return f"ROC AUC, DICE-{metric.rsplit('_', 1)[1].upper()}"
    return " ".join(WORDS.get(word, word) for word in metric.split("_"))


def plot_trials(rows: list[dict[str, Any]], plot: PlotSpec, path: Path) -> Path:
    """Draw one panel per metric of ``plot.y`` (two to a row, titled by ``metric_title``) against the field
    ``plot.x``, one line per value of ``plot.by``; each point is the mean over the ok trials sharing (x, by) (e.g.
    over swept seeds). Failed trials and missing values are left out. Writes a PNG to ``path`` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    lines = sorted({r["params"].get(plot.by) if plot.by else None for r in ok}, key=_key)
    columns = min(2, len(plot.y))  # two panels to a row: the image stays legible at a page's width
    rows_of_panels = math.ceil(len(plot.y) / columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(5.0 * columns, 3.6 * rows_of_panels),
                             constrained_layout=True, squeeze=False)
    for ax in axes.flat[len(plot.y):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, plot.y, strict=False):
        for line in lines:
            points: dict[Any, list[float]] = {}
            for r in ok:
                value = r["metrics"].get(metric, r.get(metric))
                if (not plot.by or r["params"].get(plot.by) == line) and value is not None:
                    points.setdefault(r["params"][plot.x], []).append(value)
            xs = sorted(points, key=_key)
            ax.plot([str(x) if _key(x)[0] else x for x in xs], [np.mean(points[x]) for x in xs], marker="o",
                    label=None if plot.by is None else str(line))
        if plot.logx:
            ax.set_xscale("log")
        ax.set_title(metric_title(metric), fontsize=12)
        ax.set_xlabel(plot.x, fontsize=11)
        ax.set_ylabel(metric, fontsize=9, color="0.4")
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
        if plot.by and ax is axes.flat[0]:  # one legend: the lines are the same in every panel
            ax.legend(title=plot.by, fontsize=10, title_fontsize=10)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
