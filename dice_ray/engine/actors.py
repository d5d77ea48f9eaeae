"""The Ray actors: participant groups (each hosting a block of participants) and the coordinator.

Round t (SPEC §1, Algorithm 1), as the coordinator drives it:

1. every group runs the local step of its participants and publishes the half-step states
   θ^{t+½} of its block to the object store (``half_step``, two returns: states and losses);
2. the coordinator hands each group the rows of W^t for its participants and the ObjectRefs of the
   blocks those rows read; Ray resolves them (zero-copy numpy on the same node) and the group mixes
   (``mix``), evaluating afterwards on evaluation rounds.

Parameters move only between groups, through the object store; the coordinator and the driver see
losses and metrics.
"""

from __future__ import annotations

import resource
from typing import Any

import numpy as np
import ray
import scipy.sparse as sp

from dice_ray.engine.metrics import RoundMetrics, combine_evaluations
from dice_ray.topology import Topology


@ray.remote
class ParticipantGroup:
    """A Ray actor hosting one ``ParticipantBlock``; torch uses the CPUs (and GPU) Ray assigned."""

    def __init__(self, config: Any, nodes: np.ndarray, x_train: np.ndarray, y_train: np.ndarray,
                 train: list[np.ndarray], val: list[np.ndarray], heldout: tuple[np.ndarray, np.ndarray],
                 input_shape: tuple[int, ...], num_classes: int, threads: int):
        import torch

        from dice_ray.participants import ParticipantBlock

        torch.set_num_threads(threads)
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.block = ParticipantBlock(config, nodes, x_train, y_train, train, val, heldout, input_shape,
                                      num_classes, device=device)

    @ray.method(num_returns=2)
    def half_step(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Local step of round t: (half-step states [P, D], train losses [P])."""
        return self.block.half_step(t)

    def mix(self, weights: sp.csr_array, evaluate: bool, *sources: np.ndarray) -> dict[str, Any] | None:
        """Gossip with rows ``weights`` over ``sources``; return ``evaluate()`` metrics if asked."""
        self.block.mix(weights, list(sources))
        return self.block.evaluate() if evaluate else None

    def info(self) -> dict[str, Any]:
        """Return placement facts: torch threads, device, node IP, peak RSS (MiB) of this process."""
        import torch

        return {"threads": torch.get_num_threads(), "device": str(self.block.device),
                "node_ip": ray.util.get_node_ip_address(),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def state(self) -> np.ndarray:
        """Return this block's current states θ^t [P, D] (only when a user asks to save them)."""
        return self.block.population.state.cpu().numpy()


@ray.remote(num_cpus=0)
class Coordinator:
    """Advances synchronous rounds over the participant groups (see the module docstring)."""

    def __init__(self, topology: Topology, blocks: list[np.ndarray], groups: list[Any]):
        self.topology = topology
        self.blocks = blocks
        self.groups = groups
        self.n = topology.n
        self.owner = np.empty(self.n, np.int64)  # owner[l]: the group hosting participant l
        self.local = np.empty(self.n, np.int64)  # local[l]: l's row within its group's block
        for g, block in enumerate(blocks):
            self.owner[block] = g
            self.local[block] = np.arange(len(block))
        self._routes: dict[int, list[tuple[sp.csr_array, list[int]]]] = {}

    def _route(self, t: int) -> list[tuple[sp.csr_array, list[int]]]:
        """Per group: (its rows of W^t with columns renumbered into the concatenation of the source
        blocks, the source groups). Cached for static topologies."""
        key = t if self.topology.time_varying else 0
        if key not in self._routes:
            w = self.topology.mixing_matrix(t)
            routes = []
            for block in self.blocks:
                rows = sp.csr_array(w[block])
                sources = sorted(set(self.owner[rows.indices].tolist()))
                start = np.zeros(len(self.blocks), np.int64)
                start[sources] = np.concatenate([[0], np.cumsum([len(self.blocks[s]) for s in sources])[:-1]])
                cols = start[self.owner[rows.indices]] + self.local[rows.indices]
                width = sum(len(self.blocks[s]) for s in sources)
                renumbered = sp.csr_array((rows.data, cols, rows.indptr), shape=(len(block), width))
                renumbered.sort_indices()
                routes.append((renumbered, sources))
            if not self.topology.time_varying:
                self._routes.clear()
            self._routes[key] = routes
        return self._routes[key]

    def run_round(self, t: int, evaluate: bool) -> RoundMetrics:
        """Run round t on every group; return its metrics (evaluation ones if ``evaluate``)."""
        halves = [g.half_step.remote(t) for g in self.groups]
        mixed = [g.mix.remote(weights, evaluate, *[halves[s][0] for s in sources])
                 for g, (weights, sources) in zip(self.groups, self._route(t), strict=True)]
        train_loss = np.concatenate(ray.get([h[1] for h in halves]))
        parts = ray.get(mixed)
        if not evaluate:
            return RoundMetrics(t, train_loss)
        return combine_evaluations(t, train_loss, parts, self.n)
