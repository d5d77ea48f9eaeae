"""Float32 arithmetic modes of the local step: ``engine.precision`` (pure torch, no Ray).

- ``fp32`` (default): IEEE float32 everywhere; TF32 is turned off for CUDA matrix products and cuDNN convolutions
  (PyTorch lets cuDNN use TF32 in convolutions by default: ~1e-3 relative differences from the CPU run). A GPU run
  then equals the CPU run to float32 rounding.
- ``tf32``: CUDA matrix products and convolutions may use TF32 tensor cores (10-bit mantissas); the state,
  optimizer and gossip stay float32. On a CPU this is ``fp32``. Refused with DICE (influence): DICE-GT is the
  difference of two nearby runs' losses, which TF32's rounding moves by about DICE-E's own error. Proximal influence
  and the ledger are computed with TF32 too; it moves them by ~1% of their scale, their rankings unchanged.
  Measured by emulating TF32 on the CPU (``bench/tf32_on_cpu.py``; docs/results/scaling.md, "TF32 and the
  methods").
- ``bf16``: the local step's forward and backward pass run under ``torch.autocast`` to bfloat16 (8-bit mantissas);
  the state, optimizer update, gossip, evaluation and every derivative the methods take stay float32. Refused
  with the methods whose numbers are derivatives or differences of nearby runs (DICE, the ledger, proximal
  influence): their values are ~1e-3 of the losses, below bfloat16's resolution of 2^-8 = 0.4%.
"""

from __future__ import annotations

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


def set_precision(precision: str) -> torch.dtype | None:
    """Set this process's CUDA float32 modes for ``precision`` (one of ``PRECISIONS``); return the dtype the local
    step autocasts to (bfloat16 for ``bf16``, else None)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    tf32 = precision == "tf32"  # (bf16 autocasts the local step only: the rest stays IEEE float32)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return torch.bfloat16 if precision == "bf16" else None
