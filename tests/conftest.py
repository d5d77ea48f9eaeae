"""Shared fixtures: one real local Ray per test module (a start costs ~5 s), and the ``ray`` marker.

Tests that start Ray are marked ``ray`` (those using ``ray_local`` or ``ray_with_a_logical_gpu``, and the modules
in ``STARTS_RAY``), so the math runs without it: ``python -m pytest -q -m "not ray"``. In such a run a test that
starts Ray anyway fails, which keeps the marks true.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

# Modules whose tests start Ray without the fixture (the ray engine by default, Ray tasks, Tune, clusters).
STARTS_RAY = {"test_api", "test_autoscaling", "test_chaos", "test_cluster", "test_cluster_address",
              "test_cluster_engine", "test_engine", "test_ray_start", "test_reliability", "test_replays_device",
              "test_transport"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ray: starts a local Ray (left out by -m 'not ray')")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        if uses & {"ray_local", "ray_with_a_logical_gpu"} or item.module.__name__.split(".")[-1] in STARTS_RAY:
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _no_ray_unless_marked(request: pytest.FixtureRequest):
    """Where Ray tests are deselected (``-m "not ray"``), a test that starts Ray fails: its mark is missing."""
    yield
    if "not ray" in (request.config.getoption("markexpr") or "") and "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized(), f"{request.node.nodeid} starts Ray: mark it (conftest)"


@pytest.fixture(autouse=True)
def _methods_a_test_registers_are_forgotten():
    """A method registered during a test (``register_method``, e.g. by importing ``toy_method``) is unregistered
    after it, so later tests' configs have no section of it (their Ray workers could not import it)."""
    from dice_ray import hooks

    before = dict(hooks._REGISTERED)
    yield
    if hooks._REGISTERED != before:
        hooks._REGISTERED.clear()
        hooks._REGISTERED.update(before)
        sys.modules.pop("toy_method", None)  # a later import registers it again


def _local_ray(**resources: int) -> Iterator:
    """A real local Ray (127.0.0.1, no dashboard) with ``resources`` (start_ray's), shut down afterwards."""
    import ray

    from dice_ray.engine import start_ray

    if ray.is_initialized():
        ray.shutdown()
    start_ray(**resources)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with 2 CPUs for the whole module."""
    yield from _local_ray(num_cpus=2)


@pytest.fixture(scope="module")
def ray_with_a_logical_gpu():
    """A real local Ray with 2 CPUs and 1 GPU resource for the whole module (no CUDA here: what asks for a GPU
    computes on the CPU)."""
    yield from _local_ray(num_cpus=2, num_gpus=1)
