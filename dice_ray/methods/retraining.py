"""Ground truth for contribution accounting: whole runs retrained without some participants' data.

Leave-one-participant-out needs N + 1 runs (the full run and one without each participant's data); Monte-Carlo
Shapley with K permutations needs the distinct prefix coalitions of K random orders (at most K (N − 1) + 2 runs).
Each run is a local-engine run of the whole schedule in one task (``final_losses``), fanned out by the task backend
(``engine.tasks``: this process, or Ray tasks on every free CPU or GPU share). ``RETRAINING_METHOD`` is the stage of
a run with ``ledger.loo`` or ``ledger.shapley_permutations``: it writes ``loo.parquet`` and ``shapley.parquet``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from dice_ray.data import Partition
from dice_ray.engine.local import LocalEngine
from dice_ray.hooks import Method, Stage
from dice_ray.results import LOO, SHAPLEY
from dice_ray.rundir import read_table


def without_data(experiment: Any, excluded: list[int]) -> Any:
    """Return ``experiment`` with the training data of participants ``excluded`` removed (they take no local
    step but still gossip; weights q, W and everything else unchanged), the ledger, proximal scoring and
    influence off (a retraining run only needs its final losses)."""
    config = experiment.config
    off = {name: getattr(config, name).model_copy(update={"enabled": False})
           for name in ("ledger", "proximal", "influence")}
    gone = set(excluded)
    train = [np.zeros(0, np.int64) if k in gone else part for k, part in enumerate(experiment.partition.train)]
    return dataclasses.replace(experiment, config=config.model_copy(update=off),
                               partition=Partition(train, list(experiment.partition.val)))


def final_losses(experiment: Any, excluded: list[int], device: str = "cpu") -> np.ndarray:
    """Train ``without_data(experiment, excluded)`` in this process, on ``device``; return L(θ_k^T; z′) [N] float64
    (the ledger's z′: the held-out batch, or each k's validation split). Any device starts from the same weights and
    draws the same minibatches (the local engine's block), so only float32 rounding differs."""
    run = without_data(experiment, excluded)
    engine = LocalEngine(run, device=device)
    last = run.config.rounds - 1
    *_, metrics = engine.run_rounds((t, t == last) for t in range(last + 1))
    loss = metrics.heldout_loss if experiment.config.ledger.zprime == "heldout" else metrics.val_loss
    return np.asarray(loss, np.float64)


def loo_rows(q: np.ndarray, full: np.ndarray, without: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of ``loo.parquet`` from the full run's final losses ``full`` [N] and, per left-out j, ``without[j]``."""
    n = len(full)
    parts = [(-1, full, np.zeros(n))] + [(j, loss, q * (full - loss)) for j, loss in sorted(without.items())]
    return {"participant": np.repeat([p for p, *_ in parts], n).astype(np.int32),
            "target": np.tile(np.arange(n, dtype=np.int32), len(parts)),
            "final_loss": np.concatenate([loss for _, loss, _ in parts]),
            "effect": np.concatenate([effect for *_, effect in parts])}


def shapley_coalitions(n: int, permutations: int, seed: int) -> list[np.ndarray]:
    """Return the ``permutations`` random orders of participants 0..n−1 Monte-Carlo Shapley walks (seeded)."""
    rng = np.random.default_rng([seed, 4])
    return [rng.permutation(n) for _ in range(permutations)]


def shapley_values(orders: list[np.ndarray], value: dict[frozenset, float]) -> dict[str, np.ndarray]:
    """Rows of ``shapley.parquet``: per participant the mean (and standard error) over ``orders`` of its
    marginal value(S ∪ {j}) − value(S), S the participants before j; ``value`` maps every prefix coalition
    (frozenset of ids) to Σ_k q_k L(θ_k^T; z′) trained with only its data."""
    n = len(orders[0])
    marginals = np.zeros((len(orders), n))
    for i, order in enumerate(orders):
        before = frozenset()
        for j in order.tolist():
            after = before | {j}
            marginals[i, j] = value[after] - value[before]
            before = after
    stderr = marginals.std(axis=0, ddof=1) / np.sqrt(len(orders)) if len(orders) > 1 else np.full(n, np.nan)
    return {"participant": np.arange(n, dtype=np.int32), "shapley": marginals.mean(axis=0), "stderr": stderr,
            "permutations": np.full(n, len(orders), np.int32)}


class Retraining(Stage):
    """Leave-one-participant-out (``ledger.loo``) and Monte-Carlo Shapley (``ledger.shapley_permutations``): the runs
    without some participants' data, each coalition trained once."""

    name = "retraining"
    tables = {"loo": LOO, "shapley": SHAPLEY}

    def run(self, tasks: Any) -> dict[str, Any]:
        experiment = self.experiment
        led, n, q = experiment.config.ledger, experiment.nodes, np.asarray(experiment.q, np.float64)
        everyone = list(range(n))
        jobs: list[list[int]] = [[]]
        if led.loo:
            jobs += [[j] for j in everyone]
        orders = shapley_coalitions(n, led.shapley_permutations, experiment.config.seed) \
            if led.shapley_permutations else []
        for order in orders:  # the coalition of the first i participants of the order keeps their data only
            jobs += [[k for k in everyone if k not in set(order[:i].tolist())] for i in range(n + 1)]
        unique = {frozenset(job): sorted(job) for job in jobs}
        shared = tasks.share(experiment)
        losses = dict(zip(unique, tasks.map(final_losses, [(shared, job) for job in unique.values()], "retraining",
                                            lambda job: {"retraining_without": job[1]}, unit="run"), strict=True))
        full = losses[frozenset()]
        tables = {}
        if led.loo:
            tables["loo"] = loo_rows(q, full, {j: losses[frozenset([j])] for j in everyone})
        if orders:
            tables["shapley"] = shapley_values(orders, {frozenset(everyone) - key: float(q @ loss)
                                                        for key, loss in losses.items()})
        return tables


def retraining_changes(run: Path, loo: bool, shapley: int | None) -> dict[str, Any]:
    """The config changes (dotted field -> value) that make ``Retraining`` write the tables the finished run ``run``
    lacks (``loo.parquet`` with ``loo``, ``shapley.parquet`` with ``shapley`` permutations: a table of another
    number of permutations is computed again); empty if none. A table the run has is not computed again (Shapley
    asked of a run with ``loo.parquet`` retrained the leave-one-out runs the coalitions do not share: 3 of 155)."""
    has_loo = (run / "loo.parquet").is_file()
    if not ((loo and not has_loo) or (shapley and _shapley_permutations(run) != shapley)):
        return {}
    return {"ledger.loo": bool(loo and not has_loo), "ledger.shapley_permutations": shapley or 0}


def _shapley_permutations(run: Path) -> int | None:
    """The permutations of the run's ``shapley.parquet`` (None: it has none; a table cut short or not a shapley
    table: an ``InputError``, as the reports say it)."""
    path = run / "shapley.parquet"
    if not path.is_file():
        return None
    column = read_table(path).column("permutations")
    return int(column[0].as_py()) if len(column) else None


RETRAINING_METHOD = Method("retraining", enabled=lambda c: bool(c.ledger.loo or c.ledger.shapley_permutations),
                           stages=(Retraining,))
