"""Influence measured after training: windows recorded once, probes fanned out as independent tasks.

1. ``record_windows_task`` trains the run in one task and returns one object: every round the windows t..t+R of the
   probe rounds cover (states, half-steps, optimizer states, W), each once (``trajectory.Recording``). It runs the
   same ``ParticipantBlock`` code as the engines, so the numbers do not depend on how the training run was placed.
2. ``zprime_task``, one per recorded round, computes the z′ gradients and losses at its states of the participants
   the probes reach (``shared_rows``): DICE-E reads the gradients, DICE-GT's factual side the losses.
3. ``measure_task`` measures a chunk of one round's probes (DICE-GT replays and DICE-E) on that round's
   window. Tasks read the recording, the z′ values and the experiment through the task backend's shared handles
   (on Ray: one copy per machine, read in place, not one per task) and run in parallel on every free CPU (or GPU
   share) of the cluster.

``REPLAYS_METHOD`` is the stage of a run with ``influence.enabled``: it writes ``influence.parquet`` and
``dice.parquet``, or, with in-loop DICE-E (``influence.online``) and ``influence.ground_truth``, fills DICE-GT
into the tables the round loop wrote. The recording travels on the CPU; a task computes on its device
(``engine.tasks``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from dice_ray.experiment import Experiment
from dice_ray.hooks import Method, Stage
from dice_ray.methods.dice.measure import warn_unreadable
from dice_ray.methods.dice.online import fill_estimates
from dice_ray.methods.dice.probes import Probe, probe_rounds, select_probes
from dice_ray.results import DICE, INFLUENCE


def record_windows_task(experiment: Experiment, starts: list[int], hops: int, device: str) -> list[Any]:
    """Return [the ``Recording`` of the windows t..t+hops for every t in ``starts``] (pickled as host arrays)."""
    from dice_ray.methods.dice.trajectory import record_rounds

    return [record_rounds(experiment, starts, hops, device)]


def zprime_task(experiment: Experiment, recording: Any, u: int, rows: np.ndarray, gradients: bool, losses: bool,
                device: str) -> list[Any]:
    """Return [(``rows``, the z′ gradients [len(rows), D] or None, the z′ losses [len(rows)] float64 or None)] at the
    recorded states θ^u of participants ``rows``, as host arrays: what every measure task reading round u shares."""
    from dice_ray.methods.dice.measure import window_for

    window = window_for(experiment, recording.window(u, 0).to(device))
    return [(rows, window.test_gradients(0, rows).cpu().numpy() if gradients else None,
             window.test_losses(0, rows).cpu().numpy() if losses else None)]


def measure_task(experiment: Experiment, recording: Any, probes: list[Probe],
                 *given_and_device: Any) -> tuple[list[dict], list[dict]]:
    """Measure ``probes`` (all of one round t) on its window of ``recording``; return (influence rows, dice rows).
    ``given_and_device``: ``zprime_task``'s values of rounds t..t+R (none where no task computed them), then the
    device."""
    from dice_ray.methods.dice.measure import measure_round

    *given, device = given_and_device
    return measure_round(experiment, recording.window(probes[0].round, experiment.config.influence.hops).to(device),
                         probes, given)


def shared_rows(probes: list[Probe], hops: int, mixing: Callable[[int], Any]) -> dict[int, np.ndarray]:
    """For every round u the probes' windows hold, the participants whose z′ gradient or loss at θ^u some probe reads:
    S_{u−t}(j) of every probe (j, t) with t ≤ u ≤ t + R (``trajectory.reach``; of a round's sources together, the
    union of theirs). ``mixing(t)``: W^t."""
    from dice_ray.methods.dice.trajectory import reach

    mixing = functools.cache(mixing)  # each round's W^t once (a time-varying topology draws it anew per call)
    read: dict[int, list[np.ndarray]] = {}
    for t in sorted({p.round for p in probes}):
        sources = np.array(sorted({p.source for p in probes if p.round == t}))
        for s, rows in enumerate(reach([mixing(t + s) for s in range(hops)], sources)):
            read.setdefault(t + s, []).append(rows)
    return {u: np.unique(np.concatenate(sets)) for u, sets in sorted(read.items())}


def measure_influence(experiment: Experiment, tasks: Any) -> tuple[list[dict], list[dict]]:
    """Measure every probe of ``experiment.config.influence`` through ``tasks`` (an ``engine.tasks.Tasks``); return
    (influence rows, dice rows) sorted by probe.

    Three kinds of task: one records the windows; one per round they hold computes the z′ gradients and losses at
    its recorded states that the probes read (once, not once per measure task); the measure tasks, a chunk of one
    round's probes each, replay and estimate."""
    config, inf = experiment.config, experiment.config.influence
    rounds, probes = probe_rounds(config), select_probes(config)
    shared = tasks.share(experiment)
    [recording] = tasks.call(record_windows_task, shared, rounds, inf.hops)
    gradients, losses = bool(inf.variants), inf.ground_truth or "exact-readout" in inf.variants
    zprime = {u: tasks.call(zprime_task, shared, recording, u, rows, gradients, losses)[0]
              for u, rows in shared_rows(probes, inf.hops, experiment.topology.mixing_matrix).items()} \
        if gradients or losses else {}
    jobs = []
    for t in rounds:
        mine = [p for p in probes if p.round == t]
        given = [zprime[t + s] for s in range(inf.hops + 1)] if zprime else []
        jobs += [(shared, recording, mine[i: i + inf.sources_per_task], *given)
                 for i in range(0, len(mine), inf.sources_per_task)]
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
