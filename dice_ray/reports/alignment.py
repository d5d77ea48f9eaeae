"""The alignment report: DICE-E against DICE-GT, per hop r and DICE-E variant (see docs/concepts.md).

For every hop r and variant it gives Pearson, Spearman and Kendall correlation with DICE-GT and the relative
error Σ|GT − E| / Σ|GT|, for three quantities: the hop-r term alone (Σ over participants first reached at hop r),
the cumulative DICE^{(r)}, and every per-participant term d_k^{(r)} (k within r hops of the source, itself included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from dice_ray.errors import InputError
from dice_ray.reports import plots
from dice_ray.reports.correlation import compare
from dice_ray.reports.inputs import PROBED, measured, read_columns, recorded_topology
from dice_ray.reports.writer import AsWritten
from dice_ray.results import ALIGNMENT

__all__ = ["Alignment", "alignment_report", "alignment_rows"]

VARIANTS = {"first-order": "est_first_order", "curvature": "est_curvature", "second-order": "est_second_order",
            "exact-readout": "est_exact_readout"}
QUANTITIES = {"hop": "_hop", "cumulative": ""}


def measured_variants(dice: dict[str, np.ndarray] | pd.DataFrame) -> dict[str, str]:
    """The DICE-E variants the run computed, variant -> column (a column that is absent or all null was not)."""
    return {v: c for v, c in VARIANTS.items() if c in dice and measured(np.asarray(dice[c]))}


BEYOND_FIRST = ("second-order", "exact-readout")  # variants with a part beyond the curvature term's first order


def correction(table: dict[str, np.ndarray], column: str, curvature: str, at: np.ndarray) -> float | None:
    """Σ|E − E_curvature| / Σ|E_curvature| of ``column`` over the rows ``at`` (finite pairs): how large a variant's
    part beyond first order is against the first-order term. A Taylor expansion is worth reading where that is well
    under 1; near 1 or above, the perturbation lies outside it (Adam's first rounds at a larger η: concepts)."""
    e, first = table[column][at].astype(float), table[curvature][at].astype(float)
    ok = np.isfinite(e) & np.isfinite(first)
    total = np.abs(first[ok]).sum()
    return float(np.abs(e[ok] - first[ok]).sum() / total) if total > 0 else None


def alignment_rows(dice: dict[str, np.ndarray], influence: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Return one row per (hop, quantity, variant): correlations and relative error of E against GT, and for the
    variants beyond first order their ``correction``.

    Quantities: ``hop`` (the hop-r term of DICE^{(r)}), ``cumulative`` (DICE^{(r)}), and, from the influence
    table, ``terms`` (every per-participant term d_k^{(r)} against e_k^{(r)}, k within r hops of the source, itself
    included).
    """
    rows = []
    variants = measured_variants(dice)

    def row(table: dict[str, np.ndarray], at: np.ndarray, r: int, quantity: str, variant: str, suffix: str) -> dict:
        column = f"{variants[variant]}{suffix}"
        beyond = variant in BEYOND_FIRST and "curvature" in variants
        return {"hops": r, "quantity": quantity, "variant": variant,
                **compare(table[f"gt{suffix}"][at].astype(float), table[column][at].astype(float)),
                "correction": correction(table, column, f"{VARIANTS['curvature']}{suffix}", at) if beyond else None}

    for r in sorted(set(dice["hops"].tolist())):
        at = dice["hops"] == r
        for quantity, suffix in QUANTITIES.items():
            rows += [row(dice, at, r, quantity, variant, suffix) for variant in variants]
        if influence is not None:
            rows += [row(influence, influence["step"] == r, r, "terms", variant, "") for variant in variants]
    return rows


@dataclass(frozen=True)
class Alignment(AsWritten):
    """The alignment report of one run.

    ``table``: one row per (hops, quantity, variant) with ``probes``, ``pearson``, ``spearman``, ``kendall``,
    ``relative_error`` and ``correction`` (the ``alignment`` table; NaN where undefined). ``dice``: the run's
    ``dice`` table, whose GT and E values per probe the scatter plots show.
    """

    table: pd.DataFrame
    dice: pd.DataFrame

    @property
    def hops(self) -> list[int]:
        """The hops r the run measured, ascending."""
        return sorted(set(self.dice["hops"].tolist()))

    def tables(self) -> dict[str, tuple[pd.DataFrame, pa.Schema]]:
        """Table name -> (rows, schema) to write: ``alignment``."""
        return {"alignment": (self.table, ALIGNMENT)}

    def figures(self) -> dict[str, Callable[[Path], None]]:
        """PNG file name -> a function drawing it to a path: a GT-vs-E scatter per hop, ``alignment_hop{r}.png``."""
        variants = measured_variants(self.dice)
        return {f"alignment_hop{r}.png": (lambda path, r=r: plots.alignment_scatter(self.dice, variants, r, path))
                for r in self.hops}


def alignment_report(run: str | Path) -> Alignment:
    """Return the alignment report of the run directory ``run`` (reads ``dice`` and ``influence``; writes nothing).
    A run without influence, or without ground truth, is an ``InputError``."""
    run = Path(run)
    recorded_topology(run)  # a run directory: its manifest, and as many participants as it recorded
    dice = read_columns(run, "dice", PROBED)
    if not measured(dice["gt"]):
        raise InputError(f"{run / 'dice.parquet'} has no ground truth (influence.ground_truth was off) to align the "
                         "estimates with; `analyze cascade` reads the estimates alone")
    rows = alignment_rows(dice, read_columns(run, "influence", PROBED))
    return Alignment(pd.DataFrame(rows, columns=ALIGNMENT.names), pd.DataFrame(dice))
