"""``LocalEngine``: every participant in one ``ParticipantBlock`` in this process, no Ray.

The same block and hook calls as the Ray actors, in the same order, so the numbers are the same; useful for
debugging, for tests of the math, for notebooks, and as the no-Ray baseline of ``bench/``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from dice_ray.core.participants import ParticipantBlock
from dice_ray.engine.block import HookedBlock, HookInbox, mixing_key
from dice_ray.engine.metrics import MAX_ROUNDS_PER_CALL, RoundMetrics, RoundPlan, combine_evaluations
from dice_ray.engine.runtime import peak_rss_mib, tune_allocator
from dice_ray.experiment import Experiment
from dice_ray.hooks import RoundHook


class LocalEngine:
    """Runs an ``Experiment`` in this process (``device`` 'cpu' or 'cuda'), calling ``hooks`` every round."""

    def __init__(self, experiment: Experiment, hooks: list[type[RoundHook]] | tuple = (), device: str = "cpu",
                 queue: int | None = None):
        """``queue``: ``run_rounds`` reads the training losses back after this many rounds (sooner at an evaluation
        or snapshot round); default 1 on the CPU, where reading them costs nothing, and ``MAX_ROUNDS_PER_CALL``
        elsewhere, so that a GPU's host does not wait for every round (as the Ray actors' ``run_rounds``)."""
        tune_allocator()
        self.queue = queue or (1 if torch.device(device).type == "cpu" else MAX_ROUNDS_PER_CALL)
        self.topology = experiment.topology
        self.config = experiment.config
        self.blocks = [np.arange(experiment.nodes)]
        self.hooked = HookedBlock(ParticipantBlock.for_experiment(experiment, device=device), list(hooks),
                                  experiment.config)
        self.block = self.hooked.block
        self.mixing: Any = None  # set by collaborator selection: replaces W from then on
        self._version = 0  # bumped when W is replaced: part of the weights' key
        self._held: Any = None  # the key of the rows of W the block holds
        self._sends = {h.name: h.sends(self.config) for h in hooks}
        self._routers = {h.name: h.router(self.config, self.topology, self.blocks, self._mixing_at)
                         for h in hooks if h.router is not None}

    def _mixing_at(self, t: int) -> Any:
        return self.topology.mixing_matrix(t) if self.mixing is None else self.mixing

    def run_round(self, t: int, evaluate: bool, snapshot: bool = False) -> RoundMetrics:
        """Run round t; return its metrics (with the state after it if ``snapshot``, and the hooks' records)."""
        [metrics] = _on_host([self._round(t, evaluate, snapshot)])
        return metrics

    def _round(self, t: int, evaluate: bool, snapshot: bool = False, copy: bool = True) -> RoundMetrics:
        """``run_round`` with the training losses left where the block computes (a tensor [P]); the snapshot shares
        the block's memory on a CPU unless ``copy``."""
        train_loss = self.hooked.local_step(t)
        key = mixing_key(self._version, t, self.topology.time_varying)
        self.hooked.set_weights(key, None if key == self._held else [self._mixing_at(t)])
        self._held = key
        nodes = [self.block.nodes]
        inboxes = {name: HookInbox(nodes, 0, self._routers[name].routes(t)[0].info if name in self._routers else None)
                   for name, sends in self._sends.items() if sends(t)}
        records = self.hooked.gossip(t, nodes, 0, [], inboxes, {})
        if evaluate:
            metrics = combine_evaluations(t, train_loss, [self.block.evaluate()], self.topology.n)
        else:
            metrics = RoundMetrics(t, train_loss)
        metrics.records = {name: [record] for name, record in records.items()}
        if snapshot:
            metrics.snapshot = self.hooked.snapshot(t, copy=copy)
        return metrics

    def set_mixing_matrix(self, w: Any) -> None:
        """Use ``w`` [N, N] as W^t for every later round (collaborator selection rewires the graph)."""
        self.mixing = w
        self._version += 1

    def run_rounds(self, schedule: Iterable[tuple[int, bool] | RoundPlan]) -> Iterator[RoundMetrics]:
        """Run the rounds of ``schedule`` (``RoundPlan``s or (t, evaluate) pairs, in order); yield each
        round's metrics. Up to ``queue`` rounds run before their metrics are yielded, their losses read back in
        one copy (an evaluation or a snapshot round yields at once). A snapshot shares the block's memory on a CPU:
        it is valid until the next round runs, when the caller asks for the next metrics (the loop writes it before;
        a copy was a whole state more at every checkpoint)."""
        queued: list[RoundMetrics] = []
        for plan in (RoundPlan(*plan) for plan in schedule):
            queued.append(self._round(*plan, copy=False))
            if len(queued) >= self.queue or plan.evaluate or plan.snapshot:
                yield from _on_host(queued)
                queued = []
        yield from _on_host(queued)

    def restore(self, snapshot: dict[str, np.ndarray] | None, timeout_s: float = 0.0) -> None:
        """Bring the block and its hooks to ``snapshot`` (None: the initial state)."""
        self.hooked.restore(snapshot)

    def states(self) -> np.ndarray:
        """Return all participants' current states θ [N, D]."""
        return self.block.population.state.cpu().numpy()

    def info(self) -> list[dict[str, Any]]:
        """Placement facts of this process (one block): torch threads, device, how the local step ran on a GPU
        (``ParticipantBlock.cuda_graph``), peak RSS (MiB)."""
        import torch

        return [{"threads": torch.get_num_threads(), "device": str(self.block.device),
                 "cuda_graph": self.block.cuda_graph, "node_ip": "local",
                 "peak_rss_mib": peak_rss_mib()}]

    def close(self) -> None:
        """Nothing to release."""


def _on_host(rounds: list[RoundMetrics]) -> list[RoundMetrics]:
    """``rounds`` with their training losses (tensors on the block's device) read back to the host in one copy."""
    if rounds:
        losses = torch.stack([m.train_loss for m in rounds]).cpu().numpy()
        for metrics, loss in zip(rounds, losses, strict=True):
            metrics.train_loss = loss
    return rounds
