"""A user's method in one file, as the "Add a method" guide writes it: options, a round hook, a driver, a stage after
training, registered with ``dice_ray.register_method``. Imported by ``tests/test_hooks.py`` and, through ``--imports
toy_method``, by the command line."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field

import dice_ray


class ScaledNormOptions(dice_ray.Section):
    """The options of the ``scaled_norm`` method: the section ``scaled_norm`` of the run config."""

    enabled: bool = Field(False, description="report scale * ||Δ_k^t|| of every participant's update")
    scale: float = Field(1.0, gt=0, description="the factor applied to every norm")

    def check(self, config: Any) -> None:
        if self.enabled and config.rounds < 2:
            raise ValueError("scaled_norm needs at least 2 rounds")


class ScaledNorm(dice_ray.RoundHook):
    """scale * ||Δ_k^t|| of every hosted participant, every round."""

    name = "scaled_norm"

    def before_local_step(self, t: int) -> None:
        self.before = self.block.population.params.clone()

    def after_gossip(self, t: int, inbox: dice_ray.Inbox) -> dict[str, Any]:
        delta = (self.block.population.params - self.before).double()  # what gossip and the step moved
        return {"round": np.full(self.block.size, t, np.int32), "node": self.block.nodes.astype(np.int32),
                "norm": self.config.scaled_norm.scale * delta.norm(dim=1)}  # a tensor: the driver gets numpy


class ScaledNormTable(dice_ray.RowsDriver):
    name = "scaled_norm"
    tables = {"scaled_norm": pa.schema([("round", pa.int32()), ("node", pa.int32()), ("norm", pa.float64())])}


def node_total(table: pd.DataFrame, node: int, device: str) -> float:
    """A task: participant ``node``'s sum of norms over the run."""
    return float(table.loc[table["node"] == node, "norm"].sum())


class NormTotals(dice_ray.Stage):
    """After training: every participant's total, one task per participant."""

    name = "norm_totals"
    tables = {"norm_totals": pa.schema([("node", pa.int32()), ("total", pa.float64())])}

    def run(self, tasks: Any) -> dict[str, Any]:
        table = tasks.share(pd.read_parquet(self.out / "scaled_norm.parquet"))
        nodes = list(range(self.experiment.nodes))
        totals = tasks.map(node_total, [(table, k) for k in nodes], self.name, lambda job: {"node": job[1]})
        return {"norm_totals": {"node": np.asarray(nodes, np.int32), "total": np.asarray(totals)}}


SCALED_NORM = dice_ray.register_method(dice_ray.Method(
    "scaled_norm", lambda config: config.scaled_norm.enabled, ScaledNorm, ScaledNormTable, stages=(NormTotals,),
    options=ScaledNormOptions))
