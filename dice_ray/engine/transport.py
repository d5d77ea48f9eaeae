"""How a half-step θ^{t+½} travels from one participant-group actor to another (``engine.transport``), and with it
the round hooks' messages (proximal influence's updates, the ledger's gradients, in-loop DICE-E's perturbations).

Two ways, chosen per (sender, receiver) pair of groups from where they compute (``Placement``):

- ``object_store``: the sender publishes its block (and its messages) as numpy into Ray's object store; the
  receiver reads it (zero-copy on the same node) and moves it to its device. From a GPU that is a host round
  trip per round.
- ``cuda_ipc``: the sender publishes a device copy of its block (and of each message) through Ray Direct
  Transport's CUDA IPC transport; the receiver maps the same GPU memory and mixes from it. Only between groups on
  the same GPU of the same node (two actors sharing a GPU, ``engine.gpus_per_actor`` < 1).

``engine.transport``: ``auto`` uses CUDA IPC wherever a pair can (a probe tensor, sent when the groups start, gets
through: ``RayEngine._check_transports``), the object store elsewhere (on CPUs always);
``object_store`` never leaves the object store; ``cuda_ipc`` demands CUDA IPC for every pair and refuses to start
otherwise. Groups on different GPUs go through the object store: Ray's GPU-to-GPU transport between GPUs (NCCL)
needs CuPy and a collective group created by the process that submits the rounds, and cannot hold two actors
sharing a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from dice_ray.errors import InputError

OBJECT_STORE = "object_store"
CUDA_IPC = "cuda_ipc"


@dataclass(frozen=True)
class Placement:
    """Where a participant group computes: its device type ("cpu" or "cuda"), its Ray node id, and Ray's id of
    the GPU it computes on (None without CUDA)."""

    device: str
    node: str
    gpu: str | None = None

    def __str__(self) -> str:
        return f"GPU {self.gpu} of node {self.node[:8]}" if self.device == "cuda" else f"CPU of node {self.node[:8]}"


def shares_gpu(a: Placement, b: Placement) -> bool:
    """Whether groups at ``a`` and ``b`` compute on the same GPU of the same node (CUDA IPC reaches across)."""
    return a.device == b.device == "cuda" and a.node == b.node and a.gpu is not None and a.gpu == b.gpu


def pair_transport(sender: Placement, receiver: Placement, choice: str = "auto") -> str:
    """The transport of a half-step from a group at ``sender`` to one at ``receiver`` under ``engine.transport`` =
    ``choice`` ("auto", "object_store" or "cuda_ipc"): ``CUDA_IPC`` or ``OBJECT_STORE``. Raises ``InputError`` if
    ``choice`` is "cuda_ipc" and the pair does not share a GPU."""
    if choice == OBJECT_STORE:
        return OBJECT_STORE
    if shares_gpu(sender, receiver):
        return CUDA_IPC
    if choice == CUDA_IPC:
        raise InputError(f"engine.transport 'cuda_ipc' needs every pair of participant groups on one GPU of one node, "
                         f"but one is on the {sender} and another on the {receiver}; use auto or object_store")
    return OBJECT_STORE


def choose_transports(placements: list[Placement], choice: str = "auto") -> list[list[str]]:
    """``out[s][r]``: the transport of group s's half-step to group r (``pair_transport``; ``OBJECT_STORE`` on the
    diagonal, which never travels), for groups at ``placements``."""
    return [[OBJECT_STORE if s == r else pair_transport(a, b, choice) for r, b in enumerate(placements)]
            for s, a in enumerate(placements)]


def may_use_device_transport(choice: str, gpus_per_actor: float, actors: int) -> bool:
    """Whether actors planned with ``gpus_per_actor`` each (``actors`` of them) may share a GPU and exchange through
    CUDA IPC under ``choice``: only then are they created with Ray's tensor transport enabled (which runs their
    tasks on a thread of their own; CPU runs keep Ray's plain actors)."""
    return choice != OBJECT_STORE and 0 < gpus_per_actor < 1 and actors > 1
