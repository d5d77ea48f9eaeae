"""The Ray actors: participant groups (each hosting a block of participants) and the coordinator.

Round t (SPEC §1, Algorithm 1), as the coordinator drives it:

1. every group runs the local step of its participants and publishes the half-step states
   θ^{t+½} of its block to the object store (``half_step``, two returns: states and losses);
2. the coordinator hands each group the rows of W^t for its participants and the ObjectRefs of the
   blocks those rows read; Ray resolves them (zero-copy numpy on the same node) and the group mixes
   (``mix``), evaluating afterwards on evaluation rounds and snapshotting its block on checkpoint rounds.

On proximal-influence scoring rounds (``proximal.py``) the groups also publish their updates Δ beside
the half-steps, and ``mix`` returns every examiner's scores of its in-neighbours. On rounds the contribution
ledger needs (``contributions.py``) the groups publish their gradient blocks g = ∇L(θ^t; z′), taken before
the local step; each group reads those of the groups hosting participants its sources reach within R hops,
and ``mix`` returns the ledger terms of the group's own sources.

Ray restarts a group that dies (it comes back empty); the driver then restores every group from the last
checkpoint (``restore``), replaces the coordinator (it holds no state) and replays the rounds since.

Parameters move only between groups, through the object store; the coordinator and the driver see
losses and metrics.
"""

from __future__ import annotations

import resource
from typing import Any

import numpy as np
import ray
import scipy.sparse as sp

from dice_ray.contributions import LedgerExaminer, PathWeights
from dice_ray.engine.runtime import tune_allocator
from dice_ray.influence.online import OnlineCascades, cascade_mixing, online_probes
from dice_ray.proximal import ProximalExaminer
from dice_ray.topology import Topology


