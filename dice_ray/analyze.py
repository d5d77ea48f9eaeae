"""``python -m dice_ray.analyze REPORT RUN_DIR``: reports computed from a run's tables.

    python -m dice_ray.analyze alignment runs/my-run     # DICE-E against DICE-GT, per hop and variant
    python -m dice_ray.analyze cascade runs/my-run       # ripples: influence against hop distance, position
    python -m dice_ray.analyze anomaly runs/my-run       # detection of misbehaving neighbours (--proximal)
    python -m dice_ray.analyze collaborators runs/a runs/b ...  # final accuracy: static vs rewired topologies
    python -m dice_ray.analyze contributions runs/my-run [--loo] [--shapley K]  # contribution ledger (--ledger)

``alignment`` reads ``dice.parquet`` and ``influence.parquet`` and prints, for every hop r and DICE-E
variant, Pearson, Spearman and Kendall correlation with DICE-GT and the relative error Σ|GT − E| / Σ|GT|,
for three quantities: the hop-r term alone (Σ over participants first reached at hop r), the cumulative
DICE^{(r)}, and every per-participant term d_k^{(r)} (k in S_r). It writes them to ``alignment.parquet``
and a GT-vs-E scatter per hop to ``alignment_hop{r}.png`` in the run directory.

``cascade`` reads ``influence.parquet`` (whole-batch probes; DICE-GT where measured, else the curvature or
first-order estimate) and reports how influence decays with hop distance (``cascade.parquet``,
``cascade_decay.png``), how a source's total influence relates to its degree and centrality (networkx),
the pairwise matrix I_{j→k} after R rounds (``pairwise.parquet``, ``pairwise_heatmap.png``) and its
reciprocity: the correlation of I_{j→k} with I_{k→j}.

``anomaly`` reads ``proximal.parquet`` (a run with ``--proximal`` and misbehaving participants) and ranks every
examiner's in-neighbours by cumulative proximal influence, by its windowed sum, and by two baselines from the
same run: the neighbour's own training loss and the cosine distance of its update from the examiner's. It
reports ROC AUC overall and per examiner, precision at the true number of anomalous neighbours and the
detection delay (``anomaly.parquet``, ``anomaly_roc.png``).

``collaborators`` reads several runs that differ in ``rewiring.mode`` (none, influence, outlier, random), misbehaviour
and seed, and compares the final mean held-out accuracy of the honest participants
(``collaborators.parquet``).

``contributions`` reads ``shares.parquet`` and ``contributions.parquet`` (a run with ``--ledger``) and ranks the
participants by their ledger total T_j, with their share of the helpful budget and the harmful flag, beside
their data size, misbehaviour and position (in-degree, betweenness). Where leave-one-participant-out retraining
(``loo.parquet``; ``--loo`` computes it now, as Ray tasks, if the run did not) and Monte-Carlo Shapley
(``shapley.parquet``; ``--shapley K``) exist, it reports Spearman and Kendall correlation of T_j with them. It
writes ``contributions_report.parquet``, a bar chart of the shares (``contributions_shares.png``) and the
heat-map of L[j→k] (``contributions_heatmap.png``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy import stats

from dice_ray.errors import InputError, report
from dice_ray.results import (
    ALIGNMENT,
    ANOMALY,
    CASCADE,
    COLLABORATORS,
    CONTRIBUTION_REPORT,
    LOO,
    PAIRWISE,
    SHAPLEY,
    VARIANT_SUFFIX,
    write_table_atomic,
)

VARIANTS = {"first-order": "est_first_order", "curvature": "est_curvature", "second-order": "est_second_order"}
QUANTITIES = {"hop": "_hop", "cumulative": ""}


def _read(run: Path, name: str) -> dict[str, np.ndarray]:
    path = run / f"{name}.parquet"
    if not path.is_file():
        raise InputError(f"{path} does not exist: run the simulation with --influence first")
    table = pq.read_table(path)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def _compare(gt: np.ndarray, est: np.ndarray) -> dict:
    ok = np.isfinite(gt) & np.isfinite(est)
    g, e = gt[ok], est[ok]
    enough = ok.sum() >= 3 and np.ptp(g) > 0 and np.ptp(e) > 0
    return {"probes": int(ok.sum()),
            "pearson": float(stats.pearsonr(g, e).statistic) if enough else None,
            "spearman": float(stats.spearmanr(g, e).statistic) if enough else None,
            "kendall": float(stats.kendalltau(g, e).statistic) if enough else None,
            "relative_error": float(np.abs(g - e).sum() / np.abs(g).sum()) if np.abs(g).sum() > 0 else None}


def alignment_rows(dice: dict[str, np.ndarray], influence: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Return one row per (hop, quantity, variant): correlations and relative error of E against GT.

    Quantities: ``hop`` (the hop-r term of DICE^{(r)}), ``cumulative`` (DICE^{(r)}), and, from the influence
    table, ``terms`` (every per-participant term d_k^{(r)} against e_k^{(r)}, k in S_r).
    """
    rows = []
    variants = _measured_variants(dice)
    for r in sorted(set(dice["hops"].tolist())):
        at = dice["hops"] == r
        for quantity, suffix in QUANTITIES.items():
            for variant, column in variants.items():
                rows.append({"hops": r, "quantity": quantity, "variant": variant,
                             **_compare(dice[f"gt{suffix}"][at].astype(float),
                                        dice[f"{column}{suffix}"][at].astype(float))})
        if influence is not None:
            at = influence["step"] == r
            for variant, column in variants.items():
                rows.append({"hops": r, "quantity": "terms", "variant": variant,
                             **_compare(influence["gt"][at].astype(float), influence[column][at].astype(float))})
    return rows


