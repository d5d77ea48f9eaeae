"""The Ray actors: participant groups (each hosting a block of participants) and the coordinator.

Round t (concepts §1, Algorithm 1), as the coordinator drives it:

1. every group runs the local step of its participants and publishes the half-step states
   θ^{t+½} of its block to the object store (``half_step``: the states, when another group reads them there, the
   losses, then one message per hook), and, for groups
   that read it through CUDA IPC (``dice_ray.engine.transport``), a device copy (``publish``);
2. the coordinator hands each group the rows of W^t for its participants and the ObjectRefs of the
   blocks those rows read; Ray resolves them (zero-copy numpy on the same node, or the sender's device copy
   mapped through CUDA IPC) and the group mixes (``mix``), evaluating afterwards on evaluation rounds and
   snapshotting its block on checkpoint rounds.

Each group runs the round hooks it was given (``dice_ray.hooks``) around its local step and gossip. On rounds a
hook sends messages, each group publishes its message beside its half-step (one object per hook, so a group
reads only the messages it needs), by the same transport as its half-step to each reader (the object store, or a
device copy through CUDA IPC: ``publish_message``); the coordinator routes them by hook name to the groups that
read them (the mixing sources, or the hook's ``Router``), and ``mix`` returns every hook's record of the round.

Ray restarts a group that dies (it comes back empty); the driver then restores every group from the last
checkpoint (``restore``), replaces the coordinator (it holds no state) and replays the rounds since.

Parameters move only between groups, through the object store or CUDA IPC; the coordinator and the driver see
losses and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import scipy.sparse as sp

from dice_ray.config import load_imports
from dice_ray.core.topology import Topology
from dice_ray.engine.block import HookedBlock, HookInbox, mixing_key
from dice_ray.engine.runtime import peak_rss_mib, tune_allocator, worker_device
from dice_ray.engine.transport import CUDA_IPC, OBJECT_STORE, Placement
from dice_ray.hooks import RoundHook


@dataclass(frozen=True)
class MixSpec:
    """``ParticipantGroup.mix``'s arguments, by name. The ObjectRefs travel beside it as top-level arguments (Ray
    resolves only those), in the order ``counts`` names: the other groups' half-steps, then each sending hook's
    messages from the other groups it reads.

    ``weights`` = (key, [W_b] or None): this group's rows of W^t over the mixing source blocks (sent once per
    key; None: the ones received with that key); ``mixing_ids``: those blocks' global ids; ``own``: the position
    of this group's own block among them (-1: not read). ``inboxes``: the hooks that send this round.
    ``synchronize``: some half-steps or messages arrive through CUDA IPC (the senders' memory: read before the task
    returns).
    """

    weights: tuple[Any, list[sp.csr_array] | None]
    mixing_ids: list[np.ndarray]
    own: int
    evaluate: bool
    snapshot: bool
    epoch: int
    inboxes: dict[str, HookInbox] = field(default_factory=dict)
    counts: tuple[tuple[str, int], ...] = ()
    synchronize: bool = False

    def unpack(self, refs: tuple) -> dict[str, list[Any]]:
        """The resolved ``refs`` by name: "halves" and each sending hook's name."""
        out, at = {}, 0
        for name, count in self.counts:
            out[name] = list(refs[at: at + count])
            at += count
        if at != len(refs):
            raise RuntimeError(f"mix received {len(refs)} objects, its spec names {at}")
        return out


@dataclass(frozen=True)
class HalfStep:
    """The ObjectRefs of one group's round-t local step: its states by transport (``OBJECT_STORE``: numpy, None
    unless published; a device transport such as ``CUDA_IPC``: ``publish``'s device copy, present when a group
    reads it that way), training losses, and each hook's message by name, then by transport (likewise:
    ``half_step``'s host copy, ``publish_message``'s device copy)."""

    states: dict[str, Any]
    loss: Any
    messages: dict[str, dict[str, Any]]


