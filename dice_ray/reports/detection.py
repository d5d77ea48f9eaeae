"""The detection report: misbehaving in-neighbours found by proximal influence and two baselines (see
docs/concepts.md).

From a run with proximal influence and misbehaving participants, every examiner's in-neighbours are ranked by
cumulative proximal influence, by its windowed sum, and by two baselines from the same run: the neighbour's own
training loss and the cosine distance of its update from the examiner's. The report gives ROC AUC overall and per
examiner, precision at the true number of anomalous neighbours and the detection delay.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from dice_ray.errors import InputError
from dice_ray.reports import plots
from dice_ray.reports.inputs import read_frame, recorded_topology
from dice_ray.reports.writer import AsWritten
from dice_ray.results import ANOMALY, SUSPECTS

__all__ = ["Detection", "detection_report", "detection_metrics", "auc_curves", "precision_at", "suspects"]

METHODS = ("proximal", "proximal-window", "train-loss", "cosine")


def running_scores(proximal: pd.DataFrame, rounds: pd.DataFrame, window: int) -> pd.DataFrame:
    """Return a frame (method, round, examiner, neighbor, anomalous, value): each detector's running score of
    every pair (k, l) after each scoring round; higher = more anomalous.

    proximal: Σ_{s≤t} p_{k←l}^s; proximal-window: the table's ``window_score``, the sum over the run's last
    ``window`` scoring rounds (on a time-varying graph a pair is not scored in each: its own last ``window`` scorings
    reached further back; a table without the column falls back to those); train-loss: the mean, over the rounds
    ≤ t in which k scored l, of l's own training loss L(θ_l^s; z_l^s); cosine: the mean of 1 − cos(Δ_k^s, Δ_l^s)
    over the same rounds.
    """
    df = proximal.sort_values(["round", "examiner", "neighbor"], kind="stable").reset_index(drop=True)
    pair = df.groupby(["examiner", "neighbor"], sort=False)
    seen = pair.cumcount() + 1
    loss = rounds.set_index(["round", "node"])["train_loss"]
    neighbor_loss = loss.reindex(pd.MultiIndex.from_arrays([df["round"], df["neighbor"]])).to_numpy(np.float64)
    values = {
        "proximal": pair["score"].cumsum(),
        "proximal-window": df["window_score"] if "window_score" in df else
        pair["score"].transform(lambda s: s.rolling(window, min_periods=1).sum()),
        "train-loss": pd.Series(neighbor_loss).groupby([df["examiner"], df["neighbor"]], sort=False).cumsum() / seen,
        "cosine": (1 - df["update_cosine"]).groupby([df["examiner"], df["neighbor"]], sort=False).cumsum() / seen,
    }
    base = df[["round", "examiner", "neighbor"]].assign(anomalous=df["neighbor_is_anomalous"].astype(bool))
    return pd.concat([base.assign(method=m, value=np.asarray(v, np.float64)) for m, v in values.items()],
                     ignore_index=True)


def at_horizon(scores: pd.DataFrame, horizon: int) -> pd.DataFrame:
    """Each (method, pair)'s running score at its last scoring round before ``horizon``."""
    before = scores[scores["round"] < horizon]
    return before.groupby(["method", "examiner", "neighbor"], sort=False).tail(1)


def separation(frame: pd.DataFrame) -> pd.Series:
    """Per (method, round, examiner) that has scored an anomalous and an honest in-neighbour by then: True iff every
    anomalous one's latest running score is above every honest one's (each ranks among the worst a_k). The latest
    score, not only this round's: on a time-varying graph an examiner scores a few of its in-neighbours a round."""
    # One column per in-neighbour an examiner has scored (its rank among them), not per participant: the table is
    # (method, examiner, round) x the most in-neighbours any examiner scored, not x N (10 GiB at N = 4,096).
    frame = frame.assign(slot=frame.groupby(["method", "examiner"])["neighbor"].rank(method="dense").astype(np.int64),
                         flag=frame["anomalous"].astype(np.float64))

    def wide(values: str) -> pd.DataFrame:  # each in-neighbour's latest value by the round
        table = frame.pivot_table(index=["method", "examiner", "round"], columns="slot", values=values,
                                  aggfunc="last", sort=True)
        return table.groupby(level=["method", "examiner"]).ffill()

    value = wide("value")
    anomalous = wide("flag").reindex(index=value.index, columns=value.columns)
    best_anomalous = value.where(anomalous == 1).min(axis=1)
    worst_honest = value.where(anomalous == 0).max(axis=1)
    both = best_anomalous.notna() & worst_honest.notna()
    return (best_anomalous > worst_honest)[both].reorder_levels(["method", "round", "examiner"]).sort_index()


