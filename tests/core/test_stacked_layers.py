"""How stacked participants' image layers compute on CPUs: ``model.pool`` gather (the default there), ``model.conv``
channels-last (a choice), and step chunks sized by activations. Each is another kernel or layout for the same
layers: gather pooling gives PyTorch's pooling bit for bit, the channels-last layout the grouped convolution's
numbers to float32 rounding, the chunking every row's numbers bit for bit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import grad, jvp, vmap
from torch.nn import functional as F  # noqa: N812
from torch.profiler import profile

import dice_ray
from dice_ray.core.convolution import stacked_input, use_conv_mode
from dice_ray.core.models import build_model, use_layer_modes
from dice_ray.core.pooling import (
    max_pool2d_by_gather,
    max_pool2d_by_views,
    max_pool2d_indices,
    use_pool_mode,
    values_only,
)
from dice_ray.core.population import SIDE_BY_SIDE_HOLDS, OptimizerSpec, Population, initial_state

# (kernel, stride, padding, dilation, ceil_mode): the CNN's 2x2 windows, and overlapping, padded, dilated ones
POOLINGS = [((2, 2), (2, 2), (0, 0), (1, 1), False), ((3, 3), (2, 2), (1, 1), (1, 1), True),
            ((2, 3), (1, 2), (0, 1), (2, 1), False)]


def stacked_activations(participants: int = 5, batch: int = 3, channels: int = 4, side: int = 9) -> torch.Tensor:
    """[P, B, C, H, W] after a ReLU (many all-zero windows: ties), with exact ties among positive values too."""
    gen = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(participants, batch, channels, side, side, generator=gen))
    x[:, :, 0, :4, :4] = 0.5  # a flat patch: every window over it is a tie
    return x


@pytest.mark.parametrize("args", POOLINGS, ids=["2x2", "3x3-overlapping", "dilated"])
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
def test_gather_pooling_is_pytorchs_pooling_under_vmap(args: tuple, layout: str) -> None:
    """Values bit for bit; the gradient (the step's reverse pass, outside vmap) bit for bit where windows do not
    overlap, else to float32 rounding (a shared element's gradients summed in another order)."""
    x = stacked_activations()
    if layout == "channels-last":
        x = x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)
    weights = torch.randn(vmap(lambda t: F.max_pool2d(t, *args))(x).shape, generator=torch.Generator().manual_seed(1))
    results = {}
    for name, pool in (("native", F.max_pool2d), ("gather", max_pool2d_by_gather)):
        leaf = x.clone().requires_grad_()
        out = vmap(lambda t, pool=pool: pool(t, *args))(leaf)
        results[name] = out.detach(), torch.autograd.grad((out * weights).sum(), leaf)[0]
    assert torch.equal(results["gather"][0], results["native"][0])
    native_grad, gather_grad = results["native"][1], results["gather"][1]
    if args[0] == args[1]:
        assert torch.equal(gather_grad, native_grad)
    else:
        assert (gather_grad - native_grad).abs().max() <= 4 * 2**-24 * native_grad.abs().max()
    # the indices are PyTorch's own, ties included (the first maximum of a window in scan order)
    want = vmap(lambda t: F.max_pool2d_with_indices(t, *args)[1])(x)
    assert torch.equal(vmap(lambda t: max_pool2d_indices(t, *args))(x), want)


def test_gather_pooling_is_differentiated_forward_and_nested_like_pytorchs() -> None:
    """In-loop DICE-E differentiates the step forward-mode, second order nested: a Hessian-vector product of a conv
    net through the gather pooling equals the one through PyTorch's pooling."""
    gen = torch.Generator().manual_seed(2)
    x, w1, w2 = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(3, 1, 3, 3, generator=gen), torch.randn(
        2, 3, 3, 3, generator=gen)
    v = torch.randn(w1.shape, generator=gen)

    def loss(w: torch.Tensor, pool) -> torch.Tensor:
        h = pool(torch.relu(F.conv2d(x, w, padding=1)), (2, 2), (2, 2), (0, 0), (1, 1), False)
        return F.conv2d(h, w2).square().sum()

    native = jvp(grad(lambda w: loss(w, F.max_pool2d)), (w1,), (v,))[1]
    gathered = jvp(grad(lambda w: loss(w, max_pool2d_by_gather)), (w1,), (v,))[1]
    assert torch.equal(gathered, native)
    # and stacked: vmap over participants of the forward-mode derivative
    tangents = vmap(lambda w: jvp(lambda u: loss(u, max_pool2d_by_gather), (w,), (v,))[1])(torch.stack([w1, -w1]))
    want = torch.stack([jvp(lambda u: loss(u, F.max_pool2d), (w,), (v,))[1] for w in (w1, -w1)])
    assert torch.equal(tangents, want)


def test_gather_pooling_keeps_nans_and_takes_any_input_rank_and_device() -> None:
    x = stacked_activations()[0]  # [B, C, H, W], no vmap
    x[0, 1, 3, 3] = float("nan")
    args = POOLINGS[0]
    pooled = max_pool2d_by_gather(x, *args)
    assert pooled[0, 1, 1, 1].isnan() and torch.allclose(pooled, F.max_pool2d(x, *args), equal_nan=True)
    assert torch.equal(max_pool2d_by_gather(x[1], *args), F.max_pool2d(x[1], *args))  # [C, H, W]
    meta = max_pool2d_by_gather(torch.empty(2, 3, 8, 8, device="meta"), *args)
    assert meta.device.type == "meta" and meta.shape == (2, 3, 4, 4)


@pytest.mark.parametrize("args", [*POOLINGS[:1], ((3, 3), (2, 2), (0, 0), (1, 1), False),
                                  ((2, 3), (1, 2), (0, 0), (2, 1), False), ((1, 1), (1, 1), (0, 0), (1, 1), False)],
                         ids=["2x2", "3x3-overlapping", "dilated", "1x1"])
@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
def test_pooling_values_from_strided_views_are_pytorchs(args: tuple, layout: str) -> None:
    """Without padding or ceil_mode a pooling's values are the elementwise maximum of its windows' strided views,
    bit for bit (ties, a NaN), stacked or not."""
    x = stacked_activations()
    x[0, 1, 2, 5, 5] = float("nan")
    if layout == "channels-last":
        x = x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)
    kernel, stride, _, dilation, _ = args
    want = vmap(lambda t: F.max_pool2d(t, *args))(x)
    got = vmap(lambda t: max_pool2d_by_views(t, kernel, stride, dilation))(x)
    assert got.isnan().any()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(max_pool2d_by_views(x[1], kernel, stride, dilation), F.max_pool2d(x[1], *args),
                               rtol=0, atol=0, equal_nan=True)


