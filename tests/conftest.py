"""Shared fixtures: one real local Ray per test module (a start costs ~5 s)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray (2 CPUs, 127.0.0.1, no dashboard) for the whole module; shut down after it."""
    import ray

    from dice_ray.engine import start_ray

    if ray.is_initialized():
        ray.shutdown()
    start_ray(num_cpus=2)
    yield ray
    ray.shutdown()
