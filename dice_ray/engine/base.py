"""The ``Engine`` protocol: what the round loop (``loop.py``) and the front ends need of an engine.

Both engines implement it: ``LocalEngine`` (one process) and ``RayEngine`` (participant-group actors). An
engine places participant blocks and advances rounds; it calls the round hooks it was given at their fixed
points (``dice_ray.hooks``) and knows no method by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np

from dice_ray.engine.metrics import RoundMetrics, RoundPlan


class Engine(Protocol):
    """Advances synchronous rounds of Algorithm 1 over participant blocks."""

    blocks: list[np.ndarray]  # the participants (global ids, ascending) of each block, in block order

    def run_rounds(self, schedule: Iterable[RoundPlan]) -> Iterator[RoundMetrics]:
        """Run the rounds of ``schedule`` in order; yield each round's metrics (with the hooks' records)."""
        ...

    def set_mixing_matrix(self, w: Any) -> None:
        """Use ``w`` [N, N] as W^t for every later round (collaborator selection)."""
        ...

    def restore(self, snapshot: dict[str, np.ndarray] | None, timeout_s: float = ...) -> None:
        """Bring every block (and its hooks) to ``snapshot`` (global arrays; None: the initial state)."""
        ...

    def states(self) -> np.ndarray:
        """All participants' current states θ [N, D] in global order."""
        ...

    def info(self) -> list[dict[str, Any]]:
        """Placement facts of each block's process (threads, device, peak RSS, …)."""
        ...

    def close(self) -> None:
        """Release the engine's processes."""
        ...
