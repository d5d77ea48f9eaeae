"""DICE-E of every source at once on one target quantity: the adjoint form (concepts §4).

For the horizon total Σ_k q_k e_k^{(R)} of a probe at round t, the forward recursion needs one
propagation per source. Propagating the target's gradient backwards instead — through Wᵀ (gossip) and
Jᵀ (each local step, a vector-Jacobian product through the optimizer) — gives one adjoint vector c_j per
participant, and every source's estimate is a dot product:

    a^{(R)} = (q_k ∇L(θ_k^{t+R}; z′))_k,   a^{(s)} = Jᵀ (W^{t+s})ᵀ a^{(s+1)},   E_j = ((W^t)ᵀ a^{(1)})_j · Δ_j.

Cost: R − 1 batched vector-Jacobian products over all N participants plus N test gradients, whatever the
number of sources.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import torch
from torch.func import vjp

from dice_ray.methods.dice.estimator import VARIANTS, Window
from dice_ray.methods.dice.recursion import COUNTER, counter_difference


def _transpose_mix(w, a: torch.Tensor) -> torch.Tensor:
    """(Wᵀ a) for a scipy CSR W [N, N] and a [N, D] (on a's device)."""
    return torch.as_tensor(w.T.toarray(), dtype=a.dtype, device=a.device) @ a


def adjoint_horizon(window: Window, q: np.ndarray, hops: int, variant: str = "curvature",
                    deltas: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None) -> np.ndarray:
    """Return the DICE-E horizon total Σ_k q_k e_k^{(hops)} of the whole-batch probe (j, t0) for every
    participant j: float64 [N]. ``deltas`` maps j to (Δ_j, optimizer-state Δ_j); default: each j's actual
    update at t0 (``update_difference``)."""
    from dice_ray.methods.dice.estimator import update_difference

    if variant not in VARIANTS[:2]:  # second-order: b is quadratic in each source's own a, no shared adjoint
        raise ValueError(f"variant {variant!r} has no adjoint form; choose one of {', '.join(VARIANTS[:2])}")
    traj = window.trajectory
    n = traj.states[0].shape[0]
    everyone = np.arange(n)
    weights = torch.as_tensor(q, dtype=traj.states[0].dtype, device=traj.states[0].device)
    adjoint = weights[:, None] * window.test_gradients(hops, everyone)
    adjoint_opt: dict[str, torch.Tensor] = {}
    counted = variant == "curvature" and window.optimizer.counts_steps
    lagged = torch.zeros(n, dtype=adjoint.dtype, device=adjoint.device)  # Σ_s (Wᵀa)_j · D_j^s, Adam's lag terms
    for s in range(hops - 1, 0, -1):
        mixed = _transpose_mix(traj.mixing[s], adjoint)
        if variant == "first-order":
            adjoint = mixed
            continue
        pop = window.population(s, everyone)
        opt = {name: value.clone() for name, value in traj.opt_states[s].items()}
        x, y = window.batches(traj.t0 + s)
        if counted:  # a source's counter lags by 1 after its skipped step: its later steps move by D (recursion)
            lagged += (mixed * _counter_difference(window, s, everyone)).sum(dim=1)
        step = functools.partial(pop.functional_state_step, x=x, y=y)
        _, pullback = vjp(step, pop.state, opt)
        cotangent_opt = {name: adjoint_opt.get(name, torch.zeros_like(value)) for name, value in opt.items()}
        adjoint, adjoint_opt = pullback((mixed, cotangent_opt))
        adjoint_opt = {name: value for name, value in adjoint_opt.items() if name != COUNTER}
    first = _transpose_mix(traj.mixing[0], adjoint)
    out = np.zeros(n)
    for j in everyone.tolist():
        delta, opt_delta = deltas[j] if deltas is not None else update_difference(window, j)
        total = first[j] @ delta
        if variant == "curvature":
            total = total + sum((adjoint_opt[name][j] * value).sum() for name, value in opt_delta.items()
                                if name in adjoint_opt)
            if counted and COUNTER in opt_delta:
                total = total + lagged[j] * opt_delta[COUNTER].to(lagged.dtype)
        out[j] = float(total)
    return out


def _counter_difference(window: Window, s: int, everyone: np.ndarray) -> torch.Tensor:
    """O_l(θ_l, n_l) − O_l(θ_l, n_l − 1) [N, D] of every participant at round t0+s of the window (times c_l
    where l sends θ + cΔ): what a counter one behind changes in l's step (``recursion.counter_difference``). The
    adjoint is shared by every source, so it keeps J at the factual counter where the forward recursion takes the
    source's own at the lagging one: under Adam the two differ by that change of J along δ (2-3% of the horizon
    totals on an 8-node exponential graph at round 2, η 0.01 and 0.0025; 12% without these terms), and are equal
    for SGD and momentum (``tests/methods/test_influence.py``)."""
    steps = window.local_steps(s, everyone)
    ones = torch.ones_like(steps.opt_state[COUNTER])
    behind = replace(steps, opt_state={**steps.opt_state, COUNTER: steps.opt_state[COUNTER] - ones})
    rows = torch.arange(len(everyone), device=ones.device)
    return counter_difference(behind, rows, ones)[0].detach()
