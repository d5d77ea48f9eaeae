"""The reports' figures: each a function of a computed report (or its data) and the PNG path it writes.

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure``), not pyplot: drawing one changes no
global state, so a notebook's backend stays as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dice_ray.results import write_atomic

__all__ = [
    "alignment_scatter",
    "cascade_decay",
    "cascade_comparison",
    "detection_roc",
    "contribution_shares",
    "signed_heatmap",
]

DPI = 120


# One scatter marker per DICE-E variant (first-order, curvature, second-order, exact-readout), and spares
MARKERS = "ox+^sDv"
LINE_STYLES = ["-", "--", ":", "-."]  # one per detector: lines that coincide stay told apart


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), constrained_layout=True)


def alignment_scatter(dice: pd.DataFrame, variants: dict[str, str], hop: int, path: Path) -> Any:
    """DICE-E against DICE-GT at hop ``hop``, one marker per variant: the hop-r term (left) and the cumulative
    DICE^{(r)} (right), with the line E = GT. ``dice``: the run's ``dice`` table; ``variants``: variant -> its
    estimate column. Returns the figure (saved to ``path``)."""
    dice = dice[dice["hops"] == hop]
    fig = _figure(9, 4.2)
    for ax, (quantity, suffix) in zip(fig.subplots(1, 2), (("hop", "_hop"), ("cumulative", "")), strict=True):
        gt = dice[f"gt{suffix}"].to_numpy(float)
        for (variant, column), marker in zip(variants.items(), MARKERS, strict=False):
            ax.scatter(gt, dice[f"{column}{suffix}"].to_numpy(float), s=12, marker=marker, label=variant, alpha=0.7)
        lo, hi = np.nanmin(gt), np.nanmax(gt)
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, label="E = GT")
        ax.set_xlabel("DICE-GT")
        ax.set_ylabel("DICE-E")
        ax.set_title(f"hop {hop}: " + (f"hop-{hop} term" if quantity == "hop" else f"cumulative DICE$^{{({hop})}}$"))
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelrotation=30)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    return fig


def cascade_decay(decay: pd.DataFrame, value: str, path: Path) -> None:
    """Mean |influence| against hop distance from the source, one line per step after the probe (log scale).
    ``decay``: the cascade report's ``cascade`` table; ``value``: the influence column it averages."""
    _decay_lines({f"after {s} round{'s' if s != 1 else ''}": rows for s, rows in decay.groupby("step")},
                 f"mean |influence| ({value})",
                 "influence cascade: ripples decay with distance", (5, 3.6), path)


def _decay_lines(lines: dict[str, pd.DataFrame], ylabel: str, title: str, size: tuple[float, float],
                 path: Path) -> None:
    """One line per label of ``lines`` (``cascade`` rows: mean |influence| against hop distance), log scale."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(*size)
    ax = fig.subplots()
    for (label, rows), marker in zip(lines.items(), MARKERS * len(lines), strict=False):
        ax.plot(rows["distance"], rows["mean_abs"], marker=marker, label=label)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("hop distance from the source")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))


def cascade_comparison(decays: dict[str, pd.DataFrame], path: Path) -> None:
    """Mean |influence| against hop distance at each run's last step R, one line per run (log scale): how fast the
    cascade decays on one graph against another. ``decays``: label -> that run's ``cascade`` rows at step R."""
    _decay_lines(decays, "mean |influence| after R rounds", "influence cascade by run", (5.5, 3.8), path)