def _measured_variants(dice: dict[str, np.ndarray]) -> dict[str, str]:
    """The DICE-E variants the run computed (a column that is absent or all null was not)."""
    return {v: c for v, c in VARIANTS.items() if c in dice and bool(pd.notna(pd.Series(dice[c])).any())}


def _scatter(run: Path, dice: dict[str, np.ndarray], r: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    at = dice["hops"] == r
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), constrained_layout=True)
    for ax, (quantity, suffix) in zip(axes, QUANTITIES.items(), strict=True):
        gt = dice[f"gt{suffix}"][at].astype(float)
        for (variant, column), marker in zip(_measured_variants(dice).items(), "ox+", strict=False):
            ax.scatter(gt, dice[f"{column}{suffix}"][at].astype(float), s=12, marker=marker, label=variant, alpha=0.7)
        lo, hi = np.nanmin(gt), np.nanmax(gt)
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, label="E = GT")
        ax.set_xlabel("DICE-GT")
        ax.set_ylabel("DICE-E")
        ax.set_title(f"hop {r}: " + ("hop-r term" if quantity == "hop" else f"cumulative DICE$^{{({r})}}$"))
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelrotation=30)
    path = run / f"alignment_hop{r}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def alignment(run: Path) -> list[dict]:
    """Compute, print and write the alignment report of ``run``; return its rows."""
    dice = _read(run, "dice")
    if dice["gt"].dtype == object and all(v is None for v in dice["gt"]):
        raise InputError(f"{run / 'dice.parquet'} has no ground truth (influence.ground_truth was off)")
    rows = alignment_rows(dice, _read(run, "influence"))
    write_table_atomic(run / "alignment.parquet", rows, ALIGNMENT)
    pngs = [_scatter(run, dice, r) for r in sorted(set(dice["hops"].tolist()))]
    print(f"{'hops':>4} {'quantity':>10} {'variant':>12} {'probes':>6} {'pearson':>8} {'spearman':>8} "
          f"{'kendall':>8} {'rel.err':>8}")
    for row in rows:
        cells = [f"{row[k]:8.4f}" if row[k] is not None else f"{'-':>8}"
                 for k in ("pearson", "spearman", "kendall", "relative_error")]
        print(f"{row['hops']:>4} {row['quantity']:>10} {row['variant']:>12} {row['probes']:>6} " + " ".join(cells))
    print(f"wrote {run / 'alignment.parquet'} and {', '.join(p.name for p in pngs)}")
    return rows


def _value_column(influence: dict[str, np.ndarray]) -> str:
    """The best influence measured: ground truth, else the second-order estimate, else curvature, else first-order."""
    for column in ("gt", "est_second_order", "est_curvature", "est_first_order"):
        if column not in influence:  # tables written before the variant existed
            continue
        values = influence[column]
        if values.dtype != object or any(v is not None for v in values):
            return column
    raise InputError("influence.parquet holds no influence values")


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    return float(stats.spearmanr(a[ok], b[ok]).statistic)


