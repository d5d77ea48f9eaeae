"""``LocalEngine``: every participant in one ``ParticipantBlock`` in this process, no Ray.

The same block methods as the Ray actors, in the same order, so the numbers are the same; useful for
debugging, for tests of the math, and as the no-Ray baseline of ``bench/``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from dice_ray.contributions import LedgerExaminer, PathWeights
from dice_ray.engine.metrics import RoundMetrics, RoundPlan, combine_evaluations
from dice_ray.engine.runtime import tune_allocator
from dice_ray.experiment import Experiment
from dice_ray.influence.online import OnlineCascades
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
        self.ledger = LedgerExaminer(self.block, experiment.config)
        self.paths = PathWeights(self.topology.mixing_matrix, self.topology.n, not self.topology.time_varying)
        self.cascades = OnlineCascades(self.block, experiment.config)

    def run_round(self, t: int, evaluate: bool, snapshot: bool = False) -> RoundMetrics:
        """Run round t; return its metrics (with the state after it if ``snapshot``, and the proximal scores
        on scoring rounds)."""
        score = scoring_round(self.config, t)
        if score:
            self.examiner.keep_before()
        gradient = self.ledger.start(t)
        self.cascades.start(t)
        half, train_loss = self.block.half_step(t)
        if score:
            self.examiner.take_delta()
        self.ledger.take_delta(t)
        self.cascades.take_updates(t)
        w = self.topology.mixing_matrix(t) if self.mixing is None else self.mixing
        self.block.mix([w], [half])
        self.cascades.mix([w], [self.block.nodes], [self.cascades])
        if evaluate:
            metrics = combine_evaluations(t, train_loss, [self.block.evaluate()], self.topology.n)
        else:
            metrics = RoundMetrics(t, train_loss)
        if gradient is not None:
            metrics.ledger = self.ledger.terms(t, self.paths.terms(self.config, t), [gradient])
        metrics.cascade = self.cascades.terms()
        if snapshot:
            metrics.snapshot = {**self.block.snapshot(), **self._ledger_snapshot(t), **self.cascades.snapshot(t)}
        if score:
            metrics.proximal = self.examiner.score([w], [self.examiner.delta], [self.block.nodes])
        return metrics

    def _ledger_snapshot(self, t: int) -> dict[str, np.ndarray]:
        return self.ledger.snapshot(t) if self.config.ledger.enabled else {}

    def set_mixing_matrix(self, w: Any) -> None:
        """Use ``w`` [N, N] as W^t for every later round (collaborator selection rewires the graph)."""
        self.mixing = w

    def run_rounds(self, schedule: Iterable[tuple[int, bool] | RoundPlan]) -> Iterator[RoundMetrics]:
        """Run the rounds of ``schedule`` (``RoundPlan``s or (t, evaluate) pairs, in order); yield each
        round's metrics."""
        for plan in schedule:
            yield self.run_round(*plan)

    def restore(self, snapshot: dict[str, np.ndarray] | None, timeout_s: float = 0.0) -> None:
        """Bring the block to ``snapshot`` (None: the initial state)."""
        self.block.restore(snapshot)
        self.ledger.restore(snapshot)
        self.cascades.restore(snapshot)

    def states(self) -> np.ndarray:
        """Return all participants' current states θ [N, D]."""
        return self.block.population.state.cpu().numpy()

    def close(self) -> None:
        """Nothing to release."""
