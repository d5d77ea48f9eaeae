"""Bad environments: a run directory on a full file system, and one in a read-only folder. Each gives one clear
line and a non-zero exit, leaves no table that reads as complete, and a full disk's run resumes once space is
back with the numbers of an undisturbed run. Real small tmpfs mounts (the tests need root, as CI has)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

ARGS = ["--engine", "local", "--dataset", "digits", "--nodes", "8", "--heldout-size", "64", "--rounds", "30",
        "--no-progress", "--eval-every", "5", "--checkpoint-every", "3", "--proximal", "--proximal-zprime", "heldout"]


def _mount(path: Path, *options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    _mount(disk, "size=1200k")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _simulate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dice_ray.simulate", *args], capture_output=True, text=True,
                          timeout=600)


def test_a_full_disk_stops_with_one_line_and_the_run_resumes_once_space_is_back(small_disk: Path,
                                                                               tmp_path: Path) -> None:
    run = small_disk / "run"
    out = _simulate(*ARGS, "--out", str(run))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: cannot write the run directory {run}: No space left on device"), lines[0]
    assert f"--resume {run}" in lines[0]
    assert not (run / "rounds.parquet").exists() and not (run / "proximal.parquet").exists()
    assert not list(run.rglob("*.partial"))  # no half-written file stays behind
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = _simulate("--resume", str(run), "--engine", "local", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    reference = _simulate(*ARGS, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr
    for name in ("rounds", "proximal"):
        pd.testing.assert_frame_equal(pd.read_parquet(run / f"{name}.parquet"),
                                      pd.read_parquet(tmp_path / "reference" / f"{name}.parquet"))


def test_a_read_only_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    _mount(folder, "size=1m", "ro")
    try:
        out = _simulate(*ARGS, "--out", str(folder / "run"))
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert "is not writable" in lines[0] and str(folder) in lines[0], lines[0]
        assert not any(folder.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_report_asked_to_write_into_a_read_only_run_says_so_in_one_line(tmp_path: Path) -> None:
    """A run received on a read-only medium is read as any other; writing a report into it is an ``InputError`` that
    names the folder, as the command line's (it was an OSError naming a hidden ``.partial`` file)."""
    import shutil

    import dice_ray

    config = dice_ray.RunConfig(nodes=4, rounds=4, data={"dataset": "digits", "heldout_size": 16},
                                influence={"enabled": True, "hops": 1, "rounds": [1]},
                                output={"out": str(tmp_path / "run"), "progress": False})
    dice_ray.run(config, engine="local")
    folder = tmp_path / "ro"
    _mount(folder, "size=16m")
    try:
        shutil.copytree(tmp_path / "run", folder, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        run = dice_ray.open_run(folder)
        assert len(run.alignment())  # reading it needs no writing
        with pytest.raises(dice_ray.InputError, match=f"{folder}' is not writable; the report writes there"):
            run.alignment(write=True)
        assert not (folder / "alignment.parquet").exists()
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
