"""Tests of dice_ray.core.population: the stacked, vectorized local step and gossip of concepts §1.

The oracle throughout is the obvious per-participant code: one ``nn.Module`` per participant k, loaded
from row k of the stacked state, stepped by ``torch.optim``.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os

import numpy as np
import pytest
import torch
from torch import nn

from dice_ray.core.models import build_model
from dice_ray.core.population import (
    DEVICE_MIX_ELEMENTS,
    EVAL_GROUP_ROWS,
    EVAL_PASS_BYTES,
    MIN_PASS_ROWS,
    SIDE_BY_SIDE_HOLDS,
    Layout,
    OptimizerSpec,
    Population,
    initial_state,
    model_state_layouts,
)
from dice_ray.errors import InputError

SHAPE = (1, 8, 8)  # channels-first; 8x8 so the CNN's two 2x2 poolings divide it
CLASSES = 4
P, B = 4, 6
TOL = 1e-6

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")


def tiny_bn_net(input_shape: tuple[int, ...] = SHAPE, num_classes: int = CLASSES) -> nn.Module:
    """A small model with BatchNorm buffers (running_mean, running_var): 2 * 3 floating-point buffers."""
    channels, height, width = input_shape
    return nn.Sequential(nn.Conv2d(channels, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * height * width, num_classes))


def make_model(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    return (tiny_bn_net() if name == "bn" else build_model(name, SHAPE, CLASSES)).to(dtype)


def make_population(name: str, spec: OptimizerSpec, vectorize: str = "vmap", p: int = P,
                    seed: int = 0, dtype: torch.dtype = torch.float32) -> Population:
    """Participants 0..p-1 with independent starts, so that every row differs."""
    model = make_model(name, dtype)
    return Population(model, initial_state(model, np.arange(p), seed, "independent"), spec, vectorize)


def reference_model(name: str, pop: Population, k: int) -> nn.Module:
    """A fresh ``nn.Module`` holding row k of ``pop.state``: parameters, then floating-point buffers."""
    model = make_model(name, pop.state.dtype)
    width = pop.param_layout.width
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, view in pop.param_layout.views(pop.state[k, :width]).items():
            params[name].copy_(view)
    with torch.no_grad():
        for name_, view in pop.buffer_layout.views(pop.state[k, width:]).items():
            model.get_buffer(name_).copy_(view)
    return model


def model_state(model: nn.Module) -> torch.Tensor:
    """Row of a reference model in the population's order: parameters, then floating-point buffers."""
    buffers = [b.reshape(-1) for b in model.buffers() if b.is_floating_point()]
    layout = model_state_layouts(model)[0]
    return torch.cat([layout.flatten(dict(model.named_parameters())).detach(), *buffers])


def torch_optimizer(spec: OptimizerSpec, params) -> torch.optim.Optimizer:
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, eps=spec.eps,
                                weight_decay=spec.weight_decay)
    momentum = spec.momentum if spec.name == "momentum" else 0.0
    return torch.optim.SGD(params, lr=spec.lr, momentum=momentum, nesterov=spec.nesterov and momentum > 0,
                           weight_decay=spec.weight_decay)


