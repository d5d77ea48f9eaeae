"""DICE-GT replays and retraining runs on a device, checked on the CPU.

A device mismatch (a tensor a replay creates on the CPU while its window lives on a GPU) is caught without a GPU: the
windows are recorded, measured and retrained on PyTorch's ``meta`` device (shapes without data), where any CPU tensor
meeting a device tensor in an operation fails the test; reading a result back (``.cpu()``, ``float``) gives zeros. The
scheduling is real local Ray with a logical GPU and no CUDA: tasks ask Ray for their GPU share (``gpus_per_task``)
and, CUDA being absent, compute on the CPU and return what CPU tasks return. The CUDA runs themselves are
``bench/bench_replays_gpu.py``'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from dice_ray.cli.simulate import build_parser, resolve_config
from dice_ray.config import TASK_GPU_SHARE, EngineConfig, build_config
from dice_ray.engine.tasks import LocalTasks
from dice_ray.errors import InputError
from dice_ray.experiment import prepare
from dice_ray.methods.dice.probes import probe_rounds, select_probes
from dice_ray.methods.dice.replays import measure_influence
from dice_ray.methods.dice.trajectory import record_windows
from dice_ray.methods.retraining import final_losses

WORLD = {"nodes": 5, "rounds": 5, "seed": 2, "topology": {"name": "ring"},
         "data": {"dataset": "digits", "heldout_size": 16}, "optim": {"batch_size": 8},
         "output": {"progress": False}}
# Every branch of the replay and the estimators: single-sample probes, second order (with b), Adam's optimizer state,
# each target's own validation split as z′, a misbehaving participant's scaled updates.
INFLUENCE = {"enabled": True, "hops": 2, "rounds": [2], "probe_samples": 1,
             "variants": "first-order,curvature,second-order"}
SETTINGS = {
    "heldout-adam": {"optim": {"name": "adam", "batch_size": 8}, "influence": INFLUENCE},
    "validation-scaled": {"influence": {**INFLUENCE, "zprime": "validation"},
                          "misbehavior": {"kind": "scale", "count": 1, "factor": 3.0}},
}


def _experiment(**changes: Any) -> Any:
    return prepare(build_config({**WORLD, **changes}))


class OnMeta(LocalTasks):
    """A stage's tasks in this process, on the meta device."""

    device = "meta"


# Operations that move a tensor between devices on purpose (a module's ``.to``, a copy into a device tensor).
TRANSFERS = {"to", "copy_", "as_tensor", "_has_compatible_shallow_copy_type", "__set__", "set_"}


class OnOneDevice(TorchFunctionMode):
    """Fails any operation that mixes a tensor on ``device`` with a CPU tensor that is not a 0-d scalar (indices
    included: on a GPU each would be a host-to-device copy, or an error); reading a ``device`` tensor back to the host
    (``.cpu()``, ``.item()``, ``float``) gives zeros of its shape (``bool``: true), since the meta device holds no
    values, a sparse product (gossip, which meta has no kernel for) an empty result of its shape (a sampled one, the
    edge dots of proximal influence and the ledger: its pattern), and the nonzero
    entries of a vector (Adam's lagging step counters) all its indices. Counts the reads back (``reads``) and the
    copies of host data to the device (``uploads``)."""

    def __init__(self, device: str = "meta"):
        super().__init__()
        self.device, self.reads, self.uploads = torch.device(device), 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.device == self.device:
            if name == "cpu":
                self.reads += 1
                return torch.zeros(first.shape, dtype=first.dtype)
            if name in ("item", "__float__", "__bool__"):
                self.reads += 1
                return name == "__bool__" or 0.0
            assert name not in ("numpy", "tolist"), f"{name}() of a {self.device} tensor: read it with .cpu() first"
        if name in TRANSFERS:
            targets = [a for a in [*args[1:], kwargs.get("device")] if isinstance(a, (str, torch.device))]
            self.uploads += (name in ("as_tensor", "to") and any(torch.device(a) == self.device for a in targets)
                             and not (isinstance(first, torch.Tensor) and first.device == self.device))
            return func(*args, **kwargs)
        if name == "_sparse_mm" and first.device == self.device:  # gossip: meta has no sparse kernels
            assert args[1].device == self.device, "_sparse_mm: the sources are not on the device"
            return torch.empty(first.shape[0], args[1].shape[1], dtype=args[1].dtype, device=self.device)
        if name == "sparse_sampled_addmm" and first.device == self.device:  # edge dots: no meta kernel either
            assert all(t.device == self.device for t in args[1:3]), "edge dots: factors off the device"
            return first
        if name == "nonzero" and first.device == self.device:  # data-dependent, no meta kernel: every index of a
            assert first.dim() == 1, "nonzero: only vectors here"  # vector (a superset, so what follows runs too)
            return torch.arange(first.shape[0], device=self.device)[:, None]
        on_device = any(t.device == self.device for t in tensors)
        stray = [tuple(t.shape) for t in tensors if t.device.type == "cpu" and t.dim() > 0]
        assert not (on_device and stray), f"{name}: CPU tensors {stray} meet {self.device} tensors"
        return func(*args, **kwargs)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_a_replay_creates_every_tensor_on_its_windows_device(setting: str) -> None:
    """Windows recorded on the device, then DICE-GT and every DICE-E variant of every probe measured on them (the
    stage's own tasks, run in this process on the device): no CPU tensor meets a device tensor, and the results come
    back as rows of host numbers (zeros on meta)."""
    experiment = _experiment(**SETTINGS[setting])
    config = experiment.config
    want_influence, want_dice = measure_influence(experiment, LocalTasks())  # on the CPU, outside the mode
    with OnOneDevice() as mode:
        windows = record_windows(experiment, probe_rounds(config), config.influence.hops, device="meta")
        assert {t.device.type for w in windows for t in [*w.states, *w.halves, *tree_leaves(w.opt_states)]} == {"meta"}
        # the recording, the rounds' shared z′ gradients and losses, and the measure tasks, on the device
        influence, dice = measure_influence(experiment, OnMeta())
    assert mode.reads > 0
    key = ("probe_id", "step", "target")
    assert [tuple(r[k] for k in key) for r in influence] == [tuple(r[k] for k in key) for r in want_influence]
    assert len(dice) == len(want_dice)
    assert all(isinstance(r["gt"], float) and isinstance(r["est_second_order"], float) for r in influence)


