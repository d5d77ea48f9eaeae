"""Partitions of the training split over participants (IID, Dirichlet, shards), participant weights q_k.

A ``Partition`` says which training indices form each participant's local set D_k (and its local validation
split, the z'_k of concepts §5). Everything here is numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dice_ray.data.datasets import check_seed
from dice_ray.errors import InputError

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards")
WEIGHT_RULES: tuple[str, ...] = ("uniform", "data-size")
_DIRICHLET_TRIES = 100


@dataclass(frozen=True)
class Partition:
    """Which training indices each participant holds.

    ``train[k]`` int64 [n_k]: indices into ``Dataset.x_train`` forming k's local training set D_k.
    ``val[k]`` int64 [v_k]: k's local validation split (z'_k), disjoint from every ``train`` part.
    Over all participants the parts are disjoint and cover the training indices exactly once (unless
    ``shrink_partition`` dropped some: those go to nobody).
    """

    train: list[np.ndarray]
    val: list[np.ndarray]


# ----------------------------------------------------------------------------------------------------
# Partitions
# ----------------------------------------------------------------------------------------------------


def partition_data(
    labels: np.ndarray,
    n_nodes: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    shards_per_node: int = 2,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Partition:
    """Split training indices 0..len(labels)-1 over ``n_nodes`` participants; returns a ``Partition``.

    Schemes (``SCHEMES``): ``iid`` (shuffle, near-equal parts); ``dirichlet`` (per class, node shares
    ~ Dirichlet(alpha), Hsu et al. 2019; smaller alpha = more skew); ``shards`` (sort by label, cut into
    n_nodes*shards_per_node shards, each node gets shards_per_node of them, McMahan et al. 2017).
    Each node's samples are then split into val (round(val_fraction * n_k), at least 1 if
    val_fraction > 0 and n_k >= 2, and always leaving one for training) and train (the rest). Index
    arrays are int64 and sorted. Deterministic from ``seed``.
    """
    labels = np.asarray(labels)
    if scheme not in SCHEMES:
        raise InputError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    classes = labels.ndim == 1 and (not labels.size or np.issubdtype(labels.dtype, np.integer))
    if not classes and (scheme != "iid" or labels.ndim not in (1, 2)):  # regression targets: only iid splits
        raise InputError(f"partition {scheme!r} needs class labels (a 1-d integer array), got dtype {labels.dtype} "
                         f"shape {labels.shape}" + ("; regression targets partition iid" if scheme != "iid" else ""))
    n = len(labels)
    if int(n_nodes) != n_nodes or n_nodes < 1:
        raise InputError(f"nodes (--nodes) {n_nodes} must be a positive integer")
    n_nodes = int(n_nodes)
    if n_nodes > n:
        raise InputError(f"nodes (--nodes) {n_nodes} is more than the {n} training samples; use fewer nodes")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"data.val_fraction (--val-fraction) {val_fraction} must be in [0, 1)")
    check_seed(seed)
    rng = np.random.default_rng(seed)

    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), n_nodes)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise InputError(f"data.alpha (--alpha) {alpha} must be positive")
        parts = _dirichlet_parts(labels, n_nodes, alpha, rng)
    else:
        if int(shards_per_node) != shards_per_node or shards_per_node < 1:
            raise InputError(f"data.shards_per_node (--shards-per-node) {shards_per_node} must be a positive integer")
        n_shards = n_nodes * int(shards_per_node)
        if n_shards > n:
            raise InputError(
                f"{n_nodes} nodes x data.shards_per_node (--shards-per-node) {shards_per_node} = {n_shards} shards, "
                f"more than the {n} training samples; use fewer nodes or shards"
            )
        # Shuffle first so ties (same label) are broken at random, then a stable sort by label.
        order = rng.permutation(n)
        order = order[np.argsort(labels[order], kind="stable")]
        shards = np.array_split(order, n_shards)
        owner = rng.permutation(n_shards).reshape(n_nodes, int(shards_per_node))
        parts = [np.concatenate([shards[s] for s in row]) for row in owner]

    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for part in parts:
        part = rng.permutation(np.asarray(part, np.int64))
        n_k = len(part)
        n_val = int(round(val_fraction * n_k))
        if val_fraction > 0 and n_k >= 2:
            n_val = max(n_val, 1)
        n_val = min(n_val, max(n_k - 1, 0))
        val.append(np.sort(part[:n_val]))
        train.append(np.sort(part[n_val:]))
    return Partition(train=train, val=val)


def _dirichlet_parts(
    labels: np.ndarray, n_nodes: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class c, shuffle its indices and cut them by proportions p_c ~ Dir(alpha * 1_N); redraw until
    no node is empty."""
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _ in range(_DIRICHLET_TRIES):
        chunks: list[list[np.ndarray]] = [[] for _ in range(n_nodes)]
        for idx in by_class:
            p = rng.dirichlet(np.full(n_nodes, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for k, piece in enumerate(np.split(idx, cuts)):
                chunks[k].append(piece)
        parts = [np.concatenate(c) for c in chunks]
        if min(len(p) for p in parts) > 0:
            return parts
    raise InputError(
        f"dirichlet partition with data.alpha (--alpha) {alpha} left a participant without samples in "
        f"{_DIRICHLET_TRIES} draws ({len(labels)} samples over {n_nodes} nodes); use a larger data.alpha or fewer nodes"
    )


def shrink_partition(partition: Partition, ids: list[int], fraction: float, seed: int = 0) -> Partition:
    """Return ``partition`` with round(fraction * n_k) of each listed participant k's training samples dropped
    (a seeded choice; the dropped samples go to nobody; validation splits unchanged). Fraction 1: no data."""
    train = list(partition.train)
    for k in sorted(set(ids)):
        rng = np.random.default_rng([seed, k, 3])
        keep = len(train[k]) - int(round(fraction * len(train[k])))
        train[k] = np.sort(rng.permutation(train[k])[:keep]).astype(np.int64)
    return Partition(train, list(partition.val))


def check_partition(partition: Partition, batch_size: int) -> None:
    """Raise ``InputError`` naming the first participant whose train part is smaller than ``batch_size``
    (minibatches are drawn without replacement); returns None otherwise. A participant without training data
    (``shrink_partition`` with fraction 1) passes: it takes no local step."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise InputError(f"optim.batch_size (--batch-size) {batch_size} must be a positive integer")
    sizes = np.array([len(t) for t in partition.train], np.int64)
    short = np.flatnonzero((sizes < batch_size) & (sizes > 0))
    if len(short):
        k = int(short[0])
        total = int(sizes.sum() + sum(len(v) for v in partition.val))
        raise InputError(
            f"participant {k} has {sizes[k]} training samples, fewer than optim.batch_size (--batch-size) {batch_size} "
            f"(smallest partition {sizes.min()} of {total} training samples over {len(sizes)} participants); "
            "use a smaller batch size, fewer nodes or a larger data set"
        )


def participant_weights(partition: Partition, rule: str = "uniform") -> np.ndarray:
    """The participant weights q_k (concepts §1): float64 [N], summing to 1. ``uniform``: 1/N;
    ``data-size``: proportional to |D_k| = len(partition.train[k])."""
    n_nodes = len(partition.train)
    if n_nodes == 0:
        raise InputError("the partition has no participants")
    if rule == "uniform":
        return np.full(n_nodes, 1.0 / n_nodes)
    if rule == "data-size":
        sizes = np.array([len(t) for t in partition.train], np.float64)
        if sizes.sum() <= 0:
            raise InputError("weight rule 'data-size' needs training samples, but every participant has none")
        return sizes / sizes.sum()
    raise InputError(f"unknown weight rule {rule!r}; choose one of {', '.join(WEIGHT_RULES)}")


