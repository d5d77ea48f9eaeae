"""The local step on a GPU as one CUDA graph: launched once per round instead of once per kernel.

A stacked local step is a few hundred small kernels (the vmapped forward and backward pass, the optimizer's foreach
update, the minibatch draw); at a few microseconds of host time each, the host, not the GPU, sets the round time of
small models. ``StepGraph`` runs the first round eagerly (on a side stream, which warms cuBLAS, cuDNN and autograd),
captures the step with the round number as a device tensor, and replays the capture in every later round. The
kernels are the same, so are the numbers. Everything the step reads or writes must stay at the same address: the
block updates its state, optimizer state and data in place, and never replaces them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from dice_ray.errors import first_line


class StepGraph:
    """``step(t)`` (a function of the round, an int or a 0-d int64 tensor on ``device``, returning the losses [P])
    replayed from one CUDA graph. If the capture fails (an operation the graph cannot hold), it says so once and
    steps eagerly from then on: same numbers, slower."""

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], device: torch.device):
        self.step = step
        self.device = device
        self.t = torch.zeros((), dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None  # the graph's output, overwritten by each replay
        self.failed: str | None = None

    @property
    def status(self) -> str:
        """"replayed" once captured, "failed: <why>" where the capture failed (eager steps), "not captured yet"."""
        return "replayed" if self.graph is not None else f"failed: {self.failed}" if self.failed else "not captured yet"

    def __call__(self, t: int) -> torch.Tensor:
        """Run the step of round t in place; return its losses [P] (a tensor of its own)."""
        if self.failed is not None:
            return self.step(t)
        self.t.fill_(t)
        if self.graph is not None:
            self.graph.replay()
            return self.loss.clone()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            loss = self.step(self.t)
        current.wait_stream(side)
        self._capture()
        return loss

    def _capture(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the eager step's cached blocks go back, for the graph's own memory pool
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the capture rejects what this thread does, not what others do meanwhile (Ray's tensor
            # transport receives another actor's half-step on a thread of its own, which a global capture would fail)
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.loss = self.step(self.t)
        except Exception as err:  # noqa: BLE001 - any operation the capture rejects: step eagerly instead
            self.failed = first_line(err, named=True)
            self.loss = None
            torch.cuda.synchronize(self.device)
            warnings.warn(f"the local step could not be captured as a CUDA graph ({self.failed}); it runs eagerly "
                          "(engine.cuda_graphs false says so without trying)", RuntimeWarning, stacklevel=3)
            return
        self.graph = graph
