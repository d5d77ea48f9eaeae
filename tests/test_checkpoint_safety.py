"""Checkpoints cannot execute code and cannot be silently wrong: arrays only, SHA-256 digests written last and
verified on resume; a bad checkpoint is skipped (or, if none is good, the resume is refused and nothing changes)."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pandas as pd
import pytest

import dice_ray
from dice_ray.cli.simulate import main

CONFIG = {"nodes": 8, "rounds": 10, "seed": 4, "data": {"dataset": "digits", "heldout_size": 64},
          "proximal": {"enabled": True, "zprime": "heldout"},
          "output": {"progress": False, "eval_every": 3, "checkpoint_every": 3}}


class Planted:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _interrupted(tmp_path: Path, name: str) -> Path:
    """A run killed after round 8: the checkpoints after rounds 5 and 8 are kept (the newest two)."""
    config = dice_ray.as_config(CONFIG, output={"out": str(tmp_path / name)})

    def stop(metrics, engine) -> None:
        if metrics.round == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dice_ray.run(config, engine="local", on_round=stop)
    return tmp_path / name


def _reference(tmp_path: Path) -> dict[str, pd.DataFrame]:
    run = dice_ray.run(dice_ray.as_config(CONFIG, output={"out": str(tmp_path / "reference")}), engine="local")
    return {name: run.table(name) for name in ("rounds", "proximal")}


def _newest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("round-*"))[-1]


def test_a_changed_byte_skips_that_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _interrupted(tmp_path, "flipped")
    newest = _newest(run)
    data = bytearray((newest / "state.npz").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of the parameters
    (newest / "state.npz").write_bytes(bytes(data))
    capsys.readouterr()
    resumed = dice_ray.resume(run, engine="local")
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}: state.npz does not match its recorded SHA-256" in err
    assert resumed.manifest["resumes"][-1]["from_round"] == 6  # the previous checkpoint (after round 5)
    for name, table in _reference(tmp_path).items():
        pd.testing.assert_frame_equal(resumed.table(name), table)


def test_a_planted_pickle_is_never_unpickled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Someone replaces driver.npz with a pickle and rewrites its digest: the file is refused, nothing runs."""
    run = _interrupted(tmp_path, "planted")
    marker = tmp_path / "code-ran"
    for checkpoint in sorted((run / "checkpoints").glob("round-*")):
        (checkpoint / "driver.npz").write_bytes(pickle.dumps(Planted(marker)))
        meta = json.loads((checkpoint / "meta.json").read_text())
        meta["sha256"]["driver.npz"] = hashlib.sha256((checkpoint / "driver.npz").read_bytes()).hexdigest()
        (checkpoint / "meta.json").write_text(json.dumps(meta))
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    capsys.readouterr()
    code = main(["--resume", str(run), "--engine", "local"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: --resume") and "none of its 2 checkpoints verifies" in err[-1]
    assert all("driver.npz is not a file of plain arrays" in line for line in err[:-1]) and len(err) == 3
    assert not marker.exists()
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before  # untouched


def test_a_checkpoint_without_digests_is_not_trusted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint of an older version (no digests) or one whose meta.json was lost half-written is skipped."""
    run = _interrupted(tmp_path, "old")
    newest = _newest(run)
    meta = json.loads((newest / "meta.json").read_text())
    del meta["sha256"]
    (newest / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    resumed = dice_ray.resume(run, engine="local")
    assert "records no digests" in capsys.readouterr().err
    for name, table in _reference(tmp_path).items():
        pd.testing.assert_frame_equal(resumed.table(name), table)
