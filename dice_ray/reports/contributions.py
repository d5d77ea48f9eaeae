"""The contributions report: the contribution ledger's ranking against retraining (see docs/concepts.md).

From a run with the ledger (``shares`` and ``contributions``) it ranks the participants by their ledger total T_j,
with their share of the helpful budget and the harmful flag, beside their data size, misbehaviour and position
(in-degree, betweenness). Where leave-one-participant-out retraining (``loo``) and Monte-Carlo Shapley
(``shapley``) exist, it gives Spearman and Kendall correlation of T_j with them. A run without the ledger but
with retraining is ranked by the same rule on its leave-one-out effects (else its Shapley values), agreed with
the other. Computing those is retraining, not reporting: ``dice_ray.Run.retrain`` (``python -m dice_ray.analyze
contributions --loo``/``--shapley``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dice_ray.reports import plots
from dice_ray.reports.correlation import by_participant, rank_agreement, ratios, spearman
from dice_ray.reports.inputs import check_participants, read_frame, recorded_topology
from dice_ray.reports.writer import AsWritten
from dice_ray.results import CONTRIBUTION_REPORT, VARIANT_SUFFIX

__all__ = ["Contributions", "contributions_report", "ledger_tables", "loo_matrix"]

REPORT_HINT = ("run the simulation with ledger.enabled (--ledger) first, or retrain this run now with "
               "contributions(loo=True) or contributions(shapley=K) (analyze contributions --loo / --shapley K)")
RETRAINED = ("loo", "shapley")  # the retraining measures a run without the ledger is ranked by, in this order


def ledger_tables(run: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Return ``run``'s (shares, contributions, nodes) tables; a run without the ledger is an ``InputError``."""
    return (read_frame(run, "shares", REPORT_HINT, enabled="ledger.enabled"),
            read_frame(run, "contributions", REPORT_HINT, enabled="ledger.enabled"),
            read_frame(run, "nodes", "not a finished run"))


def retrained_measures(run: Path) -> tuple[dict[str, pd.Series], pd.DataFrame | None]:
    """Return each retraining measure ``run`` has, by participant: ``loo`` (j's leave-one-out effect Σ_k q_k
    (L_k(full) − L_k(without j))) and ``shapley`` (its Monte-Carlo Shapley value), both > 0 where j raised the
    loss, as the ledger's T_j; and the rows of ``loo.parquet`` of the left-out participants (None: no table)."""
    found, left_out = {}, None
    if (run / "loo.parquet").is_file():
        table = read_frame(run, "loo", "")
        left_out = table[table["participant"] >= 0]
        found["loo"] = left_out.groupby("participant")["effect"].sum()
    if (run / "shapley.parquet").is_file():
        found["shapley"] = read_frame(run, "shapley", "").set_index("participant")["shapley"]
    return found, left_out


def loo_matrix(left_out: pd.DataFrame, n: int) -> np.ndarray:
    """The leave-one-out effects q_k (L_k(full) − L_k(without j)) of ``left_out`` (``retrained_measures``) as an
    N × N array [j, k]."""
    matrix = np.full((n, n), np.nan)
    matrix[left_out["participant"].to_numpy(), left_out["target"].to_numpy()] = left_out["effect"].to_numpy()
    return matrix


@dataclass(frozen=True)
class Contributions(AsWritten):
    """The contributions report of one run.

    ``table``: one row per participant (the ``contributions_report`` table: ledger totals per variant, share,
    harmful flag, rank, ``loo_effect`` and ``shapley`` (NaN: not computed), data size, misbehaviour, in-degree,
    betweenness). ``ranking``: what ranks the participants and gives shares and harmful flags: the run's ledger
    variant, or in a run without the ledger ``loo`` (else ``shapley``). ``matrix``: the final ledger L[j → k] of
    the ranking variant as an N × N array (without the ledger: the leave-one-out effects q_k (L_k(full) −
    L_k(without j)); None with Shapley values alone). ``agreement``: rank agreement (``spearman``, ``kendall``;
    None: not computed, or the ranking measure itself) of the ranking measure with ``loo``, ``shapley`` and, over
    well-behaved participants only, ``loo_honest``; ``variants``: the same per measured ledger variant (empty
    without the ledger). ``position``: Spearman correlation of the ranking measure with ``n_train``, ``in_degree``
    and ``betweenness``. ``misbehaving_flagged``: whether every misbehaving participant is flagged harmful (None:
    none misbehaves). ``scale``: the ledger total of the ranking variant over ``loo`` and ``shapley``, per
    participant (``correlation.ratios``: median and quartiles; None: not computed; empty when ranked by
    retraining). The two are in other units: the ledger sums DICE's cascade of each probed update (counted at its
    source and at each participant it first reaches, with the gradient of that step), leave-one-out counts every
    update once in the final loss (measured: 1.6 and 2.2 with R = 1 and 3, every round probed; 0.8-0.9 with every 2nd).
    """

    table: pd.DataFrame
    ranking: str
    matrix: np.ndarray | None
    agreement: dict[str, dict[str, float | None]]
    variants: dict[str, dict[str, dict[str, float | None]]]
    position: dict[str, float | None]
    misbehaving_flagged: bool | None
    scale: dict[str, dict[str, float] | None] = field(default_factory=dict)

    @property
    def ledger(self) -> bool:
        """Whether the run kept the ledger (else it is ranked by retraining)."""
        return self.ranking not in RETRAINED

    def tables(self) -> dict[str, tuple[pd.DataFrame, pa.Schema]]:
        """Table name -> (rows, schema) to write: ``contributions_report``."""
        return {"contributions_report": (self.table, CONTRIBUTION_REPORT)}

    def figures(self) -> dict[str, Callable[[Path], None]]:
        """PNG file name -> a function drawing it to a path: the shares bar chart and the heat-map of ``matrix``
        (none without one)."""
        figures = {"contributions_shares.png": lambda path: plots.contribution_shares(self.table, path)}
        if self.matrix is not None:
            title = ("ledger L[j → k]: red raised k's loss, blue lowered it" if self.ledger else
                     "leave-one-out q_k (L_k(full) − L_k(without j)):\nred: j raised k's loss, blue: lowered it")
            matrix = self.matrix
            figures["contributions_heatmap.png"] = lambda path: plots.signed_heatmap(matrix, title, path)
        return figures


