"""A participant block with its round hooks: the part of a round every engine runs where the block lives.

``HookedBlock`` calls the hooks (``dice_ray.hooks``) around the block's local step and gossip, in the order they
were given. Its two calls are the whole round body of one block, for the local engine and the Ray participant
groups alike (so the numbers are the same): ``local_step(t)``, then ``gossip(t, ...)`` with the half-steps and
messages of the blocks this one reads. The block's own half-step and messages never leave it; the rows of W^t are
converted to device tensors once per key (per topology, or per round of a time-varying one), so a round moves no
[P, D] tensor off the block's device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from dice_ray.core.participants import ParticipantBlock
from dice_ray.core.tensors import as_tensor, on_host, tensor_copies
from dice_ray.hooks import Inbox, RoundHook


@dataclass(frozen=True)
class HookInbox:
    """Where a hook's messages come from for one block: the global ids of the blocks it reads (in order), the
    position of the block's own among them (-1: not read) and the router's note (``Route.info``)."""

    ids: list[np.ndarray]
    own: int = -1
    info: Any = None


def mixing_key(version: int, t: int, time_varying: bool) -> tuple[int, int]:
    """The key under which a block holds its rows of W^t (``HookedBlock.set_weights``): ``version`` counts the
    replacements of W (collaborator selection); a time-varying topology has new rows every round t, a static one
    (or a replaced W) the same ones."""
    return version, (t if time_varying and version == 0 else 0)


class HookedBlock:
    """``block`` with one instance of each of ``hooks`` (classes), built for ``config``."""

    def __init__(self, block: ParticipantBlock, hooks: list[type[RoundHook]], config: Any):
        self.block = block
        self.hooks = {h.name: h(block, config) for h in hooks}
        self._weights: tuple[Any, list[sp.csr_array], list[torch.Tensor]] | None = None  # (key, rows, on device)

    def local_step(self, t: int) -> torch.Tensor:
        """Hooks' ``before_local_step``, the local step, hooks' ``after_local_step``; return the training losses [P]
        (on the block's device). The half-step states θ^{t+½} are ``block.population.state``, in place."""
        for name, hook in self.hooks.items():
            with self._observing(name, "before_local_step", t):
                hook.before_local_step(t)
        loss = self.block.half_step(t)
        for name, hook in self.hooks.items():
            with self._observing(name, "after_local_step", t):
                hook.after_local_step(t)
        return loss

    @contextlib.contextmanager
    def _observing(self, name: str, call: str, t: int) -> Iterator[None]:
        """Refuse a hook call that changes the participants' states or optimizer states (in place, or by replacing
        them): training would follow it, but DICE's replays and estimators, proximal influence, the ledger and the
        retraining reproduce the simulated world without it, and would measure another run. Free: torch counts a
        tensor's in-place changes (``_version``); a write through ``.data`` or a NumPy view escapes that count."""
        pop = self.block.population

        def seen() -> tuple:
            return ((id(pop.state), pop.state._version),
                    tuple((n, id(v), v._version) for n, v in sorted(pop.opt_state.items())))

        before = seen()
        yield
        if seen() != before:
            raise ValueError(f"hook {name!r} changed the participants' states in {call} of round {t}: a round hook "
                             "observes; what changes training is the simulated world (misbehavior), which the replays "
                             "and estimators reproduce")

    def message(self, name: str, t: int, local: bool) -> Any:
        """Hook ``name``'s message of round t (``local``: for this block itself, as the hook returned it; else with
        its tensors as numpy arrays, which travel through Ray's object store)."""
        with self._observing(name, "message", t):
            message = self.hooks[name].message(t, local)
        return message if local else on_host(message)

    def device_message(self, name: str, t: int) -> Any:
        """Hook ``name``'s message of round t for blocks that read it through a device transport (CUDA IPC): as the
        hook returns it for this block, its tensors copied onto the block's device (the readers may still map the
        copy while this block steps on; the transport carries tensors of one device)."""
        return tensor_copies(self.hooks[name].message(t, True), self.block.device)

    def set_weights(self, key: Any, rows: list[sp.csr_array] | None) -> None:
        """Hold ``rows`` (this block's rows of W^t over its mixing source blocks, scipy CSR) under ``key``, converted
        to the device once; ``rows`` None: keep the ones held, which must be ``key``'s."""
        if rows is not None:
            self._weights = key, list(rows), self.block.mixing_rows(list(rows))
        elif self._weights is None or self._weights[0] != key:
            raise RuntimeError(f"no rows of W received for {key}")

    def forget_weights(self) -> None:
        """Drop the held rows of W (a new coordinator sends them again)."""
        self._weights = None

    def gossip(self, t: int, mixing_ids: list[np.ndarray], own: int, halves: list[Any],
               inboxes: Mapping[str, HookInbox], received: Mapping[str, list[Any]]) -> dict[str, Any]:
        """Gossip of round t with the rows held by ``set_weights``, then every hook's ``after_gossip``; return their
        records by name.

        ``mixing_ids[b]``: global ids of the mixing source blocks; ``halves``: the half-step states [M_b, D] of those
        blocks other than this one (numpy from the object store, moved to the device here; or tensors already on
        it, e.g. mapped through CUDA IPC), ``own`` the position of this block's among them (-1: not read).
        ``inboxes``: the hooks that send this round, with ``received[name]`` the messages of the other blocks they
        read (this block's own is added at ``inboxes[name].own``).
        """
        _, rows, weights = self._weights
        device = self.block.device
        mine = {name: self.message(name, t, local=True) for name, where in inboxes.items() if where.own >= 0}
        sources = [as_tensor(h, device) if isinstance(h, np.ndarray) else h for h in halves]
        if own >= 0:
            sources.insert(own, self.block.population.state)  # read in place: mix_ reads sources before writing
        self.block.mix(weights, sources)
        boxes = {}
        for name in self.hooks:
            inbox = Inbox(rows, mixing_ids)
            if name in inboxes:
                where, messages = inboxes[name], list(received.get(name, []))
                if where.own >= 0:
                    messages.insert(where.own, mine[name])
                inbox.ids, inbox.messages, inbox.info = where.ids, messages, where.info
            boxes[name] = inbox
        return self.after_gossip(t, boxes)

    def after_gossip(self, t: int, inboxes: Mapping[str, Inbox]) -> dict[str, Any]:
        """Every hook's ``after_gossip`` with its inbox; return their records by name (tensors in them as numpy
        arrays: records go to the driver)."""
        records = {}
        for name, hook in self.hooks.items():
            with self._observing(name, "after_gossip", t):
                records[name] = on_host(hook.after_gossip(t, inboxes[name]))
        return records

    def snapshot(self, t: int, copy: bool = True) -> dict[str, np.ndarray]:
        """The block's state and every hook's snapshot after round t (one row per hosted participant); the block's
        arrays share its memory unless ``copy`` (see ``ParticipantBlock.snapshot``)."""
        arrays = self.block.snapshot(copy)
        for hook in self.hooks.values():
            arrays.update(on_host(hook.snapshot(t)))
        return arrays

    def restore(self, arrays: Mapping[str, np.ndarray] | None, block_too: bool = True) -> None:
        """Bring the block (unless ``block_too`` is False) and every hook to ``arrays`` (None: the initial state)."""
        if block_too:
            self.block.restore(arrays)
        for hook in self.hooks.values():
            hook.restore(arrays)