def detection_roc(final: pd.DataFrame, curves: dict[str, tuple[np.ndarray, np.ndarray]], horizon: int,
                  path: Path) -> None:
    """ROC curves of every detector at ``horizon`` (left) and its overall ROC AUC as rounds accumulate (right).
    ``final``: each (method, pair)'s running score at its last scoring round before ``horizon``; ``curves``: method
    -> (t + 1 for each scoring round t, AUC after it). Each method has a line style of its own: two detectors that
    score alike (the windowed one over a window as long as the run) draw one over the other, and both stay seen."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = _figure(10, 4.2)
    left, right = fig.subplots(1, 2)
    from matplotlib.ticker import MaxNLocator

    for method, style in zip(curves, LINE_STYLES * len(curves), strict=False):
        at = final[final["method"] == method]
        if 0 < at["anomalous"].sum() < len(at):
            fpr, tpr, _ = roc_curve(at["anomalous"], at["value"])
            auc = roc_auc_score(at["anomalous"], at["value"])
            left.plot(fpr, tpr, linestyle=style, label=f"{method} (AUC {auc:.3f})")
        right.plot(*curves[method], linestyle=style, marker=".", label=method)
    left.plot([0, 1], [0, 1], color="grey", linewidth=1)
    left.set_xlabel("false positive rate (honest neighbours flagged)")
    left.set_ylabel("true positive rate (anomalous neighbours flagged)")
    left.set_title(f"ROC over (examiner, in-neighbour) pairs, rounds < {horizon}")
    left.legend(fontsize=8, loc="lower right")
    right.set_xlabel("rounds trained (scores of the rounds before)")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_ylabel("ROC AUC")
    right.set_title("detection AUC as rounds accumulate")
    right.legend(fontsize=8)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))


NAMED_BARS = 64  # participants a bar chart names one by one (0.35 inch each); more are drawn by rank, 12 inches wide


def contribution_shares(table: pd.DataFrame, path: Path) -> None:
    """Each participant's share of the helpful budget, by rank (red: flagged harmful; orange: misbehaving, not
    flagged); ``table``: the contributions report's table."""
    from matplotlib.ticker import MaxNLocator

    order = table.sort_values("rank")
    named = len(table) <= NAMED_BARS  # one labelled bar per participant; past that, bars by rank
    fig = _figure(max(5, 0.35 * len(table)) if named else 12, 3.6)
    ax = fig.subplots()
    colors = ["tab:red" if h else ("tab:orange" if b else "tab:blue")
              for h, b in zip(order["harmful"], order["misbehaving"], strict=True)]
    ax.bar([str(j) for j in order["participant"]] if named else np.arange(1, len(order) + 1), order["share"],
           color=colors, width=0.8 if named else 1.0)
    for i, h in enumerate(order["harmful"] if named else []):
        if h:
            ax.annotate("harmful", (i, 0), rotation=90, ha="center", va="bottom", fontsize=7, color="tab:red")
    if not named:  # a harmful participant's share is 0: its rank marked on the axis instead
        harmful = np.flatnonzero(order["harmful"].to_numpy(bool)) + 1
        ax.plot(harmful, np.zeros(len(harmful)), linestyle="none", marker="|", markersize=14, color="tab:red",
                clip_on=False)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, len(order) + 0.5)
    ax.set_xlabel("participant (by rank)" if named else f"rank (of {len(order)} participants; ids in the table)")
    ax.set_ylabel("share of the helpful budget")
    ax.set_title("contribution shares\n(red: flagged harmful; orange bar: misbehaving, not flagged)", fontsize=9)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))


def signed_heatmap(matrix: np.ndarray, title: str, path: Path, value: str = "I(j → k)") -> np.ndarray:
    """A source × target heat-map of ``matrix`` [j, k] (participant ids 0..N−1 on both axes) with a colour scale
    symmetric about 0, labelled ``value``; NaN (not measured) in grey, apart from 0's white (the title says so where
    there are such cells). Where some sources were not probed at all, only the probed ones' rows, labelled by id.
    Returns the ids of the sources drawn."""
    import matplotlib
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig = _figure(5, 4.2)
    ax = fig.subplots()
    limit = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 0.0
    colors = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.75")
    sources = np.arange(len(matrix))
    probed = ~np.isnan(matrix).all(axis=1)
    if probed.any() and not probed.all():  # sampled sources: their rows only (at N = 1,024, 0.4 pixel a row)
        sources, matrix = sources[probed], matrix[probed]
        title += f"\nthe {len(sources)} probed sources of {len(probed)}"
    image = ax.imshow(matrix, cmap=colors, vmin=-(limit or 1.0), vmax=limit or 1.0,
                      aspect="auto" if len(sources) < matrix.shape[1] else None)
    if np.isnan(matrix).any():
        title += "\ngrey: not measured"
    ax.set_xlabel("target k")
    ax.set_ylabel("source j")
    for axis in (ax.xaxis, ax.yaxis):  # participant ids: whole numbers (matplotlib put ticks at 2.5, 7.5, ...)
        axis.set_major_locator(MaxNLocator(integer=True))
    if len(sources) < len(probed):  # a row's label is its source's id
        ax.yaxis.set_major_formatter(FuncFormatter(
            lambda y, _: str(sources[int(round(y))]) if 0 <= round(y) < len(sources) else ""))
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=value)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    return sources
