"""Where a DICE-GT replay or retraining task runs: the GPU share it asks Ray for, and the torch device it computes on.

A task asks for ``engine.task_gpus()`` GPUs (``gpus_per_task``: by default a share of a GPU when the run's actors use
GPUs, none otherwise) and then computes on CUDA if Ray gave it a GPU and CUDA is there, on the CPU otherwise — the rule
the participant-group actors follow, so a rehearsal with logical GPUs and no CUDA runs on the CPU. Whatever the
device, a task starts from the same weights (drawn on the CPU), draws the same minibatches (host functions of
(seed, participant, round)) and returns numpy, so its results equal a CPU task's to float32 rounding (``fp32``
precision turns TF32 off).
"""

from __future__ import annotations

from typing import Any

import ray

from dice_ray.config import EngineConfig
from dice_ray.errors import InputError


def task_gpus(engine: EngineConfig, cluster_gpus: float) -> float:
    """GPUs each replay or retraining task asks for on a cluster with ``cluster_gpus`` GPUs: ``engine.task_gpus()``,
    or 0 when that is the default share and the cluster has no GPU for it (a GPU run's replays or retraining done
    later on CPUs: ``analyze contributions --loo``). Raises ``InputError`` for a ``gpus_per_task`` set above the
    cluster's GPUs (the tasks would wait for a GPU forever)."""
    gpus = engine.task_gpus()
    if gpus > cluster_gpus:
        if engine.gpus_per_task is None:
            return 0.0
        raise InputError(f"--gpus-per-task {gpus:g} but the Ray cluster has {cluster_gpus:g} GPUs; "
                         "--gpus-per-task 0 replays and retrains on CPUs")
    return gpus


def task_options(engine: EngineConfig) -> dict[str, Any]:
    """Ray options of a replay or retraining task on the connected cluster: ``{"num_gpus": task_gpus(...)}``."""
    return {"num_gpus": task_gpus(engine, ray.cluster_resources().get("GPU", 0.0))}


def start_task() -> str:
    """Prepare this Ray worker for one replay or retraining task; return the device it computes on: ``"cuda"`` when
    Ray assigned it a GPU and CUDA is available, else ``"cpu"`` (one torch thread: tasks run one per CPU)."""
    import torch

    from dice_ray.engine.runtime import tune_allocator, worker_device

    tune_allocator()
    torch.set_num_threads(1)
    return worker_device()
