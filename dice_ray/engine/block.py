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
        self.hooks: dict[str, RoundHook] = {}
        for hook in hooks:
            with self._observing(hook.name, "__init__"):
                self.hooks[hook.name] = hook(block, config)
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
    def _observing(self, name: str, call: str, t: int | None = None) -> Iterator[None]:
        """Refuse a hook call (of round ``t``) that changes what the participants train with: their states or
        optimizer states (in place, or by replacing them), the optimizer's settings, the loss, or their data (training
        splits, validation splits, z′, misbehaving participants' factors). Training would follow it, but DICE's
        replays and estimators, proximal influence, the ledger and the retraining reproduce the simulated world
        without it, and would measure another run. Free: torch counts a tensor's in-place changes (``_version``); a
        write through ``.data`` or a NumPy view escapes that count."""
        before = self._training_inputs()
        when = "" if t is None else f" of round {t}"
        try:
            yield
        except Exception as err:  # a bug in the hook: its traceback, and which hook and call (notes print with it)
            err.add_note(f"(raised in hook {name!r}'s {call}{when})")
            raise
        after = self._training_inputs()
        changed = next((what for what in before if after[what] != before[what]), None)
        if changed is not None:
            raise ValueError(f"hook {name!r} changed {changed} in {call}{when}: a round hook observes; what changes "
                             "training is the simulated world (misbehavior), which the replays and estimators "
                             "reproduce")

    def _training_inputs(self) -> dict[str, Any]:
        """What ``_observing`` compares, by what a message calls it: identities and in-place change counts of the
        tensors, identities and values of the settings."""
        block, pop = self.block, self.block.population

        def marks(*tensors: torch.Tensor | None) -> tuple:
            return tuple(None if v is None else (id(v), v._version) for v in tensors)

        return {"the participants' states": marks(pop.state),
                "their optimizer states": tuple((n, *marks(v)) for n, v in sorted(pop.opt_state.items())),
                "the optimizer's settings": (id(pop.optimizer), pop.optimizer),
                "the loss": id(pop.loss),
                "their data": marks(block.x_data, block.y_data, block.sample_rows, block.x_val, block.y_val,
                                    block.val_mask, block.x_heldout, block.y_heldout, block.misbehaving_factors)}

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
        with self._observing(name, "message", t):
            message = self.hooks[name].message(t, True)
        return tensor_copies(message, self.block.device)

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
        for name, hook in self.hooks.items():
            with self._observing(name, "snapshot", t):
                saved = on_host(hook.snapshot(t))
            taken = sorted(arrays.keys() & saved.keys())
            if taken:  # restore hands every hook the whole checkpoint: a shared key would be read by the wrong one
                raise ValueError(f"hook {name!r} saves {taken[0]!r} in its snapshot, a key the participants' state "
                                 f"or another hook saves already: name its keys '{name}.…'")
            arrays.update(saved)
        return arrays

    def restore(self, arrays: Mapping[str, np.ndarray] | None, block_too: bool = True) -> None:
        """Bring the block (unless ``block_too`` is False) and every hook to ``arrays`` (None: the initial state)."""
        if block_too:
            self.block.restore(arrays)
        for name, hook in self.hooks.items():
            with self._observing(name, "restore"):
                hook.restore(arrays)
