"""The Flower side of ``bench_peers.py``: one Flower simulation, timed, its result printed as one JSON line.

Runs in Flower's own venv (``flwr[simulation]`` pins its own Ray; ``bench_peers.py`` makes that venv), never
in the project's. It imports nothing of dice-ray: the models are rebuilt here in plain torch, with the same
architectures as the project's registered "mlp" (64 -> 128 -> 64 -> 10, ReLU) and "cnn" (two 3x3
conv-maxpool-ReLU blocks of 16 and 32 channels, a 64-unit hidden layer; pooling before ReLU is the usual
conv-ReLU-maxpool function, bit for bit, with less work, as the project's model does it).

Workload, per client and round: load the global model sent by the server, ONE SGD step (lr 0.05) on a
batch of 16 from the client's own synthetic data (random tensors of the model's input shape, 64 samples per
client, seeded by the client's partition id; the batch is drawn anew each round), send the model back.
The server runs FedAvg over all N clients every round; no federated or central evaluation. Each client
takes 1 CPU (``client_resources``), so a 2-CPU Ray runs two clients at a time.

Two Flower APIs: ``run_simulation`` (the current one: ``ServerApp`` + ``ClientApp``, the Message API's
``flwr.serverapp.strategy.FedAvg``) and ``start_simulation`` (the legacy one, deprecated since 1.13:
``NumPyClient`` + ``flwr.server.strategy.FedAvg``).

Printed (last line of stdout, JSON): ``run_s`` (seconds of the whole simulation call: Ray start, actor
pool, all rounds, shutdown), ``round_ends`` (``time.perf_counter()`` when each round's aggregation began,
so differences are in-run round times), ``client_compute_s`` (mean seconds of a client's own work in its
handler — model load, step, state dict out — over the timed rounds) and the versions.

    python bench/_flower_side.py --model mlp --nodes 64 --rounds 3 [--api run_simulation|start_simulation]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

BATCH, LR, LOCAL_SAMPLES, CLASSES = 16, 0.05, 64, 10
SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 28, 28)}


def build_model(name: str) -> nn.Module:
    """The same architecture as dice-ray's registered model ``name`` on its input shape (10 classes)."""
    channels, height, width = SHAPES[name]
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, 128), nn.ReLU(),
                             nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, CLASSES))
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * (height // 4) * (width // 4), 64), nn.ReLU(),
        nn.Linear(64, CLASSES),
    )


# Per actor process: one model per name (its weights are overwritten by each message) and each client's data.
_MODELS: dict[str, nn.Module] = {}
_DATA: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def local_data(name: str, pid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``pid``'s synthetic data set: LOCAL_SAMPLES random inputs of the model's shape and labels."""
    if pid not in _DATA:
        gen = torch.Generator().manual_seed(1000 + pid)
        _DATA[pid] = (torch.randn(LOCAL_SAMPLES, *SHAPES[name], generator=gen),
                      torch.randint(0, CLASSES, (LOCAL_SAMPLES,), generator=gen))
    return _DATA[pid]


def local_step(name: str, pid: int, server_round: int, state: dict[str, torch.Tensor] | list[np.ndarray]
               ) -> tuple[nn.Module, float, float]:
    """Load ``state`` into this process's model, take one SGD step on client ``pid``'s batch of round
    ``server_round``; return (the model, the batch loss, seconds of this function)."""
    start = time.perf_counter()
    torch.set_num_threads(1)
    model = _MODELS.setdefault(name, build_model(name))
    with torch.no_grad():
        if isinstance(state, dict):
            model.load_state_dict(state)
        else:
            for p, value in zip(model.parameters(), state, strict=True):
                p.copy_(torch.from_numpy(np.asarray(value)))
    x, y = local_data(name, pid)
    gen = torch.Generator().manual_seed(pid * 100_003 + server_round)
    idx = torch.randperm(LOCAL_SAMPLES, generator=gen)[:BATCH]
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
    return model, float(loss.item()), time.perf_counter() - start


# -- the current API: run_simulation with a ServerApp and a ClientApp ------------------------------------------


def run_current(args: argparse.Namespace, marks: list[float], computes: list[float]) -> None:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        state = msg.content["arrays"].to_torch_state_dict()
        model, loss, seconds = local_step(args.model, pid, int(msg.content["config"]["server-round"]), state)
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"train_loss": loss, "compute_s": seconds,
                                                       "num-examples": BATCH})})
        return Message(content=content, reply_to=msg)

    class TimedFedAvg(FedAvg):
        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            marks.append(time.perf_counter())
            computes.append(float(np.mean([m.content["metrics"]["compute_s"] for m in replies if m.has_content()])))
            return super().aggregate_train(server_round, replies)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=args.nodes,
                               min_available_nodes=args.nodes)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(build_model(args.model).state_dict()),
                       num_rounds=args.rounds)

    run_simulation(server_app=server, client_app=client, num_supernodes=args.nodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": args.cpus, "include_dashboard": False,
                                                 "logging_level": logging.ERROR, "log_to_driver": False}})


# -- the legacy API: start_simulation with a NumPyClient ---------------------------------------------------------


def run_legacy(args: argparse.Namespace, marks: list[float], computes: list[float]) -> None:
    import flwr as fl
    from flwr.common import Context, ndarrays_to_parameters

    class Client(fl.client.NumPyClient):
        def __init__(self, pid: int):
            self.pid = pid

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
            model, loss, seconds = local_step(args.model, self.pid, int(config["server_round"]), parameters)
            return ([p.detach().numpy() for p in model.parameters()], BATCH,
                    {"train_loss": loss, "compute_s": seconds})

    def client_fn(context: Context) -> Any:
        return Client(int(context.node_config["partition-id"])).to_client()

    class TimedFedAvg(fl.server.strategy.FedAvg):
        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            marks.append(time.perf_counter())
            computes.append(float(np.mean([r.metrics["compute_s"] for _, r in results])) if results else 0.0)
            return super().aggregate_fit(server_round, results, failures)

    torch.manual_seed(0)
    initial = [p.detach().numpy() for p in build_model(args.model).parameters()]
    strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=args.nodes,
                           min_available_clients=args.nodes, initial_parameters=ndarrays_to_parameters(initial),
                           on_fit_config_fn=lambda r: {"server_round": r})
    fl.simulation.start_simulation(client_fn=client_fn, num_clients=args.nodes,
                                   config=fl.server.ServerConfig(num_rounds=args.rounds), strategy=strategy,
                                   client_resources={"num_cpus": 1, "num_gpus": 0.0},
                                   ray_init_args={"num_cpus": args.cpus, "include_dashboard": False,
                                                  "logging_level": logging.ERROR, "log_to_driver": False})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(SHAPES), required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--api", choices=("run_simulation", "start_simulation"), default="run_simulation")
    args = parser.parse_args()
    import flwr
    import ray

    logging.getLogger("flwr").setLevel(logging.WARNING)
    marks: list[float] = []
    computes: list[float] = []
    start = time.perf_counter()
    (run_current if args.api == "run_simulation" else run_legacy)(args, marks, computes)
    run_s = time.perf_counter() - start
    if len(marks) != args.rounds:
        raise SystemExit(f"flower: {len(marks)} of {args.rounds} rounds aggregated in this process")
    print(json.dumps({"run_s": run_s, "round_ends": [m - start for m in marks], "client_compute_s": computes,
                      "flwr": flwr.__version__, "ray": ray.__version__, "torch": torch.__version__,
                      "python": sys.version.split()[0], "api": args.api}))


if __name__ == "__main__":
    main()
