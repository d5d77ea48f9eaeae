"""``LocalEngine``: every participant in one ``ParticipantBlock`` in this process, no Ray.

The same block methods as the Ray actors, in the same order, so the numbers are the same; useful for
debugging, for tests of the math, and as the no-Ray baseline of ``bench/``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from dice_ray.engine.metrics import RoundMetrics, RoundPlan, combine_evaluations
from dice_ray.engine.runtime import tune_allocator
from dice_ray.experiment import Experiment
from dice_ray.participants import ParticipantBlock


class LocalEngine:
    """Runs an ``Experiment`` in this process (``device`` 'cpu' or 'cuda')."""

    def __init__(self, experiment: Experiment, device: str = "cpu"):
        tune_allocator()
        self.topology = experiment.topology
        self.block = ParticipantBlock.for_experiment(experiment, device=device)

    def run_round(self, t: int, evaluate: bool, snapshot: bool = False) -> RoundMetrics:
        """Run round t; return its metrics (with the state after it if ``snapshot``)."""
        half, train_loss = self.block.half_step(t)
        self.block.mix([self.topology.mixing_matrix(t)], [half])
        if evaluate:
            metrics = combine_evaluations(t, train_loss, [self.block.evaluate()], self.topology.n)
        else:
            metrics = RoundMetrics(t, train_loss)
        if snapshot:
            metrics.snapshot = self.block.snapshot()
        return metrics

    def run_rounds(self, schedule: Iterable[tuple[int, bool] | RoundPlan]) -> Iterator[RoundMetrics]:
        """Run the rounds of ``schedule`` (``RoundPlan``s or (t, evaluate) pairs, in order); yield each
        round's metrics."""
        for plan in schedule:
            yield self.run_round(*plan)

    def restore(self, snapshot: dict[str, np.ndarray] | None, timeout_s: float = 0.0) -> None:
        """Bring the block to ``snapshot`` (None: the initial state)."""
        self.block.restore(snapshot)

    def states(self) -> np.ndarray:
        """Return all participants' current states θ [N, D]."""
        return self.block.population.state.cpu().numpy()

    def close(self) -> None:
        """Nothing to release."""
