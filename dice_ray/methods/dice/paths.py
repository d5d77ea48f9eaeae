"""Theorem 2 of the paper, literally: DICE-E as a sum over communication paths. A test oracle only.

    e_k^{(s)} = Σ_{paths j = l_0 → l_1 → … → l_s = k}  (Π_{i=1..s} W^{t+i-1}_{l_i l_{i-1}})
                 ∇L(θ_k^{t+s}; z′)ᵀ  J_{l_{s-1}}^{t+s-1} ⋯ J_{l_1}^{t+1}  Δ

(communication × curvature × optimization). Every path is walked separately, so the cost grows like
degree^s; ``estimator.estimate_cascade`` computes the same numbers with a recursion in O(s · edges).
Supports plain SGD (a state-free optimizer), as the theorem does.
"""

from __future__ import annotations

import numpy as np
import torch

from dice_ray.methods.dice.estimator import Cascade, Window
from dice_ray.methods.dice.trajectory import reach


def path_cascade(window: Window, source: int, delta: torch.Tensor, hops: int,
                 variant: str = "curvature") -> Cascade:
    """Return the cascade of Theorem 2 by enumerating every path of length 1..``hops`` from ``source``."""
    if window.optimizer.name != "sgd":
        raise ValueError("path enumeration covers plain SGD only")
    traj = window.trajectory
    supports = reach(traj.mixing[:hops], source)
    values = [np.zeros(1)] + [np.zeros(len(supports[s])) for s in range(1, hops + 1)]
    gradients = {s: window.test_gradients(s, supports[s]) for s in range(1, hops + 1)}

    def walk(node: int, s: int, weight: float, vector: torch.Tensor) -> None:
        # ``vector`` is J_{l_{s-1}} ⋯ J_{l_1} Δ for the path so far, which ends at ``node`` after s steps.
        pos = int(np.searchsorted(supports[s], node))
        values[s][pos] += weight * float(gradients[s][pos] @ vector)
        if s == hops:
            return
        if variant == "curvature":
            vector = window.jvp_step(s, np.array([node]), vector[None], {})[0][0]
        column = traj.mixing[s][:, [node]].tocoo()
        for nxt, w in zip(column.row.tolist(), column.data.tolist(), strict=True):
            if w != 0:
                walk(nxt, s + 1, weight * w, vector)

    first = traj.mixing[0][:, [source]].tocoo()
    for node, w in zip(first.row.tolist(), first.data.tolist(), strict=True):
        if w != 0:
            walk(node, 1, w, delta)
    half = float(window.test_gradients(0, np.array([source]))[0] @ delta)
    return Cascade(source, half, supports, values)