@pytest.mark.parametrize("variant", ["first-order", "curvature"])
def test_the_adjoint_horizon_creates_every_tensor_on_its_windows_device(variant: str) -> None:
    """DICE-E's adjoint form (every source's horizon total from one backward sweep) on a window recorded on the
    device: W's transpose and the weights q meet the device's tensors on the device."""
    from dice_ray.methods.dice.adjoint import adjoint_horizon
    from dice_ray.methods.dice.measure import window_for

    experiment = _experiment(optim={"name": "adam", "batch_size": 8}, influence={**INFLUENCE, "rounds": [1]})
    with OnOneDevice() as mode:
        [window] = record_windows(experiment, [1], 2, device="meta")
        totals = adjoint_horizon(window_for(experiment, window), experiment.q, 2, variant)
    assert mode.reads == experiment.nodes and totals.shape == (experiment.nodes,) and totals.dtype == np.float64


def test_a_retraining_run_creates_every_tensor_on_its_device() -> None:
    experiment = _experiment(ledger={"enabled": True, "zprime": "validation"})
    with OnOneDevice():
        losses = final_losses(experiment, [1], device="meta")
    assert losses.shape == (experiment.nodes,) and losses.dtype == np.float64


def test_the_gpu_share_of_a_task_follows_the_run_and_is_validated() -> None:
    assert EngineConfig().task_gpus() == 0.0  # a CPU run replays on CPUs
    assert EngineConfig(gpus_per_actor=1).task_gpus() == TASK_GPU_SHARE and 0 < TASK_GPU_SHARE <= 1
    assert EngineConfig(gpus_per_actor=0.5, gpus_per_task=0).task_gpus() == 0.0
    assert EngineConfig(gpus_per_task=1).task_gpus() == 1.0
    for bad in (-0.25, 1.5, float("nan"), "a quarter"):
        with pytest.raises(InputError) as err:
            EngineConfig(gpus_per_task=bad)
        assert "gpus_per_task" in str(err.value) and "\n" not in str(err.value)
    args = build_parser().parse_args(["--gpus-per-task", "0.5"])
    assert resolve_config(args).engine.task_gpus() == 0.5


def test_a_task_asks_only_for_gpus_the_cluster_has() -> None:
    from dice_ray.engine.tasks import task_gpus

    assert task_gpus(EngineConfig(gpus_per_actor=1), cluster_gpus=2) == TASK_GPU_SHARE
    assert task_gpus(EngineConfig(gpus_per_actor=1), cluster_gpus=0) == 0.0  # a GPU run's replays on a CPU cluster
    assert task_gpus(EngineConfig(), cluster_gpus=8) == 0.0
    with pytest.raises(InputError, match=r"engine.gpus_per_task \(--gpus-per-task\) 0.5 but the Ray cluster has 0 "):
        task_gpus(EngineConfig(gpus_per_task=0.5), cluster_gpus=0)


