"""Many participants' models stacked along a leading dimension, stepped at once (pure torch, no Ray).

Every participant k of a block has the same architecture, so its whole local state — parameters, then
BatchNorm-style buffers — is one row of a flat tensor ``state`` of shape [P, D] (D = parameters +
buffers). ``params`` and ``buffers`` are column views of it. This buys three things:

- the local step of concepts §1 (θ_k^{t+½} = O_k(θ_k^t, z_k^t)) for all P participants is one vectorized
  forward/backward (``torch.func``: functional_call inside vmap) and one in-place optimizer update on
  [P, D] tensors;
- gossip (θ_k^{t+1} = Σ_l W^t_kl θ_l^{t+½}) is one sparse-dense matrix product on rows of ``state``;
- the half-step parameters travel between Ray actors as one contiguous array.

Everything the influence code needs — Δ_k^t, losses and gradients on any data z′ — is computed here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dice_ray.core.convolution import stacked_input
from dice_ray.core.losses import CROSS_ENTROPY, Loss
from dice_ray.core.pooling import values_only
from dice_ray.core.precision import step_precision
from dice_ray.errors import InputError

OPTIMIZERS = ("sgd", "momentum", "adam")
# A local step holds at most this many bytes on the CPU at once (gradients, and the activations kept for the backward
# pass), in at most STEP_PASSES passes: large blocks step in chunks of rows, so the step does not hold another
# [P, D] copy of the state (its temporaries stay near max(32 MiB, 1/32 of the state)). 32 MiB is ~330 participants
# of the 17k-parameter MLP: smaller blocks step in one pass. Measured at N = 16,384 (MLP, SGD, 2 threads): one pass
# 1.28 s, 16 passes 0.88 s, 32 passes 0.74 s, 64 passes 0.85 s (a chunk's gradients stay in cache). The CNN's
# activations are ~15x its gradients (28x28 inputs, batch 16: ~6 MB a participant): 256 of them stepped in passes of
# 64 rows (gradients alone counted) took 1.3-1.6x the time of passes of 8-16 rows (2 cores, ``bench_stacked_conv``).
STEP_CHUNK_BYTES = 32 << 20
STEP_PASSES = 32
# A forward pass of ``Population.evaluate`` on the CPU takes as many participants as keep its largest layer output
# within this many bytes (all their samples at once). Evaluation on the shared z′ (500 images) is a far larger forward
# pass than a training round: the CNN's took 30-60x a round at N = 256 (2 cores) in groups of 64 participants (a
# 1.6 GB activation), and 0.36x [0.33, 0.42] that time in groups of 1 participant side by side, the same numbers bit
# for bit; the MLP's 0.94x in groups of 16 (``bench/bench_evaluation.py``).
EVAL_PASS_BYTES = 4 << 20
# ... and at most this many participants: a vmapped matrix product of thousands of participants on their own samples
# rounded some rows differently from the same rows in groups of 64 (the MLP's validation split at N = 16,384, groups of
# 2,341), so a row's numbers would depend on how many participants its block holds.
EVAL_GROUP_ROWS = 64
# On a GPU the chunks that keep CPU caches warm only multiply kernel launches (9 kernel sequences per step at N = 4,096
# on an H200): there a step takes one pass unless what it holds at once (gradients and activations, measured) would
# outgrow this fraction of the device's memory. Then a participant costs the device its state and optimizer state, plus
# its share of that fixed amount: ResNet-18 would otherwise hold ~6x its parameters per participant in one pass. Of
# the whole memory, not the free: what else holds memory at start-up (another actor sharing the GPU, a replay task)
# would otherwise change how a block is cut into passes, and a pass's kernels with it.
GPU_STEP_MEMORY_FRACTION = 1 / 8
STEP_MEMORY_MULTIPLE = 32  # a bound on a step's transient memory over its state, below which it is not measured
# What one participant's step holds (``Population._measure_step_row_bytes``), per model and minibatch shape, and its
# largest layer output on one sample (``Population._sample_bytes``), per model and sample shape.
_MEASURED_BYTES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


# On the CPU the passes of one local step can run side by side, as many at once as torch has threads, each on one
# thread (``Population._in_passes``), instead of one after another, each pass on all threads. That pays where
# a pass is mostly small per-participant kernels on activations: the CNN (a participant's pass holds 6.2x its
# gradients) at N = 256 on 2 cores took 0.86x [0.72, 1.01] the round time of its passes in turn (one such pass on
# 1 thread took 1.47x its time on 2). An MLP's pass is matrix products over all its rows, which threads share well
# (it holds 1.1-1.25x its gradients): 0.98x and 1.00x at N = 4,096 and 16,384, for 5% more peak memory at 16,384
# (each thread's allocations stay in its own heap arena), so its passes stay in turn. Measured with
# ``bench/bench_cnn_modes.py --against auto.in-turn``. A pass computes on one thread with the kernels a one-thread
# process uses, which give the numbers they give on more threads (the tests check it).
SIDE_BY_SIDE_HOLDS = 2.0
# A vmapped pass over fewer rows takes other kernels, whose numbers differ from the same rows' in a larger pass by
# rounding: one row always, two rows for 3-channel convolutions (the CNN on 3x32x32; on 1x28x28 two rows agree).
# Passes of at least this many rows agree bit for bit, so a run's numbers do not depend on how blocks are cut. That
# holds for the local step's passes, evaluation's on participants' own samples and DICE-E's derivatives of a set of
# rows (``functional_step``, the z′ Hessian forms), padded alike; evaluation on one shared batch agrees at any number
# of rows. Not for every BatchNorm model: vmap makes its normalization one over P × C channels, whose CPU kernels take
# a pass's last channels apart from the vectorized rest, and a BatchNorm1d after a Linear layer rounded some rows'
# parameters 1 ulp apart between cuts of 13 rows into passes of 3 and 5 (torch 2.14.1, one thread), so such a model's
# numbers depend on the cut to float32 rounding (the promise across actors; one cut, one actor, is still bit for bit).
MIN_PASS_ROWS = 3
# Layers whose output is a view of their input: no activation of their own (``Population._sample_bytes``).
VIEWS = (nn.Flatten, nn.Unflatten, nn.Identity)
# CPU gossip goes in column chunks (``Population.mix_``). A sparse product of fewer columns takes another kernel on
# some CPUs: on an Intel Xeon (AVX-512, torch 2.14.1 with MKL) a product of 4, 8, ..., 24 columns rounded its columns
# differently from the same columns in a wider product (wider ones, and other narrow widths, agreed bit for bit); on
# an AMD EPYC (AVX-512 kernels too) a chunk of 4 agreed, so the kernel choice depends on more than the instruction
# set. No chunk is narrower than this unless the state is: a remainder joins the chunk before.
MIN_MIX_COLUMNS = 64
# Gossip on another device (a GPU) goes in column chunks only to bound its memory: the output columns and, from several
# source blocks, their columns stacked, at most this many elements each (256 MiB in float32). One product over all
# columns held a second [P, D] state while it ran (~11 GB for ResNet-18 at N = 256).
DEVICE_MIX_ELEMENTS = 1 << 26


@functools.cache
def _step_executor(workers: int) -> ThreadPoolExecutor:
    """``workers`` threads that run passes of local steps side by side, shared by every population."""
    return ThreadPoolExecutor(workers, thread_name_prefix="dice-ray-step")


os.register_at_fork(after_in_child=_step_executor.cache_clear)  # a forked child has none of its parent's threads


def copy_model(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(model, memo)``, except for a tensor a module keeps as a plain attribute that its forward pass
    computes, which ``deepcopy`` refuses: one that is no graph leaf is copied detached, and for one a vmapped pass left
    behind (it has no storage) zeros of its shape stand in. The copy's forward pass computes its own. The old
    ``torch.nn.utils.weight_norm`` keeps such a ``weight``, recomputed from ``weight_g`` and ``weight_v``."""
    memo = {} if memo is None else memo
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and id(value) not in memo:
                if not value.is_leaf:
                    memo[id(value)] = value.detach().clone()
                elif not _has_storage(value):
                    memo[id(value)] = torch.zeros(value.shape, dtype=value.dtype, device=value.device)
    return copy.deepcopy(model, memo)


