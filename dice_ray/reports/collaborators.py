"""The collaborators report: final accuracy of the honest participants, static against rewired topologies.

It reads several runs that differ in ``rewiring.mode`` (none, influence, outlier, random), misbehaviour and seed,
and compares the final mean held-out accuracy of the honest participants, and each rewiring's gain over the static
topology seed by seed (see docs/concepts.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from dice_ray.config import RunConfig, read_recorded
from dice_ray.core.misbehavior import kind_options
from dice_ray.errors import InputError
from dice_ray.reports.inputs import read_frame, recorded_topology
from dice_ray.reports.writer import AsWritten
from dice_ray.results import COLLABORATORS
from dice_ray.rundir import MANIFEST, read_manifest, read_table

__all__ = ["Collaborators", "collaborators_report", "collaborator_row"]

REWIRINGS = ("none", "influence", "outlier", "random")


def _final_in_edges(run: Path, config, nodes: pd.DataFrame) -> list[np.ndarray]:
    """In-neighbour sets at the end of ``run``: the last rewiring's, else W^0's."""
    from dice_ray.methods.rewiring import in_neighbor_sets

    path = run / "rewiring.parquet"
    if config.rewiring.mode != "none" and path.is_file():
        history = read_table(path).to_pandas()
        if len(history):
            final = history[(history["round"] == history["round"].max()) & (history["action"] != "dropped")]
            return [np.sort(final.loc[final["participant"] == k, "neighbor"].to_numpy()) for k in range(len(nodes))]
    return in_neighbor_sets(recorded_topology(run)[1].mixing_matrix(0))


def collaborator_row(run: Path) -> dict:
    """Return ``run``'s row of ``collaborators.parquet`` (final accuracy of its honest participants)."""
    manifest = read_manifest(run)  # not a run: one line saying so
    if manifest.get("status") != "complete":
        raise InputError(f"{run} is not a complete run (its manifest.json says status {manifest.get('status')!r}); "
                         f"finish it with python -m dice_ray.simulate --resume {run}")
    config = read_recorded(manifest["config"], f"run {str(run)!r}")
    rounds, nodes = read_frame(run, "rounds", "incomplete run"), read_frame(run, "nodes", "incomplete run")
    last = rounds[rounds["round"] == rounds["round"].max()].sort_values("node")
    honest = ~nodes.sort_values("node")["misbehaving"].to_numpy()
    bad = set(np.flatnonzero(~honest).tolist())
    edges = _final_in_edges(run, config, nodes)
    fallbacks = manifest.get("rewiring_fallbacks", [])
    if not isinstance(fallbacks, list):
        raise InputError(f"{run / MANIFEST}: rewiring_fallbacks is {type(fallbacks).__name__}, not the list of "
                         "rounds a run writes: the manifest was changed")
    from_bad = [np.isin(e, list(bad)).sum() for k, e in enumerate(edges) if honest[k]]
    total = sum(len(e) for k, e in enumerate(edges) if honest[k])
    return {"run": str(run), "rewiring": config.rewiring.mode, "misbehavior": config.misbehavior.kind,
            "misbehavior_options": json.dumps(kind_options(config.misbehavior, by_field=True), sort_keys=True),
            "misbehaving": int((~honest).sum()), "seed": config.seed,
            "honest_acc": float(last["heldout_acc"].to_numpy()[honest].mean()),
            "honest_loss": float(last["heldout_loss"].to_numpy()[honest].mean()),
            "anomalous_in_edges": float(sum(from_bad) / total) if total else 0.0,
            "fallbacks": len(fallbacks),
            "study": study(config)}  # what the compared runs must share (not a column)


# Fields of the shared sections that choose how a run computes or where it reads, not what: runs differing there are
# one study's
NOT_THE_STUDY = ("model.vectorize", "model.conv", "model.pool", "data.data_dir", "data.download")


def study(config: RunConfig) -> dict[str, object]:
    """What runs of one collaborators study share: every field but the seed, the rewiring, the misbehaviour, the
    methods' and engine's and output's settings: the participants, rounds, model, optimizer, data and graph."""
    shared = {"nodes": config.nodes, "rounds": config.rounds}
    for section in ("model", "optim", "data", "topology"):
        for key, value in getattr(config, section).model_dump(mode="json").items():
            if f"{section}.{key}" not in NOT_THE_STUDY:
                shared[f"{section}.{key}"] = value
    return shared


