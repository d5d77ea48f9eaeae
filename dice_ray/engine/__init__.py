"""Engines that advance synchronous rounds of Algorithm 1 over participant blocks.

``RayEngine`` places blocks in participant-group actors driven by a coordinator actor (``actors.py``);
``LocalEngine`` steps every participant in this process (``local.py``). Both return the same
``RoundMetrics`` with the same numbers; ``runtime.py`` starts Ray and sizes the actor pool.
"""

from dice_ray.engine.local import LocalEngine
from dice_ray.engine.metrics import RoundMetrics
from dice_ray.engine.ray_engine import RayEngine
from dice_ray.engine.runtime import plan_actors, start_ray

__all__ = ["LocalEngine", "RayEngine", "RoundMetrics", "plan_actors", "start_ray"]
