"""Ground truth for contribution accounting, on Ray: whole runs retrained without some participants' data.

Each retraining run (a ``LocalEngine`` run of the whole schedule in one task, one CPU, and ``engine.gpus_per_task``
GPUs: on CUDA when it has some, ``task_device.py``) returns every participant's final loss on z′.
Leave-one-participant-out needs N + 1 runs (the full run and one without each participant's data); Monte-Carlo
Shapley with K permutations needs the distinct prefix coalitions of K random orders (at most K (N − 1) + 2 runs).
Tasks lost with their worker or machine are resubmitted, as influence tasks are (``methods/dice/replays.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import ray

from dice_ray.engine.tasks import TASK_FAILURES, TASK_RETRIES
from dice_ray.methods.retraining import final_losses, loo_rows, shapley_coalitions, shapley_values
from dice_ray.methods.task_device import start_task, task_options


@ray.remote(num_cpus=1, max_retries=0)
def retrain_task(experiment: Any, excluded: list[int]) -> np.ndarray:
    """Return the final losses [N] of ``experiment`` trained without the data of ``excluded``."""
    return final_losses(experiment, excluded, start_task())


def _run_all(experiment: Any, jobs: list[list[int]], local: bool, retries: list[dict] | None,
             progress: bool) -> dict[frozenset, np.ndarray]:
    """Final losses of every job (a list of excluded ids), as Ray tasks in parallel (or here if ``local``)."""
    from tqdm import tqdm

    unique = {frozenset(job): sorted(job) for job in jobs}
    bar = tqdm(total=len(unique), unit="run", desc="retraining", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    out: dict[frozenset, np.ndarray] = {}
    try:
        if local:
            for key, job in unique.items():
                out[key] = final_losses(experiment, job)
                bar.update()
            return out
        retrain = retrain_task.options(**task_options(experiment.config.engine))
        ref = ray.put(experiment)
        work = {retrain.remote(ref, job): (key, job, 0) for key, job in unique.items()}
        while work:
            [done], _ = ray.wait(list(work), num_returns=1)
            key, job, attempts = work.pop(done)
            try:
                out[key] = ray.get(done)
            except TASK_FAILURES as err:
                if attempts >= TASK_RETRIES:
                    raise
                if retries is not None:
                    retries.append({"retraining_without": job,
                                    "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"})
                work[retrain.remote(ref, job)] = (key, job, attempts + 1)
                continue
            bar.update()
        return out
    finally:
        bar.close()


def retrain_runs(experiment: Any, local: bool = False, retries: list[dict] | None = None,
                 progress: bool = False) -> tuple[dict | None, dict | None]:
    """Return (rows of ``loo.parquet`` or None, rows of ``shapley.parquet`` or None) for ``experiment.config.ledger``
    (``loo``, ``shapley_permutations``)."""
    led, n, q = experiment.config.ledger, experiment.nodes, np.asarray(experiment.q, np.float64)
    everyone = list(range(n))
    jobs: list[list[int]] = [[]]
    if led.loo:
        jobs += [[j] for j in everyone]
    orders = shapley_coalitions(n, led.shapley_permutations, experiment.config.seed) if led.shapley_permutations \
        else []
    for order in orders:  # the coalition of the first i participants of the order keeps their data only
        jobs += [[k for k in everyone if k not in set(order[:i].tolist())] for i in range(n + 1)]
    losses = _run_all(experiment, jobs, local, retries, progress)
    full = losses[frozenset()]
    loo = loo_rows(q, full, {j: losses[frozenset([j])] for j in everyone}) if led.loo else None
    shapley = None
    if orders:
        value = {frozenset(everyone) - key: float(q @ loss) for key, loss in losses.items()}
        shapley = shapley_values(orders, value)
    return loo, shapley


def retrain_run_directory(run: Path, loo: bool, shapley: int | None, local: bool = False,
                          allow_imports: bool = False, progress: bool = True) -> None:
    """Write ``loo.parquet`` (with ``loo``) and ``shapley.parquet`` (with ``shapley`` permutations) of the finished
    run directory ``run`` where it has none, retraining now: as Ray tasks, or in this process if ``local``. The run's
    config is rebuilt from its manifest; one that names modules to import is refused unless ``allow_imports``
    (``config.rerun_config``)."""
    import json

    from dice_ray.config import rerun_config
    from dice_ray.experiment import prepare
    from dice_ray.results import LOO, SHAPLEY, write_table_atomic

    if not ((loo and not (run / "loo.parquet").is_file()) or (shapley and not (run / "shapley.parquet").is_file())):
        return
    data = json.loads((run / "manifest.json").read_text())["config"]
    data.setdefault("ledger", {}).update({"loo": loo or (run / "loo.parquet").is_file(),
                                          "shapley_permutations": shapley or 0})
    experiment = prepare(rerun_config(data, f"retraining run {str(run)!r}", allow_imports))
    if not local:
        from dice_ray.engine import start_ray

        start_ray(experiment.config.engine.address)
    rows_loo, rows_shapley = retrain_runs(experiment, local=local, progress=progress)
    if rows_loo is not None:
        write_table_atomic(run / "loo.parquet", rows_loo, LOO)
    if rows_shapley is not None:
        write_table_atomic(run / "shapley.parquet", rows_shapley, SHAPLEY)
