"""One writer per run directory and per sweep directory: a second writer started against a live one exits 2 at
once with one line naming the holder and touches nothing; a lock left by a killed process never blocks a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dice_ray.rundir import DirectoryLock

ARGS = ["--engine", "local", "--dataset", "digits", "--nodes", "8", "--heldout-size", "64", "--no-progress",
        "--checkpoint-every", "20", "--eval-every", "50"]


def _simulate(*args: str, **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    base = ["--engine", "local", "--no-progress"] if "--resume" in args else ARGS  # a resume keeps its config
    command = [sys.executable, "-m", "dice_ray.simulate", *base, *args]
    if kwargs.pop("background", False):
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _listing(run: Path) -> set[str]:
    # the live run itself replaces checkpoints/ entries, and writes its manifest (through a transient .partial file)
    # at each checkpoint
    return {p.name for p in run.iterdir() if not p.name.endswith(".partial")}


def _record(run: Path) -> dict:
    """The run's manifest without the counts the live run itself updates at each checkpoint."""
    return {k: v for k, v in json.loads((run / "manifest.json").read_text()).items()
            if k not in ("checkpoints_written", "recoveries", "task_retries")}


def test_a_second_writer_is_refused_and_a_killed_ones_lock_does_not_block(tmp_path: Path) -> None:
    run = tmp_path / "run"
    live = _simulate("--rounds", "100000", "--out", str(run), background=True)
    try:
        # training, the lock held, and the manifest past its last new key (the actors, written with the first
        # checkpoint: read before it, the record gained it under a loaded machine's timing)
        _wait_for(lambda: (run / "checkpoints").is_dir() and "actors" in _record(run))
        holder = f"pid {live.pid} on "
        for second in (["--rounds", "50", "--out", str(run), "--overwrite"], ["--resume", str(run)]):
            listing = _listing(run)
            manifest = _record(run)
            started = time.monotonic()
            out = _simulate(*second)
            lines = out.stderr.strip().splitlines()
            assert out.returncode == 2 and len(lines) == 1, out.stderr
            assert "is being written by" in lines[0] and holder in lines[0], lines[0]
            assert time.monotonic() - started < 60  # at once: before any data is loaded or Ray started
            assert _record(run) == manifest  # nothing touched
            assert listing <= _listing(run)  # nothing removed
        import dice_ray  # a report of the live run: wait for it (it said to resume it, which the lock refuses)

        with pytest.raises(dice_ray.InputError, match=rf"is still running \({holder}.*wait for it"):
            dice_ray.open_run(run).alignment()
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=60)
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"
    assert DirectoryLock(run).holder() is None  # the kernel dropped the lock with its process


def test_a_live_sweep_directory_is_refused(tmp_path: Path) -> None:
    """Another process holds the sweep directory's lock: ``sweep --resume`` exits 2 naming it."""
    out = tmp_path / "sweep"
    spec = {"out": str(out), "base": {"nodes": 4, "rounds": 2, "data": {"dataset": "digits"}},
            "space": {"seed": {"grid": [0, 1]}}, "max_concurrent": 1}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom dice_ray.rundir import DirectoryLock\n"
                               f"DirectoryLock({str(out)!r}, 'sweep directory').acquire()\nprint('held', flush=True)\n"
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = subprocess.run([sys.executable, "-m", "dice_ray.sweep", str(path), "--resume"], capture_output=True,
                              text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and f"pid {holder.pid} on " in lines[0], done.stderr
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_resume_after_the_writer_was_killed_completes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # Long enough that the first checkpoint is seen before the run ends (a finished run removes its checkpoints):
    # with 60 rounds a fast machine finished between two looks and the wait timed out.
    live = _simulate("--rounds", "400", "--out", str(run), background=True)
    _wait_for(lambda: len(list((run / "checkpoints").glob("round-*"))) >= 1 or live.poll() is not None)
    assert live.poll() is None, f"the writer ended before it was killed: {live.stderr.read()}"
    live.send_signal(signal.SIGKILL)
    live.wait(timeout=60)
    out = _simulate("--resume", str(run))
    assert out.returncode == 0, out.stderr
    rounds = pd.read_parquet(run / "rounds.parquet")
    assert sorted(rounds["round"].unique()) == list(range(400))
    assert os.path.exists(run / ".lock")  # the file stays, as a record of the last writer
