"""``LocalEngine``: every participant in one ``ParticipantBlock`` in this process, no Ray.

The same block methods as the Ray actors, in the same order, so the numbers are the same; useful for
debugging, for tests of the math, and as the no-Ray baseline of ``bench/``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from dice_ray.engine.metrics import RoundMetrics, combine_evaluations
from dice_ray.engine.runtime import tune_allocator
from dice_ray.experiment import Experiment
from dice_ray.participants import ParticipantBlock
from dice_ray.proximal import ProximalExaminer, scoring_round


class LocalEngine:
    """Runs an ``Experiment`` in this process (``device`` 'cpu' or 'cuda')."""

    def __init__(self, experiment: Experiment, device: str = "cpu"):
        tune_allocator()
        self.topology = experiment.topology
        self.config = experiment.config
        self.block = ParticipantBlock.for_experiment(experiment, device=device)
        self.examiner = ProximalExaminer(self.block, experiment.config.proximal.zprime)
        self.mixing: Any = None  # set by collaborator selection: replaces W from then on

    def run_round(self, t: int, evaluate: bool) -> RoundMetrics:
        """Run round t; return its metrics."""
        score = scoring_round(self.config, t)
        if score:
            self.examiner.keep_before()
        half, train_loss = self.block.half_step(t)
        if score:
            self.examiner.take_delta()
        w = self.topology.mixing_matrix(t) if self.mixing is None else self.mixing
        self.block.mix([w], [half])
        metrics = (combine_evaluations(t, train_loss, [self.block.evaluate()], self.topology.n) if evaluate
                   else RoundMetrics(t, train_loss))
        if score:
            metrics.proximal = self.examiner.score([w], [self.examiner.delta], [self.block.nodes])
        return metrics

    def set_mixing_matrix(self, w: Any) -> None:
        """Use ``w`` [N, N] as W^t for every later round (collaborator selection rewires the graph)."""
        self.mixing = w

    def run_rounds(self, schedule: Iterable[tuple[int, bool]]) -> Iterator[RoundMetrics]:
        """Run the rounds of ``schedule`` ((t, evaluate) pairs, in order); yield each round's metrics."""
        for t, evaluate in schedule:
            yield self.run_round(t, evaluate)

    def states(self) -> np.ndarray:
        """Return all participants' current states θ [N, D]."""
        return self.block.population.state.cpu().numpy()

    def close(self) -> None:
        """Nothing to release."""