def common_parent(runs: list[Path]) -> Path:
    """The deepest folder holding every run directory of ``runs``: where ``collaborators.parquet`` goes by default."""
    return Path(os.path.commonpath([str(r.resolve().parent) for r in runs]))


def _setting(row: dict) -> tuple[str, str, int]:
    """What a study varies besides rewiring and seed: the misbehaviour (kind and options) and how many misbehave."""
    return row["misbehavior"], row["misbehavior_options"], row["misbehaving"]


def _summary(rows: list[dict]) -> list[dict]:
    """One row per (misbehaviour, its options, misbehaving count, rewiring) over seeds; gain and wins only for a
    rewiring with static runs of the same seeds."""
    out = []
    for kind, options, count in sorted({_setting(r) for r in rows}):
        setting = [r for r in rows if _setting(r) == (kind, options, count)]
        static = {r["seed"]: r["honest_acc"] for r in setting if r["rewiring"] == "none"}
        for mode in REWIRINGS:
            these = [r for r in setting if r["rewiring"] == mode]
            if not these:
                continue
            acc = np.array([r["honest_acc"] for r in these])
            gains = [r["honest_acc"] - static[r["seed"]] for r in these if r["seed"] in static]
            paired = bool(gains) and mode != "none"
            out.append({"misbehavior": kind, "misbehavior_options": options, "misbehaving": count,
                        "rewiring": mode, "seeds": len(these),
                        "honest_acc": float(acc.mean()), "honest_acc_std": float(acc.std(ddof=1)) if len(acc) > 1
                        else None, "anomalous_in_edges": float(np.mean([r["anomalous_in_edges"] for r in these])),
                        "fallbacks": sum(r["fallbacks"] for r in these),
                        "gain": float(np.mean(gains)) if paired else None,
                        "wins": sum(g > 0 for g in gains) if paired else None, "paired": len(gains)})
    return out


@dataclass(frozen=True)
class Collaborators(AsWritten):
    """The collaborators report over several runs.

    ``table``: one row per run (the ``collaborators`` table). ``summary``: one row per (misbehavior,
    misbehavior_options, misbehaving, rewiring) with ``seeds``, the mean and standard deviation of ``honest_acc``
    over them (None for one seed), the mean ``anomalous_in_edges``, the runs' ``fallbacks`` in all, and for a
    rewiring the mean ``gain`` in honest accuracy over the
    static topology and its ``wins`` over the ``paired`` seeds that have a static run (None for the static topology
    itself).
    """

    table: pd.DataFrame
    summary: pd.DataFrame

    def tables(self) -> dict[str, tuple[pd.DataFrame, pa.Schema]]:
        """Table name -> (rows, schema) to write: ``collaborators``."""
        return {"collaborators": (self.table, COLLABORATORS)}

    def figures(self) -> dict[str, Callable[[Path], None]]:
        """PNG file name -> drawing function: none for this report."""
        return {}


def _check_comparable(rows: list[dict]) -> None:
    """Raise ``InputError`` unless the runs are one study's: the same config but the seed, rewiring and misbehaviour
    (``study``: participants, rounds, model, optimizer, data and graph), and one run per (misbehaviour and its
    options, rewiring, seed), since the summary averages over seeds and pairs them."""
    first = rows[0]
    for row in rows[1:]:
        for field, value in row["study"].items():
            if value != first["study"][field]:
                raise InputError(f"runs {first['run']} and {row['run']} differ in {field} ({first['study'][field]} "
                                 f"and {value}): compare runs of one study")
    seen: dict[tuple, str] = {}
    for row in rows:
        key = (*_setting(row), row["rewiring"], row["seed"])
        if key in seen:
            raise InputError(f"runs {seen[key]} and {row['run']} are both rewiring {row['rewiring']}, seed "
                             f"{row['seed']} ({row['misbehavior']} {row['misbehavior_options']} x{row['misbehaving']})"
                             ": the report averages over seeds, so pass one run per seed")
        seen[key] = row["run"]


def collaborators_report(runs: list[str | Path]) -> Collaborators:
    """Return the collaborators report comparing the finished run directories ``runs`` (writes nothing)."""
    runs = [Path(r) for r in runs]
    rows = [collaborator_row(run) for run in runs]
    _check_comparable(rows)
    return Collaborators(table=pd.DataFrame(rows, columns=COLLABORATORS.names),
                         summary=pd.DataFrame(_summary(rows)))