def test_evaluation_pools_values_alone_with_pytorchs_numbers_and_steps_keep_the_indices() -> None:
    """``Population.evaluate`` (no derivative goes through it) computes a converted pooling's values alone: no index of
    a window's maximum, every participant's loss and accuracy those of PyTorch's pooling bit for bit, passes in turn
    or side by side. A local step still takes the indices, and so does a gradient taken within ``values_only``
    (the views' maximum would share a tie's gradient among its elements)."""
    native = build_model("cnn", (1, 12, 12), 10)
    converted = copy.deepcopy(native)
    assert use_pool_mode(converted, "gather", "cpu") == 2
    state = initial_state(native, np.arange(5), 0, "independent")
    gen = torch.Generator().manual_seed(5)
    shared = torch.randn(40, 1, 12, 12, generator=gen), torch.randint(0, 10, (40,), generator=gen)
    own = torch.randn(5, 6, 1, 12, 12, generator=gen), torch.randint(0, 10, (5, 6), generator=gen)

    def evaluations(pop: Population) -> list[torch.Tensor]:
        return [*pop.evaluate(*shared, shared_input=True), *pop.evaluate(*own)]

    def indices_computed(prof: profile) -> bool:
        return any(event.key == "dice_ray::max_pool2d_indices" for event in prof.key_averages())

    want = evaluations(Population(native, state.clone(), OptimizerSpec()))
    pop = Population(converted, state.clone(), OptimizerSpec())
    pop.step_threads = 1  # passes in turn, on this thread, where the profiler sees their operators
    with profile() as prof:
        got = evaluations(pop)
    assert not indices_computed(prof)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    pop.step_threads = 2  # side by side, each pass within values_only on its own thread
    assert all(torch.equal(a, b) for a, b in zip(evaluations(pop), want, strict=True))
    pop.step_threads = 1
    with profile() as prof:
        pop.half_step(*own)
    assert indices_computed(prof)

    pooling = next(m for m in converted.modules() if isinstance(m, nn.MaxPool2d))
    leaf = stacked_activations()[0].requires_grad_()
    with values_only():
        got_grad = torch.autograd.grad(pooling(leaf).sum(), leaf)[0]
    want_grad = torch.autograd.grad(F.max_pool2d(leaf, 2, 2).sum(), leaf)[0]
    assert torch.equal(got_grad, want_grad)


