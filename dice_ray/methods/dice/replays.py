"""Influence measurement on Ray: windows recorded once, probes fanned out as independent tasks.

1. ``record_windows_task`` trains the run in one task and returns one object per probe round: the
   window t..t+R (states, half-steps, optimizer states, W). It runs the same ``ParticipantBlock`` code as
   the engines, so the numbers do not depend on how the training run was placed.
2. ``measure_task`` measures a chunk of one round's probes (DICE-GT replays and DICE-E) on that round's
   window. Tasks read windows and the experiment as object-store references (one copy per node, not one
   per task) and run in parallel on every free CPU of the cluster.

Both ask Ray for ``engine.gpus_per_task`` GPUs (by default a share of one when the run's actors use GPUs) and then
compute on CUDA (``task_device.py``); windows travel through the object store on the CPU.
"""

from __future__ import annotations

from typing import Any

import ray

from dice_ray.engine.tasks import TASK_FAILURES, TASK_RETRIES
from dice_ray.experiment import Experiment
from dice_ray.methods.dice.probes import Probe, probe_rounds, select_probes
from dice_ray.methods.task_device import start_task, task_options


@ray.remote(num_cpus=1)
def record_windows_task(experiment: Experiment, starts: list[int], hops: int) -> Any:
    """Return the windows t..t+hops for every t in ``starts`` (one object each: use num_returns), on the CPU."""
    from dice_ray.methods.dice.trajectory import record_windows

    windows = [w.to("cpu") for w in record_windows(experiment, starts, hops, start_task())]
    return windows[0] if len(windows) == 1 else tuple(windows)


@ray.remote(num_cpus=1, max_retries=0)
def measure_task(experiment: Experiment, trajectory: Any, probes: list[Probe]) -> tuple[list[dict], list[dict]]:
    """Measure ``probes`` (all of one round) on its window; return (influence rows, dice rows)."""
    from dice_ray.methods.dice.measure import measure_round

    return measure_round(experiment, trajectory.to(start_task()), probes)


def measure_influence(experiment: Experiment, progress: Any = None,
                      retries: list[dict] | None = None) -> tuple[list[dict], list[dict]]:
    """Measure every probe of ``experiment.config.influence`` on the connected Ray cluster; return
    (influence rows, dice rows) sorted by probe. ``progress(done, total)`` is called as tasks finish. A
    task lost with its worker or machine is resubmitted (up to ``TASK_RETRIES`` times) and recorded in
    ``retries`` (round, probe ids, error)."""
    config = experiment.config
    rounds, probes = probe_rounds(config), select_probes(config)
    options = task_options(config.engine)
    measure = measure_task.options(**options)
    exp_ref = ray.put(experiment)
    windows = record_windows_task.options(num_returns=len(rounds), **options).remote(exp_ref, rounds,
                                                                                    config.influence.hops)
    windows = [windows] if len(rounds) == 1 else list(windows)
    chunk = config.influence.sources_per_task
    work = {}  # task ref -> (window ref, probes, attempts so far)
    for t, window in zip(rounds, windows, strict=True):
        mine = [p for p in probes if p.round == t]
        for i in range(0, len(mine), chunk):
            work[measure.remote(exp_ref, window, mine[i: i + chunk])] = (window, mine[i: i + chunk], 0)
    total, finished = len(work), 0
    influence: list[dict] = []
    dice: list[dict] = []
    while work:
        [done], _ = ray.wait(list(work), num_returns=1)
        window, chunk_probes, attempts = work.pop(done)
        try:
            rows_influence, rows_dice = ray.get(done)
        except TASK_FAILURES as err:
            if attempts >= TASK_RETRIES:
                raise
            if retries is not None:
                retries.append({"round": chunk_probes[0].round, "probe_ids": [p.probe_id for p in chunk_probes],
                                "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"})
            work[measure.remote(exp_ref, window, chunk_probes)] = (window, chunk_probes, attempts + 1)
            continue
        influence += rows_influence
        dice += rows_dice
        finished += 1
        if progress is not None:
            progress(finished, total)
    order = {p.probe_id: i for i, p in enumerate(probes)}
    influence.sort(key=lambda r: (order[r["probe_id"]], r["step"], r["target"]))
    dice.sort(key=lambda r: (order[r["probe_id"]], r["hops"]))
    return influence, dice
