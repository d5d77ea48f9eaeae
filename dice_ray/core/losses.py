"""Loss registry: what a participant minimizes, and what every influence measurement differentiates.

A ``Loss`` says, for a batch of model outputs and targets, the per-sample loss (the local step's objective
L(θ; z_k^t) and the z′ loss of DICE, proximal influence and the ledger are its means) and, optionally, whether
each prediction is correct (the ``*_acc`` columns; NaN where a loss has no notion of it). Built in:
``cross-entropy`` (classification, the default) and ``mse`` (regression: targets float [B] or [B, C]).

A user adds one like a model::

    import dice_ray

    @dice_ray.register_loss("log-cosh")
    class LogCosh(dice_ray.Loss):
        def per_sample(self, outputs, targets):
            error = outputs - targets.reshape(len(targets), -1)
            return (error + torch.nn.functional.softplus(-2 * error) - math.log(2.0)).mean(dim=1)

and selects it with ``model.loss: log-cosh`` (the module defining it listed in the run config's ``imports``).
What the run's methods need of a loss (a gradient in the outputs; float64; DICE-E's forward-over-reverse
derivatives, which a few fused kernels such as ``F.huber_loss``'s backward lack) is checked on two samples before
the run: the extend guide's "Add a data set or a loss" lists it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dice_ray.registry import Registry


class Loss:
    """The per-sample loss of model outputs [N, C] against targets [N] (or [N, C]), and optional correctness."""

    name = "loss"

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the loss of each of the N samples, [N] (differentiable in ``outputs``). Under ``engine.precision``
        bf16 the outputs are bfloat16: compare them with the targets in at least float32."""
        raise NotImplementedError

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Return 1.0 where a prediction is right, else 0.0, [N]; None if the task has no accuracy."""
        return None


class CrossEntropy(Loss):
    """Softmax cross-entropy of logits [N, C] against class labels [N] (int64); accuracy of the arg-max."""

    name = "cross-entropy"

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.argmax(-1) == targets).to(outputs.dtype)


class MeanSquaredError(Loss):
    """Squared error of outputs [N, C] against float targets [N] (C = 1) or [N, C], averaged over C."""

    name = "mse"

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # At least float32: under bf16 autocast the outputs are bfloat16, and rounding the targets to them would
        # move what is fitted, not only the arithmetic.
        dtype = torch.promote_types(outputs.dtype, torch.float32)
        outputs, targets = outputs.to(dtype), targets.to(dtype).reshape(outputs.shape[0], -1)
        if targets.shape[1] != outputs.shape[1]:  # they would broadcast: every output fitted to one target
            raise ValueError(f"targets of width {targets.shape[1]} for outputs of width {outputs.shape[1]}")
        return (outputs - targets).pow(2).mean(dim=-1)


LOSSES: Registry[Callable[[], Loss]] = Registry("loss", {"cross-entropy": CrossEntropy, "mse": MeanSquaredError})


def register_loss(name: str) -> Callable[[type[Loss]], type[Loss]]:
    """Return a class decorator registering a ``Loss`` subclass (constructed without arguments) as ``name``."""

    def decorator(cls: type[Loss]) -> type[Loss]:
        cls.name = name
        return LOSSES.add(name, cls)

    return decorator


def build_loss(name: str) -> Loss:
    """Return the ``Loss`` registered as ``name``; raise ``InputError`` for an unknown one."""
    return LOSSES.get(name)()


CROSS_ENTROPY = CrossEntropy()
