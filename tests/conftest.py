"""Shared fixtures: one real local Ray per test module (a start costs ~5 s), and the ``ray`` marker.

Tests that start Ray are marked ``ray`` (those using ``ray_local``, and the modules in ``STARTS_RAY``), so the math
runs in seconds without it: ``python -m pytest -q -m "not ray"``. In such a run a test that starts Ray anyway fails,
which keeps the marks true.
"""

from __future__ import annotations

import sys

import pytest

# Modules whose tests start Ray without the fixture (the ray engine by default, Ray tasks, Tune, clusters).
STARTS_RAY = {"test_api", "test_autoscaling", "test_chaos", "test_cluster", "test_cluster_address",
              "test_cluster_engine", "test_engine", "test_ray_start", "test_reliability", "test_replays_device",
              "test_transport"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ray: starts a local Ray (left out by -m 'not ray')")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()) or item.module.__name__.split(".")[-1] in STARTS_RAY:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _no_ray_unless_marked(request: pytest.FixtureRequest):
    """Where Ray tests are deselected (``-m "not ray"``), a test that starts Ray fails: its mark is missing."""
    yield
    if "not ray" in (request.config.getoption("markexpr") or "") and "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized(), f"{request.node.nodeid} starts Ray: mark it (conftest)"


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