def _rows(rows: list[dict], column: str) -> np.ndarray:
    return np.array([np.nan if r[column] is None else r[column] for r in rows], np.float64)


def test_tasks_ask_for_their_gpu_share_and_return_what_cpu_tasks_return(ray_with_a_logical_gpu, tmp_path) -> None:
    ray = ray_with_a_logical_gpu
    from dice_ray.engine.tasks import RayTasks, start_task, task_options
    from dice_ray.methods.retraining import Retraining

    @ray.remote(num_cpus=1, num_gpus=TASK_GPU_SHARE)
    def placed() -> tuple[list, str]:
        return ray.get_gpu_ids(), start_task()

    gpu_ids, device = ray.get(placed.remote())
    assert gpu_ids and device == ("cuda" if torch.cuda.is_available() else "cpu")

    runs = {}
    for share in (0.0, 0.5):
        engine = {"gpus_per_actor": 0.5, "gpus_per_task": share}
        experiment = _experiment(engine=engine, influence={**INFLUENCE, "probe_samples": 0, "sources": [0, 2]},
                                 ledger={"loo": True})
        assert task_options(experiment.config.engine) == {"num_gpus": share}
        tasks = RayTasks(experiment.config.engine)
        runs[share] = measure_influence(experiment, tasks), Retraining(experiment, tmp_path).run(tasks)["loo"]
    assert task_options(EngineConfig(gpus_per_actor=1)) == {"num_gpus": TASK_GPU_SHARE}
    (cpu_influence, cpu_dice), cpu_loo = runs[0.0]
    (gpu_influence, gpu_dice), gpu_loo = runs[0.5]
    for rows_cpu, rows_gpu, columns in ((cpu_influence, gpu_influence, ("gt", "est_curvature", "est_second_order")),
                                        (cpu_dice, gpu_dice, ("gt", "est_first_order"))):
        assert len(rows_cpu) == len(rows_gpu)
        for column in columns:
            np.testing.assert_allclose(_rows(rows_gpu, column), _rows(rows_cpu, column), rtol=0, atol=1e-9)
    np.testing.assert_allclose(gpu_loo["final_loss"], cpu_loo["final_loss"], rtol=0, atol=1e-9)


def test_a_rounds_zprime_gradients_and_losses_are_computed_once_for_the_participants_probes_reach(monkeypatch) -> None:
    """One task per recorded round computes the z′ gradients (and losses) there of the participants some probe
    reaches (``shared_rows``), each once; the probe tasks compute none of their own, and their tables are those of
    probe tasks that compute their own."""
    from dice_ray.methods.dice import replays
    from dice_ray.methods.dice.estimator import Window

    experiment = _experiment(nodes=12, rounds=8, influence={
        "enabled": True, "hops": 2, "rounds": [3, 4], "sources": [0, 6], "sources_per_task": 1,
        "variants": "first-order,curvature,exact-readout"})
    computed: list[tuple[int, list[int]]] = []
    compute = Window.compute_test_gradients

    def counted(window: Window, s: int, rows: np.ndarray) -> torch.Tensor:
        computed.append((window.trajectory.t0 + s, rows.tolist()))
        return compute(window, s, rows)

    monkeypatch.setattr(Window, "compute_test_gradients", counted)
    shared = replays.measure_influence(experiment, LocalTasks())
    rows = replays.shared_rows(select_probes(experiment.config), 2, experiment.topology.mixing_matrix)
    assert sorted(rows) == [3, 4, 5, 6] and 0 < len(rows[4]) < 12  # two sources' reach, not the ring
    assert computed == [(u, r.tolist()) for u, r in rows.items()]
    computed.clear()
    monkeypatch.setattr(replays, "shared_rows", lambda *_: {})
    alone = replays.measure_influence(experiment, LocalTasks())
    assert len(computed) == 4 * 3  # four probe tasks (2 rounds x 2 sources), each at 3 steps
    for mine, theirs in zip(shared, alone, strict=True):
        for column in ("gt", "est_first_order", "est_curvature", "est_exact_readout"):
            np.testing.assert_allclose(_rows(mine, column), _rows(theirs, column), rtol=0, atol=1e-12)


