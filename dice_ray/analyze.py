"""``python -m dice_ray.analyze REPORT RUN_DIR``: reports computed from a run's tables.

    python -m dice_ray.analyze alignment runs/my-run     # DICE-E against DICE-GT, per hop and variant
    python -m dice_ray.analyze cascade runs/my-run       # ripples: influence against hop distance, position

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
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy import stats

from dice_ray.errors import InputError
from dice_ray.results import ALIGNMENT, CASCADE, PAIRWISE, write_table_atomic

VARIANTS = {"first-order": "est_first_order", "curvature": "est_curvature"}
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
    for r in sorted(set(dice["hops"].tolist())):
        at = dice["hops"] == r
        for quantity, suffix in QUANTITIES.items():
            for variant, column in VARIANTS.items():
                rows.append({"hops": r, "quantity": quantity, "variant": variant,
                             **_compare(dice[f"gt{suffix}"][at].astype(float),
                                        dice[f"{column}{suffix}"][at].astype(float))})
        if influence is not None:
            at = influence["step"] == r
            for variant, column in VARIANTS.items():
                rows.append({"hops": r, "quantity": "terms", "variant": variant,
                             **_compare(influence["gt"][at].astype(float), influence[column][at].astype(float))})
    return rows


def _scatter(run: Path, dice: dict[str, np.ndarray], r: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    at = dice["hops"] == r
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), constrained_layout=True)
    for ax, (quantity, suffix) in zip(axes, QUANTITIES.items(), strict=True):
        gt = dice[f"gt{suffix}"][at].astype(float)
        for (variant, column), marker in zip(VARIANTS.items(), ("o", "x"), strict=True):
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
    """The best influence measured: ground truth, else the curvature estimate, else first-order."""
    for column in ("gt", "est_curvature", "est_first_order"):
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
    import json

    import networkx as nx

    from dice_ray.config import RunConfig
    from dice_ray.topology import make_topology

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

    config = RunConfig.model_validate(json.loads((run / "manifest.json").read_text())["config"])
    n = config.nodes
    final = whole & (step == last)
    total, count = np.zeros((n, n)), np.zeros((n, n))
    np.add.at(total, (source[final], target[final]), value[final])
    np.add.at(count, (source[final], target[final]), 1)
    pairwise = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    write_table_atomic(run / "pairwise.parquet",
                       [{"source": j, "target": k, "value": column, "influence": float(pairwise[j, k])}
                        for j, k in zip(*np.nonzero(count), strict=True)], PAIRWISE)

    topology = make_topology(config.topology.name, n, weights=config.topology.weights, seed=config.seed,
                             p=config.topology.p, rows=config.topology.rows, path=config.topology.file,
                             directed=config.topology.directed)
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

    fig, ax = plt.subplots(figsize=(5, 4.2), constrained_layout=True)
    limit = np.nanmax(np.abs(pairwise)) if np.isfinite(pairwise).any() else 1.0
    image = ax.imshow(pairwise, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_xlabel("target k")
    ax.set_ylabel("source j")
    ax.set_title("I(j → k): red raises k's loss, blue lowers it")
    fig.colorbar(image, ax=ax)
    fig.savefig(run / "pairwise_heatmap.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for bad input)."""
    parser = argparse.ArgumentParser(prog="python -m dice_ray.analyze", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", choices=("alignment", "cascade"), help="which report")
    parser.add_argument("run", type=Path, help="run directory")
    args = parser.parse_args(argv)
    try:
        if not args.run.is_dir():
            raise InputError(f"run directory {str(args.run)!r} does not exist")
        {"alignment": alignment, "cascade": cascade}[args.report](args.run)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