AUC_TARGET = 0.95  # the detection level ``rounds_to_auc`` waits for


def auc_curve(scores: pd.DataFrame, method: str, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (t + 1 for each scoring round t < ``horizon``, overall ROC AUC of ``method``'s running scores
    after round t; NaN where only one class is scored)."""
    from sklearn.metrics import roc_auc_score

    mine = scores[(scores["method"] == method) & (scores["round"] < horizon)]
    rounds = np.asarray(sorted(set(mine["round"].tolist())), np.int64)
    curve = []
    for t in rounds:
        now = at_horizon(mine, int(t) + 1)
        ok = 0 < now["anomalous"].sum() < len(now)
        curve.append(roc_auc_score(now["anomalous"], now["value"]) if ok else np.nan)
    return rounds + 1, np.asarray(curve, np.float64)


def rounds_to(level: float, curve: np.ndarray) -> int | None:
    """Scoring rounds until ``curve`` (one value per scoring round) reaches ``level`` and stays at or above it
    to the end (None: never)."""
    below = np.flatnonzero(~(curve >= level))
    if len(curve) == 0 or (len(below) and below[-1] == len(curve) - 1):
        return None
    return int(below[-1]) + 2 if len(below) else 1


def auc_curves(scores: pd.DataFrame, horizon: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``auc_curve`` of every method up to ``horizon``; a shorter horizon's curve is a prefix of it."""
    return {method: auc_curve(scores, method, horizon) for method in METHODS}


def precision_at(values: np.ndarray, anomalous: np.ndarray, a: int) -> float:
    """The share of anomalous among the ``a`` highest ``values``, where scores tie at the a-th place the expected
    share under a random order of the tied (it used to follow the table's row order)."""
    cut = np.sort(values)[::-1][a - 1]
    above, tied = values > cut, values == cut
    return float((anomalous[above].sum() + (a - above.sum()) * anomalous[tied].mean()) / a)


def examiner_aucs(at: pd.DataFrame) -> np.ndarray:
    """Each examiner's ROC AUC of its in-neighbours' ``value`` against ``anomalous`` (rows of one method at one
    horizon), for the examiners with anomalous and honest in-neighbours, in examiner order: the Mann-Whitney
    statistic of within-examiner average ranks (ties count one half), which is ``roc_auc_score``'s value, for all
    examiners at once (one call each took 4 ms: 100 s at N = 4,096)."""
    rank = at.groupby("examiner")["value"].rank(method="average")
    flag = at["anomalous"].astype(np.float64)
    per = pd.DataFrame({"examiner": at["examiner"], "n": 1.0, "a": flag, "r": rank * flag}).groupby("examiner").sum()
    per = per[(per["a"] > 0) & (per["a"] < per["n"])]
    return ((per["r"] - per["a"] * (per["a"] + 1) / 2) / (per["a"] * (per["n"] - per["a"]))).to_numpy(np.float64)


def detection_metrics(scores: pd.DataFrame, horizon: int,
                      curves: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> list[dict]:
    """Return one row per method of ``anomaly.parquet`` for the scoring rounds before ``horizon``. ``curves``:
    ``auc_curves`` up to this horizon or a later one (computed here if None)."""
    from sklearn.metrics import roc_auc_score

    final = at_horizon(scores, horizon)
    before = scores[scores["round"] < horizon]
    separated = separation(before).rename("separated").reset_index()
    rows = []
    for method in METHODS:
        at = final[final["method"] == method]
        labels, values = at["anomalous"].to_numpy(), at["value"].to_numpy()
        both = 0 < labels.sum() < len(labels)
        per_examiner, precision = examiner_aucs(at), []
        for _, group in at.groupby("examiner"):
            a = int(group["anomalous"].sum())
            if a == 0 or a == len(group):  # nothing to rank: no anomalous, or no honest in-neighbour
                continue
            precision.append(precision_at(group["value"].to_numpy(), group["anomalous"].to_numpy(bool), a))
        delays = []
        sep = separated[separated["method"] == method]
        examiners = sep["examiner"].nunique()
        for _, group in sep.groupby("examiner"):
            flags, times = group["separated"].to_numpy(), group["round"].to_numpy()
            if not flags[-1]:
                continue
            failing = np.flatnonzero(~flags)
            start = times[failing[-1] + 1] if len(failing) else times[0]
            delays.append(int(np.searchsorted(times, start)) + 1)  # scoring rounds until detected for good
        seen, curve = (curves or {}).get(method) or auc_curve(scores, method, horizon)
        curve = curve[seen <= horizon]
        defined = curve[~np.isnan(curve)]
        rows.append({
            "method": method, "horizon": horizon,
            "auc": float(roc_auc_score(labels, values)) if both else None,
            "auc_mean": float(defined.mean()) if len(defined) else None,
            "rounds_to_auc": rounds_to(AUC_TARGET, curve) if len(defined) else None,
            "auc_examiner_mean": float(np.mean(per_examiner)) if len(per_examiner) else None,
            "auc_examiner_min": float(np.min(per_examiner)) if len(per_examiner) else None,
            "examiners": len(per_examiner),
            "precision": float(np.mean(precision)) if precision else None,
            "detected": len(delays) / examiners if examiners else None,
            "delay_median": float(np.median(delays)) if delays else None,
            "delay_max": float(np.max(delays)) if delays else None,
        })
    return rows


def suspects(scores: pd.DataFrame, horizon: int) -> pd.DataFrame:
    """The ``suspects`` table: every scored participant ranked by the mean, over the examiners that score it, of
    its cumulative proximal influence at ``horizon`` (each examiner's latest running score): the answer to "who
    misbehaves?" that needs no labels, beside the pair-level metrics that check it against them."""
    at = at_horizon(scores, horizon)
    by = at[at["method"] == "proximal"].groupby("neighbor")
    rows = pd.DataFrame({"participant": by.size().index.to_numpy(), "score": by["value"].mean().to_numpy(),
                         "examiners": by.size().to_numpy(), "misbehaving": by["anomalous"].first().to_numpy(bool)})
    rows["rank"] = rows["score"].rank(ascending=False, method="first").astype(int)
    return rows.sort_values("rank").reset_index(drop=True)[SUSPECTS.names]


@dataclass(frozen=True)
class Detection(AsWritten):
    """The detection report of one run.

    ``table``: one row per (horizon, method) (the ``anomaly`` table; NaN where undefined). ``scores``: every
    detector's running score per (round, examiner, neighbor) (``running_scores``); ``curves``: method -> (rounds
    scored, overall ROC AUC after each) up to the last horizon; ``horizon``: the last horizon, which the ROC plot
    uses. ``misbehaving`` of ``participants`` misbehave. ``suspects``: every participant an examiner scores, ranked
    by its mean cumulative proximal influence over the whole run (``suspects``); ``suspects_auc``: the ROC AUC of
    that ranking against who misbehaves (None: one class only).
    """

    table: pd.DataFrame
    scores: pd.DataFrame
    curves: dict[str, tuple[np.ndarray, np.ndarray]]
    horizon: int
    misbehaving: int
    participants: int
    suspects: pd.DataFrame
    suspects_auc: float | None

    def tables(self) -> dict[str, tuple[pd.DataFrame, pa.Schema]]:
        """Table name -> (rows, schema) to write: ``anomaly`` and ``suspects``."""
        return {"anomaly": (self.table, ANOMALY), "suspects": (self.suspects, SUSPECTS)}

    def figures(self) -> dict[str, Callable[[Path], None]]:
        """PNG file name -> a function drawing it to a path: the ROC curves and AUC over time."""
        return {"anomaly_roc.png": lambda path: plots.detection_roc(at_horizon(self.scores, self.horizon), self.curves,
                                                                       self.horizon, path)}


def _scored(proximal: pd.DataFrame) -> pd.DataFrame:
    """The pairs (examiner, neighbour) of ``proximal`` whose every score is a number, with one warning line if
    others are left out: an examiner whose validation split is empty has no z′ (its scores are NaN), and an exact
    score at a state whose BatchNorm variance went negative is not a number either."""
    unscored = ~np.isfinite(proximal["score"].to_numpy(np.float64))
    if not unscored.any():
        return proximal
    pairs = pd.MultiIndex.from_frame(proximal[["examiner", "neighbor"]])
    dropped = pairs[unscored].unique()
    left_out = pairs.isin(dropped)
    if left_out.all():
        raise InputError("no proximal score is a number (an examiner with an empty validation split has no z′: use "
                         "proximal.zprime heldout, or give participants more data)")
    print(f"warning: {int(unscored.sum())} of {len(proximal)} proximal scores are not numbers (an examiner with an "
          f"empty validation split has no z′); the {len(dropped)} pairs they score are left out",
          file=sys.stderr)
    return proximal[~left_out].reset_index(drop=True)


def detection_report(run: str | Path, horizons: list[int] | None = None) -> Detection:
    """Return the detection report of the run directory ``run`` (a run with proximal influence and misbehaving
    participants; writes nothing). ``horizons``: rounds before which scores count (default 5, 10, 20 and the whole
    run); the ROC curve uses the last."""
    from sklearn.metrics import roc_auc_score

    run = Path(run)
    config, _ = recorded_topology(run)  # a run directory: its manifest, and as many participants as it recorded
    proximal = _scored(read_frame(run, "proximal", "run the simulation with proximal.enabled (--proximal) first",
                                  empty="a run with proximal influence scores every in-neighbour from round 0: the "
                                        "table was replaced, or the graph has no edge to score",
                                  enabled="proximal.enabled"))
    rounds, nodes = read_frame(run, "rounds", "incomplete run"), read_frame(run, "nodes", "incomplete run")
    if not nodes["misbehaving"].any():
        raise InputError(f"{run} has no misbehaving participants: nothing to detect (misbehavior.kind, --misbehavior)")
    if nodes["misbehaving"].all():
        raise InputError(f"{run}: every participant misbehaves, so no examiner has an honest neighbour to tell apart")
    window = config.proximal.window
    last = int(rounds["round"].max()) + 1
    if horizons is not None and (isinstance(horizons, (str, bytes)) or not isinstance(horizons, Iterable)
                                 or not all(isinstance(h, numbers.Integral) for h in horizons)):
        raise InputError(f"horizons {horizons!r}: a list of round numbers, or None for the default")
    if horizons is not None and not list(horizons):
        raise InputError("horizons: give at least one, or None for the default (5, 10, 20 and the whole run)")
    twice = sorted({h for h in horizons or [] if list(horizons).count(h) > 1})
    if twice:
        raise InputError(f"horizons (--horizon) {twice[0]} is given twice: give each once")
    outside = sorted(h for h in horizons or [] if not 0 < h <= last)
    if outside:
        raise InputError(f"horizons (--horizon) {outside[0]}: a horizon counts the rounds before it, 1..{last} "
                         "for this run")
    horizons = sorted({h for h in (horizons or [5, 10, 20]) if 0 < h <= last} | ({last} if not horizons else set()))
    scores = running_scores(proximal, rounds, window)
    curves = auc_curves(scores, horizons[-1])  # once: each horizon reads a prefix
    rows = [row for h in horizons for row in detection_metrics(scores, h, curves)]
    ranked = suspects(scores, last + 1)
    labels = ranked["misbehaving"].to_numpy()
    # numbers (NaN where undefined) in every column: a column of a horizon the AUC never reached was None objects
    table = pd.DataFrame(rows, columns=ANOMALY.names)
    for column in table.columns.drop("method"):
        if table[column].dtype.kind == "O":
            table[column] = table[column].astype(float)
    return Detection(table=table, scores=scores, curves=curves,
                     horizon=horizons[-1], misbehaving=int(nodes["misbehaving"].sum()), participants=len(nodes),
                     suspects=ranked, suspects_auc=float(roc_auc_score(labels, ranked["score"]))
                     if 0 < labels.sum() < len(labels) else None)
