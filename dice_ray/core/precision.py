"""Float32 arithmetic modes of the local step: ``engine.precision`` (pure torch, no Ray).

Each mode changes the arithmetic of the training run's local step (its forward and backward pass) and nothing else:
the state, the optimizer update, gossip, evaluation, DICE-GT's replays and every derivative the methods take stay
IEEE float32 (``set_precision`` turns TF32 off for the process; ``step_precision`` scopes the mode to a step).

- ``fp32`` (default): IEEE float32 everywhere; TF32 off for CUDA matrix products and cuDNN convolutions (PyTorch
  lets cuDNN use TF32 in convolutions by default: ~1e-3 relative differences from the CPU run). A GPU run then equals
  the CPU run to float32 rounding.
- ``tf32``: the local step's CUDA matrix products and convolutions may use TF32 tensor cores (10-bit mantissas). On
  a CPU this is ``fp32``.
- ``bf16``: the local step under ``torch.autocast`` to bfloat16 (8-bit mantissas).

Every method takes every mode (DICE-GT then replays the factual side in float32 too: ``ground_truth_cascade``).
Measured on the CPU (TF32 emulated), DICE-E agrees with DICE-GT inside a tf32 or bf16 run as in fp32 (the exact
readout 1.2-3.2x its fp32 error), and proximal influence and the ledger move by ~1% of their scale, rankings
unchanged; TF32 in the replays too would multiply DICE-E's hop-by-hop error by 5-126: hence the scope. Measured with
``bench/precision_on_cpu.py`` (docs/results/scaling.md, "Precision modes and the methods").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


def set_precision(precision: str) -> None:
    """Check ``precision`` (one of ``PRECISIONS``) and set this process's CUDA float32 modes to IEEE float32 (TF32
    off in matrix products and cuDNN convolutions): what every computation but a mode's local step uses."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    if hasattr(torch.backends, "fp32_precision"):
        # PyTorch >= 2.9 sets TF32 per backend and operator (``fp32_precision``: "ieee", "tf32", or "none": inherit
        # from the parent), and its older switches map onto that. Code that used the new settings (a user's module)
        # may have left TF32 on a parent, which the older switch's "off" ("none") would inherit: the parents first.
        torch.backends.fp32_precision = "ieee"
        torch.backends.cudnn.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    _set_tf32((False, False))


@contextlib.contextmanager
def step_precision(precision: str, device_type: str) -> Iterator[None]:
    """The arithmetic of one local step on a ``device_type`` device under ``precision``: bf16 autocasts to bfloat16;
    tf32 lets CUDA use TF32 until the step ends (a CUDA graph captured inside keeps TF32 kernels); fp32, and tf32
    off CUDA, change nothing. (TF32's switches are the process's: CPU steps, which may run on several threads at
    once, never touch them.)"""
    if precision == "bf16":
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32" and device_type == "cuda":
        try:
            before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        except RuntimeError:  # PyTorch's settings mixed by other code since set_precision: back to IEEE after
            before = (False, False)
        _set_tf32((True, True))
        try:
            yield
        finally:
            _set_tf32(before)
    else:
        yield


def _set_tf32(on: tuple[bool, bool]) -> None:
    """TF32 in CUDA matrix products and in cuDNN (convolutions and RNNs)."""
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = on
