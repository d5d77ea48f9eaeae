"""Checkpoints, resume, lost actors and lost influence tasks: a disturbed run ends with the numbers of an
undisturbed one, and says what happened."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dice_ray.checkpoint import CheckpointStore, RoundTables, Rows
from dice_ray.cli.simulate import main
from dice_ray.config import build_config
from dice_ray.results import ROUNDS
from dice_ray.runner import simulate

SMALL = {"nodes": 8, "data": {"dataset": "digits", "heldout_size": 64}, "optim": {"batch_size": 8},
         "model": {"init": "independent"}, "output": {"progress": False, "eval_every": 3}}


def small_config(out: Path, **changes) -> object:
    data = json.loads(json.dumps(SMALL))
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    data["output"]["out"] = str(out)
    return build_config(data)


def rounds_table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "rounds.parquet").sort_values(["round", "node"]).reset_index(drop=True)


# -- storage, without Ray -------------------------------------------------------------------------


def test_checkpoints_are_atomic_pruned_and_refuse_poison(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, digest="abc", keep=2)
    assert store.latest() is None
    state = {"state": np.arange(12, dtype=np.float32).reshape(3, 4), "opt.step": np.ones(3, np.float32)}
    for t in (4, 9, 14):
        store.save(t, state)
    assert [c.round for c in store.checkpoints()] == [9, 14]  # the oldest is pruned
    loaded = store.latest().load()
    assert loaded.keys() == state.keys() and all(np.array_equal(loaded[k], state[k]) for k in state)
    (tmp_path / "checkpoints" / ".tmp-round-000019").mkdir()  # a save killed half-way is not a checkpoint
    assert store.latest().round == 14
    poisoned = {**state, "state": np.where(np.eye(3, 4) > 0, np.nan, 0).astype(np.float32)}
    with pytest.raises(FloatingPointError, match="participants \\[0, 1, 2\\]"):
        store.save(19, poisoned)
    assert store.latest().round == 14
    with pytest.raises(ValueError, match="different config"):
        CheckpointStore(tmp_path, digest="xyz").check(store.latest())


def test_a_checkpoint_of_row_blocks_is_the_joined_arrays(tmp_path: Path) -> None:
    """The Ray engine's groups hand a snapshot over as row blocks (``Rows``), written one after another: the file is
    the joined arrays as ``np.load`` reads them, its recorded SHA-256 (computed while writing) is the file's, and a
    row that is not finite is named by its place in the whole state, with nothing written."""
    import hashlib

    rng = np.random.default_rng(3)
    blocks = [rng.standard_normal((3, 5)).astype(np.float32), np.zeros((0, 5), np.float32),
              rng.standard_normal((2, 5)).astype(np.float32)]
    snapshot = {"state": Rows(blocks), "opt.step": Rows([np.ones(3), np.zeros(0), np.full(2, 2.0)]),
                "cascade.ids": Rows([np.zeros((n, 0), np.int64) for n in (3, 0, 2)]),
                "cascade.mask": Rows([np.ones((3, 2), bool), np.zeros((0, 2), bool), np.zeros((2, 2), bool)])}
    driver = {"names": np.array(["a", "bcd"]), "count": np.array(7)}
    store = CheckpointStore(tmp_path, digest="abc")
    checkpoint = store.save(4, snapshot, driver)
    for saved, given in ((checkpoint.load(), snapshot), (checkpoint.load_driver_state(), driver)):
        assert saved.keys() == given.keys()
        for key, value in given.items():
            joined = np.asarray(value)
            assert saved[key].dtype == joined.dtype and saved[key].shape == joined.shape, key
            assert np.array_equal(saved[key], joined), key
    meta = json.loads((checkpoint.path / "meta.json").read_text())
    assert meta["sha256"] == {name: hashlib.sha256((checkpoint.path / name).read_bytes()).hexdigest()
                              for name in ("state.npz", "driver.npz")}
    assert meta["shapes"]["state"] == [5, 5] and checkpoint.verify() is None
    blocks[2][1, 3] = np.nan
    with pytest.raises(FloatingPointError, match=r"round 9: non-finite parameters at participants \[4\]"):
        store.save(9, snapshot, driver)
    assert [c.round for c in store.checkpoints()] == [4] and not list(store.root.glob(".tmp-*"))


def test_a_file_changed_after_its_check_is_hashed_again(tmp_path: Path, monkeypatch) -> None:
    """A resume looks at the newest checkpoint twice and hashes it once (the digest of an unchanged file is kept);
    a write in between, of the same size and with the modification time set back, is still seen."""
    import dice_ray.checkpoint as checkpoints

    monkeypatch.setattr(checkpoints, "RACY_NS", 0)  # the file was written just now
    store = CheckpointStore(tmp_path, digest="abc")
    checkpoint = store.save(4, {"state": np.arange(40, dtype=np.float32).reshape(4, 10)})
    assert checkpoint.verify() is None and checkpoint.verify() is None
    path = checkpoint.path / "state.npz"
    before = path.stat()
    assert any(key[0] == str(path.resolve()) for key in checkpoints._HASHED)
    data = bytearray(path.read_bytes())
    data[-200] ^= 0x01  # within the state's last values (the zip's directory follows them)
    with open(path, "r+b") as f:
        f.write(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert checkpoint.verify() == "state.npz does not match its recorded SHA-256"


def test_round_tables_roll_back_buffered_and_committed_rows(tmp_path: Path) -> None:
    tables = RoundTables(tmp_path, {"rounds": ROUNDS})

    def rows(t: int) -> dict:
        return {"round": [t, t], "node": [0, 1], "train_loss": [float(t), t + 0.5], "val_loss": [None, None],
                "val_acc": [None, None], "heldout_loss": [None, None], "heldout_acc": [None, None],
                "consensus_distance": [None, None]}

    for t in range(6):
        tables.append("rounds", rows(t))
    tables.commit(5)  # a part with rounds 0..5
    for t in range(6, 9):
        tables.append("rounds", rows(t))
    tables.rollback(3)  # forget rounds 4..8: the part is cut back, the buffer emptied
    assert tables.buffered_rows() == 0
    assert tables.read("rounds").column("round").to_pylist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for t in range(4, 7):
        tables.append("rounds", rows(t))
    tables.finish(6)
    final = pd.read_parquet(tmp_path / "rounds.parquet")
    assert final["round"].tolist() == [t for t in range(7) for _ in (0, 1)]
    assert final["train_loss"].tolist() == [v for t in range(7) for v in (t, t + 0.5)]


# -- a killed process resumes --------------------------------------------------------------------

CLI = [sys.executable, "-m", "dice_ray.simulate", "--dataset", "digits", "--nodes", "8", "--batch-size", "8",
       "--heldout-size", "64", "--rounds", "400", "--eval-every", "7", "--checkpoint-every", "10", "--no-progress",
       "--influence", "--hops", "2", "--probe-rounds", "395", "--probe-sources", "0,5"]


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # CI's default run stays under 20 minutes; python -m pytest -q -m slow runs it
def test_process_killed_at_a_random_round_resumes_to_the_same_tables(tmp_path: Path) -> None:
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    done = run_cli([*CLI, "--out", str(reference)])
    assert done.returncode == 0, done.stderr

    kill_after = random.Random(os.getpid()).randrange(5, 30) * 10 - 1  # some checkpoint round in 49..289
    proc = subprocess.Popen([*CLI, "--out", str(victim)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (victim / "checkpoints" / f"round-{kill_after:06d}").exists() and proc.poll() is None:
            assert time.time() < deadline, "the run never reached its checkpoint"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (victim / "rounds.parquet").exists()  # no complete-looking table
    assert json.loads((victim / "manifest.json").read_text())["status"] == "running"
    killed_at = max(int(p.name.split("-")[1]) for p in (victim / "checkpoints").glob("round-*"))

    resumed = run_cli([sys.executable, "-m", "dice_ray.simulate", "--resume", str(victim), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    pd.testing.assert_frame_equal(rounds_table(victim), rounds_table(reference))  # bitwise: same machine
    for name in ("nodes", "influence", "dice"):
        pd.testing.assert_frame_equal(pd.read_parquet(victim / f"{name}.parquet"),
                                      pd.read_parquet(reference / f"{name}.parquet"))
    manifest = json.loads((victim / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["resumes"][0]["from_round"] == killed_at + 1
    assert not (victim / "checkpoints").exists()  # removed once the run is complete

    again = run_cli([sys.executable, "-m", "dice_ray.simulate", "--resume", str(victim)])
    assert again.returncode == 2 and "already complete" in again.stderr


@pytest.mark.parametrize(("argv", "message"), [
    (["--resume", "{tmp}/nowhere"], "the run directory does not exist"),
    (["--resume", "{tmp}"], "no manifest.json there"),
    (["--resume", "{run}/manifest.json"], "the run directory is a file, not a folder"),
    (["--resume", "{run}", "--lr", "0.5"], "--lr cannot change it"),
    (["--resume", "{run}", "--set", "seed=3"], "--set cannot change it"),
])
def test_bad_resume_exits_2_with_one_line(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"status": "running", "config": {"nodes": 8}}))
    code = main([a.format(tmp=tmp_path, run=run) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


# -- lost actors, on one machine ------------------------------------------------------------------


def kill_group_at(round_: int, group: int):
    def on_round(metrics, engine) -> None:
        import ray

        if metrics.round == round_ and engine.epoch == 1:
            ray.kill(engine.groups[group], no_restart=False)  # Ray restarts it, empty

    return on_round


@pytest.mark.parametrize("checkpoint_every", [5, pytest.param(0, marks=pytest.mark.slow)])  # 0: slow-marked, for CI
def test_killed_group_actor_is_restarted_and_the_run_ends_with_the_same_numbers(
        ray_local, tmp_path: Path, checkpoint_every: int) -> None:
    common = {"rounds": 30, "engine__actors": 2, "output__checkpoint_every": checkpoint_every}
    undisturbed = simulate(small_config(tmp_path / "a", **common))
    disturbed = simulate(small_config(tmp_path / "b", **common), on_round=kill_group_at(12, 1))
    pd.testing.assert_frame_equal(rounds_table(disturbed), rounds_table(undisturbed))
    [recovery] = json.loads((disturbed / "manifest.json").read_text())["recoveries"]
    restored = recovery["restored_from_round"]
    # the newest checkpoint before the failure showed (rounds are queued ahead: it may show a few rounds
    # after the kill), or the initial state without checkpoints
    assert (restored % 5 == 4 and restored >= 9) if checkpoint_every else restored == -1
    assert recovery["replayed_rounds"][0] == restored + 1 and recovery["replayed_rounds"][1] > 12
    assert recovery["error"].startswith("Actor")  # ActorDiedError or ActorUnavailableError


def test_recovery_restores_proximal_ledger_and_rewired_graph(ray_local, tmp_path: Path) -> None:
    """With online proximal influence and collaborator selection (rewired before rounds 10 and 20), a group
    killed at round 12 is restored from a checkpoint: the ledger and the graph come back with it, and the
    replay rewires again to the same W."""
    common = {"rounds": 24, "engine__actors": 2, "output__checkpoint_every": 5,
              "proximal": {"enabled": True}, "rewiring": {"mode": "influence", "every": 10, "keep": 2}}
    undisturbed = simulate(small_config(tmp_path / "a", **common))
    disturbed = simulate(small_config(tmp_path / "b", **common), on_round=kill_group_at(12, 0))
    for name in ("rounds", "proximal", "rewiring"):
        pd.testing.assert_frame_equal(pd.read_parquet(disturbed / f"{name}.parquet"),
                                      pd.read_parquet(undisturbed / f"{name}.parquet"))
    assert json.loads((disturbed / "manifest.json").read_text())["recoveries"][0]["restored_from_round"] % 5 == 4
    assert sorted(pd.read_parquet(undisturbed / "rewiring.parquet")["round"].unique()) == [10, 20]


def test_run_gives_up_after_max_recoveries(ray_local, tmp_path: Path) -> None:
    config = small_config(tmp_path / "c", rounds=20, engine__actors=2, engine__max_recoveries=0)
    with pytest.raises(RuntimeError, match="gave up after 0 recoveries"):
        simulate(config, on_round=kill_group_at(5, 0))
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and not (tmp_path / "c" / "rounds.parquet").exists()


def test_divergence_names_round_and_participants_and_keeps_the_last_good_checkpoint(ray_local, tmp_path) -> None:
    out = tmp_path / "d"
    config = small_config(out, rounds=200, optim={"batch_size": 8, "lr": 20.0, "name": "momentum"},
                          output__checkpoint_every=1)
    with pytest.raises(FloatingPointError, match=r"round \d+: non-finite .* participants \[") as info:
        simulate(config)
    diverged_in = int(str(info.value).split()[1].rstrip(":"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["last_checkpoint_round"] == diverged_in - 1
    kept = CheckpointStore(out, "").latest()
    assert kept.round == diverged_in - 1 and np.isfinite(kept.load()["state"]).all()
    assert not (out / "rounds.parquet").exists()


# -- lost influence tasks -----------------------------------------------------------------------


@pytest.mark.slow  # ~23 s (two runs, one with a worker killed); the default run keeps CI under 20 minutes
def test_lost_influence_task_is_resubmitted_and_reported(ray_local, tmp_path: Path) -> None:
    # two long tasks (every source of a round in one), so the killer sees one while it works
    common = {"rounds": 12, "influence": {"enabled": True, "hops": 3, "rounds": [3, 6], "sources_per_task": 8}}
    undisturbed = simulate(small_config(tmp_path / "a", **common))
    killed: list[int] = []

    def kill_one_measure_task() -> None:  # a worker dies (SIGKILL) while it measures, once
        def measuring() -> list[int]:
            pids = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::measure_task"):
                        pids.append(int(pid))
                except OSError:
                    continue
            return pids

        deadline = time.time() + 120
        while not killed and time.time() < deadline:
            seen = measuring()
            if seen:
                time.sleep(0.3)  # well into the task, not while Ray still hands it over
                for pid in [p for p in measuring() if p in seen][:1]:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.01)

    # A kill that lands after the task stored its result (or before Ray started it) fails nothing, so a
    # disturbed run may see no retry: try up to five times (three missed on a loaded 2-core machine); every attempt
    # must give the same tables.
    for attempt in range(5):
        killed.clear()
        killer = threading.Thread(target=kill_one_measure_task)
        killer.start()
        try:
            disturbed = simulate(small_config(tmp_path / f"b{attempt}", **common))
        finally:
            killer.join()
        for name in ("influence", "dice"):
            pd.testing.assert_frame_equal(pd.read_parquet(disturbed / f"{name}.parquet"),
                                          pd.read_parquet(undisturbed / f"{name}.parquet"))
        retries = json.loads((disturbed / "manifest.json").read_text())["task_retries"]
        if killed and retries:
            break
    assert killed, "no measurement task was seen running"
    [retry] = retries
    assert retry["stage"] == "influence" and retry["round"] in (3, 6)
    assert len(retry["probe_ids"]) == 8 and "Error" in retry["error"]


def test_interrupted_sweep_trial_continues_from_its_checkpoint(ray_local, tmp_path: Path) -> None:
    """A sweep killed mid-trial: on --resume the trial continues from its last checkpoint, to the tables an
    uninterrupted run writes."""
    from dice_ray.sweep.runner import simulate_or_resume

    common = {"rounds": 20, "output": {"progress": False, "eval_every": 3, "checkpoint_every": 5,
                                       "overwrite": True}}
    reference = simulate(small_config(tmp_path / "a", **common))

    def stop(metrics, engine) -> None:
        if metrics.round == 12:
            raise RuntimeError("the sweep was killed")

    with pytest.raises(RuntimeError, match="killed"):
        simulate(small_config(tmp_path / "b", **common), on_round=stop)
    run, earlier = simulate_or_resume(small_config(tmp_path / "b", **common))
    assert earlier == 0.0  # continued from its checkpoint: its row counts from the resume on
    pd.testing.assert_frame_equal(rounds_table(run), rounds_table(reference))
    assert json.loads((run / "manifest.json").read_text())["resumes"][0]["from_round"] == 10
    fresh, _ = simulate_or_resume(small_config(tmp_path / "c", **common))  # nothing to resume: a plain run
    assert "resumes" not in json.loads((fresh / "manifest.json").read_text())
