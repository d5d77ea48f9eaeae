"""What one round reports back to the driver (small arrays, never parameters)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from dice_ray.checkpoint import Rows

# The most rounds an engine runs before their metrics reach the driver (Ray: per coordinator call; on a GPU, the
# local engine too): the host then waits for the device once per so many rounds, not every round.
MAX_ROUNDS_PER_CALL = 32


class RoundPlan(NamedTuple):
    """What to do in round t: evaluate afterwards, and snapshot the state for a checkpoint afterwards.
    A plain ``(t, evaluate)`` tuple reads as a plan without a snapshot."""

    t: int
    evaluate: bool
    snapshot: bool = False


@dataclass
class RoundMetrics:
    """Metrics of round t for all N participants, in global participant order.

    ``train_loss`` [N] every round; on evaluation rounds also ``val_loss``, ``val_acc``,
    ``heldout_loss``, ``heldout_acc`` [N] and the network's ``consensus_distance``
    (1/N) Σ_k ||θ_k^{t+1} − θ̄^{t+1}||²; otherwise those are None.
    """

    round: int
    train_loss: np.ndarray
    val_loss: np.ndarray | None = None
    val_acc: np.ndarray | None = None
    heldout_loss: np.ndarray | None = None
    heldout_acc: np.ndarray | None = None
    consensus_distance: float | None = None
    snapshot: dict[str, np.ndarray | Rows] | None = None  # the state after round t, global order (checkpoints)
    # per round hook (by name): what each block's ``after_gossip`` reported, in block order (``hooks.py``)
    records: dict[str, list[Any]] = field(default_factory=dict)


def combine_snapshots(parts: list[dict[str, np.ndarray]]) -> dict[str, Rows]:
    """Join per-block ``HookedBlock.snapshot`` arrays (the block's state and its hooks' arrays; blocks in global
    participant order) as ``Rows``: the checkpoint writes the blocks one after another, never concatenated."""
    return {key: Rows([p[key] for p in parts]) for key in parts[0]}


def block_rows(snapshot: dict[str, np.ndarray], ids: np.ndarray) -> dict[str, np.ndarray]:
    """The part of a global ``snapshot`` (as ``combine_snapshots`` joins it) that the block of participants ``ids``
    (ascending global ids) restores: the rows ``ids`` of each array, and of each group of entries (a key
    ``<group>.owner``, see ``RoundHook.snapshot``) the entries those participants own, in their order."""
    owned = {key[: -len(".owner")]: np.isin(value, ids) for key, value in snapshot.items() if key.endswith(".owner")}
    out = {}
    for key, value in snapshot.items():
        groups = [g for g in owned if key.startswith(f"{g}.")]
        out[key] = value[owned[max(groups, key=len)]] if groups else value[ids]
    return out


def combine_evaluations(t: int, train_loss: np.ndarray, parts: list[dict[str, np.ndarray]],
                        n: int) -> RoundMetrics:
    """Merge per-block ``ParticipantBlock.evaluate`` outputs (in global participant order) into one
    ``RoundMetrics``; the consensus distance comes from the blocks' parameter sums and squared norms
    (in float64: (1/N) Σ||θ_k||² − ||θ̄||²)."""
    mean = sum(p["param_sum"] for p in parts) / n
    sq = sum(float(p["param_sqnorm"]) for p in parts) / n
    cat = {key: np.concatenate([p[key] for p in parts]) for key in ("val_loss", "val_acc", "heldout_loss",
                                                                    "heldout_acc")}
    # ||θ̄||² as a plain sum, not a BLAS dot: a dot this long wakes OpenBLAS's threads, which then spin for ~0.1 s on
    # the cores the actors (or, with the local engine, torch) compute on.
    return RoundMetrics(t, train_loss, consensus_distance=max(sq - float(np.square(mean).sum()), 0.0), **cat)