def cascade(run: Path) -> dict:
    """Compute, print and write the cascade report of ``run``; return its summary."""
    import networkx as nx

    inf = _read(run, "influence")
    column = _value_column(inf)
    whole = np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in inf["sample_index"]])
    value = inf[column].astype(float)
    step, dist = inf["step"].astype(int), inf["distance"].astype(int)
    source, target = inf["source"].astype(int), inf["target"].astype(int)
    last = int(step.max())

    decay = []
    for s in range(1, last + 1):
        for d in sorted(set(dist[whole & (step == s)].tolist())):
            at = whole & (step == s) & (dist == d)
            decay.append({"step": s, "distance": d, "value": column, "mean_abs": float(np.abs(value[at]).mean()),
                          "terms": int(at.sum())})
    write_table_atomic(run / "cascade.parquet", decay, CASCADE)

    config, topology = _recorded_topology(run)
    n = config.nodes
    final = whole & (step == last)
    total, count = np.zeros((n, n)), np.zeros((n, n))
    np.add.at(total, (source[final], target[final]), value[final])
    np.add.at(count, (source[final], target[final]), 1)
    pairwise = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    write_table_atomic(run / "pairwise.parquet",
                       [{"source": j, "target": k, "value": column, "influence": float(pairwise[j, k])}
                        for j, k in zip(*np.nonzero(count), strict=True)], PAIRWISE)

    graph = topology.to_networkx(0)
    strength = np.nansum(np.abs(pairwise), axis=1)
    probed = count.sum(axis=1) > 0
    position = {"out_degree": np.array([graph.out_degree(j) for j in range(n)], float),
                "betweenness": np.array([nx.betweenness_centrality(graph)[j] for j in range(n)]),
                "closeness": np.array([nx.closeness_centrality(graph.reverse())[j] for j in range(n)])}
    against_position = {name: _spearman(strength[probed], measure[probed]) for name, measure in position.items()}
    upper = np.triu_indices(n, 1)
    forward, backward = pairwise[upper], pairwise.T[upper]
    both = np.isfinite(forward) & np.isfinite(backward)
    reciprocity = {
        "pairs": int(both.sum()),
        "pearson": float(stats.pearsonr(forward[both], backward[both]).statistic) if both.sum() >= 3 else None,
        "spearman": _spearman(forward[both], backward[both]),
        "asymmetry": float(np.abs(forward[both] - backward[both]).sum() / np.abs(np.r_[forward[both],
                                                                                         backward[both]]).sum())
        if both.any() else None,
    }
    _cascade_plots(run, decay, pairwise, column)

    print(f"influence measure: {column}; whole-batch probes; step R = {last}")
    print("mean |influence| by hop distance (step R):  " + "  ".join(
        f"d={row['distance']}: {row['mean_abs']:.3g}" for row in decay if row["step"] == last))
    print("source strength vs position (Spearman):      " + "  ".join(
        f"{k}: {'-' if v is None else f'{v:.3f}'}" for k, v in against_position.items()))
    print(f"reciprocity over {reciprocity['pairs']} pairs: Pearson "
          f"{'-' if reciprocity['pearson'] is None else format(reciprocity['pearson'], '.3f')}, asymmetry "
          f"{'-' if reciprocity['asymmetry'] is None else format(reciprocity['asymmetry'], '.3f')}")
    print(f"wrote {run / 'cascade.parquet'}, {run / 'pairwise.parquet'}, cascade_decay.png, pairwise_heatmap.png")
    return {"decay": decay, "position": against_position, "reciprocity": reciprocity}


def _cascade_plots(run: Path, decay: list[dict], pairwise: np.ndarray, column: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5, 3.6), constrained_layout=True)
    for s in sorted({row["step"] for row in decay}):
        rows = [row for row in decay if row["step"] == s]
        ax.plot([r["distance"] for r in rows], [r["mean_abs"] for r in rows], marker="o", label=f"after {s} rounds")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("hop distance from the source")
    ax.set_ylabel(f"mean |influence| ({column})")
    ax.set_title("influence cascade: ripples decay with distance")
    ax.legend(fontsize=8)
    fig.savefig(run / "cascade_decay.png", dpi=120)
    plt.close(fig)

    _signed_heatmap(pairwise, "I(j → k): red raises k's loss, blue lowers it", run / "pairwise_heatmap.png")


# -- anomaly detection (concepts §5): proximal influence against two baselines ---------------------------------

METHODS = ("proximal", "proximal-window", "train-loss", "cosine")


def _frame(run: Path, name: str, hint: str):
    import pandas as pd

    path = run / f"{name}.parquet"
    if not path.is_file():
        raise InputError(f"{path} does not exist: {hint}")
    return pd.read_parquet(path)


def running_scores(proximal, rounds, window: int):
    """Return a frame (method, round, examiner, neighbor, anomalous, value): each detector's running score of
    every pair (k, l) after each scoring round; higher = more anomalous.

    proximal: Σ_{s≤t} p_{k←l}^s; proximal-window: the sum over the pair's last ``window`` scoring rounds;
    train-loss: the mean over scoring rounds ≤ t of l's own training loss L(θ_l^s; z_l^s); cosine: the mean of
    1 − cos(Δ_k^s, Δ_l^s).
    """
    import pandas as pd

    df = proximal.sort_values(["round", "examiner", "neighbor"], kind="stable").reset_index(drop=True)
    pair = df.groupby(["examiner", "neighbor"], sort=False)
    seen = pair.cumcount() + 1
    loss = rounds.set_index(["round", "node"])["train_loss"]
    neighbor_loss = loss.reindex(pd.MultiIndex.from_arrays([df["round"], df["neighbor"]])).to_numpy(np.float64)
    values = {
        "proximal": pair["score"].cumsum(),
        "proximal-window": pair["score"].transform(lambda s: s.rolling(window, min_periods=1).sum()),
        "train-loss": pd.Series(neighbor_loss).groupby([df["examiner"], df["neighbor"]], sort=False).cumsum() / seen,
        "cosine": (1 - df["update_cosine"]).groupby([df["examiner"], df["neighbor"]], sort=False).cumsum() / seen,
    }
    base = df[["round", "examiner", "neighbor"]].assign(anomalous=df["neighbor_is_anomalous"].astype(bool))
    return pd.concat([base.assign(method=m, value=np.asarray(v, np.float64)) for m, v in values.items()],
                     ignore_index=True)


