"""Device residency, checked on the CPU: what a block creates follows its device, and a round keeps the state there.

The GPU path's start-up crash (a buffer-less model's empty flat buffers drawn on the CPU, concatenated with CUDA
parameters) is caught here without a GPU: a block is built, and takes a local step, on PyTorch's ``meta`` device
(shapes without data; any tensor created on the CPU by mistake would meet a meta tensor and fail). And a round of
the engines' round body copies no state-sized tensor between host and device: counted by a ``TorchFunctionMode``
that sees every ``.cpu()``, ``.numpy()``, ``.to()``, ``.tolist()`` and ``torch.as_tensor``. The CUDA runs
themselves are ``bench/bench_gpu.py``'s.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import dice_ray
from dice_ray.core.models import build_model
from dice_ray.core.participants import ParticipantBlock
from dice_ray.core.population import Population, initial_state
from dice_ray.engine.local import LocalEngine
from dice_ray.experiment import prepare
from dice_ray.hooks import round_hooks
from dice_ray.methods.catalog import methods_for

WORLD = {"nodes": 8, "rounds": 6, "seed": 3, "data": {"dataset": "digits", "heldout_size": 32},
         "optim": {"name": "adam", "batch_size": 8}, "output": {"progress": False}}


def _tensors(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, value in vars(obj).items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for key, item in items:
            if isinstance(item, torch.Tensor):
                out.append((f"{prefix}{name}{'.' + key if key else ''}", item))
    return out


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_a_block_creates_everything_on_its_device_and_steps_there(model: str) -> None:
    config = dice_ray.RunConfig(**{**WORLD, "model": {"name": model}, "misbehavior": {"kind": "sign-flip", "count": 1}})
    block = ParticipantBlock.for_experiment(prepare(config), device="meta")
    pop = block.population
    held = _tensors(block) + _tensors(pop, "population.") + [
        (f"model.{n}", t) for n, t in [*pop.model.named_parameters(), *pop.model.named_buffers()]]
    assert held and not [(n, t.device) for n, t in held if t.device.type != "meta"]
    loss = block.half_step(0)  # the local step, misbehaving update included, on the device
    assert loss.device.type == "meta" and loss.shape == (config.nodes,)
    assert all(w.device.type == "meta" for w in block.mixing_rows(prepare(config).topology.mixing_matrix(0)))


def test_the_initial_state_does_not_depend_on_the_device_or_the_global_generator() -> None:
    """Drawn by the CPU generator on a CPU copy: a model moved elsewhere first, or a reseeded global generator,
    give the same weights (a CUDA model would otherwise draw from CUDA's generator)."""
    model = build_model("mlp", (1, 8, 8), 10)
    want = initial_state(model, np.arange(3), seed=11)
    torch.manual_seed(999)
    assert torch.equal(initial_state(model, np.arange(3), seed=11), want)
    on_meta = initial_state(build_model("mlp", (1, 8, 8), 10), np.arange(3), seed=11, device="meta")
    assert on_meta.device.type == "meta" and on_meta.shape == want.shape


class HostCopies(TorchFunctionMode):
    """Counts host <-> device conversions of tensors (or arrays) with at least ``numel`` elements: every ``.cpu()``,
    ``.numpy()``, ``.tolist()`` and ``torch.as_tensor``, and ``.to`` another device than the tensor's (a dtype
    conversion, or ``.to(block.device)`` of a tensor already there, stays where it is; the code asks for the host
    with ``.cpu()``)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        size = first.numel() if isinstance(first, torch.Tensor) else getattr(first, "size", 0)
        moves = name != "to" or any(torch.device(a) != first.device
                                    for a in [*args[1:], *kwargs.values()] if isinstance(a, (str, torch.device)))
        if name in ("cpu", "numpy", "tolist", "to", "as_tensor") and moves and size >= self.numel:
            self.seen.append((name, tuple(getattr(first, "shape", ()))))
        return func(*args, **kwargs)


@pytest.mark.parametrize("methods", [{}, {"proximal": {"enabled": True, "zprime": "heldout"},
                                          "influence": {"enabled": True, "online": True, "hops": 2, "rounds": [1]},
                                          "ledger": {"enabled": True, "hops": 2}}],
                         ids=["training", "with-in-loop-methods"])
def test_a_round_moves_no_state_sized_tensor_between_host_and_device(methods: dict) -> None:
    """Rounds that neither evaluate nor snapshot: the block's state, its rows of W (converted once) and every
    hook's tensors stay where the block lives. Without this a GPU round pays PCIe transfers of the whole state."""
    config = dice_ray.RunConfig(**{**WORLD, **methods})
    experiment = prepare(config)
    engine = LocalEngine(experiment, round_hooks(methods_for(config)))
    pop = engine.block.population
    engine.run_round(0, evaluate=False)  # round 0 converts W once
    with HostCopies(numel=pop.state.shape[0] * pop.param_layout.width // 2) as counter:
        for t in range(1, 4):
            engine.run_round(t, evaluate=False)
    assert counter.seen == []
    with HostCopies(numel=pop.state.shape[0] * pop.param_layout.width // 2) as counter:
        engine.run_round(4, evaluate=False, snapshot=True)
    assert counter.seen, "a snapshot copies the state to the host: the counter must see it"


def test_bf16_precision_trains_close_to_fp32(tmp_path) -> None:
    runs = {}
    for precision in ("fp32", "bf16"):
        output = {"progress": False, "eval_every": 1, "out": str(tmp_path / precision)}
        config = dice_ray.RunConfig(**{**WORLD, "engine": {"precision": precision}, "output": output})
        runs[precision] = dice_ray.run(config, engine="local").rounds.groupby("round").heldout_loss.mean().to_numpy()
    difference = np.abs(runs["bf16"] - runs["fp32"]) / np.abs(runs["fp32"])
    assert 0 < difference.max() < 0.05  # bfloat16 rounding (2^-8) in the step, not another computation


def test_the_faster_modes_are_taken_with_every_method() -> None:
    """A mode changes the local step only; DICE-GT's replays, the methods' derivatives and readouts stay IEEE float32.
    Measured on the CPU (bench/precision_on_cpu.py), DICE-E agrees with DICE-GT in a tf32 or bf16 run about as in
    fp32, and proximal influence and the ledger move by ~1% of their scale, rankings unchanged: every method takes
    every mode (bf16 used to be refused with them, on the argument that their values lay below its resolution)."""
    for precision in ("tf32", "bf16"):
        for section in ({"influence": {"enabled": True, "online": True}}, {"proximal": {"enabled": True}},
                        {"ledger": {"enabled": True}}):
            config = dice_ray.RunConfig(**{**WORLD, "engine": {"precision": precision}, **section})
            assert config.engine.precision == precision


def test_a_mode_holds_in_the_local_step_only() -> None:
    """Outside a local step every mode computes IEEE float32: TF32 off (bf16 used to switch TF32 on for the whole
    process, and tf32 did, its replays and derivatives included: 5-15x DICE-E's error, emulated). Inside a step on
    CUDA tf32 lets CUDA use TF32, bf16 autocasts; on the CPU tf32 touches no switch (CPU steps may run on several
    threads at once). The switches are CUDA's, settable without a GPU."""
    from dice_ray.core.precision import PRECISIONS, set_precision, step_precision

    try:
        if hasattr(torch.backends, "fp32_precision"):  # PyTorch >= 2.9's settings, used by other code before
            torch.backends.cudnn.fp32_precision = "tf32"  # a parent that the older switch's "off" would inherit
            torch.backends.cudnn.rnn.fp32_precision = "ieee"  # and a mix the older switch cannot read
            set_precision("fp32")
            assert torch.backends.cudnn.conv.fp32_precision == torch.backends.cudnn.rnn.fp32_precision == "ieee"
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        for precision in PRECISIONS:
            set_precision(precision)
            assert torch.backends.cuda.matmul.allow_tf32 is torch.backends.cudnn.allow_tf32 is False
            for device in ("cpu", "cuda"):
                if precision == "bf16" and device == "cuda" and not torch.cuda.is_available():
                    continue  # (autocast to CUDA is off, with a warning, without CUDA)
                with step_precision(precision, device):
                    tf32 = precision == "tf32" and device == "cuda"
                    assert torch.backends.cuda.matmul.allow_tf32 is torch.backends.cudnn.allow_tf32 is tf32
                    assert torch.is_autocast_enabled(device) is (precision == "bf16")
                assert torch.backends.cuda.matmul.allow_tf32 is torch.backends.cudnn.allow_tf32 is False
                assert not torch.is_autocast_enabled(device)
    finally:
        set_precision("fp32")


def test_bf16_holds_in_the_local_step_and_not_in_evaluation_or_replays() -> None:
    """A bf16 block's local step autocasts (on the CPU too); its evaluation, and a population the methods build on
    its model (a DICE-GT replay's), compute in float32."""
    config = dice_ray.RunConfig(**{**WORLD, "engine": {"precision": "bf16"}})
    block = ParticipantBlock.for_experiment(prepare(config))
    model = block.population.model
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.is_autocast_enabled("cpu")))
    block.half_step(0)
    in_step = len(seen)
    block.evaluate()
    replay = Population(model, block.population.state[:3].clone(), block.population.optimizer)
    drawn = block.minibatch_rows(1)[:3]
    replay.half_step(block.x_data[drawn], block.y_data[drawn])
    assert in_step and all(seen[:in_step]) and len(seen) > in_step and not any(seen[in_step:])


@pytest.mark.parametrize("model", ["cnn", "resnet18"])
def test_convolutions_as_matrix_products_equal_native_ones(model: str) -> None:
    """``model.conv`` unfold (the GPU default) computes the local step native convolutions compute: in float64 the
    same step to 1e-12 of its size; in float32 to float32 rounding (2^-24 per operation, over ~20 layers of sums of
    up to 4,608 terms: 1e-4 of the step, plus the state's own rounding).

    ResNet-18's float32 steps are compared with its BatchNorm in eval mode: in train mode, over a batch of 4 random
    1x8x8 samples, its last stage normalizes 4 nearly equal values per channel (1x1 maps), so a float32 step is only
    as close as the rounding of those values cancels; an unfold step moved by 6% of its size on an Intel Xeon where
    the native one matched float64 to 6e-5 and both matched each other in float64 to 2e-14."""
    steps, exact = {}, {}
    for conv in ("native", "unfold"):
        config = dice_ray.RunConfig(**{**WORLD, "nodes": 4, "optim": {"name": "momentum", "batch_size": 4,
                                                                      "lr": 0.002},
                                       "data": {"dataset": "synthetic", "synthetic_samples": 200, "heldout_size": 8},
                                       "model": {"name": model, "conv": conv}})
        block = ParticipantBlock.for_experiment(prepare(config))
        pop = block.population
        converted = sum(getattr(m, "_conv_forward", None).__func__ is not type(m)._conv_forward
                        for m in pop.model.modules() if isinstance(m, torch.nn.Conv2d))
        convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in pop.model.modules())
        assert converted == (0 if conv == "native" else convolutions)
        start, drawn = pop.state.clone(), block.minibatch_rows(0)
        in_float64 = Population(copy.deepcopy(pop.model).double(), start.double(), pop.optimizer, loss=pop.loss)
        in_float64.half_step(block.x_data[drawn].double(), block.y_data[drawn])
        exact[conv] = in_float64.state - start.double()
        pop.model.train(model != "resnet18")
        block.half_step(0)
        steps[conv] = (pop.state - start).double()
    width = pop.param_layout.width
    size = exact["native"][:, :width].abs().max()
    assert (exact["unfold"] - exact["native"])[:, :width].abs().max() <= 1e-12 * size
    step = steps["native"][:, :width]
    rounding = 1e-4 * step.abs().max() + 2 * 2**-24 * start[:, :width].abs().max()
    assert step.abs().max() > 0 and (steps["unfold"][:, :width] - step).abs().max() <= rounding


