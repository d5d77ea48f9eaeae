"""The task backend: the one place that maps the work after training (DICE-GT replays, retraining runs) onto
this process or onto Ray tasks.

A method's ``hooks.Stage`` hands the backend a task function and its jobs; the backend runs every job, shows progress,
resubmits a job whose task was lost with its worker or machine (up to ``TASK_RETRIES`` times) and, for the jobs of
``map``, keeps a record of those retries (``retries``, written to the run's manifest; ``call`` leaves its retries to
Ray). A task function is a plain module-level function whose last argument is the torch device it computes on: ``"cpu"``
here; on Ray ``"cuda"`` when the task was given a GPU (``engine.gpus_per_task``) and CUDA is there, else ``"cpu"``.

- ``LocalTasks``  every job in this process, one after another (``--engine local``: debugging, no Ray)
- ``RayTasks``    every job as a Ray task, in parallel on every free CPU (or GPU share) of the cluster; large
                  arguments shared once through the object store (``share``)

Both give the same numbers: a task starts from the same weights and draws the same minibatches wherever it runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from dice_ray.config import EngineConfig, RunConfig, import_modules, modules_named
from dice_ray.errors import InputError, first_line

# A task lost with its worker or machine is resubmitted this many times (and recorded); errors raised by the task's
# own computation are not retried.
TASK_RETRIES = 3

Job = tuple  # a task function's arguments before the device


class Tasks:
    """Where a stage's tasks run (see the module docstring). ``retries``: one record per resubmitted task (the
    stage, what the job's ``label`` says of it, the error)."""

    def __init__(self, progress: bool = False):
        self.progress = progress
        self.retries: list[dict[str, Any]] = []
        self._peaks: list[Any] = []  # the task processes' peak RSS, MiB (RayTasks: also handles not yet resolved)

    def peak_rss_mib(self) -> float | None:
        """The largest peak RSS (MiB) of a process that ran this run's tasks (None: no task ran in another
        process; a Ray worker's peak counts every task it ran)."""
        if not self._peaks:
            return None
        import ray

        return float(max(ray.get(p) if isinstance(p, ray.ObjectRef) else p for p in self._peaks))

    def share(self, value: Any) -> Any:
        """A handle on ``value`` that jobs take as an argument (one copy per machine, not one per task)."""
        return value

    def call(self, fn: Callable[..., Sequence[Any]], *args: Any, returns: int = 1) -> list[Any]:
        """Run ``fn(*args, device)``, which returns ``returns`` values; return a handle on each (jobs take them as
        arguments), without waiting for them."""
        raise NotImplementedError

    def map(self, fn: Callable[..., Any], jobs: list[Job], stage: str, label: Callable[[Job], dict[str, Any]],
            unit: str = "task", size: Callable[[Job], int] | None = None) -> list[Any]:
        """Return ``[fn(*job, device) for job in jobs]``, in job order; ``stage`` names the progress bar and the
        retry records, ``label(job)`` says what a retry record names (JSON values). The bar counts ``size(job)``
        ``unit``s per job (default: 1 task)."""
        raise NotImplementedError

    def _bar(self, stage: str, total: int, unit: str) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, unit=unit, desc=stage, disable=not self.progress, dynamic_ncols=True, file=sys.stderr)


class LocalTasks(Tasks):
    """Every job in this process, on ``device`` (the CPU), one after another."""

    device = "cpu"

    def call(self, fn: Callable[..., Sequence[Any]], *args: Any, returns: int = 1) -> list[Any]:
        return list(fn(*args, self.device))

    def map(self, fn: Callable[..., Any], jobs: list[Job], stage: str, label: Callable[[Job], dict[str, Any]],
            unit: str = "task", size: Callable[[Job], int] | None = None) -> list[Any]:
        size = size or _one
        bar = self._bar(stage, sum(map(size, jobs)), unit)
        try:
            results = []
            for job in jobs:
                results.append(fn(*job, self.device))
                bar.update(size(job))
            return results
        finally:
            bar.close()


