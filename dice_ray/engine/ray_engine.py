"""``RayEngine``: participant blocks in Ray actors, rounds advanced by a coordinator actor."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dice_ray.engine.actors import Coordinator, ParticipantGroup
from dice_ray.engine.metrics import RoundMetrics, combine_evaluations
from dice_ray.engine.runtime import ActorPlan, plan_actors
from dice_ray.experiment import Experiment
from dice_ray.proximal import combine_scores, scoring_round


class RayEngine:
    """Runs an ``Experiment`` on the Ray cluster this process is connected to (``start_ray`` first).

    The training data goes to the object store once; each group copies its participants' rows. The
    driver holds no parameters (``states()`` fetches them only on request).
    """

    def __init__(self, experiment: Experiment, plan: ActorPlan | None = None):
        resources = ray.cluster_resources()
        machines = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        self.plan = plan or plan_actors(experiment.config.engine, experiment.nodes, resources.get("CPU", 0.0),
                                        resources.get("GPU", 0.0), [n["Resources"]["CPU"] for n in machines])
        ds, part = experiment.dataset, experiment.partition
        x_ref, y_ref = ray.put(ds.x_train), ray.put(ds.y_train)
        heldout_ref = ray.put(experiment.heldout)
        # One actor per machine is pinned to its machine; any other plan is spread over the machines.
        strategies = ([NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in machines]
                      if self.plan.per_machine else ["SPREAD"] * len(self.plan.blocks))
        self.groups = [
            ParticipantGroup.options(num_cpus=self.plan.cpus_per_actor, num_gpus=self.plan.gpus_per_actor,
                                     scheduling_strategy=strategy)
            .remote(experiment.config, block, x_ref, y_ref, [part.train[k] for k in block],
                    [part.val[k] for k in block], heldout_ref, ds.input_shape, ds.num_classes,
                    self.plan.threads_per_actor, experiment.misbehaving)
            for block, strategy in zip(self.plan.blocks, strategies, strict=False)
        ]
        self.coordinator = Coordinator.remote(experiment.topology, self.plan.blocks, self.groups)
        self.n = experiment.nodes
        self.config = experiment.config

    def run_round(self, t: int, evaluate: bool) -> RoundMetrics:
        """Run round t; return its metrics."""
        return next(self.run_rounds([(t, evaluate)]))

    def run_rounds(self, schedule: Iterable[tuple[int, bool]], chunk: int = 4) -> Iterator[RoundMetrics]:
        """Run the rounds of ``schedule`` ((t, evaluate) pairs, in order); yield each round's metrics.

        Rounds are handed to the coordinator ``chunk`` at a time, and the next chunk is queued before the
        current one is collected, so the groups never wait for the driver (synchrony is kept by the data
        flow: round t+1 starts on the mixed states of round t).
        """
        rounds = iter(schedule)
        inflight: deque[tuple[list[tuple[int, bool]], Any]] = deque()

        def submit() -> None:
            batch = list(itertools.islice(rounds, chunk))
            if batch:
                scored = [(t, evaluate, scoring_round(self.config, t)) for t, evaluate in batch]
                inflight.append((batch, self.coordinator.submit_rounds.remote(scored)))

        submit()
        submit()
        while inflight:
            batch, submitted = inflight.popleft()
            submit()
            for (t, evaluate), refs in zip(batch, ray.get(submitted), strict=True):
                yield self._collect(t, evaluate, *refs)

    def _collect(self, t: int, evaluate: bool, loss_refs: list[Any], mix_refs: list[Any]) -> RoundMetrics:
        train_loss = np.concatenate(ray.get(loss_refs))
        parts = ray.get(mix_refs)
        metrics = combine_evaluations(t, train_loss, parts, self.n) if evaluate else RoundMetrics(t, train_loss)
        if scoring_round(self.config, t):
            metrics.proximal = combine_scores([p["proximal"] for p in parts])
        return metrics

    def set_mixing_matrix(self, w: Any) -> None:
        """Use ``w`` [N, N] as W^t from the next submitted round on (call between ``run_rounds`` calls)."""
        ray.get(self.coordinator.set_mixing_matrix.remote(w))

    def info(self) -> list[dict[str, Any]]:
        """Return each group's placement facts (threads, device, node IP, peak RSS)."""
        return ray.get([g.info.remote() for g in self.groups])

    def states(self) -> np.ndarray:
        """Return all participants' current states θ [N, D] in global order (large: on request only)."""
        return np.concatenate(ray.get([g.state.remote() for g in self.groups]))

    def close(self) -> None:
        """Stop the actors."""
        for actor in [self.coordinator, *self.groups]:
            ray.kill(actor)
