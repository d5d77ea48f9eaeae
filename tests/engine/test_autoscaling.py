"""The autoscaling path, as `ray up cluster.yaml` runs it, on this one machine: a head with no GPU started with
``ray start --head --autoscaling-config``, and Ray's real autoscaler starting cluster.yaml's worker node types
(scaled down to 1 CPU, the GPU fake) on demand through Ray's fake multi-node provider (the provider
``ray.cluster_utils.AutoscalingCluster`` uses). A GPU sweep joins it with ``--address``: its trials need GPUs the
head does not have, so workers appear and the trials run there. One worker is killed (its raylet and every
process on it) while its trial trains: Tune starts the trial again, the autoscaler adds a node for it, and the
trial continues from its last checkpoint. ``trials.parquet`` equals the same sweep run on a local Ray to 1e-6.

``AutoscalingCluster`` itself is not usable here: its ``start`` and ``shutdown`` run ``ray stop --force``, which
kills every Ray process of this user on the machine, and the config template it reads
(``fake_multi_node/example.yaml``) is not in Ray's wheel. This test starts the same thing the same way (the
``ray start`` command and the ``RAY_FAKE_CLUSTER``/``AUTOSCALER_UPDATE_INTERVAL_S`` environment of
``AutoscalingCluster.start``), on 127.0.0.1, in a temp dir of its own, and stops only its own processes.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from ray_processes import ROOT, RayStart, assert_loopback_only, cluster_nodes, free_port, loopback_env, node_of

from dice_ray.sweep.spec import load_sweep

# 195-275 s here (2 shared cores): python -m pytest -q -m slow tests/engine/test_autoscaling.py
pytestmark = pytest.mark.slow


OBJECT_STORE = 100 * 1024**2
SWEEP = {"base": {"nodes": 4, "rounds": 40, "topology": {"name": "ring"},
                  "data": {"dataset": "digits", "heldout_size": 32}, "optim": {"batch_size": 8},
                  "engine": {"gpus_per_actor": 1},  # a GPU sweep: the head has none
                  "output": {"eval_every": 10, "checkpoint_every": 5}},
         "space": {"optim.lr": {"grid": [0.05, 0.1]}}, "metrics": ["accuracy"], "max_concurrent": 2}
HEAD_ID = "f" * 51 + "00000"  # the fake provider's node ids: the head's, then ...00001, ...00002 for workers


def fake_cluster_config(port: int) -> dict:
    """cluster.yaml for the fake provider: its worker node types with 1 CPU each (this machine has 2), the head
    type as Ray's fake cluster names it, node_config and the cloud settings dropped."""
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = {"ray.head.default": {"resources": {"CPU": 1, "GPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, node_type in cluster["available_node_types"].items():
        if name != cluster["head_node_type"]:
            resources = {**node_type["resources"], "CPU": 1, "object_store_memory": OBJECT_STORE}
            types[name] = {"resources": resources, "node_config": {}, "min_workers": node_type.get("min_workers", 0),
                           "max_workers": 3}  # two trials at once, and one replacement
    empty: dict = {k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                                   "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                                   "cluster_synced_files", "rsync_exclude", "rsync_filter")}
    return {**empty, "cluster_name": cluster["cluster_name"], "max_workers": 3,
            "upscaling_speed": cluster["upscaling_speed"], "idle_timeout_minutes": cluster["idle_timeout_minutes"],
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
            "available_node_types": types, "head_node_type": "ray.head.default", "auth": {}, "docker": {},
            "file_mounts": {}, "file_mounts_sync_continuously": False}


def table(path: Path) -> pd.DataFrame:
    trials = pd.read_parquet(path).drop(columns=["start_time", "wall_seconds"])
    return trials.sort_values("trial_id").reset_index(drop=True)


def test_a_gpu_sweep_grows_the_cluster_and_survives_losing_a_worker(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = loopback_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    spec = tmp_path / "gpu.yaml"
    spec.write_text(yaml.safe_dump(SWEEP | {"out": str(tmp_path / "cluster")}))
    sweep = load_sweep(spec)
    victim = sweep.grid[0].trial_id
    nodes = RayStart(env)
    run = None
    try:
        config = nodes.temp_dir / "autoscaling.json"
        config.write_text(json.dumps(fake_cluster_config(port)))
        nodes.start("--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
                    f"--autoscaling-config={config}", "--include-dashboard=false",
                    f"--object-store-memory={OBJECT_STORE}", f"--ray-client-server-port={free_port()}",
                    f"--dashboard-agent-listen-port={free_port()}",
                    env={**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        before = cluster_nodes(address, env)
        assert [n["NodeID"] for n in before] == [HEAD_ID] and "GPU" not in before[0]["Resources"]

        log = tmp_path / "sweep.log"
        with open(log, "w") as f:
            driver = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}  # as a user runs it
            run = subprocess.Popen([sys.executable, "-m", "dice_ray.sweep", str(spec), "--address", address],
                                   cwd=ROOT, env=driver, stdout=f, stderr=subprocess.STDOUT)
        # the victim's simulation holds its run directory's lock; once it has a checkpoint, kill its machine
        run_dir = tmp_path / "cluster" / "trials" / victim
        deadline = time.monotonic() + 400
        while not list(run_dir.glob("checkpoints/*/meta.json")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run.poll() is None and not (run_dir / "rounds.parquet").exists(), "the trial ended before the kill"
        raylet = node_of(json.loads((run_dir / ".lock").read_text())["pid"])
        lost = next(a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--node_id="))
        assert lost != HEAD_ID  # Tune puts the trial's driver in its first actor bundle: on a GPU worker
        nodes.kill_tree(raylet)
        run.wait(timeout=600)
        output = log.read_text()
        assert run.returncode == 0, output[-3000:]
        assert "2 trials, 2 ok, 0 failed" in output, output[-3000:]
        after = cluster_nodes(address, env)
        assert_loopback_only(nodes)
    finally:
        if run is not None and run.poll() is None:
            run.kill()
            run.wait()
        nodes.stop()

    workers = {n["NodeID"]: n for n in after if n["NodeID"] != HEAD_ID}
    # two workers appeared (one per trial); the lost one's trial continued on a live one (freed, or added)
    assert len(workers) >= 2 and lost in workers and not workers[lost]["Alive"]
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in after)
    for trial in sweep.grid:
        manifest = json.loads((tmp_path / "cluster" / "trials" / trial.trial_id / "manifest.json").read_text())
        [actor] = manifest["placement"]
        assert actor["node_id"] in workers and workers[actor["node_id"]]["Resources"].get("GPU") == 1
        assert actor["node_id"] != lost
        if trial.trial_id == victim:  # continued from its checkpoint, not from the start
            [resumed] = manifest["resumes"]
            assert resumed["from_round"] > 0 and resumed["from_round"] % 5 == 0
        else:
            assert "resumes" not in manifest

    local = subprocess.run([sys.executable, "-m", "dice_ray.sweep", str(spec), "--out", str(tmp_path / "local")],
                           cwd=ROOT, env={**env, "RAY_OVERRIDE_RESOURCES": json.dumps({"GPU": 2})},
                           capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stdout[-2000:] + local.stderr[-2000:]
    got, want = table(tmp_path / "cluster" / "trials.parquet"), table(tmp_path / "local" / "trials.parquet")
    assert list(got.columns) == list(want.columns) and len(got) == 2
    for column in want.columns:
        if pd.api.types.is_float_dtype(want[column]):
            np.testing.assert_allclose(got[column], want[column], rtol=1e-6, atol=1e-6, err_msg=column)
        else:
            assert got[column].tolist() == want[column].tolist(), column
