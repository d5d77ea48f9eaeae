"""Engines that advance synchronous rounds of Algorithm 1 over participant blocks, calling the round hooks.

- ``base.py``       the ``Engine`` protocol both engines implement
- ``block.py``      a participant block with its round hooks (the part of a round run where the block lives)
- ``local.py``      ``LocalEngine``: every participant in this process
- ``actors.py``, ``ray_engine.py``  ``RayEngine``: blocks in participant-group actors, a coordinator actor
- ``transport.py``  how half-steps travel between actors: the object store, or CUDA IPC between actors sharing a GPU
- ``loop.py``       the round loop: tables, checkpoints, the methods' drivers, recovery from lost actors
- ``runtime.py``    starting Ray, sizing the actor pool
- ``tasks.py``      the task backend of the methods' stages after training: this process, or Ray tasks (one retry loop)

Both engines (and both task backends) return the same numbers. They know no method by name.
"""

from dice_ray.engine.base import Engine
from dice_ray.engine.local import LocalEngine
from dice_ray.engine.metrics import RoundMetrics
from dice_ray.engine.ray_engine import RayEngine, cluster_plan
from dice_ray.engine.runtime import plan_actors, start_ray

__all__ = ["Engine", "LocalEngine", "RayEngine", "RoundMetrics", "cluster_plan", "plan_actors", "start_ray"]
