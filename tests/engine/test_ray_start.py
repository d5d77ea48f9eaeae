"""A real two-node cluster started with ``ray start`` (a head and a worker, token authentication on), on 127.0.0.1
only: a simulation and a sweep join it through ``--address`` and compute what a local run computes (to 1e-6).

Ray rewrites a loopback ``--address`` or ``--node-ip-address`` (127.0.0.1, localhost) into the machine's external
address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and ``ray start --address`` (a worker) refuses to run with
that switch off. So: the head runs with it off and ``--node-ip-address=127.0.0.1``; the worker runs with it on and
joins through ``127.1`` (a spelling of 127.0.0.1 that Ray does not rewrite; gRPC resolves it with its native
resolver, ``GRPC_DNS_RESOLVER=native``), and takes 127.0.0.1, the address it reaches the head from, as its own;
the drivers join ``127.0.0.1:PORT`` (``dice_ray.engine.runtime._join`` keeps a loopback address that answers).
Every process gets ``RAY_AUTH_MODE=token`` and the cluster's token (``RAY_AUTH_TOKEN``). See
docs/how-to/cluster.md.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from ray_processes import ROOT, RayStart, assert_loopback_only, cluster_nodes, free_port, loopback_env

# 270-325 s here (2 shared cores): python -m pytest -q -m slow tests/engine/test_ray_start.py
pytestmark = pytest.mark.slow

RUN = ["--dataset", "digits", "--nodes", "8", "--rounds", "6", "--topology", "exponential", "--batch-size", "8",
       "--heldout-size", "32", "--eval-every", "2", "--init", "independent", "--no-progress"]
SWEEP = {"base": {"nodes": 4, "rounds": 6, "topology": {"name": "ring"},
                  "data": {"dataset": "digits", "heldout_size": 32}, "optim": {"batch_size": 8},
                  "output": {"eval_every": 3}},
         "space": {"optim.lr": {"grid": [0.05, 0.1]}}, "metrics": ["accuracy"], "max_concurrent": 2}


def _run(args: list[str], env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    return out


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for column in b.columns:
        if pd.api.types.is_float_dtype(b[column]):
            np.testing.assert_allclose(a[column], b[column], rtol=1e-6, atol=1e-6, err_msg=column)
        else:
            assert a[column].tolist() == b[column].tolist(), column


def test_simulation_and_sweep_on_a_ray_start_cluster(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = loopback_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # dice-ray's drivers as a user runs them: no switch, --address 127.0.0.1:PORT kept by _join
    driver = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump(SWEEP | {"out": str(tmp_path / "sweep-cluster")}))
    nodes = RayStart(env)
    try:
        head = nodes.start("--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
                           "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                           f"--dashboard-agent-listen-port={free_port()}", f"--object-store-memory={200 * 1024**2}")
        assert "Local node IP: 127.0.0.1" in head
        worker = nodes.start(f"--address=127.1:{port}", "--num-cpus=1", f"--dashboard-agent-listen-port={free_port()}",
                             f"--object-store-memory={200 * 1024**2}",
                             env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "GRPC_DNS_RESOLVER": "native"})
        assert "Local node IP: 127.0.0.1" in worker
        machines = cluster_nodes(address, env)
        assert len(machines) == 2 and all(n["Alive"] and n["NodeManagerAddress"] == "127.0.0.1" for n in machines)

        # a driver without the cluster's token is refused: one line, exit 2, nothing written
        stranger = _run(["dice_ray.simulate", *RUN, "--address", address, "--out", str(tmp_path / "refused")],
                        {**driver, "RAY_AUTH_TOKEN": secrets.token_hex(32)})
        assert stranger.returncode == 2 and len(stranger.stderr.strip().splitlines()) == 1, stranger.stderr[-2000:]
        assert "token authentication" in stranger.stderr and not (tmp_path / "refused").exists()

        # the default plan: one participant-group actor pinned to each machine, blocks crossing between them
        simulated = _run(["dice_ray.simulate", *RUN, "--address", address, "--out", str(tmp_path / "sim-cluster")],
                         driver)
        assert simulated.returncode == 0, simulated.stderr[-3000:]
        assert f"Connecting to existing Ray cluster at address: {address}..." in simulated.stderr  # not rewritten
        swept = _run(["dice_ray.sweep", str(spec), "--address", address], driver)
        assert swept.returncode == 0, swept.stdout[-2000:] + swept.stderr[-2000:]
        assert "2 trials, 2 ok, 0 failed" in swept.stdout
        assert_loopback_only(nodes)
    finally:
        nodes.stop()

    machine_ids = {n["NodeID"] for n in machines}
    placement = json.loads((tmp_path / "sim-cluster" / "manifest.json").read_text())["placement"]
    assert {actor["node_id"] for actor in placement} == machine_ids
    trial_nodes = set()
    for run_dir in pd.read_parquet(tmp_path / "sweep-cluster" / "trials.parquet")["run_dir"]:
        [actor] = json.loads((tmp_path / "sweep-cluster" / run_dir / "manifest.json").read_text())["placement"]
        trial_nodes.add(actor["node_id"])
    assert trial_nodes <= machine_ids

    local = loopback_env()
    plain = _run(["dice_ray.simulate", *RUN, "--engine", "local", "--out", str(tmp_path / "sim-local")], local)
    assert plain.returncode == 0, plain.stderr[-3000:]
    _same(pd.read_parquet(tmp_path / "sim-cluster" / "rounds.parquet"),
          pd.read_parquet(tmp_path / "sim-local" / "rounds.parquet"))
    swept_local = _run(["dice_ray.sweep", str(spec), "--out", str(tmp_path / "sweep-local")], local)
    assert swept_local.returncode == 0, swept_local.stdout[-2000:] + swept_local.stderr[-2000:]

    def trials(path: Path) -> pd.DataFrame:
        return pd.read_parquet(path).drop(columns=["start_time", "wall_seconds"]).sort_values("trial_id").reset_index(
            drop=True)

    _same(trials(tmp_path / "sweep-cluster" / "trials.parquet"), trials(tmp_path / "sweep-local" / "trials.parquet"))
    for run_dir in trials(tmp_path / "sweep-local" / "trials.parquet")["run_dir"]:
        _same(pd.read_parquet(tmp_path / "sweep-cluster" / run_dir / "rounds.parquet"),
              pd.read_parquet(tmp_path / "sweep-local" / run_dir / "rounds.parquet"))