@ray.remote
class ParticipantGroup:
    """A Ray actor hosting one ``ParticipantBlock``; torch uses the CPUs (and GPU) Ray assigned.

    Round tasks carry the engine's *epoch*; ``restore`` starts a new one. After a failure, tasks of the
    abandoned rounds may still be queued here (they were submitted by the coordinator, the restore by
    the driver, and Ray orders tasks per caller only): they see an old epoch and do nothing.
    """

    def __init__(self, config: Any, input_shape: tuple[int, ...], num_classes: int, threads: int):
        import torch

        tune_allocator()
        torch.set_num_threads(threads)
        self.config, self.input_shape, self.num_classes = config, input_shape, num_classes
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.block: Any = None  # built by the first ``restore``
        self.examiner: Any = None
        self.ledger: Any = None
        self.cascades: Any = None
        self.epoch = -1
        self._weights: tuple[Any, list[sp.csr_array]] | None = None  # (key, rows of W), sent once per key

    def restore(self, arrays: dict[str, np.ndarray] | None, epoch: int, data: list[Any]) -> int:
        """Enter ``epoch`` with this block's state set to ``arrays`` (a ``ParticipantBlock.snapshot``; None: the
        initial state); return the epoch. ``data`` holds ObjectRefs of (participant ids, x_train, y_train,
        training index lists, validation index lists, held-out batch z′, misbehaving ids): the first call
        (after creation or a restart) builds the block from them. The references travel with each call,
        not with the constructor, so Ray can restart this actor without keeping constructor arguments."""
        if self.block is None:
            from dice_ray.participants import ParticipantBlock

            nodes, x_train, y_train, train, val, heldout, misbehaving = ray.get(data)
            self.block = ParticipantBlock(self.config, nodes, x_train, y_train, train, val, heldout,
                                          self.input_shape, self.num_classes, device=self.device,
                                          misbehaving=misbehaving)
            self.examiner = ProximalExaminer(self.block, self.config.proximal.zprime)
            self.ledger = LedgerExaminer(self.block, self.config)
            self.cascades = OnlineCascades(self.block, self.config)
            if arrays is not None:
                self.block.restore(arrays)
        else:
            self.block.restore(arrays)
        self.ledger.restore(arrays)
        self.cascades.restore(arrays)
        self.epoch = epoch
        self._weights = None  # a new coordinator comes with a new epoch and sends its weights again
        return epoch

    @ray.method(num_returns=2)
    def step_and_mix(self, t: int, score: bool, epoch: int, mix_args: tuple) -> tuple[Any, Any]:
        """``half_step`` then ``mix`` in one task, for a group whose rows of W read no other group and whose
        half-step no other group reads (one group hosting everyone: the default on one machine). Returns
        (train losses [P], ``mix``'s result); ``mix_args`` are ``mix``'s arguments after ``t``."""
        if epoch != self.epoch:
            return None, None
        _, loss, _, _, _ = self._half_step(t, False, score, False)
        return loss, self.mix(t, *mix_args)

    @ray.method(num_returns=5)
    def half_step(self, t: int, publish: bool, score: bool, share_gradient: bool,
                  epoch: int) -> tuple[Any, Any, Any, Any, Any]:
        """Local step of round t: (half-step states [P, D] if other groups read them, else None; train
        losses [P]; on scoring rounds the updates Δ [P, D_params] if other groups read them, else None; the
        ledger's gradients g [P, D_params] at θ^t if ``share_gradient``, else None; the in-loop DICE-E
        perturbations J δ of this round (``OnlineCascades.outgoing``) if other groups read them, else None).
        The group's own half-step never leaves the process: ``mix`` reads it in place."""
        if epoch != self.epoch:
            return None, None, None, None, None
        return self._half_step(t, publish, score, share_gradient)

    def _half_step(self, t: int, publish: bool, score: bool,
                   share_gradient: bool) -> tuple[Any, Any, Any, Any, Any]:
        if score:
            self.examiner.keep_before()
        gradient = self.ledger.start(t)
        self.cascades.start(t)
        half, loss = self.block.half_step(t)
        delta = self.examiner.take_delta() if score else None
        self.ledger.take_delta(t)
        self.cascades.take_updates(t)
        return ((half if publish else None), loss, (delta.cpu().numpy() if publish and score else None),
                (gradient.cpu().numpy() if share_gradient and gradient is not None else None),
                (self.cascades.outgoing() if publish and self.cascades.enabled else None))

    def mix(self, t: int, weights: tuple[Any, list[sp.csr_array] | None], own: int, evaluate: bool, snapshot: bool,
            epoch: int, score_ids: list[np.ndarray] | None, ledger: dict[str, Any] | None,
            cascade_ids: list[np.ndarray] | None, *sources: Any) -> dict[str, Any] | None:
        """Gossip (round t) with ``weights`` = (key, [W_b] or None) over the source blocks: ``W_b`` is this
        group's rows of W^t over source block b; the coordinator sends them once per key (None: the ones
        received with that key, which saves serializing W every round). ``sources`` come from other groups,
        with this group's own half-step inserted at position ``own`` (-1: not read). Return ``{"metrics": evaluate() or
        None, "snapshot": snapshot() or None, "proximal": edge scores or None, "ledger": ledger terms or None}``,
        or None for a task of an abandoned epoch. On scoring rounds ``score_ids`` holds each source block's
        global ids and the other groups' updates Δ follow the half-steps (same order). On ledger rounds
        ``ledger`` = ``Coordinator._ledger_terms`` (the paths of this group's sources; the groups whose gradient
        blocks they read, this one among them, and those blocks' global ids) and ``sources`` ends with the
        other needed groups' gradient blocks, in group order. On rounds that gossip in-loop DICE-E perturbations
        ``cascade_ids`` holds each source block's global ids and the other groups' perturbations come last, in
        route order."""
        if epoch != self.epoch:
            return None
        if weights[1] is not None:
            self._weights = weights  # the coordinator sends each key's rows once, before rounds that reuse them
        if self._weights is None or self._weights[0] != weights[0]:
            raise RuntimeError(f"round {t}: no rows of W received for {weights[0]}")
        weights = self._weights[1]
        tangents: list[Any] = []
        if cascade_ids is not None:
            received = len(cascade_ids) - (1 if own >= 0 else 0)
            tangents = list(sources[len(sources) - received:]) if received else []
            sources = sources[: len(sources) - received]
            if own >= 0:
                tangents.insert(own, self.cascades)
        if ledger is not None:
            received = len(ledger["needed"]) - 1
            gradients = list(sources[len(sources) - received:]) if received else []
            sources = sources[: len(sources) - received]
            gradients.insert(ledger["needed"].index(ledger["group"]), self.ledger.gradient)
        half = len(sources) if score_ids is None else len(sources) // 2
        blocks, deltas = list(sources[:half]), list(sources[half:])
        if own >= 0:
            blocks.insert(own, self.block.population.state.cpu().numpy())
            deltas.insert(own, self.examiner.delta)
        self.block.mix(weights, blocks)
        if cascade_ids is not None:
            self.cascades.mix(weights, cascade_ids, tangents)
        terms = self.ledger.terms(t, ledger["paths"], gradients, ledger["ids"]) if ledger is not None else None
        kept = self.ledger.snapshot(t) if snapshot and self.config.ledger.enabled else {}
        kept.update(self.cascades.snapshot(t) if snapshot else {})
        return {"metrics": self.block.evaluate() if evaluate else None,
                "snapshot": {**self.block.snapshot(), **kept} if snapshot else None,
                "proximal": self.examiner.score(weights, deltas, score_ids) if score_ids is not None else None,
                "ledger": terms, "cascade": self.cascades.terms()}

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


