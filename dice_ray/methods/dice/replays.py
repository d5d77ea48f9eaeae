"""Influence measured after training: windows recorded once, probes fanned out as independent tasks.

1. ``record_windows_task`` trains the run in one task and returns one object per probe round: the
   window t..t+R (states, half-steps, optimizer states, W). It runs the same ``ParticipantBlock`` code as
   the engines, so the numbers do not depend on how the training run was placed.
2. ``measure_task`` measures a chunk of one round's probes (DICE-GT replays and DICE-E) on that round's
   window. Tasks read windows and the experiment through the task backend's shared handles (on Ray: one
   copy per machine, not one per task) and run in parallel on every free CPU (or GPU share) of the cluster.

``REPLAYS_METHOD`` is the stage of a run with ``influence.enabled``: it writes ``influence.parquet`` and
``dice.parquet``, or, with in-loop DICE-E (``influence.online``) and ``influence.ground_truth``, fills DICE-GT
into the tables the round loop wrote. Windows travel on the CPU; a task computes on its device (``engine.tasks``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow.parquet as pq

from dice_ray.experiment import Experiment
from dice_ray.hooks import Method, Stage
from dice_ray.methods.dice.measure import warn_unreadable
from dice_ray.methods.dice.online import fill_estimates
from dice_ray.methods.dice.probes import Probe, probe_rounds, select_probes
from dice_ray.results import DICE, INFLUENCE


def record_windows_task(experiment: Experiment, starts: list[int], hops: int, device: str) -> list[Any]:
    """Return the windows t..t+hops for every t in ``starts``, on the CPU."""
    from dice_ray.methods.dice.trajectory import record_windows

    return [w.to("cpu") for w in record_windows(experiment, starts, hops, device)]


def measure_task(experiment: Experiment, trajectory: Any, probes: list[Probe],
                 device: str) -> tuple[list[dict], list[dict]]:
    """Measure ``probes`` (all of one round) on its window; return (influence rows, dice rows)."""
    from dice_ray.methods.dice.measure import measure_round

    return measure_round(experiment, trajectory.to(device), probes)


def measure_influence(experiment: Experiment, tasks: Any) -> tuple[list[dict], list[dict]]:
    """Measure every probe of ``experiment.config.influence`` through ``tasks`` (an ``engine.tasks.Tasks``); return
    (influence rows, dice rows) sorted by probe."""
    config = experiment.config
    rounds, probes = probe_rounds(config), select_probes(config)
    shared = tasks.share(experiment)
    windows = tasks.call(record_windows_task, shared, rounds, config.influence.hops, returns=len(rounds))
    chunk = config.influence.sources_per_task
    jobs = []
    for t, window in zip(rounds, windows, strict=True):
        mine = [p for p in probes if p.round == t]
        jobs += [(shared, window, mine[i: i + chunk]) for i in range(0, len(mine), chunk)]
    results = tasks.map(measure_task, jobs, "influence",
                        lambda job: {"round": job[2][0].round, "probe_ids": [p.probe_id for p in job[2]]},
                        unit="probe", size=lambda job: len(job[2]))
    influence = [row for rows, _ in results for row in rows]
    dice = [row for _, rows in results for row in rows]
    order = {p.probe_id: i for i, p in enumerate(probes)}
    influence.sort(key=lambda r: (order[r["probe_id"]], r["step"], r["target"]))
    dice.sort(key=lambda r: (order[r["probe_id"]], r["hops"]))
    return influence, dice


class InfluenceReplays(Stage):
    """DICE-GT (and replayed DICE-E) of every probe. With in-loop DICE-E the estimates are in the tables the round
    loop wrote: the replays measure DICE-GT alone and fill it in."""

    name = "influence"
    tables = {"influence": INFLUENCE, "dice": DICE}

    def run(self, tasks: Any) -> dict[str, Any]:
        experiment, inf = self.experiment, self.experiment.config.influence
        if not inf.online:
            influence, dice = measure_influence(experiment, tasks)
            warn_unreadable(influence)
            return {"influence": influence, "dice": dice}
        replay = dataclasses.replace(experiment, config=experiment.config.model_copy(
            update={"influence": inf.model_copy(update={"variants": []})}))
        influence, dice = measure_influence(replay, tasks)
        estimated = {name: pq.read_table(self.out / f"{name}.parquet").to_pylist() for name in self.tables}
        return {"influence": fill_estimates(influence, estimated["influence"], ("probe_id", "step", "target")),
                "dice": fill_estimates(dice, estimated["dice"], ("probe_id", "hops"))}


REPLAYS_METHOD = Method("influence-replays",
                        enabled=lambda c: c.influence.enabled and (not c.influence.online or c.influence.ground_truth),
                        stages=(InfluenceReplays,))
