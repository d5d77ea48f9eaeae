"""The engine on a two-machine Ray cluster (simulated with ray.cluster_utils.Cluster) computes the numbers
a single process computes, with one participant-group actor placed on each machine."""

from __future__ import annotations

import numpy as np
import pytest

from dice_ray.config import build_config
from dice_ray.engine import LocalEngine, RayEngine
from dice_ray.experiment import prepare


@pytest.fixture(scope="module")
def two_machines():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 1, "resources": {"machine_a": 1}, "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"machine_b": 1})
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_one_actor_per_machine_and_the_same_numbers(two_machines) -> None:
    import ray

    experiment = prepare(build_config({"nodes": 8, "topology": {"name": "exponential"},
                                       "data": {"dataset": "digits", "heldout_size": 64},
                                       "model": {"init": "independent"}, "optim": {"batch_size": 8}}))
    engine = RayEngine(experiment)  # the default plan: one actor pinned to each machine
    try:
        assert engine.plan.per_machine and len(engine.plan.blocks) == 2
        placed = {info["node_id"] for info in engine.info()}
        machines = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert placed == machines and len(machines) == 2
        distributed = list(engine.run_rounds((t, True) for t in range(4)))
        states = engine.states()
    finally:
        engine.close()
    local = LocalEngine(experiment)
    for a in distributed:
        b = local.run_round(a.round, evaluate=True)
        for field in ("train_loss", "val_loss", "heldout_loss", "heldout_acc"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-6)
        assert a.consensus_distance == pytest.approx(b.consensus_distance, rel=1e-4)
    np.testing.assert_allclose(states, local.states(), atol=1e-5)
