"""How half-steps travel between participant-group actors (``engine.transport``): CUDA IPC only between groups on
the same GPU of the same node, the object store for every other pair (on CPUs always), and a run whose groups
exchange through the object store computes what the single-process engine computes."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from test_engine import assert_same, run, small

from dice_ray.config import build_config
from dice_ray.engine import LocalEngine, RayEngine, plan_actors
from dice_ray.engine.transport import (
    CUDA_IPC,
    OBJECT_STORE,
    Placement,
    choose_transports,
    may_use_device_transport,
    pair_transport,
)
from dice_ray.errors import InputError
from dice_ray.experiment import prepare

# What these tests check without CUDA (groups on a logical GPU compute on the CPU) is not what a CUDA machine does:
# there two groups sharing the GPU compute on it and CUDA IPC gets through (checked by the last test, on CUDA only).
WITHOUT_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the groups compute on its GPU")

GPU0_A = Placement("cuda", "node-a", "0")
GPU1_A = Placement("cuda", "node-a", "1")
GPU0_B = Placement("cuda", "node-b", "0")
CPU_A = Placement("cpu", "node-a")


@pytest.mark.parametrize(("sender", "receiver", "auto"), [
    (GPU0_A, GPU0_A, CUDA_IPC),  # two actors sharing a GPU (gpus_per_actor 0.5)
    (GPU0_A, GPU1_A, OBJECT_STORE),  # two GPUs of one machine
    (GPU0_A, GPU0_B, OBJECT_STORE),  # GPU 0 of two machines: the same id, not the same GPU
    (CPU_A, CPU_A, OBJECT_STORE),
    (CPU_A, GPU0_A, OBJECT_STORE),
    (Placement("cuda", "node-a"), Placement("cuda", "node-a"), OBJECT_STORE),  # no GPU id known
])
def test_cuda_ipc_only_between_groups_on_one_gpu_of_one_node(sender: Placement, receiver: Placement,
                                                             auto: str) -> None:
    assert pair_transport(sender, receiver, "auto") == auto
    assert pair_transport(receiver, sender, "auto") == auto
    assert pair_transport(sender, receiver, "object_store") == OBJECT_STORE
    if auto == CUDA_IPC:
        assert pair_transport(sender, receiver, "cuda_ipc") == CUDA_IPC
    else:
        with pytest.raises(InputError, match="engine.transport 'cuda_ipc' needs every pair") as err:
            pair_transport(sender, receiver, "cuda_ipc")
        assert len(str(err.value).splitlines()) == 1


def test_transports_of_four_actors_on_two_gpus() -> None:
    """gpus_per_actor 0.5 on a machine with two GPUs: each pair sharing a GPU uses CUDA IPC, the others (and
    every group's own half-step, which never travels) the object store."""
    placements = [GPU0_A, GPU0_A, GPU1_A, GPU1_A]
    ways = choose_transports(placements, "auto")
    ipc = {(s, r) for s in range(4) for r in range(4) if ways[s][r] == CUDA_IPC}
    assert ipc == {(0, 1), (1, 0), (2, 3), (3, 2)}
    assert choose_transports(placements, "object_store") == [[OBJECT_STORE] * 4] * 4
    with pytest.raises(InputError, match="GPU 0 of node node-a.*GPU 1 of node node-a"):
        choose_transports(placements, "cuda_ipc")
    assert choose_transports([GPU0_A, GPU0_A], "cuda_ipc") == [[OBJECT_STORE, CUDA_IPC], [CUDA_IPC, OBJECT_STORE]]
    assert choose_transports([CPU_A], "cuda_ipc") == [[OBJECT_STORE]]  # one group exchanges nothing


def test_actors_get_rays_tensor_transport_only_when_they_may_share_a_gpu() -> None:
    assert may_use_device_transport("auto", 0.5, 2) and may_use_device_transport("cuda_ipc", 0.25, 4)
    assert not may_use_device_transport("auto", 0.0, 2)  # CPUs: Ray's plain actors
    assert not may_use_device_transport("auto", 1.0, 2)  # one GPU each: nothing to share
    assert not may_use_device_transport("auto", 0.5, 1)  # one group reads only itself
    assert not may_use_device_transport("object_store", 0.5, 2)


def test_the_option_is_validated_and_set_from_the_command_line() -> None:
    from dice_ray.cli.simulate import build_parser, resolve_config

    assert build_config({}).engine.transport == "auto"
    assert resolve_config(build_parser().parse_args(["--transport", "object_store"])).engine.transport == OBJECT_STORE
    with pytest.raises(InputError, match="transport") as err:
        build_config({"engine": {"transport": "nccl"}})
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("gpus_per_actor", [0.0, pytest.param(0.5, marks=WITHOUT_CUDA)])
def test_groups_without_cuda_exchange_through_the_object_store_with_the_same_numbers(
        ray_with_a_logical_gpu, gpus_per_actor: float) -> None:
    """Two groups on CPUs, and two sharing a (logical) GPU without CUDA, which get Ray's tensor transport but
    compute on the CPU: every pair resolves to the object store, and 4 rounds equal the single-process run's."""
    config = build_config({**small(), "engine": {"actors": 2, "gpus_per_actor": gpus_per_actor}})
    experiment = prepare(config)
    reference = run(LocalEngine(experiment), 4)
    engine = RayEngine(experiment, plan_actors(config.engine, 6, cluster_cpus=2, cluster_gpus=1))
    assert len(engine.groups) == 2
    assert engine.transports == [[OBJECT_STORE, OBJECT_STORE], [OBJECT_STORE, OBJECT_STORE]]
    assert [i["device"] for i in engine.info()] == ["cpu", "cpu"]
    assert_same(run(engine, 4), reference)


@WITHOUT_CUDA
def test_cuda_ipc_demanded_without_cuda_stops_with_one_line_and_no_actors_left(ray_with_a_logical_gpu) -> None:
    import time

    ray = ray_with_a_logical_gpu
    config = build_config({**small(), "engine": {"actors": 2, "gpus_per_actor": 0.5, "transport": "cuda_ipc"}})
    with pytest.raises(InputError, match=r"engine.transport 'cuda_ipc' needs every pair .* CPU of node") as err:
        RayEngine(prepare(config), plan_actors(config.engine, 6, cluster_cpus=2, cluster_gpus=1))
    assert len(str(err.value).splitlines()) == 1
    deadline = time.monotonic() + 30  # the engine that could not start gives its actors' CPUs and GPU back
    while ray.available_resources().get("GPU", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("GPU", 0) == pytest.approx(1.0)


@WITHOUT_CUDA
def test_cuda_ipc_that_cannot_be_set_up_falls_back_under_auto_and_stops_under_cuda_ipc(ray_with_a_logical_gpu) -> None:
    """Two groups sharing a (logical) GPU, made to try CUDA IPC: the probe really goes through Ray's CUDA IPC
    transport, which fails here (the groups compute on the CPU). Under ``auto`` each such pair goes through the
    object store, with a warning naming it, and the run's placement facts say so; under ``cuda_ipc`` the run stops
    with one line."""
    config = build_config({**small(), "engine": {"actors": 2, "gpus_per_actor": 0.5}})
    engine = RayEngine(prepare(config), plan_actors(config.engine, 6, cluster_cpus=2, cluster_gpus=1))
    try:
        shared = [Placement("cuda", "node-a", "0")] * 2  # what two groups sharing GPU 0 would report
        tried = [[OBJECT_STORE, CUDA_IPC], [CUDA_IPC, OBJECT_STORE]]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert engine._check_transports(tried, shared) == [[OBJECT_STORE, OBJECT_STORE]] * 2
        said = sorted(str(w.message) for w in caught if w.category is RuntimeWarning)
        assert len(said) == 2, said
        for line, (s, g) in zip(said, [(0, 1), (1, 0)], strict=True):
            assert re.fullmatch(rf"CUDA IPC from participant group {s} to group {g} \(both on the GPU 0 of node "
                                r"node-a\) could not be set up \(\w+: [^\x1b\n]+; Ray's log above may say more\): its "
                                r"half-steps and messages go through Ray's object store instead \(.*\)", line), line
        assert [fact["transports"] for fact in engine.info()] == [[OBJECT_STORE, OBJECT_STORE]] * 2
        engine.transport = CUDA_IPC
        with pytest.raises(InputError, match=r"engine.transport 'cuda_ipc': CUDA IPC from participant group 0 to "
                           r"group 1 \(both on the GPU 0 of node node-a\) could not be set up") as err:
            engine._check_transports(tried, shared)
        assert len(str(err.value).splitlines()) == 1
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_groups_sharing_a_gpu_exchange_through_cuda_ipc_with_the_cpus_numbers(ray_with_a_logical_gpu) -> None:
    """On a CUDA machine, two groups on its one GPU (``gpus_per_actor`` 0.5): both compute there, their half-steps
    go through CUDA IPC both ways (the probe at start got through, so no warning), and 4 rounds equal the CPU's
    single-process run to float32 rounding."""
    config = build_config({**small(), "engine": {"actors": 2, "gpus_per_actor": 0.5}})
    experiment = prepare(config)
    reference = run(LocalEngine(experiment), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        engine = RayEngine(experiment, plan_actors(config.engine, 6, cluster_cpus=2, cluster_gpus=1))
    assert engine.transports == [[OBJECT_STORE, CUDA_IPC], [CUDA_IPC, OBJECT_STORE]]
    assert [fact["device"] for fact in engine.info()] == ["cuda", "cuda"]
    assert_same(run(engine, 4), reference)