def _at_horizon(scores, horizon: int):
    """Each (method, pair)'s running score at its last scoring round before ``horizon``."""
    before = scores[scores["round"] < horizon]
    return before.groupby(["method", "examiner", "neighbor"], sort=False).tail(1)


def _separated(frame):
    """Per (method, round, examiner) with an anomalous in-neighbour: True iff every anomalous one scores above
    every honest one (each ranks among the worst a_k)."""
    worst_honest = frame[~frame["anomalous"]].groupby(["method", "round", "examiner"])["value"].max()
    best_anomalous = frame[frame["anomalous"]].groupby(["method", "round", "examiner"])["value"].min()
    honest = worst_honest.reindex(best_anomalous.index).fillna(-np.inf)
    return best_anomalous > honest


AUC_TARGET = 0.95  # the detection level ``rounds_to_auc`` waits for


def auc_curve(scores, method: str, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (t + 1 for each scoring round t < ``horizon``, overall ROC AUC of ``method``'s running scores
    after round t; NaN where only one class is scored)."""
    from sklearn.metrics import roc_auc_score

    mine = scores[(scores["method"] == method) & (scores["round"] < horizon)]
    rounds = np.asarray(sorted(set(mine["round"].tolist())), np.int64)
    curve = []
    for t in rounds:
        now = _at_horizon(mine, int(t) + 1)
        ok = 0 < now["anomalous"].sum() < len(now)
        curve.append(roc_auc_score(now["anomalous"], now["value"]) if ok else np.nan)
    return rounds + 1, np.asarray(curve, np.float64)


def _rounds_to(level: float, curve: np.ndarray) -> int | None:
    """Scoring rounds until ``curve`` (one value per scoring round) reaches ``level`` and stays at or above it
    to the end (None: never)."""
    below = np.flatnonzero(~(curve >= level))
    if len(curve) == 0 or (len(below) and below[-1] == len(curve) - 1):
        return None
    return int(below[-1]) + 2 if len(below) else 1


def auc_curves(scores, horizon: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``auc_curve`` of every method up to ``horizon``; a shorter horizon's curve is a prefix of it."""
    return {method: auc_curve(scores, method, horizon) for method in METHODS}


def detection_metrics(scores, horizon: int,
                      curves: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> list[dict]:
    """Return one row per method of ``anomaly.parquet`` for the scoring rounds before ``horizon``. ``curves``:
    ``auc_curves`` up to this horizon or a later one (computed here if None)."""
    from sklearn.metrics import roc_auc_score

    final = _at_horizon(scores, horizon)
    before = scores[scores["round"] < horizon]
    separated = _separated(before).rename("separated").reset_index()
    rows = []
    for method in METHODS:
        at = final[final["method"] == method]
        labels, values = at["anomalous"].to_numpy(), at["value"].to_numpy()
        both = 0 < labels.sum() < len(labels)
        per_examiner, precision = [], []
        for _, group in at.groupby("examiner"):
            a = int(group["anomalous"].sum())
            if a == 0:
                continue
            top = group.sort_values("value", ascending=False, kind="stable").head(a)
            precision.append(float(top["anomalous"].mean()))
            if a < len(group):
                per_examiner.append(roc_auc_score(group["anomalous"], group["value"]))
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
            "rounds_to_auc": _rounds_to(AUC_TARGET, curve) if len(defined) else None,
            "auc_examiner_mean": float(np.mean(per_examiner)) if per_examiner else None,
            "auc_examiner_min": float(np.min(per_examiner)) if per_examiner else None,
            "examiners": len(per_examiner),
            "precision": float(np.mean(precision)) if precision else None,
            "detected": len(delays) / examiners if examiners else None,
            "delay_median": float(np.median(delays)) if delays else None,
            "delay_max": float(np.max(delays)) if delays else None,
        })
    return rows


