"""Max pooling of stacked participants as channels-last window indices and a gather (pure torch): ``model.pool``.

Under ``vmap`` over participants, PyTorch folds the participants into the batch of a 2-D max pooling, on the layout
the activations have: [P·B, C, H, W], channels first. On CPUs PyTorch's channels-first pooling kernel is slow: on
the project's CNN (28x28 inputs, batch 16, 2 cores) it read its 13 MB input at ~1.4 GB/s, 18x the time the
channels-last kernel took on the same tensor, and was a fifth of a CNN round (torch.profiler, N = 256).

``gather`` mode computes the same pooling in two parts:

- which element of each window is its maximum: PyTorch's channels-last kernel, the participants folded into the
  channels (``max_pool2d_indices``, an operator with its own ``vmap`` rule; indices are not differentiated);
- the pooled values: a ``gather`` of those elements, which every transform differentiates (reverse and forward
  mode, nested: in-loop DICE-E's derivatives go through it unchanged).

A forward pass that no derivative goes through (``Population.evaluate``: losses and accuracies, no graph) needs no
indices: within ``values_only`` a converted pooling without padding or ``ceil_mode`` takes the elementwise maximum of
its windows' strided views instead, in the activations' own layout (a maximum is exact in any order, so the values
are the same bit for bit). On the CNN's activations of one participant's evaluation on z′ (500 images; Intel Xeon,
one thread) that took 3.9 and 1.9 ms where the gather form took 14.4 and 4.1 ms; a whole evaluation of the CNN at
N = 256 took 0.78x [0.67, 0.91] its time (``bench/bench_evaluation.py``).

Both kernels take the first maximum of a window in scan order (a NaN counts as a maximum), so the values, the
indices and every derivative are PyTorch's own, bit for bit where windows do not overlap (overlapping windows
sum a shared element's gradients in another order), whatever the number of participants in a pass. ``auto`` uses
it on CPUs and keeps PyTorch's pooling on CUDA devices, where the channels-first kernel is not the bottleneck.
Measured with ``bench/bench_cnn_modes.py`` (the CNN at N = 256, 2 CPU cores, in one process): with step chunks sized
by activations, 0.91-0.97x the round time of PyTorch's pooling; with ``model.conv`` channels-last, whose activations
need no copy into that layout, 0.88x (both with a step's passes in turn).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

POOL_MODES = ("auto", "native", "gather")

class _ValuesOnly(threading.local):
    on = False  # this thread is within ``values_only``


_VALUES = _ValuesOnly()


@torch.library.custom_op("dice_ray::max_pool2d_indices", mutates_args=())
def max_pool2d_indices(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                       dilation: Sequence[int], ceil_mode: bool) -> torch.Tensor:
    """Flat (h·W + w) index of each window's maximum of x [N, C, H, W] or [C, H, W], as ``F.max_pool2d`` returns
    them, computed by the channels-last kernel (x is copied to that layout unless it has it)."""
    if x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return F.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)[1]


@max_pool2d_indices.register_fake
def _(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
      dilation: Sequence[int], ceil_mode: bool) -> torch.Tensor:
    return F.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)[1]


def _stacked_indices(info: object, in_dims: tuple, x: torch.Tensor, *args: object) -> tuple[torch.Tensor, int | None]:
    """``vmap`` rule: the participants (x's batched dimension) folded into the channels, [N, P·C, H, W], one call."""
    x = x.movedim(in_dims[0], -4)  # [..., P, C, H, W]: x is the operator's one tensor, so it is the batched one
    lead, (participants, channels) = x.shape[:-4], x.shape[-4:-2]
    indices = max_pool2d_indices(x.reshape(-1, participants * channels, *x.shape[-2:]), *args)
    return indices.reshape(*lead, participants, channels, *indices.shape[-2:]), len(lead)


torch.library.register_vmap(max_pool2d_indices, _stacked_indices)


def max_pool2d_by_gather(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                         dilation: Sequence[int], ceil_mode: bool) -> torch.Tensor:
    """``F.max_pool2d`` of x [N, C, H, W] or [C, H, W]: each window's maximum gathered at its index."""
    indices = max_pool2d_indices(x.detach(), kernel_size, stride, padding, dilation, ceil_mode)
    return x.flatten(-2).gather(-1, indices.flatten(-2)).view(indices.shape)


def max_pool2d_by_views(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                        dilation: Sequence[int]) -> torch.Tensor:
    """``F.max_pool2d`` of x [..., H, W] without padding or ``ceil_mode``, values only: the elementwise maximum of one
    strided view per window position (``torch.maximum`` keeps NaNs, as the pooling does)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    out_h = (x.shape[-2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[-1] - dw * (kw - 1) - 1) // sw + 1
    views = [x[..., i * dh: i * dh + sh * (out_h - 1) + 1: sh, j * dw: j * dw + sw * (out_w - 1) + 1: sw]
             for i in range(kh) for j in range(kw)]
    return functools.reduce(torch.maximum, views[1:], views[0]) if len(views) > 1 else views[0].clone()


@contextlib.contextmanager
def values_only() -> Iterator[None]:
    """Within it, on this thread and with gradients off, converted poolings compute their values alone
    (``max_pool2d_by_views``): for forward passes that no derivative goes through (``Population.evaluate``)."""
    before, _VALUES.on = _VALUES.on, True
    try:
        yield
    finally:
        _VALUES.on = before


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def _pool_forward(self: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    """``nn.MaxPool2d.forward`` as ``max_pool2d_by_gather``."""
    stride = self.stride if self.stride is not None else self.kernel_size
    if _VALUES.on and not torch.is_grad_enabled() and _pair(self.padding) == (0, 0) and not self.ceil_mode:
        return max_pool2d_by_views(x, _pair(self.kernel_size), _pair(stride), _pair(self.dilation))
    return max_pool2d_by_gather(x, _pair(self.kernel_size), _pair(stride), _pair(self.padding), _pair(self.dilation),
                                self.ceil_mode)


def convertible(module: nn.Module) -> bool:
    """Whether ``module`` is a 2-D max pooling the gather form computes: PyTorch's own ``nn.MaxPool2d`` (a subclass
    may compute otherwise), not returning its indices."""
    return type(module) is nn.MaxPool2d and not module.return_indices


def use_pool_mode(model: nn.Module, mode: str, device: torch.device | str) -> int:
    """Make ``model``'s 2-D max poolings compute as ``mode`` says (``auto``: the gather form on CPUs, PyTorch's
    pooling elsewhere); return how many now use the gather form."""
    if mode not in POOL_MODES:
        raise ValueError(f"pool mode {mode!r} is unknown; choose one of {', '.join(POOL_MODES)}")
    if mode == "native" or (mode == "auto" and torch.device(device).type != "cpu"):
        return 0
    converted = [m for m in model.modules() if convertible(m)]
    for module in converted:
        module.forward = types.MethodType(_pool_forward, module)
    return len(converted)