def random_batch(p: int = P, b: int = B, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Inputs x [p, b, *SHAPE] and labels y [p, b]: each participant its own batch."""
    return torch.randn(p, b, *SHAPE, dtype=dtype), torch.randint(0, CLASSES, (p, b))


def run_both(name: str, spec: OptimizerSpec, vectorize: str, steps: int, dtype: torch.dtype = torch.float32):
    """Step the population and per-participant reference models on the same batches.

    Returns (population losses [steps, P], reference losses [steps, P], final population state [P, D],
    final reference states [P, D]).
    """
    torch.manual_seed(0)
    pop = make_population(name, spec, vectorize, dtype=dtype)
    refs = [reference_model(name, pop, k) for k in range(P)]
    opts = [torch_optimizer(spec, m.parameters()) for m in refs]
    pop_losses, ref_losses = [], []
    for _ in range(steps):
        x, y = random_batch(dtype=dtype)  # a different batch per participant and per step
        pop_losses.append(pop.half_step(x, y))
        step_losses = []
        for k, (model, opt) in enumerate(zip(refs, opts, strict=True)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[k]), y[k])
            loss.backward()
            opt.step()
            step_losses.append(loss.detach())
        ref_losses.append(torch.stack(step_losses))
    ref_states = torch.stack([model_state(m) for m in refs])
    return torch.stack(pop_losses), torch.stack(ref_losses), pop.state, ref_states


# ------------------------------------------------------------------------ local step against torch.optim

OPTIMIZER_CASES = {
    "sgd": OptimizerSpec("sgd", lr=0.1),
    "sgd-wd": OptimizerSpec("sgd", lr=0.1, weight_decay=0.01),
    "momentum": OptimizerSpec("momentum", lr=0.1, momentum=0.9),
    "nesterov-wd": OptimizerSpec("momentum", lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.01),
    "adam": OptimizerSpec("adam", lr=0.01),
    "adam-wd": OptimizerSpec("adam", lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01),
}
STEP_CASES = [(model, opt) for model in ("mlp", "mlp-tanh", "cnn") for opt in OPTIMIZER_CASES
              if not (model == "cnn" and opt.startswith("adam"))]


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
@pytest.mark.parametrize(("model", "opt"), STEP_CASES)
def test_half_step_matches_torch_optim(model: str, opt: str, vectorize: str) -> None:
    # Adam runs in float64. Its update η m̂/(√v̂ + ε) has slope η/ε = 1e6 in g for gradients near ε = 1e-8;
    # a 4x16836-parameter MLP has a few by chance, and in float32 our matmuls (batched, and on transposed
    # weight storage) sum in another order than the per-model ones (|Δg| ~ 1e-11 there), which moves such a
    # parameter by ~1e-6 already at the first step, for ReLU and tanh alike.
    dtype = torch.float64 if opt.startswith("adam") else torch.float32
    _, _, state, reference = run_both(model, OPTIMIZER_CASES[opt], vectorize, steps=3, dtype=dtype)
    assert state.dtype == dtype
    assert (state - reference).abs().max() < TOL


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_half_step_returns_loss_before_the_step(opt: str, vectorize: str) -> None:
    pop_losses, ref_losses, _, _ = run_both("mlp", OPTIMIZER_CASES[opt], vectorize, steps=3)
    assert (pop_losses - ref_losses).abs().max() < TOL


# ------------------------------------------------------------------------------- losses and gradients

@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_loss_and_grad_rows_are_each_participants_gradient(model: str, vectorize: str) -> None:
    torch.manual_seed(0)
    pop = make_population(model, OptimizerSpec(), vectorize)
    before = pop.state.clone()
    x, y = random_batch()
    losses, grads = pop.loss_and_grad(x, y)
    assert grads.shape == pop.params.shape
    for k in range(P):
        ref = reference_model(model, pop, k)
        loss = nn.functional.cross_entropy(ref(x[k]), y[k])
        grad = torch.autograd.grad(loss, list(ref.parameters()))
        assert abs(losses[k] - loss) < TOL
        names = [n for n, _ in ref.named_parameters()]
        assert (grads[k] - pop.param_layout.flatten(dict(zip(names, grad, strict=True)))).abs().max() < TOL
    assert torch.equal(pop.state, before)  # measuring gradients does not move anyone


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_losses_with_shared_input(vectorize: str) -> None:
    torch.manual_seed(0)
    pop = make_population("mlp", OptimizerSpec(), vectorize)
    x, y = torch.randn(B, *SHAPE), torch.randint(0, CLASSES, (B,))
    expected = torch.stack([nn.functional.cross_entropy(reference_model("mlp", pop, k)(x), y)
                            for k in range(P)])
    assert (pop.losses(x, y, shared_input=True) - expected).abs().max() < TOL
    # the same batch given to each participant separately gives the same numbers
    assert (pop.losses(x.expand(P, *x.shape), y.expand(P, B)) - expected).abs().max() < TOL


@pytest.mark.parametrize("shared_input", [False, True])
@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
@pytest.mark.parametrize("model", ["mlp", "bn"])
def test_evaluate_in_chunks_matches_eval_mode_models(model: str, vectorize: str, shared_input: bool) -> None:
    torch.manual_seed(0)
    p, b = 8, 10
    pop = make_population(model, OptimizerSpec(), vectorize, p=p)
    if pop.buffers.shape[1]:  # give running statistics non-trivial values so eval mode visibly uses them
        pop.buffers.copy_(torch.rand_like(pop.buffers) + 0.5)
    if shared_input:
        x, y = torch.randn(b, *SHAPE), torch.randint(0, CLASSES, (b,))
    else:
        x, y = torch.randn(p, b, *SHAPE), torch.randint(0, CLASSES, (p, b))
    pop.model.train()
    loss, acc = pop.evaluate(x, y, shared_input=shared_input, chunk=3)
    assert pop.model.training  # evaluate restores the mode it found
    for k in range(p):
        ref = reference_model(model, pop, k).eval()
        xk, yk = (x, y) if shared_input else (x[k], y[k])
        with torch.no_grad():
            logits = ref(xk)
        assert abs(loss[k] - nn.functional.cross_entropy(logits, yk)) < TOL
        assert acc[k] == (logits.argmax(-1) == yk).float().mean()
    assert len(set(loss.tolist())) == p  # participants differ, so the chunks did not repeat one


@pytest.mark.parametrize("shared_input", [False, True])
def test_evaluate_with_a_padding_mask_equals_evaluating_the_kept_samples(shared_input: bool) -> None:
    torch.manual_seed(0)
    p, b = 5, 7
    pop = make_population("mlp", OptimizerSpec(), p=p)
    x = torch.randn(b, *SHAPE) if shared_input else torch.randn(p, b, *SHAPE)
    y = torch.randint(0, CLASSES, (b,) if shared_input else (p, b))
    mask = torch.rand(p, b) < 0.6
    mask[:, 0] = True  # every row keeps a sample (a row of zeros is documented to give NaN)
    loss, acc = pop.evaluate(x, y, shared_input=shared_input, sample_weights=mask, chunk=2)
    for k in range(p):
        xk, yk = (x, y) if shared_input else (x[k], y[k])
        kept = pop.evaluate(xk[mask[k]], yk[mask[k]], shared_input=True)
        assert abs(loss[k] - kept[0][k]) < TOL and abs(acc[k] - kept[1][k]) < TOL


def test_evaluation_passes_hold_one_participant_of_a_cnn_on_z_prime_and_many_of_an_mlp() -> None:
    """A pass of ``evaluate`` takes as many participants as keep its largest layer output within the budget, all
    their samples at once: on the shared 500-image z′ one CNN participant's first convolution alone outgrows it
    (16 x 28 x 28 floats an image), an MLP's widest layer (128 floats) lets 16 share a pass."""
    spec = OptimizerSpec()
    cnn = build_model("cnn", (1, 28, 28), 10)
    pop = Population(cnn, initial_state(cnn, np.arange(5), 0, "independent"), spec)
    image = torch.zeros(1, 1, 28, 28)
    assert pop.evaluation_budget() == EVAL_PASS_BYTES
    assert pop.evaluation_passes(image, 500) == [slice(k, k + 1) for k in range(5)]
    assert pop.evaluation_passes(image, 2) == [slice(0, 5)]  # a validation split: the whole block
    assert pop.evaluation_passes(image, 500, chunk=2) == [slice(0, 2), slice(2, 3), slice(3, 5)]
    mlp = make_population("mlp", spec, p=40)
    per_sample = 128 * 4  # bytes of the widest layer's output
    most = EVAL_PASS_BYTES // (per_sample * 500)
    assert most == 16 and [s.stop - s.start for s in mlp.evaluation_passes(torch.zeros(1, *SHAPE), 500)] == [13, 14, 13]
    assert Population(mlp.model, mlp.state[:0], spec).evaluation_passes(torch.zeros(1, *SHAPE), 500) == []
    # a few samples each: at most EVAL_GROUP_ROWS participants a pass, however many would fit
    many = make_population("mlp", spec, p=200).evaluation_passes(torch.zeros(1, *SHAPE), 3)
    assert EVAL_GROUP_ROWS == 64 and [s.stop - s.start for s in many] == [50] * 4
    # on participants' own samples, groups of at least MIN_PASS_ROWS (a smaller one would be padded to it)
    assert pop.evaluation_passes(image, 500, least=MIN_PASS_ROWS) == [slice(0, 5)]
    assert make_population("mlp", spec, p=7).evaluation_passes(torch.zeros(1, *SHAPE), 1, chunk=2,
                                                               least=MIN_PASS_ROWS) == [slice(0, 4), slice(4, 7)]


@pytest.mark.parametrize("model", ["cnn3", "bn"])
def test_evaluate_gives_a_participant_the_same_numbers_whichever_pass_computes_it(model: str) -> None:
    """However a block's participants are grouped into the passes of ``evaluate`` (groups of one or two, a block of
    twelve, passes side by side on threads), and however participants are cut into blocks (actors), every
    participant's loss and accuracy are the same bit for bit, on a shared z′ and on its own samples with a mask.
    3-channel convolutions are the case whose local step needed padding to MIN_PASS_ROWS rows; a forward pass needs
    none."""
    p = 12
    net = build_model("cnn", (3, 12, 12), CLASSES) if model == "cnn3" else tiny_bn_net((3, 12, 12))
    state = initial_state(net, np.arange(p), 0, "independent")
    whole = Population(net, state.clone(), OptimizerSpec())
    if whole.buffers.shape[1]:
        whole.buffers.copy_(torch.rand_like(whole.buffers) + 0.5)
    gen = torch.Generator().manual_seed(4)
    shared = torch.randn(40, 3, 12, 12, generator=gen), torch.randint(0, CLASSES, (40,), generator=gen)
    own = torch.randn(p, 5, 3, 12, 12, generator=gen), torch.randint(0, CLASSES, (p, 5), generator=gen)
    mask = torch.rand(p, 5, generator=gen) < 0.7
    mask[:, 0] = True
    threads = torch.get_num_threads()

    def both(pop: Population, rows: slice = slice(None), **kw) -> list[torch.Tensor]:
        return [*pop.evaluate(*shared, shared_input=True, **kw),
                *pop.evaluate(own[0][rows], own[1][rows], sample_weights=mask[rows], **kw)]

    want = both(whole, chunk=p)
    whole.step_threads = 2
    whole.model.train()
    for got in (both(whole), both(whole, chunk=1), both(whole, chunk=5)):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert whole.model.training and torch.get_num_threads() == threads
    for rows in (slice(0, 1), slice(1, 3), slice(3, 7)):
        block = Population(net, whole.state[rows].clone(), OptimizerSpec())
        assert all(torch.equal(a, b[rows]) for a, b in zip(both(block, rows), want, strict=True))


# ----------------------------------------------------------------------------------------------- gossip

@pytest.mark.parametrize("layout", ["sparse-csr", "dense"])
def test_mix_is_the_matrix_product(layout: str) -> None:
    torch.manual_seed(0)
    pop = make_population("mlp", OptimizerSpec())
    m = 6  # the sources need not be the population's own rows: [P, M] weights, [M, D] sources
    sources = torch.randn(m, pop.state.shape[1])
    dense = torch.rand(P, m) * (torch.rand(P, m) < 0.5)
    dense /= dense.sum(dim=1, keepdim=True).clamp_min(1e-12)
    pop.mix_(dense.to_sparse_csr() if layout == "sparse-csr" else dense, sources)
    assert (pop.state - dense @ sources).abs().max() < TOL
    assert torch.equal(pop.params, pop.state[:, : pop.param_layout.width])  # views still alias the state


def test_mix_over_source_blocks_equals_mix_over_their_concatenation() -> None:
    torch.manual_seed(7)
    pop = make_population("mlp", OPTIMIZER_CASES["sgd"], "vmap", p=4)
    w = torch.rand(4, 7)
    w /= w.sum(dim=1, keepdim=True)
    sources = torch.randn(7, pop.state.shape[1])
    expected = w @ sources
    pop.mix_([w[:, :3].to_sparse_csr(), w[:, 3:].to_sparse_csr()], [sources[:3], sources[3:]])
    assert (pop.state - expected).abs().max() < TOL


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_mix_in_column_chunks_round_after_round_is_the_product(model: str) -> None:
    """Many source rows make CPU gossip go in column chunks (full ones through one output buffer kept between rounds,
    and a partial last one): each round's state is exactly the product, nothing of the round before left in it, and
    no column rounded otherwise than in one product over all columns (a narrow remainder, 4 of the logistic
    regression's 260 columns past a chunk of 256, joins the chunk before: alone it took another kernel on an Intel
    Xeon)."""
    torch.manual_seed(3)
    pop = make_population(model, OptimizerSpec(), p=4)
    m = 8192  # -> chunks of 256 columns; the MLP's 16,836 leave a partial chunk of 196
    for _ in range(3):
        dense = torch.rand(4, m) * (torch.rand(4, m) < 0.002)
        dense /= dense.sum(dim=1, keepdim=True).clamp_min(1e-12)
        w, sources = dense.to_sparse_csr(), torch.randn(m, pop.state.shape[1])
        pop.mix_(w, sources)
        assert pop._mix_chunk is not None and pop._mix_chunk.shape[1] == 256 < pop.state.shape[1]
        assert torch.equal(pop.state, torch.sparse.mm(w, sources))


@pytest.mark.parametrize("mix_elements", [None, 4096, DEVICE_MIX_ELEMENTS])
def test_mix_from_several_source_blocks_is_bit_for_bit_the_one_block_product(mix_elements: int | None) -> None:
    """Gossip from source blocks (other actors' half-steps) sums each row in the order of one block holding them all,
    in cache-sized chunks (a CPU's, ``mix_elements`` None) and in chunks that only bound memory (a GPU's: 4,096
    elements make 256 columns; the default, one chunk of every column). On a GPU it summed one product per block, so
    its numbers depended on how many actors shared it, and it held a second [P, D] state while it ran."""
    torch.manual_seed(5)
    m, cuts = 96, [0, 40, 41, 96]  # a block of one source among them
    dense = torch.rand(4, m) * (torch.rand(4, m) < 0.4) + torch.eye(4, m)
    dense /= dense.sum(dim=1, keepdim=True)
    one, blocks = make_population("mlp", OptimizerSpec(), p=4), make_population("mlp", OptimizerSpec(), p=4)
    one.mix_elements = blocks.mix_elements = mix_elements
    for _ in range(2):  # the second round through the buffers the first left
        sources = torch.randn(m, one.state.shape[1])
        one.mix_(dense.to_sparse_csr(), sources)
        blocks.mix_([dense[:, a:b].to_sparse_csr() for a, b in itertools.pairwise(cuts)],
                    [sources[a:b] for a, b in itertools.pairwise(cuts)])
        assert torch.equal(one.state, torch.sparse.mm(dense.to_sparse_csr(), sources))
        assert torch.equal(blocks.state, one.state)
    if mix_elements is None:  # a CPU's output buffer, kept between rounds
        assert one._mix_chunk is not None and one._mix_chunk.shape == (4, (1 << 20) // m)
    else:  # a device's chunks, as many as the bound makes
        assert one._mix_chunk is None and blocks._mix_sources.shape[1] == min(256 if mix_elements == 4096 else
                                                                             one.state.shape[1], one.state.shape[1])


def test_mix_with_identity_leaves_states_unchanged() -> None:
    torch.manual_seed(0)
    pop = make_population("mlp", OptimizerSpec())
    before = pop.state.clone()
    pop.mix_(torch.eye(P).to_sparse_csr(), pop.state)
    assert torch.equal(pop.state, before)


def test_consensus_is_a_fixed_point_of_row_stochastic_mixing() -> None:
    torch.manual_seed(0)
    pop = make_population("mlp", OptimizerSpec())
    pop.state.copy_(pop.state[0].expand_as(pop.state))
    w = torch.rand(P, P)
    w /= w.sum(dim=1, keepdim=True)
    pop.mix_(w.to_sparse_csr(), pop.state)
    assert (pop.state - pop.state[0]).abs().max() < TOL
    assert (pop.state[0] - pop.state[1]).abs().max() < TOL


# ------------------------------------------------------------------------------------- initial states

def test_same_init_is_one_model_determined_by_the_seed() -> None:
    model = build_model("mlp", SHAPE, CLASSES)
    a = initial_state(model, np.arange(5), seed=3, init="same")
    assert all(torch.equal(a[k], a[0]) for k in range(5))
    assert torch.equal(a, initial_state(build_model("mlp", SHAPE, CLASSES), np.arange(5), seed=3))
    assert not torch.equal(a[0], initial_state(model, np.arange(1), seed=4, init="same")[0])


def test_independent_init_depends_only_on_seed_and_participant() -> None:
    model = build_model("mlp", SHAPE, CLASSES)
    whole = initial_state(model, np.arange(6), seed=3, init="independent")
    part = initial_state(model, np.array([3, 4]), seed=3, init="independent")
    assert torch.equal(part, whole[[3, 4]])
    assert len({tuple(row[:5].tolist()) for row in whole}) == 6  # every participant draws its own
    other = initial_state(model, np.arange(6), seed=4, init="independent")
    assert not torch.equal(whole, other)


def test_initial_state_does_not_consume_the_global_rng() -> None:
    model = build_model("mlp", SHAPE, CLASSES)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    initial_state(model, np.arange(3), seed=1, init="independent")
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------------------------- layout

def test_layout_views_and_flatten_round_trip_and_share_storage() -> None:
    torch.manual_seed(0)
    layout = Layout([("w", torch.Size([3, 2])), ("b", torch.Size([3])), ("s", torch.Size([]))])
    assert layout.width == 6 + 3 + 1
    flat = torch.randn(P, layout.width)
    views = layout.views(flat)
    assert views["w"].shape == (P, 3, 2) and views["b"].shape == (P, 3) and views["s"].shape == (P,)
    assert torch.equal(layout.flatten(views), flat)
    views["w"][2, 1, 0] = 42.0
    assert flat[2, 1 * 2 + 0] == 42.0
    views["s"][1] = -7.0
    assert flat[1, -1] == -7.0


def test_layout_of_a_single_row() -> None:
    torch.manual_seed(0)
    layout = Layout([("w", torch.Size([3, 2])), ("b", torch.Size([3]))])
    row = torch.randn(layout.width)
    views = layout.views(row)
    assert views["w"].shape == (3, 2)
    assert torch.equal(layout.flatten(views), row)


def test_layout_of_a_single_row_with_a_scalar_entry() -> None:
    layout = Layout([("b", torch.Size([3])), ("temperature", torch.Size([]))])
    row = torch.arange(4.0)
    views = layout.views(row)
    assert views["temperature"].shape == () and views["temperature"] == 3.0
    assert torch.equal(layout.flatten(views), row)


def test_population_params_are_views_of_the_state() -> None:
    pop = make_population("mlp", OptimizerSpec())
    pop.params[0, 0] = 123.0
    assert pop.state[0, 0] == 123.0
    assert pop.param_layout.width == sum(p.numel() for p in pop.model.parameters())


# ---------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("lr", [0.0, -0.1, math.nan, math.inf])
def test_optimizer_spec_rejects_bad_learning_rates(lr: float) -> None:
    with pytest.raises(InputError, match="learning rate"):
        OptimizerSpec("sgd", lr=lr)


def test_bad_names_are_input_errors() -> None:
    with pytest.raises(InputError, match="rmsprop"):
        OptimizerSpec("rmsprop")
    model = build_model("logreg", SHAPE, CLASSES)
    with pytest.raises(InputError, match="orthogonal"):
        initial_state(model, np.arange(2), seed=0, init="orthogonal")
    with pytest.raises(InputError, match="jit"):
        Population(model, initial_state(model, np.arange(2), seed=0), OptimizerSpec(), vectorize="jit")


# --------------------------------------------------------------------------------- BatchNorm buffers

def test_batchnorm_buffers_are_kept_and_mixed() -> None:
    torch.manual_seed(0)
    pop = make_population("bn", OptimizerSpec())
    assert pop.buffer_layout.names == ["1.running_mean", "1.running_var"]  # num_batches_tracked is an int
    assert pop.buffers.shape == (P, 6)
    assert torch.equal(pop.buffers[:, 3:], torch.ones(P, 3))  # a fresh running_var
    pop.buffers.copy_(torch.randn(P, 6))
    w = torch.rand(P, P)
    w /= w.sum(dim=1, keepdim=True)
    expected = w @ pop.state
    pop.mix_(w.to_sparse_csr(), pop.state.clone())
    assert (pop.buffers - expected[:, pop.param_layout.width:]).abs().max() < TOL


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_half_step_with_batchnorm_updates_running_stats(vectorize: str) -> None:
    # Train mode: the step uses batch statistics and moves running_mean / running_var, as torch does.
    _, _, state, reference = run_both("bn", OPTIMIZER_CASES["momentum"], vectorize, steps=2)
    assert (state - reference).abs().max() < TOL


def test_half_step_with_batchnorm_under_vmap_gets_parameters_right() -> None:
    # Parameters and losses are exact under vmap too (running statistics: see the test above).
    pop_losses, ref_losses, state, reference = run_both("bn", OPTIMIZER_CASES["momentum"], "vmap", steps=2)
    width = sum(p.numel() for p in tiny_bn_net().parameters())
    assert (state[:, :width] - reference[:, :width]).abs().max() < TOL
    assert (pop_losses - ref_losses).abs().max() < TOL


def test_adam_step_has_a_finite_forward_derivative_where_every_gradient_was_zero() -> None:
    """Adam's √v̂ is 0 where all gradients were 0; the step's derivative there is finite (m̂ = 0 too), and
    torch.func.jvp through it (DICE-E's Jacobian) must not turn ∞ · 0 into NaN."""
    from torch.func import jvp

    from dice_ray.core.population import init_optimizer_state, optimizer_update_

    spec = OptimizerSpec("adam", lr=0.01)
    params = torch.randn(2, 5)
    g = torch.randn(2, 5)
    g[:, :2] = 0.0  # coordinates whose gradient is exactly 0 on this first step

    def step(grads: torch.Tensor) -> torch.Tensor:
        p, state = params.clone(), init_optimizer_state(spec, params)
        optimizer_update_(spec, p, grads, state)
        return p

    _, tangent = jvp(step, (g,), (torch.ones_like(g),))
    assert torch.isfinite(tangent).all()
    # first Adam step: p − lr g/(|g| + ε); its derivative at g = 0 is −lr/ε, elsewhere ≈ 0
    assert torch.allclose(tangent[:, :2], torch.full((2, 2), -spec.lr / spec.eps), rtol=1e-4)
    assert tangent[:, 2:].abs().max() < 1e-3



@pytest.mark.parametrize("model", ["mlp", "bn"])
@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_half_step_in_chunks_of_rows_equals_one_pass(model: str, opt: str) -> None:
    """A large block steps in chunks of participant rows (to bound its memory); every row's state, optimizer state
    and loss are bit for bit those of one pass over all rows (BatchNorm's running statistics included)."""
    spec = OptimizerSpec(opt, lr=0.05, momentum=0.9, weight_decay=1e-3)
    p = 11
    one, chunked = make_population(model, spec, p=p), make_population(model, spec, p=p)
    one.step_budget = 1 << 40  # one pass
    chunked.step_budget = 1  # the most passes: 3, of 3 or 4 rows (never fewer than MIN_PASS_ROWS)
    assert len(one.step_chunks()) == 1
    assert [s.stop - s.start for s in chunked.step_chunks()] == [4, 3, 4]
    chunked.step_budget = 6 * chunked.param_layout.width * chunked.state.element_size()
    assert [s.stop - s.start for s in chunked.step_chunks()] == [6, 5]  # near-equal slices of <= 6 rows
    assert_same_steps(one, chunked, p)
    # measured by the first step: what the MLP's pass holds is mostly gradients, so its passes run in turn; the
    # BatchNorm net's mostly activations, so its later passes ran side by side, one per torch thread
    activations_dominate = chunked.step_row_bytes >= SIDE_BY_SIDE_HOLDS * chunked.param_layout.width * 4
    assert activations_dominate == (model == "bn")
    assert chunked.step_workers() == (torch.get_num_threads() if model == "bn" else 1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_steps_side_by_side_on_threads_of_its_own() -> None:
    """A child forked after its parent stepped side by side has none of the parent's threads: it makes its own
    (sharing the parent's dead ones would hang it) and computes the parent's numbers."""
    spec = OptimizerSpec("sgd", lr=0.05)
    pop = make_population("bn", spec, p=8)
    pop.step_budget, pop.step_threads = 1, 2
    x, y = random_batch(8)
    pop.half_step(x, y)
    before = pop.state.clone()
    expected = pop.half_step(x, y)
    pop.state.copy_(before)
    child = multiprocessing.get_context("fork").Process(target=_step_and_check, args=(pop, x, y, expected))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0


def _step_and_check(pop: Population, x: torch.Tensor, y: torch.Tensor, expected: torch.Tensor) -> None:
    os._exit(0 if torch.equal(pop.half_step(x, y), expected) else 1)


def test_blocks_of_one_and_two_rows_step_as_rows_of_a_larger_pass() -> None:
    """A vmapped pass of fewer than MIN_PASS_ROWS rows would take other kernels (one row always; two rows for
    3-channel convolutions), so a block that small steps padded with copies of its last row: each participant's
    numbers are those it gets in a block of 12, however the participants are split into blocks (actors)."""
    model = build_model("cnn", (3, 12, 12), CLASSES)
    state = initial_state(model, np.arange(12), 0, "independent")
    spec = OptimizerSpec("momentum", lr=0.05, momentum=0.9)
    whole = Population(model, state.clone(), spec)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 8, 3, 12, 12, generator=gen), torch.randint(0, CLASSES, (12, 8), generator=gen)
    losses = whole.half_step(x, y)
    for rows in (slice(0, 1), slice(1, 3), slice(3, 6)):
        block = Population(model, state[rows].clone(), spec)
        assert torch.equal(block.half_step(x[rows], y[rows]), losses[rows])
        assert torch.equal(block.state, whole.state[rows])
        assert torch.equal(block.opt_state["momentum_buffer"], whole.opt_state["momentum_buffer"][rows])


def assert_same_steps(a: Population, b: Population, p: int, steps: int = 3) -> None:
    """Step ``a`` and ``b`` on the same random batches: losses, states and optimizer states equal bit for bit."""
    torch.manual_seed(0)
    for _ in range(steps):
        x, y = random_batch(p)
        assert torch.equal(a.half_step(x, y), b.half_step(x, y))
        assert torch.equal(a.state, b.state)
        for name in a.opt_state:
            assert torch.equal(a.opt_state[name], b.opt_state[name]), name


@pytest.mark.parametrize("model", ["mlp", "bn"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_passes_side_by_side_equal_passes_one_after_another(model: str, opt: str) -> None:
    """On the CPU the passes of a local step run side by side on threads, each pass on one thread, with model
    replicas that hold no tensors of their own: every row's state, optimizer state and loss are bit for bit those
    of the same passes one after another on all of torch's threads, and torch's thread count is left as it was."""
    spec = OptimizerSpec(opt, lr=0.05, weight_decay=1e-3)
    p = 11
    in_turn, side_by_side = make_population(model, spec, p=p), make_population(model, spec, p=p)
    for pop in (in_turn, side_by_side):
        pop.step_budget = 1  # 5 passes
    in_turn.step_threads, side_by_side.step_threads = 1, 3
    threads = torch.get_num_threads()
    assert_same_steps(in_turn, side_by_side, p)
    assert torch.get_num_threads() == threads
    assert len(side_by_side._replicas) == 3 and not in_turn._replicas
    assert all(t.is_meta for r in side_by_side._replicas for t in [*r.parameters(), *r.buffers()]
               if t.is_floating_point())
    x, y = random_batch(p)
    with pytest.raises(RuntimeError):  # a pass's error reaches the caller, and the thread count is put back
        side_by_side.half_step(x[:, :, :-1], y)
    assert torch.get_num_threads() == threads