def _anomaly_plot(run: Path, scores, horizon: int, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    final = _at_horizon(scores, horizon)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), constrained_layout=True)
    for method in METHODS:
        at = final[final["method"] == method]
        if 0 < at["anomalous"].sum() < len(at):
            fpr, tpr, _ = roc_curve(at["anomalous"], at["value"])
            left.plot(fpr, tpr, label=f"{method} (AUC {roc_auc_score(at['anomalous'], at['value']):.3f})")
        right.plot(*curves[method], label=method)
    left.plot([0, 1], [0, 1], color="grey", linewidth=1)
    left.set_xlabel("false positive rate (honest neighbours flagged)")
    left.set_ylabel("true positive rate (anomalous neighbours flagged)")
    left.set_title(f"ROC over (examiner, in-neighbour) pairs, rounds < {horizon}")
    left.legend(fontsize=8, loc="lower right")
    right.set_xlabel("rounds scored")
    right.set_ylabel("ROC AUC")
    right.set_title("detection AUC as rounds accumulate")
    right.legend(fontsize=8)
    path = run / "anomaly_roc.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def anomaly(run: Path, horizons: list[int] | None = None) -> list[dict]:
    """Compute, print and write the detection report of ``run`` (a run with ``--proximal`` and misbehaving
    participants); return its rows. ``horizons``: rounds before which scores count (default 5, 10, 20 and
    the whole run); the ROC curve uses the last."""
    import json

    proximal = _frame(run, "proximal", "run the simulation with --proximal first")
    rounds, nodes = _frame(run, "rounds", "incomplete run"), _frame(run, "nodes", "incomplete run")
    if not nodes["misbehaving"].any():
        raise InputError(f"{run} has no misbehaving participants: nothing to detect (--misbehavior)")
    window = json.loads((run / "manifest.json").read_text())["config"]["proximal"]["window"]
    last = int(rounds["round"].max()) + 1
    horizons = sorted({h for h in (horizons or [5, 10, 20]) if 0 < h <= last} | ({last} if not horizons else set()))
    if not horizons:
        raise InputError(f"no horizon within the run's {last} rounds")
    scores = running_scores(proximal, rounds, window)
    curves = auc_curves(scores, horizons[-1])  # once: each horizon reads a prefix
    rows = [row for h in horizons for row in detection_metrics(scores, h, curves)]
    write_table_atomic(run / "anomaly.parquet", rows, ANOMALY)
    png = _anomaly_plot(run, scores, horizons[-1], curves)

    def cell(v: float | int | None, spec: str = "8.4f") -> str:
        return f"{'-':>8}" if v is None else format(v, spec)

    print(f"{int(nodes['misbehaving'].sum())} misbehaving of {len(nodes)}; scores higher = more anomalous")
    print(f"{'horizon':>7} {'method':>15} {'AUC':>8} {'mean AUC':>8} {'to 0.95':>8} {'AUC/exam':>8} {'min':>8} "
          f"{'exams':>5} {'prec@a':>8} {'detected':>8} {'delay':>8} {'max':>8}")
    for r in rows:
        print(f"{r['horizon']:>7} {r['method']:>15} {cell(r['auc'])} {cell(r['auc_mean'])} "
              f"{cell(r['rounds_to_auc'], '8d')} {cell(r['auc_examiner_mean'])} "
              f"{cell(r['auc_examiner_min'])} {r['examiners']:>5} {cell(r['precision'])} {cell(r['detected'])} "
              f"{cell(r['delay_median'], '8.1f')} {cell(r['delay_max'], '8.0f')}")
    print(f"wrote {run / 'anomaly.parquet'} and {png.name}")
    return rows


# -- collaborator selection: final accuracy of honest participants, static vs rewired ----------------------


def _final_in_edges(run: Path, config, nodes) -> list[np.ndarray]:
    """In-neighbour sets at the end of ``run``: the last rewiring's, else W^0's."""
    from dice_ray.core.topology import make_topology
    from dice_ray.methods.rewiring import in_neighbor_sets

    path = run / "rewiring.parquet"
    if config.rewiring.mode != "none" and path.is_file():
        import pandas as pd

        history = pd.read_parquet(path)
        if len(history):
            final = history[(history["round"] == history["round"].max()) & (history["action"] != "dropped")]
            return [np.sort(final.loc[final["participant"] == k, "neighbor"].to_numpy()) for k in range(len(nodes))]
    topology = make_topology(config.topology.name, config.nodes, weights=config.topology.weights, seed=config.seed,
                             p=config.topology.p, rows=config.topology.rows, path=config.topology.file,
                             directed=config.topology.directed)
    return in_neighbor_sets(topology.mixing_matrix(0))


