"""The device-transport path between participant groups, run on the CPU: what CUDA IPC carries between two groups
sharing a GPU (their half-steps and the round hooks' messages, as device tensors through Ray Direct Transport), here
carried by a CPU transport registered with Ray for these tests. The routing, the device copies, the probe at start
and the receivers' handling of tensors are the ones a GPU run uses; only the transport underneath differs."""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from oracles import assert_same_tables
from ray.experimental.rdt.tensor_transport_manager import (
    CommunicatorMetadata,
    TensorTransportManager,
    TensorTransportMetadata,
)

import dice_ray
from dice_ray.engine import ray_engine
from dice_ray.engine.transport import CUDA_IPC, OBJECT_STORE
from dice_ray.hooks import Inbox, Method, RoundHook, RowsDriver

LOOPBACK = "LOOPBACK"


@dataclass
class LoopbackMetadata(TensorTransportMetadata):
    arrays: list[np.ndarray] = field(default_factory=list)


class Loopback(TensorTransportManager):
    """A one-sided tensor transport for CPU tensors: the tensors travel as copies inside Ray's transport metadata.
    Each receive writes a file into ``log`` (set before the groups start) listing the shapes it delivered."""

    log = ""

    @property
    def tensor_transport_backend(self) -> str:
        return LOOPBACK

    @staticmethod
    def is_one_sided() -> bool:
        return True

    @staticmethod
    def can_abort_transport() -> bool:
        return False

    def actor_has_tensor_transport(self, actor: Any) -> bool:
        return True

    def extract_tensor_transport_metadata(self, obj_id: str, rdt_object: list[torch.Tensor]) -> LoopbackMetadata:
        return LoopbackMetadata([(t.shape, t.dtype) for t in rdt_object], "cpu" if rdt_object else None,
                                [t.numpy().copy() for t in rdt_object])

    def get_communicator_metadata(self, src_actor: Any, dst_actor: Any, backend: str | None = None) -> Any:
        return CommunicatorMetadata()

    def recv_multiple_tensors(self, obj_id: str, tensor_transport_metadata: LoopbackMetadata,
                              communicator_metadata: Any, target_buffers: Any = None) -> list[torch.Tensor]:
        arrays = tensor_transport_metadata.arrays
        Path(self.log, f"{uuid.uuid4().hex}.json").write_text(json.dumps([list(a.shape) for a in arrays]))
        return [torch.from_numpy(a.copy()) for a in arrays]

    def send_multiple_tensors(self, tensors: Any, tensor_transport_metadata: Any, communicator_metadata: Any):
        raise NotImplementedError("one-sided")

    def garbage_collect(self, obj_id: str, tensor_transport_meta: Any, tensors: Any) -> None:
        pass

    def abort_transport(self, obj_id: str, communicator_metadata: Any):
        raise NotImplementedError


def _register_loopback(*_: Any) -> None:
    """Register ``Loopback`` with Ray in this process (once)."""
    from ray.experimental.rdt import util

    if LOOPBACK not in util.transport_manager_info:
        util.register_tensor_transport(LOOPBACK, ["cpu"], Loopback, torch.Tensor)


class Mixed(RoundHook):
    """Sends every round what gossip mixes, as a mapping of tensors; it makes no message for the host (a message
    that would travel through the object store fails the run), and reports ||Σ_l W_kl θ_l^{t+½}|| from its inbox."""

    name = "mixed"

    @classmethod
    def sends(cls, config: Any):
        return lambda t: True

    def after_local_step(self, t: int) -> None:
        self.half = self.block.population.params.clone()  # θ^{t+½}: gossip then mixes the live state in place

    def message(self, t: int, local: bool) -> Any:
        if not local:
            raise AssertionError(f"round {t}: a message was made for the host")
        return {"half": self.half}

    def after_gossip(self, t: int, inbox: Inbox) -> Any:
        assert all(isinstance(m["half"], torch.Tensor) for m in inbox.messages)
        mixed = sum(torch.as_tensor(w.toarray(), dtype=torch.float32, device=m["half"].device) @ m["half"]
                    for w, m in zip(inbox.weights, inbox.messages, strict=True))
        return {"round": np.full(self.block.size, t, np.int32), "node": self.block.nodes.astype(np.int32),
                "norm": mixed.norm(dim=1).double()}


class MixedTable(RowsDriver):
    name = "mixed"
    tables = {"mixed": pa.schema([("round", pa.int32()), ("node", pa.int32()), ("norm", pa.float64())])}