def test_in_loop_dice_differentiates_through_matrix_product_convolutions(tmp_path) -> None:
    """In-loop DICE-E (forward-mode through the step, second order nested) on a CNN with ``model.conv`` unfold equals
    the native convolutions' estimates to float32 rounding."""
    tables = {}
    for conv in ("native", "unfold"):
        config = dice_ray.RunConfig(**{**WORLD, "nodes": 4, "rounds": 4, "model": {"name": "cnn", "conv": conv},
                                       "optim": {"name": "sgd", "batch_size": 4},
                                       "data": {"dataset": "digits", "heldout_size": 8},
                                       "influence": {"enabled": True, "online": True, "hops": 2, "rounds": [1],
                                                     "sources": [0], "variants": "first-order,curvature,second-order"},
                                       "output": {"progress": False, "out": str(tmp_path / conv)}})
        tables[conv] = dice_ray.run(config, engine="local").influence
    for column in ("est_first_order", "est_curvature", "est_second_order"):
        a, b = tables["native"][column].to_numpy(), tables["unfold"][column].to_numpy()
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), column


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_the_cuda_graph_step_equals_the_eager_one_bit_for_bit(model: str) -> None:
    """The replayed local step runs the eager step's kernels on the same addresses: the same states, round after
    round, with a misbehaving participant's update, an idle participant (no data: no step, loss 0) and Adam's
    per-participant step counter inside the graph."""
    config = dice_ray.RunConfig(**{**WORLD, "model": {"name": model}, "misbehavior": {"kind": "sign-flip", "count": 1},
                                   "data": {**WORLD["data"], "shrink": {"ids": [5], "fraction": 1.0}}})
    experiment = prepare(config)
    graphed = ParticipantBlock.for_experiment(experiment, device="cuda")
    eager = ParticipantBlock.for_experiment(
        prepare(config.model_copy(update={"engine": config.engine.model_copy(update={"cuda_graphs": False})})),
        device="cuda")
    w = graphed.mixing_rows(experiment.topology.mixing_matrix(0))
    for t in range(4):
        losses = graphed.half_step(t), eager.half_step(t)
        assert torch.equal(*losses)
        graphed.mix(w, [graphed.population.state])
        eager.mix(w, [eager.population.state])
        assert torch.equal(graphed.population.state, eager.population.state)
    assert graphed._step_graph.graph is not None and eager._step_graph is None
    assert losses[0][5] == 0 and (losses[0] != 0).sum() == len(losses[0]) - 1


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA device with TF32 (compute capability 8.0 or later)")
def test_tf32_holds_in_the_cuda_local_step_and_its_graph_and_not_in_evaluation() -> None:
    """A tf32 block's local steps compute in TF32 — replayed from its CUDA graph as when launched one by one, and not
    as fp32's — and its evaluation in IEEE float32: on one state, a tf32 block evaluates as an fp32 block does."""
    states, blocks = {}, {}
    for name, engine in {"fp32": {}, "tf32": {"precision": "tf32"},
                         "tf32-eager": {"precision": "tf32", "cuda_graphs": False}}.items():
        config = dice_ray.RunConfig(**{**WORLD, "model": {"name": "cnn"}, "engine": engine})
        experiment = prepare(config)
        block = blocks[name] = ParticipantBlock.for_experiment(experiment, device="cuda")
        w = block.mixing_rows(experiment.topology.mixing_matrix(0))
        for t in range(3):
            block.half_step(t)
            block.mix(w, [block.population.state])
        states[name] = block.population.state.clone()
    assert torch.equal(states["tf32"], states["tf32-eager"])
    assert not torch.equal(states["tf32"], states["fp32"])
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    blocks["tf32"].population.state.copy_(states["fp32"])
    blocks["fp32"].population.state.copy_(states["fp32"])
    evaluated = blocks["tf32"].evaluate()
    for split, values in blocks["fp32"].evaluate().items():
        np.testing.assert_array_equal(evaluated[split], values, err_msg=split)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gather_pooling_on_cuda_is_pytorchs_pooling_and_the_cuda_graph_step_takes_it() -> None:
    """``model.pool`` gather (the CPU default; a choice on CUDA) computes PyTorch's pooling on CUDA too, and a CUDA
    run with it steps as the native pooling's run does, CUDA graph included."""
    runs = {}
    for pool in ("native", "gather"):
        config = dice_ray.RunConfig(**{**WORLD, "model": {"name": "cnn", "pool": pool}})
        block = ParticipantBlock.for_experiment(prepare(config), device="cuda")
        w = block.mixing_rows(prepare(config).topology.mixing_matrix(0))
        for t in range(3):
            block.half_step(t)
            block.mix(w, [block.population.state])
        runs[pool] = block.population.state
    assert torch.equal(runs["gather"], runs["native"])