def test_pool_and_conv_modes_say_what_they_change() -> None:
    model = build_model("cnn", (1, 12, 12), 10)
    assert use_pool_mode(model, "native", "cpu") == 0
    assert use_pool_mode(model, "auto", "meta") == 0  # auto: the gather form on CPUs only
    assert use_pool_mode(model, "auto", "cpu") == 2
    assert all("forward" in vars(m) for m in model.modules() if isinstance(m, nn.MaxPool2d))
    class Mine(nn.MaxPool2d):  # a user's subclass may compute otherwise: left as it is
        pass

    keeps = nn.MaxPool2d(2, return_indices=True), Mine(2)  # and so is a pooling returning its indices
    assert use_pool_mode(nn.Sequential(*keeps), "gather", "cpu") == 0 and not any("forward" in vars(m) for m in keeps)
    with pytest.raises(ValueError, match="pool mode 'fast' is unknown"):
        use_pool_mode(model, "fast", "cpu")

    x = torch.randn(3, 2, 1, 12, 12)
    assert stacked_input(model, x) is x  # not (yet) channels-last
    assert use_conv_mode(model, "auto", torch.device("cpu")) == 0 and stacked_input(model, x) is x  # native
    assert use_conv_mode(model, "channels-last", torch.device("cpu")) == 2
    laid = stacked_input(model, x)
    assert torch.equal(laid, x) and laid.permute(1, 3, 4, 0, 2).is_contiguous()  # in memory [B, H, W, P, C]
    mlp = build_model("mlp", (1, 8, 8), 10)
    assert use_conv_mode(mlp, "channels-last", torch.device("cpu")) == 0
    assert stacked_input(mlp, x) is x  # no convolutions: nothing to lay out


def test_a_cnn_steps_in_chunks_sized_by_its_activations_with_the_same_numbers() -> None:
    """On the CPU a pass of the local step holds its gradients and the activations kept for the backward pass
    within ``step_budget``: a CNN's activations (batch 16) are several times its parameters, so it steps in smaller
    chunks than its gradients alone would give, every row's numbers the same as in one pass."""
    model = build_model("cnn", (1, 12, 12), 10)
    use_layer_modes(model, "auto", "auto", "cpu")  # native convolutions, gather pooling
    spec = OptimizerSpec("momentum", lr=0.05, momentum=0.9)
    state = initial_state(model, np.arange(12), 0, "independent")
    one, chunked = Population(model, state.clone(), spec), Population(model, state.clone(), spec)
    one.step_budget = 1 << 40
    chunked.step_threads = 2  # its passes side by side, on one thread each
    row = chunked.param_layout.width * chunked.state.element_size()
    chunked.step_budget = 4 * row  # 3 passes of 4 rows by the gradients alone
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x, y = torch.randn(12, 16, 1, 12, 12, generator=gen), torch.randint(0, 10, (12, 16), generator=gen)
        assert torch.equal(one.half_step(x, y), chunked.half_step(x, y))
        assert torch.equal(one.state, chunked.state)
    assert chunked.step_row_bytes > 3 * row  # measured: activations counted
    assert max(s.stop - s.start for s in chunked.step_chunks()) < 4 and len(one.step_chunks()) == 1

    # measured once per model and minibatch shape: a later population of the model (a replay's) only steps
    passes = []
    model.register_forward_hook(lambda *_: passes.append(1))
    later = Population(model, state[:6].clone(), spec, step_budget=chunked.step_budget)
    later.half_step(x[:6], y[:6])
    assert later.step_row_bytes == chunked.step_row_bytes and len(passes) == len(later.step_chunks())  # no extra pass
    # its activations dominate what a pass holds: by default its passes run side by side, one per torch thread
    assert later.step_row_bytes >= SIDE_BY_SIDE_HOLDS * row and later.step_workers() == torch.get_num_threads()


def test_a_cnn_run_is_the_same_with_every_pool_and_conv_mode(tmp_path) -> None:
    """Whole runs on the CNN: the gather pooling changes no number; the channels-last layout changes them by float32
    rounding only, in training and in in-loop DICE-E."""
    world = {"nodes": 4, "rounds": 4, "seed": 3, "model": {"name": "cnn"},
             "data": {"dataset": "digits", "heldout_size": 8}, "optim": {"name": "sgd", "batch_size": 4},
             "influence": {"enabled": True, "online": True, "hops": 2, "rounds": [1], "sources": [0],
                           "variants": "first-order,curvature,second-order"}}
    runs = {}
    for conv, pool in (("native", "native"), ("native", "gather"), ("channels-last", "gather")):
        config = dice_ray.RunConfig(**{**world, "model": {"name": "cnn", "conv": conv, "pool": pool},
                                       "output": {"progress": False, "eval_every": 1,
                                                  "out": str(tmp_path / f"{conv}-{pool}")}})
        runs[conv, pool] = dice_ray.run(config, engine="local")
    native, gathered, laid = runs["native", "native"], runs["native", "gather"], runs["channels-last", "gather"]
    columns = ["train_loss", "heldout_loss", "heldout_acc"]
    assert native.rounds[columns].equals(gathered.rounds[columns])
    assert native.influence.equals(gathered.influence)
    a, b = native.rounds["heldout_loss"].to_numpy(), laid.rounds["heldout_loss"].to_numpy()
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    for column in ("est_first_order", "est_curvature", "est_second_order"):
        a, b = native.influence[column].to_numpy(), laid.influence[column].to_numpy()
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), column
