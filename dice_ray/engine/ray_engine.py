"""``RayEngine``: participant blocks in Ray actors, rounds advanced by a coordinator actor."""

from __future__ import annotations

import itertools
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from dice_ray.config import EngineConfig
from dice_ray.engine.actors import Coordinator, ParticipantGroup, ParticipantGroupWithTransport
from dice_ray.engine.metrics import (
    MAX_ROUNDS_PER_CALL,
    RoundMetrics,
    RoundPlan,
    block_rows,
    combine_evaluations,
    combine_snapshots,
)
from dice_ray.engine.runtime import ActorPlan, plan_actors
from dice_ray.engine.tasks import task_gpus
from dice_ray.engine.transport import CUDA_IPC, OBJECT_STORE, Placement, choose_transports, may_use_device_transport
from dice_ray.errors import InputError
from dice_ray.experiment import Experiment
from dice_ray.hooks import RoundHook

# Rounds per coordinator call (and per task, when one group hosts everyone): as many as take about CALL_SECONDS, at
# most MAX_ROUNDS_PER_CALL (see ``RayEngine.run_rounds``). At the MLP's ~1 ms rounds on a GPU, Ray's ~1 ms per task
# would otherwise double a round; at 0.1 s the driver still sees every round within a fraction of a second.
CALL_SECONDS = 0.1

# What a lost actor or machine looks like to the driver: the round in flight fails with one of these.
ACTOR_FAILURES = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError,
                  ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError)

# Seconds a small tensor may take through CUDA IPC between two groups when they start (``RayEngine._check_transports``).
PROBE_TIMEOUT_S = 120.0


def _machines() -> list[dict[str, Any]]:
    """The Ray cluster's live nodes with CPUs (``ray.nodes()`` entries)."""
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


def cluster_plan(engine: EngineConfig, nodes: int, machines: list[dict[str, Any]] | None = None) -> ActorPlan:
    """The actor plan of ``engine`` for ``nodes`` participants on the Ray cluster this process is connected to
    (``plan_actors`` with its CPUs, GPUs and ``machines``, default ``_machines()``). Raises ``InputError`` (one line)
    where the cluster cannot hold the run's actors, or its tasks' GPU share (``engine.gpus_per_task``): ``simulate``
    calls it before a run touches its directory."""
    resources = ray.cluster_resources()
    machines = _machines() if machines is None else machines
    plan = plan_actors(engine, nodes, resources.get("CPU", 0.0), resources.get("GPU", 0.0),
                       [n["Resources"]["CPU"] for n in machines], [n["Resources"].get("GPU", 0.0) for n in machines])
    task_gpus(engine, resources.get("GPU", 0.0))
    return plan