def test_a_regression_loss_under_bf16_autocast_fits_the_targets_as_given() -> None:
    """bf16 outputs are compared with the float32 targets in float32: rounding the targets to bfloat16 (8 bits of
    mantissa) would change what the model is fitted to, not only the step's arithmetic."""
    from dice_ray.core.losses import MeanSquaredError

    outputs = torch.tensor([[1.0], [2.0]], dtype=torch.bfloat16)
    targets = torch.tensor([1.001, 2.003])  # not bfloat16 numbers: they would round to 1.0 and 2.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MeanSquaredError().per_sample(outputs, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, (outputs.float()[:, 0] - targets) ** 2, rtol=1e-6, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dice_gt_on_cuda_reads_nothing_for_a_probe_that_removes_nothing_and_the_cpus_numbers_otherwise() -> None:
    """fp32 on CUDA: a replay's few rows take other kernels than the recording's whole block, so the factual side is
    replayed too (``Window.replay_factual``): a probe that removes nothing is exactly 0, and a single sample's probe
    equals the CPU's within float32 rounding of the losses it subtracts."""
    from dice_ray.methods.dice.ground_truth import ground_truth_cascade
    from dice_ray.methods.dice.measure import window_for
    from dice_ray.methods.dice.trajectory import record_windows

    config = dice_ray.RunConfig(**{**WORLD, "optim": {"name": "momentum", "batch_size": 8, "lr": 0.1}})
    experiment = prepare(config)
    cascades = {}
    for device in ("cpu", "cuda"):
        window = window_for(experiment, record_windows(experiment, [2], 2, device)[0])
        assert window.replay_factual is (device == "cuda")
        nothing = ground_truth_cascade(window, 0, 2, np.zeros(0, np.int64))
        assert nothing.half == 0 and all(not v.any() for v in nothing.values[1:]), device
        cascades[device] = ground_truth_cascade(window, 0, 2, np.array([1]))
    cpu, cuda = cascades["cpu"], cascades["cuda"]
    scale = max(abs(cpu.half), *(np.abs(v).max() for v in cpu.values[1:]))
    np.testing.assert_allclose(cuda.half, cpu.half, rtol=0, atol=1e-3 * scale)
    for a, b in zip(cuda.values[1:], cpu.values[1:], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * scale)


