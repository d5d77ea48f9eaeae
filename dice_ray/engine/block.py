"""A participant block with its round hooks: the part of a round every engine runs where the block lives.

``HookedBlock`` calls the hooks (``dice_ray.hooks``) around the block's local step and gossip, in the order they
were given; ``LocalEngine`` and the Ray participant groups use it alike, so the numbers are the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dice_ray.core.participants import ParticipantBlock
from dice_ray.hooks import Inbox, RoundHook


class HookedBlock:
    """``block`` with one instance of each of ``hooks`` (classes), built for ``config``."""

    def __init__(self, block: ParticipantBlock, hooks: list[type[RoundHook]], config: Any):
        self.block = block
        self.hooks = {h.name: h(block, config) for h in hooks}

    def local_step(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Hooks' ``before_local_step``, the local step, hooks' ``after_local_step``; return the block's
        (half-step states θ^{t+½} [P, D], training losses [P])."""
        for hook in self.hooks.values():
            hook.before_local_step(t)
        half, loss = self.block.half_step(t)
        for hook in self.hooks.values():
            hook.after_local_step(t)
        return half, loss

    def message(self, name: str, t: int, local: bool) -> Any:
        """Hook ``name``'s message of round t (``local``: for this block itself)."""
        return self.hooks[name].message(t, local)

    def after_gossip(self, t: int, inboxes: Mapping[str, Inbox]) -> dict[str, Any]:
        """Every hook's ``after_gossip`` with its inbox; return their records by name."""
        return {name: hook.after_gossip(t, inboxes[name]) for name, hook in self.hooks.items()}

    def snapshot(self, t: int, copy: bool = True) -> dict[str, np.ndarray]:
        """The block's state and every hook's snapshot after round t (one row per hosted participant); the block's
        arrays share its memory unless ``copy`` (see ``ParticipantBlock.snapshot``)."""
        arrays = self.block.snapshot(copy)
        for hook in self.hooks.values():
            arrays.update(hook.snapshot(t))
        return arrays

    def restore(self, arrays: Mapping[str, np.ndarray] | None, block_too: bool = True) -> None:
        """Bring the block (unless ``block_too`` is False) and every hook to ``arrays`` (None: the initial state)."""
        if block_too:
            self.block.restore(arrays)
        for hook in self.hooks.values():
            hook.restore(arrays)
