"""Misbehaving participants (concepts §5): who misbehaves, and how their data or updates are corrupted.

Kinds: ``label-flip`` (a share of k's training labels y → C−1−y), ``feature-noise`` (Gaussian noise of
std σ added to k's training inputs), ``sign-flip`` (k sends θ − Δ instead of θ + Δ), ``scale`` (θ + cΔ),
``free-ride`` (k sends the model it received, without training: Δ = 0). Every choice is a pure function of
(seed, participant), so the same participants misbehave the same way however they are placed.
"""

from __future__ import annotations

import numpy as np

from dice_ray.core.topology import Topology

DATA_KINDS = ("label-flip", "feature-noise")
UPDATE_KINDS = ("sign-flip", "scale", "free-ride")
KINDS = ("none", *DATA_KINDS, *UPDATE_KINDS)


def misbehaving_participants(kind: str, nodes: int, count: int, selection: str, topology: Topology,
                             seed: int, ids: list[int] | None = None) -> np.ndarray:
    """Return the sorted ids of the misbehaving participants (empty for kind ``none``).

    selection: ``random`` (``count`` drawn from ``seed``), ``ids`` (exactly ``ids``), or ``degree``
    (the ``count`` participants with the most in-neighbours in W^0, ties by id).
    """
    if kind == "none":
        return np.zeros(0, np.int64)
    if selection == "ids":
        return np.array(sorted(set(ids or [])), np.int64)
    if selection == "degree":
        degree = np.asarray(topology.adjacency(0).sum(axis=1)).ravel()
        order = np.lexsort((np.arange(nodes), -degree))
        return np.sort(order[:count]).astype(np.int64)
    rng = np.random.default_rng([seed, 7919])
    return np.sort(rng.choice(nodes, count, replace=False)).astype(np.int64)


def corrupt_data(kind: str, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int, participant: int,
                 flip_fraction: float = 1.0, sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Return copies of participant ``participant``'s training inputs x [n, ...] and labels y [n], corrupted
    by ``kind`` (label-flip: a ``flip_fraction`` share of labels y → C−1−y; feature-noise: x + σ ε)."""
    rng = np.random.default_rng([seed, participant, 104729])
    x, y = x.copy(), y.copy()
    if kind == "label-flip":
        flipped = rng.choice(len(y), int(round(flip_fraction * len(y))), replace=False)
        y[flipped] = num_classes - 1 - y[flipped]
    elif kind == "feature-noise":
        x += (sigma * rng.standard_normal(x.shape)).astype(x.dtype)
    return x, y


def update_factor(kind: str, factor: float) -> float:
    """The factor c of a corrupted update θ + cΔ: −1 (sign-flip), ``factor`` (scale), 0 (free-ride)."""
    return {"sign-flip": -1.0, "scale": factor, "free-ride": 0.0}[kind]