class HostReads(TorchFunctionMode):
    """Counts the calls that make the host wait for the device: copies to the host (``.cpu()``, ``.tolist()``,
    ``.item()``, a tensor read as a Python number) and data-dependent shapes (``nonzero``, ``unique``)."""

    NAMES = ("cpu", "tolist", "item", "__int__", "__float__", "__bool__", "__index__", "nonzero", "unique",
             "_unique2", "argwhere", "masked_select")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.NAMES
        return func(*args, **(kwargs or {}))


def test_in_loop_dice_reads_back_from_the_device_as_often_with_one_probe_as_with_many() -> None:
    """A round of in-loop DICE-E (every variant, Adam) waits for the device a fixed number of times: the terms of
    every probe in flight come back in one copy, and the index work is done on the host. Reading them per probe and
    variant cost a GPU round thousands of waits with the ledger's every-source probes."""
    reads = {}
    for sources in ([0], list(range(8))):
        config = dice_ray.RunConfig(**{**WORLD, "influence": {
            "enabled": True, "online": True, "hops": 2, "rounds": [1], "sources": sources,
            "variants": ["first-order", "curvature", "second-order", "exact-readout"]}})
        engine = LocalEngine(prepare(config), round_hooks(methods_for(config)))
        engine.run_round(0, evaluate=False)
        with HostReads() as counter:
            for t in range(1, 4):
                engine.run_round(t, evaluate=False)
        reads[len(sources)] = counter.count
    assert reads[1] == reads[8] <= 3 * 3, reads