def test_a_runs_windows_travel_once_and_tasks_read_them_in_place(ray_with_a_logical_gpu) -> None:
    """The windows of a run's probe rounds go to the tasks as one object holding each round once (windows that
    overlap share it), and Ray hands its tensors to a process without copying them: two reads of the object share
    their memory, as the measure tasks of one machine do."""
    ray = ray_with_a_logical_gpu
    from dice_ray.methods.dice.replays import record_windows_task

    experiment = _experiment(rounds=6)
    [recording] = record_windows_task(experiment, [1, 2, 3], 2, "cpu")
    assert sorted(recording.states) == [1, 2, 3, 4, 5] and sorted(recording.halves) == [1, 2, 3, 4]
    ref = ray.put(recording)
    first, second = ray.get(ref), ray.get(ref)
    for got, want in ((first.states, recording.states), (first.halves, recording.halves)):
        assert all(torch.equal(got[t], want[t]) for t in want)
    assert all(first.states[t].data_ptr() == second.states[t].data_ptr() for t in recording.states)
    assert first.window(2, 2).states[0].data_ptr() == first.window(1, 2).states[1].data_ptr()
    windows = record_windows(experiment, [1, 3], 2)
    for a, b in zip(windows, (first.window(1, 2), first.window(3, 2)), strict=True):
        assert a.t0 == b.t0 and all(torch.equal(x, y) for x, y in zip(a.states + a.halves, b.states + b.halves,
                                                                      strict=True))
        assert all((x != y).nnz == 0 for x, y in zip(a.mixing, b.mixing, strict=True))


HOOKED = {
    "dice-ledger": {"proximal": {"enabled": True, "zprime": "heldout"},
                    "ledger": {"enabled": True, "hops": 2, "variants": ["first-order", "curvature", "exact-readout"]},
                    "influence": {"enabled": True, "online": True, "hops": 2, "rounds": [1], "probe_samples": 1,
                                  "variants": ["first-order", "curvature", "second-order", "exact-readout"]}},
    "rewiring": {"proximal": {"enabled": True, "zprime": "heldout"},
                 "rewiring": {"mode": "outlier", "every": 2, "keep": 2}},
}


@pytest.mark.parametrize("methods", list(HOOKED))
def test_the_round_hooks_create_every_tensor_on_the_blocks_device(methods: str) -> None:
    """In-loop DICE-E (every variant, single samples too), proximal influence, the ledger's cascades and collaborator
    selection on a block on the device: no CPU tensor meets a device tensor in their rounds, snapshots included. (A
    boolean mask made on the host and indexing on the device, read back for every probe and variant, was found so.)"""
    from dice_ray.engine.local import LocalEngine
    from dice_ray.hooks import round_hooks
    from dice_ray.methods.catalog import methods_for

    config = build_config({**WORLD, "rounds": 6, **HOOKED[methods]})
    with OnOneDevice() as mode:
        engine = LocalEngine(prepare(config), round_hooks(methods_for(config)), device="meta")
        for t in range(5):
            metrics = engine.run_round(t, evaluate=False, snapshot=t == 3)
    assert mode.reads > 0 and metrics.train_loss.shape == (config.nodes,)


def test_in_loop_dice_and_the_ledger_upload_to_the_device_as_often_with_one_probe_as_with_many() -> None:
    """A round copies host data (row positions, rows of W) to the device a fixed number of times, however many
    probes are in flight: one copy per probe and round (every source is a probe of the ledger's cascades) cost a GPU
    as many waits, ~8 N per round with the ledger."""
    from dice_ray.engine.local import LocalEngine
    from dice_ray.hooks import round_hooks
    from dice_ray.methods.catalog import methods_for

    def uploads(nodes: int, methods: dict) -> float:
        config = build_config({**WORLD, "nodes": nodes, "rounds": 6, "optim": {"name": "adam", "batch_size": 8},
                               **methods})
        with OnOneDevice() as mode:
            engine = LocalEngine(prepare(config), round_hooks(methods_for(config)), device="meta")
            engine.run_round(0, evaluate=False)
            mode.uploads = 0
            for t in range(1, 4):
                engine.run_round(t, evaluate=False)
        return mode.uploads / 3

    def dice(sources: list[int]) -> dict:
        return {"influence": {"enabled": True, "online": True, "hops": 2, "rounds": [1], "sources": sources,
                              "variants": ["first-order", "curvature", "second-order", "exact-readout"]}}

    ledger = {"ledger": {"enabled": True, "hops": 2, "variants": ["first-order", "curvature", "exact-readout"]}}
    assert uploads(5, dice([0])) == uploads(5, dice(list(range(5)))) <= 6
    assert uploads(5, ledger) == uploads(10, ledger) <= 11
