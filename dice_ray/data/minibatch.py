"""Minibatch draws z_k^t and the held-out batch z'.

``minibatch_indices`` draws z_k^t as a pure function of (seed, k, t), so the same participant sees the same
batch at round t however participants are grouped into actors, and a counterfactual replay (concepts §2) sees
exactly the batches of the real run.
"""

from __future__ import annotations

import numpy as np
import torch

from dice_ray.data.datasets import Dataset, check_seed
from dice_ray.errors import InputError


def heldout_batch(dataset: Dataset, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The shared held-out batch z' (concepts §2): ``size`` test samples drawn without replacement,
    deterministic from ``seed`` (the whole test split, in order, if size >= n_test).

    Returns (x float32 [m, *input_shape] C-contiguous, y int64 [m], float32 targets for a regression set) with
    m = min(size, n_test).
    """
    if int(size) != size or size < 1:
        raise InputError(f"held-out batch size {size} must be a positive integer")
    check_seed(seed)
    n_test = len(dataset.y_test)
    if size >= n_test:
        idx = np.arange(n_test)
    else:
        idx = np.sort(np.random.default_rng(seed).choice(n_test, int(size), replace=False))
    return (
        np.ascontiguousarray(dataset.x_test[idx], dtype=np.float32),
        np.ascontiguousarray(dataset.y_test[idx]),  # int64 labels, or float targets (regression)
    )


# SplitMix64 constants (Steele et al. 2014). The generator below is counter-based: the random number for
# (seed, k, round, i) is a hash of those four values, so no state is carried between calls.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, elementwise on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _stream(keys: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Draws number ``draws`` (int array) of the SplitMix64 streams seeded by ``keys`` (uint64 array),
    broadcast together: the i-th draw of stream key is mix(key + (i + 1) * gamma)."""
    return _mix64(keys + (np.asarray(draws, np.uint64) + np.uint64(1)) * _GAMMA)


def minibatch_indices(
    seed: int, nodes: np.ndarray, round_: int, n_local: np.ndarray, batch_size: int
) -> np.ndarray:
    """The minibatch z_k^t of each participant: int64 [len(nodes), batch_size].

    Row i holds ``batch_size`` distinct positions in 0..n_local[i]-1 into participant k = nodes[i]'s
    local train index array, in random order. The row is a pure function of (seed, k, round_,
    n_local[i], batch_size): the same participant gets the same batch at round t however participants
    are grouped, whichever call computes it, and in a counterfactual replay.

    Implementation: a counter-based generator (SplitMix64 keyed by a hash of (seed, k, round_)),
    vectorized over participants, drives Floyd's sampling without replacement (batch_size steps, no
    permutation of the local set) and then a random shuffle of each row. Per-participant
    ``np.random.default_rng([seed, k, round_])`` objects would be equally stateless but cost ~7 ms for
    256 participants; this takes ~0.7 ms at batch size 32 (4-6 ms at 128: Floyd's check is O(b^2)).
    """
    nodes = np.asarray(nodes, np.int64).reshape(-1)
    n_local = np.asarray(n_local, np.int64).reshape(-1)
    check_seed(seed)
    if int(round_) != round_ or round_ < 0:
        raise InputError(f"round {round_} must be a non-negative integer")
    if int(batch_size) != batch_size or batch_size < 1:
        raise InputError(f"optim.batch_size (--batch-size) {batch_size} must be a positive integer")
    if len(n_local) != len(nodes):
        raise InputError(f"n_local has {len(n_local)} entries for {len(nodes)} nodes")
    if len(nodes) and nodes.min() < 0:
        raise InputError(f"participant id {int(nodes.min())} must be non-negative")
    b = int(batch_size)
    if len(nodes) and n_local.min() < b:
        i = int(np.argmin(n_local))
        raise InputError(
            f"participant {int(nodes[i])} has {int(n_local[i])} training samples, fewer than optim.batch_size "
            f"(--batch-size) {b}"
        )
    if len(nodes) == 0:
        return np.empty((0, b), np.int64)

    # Key per participant: hash(seed) -> hash(. ^ k) -> hash(. ^ round), each step a full 64-bit mix.
    key = _mix64(np.full(len(nodes), np.uint64(int(seed) % 2**64)) + _GAMMA)
    key = _mix64(key ^ nodes.astype(np.uint64))
    key = _mix64(key ^ np.uint64(int(round_) % 2**64))

    # Floyd: for j = n-b .. n-1, pick t uniform in [0, j]; take t unless already chosen, else j.
    draws = _stream(key[:, None], np.arange(2 * b))  # [N, 2b]: b for Floyd, b for the shuffle
    j = n_local[:, None] - b + np.arange(b)  # [N, b]
    u = (draws[:, :b] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # uniform [0, 1)
    t = np.minimum((u * (j + 1)).astype(np.int64), j)
    chosen = np.empty((len(nodes), b), np.int64)
    for step in range(b):
        taken = (chosen[:, :step] == t[:, step, None]).any(axis=1)
        chosen[:, step] = np.where(taken, j[:, step], t[:, step])
    # Floyd's order is not uniform (late positions favour large j): shuffle each row by random keys.
    return np.take_along_axis(chosen, np.argsort(draws[:, b:], axis=1, kind="stable"), axis=1)


# The same generator on torch int64 tensors (the bits of the uint64 values above; products wrap alike), for a
# block on a GPU: the draw stays on the device, and a CUDA graph replays it with the round as a device tensor.
def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GAMMA_I, _M1_I, _M2_I = (_signed(int(v)) for v in (_GAMMA, _M1, _M2))


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of uint64 bits held in int64 (``>>`` on int64 is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64_t(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _M1_I
    z = (z ^ _shr(z, 27)) * _M2_I
    return z ^ _shr(z, 31)


def minibatch_positions(seed: int, nodes: torch.Tensor, round_: int | torch.Tensor, n_local: torch.Tensor,
                        batch_size: int) -> torch.Tensor:
    """``minibatch_indices`` computed on the tensors' device, equal to it bit for bit: int64 [len(nodes), batch_size].

    ``nodes`` and ``n_local`` are int64 tensors on one device (checked as ``minibatch_indices`` checks them by the
    caller, once); ``round_`` an int or a 0-d int64 tensor on that device.
    """
    device, b = nodes.device, int(batch_size)
    key = _mix64_t(torch.full_like(nodes, _signed(int(seed) % 2**64)) + _GAMMA_I)
    key = _mix64_t(key ^ nodes)
    key = _mix64_t(key ^ (round_ if isinstance(round_, torch.Tensor) else _signed(int(round_) % 2**64)))
    draws = _mix64_t(key[:, None] + torch.arange(1, 2 * b + 1, device=device, dtype=torch.int64) * _GAMMA_I)
    j = n_local[:, None] - b + torch.arange(b, device=device)
    u = _shr(draws[:, :b], 11).to(torch.float64) * 2.0**-53
    t = torch.minimum((u * (j + 1)).to(torch.int64), j)
    chosen = torch.empty_like(t)
    for step in range(b):
        taken = (chosen[:, :step] == t[:, step, None]).any(dim=1)
        chosen[:, step] = torch.where(taken, j[:, step], t[:, step])
    # Flipping the sign bit orders int64 as the uint64 values are ordered.
    order = torch.sort(draws[:, b:] ^ (-(1 << 63)), dim=1, stable=True).indices
    return torch.gather(chosen, 1, order)