def collaborator_row(run: Path) -> dict:
    """Return ``run``'s row of ``collaborators.parquet`` (final accuracy of its honest participants)."""
    import json

    from dice_ray.config import read_recorded

    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").is_file() else None
    if manifest is None or manifest.get("status") != "complete":
        raise InputError(f"{run} is not a complete run (manifest.json status)")
    config = read_recorded(manifest["config"], f"run {str(run)!r}")
    rounds, nodes = _frame(run, "rounds", "incomplete run"), _frame(run, "nodes", "incomplete run")
    last = rounds[rounds["round"] == rounds["round"].max()].sort_values("node")
    honest = ~nodes.sort_values("node")["misbehaving"].to_numpy()
    bad = set(np.flatnonzero(~honest).tolist())
    edges = _final_in_edges(run, config, nodes)
    from_bad = [np.isin(e, list(bad)).sum() for k, e in enumerate(edges) if honest[k]]
    total = sum(len(e) for k, e in enumerate(edges) if honest[k])
    return {"run": str(run), "rewiring": config.rewiring.mode, "misbehavior": config.misbehavior.kind,
            "misbehaving": int((~honest).sum()), "seed": config.seed,
            "honest_acc": float(last["heldout_acc"].to_numpy()[honest].mean()),
            "honest_loss": float(last["heldout_loss"].to_numpy()[honest].mean()),
            "anomalous_in_edges": float(sum(from_bad) / total) if total else 0.0}


def collaborators(runs: list[Path], out: Path | None = None) -> list[dict]:
    """Compare runs that differ in collaborator selection (and misbehaviour, seed): print mean final honest
    accuracy per setting over seeds and each rewiring's gain over the static topology seed by seed; write
    ``collaborators.parquet`` to ``out`` (default: the runs' common parent folder)."""
    import os

    rows = [collaborator_row(run) for run in runs]
    out = out or Path(os.path.commonpath([str(r.resolve().parent) for r in runs]))
    write_table_atomic(out / "collaborators.parquet", rows, COLLABORATORS)
    settings = sorted({(r["misbehavior"], r["misbehaving"]) for r in rows})
    print(f"{'misbehaviour':>16} {'rewiring':>9} {'seeds':>5} {'honest acc':>16} {'bad in-edges':>12} "
          f"{'gain vs static':>15} {'wins':>5}")
    for kind, count in settings:
        static = {r["seed"]: r["honest_acc"] for r in rows if (r["misbehavior"], r["misbehaving"]) == (kind, count)
                  and r["rewiring"] == "none"}
        for mode in ("none", "influence", "outlier", "random"):
            these = [r for r in rows if (r["misbehavior"], r["misbehaving"], r["rewiring"]) == (kind, count, mode)]
            if not these:
                continue
            acc = np.array([r["honest_acc"] for r in these])
            gains = [r["honest_acc"] - static[r["seed"]] for r in these if r["seed"] in static]
            gain = f"{np.mean(gains):+15.4f}" if gains and mode != "none" else f"{'-':>15}"
            wins = f"{sum(g > 0 for g in gains)}/{len(gains)}" if gains and mode != "none" else "-"
            label = "none" if kind == "none" else f"{kind} x{count}"
            spread = acc.std(ddof=1) if len(acc) > 1 else 0.0
            print(f"{label:>16} {mode:>9} {len(these):>5} {acc.mean():9.4f} ± {spread:.4f} "
                  f"{np.mean([r['anomalous_in_edges'] for r in these]):12.3f} {gain} {wins:>5}")
    print(f"wrote {out / 'collaborators.parquet'}")
    return rows


# -- contribution accounting (issue 7): the ledger against retraining ------------------------------------------


def _rank_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return {"spearman": None, "kendall": None}
    return {"spearman": float(stats.spearmanr(a[ok], b[ok]).statistic),
            "kendall": float(stats.kendalltau(a[ok], b[ok]).statistic)}


def _recorded_topology(run: Path):
    """(the run's recorded config, its topology), read without importing anything the config names."""
    import json

    from dice_ray.config import read_recorded
    from dice_ray.core.topology import make_topology

    config = read_recorded(json.loads((run / "manifest.json").read_text())["config"], f"run {str(run)!r}")
    topo = config.topology
    return config, make_topology(topo.name, config.nodes, weights=topo.weights, seed=config.seed, p=topo.p,
                                 rows=topo.rows, path=topo.file, directed=topo.directed)


def _run_experiment(run: Path, changes: dict | None = None, allow_imports: bool = False):
    import json

    from dice_ray.config import rerun_config
    from dice_ray.experiment import prepare

    data = json.loads((run / "manifest.json").read_text())["config"]
    for section, values in (changes or {}).items():
        data.setdefault(section, {}).update(values)
    return prepare(rerun_config(data, f"retraining run {str(run)!r}", allow_imports))