class RayEngine:
    """Runs an ``Experiment`` on the Ray cluster this process is connected to (``start_ray`` first).

    The training data goes to the object store once; each group reads it there in place, and copies its
    participants' rows only on a GPU or where they corrupt their data. The
    driver holds no parameters (``states()`` fetches them only on request). Actors are restarted by Ray
    when they die (``ACTOR_FAILURES`` reach the caller of ``run_rounds``); ``restore`` then brings every
    group back to a snapshot so the caller can replay the rounds since. Actors take no object references
    in their constructors (Ray cannot restart an actor whose constructor arguments are gone): the data
    references travel with ``restore``.

    Half-steps travel between groups as ``engine.transport`` and the groups' placements choose
    (``dice_ray.engine.transport``): ``transports[s][g]`` says how group s's reaches group g.
    """

    def __init__(self, experiment: Experiment, plan: ActorPlan | None = None,
                 hooks: list[type[RoundHook]] | tuple = ()):
        self.hooks = list(hooks)
        machines = _machines()
        self.plan = plan or cluster_plan(experiment.config.engine, experiment.nodes, machines)
        # Inside a placement group (a sweep trial's, reserved by Ray Tune) the actors take its bundles and what
        # they start stays in it: node-affinity or SPREAD strategies would escape the trial's reservation.
        group = get_current_placement_group()
        in_group = [PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
                    ] * len(self.plan.blocks) if group is not None else None
        ds, part = experiment.dataset, experiment.partition
        # One actor per machine goes to its machine (soft: a restart after losing that machine may go
        # elsewhere); any other plan is spread over the machines.
        strategies = ([NodeAffinitySchedulingStrategy(n["NodeID"], soft=True) for n in machines]
                      if self.plan.per_machine else ["SPREAD"] * len(self.plan.blocks))
        self.transport = experiment.config.engine.transport
        actor = (ParticipantGroupWithTransport if may_use_device_transport(
            self.transport, self.plan.gpus_per_actor, len(self.plan.blocks)) else ParticipantGroup)
        self.groups = [
            actor.options(num_cpus=self.plan.cpus_per_actor, num_gpus=self.plan.gpus_per_actor,
                          scheduling_strategy=strategy, max_restarts=-1)
            .remote(experiment.config, ds.input_shape, ds.num_classes, self.plan.threads_per_actor, self.hooks)
            for strategy in (in_group or strategies)[: len(self.plan.blocks)]
        ]
        # The data goes to the object store once (each group's index lists separately); the engine keeps the
        # references, and every ``restore`` hands them over, so a restarted group rebuilds its block.
        shared = [ray.put(ds.x_train), ray.put(ds.y_train)]
        heldout, misbehaving = ray.put(experiment.heldout), ray.put(experiment.misbehaving)
        self._data = [[ray.put(block), *shared, ray.put([part.train[k] for k in block]),
                       ray.put([part.val[k] for k in block]), heldout, misbehaving] for block in self.plan.blocks]
        self._topology = experiment.topology
        self.coordinator = Coordinator.remote(self._topology, self.plan.blocks, self.groups, experiment.config,
                                              self.hooks)
        self.n = experiment.nodes
        self.config = experiment.config
        self.blocks = self.plan.blocks
        self._mixing: Any = None  # W set by collaborator selection, if any
        self.epoch = 0
        try:
            self.restore(None)
        except BaseException:  # groups or a transport that cannot start: leave no actors behind
            self.close()
            raise

    def run_round(self, t: int, evaluate: bool) -> RoundMetrics:
        """Run round t; return its metrics."""
        return next(self.run_rounds([(t, evaluate)]))

    def run_rounds(self, schedule: Iterable[tuple[int, bool] | RoundPlan],
                   chunk: int | None = None) -> Iterator[RoundMetrics]:
        """Run the rounds of ``schedule`` (``RoundPlan``s or (t, evaluate) pairs, in order); yield each
        round's metrics.

        Rounds are handed to the coordinator a chunk at a time, and the next chunk is queued before the
        current one is collected, so the groups never wait for the driver (synchrony is kept by the data
        flow: round t+1 starts on the mixed states of round t). A chunk ends at a snapshot round, and nothing
        after it is queued until the caller has taken that round's metrics: one snapshot of the state (a copy
        in the object store) at a time.

        A chunk is ``chunk`` rounds if given; else as many as take about ``CALL_SECONDS`` (measured on the
        chunks collected so far; ``MAX_ROUNDS_PER_CALL`` at most): when one group hosts everyone a chunk is one
        task (``Coordinator.submit_rounds``), so short rounds do not pay Ray's per-task cost each, and long ones
        still report every round as it ends.
        """
        size = chunk or 4
        last = time.perf_counter()
        rounds = (RoundPlan(*plan) for plan in schedule)
        inflight: deque[tuple[list[RoundPlan], Any]] = deque()

        def submit() -> None:
            if inflight and inflight[-1][0][-1].snapshot:
                return
            batch = []
            for plan in itertools.islice(rounds, size):
                batch.append(plan)
                if plan.snapshot:
                    break
            if batch:
                plans = [tuple(plan[:3]) for plan in batch]
                inflight.append((batch, self.coordinator.submit_rounds.remote(plans, self.epoch)))

        submit()
        submit()
        current: list[Any] = []
        try:
            while inflight:
                batch, submitted = inflight.popleft()
                if not batch[-1].snapshot:
                    submit()
                current = ray.get(submitted)
                for plan, refs in zip(batch, current, strict=True):
                    yield self._collect(plan, *refs)
                now = time.perf_counter()
                if chunk is None:
                    per_round = (now - last) / len(batch)
                    size = int(min(max(CALL_SECONDS / max(per_round, 1e-6), 1), MAX_ROUNDS_PER_CALL))
                last = now
                if batch[-1].snapshot:  # drop the references that keep the snapshot in the object store
                    current, submitted, refs = [], None, None
                    submit()
                    submit()
        except ACTOR_FAILURES:
            self._drain([submitted for _, submitted in inflight], current)
            raise

    @staticmethod
    def _drain(submitted: list[Any], rounds: list[Any], timeout_s: float = 30.0) -> None:
        """Fetch (and drop) the results of abandoned rounds, failed ones included, so that Ray does not report
        their errors as unhandled; best effort within ``timeout_s``."""
        refs = [ref for per_round in rounds for part in per_round for ref in part]
        for chunk in submitted:
            try:
                refs += [ref for per_round in ray.get(chunk, timeout=timeout_s) for part in per_round for ref in part]
            except (ray.exceptions.RayError, TimeoutError):
                continue
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                pass

    def _collect(self, plan: RoundPlan, loss_refs: list[Any], mix_refs: list[Any]) -> RoundMetrics:
        values = ray.get([*loss_refs, *mix_refs])  # one call: each costs the driver ~0.3 ms at N = 256
        train_loss, parts = np.concatenate(values[:len(loss_refs)]), values[len(loss_refs):]
        if plan.evaluate:
            metrics = combine_evaluations(plan.t, train_loss, [p["metrics"] for p in parts], self.n)
        else:
            metrics = RoundMetrics(plan.t, train_loss)
        if plan.snapshot:
            metrics.snapshot = combine_snapshots([p["snapshot"] for p in parts])
        metrics.records = {h.name: [p["records"][h.name] for p in parts] for h in self.hooks}
        return metrics

    def set_mixing_matrix(self, w: Any) -> None:
        """Use ``w`` [N, N] as W^t from the next submitted round on (call between ``run_rounds`` calls)."""
        self._mixing = w
        ray.get(self.coordinator.set_mixing_matrix.remote(w))

    def restore(self, snapshot: dict[str, np.ndarray] | None, timeout_s: float = 600.0) -> None:
        """Bring every group to ``snapshot`` (global arrays as in ``RoundMetrics.snapshot``; None: the
        initial state) in a new epoch, waiting up to ``timeout_s`` for restarted actors to come up. Rounds
        still queued from before are dropped by the groups (see ``ParticipantGroup``). The coordinator, which
        holds no state, is replaced by a fresh one (it may have been on a lost machine)."""
        if self.epoch > 0:
            ray.kill(self.coordinator)
            self.coordinator = Coordinator.remote(self._topology, self.plan.blocks, self.groups, self.config,
                                                  self.hooks)
            if self._mixing is not None:
                self.coordinator.set_mixing_matrix.remote(self._mixing)
        self.epoch += 1
        deadline = time.monotonic() + timeout_s

        def submit(g: int) -> Any:
            block = self.plan.blocks[g]
            arrays = None if snapshot is None else block_rows(snapshot, block)
            return self.groups[g].restore.remote(arrays, self.epoch, self._data[g])

        pending = {g: submit(g) for g in range(len(self.groups))}
        while pending:
            g, ref = next(iter(pending.items()))
            try:
                ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0))
                del pending[g]
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(f"participant-group actor {g} did not come back within {timeout_s:g} s after "
                                   "a failure (is there a machine with room for it?)") from None
            except ray.exceptions.RayActorError as err:  # still restarting: ask again
                if err.actor_init_failed:  # its creation task raised: it will fail the same way every time
                    cause = [line for line in str(err).strip().splitlines() if line.strip()][-1].strip()
                    raise RuntimeError(f"participant-group actor {g} cannot start: {cause} (what the run's config or "
                                       "methods name must be importable on every Ray worker: list such modules "
                                       "under imports, on the workers' PYTHONPATH)") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                pending[g] = submit(g)
        self._choose_transports()

    def _choose_transports(self) -> None:
        """Choose how half-steps travel between the groups where they now are (restarted groups may have moved),
        check every CUDA IPC pair, and tell the coordinator. Raises ``InputError`` (one line) if ``engine.transport``
        cannot be had there; under ``auto`` a pair whose CUDA IPC cannot be set up goes through the object store."""
        placements = ray.get([g.placement.remote() for g in self.groups])
        self.transports = self._check_transports(choose_transports(placements, self.transport), placements)
        self.coordinator.set_transports.remote(self.transports)  # after a restore, too: the groups may have moved

    def _check_transports(self, transports: list[list[str]], placements: list[Placement]) -> list[list[str]]:
        """Send a small tensor through every pair of ``transports`` on a device transport (CUDA IPC) and check what
        arrives, so that a transport that cannot be set up is known before the first round instead of failing (or
        killing actors) mid-round. Return ``transports`` with each such pair on the object store (a warning says
        which), or, where ``engine.transport`` is ``cuda_ipc``, raise ``InputError`` (one line)."""
        checked = [list(row) for row in transports]
        pairs = [(s, g, way) for s, row in enumerate(transports) for g, way in enumerate(row) if way != OBJECT_STORE]
        for s, g, way in pairs:
            try:
                sent = self.groups[s].probe.options(tensor_transport=way).remote()
                received = ray.get(self.groups[g].read_probe.remote(sent), timeout=PROBE_TIMEOUT_S)
                expected = (placements[s].device, [0.0, 1.0, 2.0, 3.0])  # on the sender's kind of device
                problem = None if received == expected else f"received {received}"
            except Exception as err:  # any failure means the transport is not there
                cause = getattr(err, "cause", None) or err  # a task's own exception, not Ray's wrapper of it
                problem = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
            if problem is None:
                continue
            failed = (f"{'CUDA IPC' if way == CUDA_IPC else way} from participant group {s} to group {g} (both on the "
                      f"{placements[s]}) could not be set up ({problem}; Ray's log above may say more)")
            if self.transport == CUDA_IPC:
                raise InputError(f"engine.transport 'cuda_ipc': {failed}; use auto or object_store (--transport)")
            warnings.warn(f"{failed}: its half-steps and messages go through Ray's object store instead "
                          "(engine.transport object_store says so without trying)", RuntimeWarning, stacklevel=2)
            checked[s][g] = OBJECT_STORE
        return checked

    def info(self) -> list[dict[str, Any]]:
        """Return each group's placement facts (threads, device, node IP, peak RSS) and how its half-steps reach
        each group (``transports``: ``object_store`` or ``cuda_ipc``; its own entry never travels)."""
        facts = ray.get([g.info.remote() for g in self.groups])
        return [{**fact, "transports": row} for fact, row in zip(facts, self.transports, strict=True)]

    def states(self) -> np.ndarray:
        """Return all participants' current states θ [N, D] in global order (large: on request only)."""
        return np.concatenate(ray.get([g.state.remote() for g in self.groups]))

    def close(self) -> None:
        """Stop the actors."""
        for actor in [self.coordinator, *self.groups]:
            ray.kill(actor)
