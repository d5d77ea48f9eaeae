"""The Ray engine computes exactly what the single-process engine computes, however it is placed."""

from __future__ import annotations

import numpy as np
import pytest
import ray

import dice_ray
from dice_ray.config import EngineConfig, build_config
from dice_ray.engine import LocalEngine, RayEngine, plan_actors
from dice_ray.errors import InputError
from dice_ray.experiment import prepare

FIELDS = ("train_loss", "val_loss", "val_acc", "heldout_loss", "heldout_acc")


def small(topology: str = "exponential", **optim) -> dict:
    return {"nodes": 6, "rounds": 4, "topology": {"name": topology},
            "data": {"dataset": "digits", "heldout_size": 64},
            "model": {"init": "independent"}, "optim": {"batch_size": 8, **optim}}


def run(engine, rounds: int) -> list:
    out = [engine.run_round(t, evaluate=True) for t in range(rounds)]
    states = engine.states()
    engine.close()
    return out, states


def assert_same(a, b, tol: float = 1e-5) -> None:
    (ma, sa), (mb, sb) = a, b
    for x, y in zip(ma, mb, strict=True):
        for f in FIELDS:
            np.testing.assert_allclose(getattr(x, f), getattr(y, f), atol=tol, rtol=tol, err_msg=f)
        assert x.consensus_distance == pytest.approx(y.consensus_distance, rel=1e-4, abs=1e-7)
    np.testing.assert_allclose(sa, sb, atol=tol, rtol=0)


def test_local_ray_listens_on_loopback_only(ray_local) -> None:
    nodes = ray_local.nodes()
    assert [n["NodeManagerAddress"] for n in nodes] == ["127.0.0.1"]
    assert ray_local.util.get_node_ip_address() == "127.0.0.1"


@pytest.mark.skipif(tuple(int(v) for v in ray.__version__.split(".")[:2]) < (2, 59),
                    reason="Ray turns token authentication on for a new local cluster from 2.59")
def test_a_local_ray_keeps_token_authentication_without_printing_rays_notice_each_run() -> None:
    """Ray (from 2.59) turns token authentication on for a new local cluster and says so on every start; dice-ray
    keeps the authentication and drops the line (a user saw it on every run)."""
    import os
    import subprocess
    import sys

    probe = ("from dice_ray.engine import start_ray; start_ray(num_cpus=1); "
             "from ray._raylet import AuthenticationMode, get_authentication_mode; "
             "print(get_authentication_mode() == AuthenticationMode.TOKEN)")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True"]
    assert "Token authentication is enabled" not in done.stderr + done.stdout


def test_a_run_for_another_cluster_is_refused_while_this_process_is_connected_to_one(ray_local, tmp_path) -> None:
    """In one Python process (a notebook) Ray stays connected between runs: a run whose engine.address names
    another cluster must not go, silently, to the one already joined. The same cluster, named any way, is fine."""
    from dice_ray.engine import start_ray

    current = ray_local.get_runtime_context().gcs_address
    port = current.rpartition(":")[2]
    for same in (current, f"localhost:{port}", "auto", None):
        start_ray(same)
    config = dice_ray.RunConfig(nodes=4, rounds=1, engine={"address": "10.255.255.1:6379"},
                                output={"out": str(tmp_path / "run"), "progress": False})
    with pytest.raises(InputError, match="already connected to the Ray at"):
        dice_ray.run(config)
    assert not (tmp_path / "run").exists() and ray_local.is_initialized()


@pytest.mark.parametrize(("topology", "actor_counts"), [("exponential", (1, 3, 6)), ("random-matching", (4,))])
def test_same_numbers_for_1_3_and_n_actors(ray_local, topology: str, actor_counts: tuple[int, ...]) -> None:
    experiment = prepare(build_config(small(topology, name="momentum")))
    reference = run(LocalEngine(experiment), 4)
    assert reference[0][-1].consensus_distance < reference[0][0].consensus_distance  # gossip contracts
    for actors in actor_counts:
        plan = plan_actors(EngineConfig(actors=actors), 6, cluster_cpus=2, cluster_gpus=0)
        assert len(plan.blocks) == actors
        assert_same(run(RayEngine(experiment, plan), 4), reference)


def test_the_states_are_bit_for_bit_the_same_for_any_number_of_actors(ray_local) -> None:
    """Every participant's state after the rounds is the same to the last bit on one actor, on several, and in the
    local engine (one machine): a group gossips its rows over every source block at once, so each sum runs in one
    order (summed per block, then across the blocks, they rounded differently: 2e-8 at N = 512 after a round)."""
    nodes = 64
    config = small("exponential", name="momentum")
    experiment = prepare(build_config({**config, "nodes": nodes}))
    _, reference = run(LocalEngine(experiment), 3)
    for actors in (2, 5):
        _, states = run(RayEngine(experiment, plan_actors(EngineConfig(actors=actors), nodes, cluster_cpus=2,
                                                          cluster_gpus=0)), 3)
        assert np.array_equal(states, reference), np.abs(states - reference).max()


def test_the_consensus_distance_does_not_depend_on_the_thread_count() -> None:
    """A block's float64 sums for the consensus distance are the same on 1 thread (a Ray actor's) as on 2 (the local
    engine's here): the squared norm is summed by numpy, in one order (torch's reduction split it by threads, 9e-13
    apart at N = 64, so one actor and the local engine differed in that column's last bits)."""
    import torch

    from dice_ray.core.participants import ParticipantBlock

    block = ParticipantBlock.for_experiment(prepare(build_config({"nodes": 64, "data": {"dataset": "digits"},
                                                                  "model": {"init": "independent"}})))
    threads = torch.get_num_threads()
    sums = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            sums.append(block.evaluate())
    finally:
        torch.set_num_threads(threads)
    assert sums[0]["param_sqnorm"] == sums[1]["param_sqnorm"] > 0
    assert np.array_equal(sums[0]["param_sum"], sums[1]["param_sum"])


