"""Engines that advance synchronous rounds of Algorithm 1 over participant blocks, calling the round hooks.

- ``base.py``       the ``Engine`` protocol both engines implement
- ``block.py``      a participant block with its round hooks (the part of a round run where the block lives)
- ``local.py``      ``LocalEngine``: every participant in this process
- ``actors.py``, ``ray_engine.py``  ``RayEngine``: blocks in participant-group actors, a coordinator actor
- ``transport.py``  how half-steps travel between actors: the object store, or CUDA IPC between actors sharing a GPU
- ``loop.py``       the round loop: tables, checkpoints, the methods' drivers, recovery from lost actors
- ``runtime.py``    starting Ray, sizing the actor pool
- ``tasks.py``      the task backend of the methods' stages after training: this process, or Ray tasks (one retry loop)

Both engines (and both task backends) return the same numbers. They know no method by name. Importing this package
(or ``local.py``, which a method's stage may run a whole schedule on) imports no Ray: the names of ``ray_engine.py``
load it on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from dice_ray.engine.base import Engine
from dice_ray.engine.local import LocalEngine
from dice_ray.engine.metrics import RoundMetrics
from dice_ray.engine.runtime import check_local_cpus, plan_actors, start_ray, starts_local_ray

__all__ = ["Engine", "LocalEngine", "RayEngine", "RoundMetrics", "check_local_cpus", "cluster_plan", "plan_actors",
           "start_ray", "starts_local_ray"]
_WITH_RAY = {"RayEngine": "dice_ray.engine.ray_engine", "cluster_plan": "dice_ray.engine.ray_engine"}


def __getattr__(name: str) -> Any:
    if name in _WITH_RAY:
        return getattr(importlib.import_module(_WITH_RAY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
