"""Seconds per stacked local-step gradient of the registered CNN, nine ways (conv under vmap is a grouped conv).

``Population._loss_and_grads`` computes every participant's loss and gradient as ``vmap(functional_call(model,
params, x))`` over stacked parameters [P, ...] and per-participant inputs [P, B, C, H, W], then one
``torch.autograd.grad`` of the summed loss. vmap's batching rule turns a convolution whose weight differs per
participant into ONE grouped convolution with P groups, a shape that cuDNN and the CPU kernels handle poorly
(pytorch issues #70954, #73764). This script times that computation — forward and backward, producing every
participant's parameter gradients, nothing else (no optimizer update) — by these strategies:

    vmap             the project's own code: ``Population._loss_and_grads`` (the baseline);
    unfold           each convolution as im2col (``F.unfold``) plus ONE batched matmul over participants
                     (``torch.bmm``), in a functional re-implementation of the model's ``nn.Sequential`` that
                     takes the same stacked parameter views (batch folded into the image width, see
                     ``unfold_conv``);
    unfold.bcast     the same network, but im2col per image and one matmul per image with the participant's
                     weight broadcast over its batch (``unfold_conv_bcast``: P·B small products);
    channels_last    the vmap path with the inputs and the conv weights in channels_last memory format (their
                     conversion from the flat state's layout is timed too: a step starts from that layout);
    cudnn.benchmark  (CUDA only) the project's code with ``torch.backends.cudnn.benchmark = True``;
    gather           the project's code with ``model.pool`` gather (``dice_ray.core.pooling``: each window's maximum
                     found by PyTorch's channels-last kernel, participants folded into channels, then gathered): what
                     ``auto`` picks on CPUs;
    cl.gather        the same, with ``model.conv`` channels-last as well (the stacked minibatch laid out
                     [B, H, W, P, C], so the grouped convolutions and what follows run channels-last);
    loop             ``Population(vectorize="loop")._loss_and_grads``: a Python loop over participants, each a
                     plain ``functional_call``; one ``autograd.grad`` for all;
    compile          ``torch.compile`` of ``torch.func.grad_and_value`` of the vmapped summed loss (falls back to a
                     compiled forward with eager ``autograd.grad`` if dynamo rejects that); skipped, with the
                     reason printed, if compiling fails or takes over ``--compile-timeout`` s (default 120).

Workload: ``build_model("cnn", shape, 10)`` (two 3x3 conv-maxpool-ReLU blocks of 16 and 32 channels, a 64-unit
hidden layer) on 1x28x28 and 3x32x32 inputs, batch 16 per participant, cross-entropy (the project's
``CROSS_ENTROPY.per_sample``, mean per participant), float32. Participants start from one drawn model
(``initial_state``) plus independent noise (std 0.01), so every row differs; inputs are N(0, 1), labels uniform.
P = 64 and 256 on the CPU; 256 and 4096 on CUDA as well when ``torch.cuda.is_available()`` (TF32 is switched OFF
for matmuls and cuDNN, so every strategy computes in true float32).

Each strategy runs ``--warmup`` untimed calls (compile: after a first call that compiles, timed separately; a warm
inductor cache in /tmp/torchinductor_$USER shortens it), then ``--repeats`` timed calls (fewer, but at least 3,
when one call takes over 2 s; ``torch.cuda.synchronize`` around each on CUDA); the table shows the median. "× vmap"
is that time over vmap's (< 1: faster).

Checks against vmap, per participant: "max rel Δ loss" is max |L − L_vmap| / |L_vmap|; "max rel Δ grad" is the max
over parameter tensors and participants of max |g − g_vmap| / max |g_vmap| within that participant's tensor (0:
bitwise equal). Another float32 summation order gives ~1e-7 … 1e-5; above ``TOLERANCE`` (1e-4) a row is flagged
and not counted as fastest. Max pooling makes the gradient piecewise, though: where a pooling window's two largest
values are within float32 rounding of each other, two correct computations can pick different maxima, and that
participant's conv gradients then differ by ~1% (seen: one participant in 256 on the CPU). So each participant
above ``TOLERANCE`` is recomputed in float64 (``compare_grads``); if its forward pass has such a near tie and one
of the two sides matches float64, it is counted under "max-pool tie flips" (with the side that picked the other
maximum) instead of in "max rel Δ grad". The JSON keeps every such participant's numbers.

CPU timings need a quiet machine: when other processes keep the CPUs busy at the start (over 25%), the CPU part runs
on 1 torch thread unless ``--threads`` says otherwise — with all cores shared, OpenMP threads spend most of each op
waiting for each other (seen on 2 cores: one CNN step 6 ms on 1 thread, 280 ms on 2). The header prints the
thread count and the load.

Run::

    python bench/bench_stacked_conv.py --quick        # CPU P = 64 only, 3 repeats (~1 min on 2 cores, 1 thread)
    python bench/bench_stacked_conv.py                # CPU P = 64 256, 5 repeats (~8 min on 2 cores, 1 thread)
    python bench/bench_stacked_conv.py --devices cuda --json conv.json   # CUDA P = 256 4096 (~5 min on one H200)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from _tables import print_markdown
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from dice_ray.core.losses import CROSS_ENTROPY
from dice_ray.core.models import build_model, use_layer_modes
from dice_ray.core.population import OptimizerSpec, Population, initial_state

MODEL, CLASSES, BATCH, SEED, NOISE = "cnn", 10, 16, 0, 0.01
SHAPES: tuple[tuple[int, int, int], ...] = ((1, 28, 28), (3, 32, 32))
PARTICIPANTS = {"cpu": (64, 256), "cuda": (256, 4096)}
STRATEGIES = ("vmap", "unfold", "unfold.bcast", "channels_last", "gather", "cl.gather", "cudnn.benchmark", "loop",
              "compile")
TOLERANCE = 1e-4
TIE_GAP = 1e-6  # max-pool windows whose top two values are closer than this (relative) count as near ties
MAX_CHECKED = 32  # participants above TOLERANCE recomputed in float64 per strategy (the rest count as differences)
BUSY_SHARE = 0.25  # above this CPU busy share at the start (other processes), CPU runs use 1 torch thread
SLOW_CALL_S = 2.0  # a call slower than this gets max(3, repeats * SLOW_CALL_S / its time) timed calls, not more

Grads = list[torch.Tensor]
StepFn = Callable[[], tuple[torch.Tensor, Grads]]


# -- the workload ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One (device, input shape, P): the model, its stacked parameters (a ``Population``) and one minibatch each."""

    device: torch.device
    shape: tuple[int, int, int]
    participants: int
    model: nn.Sequential
    population: Population
    x: torch.Tensor  # [P, B, C, H, W]
    y: torch.Tensor  # [P, B]

    def leaves(self) -> dict[str, torch.Tensor]:
        """Per-tensor views of the stacked parameters as fresh autograd leaves, as ``_loss_and_grads`` makes them."""
        views = self.population.param_layout.views(self.population.params)
        return {name: view.detach().requires_grad_() for name, view in views.items()}

    def per_participant(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of each participant, [P], from logits [P, B, classes]."""
        return CROSS_ENTROPY.per_sample(logits.flatten(0, 1), self.y.flatten()).view(self.participants, -1).mean(1)


def make_case(device: torch.device, shape: tuple[int, int, int], participants: int) -> Case:
    """Return the workload for ``participants`` CNNs on ``shape`` inputs on ``device`` (deterministic in SEED)."""
    model = build_model(MODEL, shape, CLASSES)
    assert isinstance(model, nn.Sequential), f"the {MODEL!r} model is expected to be an nn.Sequential"
    one = initial_state(model, np.arange(1), SEED, "same")  # [1, D], drawn on the CPU
    gen = torch.Generator().manual_seed(SEED + participants)
    state = one.expand(participants, -1).clone()
    width = sum(p.numel() for p in model.parameters())
    state[:, :width] += NOISE * torch.randn(participants, width, generator=gen)
    x = torch.randn(participants, BATCH, *shape, generator=gen)
    y = torch.randint(0, CLASSES, (participants, BATCH), generator=gen)
    model = model.to(device)
    population = Population(model, state.to(device), OptimizerSpec(), vectorize="vmap")
    return Case(device, shape, participants, model, population, x.to(device), y.to(device))


# -- strategies --------------------------------------------------------------------------------------------------


def unfold_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d) -> torch.Tensor:
    """``conv`` with stacked weights [P, O, C, kh, kw] (bias [P, O]) on stacked inputs x [P, B, C, H, W], as im2col
    plus one ``torch.bmm`` over participants; returns [P, B, O, H', W'].

    The B images of a participant are padded and laid side by side along the width ([P, C, H+2p, B·(W+2p)]), so
    one ``F.unfold`` gives the columns of all of them as one [P, C·kh·kw, H'·(B·(W+2p)−kw+1)] matrix per
    participant, already in the layout ``bmm`` needs forward and backward (no copy of the columns). The windows that
    straddle two images are computed too and dropped afterwards (kw − 1 of every W + 2p output columns).
    """
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise NotImplementedError(f"unfold_conv handles zero-padded, ungrouped convolutions, not {conv}")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    if sw != 1:
        raise NotImplementedError("unfold_conv folds the batch into the width: horizontal stride 1 only")
    participants, batch, channels, height, width = x.shape
    padded_w = width + 2 * pw
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = padded_w - dw * (kw - 1)  # valid outputs per image
    wide = nn.functional.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1, 4)  # [P, C, H+2p, B, W+2p]
    wide = wide.reshape(participants, channels, height + 2 * ph, batch * padded_w)
    cols = nn.functional.unfold(wide, (kh, kw), dilation=(dh, dw), stride=(sh, 1))  # [P, K, H' · L]
    out = torch.bmm(weight.flatten(2), cols)  # [P, O, H' · (B · (W+2p) − dw (kw−1))]
    out = nn.functional.pad(out.unflatten(2, (out_h, -1)), (0, padded_w - out_w))  # [P, O, H', B · (W+2p)]
    out = out.unflatten(3, (batch, padded_w))[..., :out_w].permute(0, 3, 1, 2, 4)  # [P, B, O, H', W']
    return out if bias is None else out + bias[:, None, :, None, None]


def unfold_conv_bcast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      conv: nn.Conv2d) -> torch.Tensor:
    """``conv`` as ``unfold_conv`` computes it, but im2col per image ([P·B, C·kh·kw, H'·W']) and one matmul per image
    with the participant's weight broadcast over its B images ([P, 1, O, K] @ [P, B, K, L]); the weight gradient is
    then a sum over B of per-image products. Many small products instead of P large ones."""
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise NotImplementedError(f"unfold_conv_bcast handles zero-padded, ungrouped convolutions, not {conv}")
    participants, batch, _, height, width = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = nn.functional.unfold(x.flatten(0, 1), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    out = weight.flatten(2).unsqueeze(1) @ cols.unflatten(0, (participants, batch))  # [P, B, O, H'·W']
    out = out.unflatten(3, (out_h, out_w))
    return out if bias is None else out + bias[:, None, :, None, None]


ConvFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, nn.Conv2d], torch.Tensor]


def unfold_forward(model: nn.Sequential, params: dict[str, torch.Tensor], x: torch.Tensor,
                   conv: ConvFn = unfold_conv) -> torch.Tensor:
    """Logits [P, B, classes] of ``model``'s architecture with stacked ``params`` (name -> [P, ...], the names of
    ``model.named_parameters()``) on x [P, B, ...]: convolutions by ``conv`` (``unfold_conv`` or
    ``unfold_conv_bcast``), linear layers by one ``torch.baddbmm``, parameter-free layers on the flattened [P·B, ...]
    batch."""
    participants, batch = x.shape[:2]
    h = x
    for name, layer in model.named_children():
        bias = params.get(f"{name}.bias")
        if isinstance(layer, nn.Conv2d):
            h = conv(h, params[f"{name}.weight"], bias, layer)
        elif isinstance(layer, nn.Linear):
            weight_t = params[f"{name}.weight"].transpose(1, 2)  # [P, in, out]
            h = torch.bmm(h, weight_t) if bias is None else torch.baddbmm(bias.unsqueeze(1), h, weight_t)
        elif isinstance(layer, (nn.ReLU, nn.MaxPool2d, nn.Flatten)):
            h = layer(h.flatten(0, 1)).unflatten(0, (participants, batch))
        else:
            raise NotImplementedError(f"unfold_forward has no rule for layer {name}: {layer}")
    return h


def unfold_step(case: Case, conv: ConvFn = unfold_conv) -> StepFn:
    """The ``unfold`` strategies: the functional im2col network, one ``autograd.grad`` of the summed loss."""

    def step() -> tuple[torch.Tensor, Grads]:
        leaves = case.leaves()
        with torch.enable_grad():
            per = case.per_participant(unfold_forward(case.model, leaves, case.x, conv))
            grads = torch.autograd.grad(per.sum(), list(leaves.values()))
        return per.detach(), list(grads)

    return step


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """A copy of stacked [..., C, H, W] ``t`` whose every [C, H, W] slice has channels_last strides (C fastest)."""
    lead = t.dim() - 3
    order = (*range(lead), lead + 1, lead + 2, lead)  # [..., H, W, C]
    return t.permute(order).contiguous().permute(*range(lead), t.dim() - 1, lead, lead + 1)


def vmap_losses(case: Case, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Per-participant losses [P] by ``functional_call`` under vmap, as ``Population._logits`` computes them."""
    logits = vmap(lambda p, xb: functional_call(case.model, p, (xb,)))(params, x)
    return case.per_participant(logits)


def channels_last_step(case: Case) -> StepFn:
    """The ``channels_last`` strategy: vmap with channels_last inputs and conv weights (converted inside the step,
    differentiably, so the gradients come back in the flat state's layout)."""
    convs = {f"{name}.weight" for name, layer in case.model.named_children() if isinstance(layer, nn.Conv2d)}

    def step() -> tuple[torch.Tensor, Grads]:
        leaves = case.leaves()
        with torch.enable_grad():
            params = {n: to_channels_last(v) if n in convs else v for n, v in leaves.items()}
            per = vmap_losses(case, params, to_channels_last(case.x))
            grads = torch.autograd.grad(per.sum(), list(leaves.values()))
        return per.detach(), list(grads)

    return step


@contextlib.contextmanager
def cudnn_benchmark() -> Iterator[None]:
    """``torch.backends.cudnn.benchmark = True`` inside, restored after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def modes_step(case: Case, conv: str, pool: str) -> StepFn:
    """The project's own ``_loss_and_grads`` on a copy of the model whose layers compute as ``model.conv`` ``conv``
    and ``model.pool`` ``pool`` say (the same stacked parameters)."""
    model = copy.deepcopy(case.model)
    use_layer_modes(model, conv, pool, case.device)
    pop = Population(model, case.population.state, case.population.optimizer)
    return lambda: pop._loss_and_grads(case.x, case.y)


def population_step(case: Case, vectorize: str) -> StepFn:
    """The project's own ``_loss_and_grads`` with ``vectorize`` "vmap" (the baseline) or "loop"."""
    pop = case.population
    if vectorize != pop.vectorize:
        pop = Population(case.model, pop.state, pop.optimizer, vectorize=vectorize)
    return lambda: pop._loss_and_grads(case.x, case.y)


class CompileTimeout(Exception):
    """Compilation ran past its deadline."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise ``CompileTimeout`` in this (main) thread once ``seconds`` have passed (SIGALRM)."""

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise CompileTimeout(f"compilation took over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def caused_by_timeout(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a ``CompileTimeout`` or wraps one (dynamo re-raises backend errors as its own)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, CompileTimeout):
            return True
        seen.add(id(exc))
        inner = getattr(exc, "inner_exception", None)
        exc = inner if isinstance(inner, BaseException) else (exc.__cause__ or exc.__context__)
    return False


def compile_step(case: Case, timeout_s: float) -> tuple[StepFn, dict[str, Any]]:
    """The ``compile`` strategy, compiled and run once here (within ``timeout_s``); returns (step, info).

    First choice: ``torch.compile(grad_and_value(summed vmapped loss))``, forward and backward in one graph. If that
    fails (not on a timeout), a compiled vmapped forward with an eager ``autograd.grad`` (AOTAutograd compiles the
    backward). Raises ``CompileTimeout`` if the first call (the compilation) takes over ``timeout_s`` (SIGALRM
    interrupts it where it can; a compilation that outlasts it anyway is discarded), or an error if neither works."""
    torch._dynamo.reset()
    names = case.population.param_layout.names

    def summed(params: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per = vmap_losses(case, params, x)
        return per.sum(), per

    fused = torch.compile(grad_and_value(summed, has_aux=True), dynamic=False)

    def step_fused() -> tuple[torch.Tensor, Grads]:
        grads, (_, per) = fused(case.leaves(), case.x)
        return per.detach(), [grads[n] for n in names]

    forward = torch.compile(lambda params, x: vmap_losses(case, params, x), dynamic=False)

    def step_forward() -> tuple[torch.Tensor, Grads]:
        leaves = case.leaves()
        with torch.enable_grad():
            per = forward(leaves, case.x)
            grads = torch.autograd.grad(per.sum(), list(leaves.values()))
        return per.detach(), list(grads)

    errors = []
    for mode, step in (("grad_and_value", step_fused), ("forward + eager autograd.grad", step_forward)):
        start = time.perf_counter()
        try:
            with deadline(timeout_s):
                step()
                synchronize(case.device)
        except Exception as exc:  # dynamo / inductor errors are of many types, and they wrap CompileTimeout
            torch._dynamo.reset()
            if caused_by_timeout(exc):
                raise CompileTimeout(f"compilation took over {timeout_s:.0f} s") from exc
            errors.append(f"{mode}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}")
            continue
        seconds = time.perf_counter() - start
        if seconds > timeout_s:  # the alarm can land in code that catches it and carries on
            torch._dynamo.reset()
            raise CompileTimeout(f"compilation took {seconds:.0f} s, over {timeout_s:.0f} s")
        return step, {"compile_mode": mode, "compile_s": seconds, "compile_errors": errors}
    raise RuntimeError("; ".join(errors))


# -- timing and checking -----------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: StepFn, device: torch.device, warmup: int, repeats: int) -> tuple[list[float], Any]:
    """Run ``step`` ``warmup`` times, then time it ``repeats`` times (fewer, at least 3, if one call takes over
    ``SLOW_CALL_S``); return (seconds of each timed call, the last call's result)."""
    result = None
    first_s = 0.0
    for i in range(warmup):
        start = time.perf_counter()
        result = step()
        synchronize(device)
        if i == warmup - 1:
            first_s = time.perf_counter() - start
    del result
    if first_s > SLOW_CALL_S:
        repeats = min(repeats, max(3, math.ceil(repeats * SLOW_CALL_S / first_s)))
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds, result


def row_rel_diff(got: Grads, want: Grads) -> torch.Tensor:
    """[P] on the CPU: for each participant, the max over parameter tensors of max |got − want| / max |want| within
    that participant's tensor."""
    worst = torch.zeros(want[0].shape[0], dtype=torch.float64, device=want[0].device)
    for g, w in zip(got, want, strict=True):
        g2, w2 = g.detach().reshape(g.shape[0], -1), w.reshape(w.shape[0], -1)
        scale = w2.abs().amax(1).clamp_min(torch.finfo(w2.dtype).tiny)
        worst = torch.maximum(worst, ((g2 - w2).abs().amax(1) / scale).double())
    return worst.cpu()


def float64_reference(case: Case, k: int) -> tuple[Grads, float]:
    """Participant ``k``'s loss gradient in float64 on the CPU (the plain module, its own batch), and the smallest gap
    between the two largest values of any max-pool window whose largest value is positive (so gradient flows),
    relative to the largest |value| entering that pooling layer: how close the pass came to a max-pool tie."""
    model = copy.deepcopy(case.model).cpu().double()
    gaps: list[float] = []

    def pool_gap(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        assert isinstance(module, nn.MaxPool2d)
        h = inputs[0].detach()
        windows = nn.functional.unfold(h, module.kernel_size, module.dilation, module.padding, module.stride)
        top2 = windows.unflatten(1, (h.shape[1], -1)).topk(2, dim=2).values  # [B, C, 2, windows]
        gap = (top2[:, :, 0] - top2[:, :, 1])[top2[:, :, 0] > 0]
        if gap.numel():
            gaps.append(float(gap.min() / h.abs().max()))

    for module in model.modules():
        if isinstance(module, nn.MaxPool2d):
            module.register_forward_pre_hook(pool_gap)
    names = case.population.param_layout.names
    views = case.population.param_layout.views(case.population.params[k])
    params = {n: views[n].detach().cpu().double().requires_grad_() for n in names}
    with torch.enable_grad():
        logits = functional_call(model, params, (case.x[k].cpu().double(),))
        loss = CROSS_ENTROPY.per_sample(logits, case.y[k].cpu()).mean()
        grads = torch.autograd.grad(loss, [params[n] for n in names])
    return list(grads), min(gaps, default=math.inf)


def compare_grads(case: Case, strategy: str, got: Grads, want: Grads) -> dict[str, Any]:
    """Compare a strategy's gradients ``got`` with vmap's ``want``, participant by participant.

    Max pooling makes the gradient piecewise: where two values of a pooling window are within float32 rounding of
    each other, two correct float32 computations (other summation orders) may pick different maxima and send that
    window's gradient to different pixels — a participant's conv gradients then differ by ~1%. Among millions of
    windows this happens for a few participants. Every participant above ``TOLERANCE`` (up to ``MAX_CHECKED``) is
    recomputed in float64: if its pass has a near tie (``float64_reference``'s gap below ``TIE_GAP``) and one of
    the two matches float64 within ``TOLERANCE``, it is counted as a tie flip (and which side picked the other
    maximum), not as a difference; ``grad_rel_diff`` is the max over the other participants."""
    rel = row_rel_diff(got, want)
    flips: dict[str, list[int]] = {"vmap": [], strategy: []}
    checked = []
    for k in (rel > TOLERANCE).nonzero().flatten().tolist()[:MAX_CHECKED]:
        ref, gap = float64_reference(case, k)
        err_got = float(row_rel_diff([g[k : k + 1].cpu().double() for g in got], [r[None] for r in ref])[0])
        err_want = float(row_rel_diff([w[k : k + 1].cpu().double() for w in want], [r[None] for r in ref])[0])
        checked.append({"participant": k, "rel_diff": float(rel[k]), "pool_gap": gap, "strategy_vs_float64": err_got,
                        "vmap_vs_float64": err_want})
        if gap < TIE_GAP and min(err_got, err_want) <= TOLERANCE:
            flips["vmap" if err_want > err_got else strategy].append(k)
            rel[k] = 0.0
    return {"grad_rel_diff": float(rel.max()), "grad_rel_diff_all": float(row_rel_diff(got, want).max()),
            "tie_flips": {side: rows for side, rows in flips.items() if rows}, "checked_in_float64": checked}


def cpu_busy_share(interval_s: float = 0.5) -> float:
    """The machine's CPU busy share (0..1) over ``interval_s`` seconds, from /proc/stat (NaN where unreadable)."""

    def busy_idle() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, idle

    try:
        b0, i0 = busy_idle()
        time.sleep(interval_s)
        b1, i1 = busy_idle()
    except (OSError, ValueError, IndexError):
        return math.nan
    return (b1 - b0) / max(b1 - b0 + i1 - i0, 1)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"


# -- one case ----------------------------------------------------------------------------------------------------


def run_case(case: Case, args: argparse.Namespace, compile_state: dict[str, str]) -> list[dict[str, Any]]:
    """Time every strategy that applies on ``case``; return one result dict per strategy (vmap first)."""
    dev = case.device.type
    label = f"{dev} {'x'.join(map(str, case.shape))} P={case.participants}"
    rows: list[dict[str, Any]] = []
    baseline: tuple[torch.Tensor, Grads] | None = None
    base_s = math.nan
    for strategy in args.strategies:
        if strategy == "cudnn.benchmark" and dev != "cuda":
            continue
        row: dict[str, Any] = {"device": dev, "shape": list(case.shape), "participants": case.participants,
                               "strategy": strategy}
        rows.append(row)
        info: dict[str, Any] = {}
        context: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        warmup = args.warmup
        try:
            if strategy == "vmap":
                step = population_step(case, "vmap")
            elif strategy == "unfold":
                step = unfold_step(case)
            elif strategy == "unfold.bcast":
                step = unfold_step(case, unfold_conv_bcast)
            elif strategy == "channels_last":
                step = channels_last_step(case)
            elif strategy in ("gather", "cl.gather"):
                step = modes_step(case, "channels-last" if strategy == "cl.gather" else "native", "gather")
            elif strategy == "cudnn.benchmark":
                step, context, warmup = population_step(case, "vmap"), cudnn_benchmark(), max(warmup, 2)
            elif strategy == "loop":
                step = population_step(case, "loop")
            else:
                if dev in compile_state:
                    raise RuntimeError(f"skipped: {compile_state[dev]}")
                try:
                    step, info = compile_step(case, args.compile_timeout)
                except Exception as exc:
                    what = "timed out" if isinstance(exc, CompileTimeout) else "failed"
                    compile_state[dev] = f"compile {what} earlier on {label} (not tried again on {dev})"
                    raise RuntimeError(f"skipped: {type(exc).__name__}: {exc}") from exc
            with context:
                seconds, result = time_step(step, case.device, warmup, args.repeats)
        except RuntimeError as exc:  # includes CUDA out-of-memory
            row["skipped"] = str(exc).splitlines()[0][:300]
            print(f"  {label:<22} {strategy:<16} {row['skipped']}", flush=True)
            torch._dynamo.reset()
            if case.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        per, grads = result
        if strategy == "vmap":
            baseline, base_s = (per, grads), statistics.median(seconds)
        assert baseline is not None, "vmap must run first: it is the reference"
        row.update(info, seconds=seconds, median_s=statistics.median(seconds),
                   ratio=statistics.median(seconds) / base_s, **compare_grads(case, strategy, grads, baseline[1]),
                   loss_rel_diff=float(((per - baseline[0]).abs() / baseline[0].abs()).max()))
        row["ok"] = row["grad_rel_diff"] <= TOLERANCE and row["loss_rel_diff"] <= TOLERANCE
        extra = f", compiled in {info['compile_s']:.1f} s ({info['compile_mode']})" if info else ""
        print(f"  {label:<22} {strategy:<16} {row['median_s']:.4f} s (x{row['ratio']:.2f} vmap, {len(seconds)} "
              f"calls), rel diff grad {row['grad_rel_diff']:.1e} ({flips_text(row['tie_flips'])}) loss "
              f"{row['loss_rel_diff']:.1e}{extra}", flush=True)
        del per, grads, result
    if case.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def flips_text(flips: dict[str, list[int]]) -> str:
    """"no tie flips", or e.g. "2 tie flips: vmap 1, loop 1" (which side picked the other max-pool maximum)."""
    count = sum(len(v) for v in flips.values())
    if not count:
        return "no tie flips"
    return f"{count} tie flip{'s' if count > 1 else ''}: " + ", ".join(f"{k} {len(v)}" for k, v in flips.items())


# -- report ------------------------------------------------------------------------------------------------------


def report(rows: list[dict[str, Any]]) -> list[str]:
    """Print one Markdown table per (device, shape) and the fastest strategy per (device, shape, P); return the
    fastest-strategy phrases."""
    fastest = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["device"], "x".join(map(str, r["shape"]))), []).append(r)
    for (dev, shape), group in groups.items():
        print(f"\n### {dev}, {shape} inputs, batch {BATCH} per participant: seconds per gradient of all P\n")
        header = ["P", "strategy", "median s", "× vmap", "max rel Δ grad", "max-pool tie flips", "max rel Δ loss",
                  "note"]
        table = []
        for r in group:
            if "skipped" in r:
                table.append([str(r["participants"]), r["strategy"], "–", "–", "–", "–", "–", r["skipped"]])
                continue
            note = "" if r["ok"] else f"ABOVE {TOLERANCE:g}"
            if "compile_s" in r:
                note = (note + "; " if note else "") + f"compile {r['compile_s']:.0f} s ({r['compile_mode']})"
            flips = ", ".join(f"{len(v)} ({side} off)" for side, v in r["tie_flips"].items()) or "0"
            table.append([str(r["participants"]), r["strategy"], f"{r['median_s']:.4f}", f"{r['ratio']:.2f}",
                          f"{r['grad_rel_diff']:.1e}", flips, f"{r['loss_rel_diff']:.1e}", note])
        print_markdown(header, table)
        for p in dict.fromkeys(r["participants"] for r in group):
            timed = [r for r in group if r["participants"] == p and "median_s" in r and r["ok"]]
            if timed:
                best = min(timed, key=lambda r: r["median_s"])
                fastest.append(f"{dev} {shape} P={p}: {best['strategy']} ({best['median_s']:.4f} s, "
                               f"{1 / best['ratio']:.1f}x vmap's speed)")
    print("\nFastest (within tolerance): " + "; ".join(fastest))
    return fastest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU P = 64 only (CUDA P = 256 only), 3 repeats")
    parser.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), default=None,
                        help="devices to run on (default: cpu, and cuda when available)")
    parser.add_argument("--participants", type=int, nargs="+", default=None,
                        help="P values on every device (default: cpu 64 256, cuda 256 4096)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES),
                        help="strategies to time (vmap always runs first: it is the reference)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per strategy (default 5; quick 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    parser.add_argument("--compile-timeout", type=float, default=120.0, help="seconds allowed to torch.compile")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice; 1 on a machine that is busy otherwise)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.strategies = ["vmap", *(s for s in args.strategies if s != "vmap")]
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices cuda: no CUDA device is available")
    busy = cpu_busy_share()
    if args.threads:
        torch.set_num_threads(args.threads)
    elif "cpu" in devices and busy > BUSY_SHARE and torch.get_num_threads() > 1:
        # With every core shared, OpenMP threads spend the run waiting for each other at each op's barrier (seen
        # here: one CNN step 6 ms on 1 thread, 280 ms on 2 while another process kept one core busy).
        print(f"the CPUs are {busy:.0%} busy before the start: using 1 torch thread (--threads to override)")
        torch.set_num_threads(1)
    # True float32 everywhere: TF32 (10-bit mantissas) would make the GPU strategies differ by ~1e-3.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; devices: "
          + ", ".join(describe_device(torch.device(d)) for d in devices)
          + f"; model {MODEL!r}, batch {BATCH}, float32, TF32 off; warm-up {args.warmup}, repeats {args.repeats}",
          flush=True)
    print(f"load average (1 min) {os.getloadavg()[0]:.2f}, CPU busy share before the start {busy:.0%}", flush=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    compile_state: dict[str, str] = {}

    def write_json(fastest: list[str] | None) -> None:
        """Write everything so far to ``--json`` (after each case too: a run cut short keeps what it measured)."""
        if args.json:
            args.json.write_text(json.dumps({
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "torch": torch.__version__, "devices": {d: describe_device(torch.device(d)) for d in devices},
                "tf32": False, "torch_threads": torch.get_num_threads(), "cpu_busy_share_at_start": busy,
                "batch": BATCH, "model": MODEL, "tolerance": TOLERANCE, "wall_s": time.perf_counter() - start,
                "complete": fastest is not None, "results": rows, "fastest": fastest}, indent=1))

    for dev in devices:
        sizes = args.participants or (PARTICIPANTS[dev][:1] if args.quick else PARTICIPANTS[dev])
        for shape in SHAPES:
            for p in sizes:
                case = make_case(torch.device(dev), shape, p)
                rows += run_case(case, args, compile_state)
                del case
                write_json(None)
    fastest = report(rows)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    write_json(fastest)

if __name__ == "__main__":
    main()