def _retrain_now(run: Path, loo: bool, shapley: int | None, local: bool, allow_imports: bool = False) -> None:
    """Compute ``loo.parquet`` (and ``shapley.parquet``) for ``run`` now (Ray tasks, or here if ``local``)."""
    from dice_ray.methods.retraining_tasks import retrain_runs

    experiment = _run_experiment(run, {"ledger": {"loo": loo, "shapley_permutations": shapley or 0}}, allow_imports)
    if not local:
        from dice_ray.engine import start_ray

        start_ray(experiment.config.engine.address)
    rows_loo, rows_shapley = retrain_runs(experiment, local=local, progress=True)
    if rows_loo is not None:
        write_table_atomic(run / "loo.parquet", rows_loo, LOO)
    if rows_shapley is not None:
        write_table_atomic(run / "shapley.parquet", rows_shapley, SHAPLEY)


def contributions(run: Path, loo: bool = False, shapley: int | None = None, local: bool = False,
                  allow_imports: bool = False) -> dict:
    """Compute, print and write the contributions report of ``run``; return its summary (``rows``, and the
    rank agreement of the ledger totals with leave-one-out and Shapley where computed). Retraining now imports the
    modules the run's config names only with ``allow_imports`` (``config.rerun_config``)."""
    import networkx as nx

    shares = _frame(run, "shares", "run the simulation with --ledger first")
    ledger = _frame(run, "contributions", "run the simulation with --ledger first")
    nodes = _frame(run, "nodes", "not a finished run")
    if (loo and not (run / "loo.parquet").is_file()) or (shapley and not (run / "shapley.parquet").is_file()):
        _retrain_now(run, loo or (run / "loo.parquet").is_file(), shapley, local, allow_imports)
    n = len(nodes)
    config, topology = _recorded_topology(run)
    ranking = config.ledger.ranking
    matrix = np.zeros((n, n))
    column = "cumulative" + VARIANT_SUFFIX[ranking]
    last = ledger.groupby(["source", "target"])[column].last() if column in ledger else ledger.iloc[:0]["step"]
    matrix[last.index.get_level_values(0), last.index.get_level_values(1)] = last.to_numpy()
    graph = topology.to_networkx(0)
    betweenness = nx.betweenness_centrality(graph)
    rows = shares.sort_values("participant").reset_index(drop=True)
    for v in list(VARIANT_SUFFIX)[1:]:  # tables of runs before the curvature ledger have no such column
        if f"total{VARIANT_SUFFIX[v]}" not in rows:
            rows[f"total{VARIANT_SUFFIX[v]}"] = np.nan
    rows["loo_effect"] = np.nan
    rows["shapley"] = np.nan
    if (run / "loo.parquet").is_file():
        table = _frame(run, "loo", "")
        effect = table[table["participant"] >= 0].groupby("participant")["effect"].sum()
        rows.loc[effect.index, "loo_effect"] = effect.to_numpy()
    if (run / "shapley.parquet").is_file():
        table = _frame(run, "shapley", "").set_index("participant")["shapley"]
        rows.loc[table.index, "shapley"] = table.to_numpy()
    rows["n_train"] = nodes["n_train"].to_numpy()
    rows["misbehaving"] = nodes["misbehaving"].to_numpy()
    rows["in_degree"] = nodes["in_degree"].to_numpy()
    rows["betweenness"] = np.round([betweenness[j] for j in range(n)], 12)  # equal ones compare equal
    write_table_atomic(run / "contributions_report.parquet", {c: rows[c].to_numpy() for c in rows.columns},
                       CONTRIBUTION_REPORT)
    honest = ~rows["misbehaving"].to_numpy()

    def agreement(total: np.ndarray) -> dict[str, dict[str, float | None]]:
        return {"loo": _rank_agreement(total, rows["loo_effect"].to_numpy()),
                "shapley": _rank_agreement(total, rows["shapley"].to_numpy()),
                "loo_honest": _rank_agreement(total[honest], rows["loo_effect"].to_numpy()[honest])}

    variants = {v: agreement(rows[f"total{VARIANT_SUFFIX[v]}"].to_numpy()) for v in VARIANT_SUFFIX
                if rows[f"total{VARIANT_SUFFIX[v]}"].notna().any()}
    total = rows["total" + VARIANT_SUFFIX[ranking]].to_numpy()
    summary = {"rows": rows, "ranking": ranking, **agreement(total), "variants": variants,
               "position": {name: _spearman(total, rows[name].to_numpy(float))
                            for name in ("n_train", "in_degree", "betweenness")},
               "misbehaving_flagged": bool(rows.loc[rows["misbehaving"], "harmful"].all())
               if rows["misbehaving"].any() else None}
    _contribution_plots(run, rows, matrix)

    shown = rows.drop(columns=[f"total{VARIANT_SUFFIX[v]}" for v in VARIANT_SUFFIX if v not in variants])
    print(shown.sort_values("rank").to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for v, agree in sorted(variants.items(), key=lambda item: item[0] != ranking):  # the ranking variant first
        label = "ledger total" if v == ranking else f"  {v} ledger total"
        for name in ("loo", "shapley"):
            if agree[name]["spearman"] is not None:
                print(f"{label} vs {name}: Spearman {agree[name]['spearman']:.3f}, Kendall "
                      f"{agree[name]['kendall']:.3f} over {n} participants")
        if agree["loo_honest"]["spearman"] is not None and rows["misbehaving"].any():
            print(f"  among the {int(honest.sum())} well-behaved participants only: Spearman "
                  f"{agree['loo_honest']['spearman']:.3f}, Kendall {agree['loo_honest']['kendall']:.3f}")
    print("ledger total vs position and data (Spearman): " + "  ".join(
        f"{k}: {'-' if v is None else f'{v:.3f}'}" for k, v in summary["position"].items()))
    if summary["misbehaving_flagged"] is not None:
        flagged = int(rows.loc[rows["misbehaving"], "harmful"].sum())
        print(f"misbehaving participants flagged harmful: {flagged} of {int(rows['misbehaving'].sum())}; honest "
              f"ones flagged: {int(rows.loc[~rows['misbehaving'], 'harmful'].sum())}")
    print(f"wrote {run / 'contributions_report.parquet'}, contributions_shares.png, contributions_heatmap.png")
    return summary


def _contribution_plots(run: Path, rows, matrix: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = rows.sort_values("rank")
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(rows)), 3.6), constrained_layout=True)
    colors = ["tab:red" if h else ("tab:orange" if b else "tab:blue")
              for h, b in zip(order["harmful"], order["misbehaving"], strict=True)]
    ax.bar([str(j) for j in order["participant"]], order["share"], color=colors)
    for i, h in enumerate(order["harmful"]):
        if h:
            ax.annotate("harmful", (i, 0), rotation=90, ha="center", va="bottom", fontsize=7, color="tab:red")
    ax.set_xlabel("participant (by rank)")
    ax.set_ylabel("share of the helpful budget")
    ax.set_title("contribution shares\n(red: flagged harmful; orange bar: misbehaving, not flagged)", fontsize=9)
    fig.savefig(run / "contributions_shares.png", dpi=120)
    plt.close(fig)

    _signed_heatmap(matrix, "ledger L[j → k]: red raised k's loss, blue lowered it",
                    run / "contributions_heatmap.png")