class RayTasks(Tasks):
    """Every job as a Ray task (one CPU and ``task_gpus``'s GPU share: ``engine.task_gpus()``, or 0 where the default
    share finds no GPU in the cluster), on the cluster at ``engine.address``, which is joined (or a local one started)
    on first use. Each task imports ``modules`` first (the run's ``imports``: the user's registered models, data
    sets and losses, which a task looks up by name), as the participant-group actors do."""

    def __init__(self, engine: EngineConfig, progress: bool = False, modules: Sequence[str] = ()):
        super().__init__(progress)
        self.engine = engine
        self.modules = list(modules)
        self._task: Any = None  # the Ray remote function of ``_in_worker``, made once the cluster is joined
        self._options: dict[str, Any] = {}  # its GPU share on that cluster (``task_options``)

    def _remote(self, **extra: Any) -> Any:
        """The Ray task running ``_in_worker`` with this run's options (joining the cluster on first use); ``name``:
        the task function's, as Ray's dashboard and the worker's process title (``ray::measure_task``) show it."""
        if self._task is None:
            import ray

            from dice_ray.engine.runtime import start_ray

            start_ray(self.engine.address)
            self._task, self._options = ray.remote(num_cpus=1)(_in_worker), task_options(self.engine)
        return self._task.options(**self._options, **extra)

    def share(self, value: Any) -> Any:
        import ray

        self._remote()  # joins the cluster
        return ray.put(value)

    def call(self, fn: Callable[..., Sequence[Any]], *args: Any, returns: int = 1) -> list[Any]:
        task = self._remote(name=fn.__name__, num_returns=returns + 1, max_retries=TASK_RETRIES)
        *refs, peak = task.remote(fn, returns, self.modules, *args)
        self._peaks.append(peak)
        return refs

    def map(self, fn: Callable[..., Any], jobs: list[Job], stage: str, label: Callable[[Job], dict[str, Any]],
            unit: str = "task", size: Callable[[Job], int] | None = None) -> list[Any]:
        import ray

        failures = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                    ray.exceptions.OwnerDiedError)
        remote = self._remote(name=fn.__name__, max_retries=0)  # lost tasks are resubmitted here, and recorded
        # ref -> (job index, attempts)
        work = {remote.remote(fn, None, self.modules, *job): (i, 0) for i, job in enumerate(jobs)}
        results: list[Any] = [None] * len(jobs)
        size = size or _one
        bar = self._bar(stage, sum(map(size, jobs)), unit)
        try:
            while work:
                [ready], _ = ray.wait(list(work), num_returns=1)
                i, attempts = work.pop(ready)
                try:
                    results[i], peak = ray.get(ready)
                    self._peaks.append(peak)
                except failures as err:
                    if attempts >= TASK_RETRIES:
                        raise
                    self.retries.append({"stage": stage, **label(jobs[i]),
                                         "error": first_line(err, named=True)[:200]})
                    work[remote.remote(fn, None, self.modules, *jobs[i])] = (i, attempts + 1)
                    continue
                bar.update(size(jobs[i]))
            return results
        finally:
            bar.close()


def _one(job: Job) -> int:
    """A job's size where a stage gives none: one task."""
    return 1


def _in_worker(fn: Callable[..., Any], returns: int | None, modules: list[str], *args: Any) -> Any:
    """A Ray task's body: import ``modules``, prepare the worker (``start_task``), run ``fn(*args, device)``; return
    (its value, this process's peak RSS in MiB), or with ``returns`` its that many values and the peak, as that many
    objects and one."""
    import_modules(modules)
    device = start_task()
    try:
        result = fn(*args, device)
    finally:
        if device != "cpu":  # Ray keeps a GPU task's worker for later tasks: it keeps no cached blocks between them
            import torch

            try:
                torch.cuda.empty_cache()
            except RuntimeError:  # a CUDA error of the task itself: the one to report
                pass
    from dice_ray.engine.runtime import peak_rss_mib

    peak = peak_rss_mib()  # the process's, over its tasks so far
    return (result, peak) if returns is None else (*result, peak)


def task_backend(engine_kind: str, config: RunConfig, progress: bool = False) -> Tasks:
    """The backend of a run of ``config`` on ``engine_kind``: ``LocalTasks`` for 'local', ``RayTasks`` for 'ray'
    (its tasks importing the modules the config names)."""
    if engine_kind == "local":
        return LocalTasks(progress)
    return RayTasks(config.engine, progress, modules_named(config))


def task_gpus(engine: EngineConfig, cluster_gpus: float) -> float:
    """GPUs each task asks for on a cluster with ``cluster_gpus`` GPUs: ``engine.task_gpus()``, or 0 when that is the
    default share and the cluster has no GPU for it (a GPU run's replays or retraining done later on CPUs:
    ``analyze contributions --loo``). Raises ``InputError`` for a ``gpus_per_task`` set above the cluster's GPUs (the
    tasks would wait for a GPU forever)."""
    gpus = engine.task_gpus()
    if gpus > cluster_gpus:
        if engine.gpus_per_task is None:
            return 0.0
        raise InputError(f"engine.gpus_per_task (--gpus-per-task) {gpus:g} but the Ray cluster has {cluster_gpus:g} "
                         "GPUs; engine.gpus_per_task 0 replays and retrains on CPUs")
    return gpus


def task_options(engine: EngineConfig) -> dict[str, Any]:
    """Ray options of a task on the connected cluster: ``{"num_gpus": task_gpus(...)}``."""
    import ray

    return {"num_gpus": task_gpus(engine, ray.cluster_resources().get("GPU", 0.0))}


def start_task() -> str:
    """Prepare this Ray worker for one task; return the device it computes on: ``"cuda"`` when Ray assigned it a GPU
    and CUDA is available, else ``"cpu"`` (one torch thread: tasks run one per CPU). The rule the participant-group
    actors follow, so a rehearsal with logical GPUs and no CUDA runs on the CPU; whatever the device, results come
    back as numpy and equal a CPU task's to float32 rounding (``fp32`` precision turns TF32 off)."""
    import torch

    from dice_ray.engine.runtime import tune_allocator, worker_device

    tune_allocator()
    torch.set_num_threads(1)
    return worker_device()
