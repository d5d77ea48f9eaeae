"""The contributions report: the contribution ledger's ranking against retraining (see docs/concepts.md).

From a run with the ledger (``shares`` and ``contributions``) it ranks the participants by their ledger total T_j,
with their share of the helpful budget and the harmful flag, beside their data size, misbehaviour and position
(in-degree, betweenness). Where leave-one-participant-out retraining (``loo``) and Monte-Carlo Shapley
(``shapley``) exist, it gives Spearman and Kendall correlation of T_j with them. Computing those is retraining,
not reporting: ``dice_ray.Run.retrain`` (``python -m dice_ray.analyze contributions --loo``/``--shapley``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dice_ray.reports import plots
from dice_ray.reports.correlation import rank_agreement, spearman
from dice_ray.reports.inputs import read_frame, recorded_topology
from dice_ray.results import CONTRIBUTION_REPORT, VARIANT_SUFFIX

LEDGER_HINT = "run the simulation with --ledger first"


def ledger_tables(run: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Return ``run``'s (shares, contributions, nodes) tables; a run without the ledger is an ``InputError``."""
    return (read_frame(run, "shares", LEDGER_HINT), read_frame(run, "contributions", LEDGER_HINT),
            read_frame(run, "nodes", "not a finished run"))


@dataclass(frozen=True)
class Contributions:
    """The contributions report of one run.

    ``table``: one row per participant (the ``contributions_report`` table: ledger totals per variant, share,
    harmful flag, rank, ``loo_effect`` and ``shapley`` (NaN: not computed), data size, misbehaviour, in-degree,
    betweenness). ``ranking``: the variant the run ranks by. ``matrix``: the final ledger L[j → k] of the ranking
    variant as an N × N array. ``agreement``: rank agreement (``spearman``, ``kendall``; None: not computed) of
    the ranking variant's totals with ``loo``, ``shapley`` and, over well-behaved participants only,
    ``loo_honest``; ``variants``: the same per measured variant. ``position``: Spearman correlation of the
    totals with ``n_train``, ``in_degree`` and ``betweenness``. ``misbehaving_flagged``: whether every
    misbehaving participant is flagged harmful (None: none misbehaves).
    """

    table: pd.DataFrame
    ranking: str
    matrix: np.ndarray
    agreement: dict[str, dict[str, float | None]]
    variants: dict[str, dict[str, dict[str, float | None]]]
    position: dict[str, float | None]
    misbehaving_flagged: bool | None

    def tables(self) -> dict[str, tuple[pd.DataFrame, pa.Schema]]:
        """Table name -> (rows, schema) to write: ``contributions_report``."""
        return {"contributions_report": (self.table, CONTRIBUTION_REPORT)}

    def figures(self) -> dict[str, Callable[[Path], None]]:
        """PNG file name -> a function drawing it to a path: the shares bar chart and the ledger heat-map."""
        return {"contributions_shares.png": lambda path: plots.contribution_shares(self.table, path),
                "contributions_heatmap.png": lambda path: plots.signed_heatmap(
                    self.matrix, "ledger L[j → k]: red raised k's loss, blue lowered it", path)}


def contributions_report(run: str | Path) -> Contributions:
    """Return the contributions report of the run directory ``run`` (a run with the ledger; reads ``loo`` and
    ``shapley`` where they exist, retrains nothing and writes nothing)."""
    import networkx as nx

    run = Path(run)

    shares, ledger, nodes = ledger_tables(run)
    n = len(nodes)
    config, topology = recorded_topology(run)
    ranking = config.ledger.ranking
    matrix = np.zeros((n, n))
    column = "cumulative" + VARIANT_SUFFIX[ranking]
    last = ledger.groupby(["source", "target"])[column].last() if column in ledger else ledger.iloc[:0]["step"]
    matrix[last.index.get_level_values(0), last.index.get_level_values(1)] = last.to_numpy()
    betweenness = nx.betweenness_centrality(topology.to_networkx(0))
    rows = shares.sort_values("participant").reset_index(drop=True)
    for v in list(VARIANT_SUFFIX)[1:]:  # tables of runs before the curvature ledger have no such column
        if f"total{VARIANT_SUFFIX[v]}" not in rows:
            rows[f"total{VARIANT_SUFFIX[v]}"] = np.nan
    rows["loo_effect"] = np.nan
    rows["shapley"] = np.nan
    if (run / "loo.parquet").is_file():
        table = read_frame(run, "loo", "")
        effect = table[table["participant"] >= 0].groupby("participant")["effect"].sum()
        rows.loc[effect.index, "loo_effect"] = effect.to_numpy()
    if (run / "shapley.parquet").is_file():
        table = read_frame(run, "shapley", "").set_index("participant")["shapley"]
        rows.loc[table.index, "shapley"] = table.to_numpy()
    rows["n_train"] = nodes["n_train"].to_numpy()
    rows["misbehaving"] = nodes["misbehaving"].to_numpy()
    rows["in_degree"] = nodes["in_degree"].to_numpy()
    rows["betweenness"] = np.round([betweenness[j] for j in range(n)], 12)  # equal ones compare equal
    honest = ~rows["misbehaving"].to_numpy()

    def agreement(total: np.ndarray) -> dict[str, dict[str, Any]]:
        return {"loo": rank_agreement(total, rows["loo_effect"].to_numpy()),
                "shapley": rank_agreement(total, rows["shapley"].to_numpy()),
                "loo_honest": rank_agreement(total[honest], rows["loo_effect"].to_numpy()[honest])}

    total = rows["total" + VARIANT_SUFFIX[ranking]].to_numpy()
    position = ("n_train", "in_degree", "betweenness")
    return Contributions(
        table=rows, ranking=ranking, matrix=matrix, agreement=agreement(total),
        variants={v: agreement(rows[f"total{VARIANT_SUFFIX[v]}"].to_numpy()) for v in VARIANT_SUFFIX
                  if rows[f"total{VARIANT_SUFFIX[v]}"].notna().any()},
        position={name: spearman(total, rows[name].to_numpy(float)) for name in position},
        misbehaving_flagged=bool(rows.loc[rows["misbehaving"], "harmful"].all()) if rows["misbehaving"].any() else None)