MIXED = Method("mixed", lambda config: True, Mixed, MixedTable)
# Every method whose hook sends messages: proximal influence, the ledger (first-order gradients and curvature
# cascades), in-loop DICE-E, and the toy above.
CONFIG = {"nodes": 9, "rounds": 6, "seed": 4, "data": {"dataset": "digits", "heldout_size": 64},
          "optim": {"batch_size": 8}, "proximal": {"enabled": True},
          "ledger": {"enabled": True, "hops": 2, "variants": ["first-order", "curvature"]},
          "influence": {"enabled": True, "online": True, "ground_truth": False, "hops": 2, "rounds": [1, 2]},
          "output": {"progress": False, "eval_every": 3}}
TABLES = ("rounds", "mixed", "proximal", "contributions", "influence", "dice")


@pytest.fixture
def device_transport(ray_with_a_logical_gpu, monkeypatch, tmp_path: Path) -> tuple[str, Path | None]:
    """The device transport between two groups sharing the (logical) GPU, and the folder of its receive log (None:
    none kept). On a CUDA machine: CUDA IPC, as ``engine.transport`` auto chooses it. Without CUDA the groups compute
    on the CPU, and every pair exchanges through ``Loopback`` instead: Ray learns it in this process before the
    groups start (it tells them) and in the coordinator, which submits the rounds."""
    import ray.cloudpickle

    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)  # Ray workers cannot import this test module (its hook class)
    if torch.cuda.is_available():
        try:
            yield CUDA_IPC, None
        finally:
            ray.cloudpickle.unregister_pickle_by_value(module)
        return
    Loopback.log = str(tmp_path / "received")
    Path(Loopback.log).mkdir()
    _register_loopback()
    choose = ray_engine.RayEngine._choose_transports

    def choose_loopback(engine: Any) -> None:
        ray.get(engine.coordinator.__ray_call__.remote(_register_loopback))
        with monkeypatch.context() as inner:
            inner.setattr(ray_engine, "choose_transports", lambda placements, _: [
                [OBJECT_STORE if s == g else LOOPBACK for g in range(len(placements))] for s in range(len(placements))])
            choose(engine)

    monkeypatch.setattr(ray_engine.RayEngine, "_choose_transports", choose_loopback)
    yield LOOPBACK, Path(Loopback.log)
    from ray.experimental.rdt import util

    util.transport_manager_info.pop(LOOPBACK, None)  # later actors are not told of it
    util.transport_managers.pop(LOOPBACK, None)
    util.has_custom_transports = False
    ray.cloudpickle.unregister_pickle_by_value(module)


def test_half_steps_and_messages_travel_through_the_device_transport_with_the_same_numbers(
        device_transport: tuple[str, Path | None], tmp_path: Path) -> None:
    """Two groups sharing a (logical) GPU, every pair on the device transport: the run's tables equal the
    single-process CPU run's; no message was made for the object store (``Mixed`` refuses to); and, where the log
    is kept, each group received the other's half-step and messages every round through the transport."""
    way, log = device_transport
    runs = {}
    for engine in ("local", "ray"):
        config = dice_ray.as_config(CONFIG, engine={"actors": 2, "gpus_per_actor": 0.5},
                                    output={"out": str(tmp_path / engine)})
        runs[engine] = dice_ray.run(config, engine=engine, methods=[MIXED])
    ray_run, local = runs["ray"], runs["local"]
    placement = json.loads((ray_run.path / "manifest.json").read_text())["placement"]
    assert [actor["transports"] for actor in placement] == [[OBJECT_STORE, way], [way, OBJECT_STORE]]
    assert all(len(local.table(name)) > 0 for name in TABLES)
    assert_same_tables({name: ray_run.table(name) for name in TABLES}, {name: local.table(name) for name in TABLES},
                       rel=1e-5)  # float32 rounding differs between one block and two, and between a CPU and a GPU
    if log is None:
        return
    received = [json.loads(p.read_text()) for p in log.glob("*.json")]
    sizes = [len(b) for b in np.array_split(np.arange(CONFIG["nodes"]), 2)]
    assert [[4]] in received  # the probes at start
    # each group's half-step and its Mixed message ([P_b, D]), every round, and the other hooks' messages
    states = [r for r in received if len(r) == 1 and len(r[0]) == 2 and r[0][0] in sizes]
    assert len(states) >= 2 * 2 * CONFIG["rounds"]
    assert len(received) > len(states) + 2