@ray.remote
class ParticipantGroup:
    """A Ray actor hosting one ``ParticipantBlock`` and its round hooks; torch uses the CPUs (and GPU) Ray
    assigned.

    Round tasks carry the engine's *epoch*; ``restore`` starts a new one. After a failure, tasks of the
    abandoned rounds may still be queued here (they were submitted by the coordinator, the restore by
    the driver, and Ray orders tasks per caller only): they see an old epoch and do nothing.
    """

    def __init__(self, config: Any, input_shape: tuple[int, ...], num_classes: int, threads: int,
                 hooks: list[type[RoundHook]] | None = None):
        import torch

        tune_allocator()
        torch.set_num_threads(threads)
        load_imports(config)  # the user's registered models, data sets, losses
        self.config, self.input_shape, self.num_classes = config, input_shape, num_classes
        self.hook_classes = list(hooks or [])
        self.device = worker_device()
        self.hooked: HookedBlock | None = None  # built by the first ``restore``
        self.epoch = -1

    @property
    def block(self) -> Any:
        """The ``ParticipantBlock`` this group hosts."""
        return self.hooked.block

    def restore(self, arrays: dict[str, np.ndarray] | None, epoch: int, data: list[Any]) -> int:
        """Enter ``epoch`` with this block's state (and its hooks') set to ``arrays`` (a ``HookedBlock.snapshot``;
        None: the initial state); return the epoch. ``data`` holds ObjectRefs of (participant ids, x_train,
        y_train, training index lists, validation index lists, held-out batch z′, misbehaving ids): the first call
        (after creation or a restart) builds the block from them. The references travel with each call, not with
        the constructor, so Ray can restart this actor without keeping constructor arguments."""
        if self.hooked is None:
            from dice_ray.core.participants import ParticipantBlock

            nodes, x_train, y_train, train, val, heldout, misbehaving = ray.get(data)
            block = ParticipantBlock(self.config, nodes, x_train, y_train, train, val, heldout, self.input_shape,
                                     self.num_classes, device=self.device, misbehaving=misbehaving)
            self.hooked = HookedBlock(block, self.hook_classes, self.config)
            self.hooked.restore(arrays, block_too=arrays is not None)
        else:
            self.hooked.restore(arrays)
        self.epoch = epoch
        self.hooked.forget_weights()  # a new coordinator comes with a new epoch and sends its weights again
        return epoch

    def run_rounds(self, rounds: list[tuple[int, MixSpec]]) -> tuple:
        """``half_step`` then ``mix`` for each (t, spec) of ``rounds``, in order, in one task (call with
        ``num_returns`` = 2 × len(rounds)), for a group whose rows of W read no other group and whose half-step no
        other group reads (one group hosting everyone: the default on one machine). Several rounds per task keep
        Ray's per-task cost (~1 ms) off each round. Returns (train losses [P], ``mix``'s result) per round,
        flattened."""
        out: list[Any] = []
        for i, (t, spec) in enumerate(rounds):
            if spec.epoch != self.epoch:
                out += [None, None]
                continue
            loss = self.hooked.local_step(t)
            # A snapshot shares the block's memory until Ray copies the task's returns: only the last round's may.
            out += [loss, self.mix(t, spec, copy=i < len(rounds) - 1)]
        # The losses come to the host after every round is queued: on a GPU the host does not wait for each round.
        return tuple(v.cpu().numpy() if i % 2 == 0 and v is not None else v for i, v in enumerate(out))

    def half_step(self, t: int, publish: bool, messages: list[str], epoch: int) -> tuple:
        """Local step of round t (call with ``num_returns`` = 2 + the number of hooks): (half-step states [P, D]
        if ``publish``, else None; train losses [P]; then one message per hook, in hook order: the message of the
        hooks named in ``messages``, None for the others). The group's own half-step never leaves the process:
        ``mix`` reads it in place."""
        names = [h.name for h in self.hook_classes]
        if epoch != self.epoch:
            return (None, None, *[None] * len(names))
        loss = self.hooked.local_step(t)
        sent = [self.hooked.message(name, t, local=False) if name in messages else None for name in names]
        # Published only when another group reads it: on CPU a view of the state (Ray copies it into the object
        # store as the task ends; the next ``mix`` runs after that), from a GPU a host copy.
        half = self.block.population.state.cpu().numpy() if publish else None
        return half, loss.cpu().numpy(), *sent

    def publish(self, epoch: int) -> Any:
        """The half-step states θ^{t+½} [P, D] as a device copy, for Ray's CUDA IPC transport (call after
        ``half_step``, with ``tensor_transport``); None for a task of an abandoned epoch. A copy, because this group
        mixes its own state in place next while the readers may still be reading what it published."""
        if epoch != self.epoch:
            return None
        return self.block.population.state.detach().clone()

    def publish_message(self, name: str, t: int, epoch: int) -> Any:
        """Hook ``name``'s message of round t with its tensors copied on the device, for Ray's CUDA IPC transport
        (call after ``half_step``, with ``tensor_transport``); None for a task of an abandoned epoch."""
        if epoch != self.epoch:
            return None
        return self.hooked.device_message(name, t)

    def mix(self, t: int, spec: MixSpec, *refs: Any, copy: bool = False) -> dict[str, Any] | None:
        """Gossip (round t) over the source blocks, then every hook's ``after_gossip`` (see ``MixSpec``). Return
        ``{"metrics": evaluate() or None, "snapshot": the block's and hooks' snapshot or None, "records": hook name
        -> record}``, or None for a task of an abandoned epoch."""
        if spec.epoch != self.epoch:
            return None
        # The coordinator sends each key's rows once, before the rounds that reuse them.
        self.hooked.set_weights(*spec.weights)
        received = spec.unpack(refs)
        try:
            records = self.hooked.gossip(t, spec.mixing_ids, spec.own, received.pop("halves"), spec.inboxes, received)
        finally:
            if spec.synchronize:
                import torch

                # Half-steps and messages mapped through CUDA IPC are the senders' memory, which they free or reuse
                # once this task is done (or failed): the kernels queued on this stream must have read them first.
                torch.cuda.current_stream(self.block.device).synchronize()
        return {"metrics": self.block.evaluate() if spec.evaluate else None,
                "snapshot": self.hooked.snapshot(t, copy=copy) if spec.snapshot else None, "records": records}

    def info(self) -> dict[str, Any]:
        """Return placement facts: torch threads, device, node IP, placement group (None outside one), peak
        RSS (MiB) of this process, and on a GPU how the local step ran (``ParticipantBlock.cuda_graph``)."""
        import torch

        return {"threads": torch.get_num_threads(), "device": str(self.block.device),
                "cuda_graph": self.block.cuda_graph,
                "node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "placement_group": ray.get_runtime_context().get_placement_group_id(),
                "peak_rss_mib": peak_rss_mib()}

    def state(self) -> np.ndarray:
        """Return this block's current states θ^t [P, D] (only when a user asks to save them)."""
        return self.block.population.state.cpu().numpy()

    def placement(self) -> Placement:
        """Where this group computes (its device, node and GPU): what the choice of transports reads."""
        gpus = ray.get_gpu_ids()
        gpu = str(gpus[0]) if self.device == "cuda" and gpus else None
        return Placement(self.device, ray.get_runtime_context().get_node_id(), gpu)

    def probe(self) -> Any:
        """A small tensor [4] = (0, 1, 2, 3) on this group's device: sent through a transport to check it at start."""
        import torch

        return torch.arange(4, dtype=torch.float32, device=self.device)

    def read_probe(self, probe: Any) -> tuple[str, list[float]]:
        """The device type and values of a ``probe`` received from another group."""
        return probe.device.type, probe.tolist()