def test_the_local_engine_on_a_gpu_reads_the_losses_back_once_per_queue_of_rounds_with_the_same_numbers() -> None:
    """The local engine off the CPU (retraining's tasks on a GPU, a notebook) runs up to ``MAX_ROUNDS_PER_CALL``
    rounds before reading their training losses back, in one copy, as the Ray actors do: the host does not wait for
    the device every round. An evaluation round is yielded at once; the numbers are the same."""
    from dice_ray.engine.metrics import MAX_ROUNDS_PER_CALL

    config = dice_ray.RunConfig(**WORLD)
    assert LocalEngine(prepare(config), device="meta").queue == MAX_ROUNDS_PER_CALL
    assert LocalEngine(prepare(config)).queue == 1
    plans = [(t, t == 9) for t in range(10)]
    reads, losses = {}, {}
    for queue in (1, 8):
        engine = LocalEngine(prepare(config), queue=queue)
        with HostReads() as counter:
            metrics = list(engine.run_rounds(plans))
        assert [m.round for m in metrics] == list(range(10)) and metrics[-1].heldout_acc is not None
        reads[queue], losses[queue] = counter.count, np.stack([m.train_loss for m in metrics])
    np.testing.assert_array_equal(losses[1], losses[8])
    assert reads[1] - reads[8] == 10 - 2, reads  # rounds 0-7 in one read, 8-9 in one