def _signed_heatmap(matrix: np.ndarray, title: str, path: Path) -> None:
    """Save a source × target heat-map of ``matrix`` [j, k] with a colour scale symmetric about 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.2), constrained_layout=True)
    limit = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 0.0
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-(limit or 1.0), vmax=limit or 1.0)
    ax.set_xlabel("target k")
    ax.set_ylabel("source j")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=120)
    plt.close(fig)

def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(prog="python -m dice_ray.analyze", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", choices=("alignment", "cascade", "anomaly", "collaborators", "contributions"),
                        help="which report")
    parser.add_argument("run", type=Path, nargs="+", help="run directory (collaborators: several)")
    parser.add_argument("--horizon", type=int, action="append", metavar="ROUNDS",
                        help="anomaly: count scores of rounds before ROUNDS (repeatable; default 5, 10, 20 and all)")
    parser.add_argument("--out", type=Path, help="collaborators: folder for collaborators.parquet (default: the "
                                                 "runs' common parent)")
    parser.add_argument("--loo", action="store_true", help="contributions: retrain without each participant's "
                                                           "data now (Ray tasks) if the run has no loo.parquet")
    parser.add_argument("--shapley", type=int, metavar="K", help="contributions: Monte-Carlo Shapley with K "
                                                                 "permutations now (K (N−1) + 2 retraining runs)")
    parser.add_argument("--local", action="store_true", help="contributions: retrain in this process, not on Ray")
    parser.add_argument("--allow-imports", action="store_true",
                        help="contributions --loo/--shapley: import the modules the run's config names to retrain "
                        "it (refused without this flag; reading a run never imports them)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        for run in args.run:
            if not run.is_dir():
                raise InputError(f"run directory {str(run)!r} does not exist")
        if args.report == "collaborators":
            collaborators(args.run, args.out)
        elif len(args.run) != 1:
            raise InputError(f"the {args.report} report reads one run directory, got {len(args.run)}")
        elif args.report == "anomaly":
            anomaly(args.run[0], args.horizon)
        elif args.report == "contributions":
            if args.shapley is not None and args.shapley < 1:
                raise InputError(f"--shapley {args.shapley}: needs at least 1 permutation")
            contributions(args.run[0], args.loo, args.shapley, args.local, args.allow_imports)
        else:
            {"alignment": alignment, "cascade": cascade}[args.report](args.run[0])
    except InputError as err:
        return report(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