def test_complete_graph_averaging_reaches_exact_consensus(ray_local) -> None:
    """W = 11ᵀ/N averages all half-steps: every participant ends the round with the same θ, so the
    consensus distance is ~0 and all held-out losses are equal; a ring leaves them apart."""
    complete = prepare(build_config(small("complete")))
    engine = RayEngine(complete, plan_actors(EngineConfig(actors=3), 6, 2, 0))
    m = engine.run_round(0, evaluate=True)
    states = engine.states()
    engine.close()
    assert m.consensus_distance < 1e-9
    np.testing.assert_allclose(states, np.broadcast_to(states[0], states.shape), atol=1e-6)
    np.testing.assert_allclose(m.heldout_loss, m.heldout_loss[0], atol=1e-5)
    ring = LocalEngine(prepare(build_config(small("ring"))))
    assert ring.run_round(0, evaluate=True).consensus_distance > 1e-4


def test_actor_torch_uses_the_cpus_ray_assigned(ray_local) -> None:
    experiment = prepare(build_config(small()))
    for actors, threads in ((1, 2), (2, 1)):
        engine = RayEngine(experiment, plan_actors(EngineConfig(actors=actors), 6, 2, 0))
        info = engine.info()
        engine.close()
        assert [i["threads"] for i in info] == [threads] * actors
        assert all(i["node_ip"] == "127.0.0.1" and i["device"] == "cpu" for i in info)


def test_plan_actors_defaults_and_limits() -> None:
    plan = plan_actors(EngineConfig(), 10, cluster_cpus=4, cluster_gpus=0)
    assert len(plan.blocks) == 1 and plan.cpus_per_actor == 4 and plan.threads_per_actor == 4  # one per machine
    plan = plan_actors(EngineConfig(actors=4), 10, cluster_cpus=4, cluster_gpus=0)
    assert len(plan.blocks) == 4 and plan.cpus_per_actor == 1 and plan.threads_per_actor == 1
    assert np.array_equal(np.concatenate(plan.blocks), np.arange(10))
    assert len(plan_actors(EngineConfig(), 3, cluster_cpus=24, cluster_gpus=0, machine_cpus=[4] * 6).blocks) == 3
    mixed = plan_actors(EngineConfig(), 64, cluster_cpus=12, cluster_gpus=0, machine_cpus=[4, 8])
    assert mixed.per_machine and len(mixed.blocks) == 2 and mixed.cpus_per_actor == 4
    gpu = plan_actors(EngineConfig(gpus_per_actor=0.5), 64, cluster_cpus=16, cluster_gpus=2)
    assert len(gpu.blocks) == 4 and gpu.gpus_per_actor == 0.5 and gpu.cpus_per_actor == 4
    with pytest.raises(InputError, match="GPUs"):
        plan_actors(EngineConfig(gpus_per_actor=1), 8, cluster_cpus=4, cluster_gpus=0)
    with pytest.raises(InputError, match="CPUs"):
        plan_actors(EngineConfig(actors=4, cpus_per_actor=2), 8, cluster_cpus=4, cluster_gpus=0)


def test_every_actor_of_a_plan_fits_on_one_machine() -> None:
    """From an audit on simulated clusters: CPUs were shared out over the cluster's total, so an actor could need more
    than any one machine has, and Ray waited for room forever (10 minutes, then 'did not come back ... after a
    failure')."""
    head_and_gpu_worker = {"cluster_cpus": 8, "cluster_gpus": 1, "machine_cpus": [4, 4], "machine_gpus": [0, 1]}
    shared = plan_actors(EngineConfig(gpus_per_actor=0.5), 64, **head_and_gpu_worker)  # cluster.yaml's command
    assert len(shared.blocks) == 2 and shared.cpus_per_actor == 2  # the GPU machine's 4 CPUs, not 8 over 2
    assert plan_actors(EngineConfig(gpus_per_actor=1), 64, **head_and_gpu_worker).cpus_per_actor == 4  # not 8
    three_small = {"cluster_cpus": 3, "cluster_gpus": 0, "machine_cpus": [1, 1, 1], "machine_gpus": [0, 0, 0]}
    assert plan_actors(EngineConfig(actors=2), 64, **three_small).cpus_per_actor == 1  # not 1.5 each
    assert plan_actors(EngineConfig(actors=5), 64, **three_small).cpus_per_actor == 0.5  # not 0.6: two never placed
    two_gpus = {"cluster_cpus": 4, "cluster_gpus": 2, "machine_cpus": [2, 2], "machine_gpus": [1, 1]}
    assert len(plan_actors(EngineConfig(gpus_per_actor=0.4), 64, **two_gpus).blocks) == 4  # two per GPU, not 5
    with pytest.raises(InputError, match=r"^2 actors of 1.5 CPUs each: only 0 fit on the cluster's machines \(1 CPU, "
                                         r"1 CPU, 1 CPU\); an actor runs on one machine"):
        plan_actors(EngineConfig(actors=2, cpus_per_actor=1.5), 64, **three_small)
    uneven = plan_actors(EngineConfig(actors=7), 100, cluster_cpus=13, cluster_gpus=0, machine_cpus=[1, 4, 8],
                         machine_gpus=[0, 0, 0])
    assert uneven.cpus_per_actor == pytest.approx(1.6)  # 0 + 2 + 5 actors of 1.6 CPUs