def contributions_report(run: str | Path) -> Contributions:
    """Return the contributions report of the run directory ``run`` (a run with the ledger, or with leave-one-out
    or Shapley retraining; reads ``loo`` and ``shapley`` where they exist, retrains nothing and writes nothing)."""
    import networkx as nx

    from dice_ray.methods.contributions import shares as share_rows

    run = Path(run)
    config, topology = recorded_topology(run)
    retrained, left_out = retrained_measures(run)
    nodes = read_frame(run, "nodes", "not a finished run")
    n = len(nodes)
    if left_out is not None:
        for column in ("participant", "target"):
            check_participants(run / "loo.parquet", column, left_out[column], n)
    if "shapley" in retrained:
        check_participants(run / "shapley.parquet", "participant", retrained["shapley"].index, n, every=True)
    if retrained and not (run / "shares.parquet").is_file():  # ranked by retraining: the ledger's rule on it
        ranking = next(name for name in RETRAINED if name in retrained)
        totals = np.full(n, np.nan)
        totals[retrained[ranking].index.to_numpy()] = retrained[ranking].to_numpy()
        rows = pd.DataFrame(share_rows(totals, {}))
        matrix = loo_matrix(left_out, n) if ranking == "loo" else None
    else:
        shares, ledger, _ = ledger_tables(run)
        check_participants(run / "shares.parquet", "participant", shares["participant"], n, every=True)
        for column in ("source", "target"):
            check_participants(run / "contributions.parquet", column, ledger[column], n)
        ranking = config.ledger.ranking
        matrix = np.zeros((n, n))
        column = "cumulative" + VARIANT_SUFFIX[ranking]
        last = ledger.groupby(["source", "target"])[column].last() if column in ledger else ledger.iloc[:0]["step"]
        matrix[last.index.get_level_values(0), last.index.get_level_values(1)] = last.to_numpy()
        rows = shares.sort_values("participant").reset_index(drop=True)
        for v in list(VARIANT_SUFFIX)[1:]:  # tables of runs before the curvature ledger have no such column
            if f"total{VARIANT_SUFFIX[v]}" not in rows:
                rows[f"total{VARIANT_SUFFIX[v]}"] = np.nan
    betweenness = nx.betweenness_centrality(topology.to_networkx(0))
    rows["loo_effect"] = np.nan
    rows["shapley"] = np.nan
    for name, column in (("loo", "loo_effect"), ("shapley", "shapley")):
        if name in retrained:
            rows.loc[retrained[name].index, column] = retrained[name].to_numpy()
    rows["n_train"] = nodes["n_train"].to_numpy()
    rows["misbehaving"] = nodes["misbehaving"].to_numpy()
    rows["in_degree"] = nodes["in_degree"].to_numpy()
    rows["betweenness"] = by_participant(betweenness, n)
    honest = ~rows["misbehaving"].to_numpy()
    none = {"spearman": None, "kendall": None}

    def agreement(total: np.ndarray) -> dict[str, dict[str, Any]]:
        found = {"loo": rank_agreement(total, rows["loo_effect"].to_numpy()),
                 "shapley": rank_agreement(total, rows["shapley"].to_numpy()),
                 "loo_honest": rank_agreement(total[honest], rows["loo_effect"].to_numpy()[honest])}
        if ranking in RETRAINED:  # a measure's agreement with itself says nothing
            found |= {ranking: none} | ({"loo_honest": none} if ranking == "loo" else {})
        return found

    total = (rows["loo_effect"] if ranking == "loo" else rows["shapley"] if ranking == "shapley" else
             rows["total" + VARIANT_SUFFIX[ranking]]).to_numpy()
    position = ("n_train", "in_degree", "betweenness")
    return Contributions(
        table=rows, ranking=ranking, matrix=matrix, agreement=agreement(total),
        variants={v: agreement(rows[f"total{VARIANT_SUFFIX[v]}"].to_numpy()) for v in VARIANT_SUFFIX
                  if rows[f"total{VARIANT_SUFFIX[v]}"].notna().any()},
        position={name: spearman(total, rows[name].to_numpy(float)) for name in position},
        misbehaving_flagged=bool(rows.loc[rows["misbehaving"], "harmful"].all()) if rows["misbehaving"].any() else None,
        scale={} if ranking in RETRAINED else {name: ratios(total, rows[column].to_numpy())
                                                for name, column in (("loo", "loo_effect"), ("shapley", "shapley"))})