def _has_storage(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` has memory of its own (one a vmapped pass left behind has none)."""
    try:
        tensor.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return False
    return True


def _replica(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for ``functional_call`` on another thread, without copies of the tensors a population
    passes in (its parameters and floating-point buffers are meta tensors there, never read)."""
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
                            for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers() if b.is_floating_point()})
    return copy_model(model, memo)


def _own_version(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s memory, shape and strides as a new tensor with a version counter of its own (a ``detach``
    shares the original's: an in-place write to other rows of the same storage would count as a write to it)."""
    if tensor.numel() == 0:
        return tensor.detach()
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())


def _near_equal(n: int, most: int, least: int = 1) -> list[slice]:
    """Consecutive slices of range(n), their lengths differing by at most one: of at most ``most`` rows as far as
    slices of at least ``least`` rows allow (one slice if n < 2 ``least``)."""
    parts = max(1, min(-(-n // max(most, 1)), n // least))
    cuts = np.linspace(0, n, parts + 1).round().astype(int).tolist()
    return [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def pad_rows(t: torch.Tensor | None, extra: int) -> torch.Tensor | None:
    """``t`` with ``extra`` copies of its last row appended (rows that make up a pass of MIN_PASS_ROWS); None stays."""
    return torch.cat([t, t[-1:].expand(extra, *t.shape[1:])]) if extra and t is not None else t


def pad_batch(extra: int, x: torch.Tensor, y: torch.Tensor, sample_weights: torch.Tensor | None = None,
              shared_input: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A batch (x, y, ``sample_weights``) for a pass padded with ``extra`` rows (``pad_rows``): per-row tensors
    padded alike, one shared batch as it is."""
    if shared_input:
        return x, y, sample_weights
    return pad_rows(x, extra), pad_rows(y, extra), pad_rows(sample_weights, extra)


def default_step_budget(device: torch.device | str) -> int:
    """Bytes one pass of ``Population.half_step`` may hold on ``device`` (gradients and activations:
    ``Population.step_row_bytes``): ``STEP_CHUNK_BYTES`` on the CPU (cache-sized chunks are faster there),
    ``GPU_STEP_MEMORY_FRACTION`` of a CUDA device's memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * GPU_STEP_MEMORY_FRACTION)
    return STEP_CHUNK_BYTES


@dataclass(frozen=True)
class OptimizerSpec:
    """The local optimizer O_k shared by all participants, with torch.optim's semantics.

    ``sgd``: θ ← θ − η (g + λθ).  ``momentum``: torch.optim.SGD with ``momentum`` (and ``nesterov``).
    ``adam``: torch.optim.Adam (non-AMSGrad) with ``betas`` and ``eps``. λ is ``weight_decay``.
    """

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    @property
    def counts_steps(self) -> bool:
        """Whether the update reads the step counter (Adam's bias correction): then a skipped step changes every
        later one of its participant."""
        return self.name == "adam"

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise InputError(f"optimizer {self.name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"learning rate must be a positive number, got {self.lr}")


class Layout:
    """Where each named tensor of a module lives in a flat row: names, shapes and column offsets.

    Entries in ``transposed`` (2-D matrices) are stored as their transpose, so that a view has the strides
    of the gradient that vmapped backward passes produce for linear layers: the in-place optimizer update
    then walks both in the same order (measured: 3x faster at N = 256 than on mismatched strides).
    """

    def __init__(self, named: list[tuple[str, torch.Size]], transposed: set[str] | None = None):
        self.names = [n for n, _ in named]
        self.shapes = [tuple(s) for _, s in named]
        self.transposed = [n in (transposed or set()) and len(s) == 2 for n, s in named]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)]).tolist()
        self.width = int(self.offsets[-1])

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return name -> view of ``flat`` ([P, width] -> [P, *shape]; [width] -> [*shape])."""
        lead = flat.shape[:-1]
        out = {}
        for name, shape, t, a, b in zip(self.names, self.shapes, self.transposed, self.offsets[:-1],
                                        self.offsets[1:], strict=True):
            stored = shape[::-1] if t else shape
            view = flat[..., a:b].view(torch.Size([*lead, *stored]))
            out[name] = view.transpose(-1, -2) if t else view
        return out

    def flatten(self, tensors: dict[str, torch.Tensor], device: torch.device | str | None = None) -> torch.Tensor:
        """Return the [width] (or [P, width]) concatenation of ``tensors`` in layout order; an empty layout gives an
        empty [0] tensor on ``device`` (there is no tensor to take the device from: pass the one the caller uses)."""
        first = tensors[self.names[0]] if self.names else None
        lead = () if first is None else first.shape[: first.dim() - len(self.shapes[0])]
        parts = [(tensors[n].transpose(-1, -2) if t else tensors[n]).reshape(*lead, -1)
                 for n, t in zip(self.names, self.transposed, strict=True)]
        return torch.cat(parts, dim=-1) if parts else torch.zeros(*lead, 0, device=device)


@contextlib.contextmanager
def running_statistics_frozen(model: nn.Module) -> Iterator[None]:
    """Within: normalization layers that track running statistics (BatchNorm) normalize a training batch by its own
    statistics, as in training, without updating the running ones or their counter. The gradient is training's;
    nothing is written, as a pure function must not (torch.func's transforms refuse in-place updates of tensors
    they did not create)."""
    tracking = [m for m in model.modules()
                if getattr(m, "track_running_stats", False) and getattr(m, "num_batches_tracked", None) is not None]
    for module in tracking:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module in tracking:
            module.track_running_stats = True


def _remember_input(seen: dict[str, list[torch.Tensor]], name: str, module: nn.Module,
                    args: tuple[torch.Tensor, ...]) -> None:
    """A forward pre-hook that keeps each input of layer ``name``, in order, in ``seen``."""
    seen.setdefault(name, []).append(args[0])


def tracked_normalization(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of ``model`` whose running statistics a training step updates: BatchNorm (``running_mean``,
    ``running_var``), by name. Any other floating-point buffer is a constant of the local step."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _by_running_statistics(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm in eval mode in plain tensor operations: (x − r_mean) / √(r_var + ε) · weight + bias."""
    if module.training:
        return type(module).forward(module, x)
    shape = [1, -1] + [1] * (x.dim() - 2)
    out = (x - module.running_mean.view(shape)) / torch.sqrt(module.running_var.view(shape) + module.eps)
    if module.weight is not None:
        out = out * module.weight.view(shape) + module.bias.view(shape)
    return out


@contextlib.contextmanager
def differentiable_running_statistics(model: nn.Module) -> Iterator[None]:
    """Within: BatchNorm layers in eval mode normalize by their running statistics in plain tensor operations, which
    autograd and forward mode differentiate with respect to those statistics (torch's kernel refuses to): a z′ loss's
    derivatives over the whole state. The same values, to float rounding; outside, torch's kernel as always."""
    layers = [m for _, m in tracked_normalization(model)]
    for module in layers:
        module.forward = functools.partial(_by_running_statistics, module)
    try:
        yield
    finally:
        for module in layers:
            del module.forward


def state_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``model``'s tensors in a participant's state, by name: (the parameters the local step trains, the constants of
    the step). The constants are the floating-point buffers (BatchNorm's running statistics move with each training
    forward pass, ``Population.functional_state_step``) and the frozen parameters (``requires_grad`` False), which
    torch.optim would not step either; gossip mixes both like the parameters."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    constants = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    constants.update((n, b) for n, b in model.named_buffers() if b.is_floating_point())
    return params, constants


def model_state_layouts(model: nn.Module) -> tuple[Layout, Layout]:
    """Return the (parameter, buffer) layouts of ``model`` (``state_tensors``: the "buffers" are the step's constants,
    floating-point buffers and frozen parameters).

    Linear layers' weights are stored transposed (see ``Layout``).
    """
    linear = {f"{name}.weight" if name else "weight" for name, module in model.named_modules()
              if isinstance(module, nn.Linear)}
    params, constants = state_tensors(model)
    return (Layout([(n, p.shape) for n, p in params.items()], linear),
            Layout([(n, b.shape) for n, b in constants.items()]))


def initial_state(model: nn.Module, nodes: np.ndarray, seed: int, init: str = "same",
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Return the initial flat states [len(nodes), D] of participants ``nodes``, on ``device`` (default: the CPU).

    ``init="same"``: every participant starts from one model drawn from ``seed`` (consensus start, the
    usual D-SGD setting). ``"independent"``: participant k draws its own from (seed, k). Either way a
    participant's start depends only on (seed, k), never on how participants are grouped, nor on the device: the
    weights are always drawn by the CPU's generator on a CPU copy of ``model`` (a CUDA model would draw from
    CUDA's generator, and a GPU run would start from other weights than a CPU run; and ``model`` is left as it was).
    """
    model = copy_model(model).cpu()
    p_layout, b_layout = model_state_layouts(model)

    def draw(s: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        params, constants = state_tensors(model)
        return torch.cat([p_layout.flatten(params), b_layout.flatten(constants)]).detach().clone()

    if init == "same":
        return draw(seed).expand(len(nodes), -1).clone().to(device or "cpu")
    if init == "independent":
        seeds = [int(np.random.SeedSequence([seed, int(k)]).generate_state(1)[0]) for k in nodes]
        return torch.stack([draw(s) for s in seeds]).to(device or "cpu")
    raise InputError(f"init {init!r} is unknown; choose 'same' or 'independent'")


class Population:
    """P participants of one architecture: flat local states [P, D], optimizer state, vectorized step.

    Attributes:
        state: [P, D] float tensor, row k = (parameters, buffers) of participant k.
        params, buffers: column views of ``state`` ([P, D_params], [P, D_buffers]).
        opt_state: optimizer state, name -> [P, D_params] tensor (``step`` is [P]).
    """

    def __init__(self, model: nn.Module, state: torch.Tensor, optimizer: OptimizerSpec,
                 vectorize: str = "vmap", loss: Loss = CROSS_ENTROPY, step_budget: int | None = None,
                 precision: str = "fp32"):
        if vectorize not in ("auto", "vmap", "loop"):
            raise InputError(f"vectorize {vectorize!r} is unknown; choose 'auto', 'vmap' or 'loop'")
        # The training run's ``engine.precision``: its local step's forward and backward pass run under that mode
        # (``step_precision``: bf16 autocasts, tf32 lets CUDA use TF32); evaluation and every derivative the methods
        # take stay in the state's dtype, IEEE. The methods' own populations keep the default, fp32.
        self.precision = precision
        self.model = model
        self.loss = loss  # the per-sample loss (``losses.py``): local steps and every z′ measurement
        self.param_layout, self.buffer_layout = model_state_layouts(model)
        # The constants a training forward pass may write (buffers; frozen parameters it only reads)
        self._written_buffers = set(self.buffer_layout.names) & {n for n, _ in model.named_buffers()}
        self.state = state
        self.params = state[:, : self.param_layout.width]
        self.buffers = state[:, self.param_layout.width:]
        self.optimizer = optimizer
        self.vectorize = "vmap" if vectorize == "auto" else vectorize  # auto: vmap, the one form every device takes
        # Bytes one pass of ``half_step`` may hold (``step_chunks``); by default by the state's device.
        self.step_budget = default_step_budget(state.device) if step_budget is None else step_budget
        self.opt_state = init_optimizer_state(optimizer, self.params)
        self.step_row_bytes: int | None = None  # what one participant's step holds (measured by half_step)
        # CPU threads whose passes of ``half_step`` run side by side (None: ``step_workers`` decides; 1: in turn)
        self.step_threads: int | None = None
        self._replicas: list[nn.Module] = []  # the model, one copy per side-by-side pass (``_in_passes``)
        # Elements of a gossip chunk's columns (``mix_``): None on a CPU (chunks sized for its caches), a memory bound
        # on other devices
        self.mix_elements: int | None = None if state.device.type == "cpu" else DEVICE_MIX_ELEMENTS
        self._mix_chunk: torch.Tensor | None = None  # ``mix_``'s output columns, reused every round
        # ``mix_`` from several source blocks: (their weights, the weights side by side), and the buffer of their
        # sources' columns stacked
        self._mix_stacked: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None = None
        self._mix_sources: torch.Tensor | None = None
        # Per-tensor views of the parameters and optimizer buffers, for the optimizer's foreach update.
        self._param_views = list(self.param_layout.views(self.params).values())
        self._opt_views = {name: value if name == "step" else list(self.param_layout.views(value).values())
                           for name, value in self.opt_state.items()}

    @property
    def size(self) -> int:
        """P, the number of participants stacked here."""
        return self.state.shape[0]

    # -- losses and gradients -------------------------------------------------------------------

    def _logits(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor,
                shared_input: bool = False, model: nn.Module | None = None,
                moving: list[tuple[str, nn.Module]] | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Return logits [P, B, C]: stacked parameters and buffers (name -> [P, ...]) applied to each
        participant's own inputs x [P, B, ...] (or to one shared x [B, ...]), by ``model`` (default ``self.model``;
        another thread computes with a replica of its own: ``functional_call`` swaps a module's tensors while it
        runs). With ``moving``, ``model``'s normalization layers that track running statistics (a training-mode pass on
        the participants' own batches): (logits, the buffers [P, D_buffers] as this pass moves them,
        ``_moved_statistics``), from the one forward pass."""
        model = self.model if model is None else model
        moved = moving is not None
        layers = moving or []
        seen: dict[str, list[torch.Tensor]] = {}

        def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xb: torch.Tensor):
            seen.clear()
            logits = functional_call(model, {**p, **b}, (xb,))
            return (logits, self._moved_statistics(layers, seen, b)) if moved else logits

        hooks = [m.register_forward_pre_hook(functools.partial(_remember_input, seen, name)) for name, m in layers]
        try:
            if self.vectorize == "vmap":
                x = x if shared_input else stacked_input(model, x)
                return vmap(one, in_dims=(0, 0, None if shared_input else 0))(params, buffers, x)
            outs = [one({n: v[k] for n, v in params.items()}, {n: v[k] for n, v in buffers.items()},
                        x if shared_input else x[k])
                    for k in range(next(iter(params.values())).shape[0])]
        finally:
            for hook in hooks:
                hook.remove()
        return tuple(torch.stack(parts) for parts in zip(*outs, strict=True)) if moved else torch.stack(outs)

    def _moved_statistics(self, layers: list[tuple[str, nn.Module]], seen: dict[str, list[torch.Tensor]],
                          buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """One participant's buffers [D_buffers] after a training forward pass whose normalization ``layers`` saw
        the inputs ``seen`` (name -> its inputs, in order): BatchNorm's running statistics move toward each batch's,
        r ← (1 − m) r + m s(θ; x) (mean, and variance with Bessel's correction, over every dimension but the
        channels), once per call as torch's training pass moves them, as a pure function that forward mode
        differentiates (torch's own update is not differentiated). Other buffers stay as they are."""
        new = dict(buffers)
        for name, module in layers:
            m = module.momentum
            for inputs in seen.get(name, []):
                dims = [d for d in range(inputs.dim()) if d != 1]
                new[f"{name}.running_mean"] = (1 - m) * new[f"{name}.running_mean"] + m * inputs.mean(dim=dims)
                new[f"{name}.running_var"] = ((1 - m) * new[f"{name}.running_var"]
                                              + m * inputs.var(dim=dims, correction=1))
        return self.buffer_layout.flatten(new)

    def losses_of(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   shared_input: bool, buffers: dict[str, torch.Tensor] | None = None,
                   sample_weights: torch.Tensor | None = None, model: nn.Module | None = None,
                   moving: list[tuple[str, nn.Module]] | None = None):
        """Per-participant mean losses [P] of the architecture at ``params`` and ``buffers`` (name -> [P, ...] views
        of a state; ``buffers`` None: the current ones) on x [P, B, ...], y [P, B] (``shared_input``: x [B, ...],
        y [B] for all), weighted by ``sample_weights`` [P, B] if given; differentiable. With ``moving`` (train-mode
        layers whose running statistics the pass updates), (losses, the buffers the pass moved)."""
        buffers = self.buffer_layout.views(self.buffers) if buffers is None else buffers
        logits = self._logits(params, buffers, x, shared_input, model, moving)
        moved = moving is not None
        if moved:
            logits, moved_buffers = logits
        targets = y.expand(logits.shape[0], *y.shape) if shared_input else y
        per_sample = self.loss.per_sample(logits.flatten(0, 1), targets.flatten(0, 1)).view(logits.shape[0], -1)
        if sample_weights is None:
            losses = per_sample.mean(dim=1)
        else:
            w = sample_weights.to(per_sample.dtype)
            losses = (per_sample * w).sum(dim=1) / w.sum(dim=1)
        return (losses, moved_buffers) if moved else losses

    def losses(self, x: torch.Tensor, y: torch.Tensor, params: torch.Tensor | None = None,
               shared_input: bool = False) -> torch.Tensor:
        """Return the mean loss L(θ_k; z_k) (``self.loss``: cross-entropy by default) of each participant, [P]
        (differentiable).

        x: [P, B, ...] and y: [P, B] (each participant its own batch), or with ``shared_input`` x: [B, ...],
        y: [B] (one batch such as z′ for all). ``params`` [P, D_params] defaults to the current parameters.
        """
        params = self.params if params is None else params
        return self.losses_of(self.param_layout.views(params), x, y, shared_input)

    def loss_and_grad(self, x: torch.Tensor, y: torch.Tensor, shared_input: bool = False,
                      sample_weights: torch.Tensor | None = None,
                      of_state: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (L(θ_k; z_k) [P], ∇_θ L(θ_k; z_k) [P, D_params]) for every participant k.

        ``of_state`` (eval mode): the gradient over the whole state [P, D], the buffers' part too (an eval-mode
        loss reads BatchNorm's running statistics).
        ``sample_weights`` [P, B] (e.g. a padding mask) turns each mean into a weighted mean.
        Participants' losses are independent, so the gradient of their sum w.r.t. the stacked parameters
        is every participant's own gradient, row by row: one backward pass for all of them. The leaves
        are the per-tensor views (not the flat tensor), so backward writes each gradient once instead of
        scattering every slice into a zero [P, D] tensor (measured 3x faster than grad of the flat tensor).
        """
        with_buffers = of_state and self.buffer_layout.width > 0
        if with_buffers and self.model.training:
            raise ValueError("the gradient of the buffers is taken in eval mode (training's forward pass writes them)")
        per, grads = self._loss_and_grads(x, y, shared_input, sample_weights, with_buffers=with_buffers)
        names = self.param_layout.names
        flat = self.param_layout.flatten(dict(zip(names, grads[:len(names)], strict=True))) if names else \
            torch.zeros_like(self.params)
        if with_buffers:
            buffer_grads = dict(zip(self.buffer_layout.names, grads[len(names):], strict=True))
            flat = torch.cat([flat, self.buffer_layout.flatten(buffer_grads)], dim=1)
        return per, flat

    def pass_padding(self, rows: int) -> int:
        """How many copies of its last row a vmapped pass of ``rows`` participants takes, to compute with the kernels
        a pass of MIN_PASS_ROWS or more takes (see MIN_PASS_ROWS)."""
        return MIN_PASS_ROWS - rows if self.vectorize == "vmap" and 0 < rows < MIN_PASS_ROWS else 0

    def _loss_and_grads(self, x: torch.Tensor, y: torch.Tensor, shared_input: bool = False,
                        sample_weights: torch.Tensor | None = None,
                        rows: slice = slice(None), model: nn.Module | None = None, with_buffers: bool = False,
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``loss_and_grad`` with the gradient as a list of [P, *shape] tensors in layout order (of the
        participants ``rows`` only, with x and y theirs, if given), computed by ``model`` (see ``_logits``);
        ``with_buffers`` (eval mode): the buffers' gradients follow, in their layout's order."""
        params, buffer_rows = self.params[rows], self.buffers[rows]
        count = params.shape[0]
        extra = self.pass_padding(count)  # copies of the last row make up a pass of MIN_PASS_ROWS
        params, buffer_rows = pad_rows(params, extra), pad_rows(buffer_rows, extra)
        x, y, sample_weights = pad_batch(extra, x, y, sample_weights, shared_input)
        # The leaves and buffers are ``state``'s memory under a version counter of their own: while this pass runs,
        # another thread's pass may update other rows of ``state`` in place (``half_step``), which autograd would
        # otherwise take for a change of the tensors this backward pass saved.
        leaves = {n: v.requires_grad_() for n, v in self.param_layout.views(_own_version(params)).items()}
        # In train mode BatchNorm updates its running statistics in place. Under vmap that update is
        # silently lost on strided buffers (columns of ``state``), so the forward pass gets contiguous
        # copies, written back after the backward pass.
        updates_buffers = self.model.training and bool(self._written_buffers)  # a replica trains as the model
        buffers = {n: v.clone() if updates_buffers and n in self._written_buffers else v
                   for n, v in self.buffer_layout.views(_own_version(buffer_rows)).items()}
        if with_buffers:
            buffers = {n: v.requires_grad_() for n, v in buffers.items()}
        by_statistics = differentiable_running_statistics(model or self.model) if with_buffers else \
            contextlib.nullcontext()
        with torch.enable_grad(), by_statistics:
            per = self.losses_of(leaves, x, y, shared_input, buffers, sample_weights, model)
            wrt = [*leaves.values(), *(buffers.values() if with_buffers else ())]
            # a parameter or buffer the forward pass never reads has gradient 0 (autograd says None; torch.optim
            # would skip the parameter, which differs only by weight decay on it, which no loss reads)
            grads = torch.autograd.grad(per.sum(), wrt, allow_unused=True)
            grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, wrt, strict=True)]
        if updates_buffers:
            for name, view in self.buffer_layout.views(self.buffers[rows]).items():
                if name in self._written_buffers:
                    view.copy_(buffers[name][:count])
        return per.detach()[:count], [g[:count] for g in grads]

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, shared_input: bool = False,
                 sample_weights: torch.Tensor | None = None,
                 chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (loss [P], accuracy [P]) in eval mode.

        x: [P, B, ...], y: [P, B]; or with ``shared_input`` one batch x: [B, ...], y: [B] for all.
        ``sample_weights`` [P, B] (e.g. a padding mask) weights each sample; a row of zeros gives NaN.
        The forward passes take groups of participants, each group all its samples at once
        (``evaluation_passes``; ``chunk``: groups of that many); every participant's numbers are the same whichever
        group of 64 or fewer computes them.
        """
        samples = x.shape[0] if shared_input else x.shape[1]
        # Outputs written in place: small tensors kept between chunks' large temporaries fragment the heap
        # (measured: +2.9x the state's size retained at P = 16,384 when each chunk's result was kept).
        out_loss = torch.empty(self.size, dtype=self.state.dtype, device=self.state.device)
        out_acc = torch.empty_like(out_loss)

        def evaluate_rows(rows: slice, model: nn.Module) -> None:
            count = rows.stop - rows.start
            # On participants' own samples a group of 1-2 takes the kernels of larger ones padded, as a local step does;
            # on one shared batch it needs none (its first layer is one ungrouped product for any number).
            extra = 0 if shared_input else self.pass_padding(count)
            xs, ys = (x, y) if shared_input else (pad_rows(x[rows], extra), y[rows])
            with values_only():  # no derivative goes through these passes: poolings need no indices
                logits = self._logits(self.param_layout.views(pad_rows(self.params[rows], extra)),
                                      self.buffer_layout.views(pad_rows(self.buffers[rows], extra)), xs, shared_input,
                                      model)[:count]
            targets = ys.expand(count, *ys.shape) if shared_input else ys
            loss = self.loss.per_sample(logits.flatten(0, 1), targets.flatten(0, 1))
            correct = self.loss.correct(logits.flatten(0, 1), targets.flatten(0, 1))
            correct = (torch.full_like(loss, float("nan")) if correct is None else correct).view(count, -1)
            w = torch.ones_like(correct) if sample_weights is None else sample_weights[rows].to(loss.dtype)
            total = w.sum(dim=1)
            out_loss[rows] = (loss.view(count, -1) * w).sum(dim=1) / total
            out_acc[rows] = (correct * w).sum(dim=1) / total

        groups = self.evaluation_passes(x[:1] if shared_input else x[:1, 0], samples, chunk,
                                        least=1 if shared_input else MIN_PASS_ROWS)
        self._in_passes(groups, evaluate_rows, self.evaluation_workers(), training=False)
        return out_loss, out_acc

    def evaluation_passes(self, one: torch.Tensor, samples: int, chunk: int | None = None,
                          least: int = 1) -> list[slice]:
        """The groups of participant rows whose forward passes ``evaluate`` takes, given ``one`` sample [1, ...] of the
        ``samples`` each participant is evaluated on: near-equal groups of ``chunk`` participants at most, by default
        of as many as keep a pass's largest activation (the largest layer output of one participant on one sample,
        measured, times participants and samples) within ``evaluation_budget``, at most EVAL_GROUP_ROWS, but at least
        ``least``.

        A pass takes all of a participant's samples: a matrix product's rows can round differently with their place in
        the product's tiles, so a slice of the samples would change the numbers by float32 rounding."""
        if not self.size:
            return []
        if chunk is None:
            fit = self.evaluation_budget() // max(self._sample_bytes(one) * samples, 1) if samples else EVAL_GROUP_ROWS
            chunk = max(least, min(fit, EVAL_GROUP_ROWS))
        return _near_equal(self.size, chunk, least)

    def evaluation_workers(self) -> int:
        """How many passes of ``evaluate`` run at once, each on one thread: as many as ``step_workers`` (a model whose
        step is mostly activations evaluates side by side too)."""
        return self.step_workers()

    def evaluation_budget(self) -> int:
        """Bytes the largest activation of one forward pass of ``evaluate`` may hold: ``EVAL_PASS_BYTES`` on the CPU
        (outputs that stay in cache), a quarter of ``step_budget`` on a CUDA device."""
        return self.step_budget // 4 if self.state.is_cuda else EVAL_PASS_BYTES

    def _sample_bytes(self, one: torch.Tensor) -> int:
        """Bytes of the largest layer output of one participant's forward pass on the sample ``one`` [1, ...]:
        measured once per model and sample shape (forward hooks on every module)."""
        key = ("sample", self.state.device.type, tuple(one.shape[1:]), one.dtype, self.state.dtype)
        known = _MEASURED_BYTES.setdefault(self.model, {})
        if key not in known:
            sizes = [1]

            def record(module: nn.Module, inputs: Any, output: Any) -> None:
                if isinstance(module, VIEWS):  # a view of its input, which is counted (a 784-input MLP's Flatten
                    return  # made the held-out passes 2 participants, not 16: 0.62x evaluation measured at N = 256)
                if isinstance(output, torch.Tensor):  # of two samples: one's half
                    sizes.append(output.numel() * output.element_size() // 2)

            hooks = [m.register_forward_hook(record) for m in self.model.modules()]
            was_training = self.model.training
            try:
                self.model.eval()
                with torch.no_grad(), values_only():
                    # two copies of the sample: a layer that normalizes by the batch's own statistics (BatchNorm
                    # without running statistics) needs more than one value per channel
                    self._logits(self.param_layout.views(self.params[:1]), self.buffer_layout.views(self.buffers[:1]),
                                 one.expand(2, *one.shape[1:]), shared_input=True)
            finally:
                self.model.train(was_training)
                for hook in hooks:
                    hook.remove()
            known[key] = max(sizes)
        return known[key]

    # -- Algorithm 1 --------------------------------------------------------------------------------

    def step_workers(self) -> int:
        """How many passes of ``half_step`` run at once, each on one thread: on the CPU ``step_threads`` if set, else
        torch's thread count where a participant's pass holds at least ``SIDE_BY_SIDE_HOLDS`` times its gradients
        (``step_row_bytes``: activations dominate, as in convolutional networks); otherwise 1."""
        if not self.state.is_cpu:
            return 1
        if self.step_threads is not None:
            return max(1, self.step_threads)
        gradient_bytes = self.param_layout.width * self.state.element_size()
        return torch.get_num_threads() if (self.step_row_bytes or 0) >= SIDE_BY_SIDE_HOLDS * gradient_bytes else 1

    def step_chunks(self, budget: int | None = None, itemsize: int | None = None,
                    passes: int | None = STEP_PASSES) -> list[slice]:
        """Slices of participant rows in order, each as many as keep one [rows, D_params] tensor of ``itemsize``-byte
        elements (default: the state's) within ``budget`` bytes, but at most ``passes`` slices (None: no limit).
        With the defaults, the passes of ``half_step``: one slice, all of them, unless the state is large; the
        ``step_workers()`` passes that run at once share ``step_budget`` (and may be that many times as many)."""
        if budget is None:
            workers = self.step_workers()
            budget, passes = self.step_budget // workers, passes * workers if passes else None
        row_bytes = max(self.param_layout.width * (itemsize or self.state.element_size()), 1)
        if itemsize is None and self.step_row_bytes:
            row_bytes = max(row_bytes, self.step_row_bytes)
        size = max(1, budget // row_bytes, -(-self.size // passes) if passes else 1)
        # Near-equal slices of at least MIN_PASS_ROWS rows (a smaller block is one pass, padded: ``_loss_and_grads``).
        return _near_equal(self.size, size, MIN_PASS_ROWS)

    @torch.no_grad()
    def half_step(self, x: torch.Tensor | Callable[[slice], tuple[torch.Tensor, torch.Tensor]],
                  y: torch.Tensor | None = None, idle: torch.Tensor | None = None) -> torch.Tensor:
        """Local step θ_k^{t+½} = O_k(θ_k^t, z_k^t) for every k, in place; return the batch losses [P].

        x: [P, B, ...], y: [P, B]; or ``x`` a function of a slice of rows returning those rows' (x, y), and no ``y``.
        The loss is L(θ_k^t; z_k^t), measured before the step. Δ_k^t is ``state_after - state_before``.
        ``idle``: rows (an index tensor on the state's device) of participants with no data, which do not step: their
        state and optimizer state stay as they were and their loss is 0 (their batches are stand-ins, discarded).

        Participants' steps are independent, so large blocks step in chunks of rows (``step_chunks``): the
        gradients, activations (and, given a function, minibatches) alive at once are one chunk's, not another
        copy of the whole state, and each row's numbers are the same as in one pass.
        """
        batch = x if callable(x) else (lambda rows: (x[rows], y[rows]))
        if self.step_row_bytes is None and self.size >= MIN_PASS_ROWS and self.state.device.type in ("cpu", "cuda"):
            # Measured only where chunks may be needed: a step's transient memory is a small multiple of its state
            # (activations ~15x the parameters for a CNN at batch 16), so a small block (a replay's) steps in one pass.
            small = self.state.numel() * self.state.element_size() * STEP_MEMORY_MULTIPLE < self.step_budget
            self.step_row_bytes = 0 if small else self._measure_step_row_bytes(batch)
        losses = torch.empty(self.size, dtype=self.state.dtype, device=self.state.device)  # in place: see evaluate
        if idle is not None:
            kept = self.state[idle].clone(), {name: value[idle].clone() for name, value in self.opt_state.items()}
        chunks = self.step_chunks()
        self._in_passes(chunks, lambda rows, model: self._step_pass(rows, batch, losses, model),
                        self.step_workers(), self.model.training)
        if idle is not None:  # no data, no local step: θ^{t+½} = θ^t, optimizer state unchanged
            self.state[idle] = kept[0]
            for name, value in kept[1].items():
                self.opt_state[name][idle] = value
            losses.index_fill_(0, idle, 0.0)  # a scalar assignment would copy the 0 from the host: not in a CUDA graph
        return losses

    def _step_pass(self, rows: slice, batch: Callable[[slice], tuple[torch.Tensor, torch.Tensor]],
                   losses: torch.Tensor, model: nn.Module | None = None) -> None:
        """One pass of ``half_step``: the local step of participants ``rows`` in place, their losses into ``losses``."""
        with self._step_precision():
            loss, grads = self._loss_and_grads(*batch(rows), rows=rows, model=model)
        loss, grads = loss.to(self.state.dtype), [g.to(self.state.dtype) for g in grads]
        optimizer_update_(self.optimizer, [v[rows] for v in self._param_views], grads,
                          {name: value[rows] if name == "step" else [v[rows] for v in value]
                           for name, value in self._opt_views.items()})
        losses[rows] = loss

    def _in_passes(self, chunks: list[slice], work: Callable[[slice, nn.Module], None], workers: int,
                   training: bool) -> None:
        """Call ``work(rows, model)`` for every slice of ``chunks``, ``model`` in train mode or not (``training``): one
        after another on all threads with ``self.model``, or, with ``workers`` > 1, side by side on that many threads,
        each computing on one CPU thread with a replica of the model (``_logits``). The torch thread count and the
        model's mode are as they were afterwards."""
        workers = min(workers, len(chunks))
        if workers <= 1:
            was_training = self.model.training
            self.model.train(training)
            try:
                for rows in chunks:
                    work(rows, self.model)
            finally:
                self.model.train(was_training)
            return
        if len(self._replicas) < workers:
            self._replicas += [_replica(self.model) for _ in range(workers - len(self._replicas))]
        threads = torch.get_num_threads()

        @torch.no_grad()
        def run(w: int) -> None:
            torch.set_num_threads(1)  # this thread's own: OpenMP's and MKL's thread counts are per thread
            replica = self._replicas[w].train(training)
            for rows in chunks[w::workers]:
                work(rows, replica)

        try:
            list(_step_executor(workers).map(run, range(workers)))
        finally:
            torch.set_num_threads(threads)  # the count new threads start from, set to 1 by the workers

    def _step_precision(self) -> contextlib.AbstractContextManager:
        return step_precision(self.precision, self.state.device.type)

    def _measure_step_row_bytes(self, batch: Callable[[slice], tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Bytes one participant's step holds at once, from a forward and backward pass of MIN_PASS_ROWS, whose
        state is left as it was (BatchNorm's running statistics put back). On a CUDA device: the allocator's peak
        (gradients, activations kept for the backward pass, temporaries). On the CPU: the activations autograd keeps
        for the backward pass (each tensor once, the parameters' own views left out), plus the gradients."""
        device, rows = self.state.device, slice(0, MIN_PASS_ROWS)
        x, y = batch(rows)
        # The same for every population of this model on minibatches of this shape: measured once (DICE-GT's replays
        # step a fresh population per hop, a few rows each, on the run's model).
        key = (device.type, tuple(x.shape[1:]), x.dtype, self.state.dtype, self.precision)
        known = _MEASURED_BYTES.setdefault(self.model, {})
        if key in known:
            return known[key]
        kept = self.buffers[rows].clone()
        if device.type == "cuda":
            # one pass first, unmeasured: the first matrix product on a stream allocates cuBLAS's workspace (~32 MiB),
            # which a later pass does not, and which would count 3 rows as if each held a third of it
            with self._step_precision():
                self._loss_and_grads(x, y, rows=rows)
            self.buffers[rows] = kept
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            with self._step_precision():
                self._loss_and_grads(x, y, rows=rows)
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            saved: dict[tuple[int, int], int] = {}  # (address, elements) -> bytes: a tensor saved twice counts once

            def pack(tensor: torch.Tensor) -> torch.Tensor:
                if tensor.untyped_storage().data_ptr() != self.state.untyped_storage().data_ptr():
                    saved[tensor.data_ptr(), tensor.numel()] = tensor.numel() * tensor.element_size()
                return tensor

            with self._step_precision(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                _, grads = self._loss_and_grads(x, y, rows=rows)
            peak = sum(saved.values()) + sum(g.numel() * g.element_size() for g in grads)
        self.buffers[rows] = kept
        known[key] = max(int(peak) // MIN_PASS_ROWS, 1)
        return known[key]

    @torch.no_grad()
    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (as returned by ``init_optimizer_state``, rows for these P participants) in place."""
        for name, value in state.items():
            self.opt_state[name].copy_(value)

    def functional_step(self, params: torch.Tensor, opt_state: dict[str, torch.Tensor], x: torch.Tensor,
                        y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (θ', s') = O(θ, s; z) for stacked parameters ``params`` [P, D_params] and optimizer state
        ``opt_state``, leaving ``self`` untouched (buffers are read, not updated).

        The same optimizer update as ``half_step``, as a pure function: ``torch.func.jvp`` differentiates
        through it (the Jacobian J of concepts §4, for any optimizer).
        """
        new_params, new_opt, _ = self._functional_step(params, opt_state, x, y)
        return new_params, new_opt

    def functional_state_step(self, state: torch.Tensor, opt_state: dict[str, torch.Tensor], x: torch.Tensor,
                              y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``functional_step`` over the whole state [P, D]: the parameters stepped, and the running statistics updated
        as training's forward pass updates them (``_moved_statistics``), from that same forward pass (the parameters'
        step does not read them: it normalizes by the batch's statistics). The step's other constants (buffers, frozen
        parameters) are read from ``state`` too: a function of the whole state, along every direction of it."""
        width = self.param_layout.width
        layers = tracked_normalization(self.model)
        if not layers:
            params, opt, _ = self._functional_step(state[:, :width], opt_state, x, y, state[:, width:])
            return (torch.cat([params, state[:, width:]], dim=1) if self.buffer_layout.width else params), opt
        if any(m.momentum is None for _, m in layers):
            raise InputError("a BatchNorm layer with momentum=None (a cumulative average over the batches seen) has "
                             "no per-participant counter here: give it a momentum")
        was_training = self.model.training
        self.model.train()
        try:
            params, opt, buffers = self._functional_step(state[:, :width], opt_state, x, y, state[:, width:], layers)
        finally:
            self.model.train(was_training)
        return torch.cat([params, buffers], dim=1), opt

    def _functional_step(self, params: torch.Tensor, opt_state: dict[str, torch.Tensor], x: torch.Tensor,
                         y: torch.Tensor, buffers: torch.Tensor | None = None,
                         layers: list[tuple[str, nn.Module]] | None = None):
        """(θ', s', the buffers [P, D_buffers] its forward pass moved) for ``functional_step``, the forward pass
        reading the step's constants ``buffers`` [P, D_buffers] (None: ``self.buffers``); ``layers``: the
        normalization layers whose running statistics it moves (None: the third item is None)."""
        count = params.shape[0]
        extra = self.pass_padding(count)  # 1-2 rows step with the kernels of larger passes, as in ``half_step``
        params, (x, y, _) = pad_rows(params, extra), pad_batch(extra, x, y)
        buffers = self.buffer_layout.views(pad_rows(self.buffers if buffers is None else buffers, extra))

        def loss(p: torch.Tensor):
            losses = self.losses_of(self.param_layout.views(p), x, y, False, buffers, moving=layers)
            return (losses[0].sum(), losses[1]) if layers is not None else (losses.sum(), ())

        with running_statistics_frozen(self.model):
            g, moved_buffers = grad(loss, has_aux=True)(params)
        new_params = params.clone()
        new_state = {name: pad_rows(value, extra) if extra else value.clone() for name, value in opt_state.items()}
        optimizer_update_(self.optimizer, new_params, g, new_state)
        return (new_params[:count], {name: value[:count] for name, value in new_state.items()},
                None if layers is None else moved_buffers[:count])

    @torch.no_grad()
    def mix_(self, weights: torch.Tensor | list[torch.Tensor], sources: torch.Tensor | list[torch.Tensor]) -> None:
        """Gossip in place: state_k ← Σ_l W_kl θ_l^{t+½} (parameters and buffers alike).

        ``weights[b]`` [P, M_b] (sparse CSR or dense) are the rows of W^t for these participants restricted
        to the participants whose half-step states are ``sources[b]`` [M_b, D]; one pair or matching lists
        (one per source block: the blocks received from other actors are never concatenated whole).
        """
        pairs = list(zip(weights, sources, strict=True)) if isinstance(weights, list) else [(weights, sources)]

        # Mix in column chunks. On a CPU, chunks whose sources fit in cache (~4 MB): 3-4x faster than one product at
        # N = 256; at least 256 columns (at N = 16,384: 2x faster than 1,024, and a 16 MB chunk, not 64 MB). On a
        # GPU, chunks of ``mix_elements`` (one chunk, most often: the bound is memory, not cache). Each chunk reads
        # only its own columns, so a source may be ``state`` itself. Several source blocks (other actors'
        # half-steps) are stacked, a chunk of columns at a time, under their weights side by side: one product sums
        # each row's terms in one order, the order of one block holding them all, so a run's numbers do not depend
        # on how many actors hold its participants (a sum per block, then of the blocks, rounds otherwise).
        rows = sum(src.shape[0] for _, src in pairs)
        columns = self.state.shape[1]
        if self.mix_elements is None:
            width = max(256, (1 << 20) // max(rows, 1))
        else:
            width = min(columns, max(256, self.mix_elements // max(rows, self.size, 1)))
        weights = pairs[0][0] if len(pairs) == 1 else self._stacked_weights([w for w, _ in pairs])
        if self.mix_elements is None and (self._mix_chunk is None or self._mix_chunk.shape[1] != width):
            self._mix_chunk = self.state.new_empty(self.size, width)
        if len(pairs) > 1 and (self._mix_sources is None or self._mix_sources.shape != (rows, width)):
            self._mix_sources = self.state.new_empty(rows, width)
        starts = list(range(0, columns, width))
        if len(starts) > 1 and columns - starts[-1] < MIN_MIX_COLUMNS:
            starts.pop()  # the narrow remainder joins the last full chunk
        for a, b in zip(starts, [*starts[1:], columns], strict=True):
            if len(pairs) == 1:
                sources = pairs[0][1][:, a:b]
            else:
                sources = self._mix_sources if b - a == width else self.state.new_empty(rows, b - a)
                torch.cat([src[:, a:b] for _, src in pairs], out=sources)
            if self.mix_elements is None:  # into one reused buffer: a fresh chunk per product is zero-filled first
                chunk = self._mix_chunk if b - a == width else self.state.new_empty(self.size, b - a)
                torch.addmm(chunk, weights, sources, beta=0, out=chunk)
            else:  # a device's, out of place (a CSR product with out= has no kernel on PyTorch's meta device)
                chunk = torch.sparse.mm(weights, sources) if weights.is_sparse_csr else weights @ sources
            self.state[:, a:b] = chunk

    def _stacked_weights(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """``weights`` [P, M_b] side by side, [P, Σ M_b] (sparse CSR where they all are), kept while the same
        tensors come back (an engine converts W's rows once per topology)."""
        if self._mix_stacked is None or len(self._mix_stacked[0]) != len(weights) or \
                any(a is not b for a, b in zip(self._mix_stacked[0], weights, strict=True)):
            if all(w.is_sparse_csr for w in weights):
                stacked = torch.cat([w.to_sparse_coo() for w in weights], dim=1).coalesce().to_sparse_csr()
            else:
                stacked = torch.cat([w.to_dense() if w.is_sparse_csr else w for w in weights], dim=1)
            self._mix_stacked = tuple(weights), stacked
        return self._mix_stacked[1]


# -- optimizers on stacked parameters (one implementation: in place; clone first for a functional use) --


def init_optimizer_state(spec: OptimizerSpec, params: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return the zero optimizer state for stacked ``params`` [P, D]: name -> tensor."""
    state: dict[str, torch.Tensor] = {"step": torch.zeros(params.shape[0], dtype=params.dtype,
                                                          device=params.device)}
    if spec.name == "momentum":
        state["momentum_buffer"] = torch.zeros_like(params)
    elif spec.name == "adam":
        state["exp_avg"] = torch.zeros_like(params)
        state["exp_avg_sq"] = torch.zeros_like(params)
    return state


class _Sqrt(torch.autograd.Function):
    """√x whose derivative at x = 0 is taken as 0 instead of ∞.

    Adam's √v̂ is 0 exactly where every gradient so far was 0; there m̂ = 0 too, so the update m̂/(√v̂ + ε) has a
    finite derivative that does not involve d√v̂ at all. Computed as ∞ · 0 it would be NaN, and one NaN
    coordinate turns a whole DICE-E estimate (``torch.func.jvp`` through the step) into NaN.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.sqrt()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_forward(output)
        ctx.save_for_backward(output)

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor) -> torch.Tensor:
        (root,) = ctx.saved_tensors
        return torch.where(root > 0, x_t / (2 * root), torch.zeros_like(x_t))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (root,) = ctx.saved_tensors
        return torch.where(root > 0, grad / (2 * root), torch.zeros_like(grad))


def optimizer_update_(spec: OptimizerSpec, params: torch.Tensor | list[torch.Tensor],
                      grads: torch.Tensor | list[torch.Tensor],
                      state: dict[str, torch.Tensor | list[torch.Tensor]]) -> None:
    """Apply one step of ``spec`` in place to stacked parameters, row by row as torch.optim.SGD / Adam.

    ``params`` and ``grads`` are one [P, D] tensor or matching lists of [P, ...] tensors (per-tensor views
    of the flat state, which saves concatenating gradients); ``state`` holds ``step`` [P] and the
    optimizer's buffers, shaped like ``params`` (a tensor or a list of views). Updated in place.
    """
    ps, gs = (params, grads) if isinstance(params, list) else ([params], [grads])

    def buffers(name: str) -> list[torch.Tensor]:
        value = state[name]
        return value if isinstance(value, list) else [value]

    lr = spec.lr
    if spec.weight_decay:
        gs = torch._foreach_add(gs, ps, alpha=spec.weight_decay)
    step = state["step"].add_(1)
    if spec.name == "sgd":
        torch._foreach_add_(ps, gs, alpha=-lr)
    elif spec.name == "momentum":
        bufs = buffers("momentum_buffer")
        # torch.optim.SGD starts the buffer at the first gradient: buf is zero then, so m * buf + g = g.
        torch._foreach_mul_(bufs, spec.momentum)
        torch._foreach_add_(bufs, gs)
        update = torch._foreach_add(gs, bufs, alpha=spec.momentum) if spec.nesterov else bufs
        torch._foreach_add_(ps, update, alpha=-lr)
    else:
        beta1, beta2 = spec.betas
        exp_avg, exp_avg_sq = buffers("exp_avg"), buffers("exp_avg_sq")
        torch._foreach_lerp_(exp_avg, gs, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, gs, gs, value=1 - beta2)
        # Bias corrections per participant, in float64 as torch.optim computes them from a Python int.
        step64 = step.to(torch.float64)
        step_size = (lr / (1 - beta1**step64)).to(ps[0].dtype)
        bias2_sqrt = (1 - beta2**step64).sqrt().to(ps[0].dtype)
        for p, m1, m2 in zip(ps, exp_avg, exp_avg_sq, strict=True):
            shape = (-1,) + (1,) * (p.dim() - 1)
            denom = (_Sqrt.apply(m2) / bias2_sqrt.view(shape)).add_(spec.eps)
            p.addcdiv_(m1 * step_size.view(shape), denom, value=-1.0)