def ledger_terms(paths: PathWeights, config: Any, t: int, blocks: list[np.ndarray], owner: np.ndarray,
                 g: int) -> dict[str, Any]:
    """``ParticipantGroup.mix``'s ``ledger`` argument for group g at round t: the path weights of its sources'
    terms (``paths``), and the groups (``needed``, ascending, g among them) hosting the targets those terms
    reach, whose gradient blocks g reads, with those blocks' global ids (``ids``, in that order).
    ``owner[l]``: the group hosting participant l."""
    terms = paths.terms(config, t, blocks[g])
    targets = np.unique(np.concatenate([f.tocoo().row for _, _, f in terms] or [np.zeros(0, np.int64)]))
    needed = sorted(set(owner[targets].tolist()) | {g})
    return {"paths": terms, "group": g, "needed": needed, "ids": np.concatenate([blocks[s] for s in needed])}


@ray.remote(num_cpus=0)
class Coordinator:
    """Advances synchronous rounds over the participant groups (see the module docstring)."""

    def __init__(self, topology: Topology, blocks: list[np.ndarray], groups: list[Any], config: Any = None):
        self.topology = topology
        self.config = config  # the run config: the contribution ledger's rounds and hops
        self.paths = PathWeights(topology.mixing_matrix, topology.n, not topology.time_varying)
        self.probes = online_probes(config) if config is not None else []  # in-loop DICE-E
        self.blocks = blocks
        self.groups = groups
        self.owner = np.empty(topology.n, np.int64)  # owner[l]: the group hosting participant l
        for g, block in enumerate(blocks):
            self.owner[block] = g
        self._routes: dict[int, list[list[tuple[int, sp.csr_array]]]] = {}
        self._mixing: sp.csr_array | None = None  # set by collaborator selection: replaces W from then on
        self._version = 0  # bumped when W is replaced: part of the weights' cache key
        self._sent: list[Any] = [None] * len(groups)  # the weights key each group holds

    def set_mixing_matrix(self, w: sp.csr_array) -> None:
        """Use ``w`` [N, N] as W^t for every later round (collaborator selection rewires the graph)."""
        self._mixing = sp.csr_array(w)
        self._routes.clear()
        self._version += 1

    def _route_key(self, t: int) -> tuple[int, int]:
        return self._version, (t if self.topology.time_varying and self._mixing is None else 0)

    def _weights(self, g: int, t: int, route: list[tuple[int, sp.csr_array]]) -> tuple[Any, Any]:
        """``mix``'s ``weights`` argument for group g: the weights the first time a key is used, then the key."""
        key = self._route_key(t)
        if self._sent[g] == key:
            return key, None
        self._sent[g] = key
        return key, [w for _, w in route]

    def _route(self, t: int) -> list[list[tuple[int, sp.csr_array]]]:
        """Per group: the source groups its rows of W^t read, each with the [P, |source block|] slice of
        W^t for those rows and that block's columns. Cached for static topologies."""
        key = self._route_key(t)
        if key not in self._routes:
            w = self.topology.mixing_matrix(t) if self._mixing is None else self._mixing
            routes = []
            for block in self.blocks:
                rows = sp.csr_array(w[block])
                sources = sorted(set(self.owner[rows.indices].tolist()))
                routes.append([(s, sp.csr_array(rows[:, self.blocks[s]])) for s in sources])
            if not self.topology.time_varying:
                self._routes.clear()
            self._routes[key] = routes
        return self._routes[key]

    def _ledger_terms(self, t: int, g: int) -> dict[str, Any]:
        return ledger_terms(self.paths, self.config, t, self.blocks, self.owner, g)

    def submit_rounds(self, rounds: list[tuple[int, bool, bool, bool, bool]],
                      epoch: int) -> list[tuple[list[Any], list[Any]]]:
        """``submit_round`` for each (t, evaluate, snapshot, score, ledger) of ``rounds``, in order (one call
        for several rounds keeps the coordinator's and driver's CPU time per round small)."""
        return [self.submit_round(t, evaluate, snapshot, score, epoch, ledger)
                for t, evaluate, snapshot, score, ledger in rounds]

    def submit_round(self, t: int, evaluate: bool, snapshot: bool = False, score: bool = False,
                     epoch: int = 0, ledger: bool = False) -> tuple[list[Any], list[Any]]:
        """Queue round t of ``epoch`` on every group without waiting; return the ObjectRefs of (per-group
        train losses, per-group mix results). Groups run their tasks in submission order, so rounds queued
        back to back keep every group busy while the driver collects earlier rounds' metrics.
        ``score``: a proximal-influence scoring round (updates Δ travel beside the half-steps); ``ledger``: a
        round the contribution ledger measures (gradient blocks travel to the groups whose terms read them)."""
        routes = self._route(t)
        published = {s for g, route in enumerate(routes) for s, _ in route if s != g}
        share = ledger and len(self.groups) > 1
        cascade = bool(self.probes) and cascade_mixing(self.config, self.probes, t)
        if len(self.groups) == 1 and routes[0] and routes[0][0][0] == 0:  # one task per round, nothing to pass
            terms = self._ledger_terms(t, 0) if ledger else None
            mix_args = (self._weights(0, t, routes[0]), 0, evaluate, snapshot, epoch,
                        [self.blocks[0]] if score else None, terms, [self.blocks[0]] if cascade else None)
            loss, mixed = self.groups[0].step_and_mix.remote(t, score, epoch, mix_args)
            return [loss], [mixed]
        ledger_terms = [self._ledger_terms(t, g) for g in range(len(self.groups))] if ledger else []
        shared = {s for terms in ledger_terms for s in terms["needed"] if s != terms["group"]}
        halves = [group.half_step.remote(t, g in published, score, share and g in shared, epoch)
                  for g, group in enumerate(self.groups)]
        mixed = []
        for g, (group, route) in enumerate(zip(self.groups, routes, strict=True)):
            own = next((i for i, (s, _) in enumerate(route) if s == g), -1)
            others = [halves[s][0] for s, _ in route if s != g]
            ids = None
            if score:  # the other groups' updates Δ follow their half-steps
                ids = [self.blocks[s] for s, _ in route]
                others += [halves[s][2] for s, _ in route if s != g]
            terms = None
            if ledger:  # the gradients of the other groups hosting this group's targets follow
                terms = ledger_terms[g]
                others += [halves[s][3] for s in terms["needed"] if s != g]
            cascade_ids = None
            if cascade:  # the other groups' DICE-E perturbations come last
                cascade_ids = [self.blocks[s] for s, _ in route]
                others += [halves[s][4] for s, _ in route if s != g]
            mixed.append(group.mix.remote(t, self._weights(g, t, route), own, evaluate, snapshot, epoch, ids, terms,
                                          cascade_ids, *others))
        return [h[1] for h in halves], mixed