# Ray enables its tensor transport per actor class, not per actor (it then runs the actor's tasks on a thread of their
# own and moves tensors on others): the same group class, for runs whose groups may exchange through CUDA IPC.
ParticipantGroupWithTransport = ray.remote(enable_tensor_transport=True)(ParticipantGroup.__ray_actor_class__)


@ray.remote(num_cpus=0)
class Coordinator:
    """Advances synchronous rounds over the participant groups (see the module docstring)."""

    def __init__(self, topology: Topology, blocks: list[np.ndarray], groups: list[Any], config: Any,
                 hooks: list[type[RoundHook]] | None = None):
        self.topology = topology
        self.config = config
        self.blocks = blocks
        self.groups = groups
        # transports[s][g]: how group s's half-step travels to group g (``set_transports``)
        self.transports = [[OBJECT_STORE] * len(groups) for _ in groups]
        self.hook_names = [h.name for h in hooks or []]
        self.sends = {h.name: h.sends(config) for h in hooks or []}
        self.routers = {h.name: h.router(config, topology, blocks, self._mixing_at) for h in hooks or []
                        if h.router is not None}
        self.owner = np.empty(topology.n, np.int64)  # owner[l]: the group hosting participant l
        for g, block in enumerate(blocks):
            self.owner[block] = g
        self._routes: dict[Any, list[list[tuple[int, sp.csr_array]]]] = {}
        self._mixing: sp.csr_array | None = None  # set by collaborator selection: replaces W from then on
        self._version = 0  # bumped when W is replaced: part of the weights' cache key
        self._sent: list[Any] = [None] * len(groups)  # the weights key each group holds
        self._round_reads: tuple[Any, list[str], dict[str, Any]] = (None, [], {})  # (t, epoch), senders, their reads

    def _mixing_at(self, t: int) -> Any:
        return self.topology.mixing_matrix(t) if self._mixing is None else self._mixing

    def set_transports(self, transports: list[list[str]]) -> None:
        """Send group s's half-steps and messages to group g by ``transports[s][g]`` (``OBJECT_STORE`` or a device
        transport such as ``CUDA_IPC``; see ``dice_ray.engine.transport.choose_transports``) from the next submitted
        round on."""
        self.transports = transports

    def set_mixing_matrix(self, w: sp.csr_array) -> None:
        """Use ``w`` [N, N] as W^t for every later round (collaborator selection rewires the graph)."""
        self._mixing = sp.csr_array(w)
        self._routes.clear()
        self._version += 1

    def _route_key(self, t: int) -> tuple[int, int]:
        return mixing_key(self._version, t, self.topology.time_varying)

    def _weights(self, g: int, t: int, route: list[tuple[int, sp.csr_array]]) -> tuple[Any, Any]:
        """``MixSpec.weights`` for group g: the weights the first time a key is used, then the key."""
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
            w = self._mixing_at(t)
            routes = []
            for block in self.blocks:
                rows = sp.csr_array(w[block])
                sources = sorted(set(self.owner[rows.indices].tolist()))
                routes.append([(s, sp.csr_array(rows[:, self.blocks[s]])) for s in sources])
            if not self.topology.time_varying:
                self._routes.clear()
            self._routes[key] = routes
        return self._routes[key]

    def _reads(self, t: int, sending: list[str],
               routes: list[list[tuple[int, sp.csr_array]]]) -> dict[str, list[tuple[list[int], Any]]]:
        """Per sending hook, per group: (the groups whose messages it reads, the router's note)."""
        out = {}
        for name in sending:
            if name in self.routers:
                out[name] = [(r.sources, r.info) for r in self.routers[name].routes(t)]
            else:
                out[name] = [([s for s, _ in route], None) for route in routes]
        return out

    def alone(self, routes: list[list[tuple[int, sp.csr_array]]]) -> bool:
        """Whether one group hosts everyone (it reads only itself): its rounds need nothing passed between tasks."""
        return len(self.groups) == 1 and bool(routes[0]) and routes[0][0][0] == 0

    def submit_rounds(self, rounds: list[tuple[int, bool, bool]], epoch: int) -> list[tuple[list[Any], list[Any]]]:
        """Queue each (t, evaluate, snapshot) of ``rounds`` of ``epoch`` on the groups, in order, without waiting;
        return per round the ObjectRefs of (per-group train losses, per-group mix results). One call for several
        rounds keeps the coordinator's and driver's CPU time per round small; when one group hosts everyone, the
        rounds go to it as ONE task (``ParticipantGroup.run_rounds``: they need nothing from the driver, whose
        round loop ends a call at every round a driver hook acts on)."""
        if rounds and self.alone(self._route(rounds[0][0])):
            specs = [(t, self._mix_spec(0, t, evaluate, snapshot, epoch)[0]) for t, evaluate, snapshot in rounds]
            refs = self.groups[0].run_rounds.options(num_returns=2 * len(specs)).remote(specs)
            return [([refs[2 * i]], [refs[2 * i + 1]]) for i in range(len(specs))]
        return [self.submit_round(t, evaluate, snapshot, epoch) for t, evaluate, snapshot in rounds]

    def _senders(self, t: int, epoch: int, routes: list[list[tuple[int, sp.csr_array]]]
                 ) -> tuple[list[str], dict[str, list[tuple[list[int], Any]]]]:
        """The hooks that send in round t and, per sending hook and group, what it reads (``_reads``): once per
        round, for every group's ``MixSpec``."""
        if self._round_reads[0] != (t, epoch):
            sending = [name for name in self.hook_names if self.sends[name](t)]
            self._round_reads = (t, epoch), sending, self._reads(t, sending, routes)
        return self._round_reads[1], self._round_reads[2]

    def _mix_spec(self, g: int, t: int, evaluate: bool, snapshot: bool, epoch: int,
                  halves: list[HalfStep] | None = None) -> tuple[MixSpec, list[Any]]:
        """Group g's ``MixSpec`` of round t and the ObjectRefs that travel beside it (the other groups' half-steps
        and messages it reads, from ``halves``; none when it reads only itself)."""
        routes = self._route(t)
        sending, reads = self._senders(t, epoch, routes)
        route = routes[g]
        own = next((i for i, (s, _) in enumerate(route) if s == g), -1)
        others = [s for s, _ in route if s != g] if halves else []
        ways = [self.transports[s][g] for s in others]
        refs = [halves[s].states[way] for s, way in zip(others, ways, strict=True)]
        counts, inboxes = [("halves", len(refs))], {}
        for name in sending:
            sources, info = reads[name][g]
            senders = [s for s in sources if s != g] if halves else []
            ways += [self.transports[s][g] for s in senders]
            inboxes[name] = HookInbox([self.blocks[s] for s in sources], sources.index(g) if g in sources else -1, info)
            counts.append((name, len(senders)))
            refs += [halves[s].messages[name][self.transports[s][g]] for s in senders]
        return MixSpec(self._weights(g, t, route), [self.blocks[s] for s, _ in route], own, evaluate, snapshot,
                       epoch, inboxes, tuple(counts), CUDA_IPC in ways), refs

    def submit_round(self, t: int, evaluate: bool, snapshot: bool = False,
                     epoch: int = 0) -> tuple[list[Any], list[Any]]:
        """Queue round t of ``epoch`` on every group without waiting; return the ObjectRefs of (per-group
        train losses, per-group mix results). Groups run their tasks in submission order, so rounds queued
        back to back keep every group busy while the driver collects earlier rounds' metrics. Hooks' messages
        travel on the rounds they send, to the groups that read them."""
        routes = self._route(t)
        if self.alone(routes):
            return self.submit_rounds([(t, evaluate, snapshot)], epoch)[0]
        sending, reads = self._senders(t, epoch, routes)
        # (s, transport): group s's half-step is read by another group through that transport
        published = {(s, self.transports[s][g]) for g, route in enumerate(routes) for s, _ in route if s != g}
        # (name, s, transport): hook name's message from group s is read by another group through that transport
        sent = {(name, s, self.transports[s][g]) for name in sending for g, (sources, _) in enumerate(reads[name])
                for s in sources if s != g}
        halves = []
        for g, group in enumerate(self.groups):
            refs = group.half_step.options(num_returns=2 + len(self.hook_names)).remote(
                t, (g, OBJECT_STORE) in published, [name for name in sending if (name, g, OBJECT_STORE) in sent], epoch)
            states = {OBJECT_STORE: refs[0]}
            messages = {name: {OBJECT_STORE: ref} for name, ref in zip(self.hook_names, refs[2:], strict=True)}
            # Device copies, for the groups that read this one through a device transport (CUDA IPC)
            for way in sorted({way for s, way in published if s == g and way != OBJECT_STORE}):
                states[way] = group.publish.options(tensor_transport=way).remote(epoch)
            for name, s, way in sorted(sent):
                if s == g and way != OBJECT_STORE:
                    messages[name][way] = group.publish_message.options(tensor_transport=way).remote(name, t, epoch)
            halves.append(HalfStep(states, refs[1], messages))
        mixed = []
        for g, group in enumerate(self.groups):
            mix_spec, refs = self._mix_spec(g, t, evaluate, snapshot, epoch, halves)
            mixed.append(group.mix.remote(t, mix_spec, *refs))
        return [h.loss for h in halves], mixed
