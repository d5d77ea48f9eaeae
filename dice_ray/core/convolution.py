"""Convolutions of stacked participants: ``model.conv`` (pure torch, no Ray).

Under ``vmap`` over participants, PyTorch turns a convolution with per-participant weights into ONE grouped
convolution with P groups (participants folded into the channels: [B, P·C, H, W]), a shape cuDNN is slow at
(pytorch#70954, #73764). Two other forms compute the same convolution:

- ``unfold``: im2col (``F.unfold``) and a matrix product, which becomes one batched matrix product over participants.
  Measured with ``bench/bench_stacked_conv.py`` (the project's CNN, batch 16, TF32 off): on one H200 it took
  0.51-0.70x the grouped convolution's time at P = 256 and 4,096; on 2 CPU cores 1.1-2x.
- ``channels-last``: the grouped convolution, on a minibatch laid out [B, H, W, P, C] in memory (``stacked_input``):
  folded into the channels it is channels-last, so the CPU's convolution kernels run channels-last, their outputs
  stay so, and so does what follows (ReLU, ``model.pool``'s gather pooling, the next convolution) without a copy.
  Measured with ``bench/bench_cnn_modes.py`` (the CNN at N = 256, 28x28, 2 CPU cores, 30 rounds in one process):
  0.88x [0.85, 0.93] the round time of the native form with PyTorch's pooling, its passes in turn; with the
  passes side by side (``Population.step_workers``) it gains nothing over the native form. Not the default: on a
  CPU the kernels oneDNN picks for it depend on whether a pass holds an odd or even number of participants, so its
  numbers (not the native form's) move by float32 rounding with the way a block is cut into passes, which depends
  on the number of actors; a run's numbers must not.

``auto`` is ``unfold`` on CUDA devices and ``native`` elsewhere. Each form's numbers are the grouped convolution's
to float32 rounding (another summation order).
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

CONV_MODES = ("auto", "native", "unfold", "channels-last")
_CHANNELS_LAST = "_dice_ray_stacked_channels_last"  # set on a model whose stacked minibatches go channels-last


def _as_matmul(self: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``nn.Conv2d._conv_forward`` as im2col and a matrix product: x [B, C, H, W] -> [B, out, H', W']."""
    height, width = x.shape[-2:]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
    rows = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    cols = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [B, C·kh·kw, H'·W']
    out = (weight.flatten(1) @ patches).unflatten(-1, (rows, cols))
    return out if bias is None else out + bias[:, None, None]


def convertible(module: nn.Module) -> bool:
    """Whether ``module`` is a 2-D convolution the matrix-product form computes (ungrouped, zero or no padding given
    as numbers)."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def use_conv_mode(model: nn.Module, mode: str, device: torch.device) -> int:
    """Make ``model``'s convolutions compute as ``mode`` says (``auto``: the matrix-product form on CUDA devices,
    the native one elsewhere); return how many convolutions now use another form than the native one."""
    if mode not in CONV_MODES:
        raise ValueError(f"conv mode {mode!r} is unknown; choose one of {', '.join(CONV_MODES)}")
    if mode == "auto":
        mode = "unfold" if torch.device(device).type == "cuda" else "native"
    if mode == "channels-last":
        convolutions = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        setattr(model, _CHANNELS_LAST, convolutions > 0)
        return convolutions
    if mode == "native":
        return 0
    converted = [m for m in model.modules() if convertible(m)]
    for module in converted:
        module._conv_forward = types.MethodType(_as_matmul, module)
    return len(converted)


def stacked_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Stacked per-participant images x [P, B, C, H, W] laid out as ``model``'s convolutions want them: in memory
    [B, H, W, P, C] under ``channels-last`` (the same values, a copy), else x itself."""
    if x.dim() != 5 or not getattr(model, _CHANNELS_LAST, False):
        return x
    return x.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)
