"""The cascade report: how influence ripples out from a participant's data (see docs/concepts.md).

From whole-batch probes (DICE-GT where measured, else the best estimate measured: ``value_column``): mean
|influence| against hop distance, a source's total influence against its position (out-degree, betweenness,
closeness; networkx), the pairwise matrix I_{j→k} after R rounds and its reciprocity, the correlation of I_{j→k}
with I_{k→j}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import stats

from dice_ray.errors import InputError
from dice_ray.reports import plots
from dice_ray.reports.correlation import by_participant, spearman
from dice_ray.reports.inputs import PROBED, measured, read_columns, recorded_topology
from dice_ray.reports.writer import AsWritten
from dice_ray.results import CASCADE, PAIRWISE

__all__ = ["Cascade", "cascade_report"]


def value_column(influence: dict[str, np.ndarray]) -> str:
    """The best influence measured: ground truth, else the second-order estimate, else exact-readout, else curvature,
    else first-order (the first of these columns that the table has and that holds values)."""
    for column in ("gt", "est_second_order", "est_exact_readout", "est_curvature", "est_first_order"):
        if column not in influence:  # tables written before the variant existed
            continue
        if measured(influence[column]):
            return column
    raise InputError("influence.parquet holds no influence values")


@dataclass(frozen=True)
class Cascade(AsWritten):
    """The cascade report of one run.

    ``value``: the influence column used (``gt``, ``est_second_order``, ``est_exact_readout``, ``est_curvature`` or
    ``est_first_order``);
    ``last_step``: R, the last step after a probe. ``decay``: mean |influence| per (step, distance) (the
    ``cascade`` table). ``pairwise``: I_{j→k} per measured (source, target) at step R (the ``pairwise`` table);
    ``matrix``: the same as an N × N array [j, k], NaN where unmeasured. ``position``: Spearman correlation of a
    source's strength Σ_k |I_{j→k}| with its out-degree, betweenness and closeness (None: undefined).
    ``reciprocity``: ``pairs``, ``pearson``, ``spearman`` of I_{j→k} against I_{k→j}, and ``asymmetry``
    Σ|I_{j→k} − I_{k→j}| / Σ|I|.
    """

    value: str
    last_step: int
    decay: pd.DataFrame
    pairwise: pd.DataFrame
    matrix: np.ndarray
    position: dict[str, float | None]
    reciprocity: dict[str, int | float | None]

    def tables(self) -> dict[str, tuple[pd.DataFrame, pa.Schema]]:
        """Table name -> (rows, schema) to write: ``cascade`` and ``pairwise``."""
        return {"cascade": (self.decay, CASCADE), "pairwise": (self.pairwise, PAIRWISE)}

    def figures(self) -> dict[str, Callable[[Path], None]]:
        """PNG file name -> a function drawing it to a path: the decay curves and the pairwise heat-map."""
        return {"cascade_decay.png": lambda path: plots.cascade_decay(self.decay, self.value, path),
                "pairwise_heatmap.png": lambda path: plots.signed_heatmap(
                    self.matrix, f"I(j → k), {self.value} after R = {self.last_step} rounds:\nred raises k's loss, "
                    "blue lowers it", path)}


def cascade_report(run: str | Path) -> Cascade:
    """Return the cascade report of the run directory ``run`` (reads ``influence`` and the recorded topology;
    writes nothing)."""
    import networkx as nx

    run = Path(run)

    inf = read_columns(run, "influence", PROBED)
    column = value_column(inf)
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

    config, topology = recorded_topology(run)
    n = config.nodes
    final = whole & (step == last)
    total, count = np.zeros((n, n)), np.zeros((n, n))
    np.add.at(total, (source[final], target[final]), value[final])
    np.add.at(count, (source[final], target[final]), 1)
    matrix = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    pairwise = [{"source": j, "target": k, "value": column, "influence": float(matrix[j, k])}
                for j, k in zip(*np.nonzero(count), strict=True)]

    graph = topology.to_networkx(0)
    strength = np.nansum(np.abs(matrix), axis=1)
    probed = count.sum(axis=1) > 0
    betweenness, closeness = nx.betweenness_centrality(graph), nx.closeness_centrality(graph.reverse())  # once each
    position = {"out_degree": np.array([graph.out_degree(j) for j in range(n)], float),
                "betweenness": by_participant(betweenness, n), "closeness": by_participant(closeness, n)}
    upper = np.triu_indices(n, 1)
    forward, backward = matrix[upper], matrix.T[upper]
    both = np.isfinite(forward) & np.isfinite(backward)
    reciprocity = {
        "pairs": int(both.sum()),
        "pearson": float(stats.pearsonr(forward[both], backward[both]).statistic) if both.sum() >= 3 else None,
        "spearman": spearman(forward[both], backward[both]),
        "asymmetry": float(np.abs(forward[both] - backward[both]).sum() / np.abs(np.r_[forward[both],
                                                                                         backward[both]]).sum())
        if both.any() else None,
    }
    return Cascade(value=column, last_step=last, decay=pd.DataFrame(decay, columns=CASCADE.names),
                   pairwise=pd.DataFrame(pairwise, columns=PAIRWISE.names), matrix=matrix,
                   position={name: spearman(strength[probed], measure[probed]) for name, measure in position.items()},
                   reciprocity=reciprocity)
