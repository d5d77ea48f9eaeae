"""What several round hooks of one participant block read each round, computed once: Δ^t and ∇L(θ^u; z′).

Proximal influence (concepts §5), the contribution ledger (§6) and in-loop DICE-E (§4) all read the update each
hosted participant k sends, Δ_k^t = θ_k^{t+½} − θ_k^t (with its optimizer-state change for DICE-E's curvature
and second-order variants), and the gradient of k's z′ loss at a round start, ∇L(θ_k^u; z′) (after gossip of
round t, θ = θ^{t+1}: u = t + 1). ``round_quantities(block)`` is the one ``RoundQuantities`` of a block that
their hooks share (none of them owns it): the first hook that asks computes, the others read. The engine calls
hooks in a fixed order at fixed points of the round (``dice_ray.hooks``), so what is read is the same whatever
method asked first. A hook that restores from a checkpoint calls ``forget``. Pure torch: no Ray here.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

import torch

from dice_ray.core.population import copy_model
from dice_ray.methods.dice.estimator import float64_losses
from dice_ray.methods.dice.recursion import carried_state

_SHARED: WeakKeyDictionary[Any, RoundQuantities] = WeakKeyDictionary()


def round_quantities(block: Any) -> RoundQuantities:
    """The ``RoundQuantities`` of ``block`` (a ``core.participants.ParticipantBlock``), made on first use."""
    if block not in _SHARED:
        _SHARED[block] = RoundQuantities(block)
    return _SHARED[block]


class RoundQuantities:
    """Δ^t and ∇L(θ^u; z′) of a block's hosted participants, each computed at most once per round.

    Per round t: ``keep_before(t)`` before the local step (by every hook that needs Δ^t), ``update(t)`` after it,
    ``gradients(u, zprime)`` whenever θ = θ^u. Only the latest round's values are kept.
    """

    def __init__(self, block: Any):
        self.block = block
        self._before: tuple[int, torch.Tensor, dict[str, torch.Tensor] | None] | None = None  # (t, θ^t, opt^t)
        self._update: tuple[int, torch.Tensor, dict[str, torch.Tensor]] | None = None  # (t, Δ^t, opt Δ^t)
        self._gradients: dict[str, Any] = {}  # "u": u, zprime -> ∇L(θ^u; z′)
        self._losses: dict[str, Any] = {}  # "u": u, zprime -> L(θ^u; z′)
        self._model64: torch.nn.Module | None = None

    def forget(self) -> None:
        """Drop everything kept (the block's state was restored)."""
        self._before = self._update = None
        self._gradients.clear()
        self._losses.clear()

    def keep_before(self, t: int, optimizer_state: bool = False) -> None:
        """Copy θ^t of the hosted participants before their local step of round t (once per round; with their
        optimizer state too if ``optimizer_state``)."""
        pop = self.block.population
        if self._before is None or self._before[0] != t:
            self._before, self._update = (t, pop.state.clone(), None), None
        if optimizer_state and self._before[2] is None:
            kept = carried_state(pop.optimizer, pop.opt_state)  # Adam's counter too: a skipped step's lag, 1
            self._before = (t, self._before[1], {n: pop.opt_state[n].clone() for n in kept})

    def update(self, t: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Δ^t = θ^{t+½} − θ^t [P, D] of the hosted participants (the update each sends: parameters and running
        statistics) and the change of
        their optimizer state ({} unless kept); call after the local step of round t, once ``keep_before(t)`` ran."""
        if self._update is None or self._update[0] != t:
            if self._before is None or self._before[0] != t:
                raise RuntimeError(f"Δ of round {t} asked for, but θ^{t} was not kept before the local step")
            pop = self.block.population
            _, state, opt = self._before
            self._update = (t, pop.state - state,
                            {} if opt is None else {n: pop.opt_state[n] - v for n, v in opt.items()})
            self._before = None  # θ^t is no longer needed
        return self._update[1], self._update[2]

    def gradients(self, u: int, zprime: str) -> torch.Tensor:
        """∇L(θ_k^u; z′_k) [P, D] over the state of every hosted k (eval mode), θ = θ^u now or when first asked;
        ``zprime`` "validation" (each participant's own validation split) or "heldout" (the shared held-out batch)."""
        return self._at(self._gradients, u, zprime, lambda: zprime_gradients(self.block, zprime))

    def losses(self, u: int, zprime: str) -> torch.Tensor:
        """L(θ_k^u; z′_k) [P] float64 of every hosted k (eval mode), θ = θ^u now or when first asked (``gradients``'
        z′): the term every exact readout at k shares."""
        block = self.block
        return self._at(self._losses, u, zprime, lambda: self.losses_at(
            torch.arange(block.size, device=block.device), block.population.state, zprime))

    def losses_at(self, pos: torch.Tensor, states: torch.Tensor, zprime: str) -> torch.Tensor:
        """L(θ; z′_k) [m] float64 at ``states`` [m, D] for the hosted rows ``pos`` [m] (z′_k as ``gradients`` reads
        it: k's validation split, or the shared held-out batch), eval mode, no graph, evaluated in float64: what exact
        readouts subtract (``estimator.float64_losses``)."""
        block, pop = self.block, self.block.population
        if self._model64 is None:
            self._model64 = copy_model(pop.model).double()
        if zprime == "heldout":
            return float64_losses(self._model64, pop.loss, states, block.x_heldout, block.y_heldout, shared_input=True)
        return float64_losses(self._model64, pop.loss, states, block.x_val[pos], block.y_val[pos],
                              sample_weights=block.val_mask[pos])

    @staticmethod
    def _at(kept: dict[str, Any], u: int, zprime: str, compute: Any) -> torch.Tensor:
        """``kept``'s value for ``zprime`` at round start u, computed now if not kept yet (a new u drops the old)."""
        if kept.get("u") != u:
            kept.clear()
            kept["u"] = u
        if zprime not in kept:
            kept[zprime] = compute()
        return kept[zprime]


def zprime_gradients(block: Any, zprime: str) -> torch.Tensor:
    """∇L(θ_k; z′_k) [P, D] (over the state: the running statistics an eval-mode loss reads too) of every
    participant k hosted by ``block`` at its current θ (eval mode)."""
    pop = block.population
    was_training = pop.model.training
    pop.model.eval()
    try:
        if zprime == "heldout":
            return pop.loss_and_grad(block.x_heldout, block.y_heldout, shared_input=True, of_state=True)[1]
        return pop.loss_and_grad(block.x_val, block.y_val, sample_weights=block.val_mask, of_state=True)[1]
    finally:
        pop.model.train(was_training)
