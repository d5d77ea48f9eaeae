"""Convolutions of stacked participants as matrix products (pure torch, no Ray): ``model.conv``.

Under ``vmap`` over participants, PyTorch turns a convolution with per-participant weights into ONE grouped
convolution with P groups, a shape cuDNN is slow at (pytorch#70954, #73764). The same convolution as im2col
(``F.unfold``) and a matrix product becomes one batched matrix product over participants instead. Measured with
``bench/bench_stacked_conv.py`` (the project's CNN, batch 16, TF32 off): on one H200 the matrix-product form took
0.51-0.70x the grouped convolution's time at P = 256 and 4,096; on 2 CPU cores it took 1.1-2x, so ``auto`` uses it
on CUDA devices only. The numbers are the same convolution's to float32 rounding (another summation order).
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

CONV_MODES = ("auto", "native", "unfold")


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
    PyTorch's convolution elsewhere); return how many convolutions now use the matrix-product form."""
    if mode not in CONV_MODES:
        raise ValueError(f"conv mode {mode!r} is unknown; choose one of {', '.join(CONV_MODES)}")
    if mode == "native" or (mode == "auto" and torch.device(device).type != "cuda"):
        return 0
    converted = [m for m in model.modules() if convertible(m)]
    for module in converted:
        module._conv_forward = types.MethodType(_as_matmul, module)
    return len(converted)
