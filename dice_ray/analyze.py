"""``python -m dice_ray.analyze REPORT RUN_DIR``: reports computed from a run's tables.

    python -m dice_ray.analyze alignment runs/my-run     # DICE-E against DICE-GT, per hop and variant

``alignment`` reads ``dice.parquet`` and ``influence.parquet`` and prints, for every hop r and DICE-E
variant, Pearson, Spearman and Kendall correlation with DICE-GT and the relative error Σ|GT − E| / Σ|GT|,
for three quantities: the hop-r term alone (Σ over participants first reached at hop r), the cumulative
DICE^{(r)}, and every per-participant term d_k^{(r)} (k in S_r). It writes them to ``alignment.parquet``
and a GT-vs-E scatter per hop to ``alignment_hop{r}.png`` in the run directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy import stats

from dice_ray.errors import InputError
from dice_ray.results import ALIGNMENT, write_table_atomic

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


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for bad input)."""
    parser = argparse.ArgumentParser(prog="python -m dice_ray.analyze", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", choices=("alignment",), help="which report")
    parser.add_argument("run", type=Path, help="run directory")
    args = parser.parse_args(argv)
    try:
        if not args.run.is_dir():
            raise InputError(f"run directory {str(args.run)!r} does not exist")
        alignment(args.run)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
