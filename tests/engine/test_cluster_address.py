"""Joining a cluster: an ``--address`` where no Ray head answers is bad input — one line saying what to check,
exit status 2, before anything is written (Ray itself retries for minutes and ends in a traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def test_an_unreachable_address_is_one_line_and_exit_2(tmp_path: Path) -> None:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "dice_ray.simulate", "--dataset", "digits", "--nodes", "4",
                          "--rounds", "2", "--address", "127.0.0.1:1", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: engine.address (--address) 127.0.0.1:1: no Ray head answers there")
    assert "ray status" in lines[0]
    assert not (tmp_path / "run").exists()
    assert time.monotonic() - started < 60


def test_an_unreachable_ray_address_variable_is_named_as_such(tmp_path: Path) -> None:
    """The address came from RAY_ADDRESS, not from an option the user did not give: the line says so."""
    out = subprocess.run([sys.executable, "-m", "dice_ray.simulate", "--dataset", "digits", "--nodes", "4",
                          "--rounds", "2", "--out", str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: RAY_ADDRESS 127.0.0.1:1: no Ray head answers there")
    assert not (tmp_path / "run").exists()
