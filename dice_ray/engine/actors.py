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

from dice_ray.engine.runtime import tune_allocator
from dice_ray.topology import Topology


@ray.remote
class ParticipantGroup:
    """A Ray actor hosting one ``ParticipantBlock``; torch uses the CPUs (and GPU) Ray assigned."""

    def __init__(self, config: Any, nodes: np.ndarray, x_train: np.ndarray, y_train: np.ndarray,
                 train: list[np.ndarray], val: list[np.ndarray], heldout: tuple[np.ndarray, np.ndarray],
                 input_shape: tuple[int, ...], num_classes: int, threads: int, misbehaving: np.ndarray):
        import torch

        from dice_ray.participants import ParticipantBlock

        tune_allocator()
        torch.set_num_threads(threads)
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.block = ParticipantBlock(config, nodes, x_train, y_train, train, val, heldout, input_shape,
                                      num_classes, device=device, misbehaving=misbehaving)

    @ray.method(num_returns=2)
    def half_step(self, t: int, publish: bool) -> tuple[np.ndarray | None, np.ndarray]:
        """Local step of round t: (half-step states [P, D] if other groups read them, else None; train
        losses [P]). The group's own half-step never leaves the process: ``mix`` reads it in place."""
        half, loss = self.block.half_step(t)
        return (half if publish else None), loss

    def mix(self, weights: list[sp.csr_array], own: int, evaluate: bool, *sources: np.ndarray) -> dict[str, Any] | None:
        """Gossip with ``weights[b]`` over the source blocks: ``sources`` from other groups, with this group's
        own half-step inserted at position ``own`` (-1: not read); return ``evaluate()`` metrics if asked."""
        blocks = list(sources)
        if own >= 0:
            blocks.insert(own, self.block.population.state.cpu().numpy())
        self.block.mix(weights, blocks)
        return self.block.evaluate() if evaluate else None

    def info(self) -> dict[str, Any]:
        """Return placement facts: torch threads, device, node IP, placement group (None outside one), peak
        RSS (MiB) of this process."""
        import torch

        return {"threads": torch.get_num_threads(), "device": str(self.block.device),
                "node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "placement_group": ray.get_runtime_context().get_placement_group_id(),
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
        self.owner = np.empty(topology.n, np.int64)  # owner[l]: the group hosting participant l
        for g, block in enumerate(blocks):
            self.owner[block] = g
        self._routes: dict[int, list[list[tuple[int, sp.csr_array]]]] = {}

    def _route(self, t: int) -> list[list[tuple[int, sp.csr_array]]]:
        """Per group: the source groups its rows of W^t read, each with the [P, |source block|] slice of
        W^t for those rows and that block's columns. Cached for static topologies."""
        key = t if self.topology.time_varying else 0
        if key not in self._routes:
            w = self.topology.mixing_matrix(t)
            routes = []
            for block in self.blocks:
                rows = sp.csr_array(w[block])
                sources = sorted(set(self.owner[rows.indices].tolist()))
                routes.append([(s, sp.csr_array(rows[:, self.blocks[s]])) for s in sources])
            if not self.topology.time_varying:
                self._routes.clear()
            self._routes[key] = routes
        return self._routes[key]

    def submit_rounds(self, rounds: list[tuple[int, bool]]) -> list[tuple[list[Any], list[Any]]]:
        """``submit_round`` for each (t, evaluate) of ``rounds``, in order (one call for several rounds keeps
        the coordinator's and driver's CPU time per round small)."""
        return [self.submit_round(t, evaluate) for t, evaluate in rounds]

    def submit_round(self, t: int, evaluate: bool) -> tuple[list[Any], list[Any]]:
        """Queue round t on every group without waiting; return the ObjectRefs of (per-group train
        losses, per-group mix results). Groups run their tasks in submission order, so rounds queued
        back to back keep every group busy while the driver collects earlier rounds' metrics."""
        routes = self._route(t)
        published = {s for g, route in enumerate(routes) for s, _ in route if s != g}
        halves = [group.half_step.remote(t, g in published) for g, group in enumerate(self.groups)]
        mixed = []
        for g, (group, route) in enumerate(zip(self.groups, routes, strict=True)):
            own = next((i for i, (s, _) in enumerate(route) if s == g), -1)
            others = [halves[s][0] for s, _ in route if s != g]
            mixed.append(group.mix.remote([w for _, w in route], own, evaluate, *others))
        return [h[1] for h in halves], mixed
