"""Checkpoints cannot execute code and cannot be silently wrong: arrays only, SHA-256 digests written last and
verified on resume; a bad checkpoint is skipped (or, if none is good, the resume is refused and nothing changes)."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
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


def _interrupted(tmp_path: Path, name: str, **changes) -> Path:
    """A run (of CONFIG with ``changes``) killed after round 8: the checkpoints after rounds 5 and 8 are kept (the
    newest two)."""
    config = dice_ray.as_config(CONFIG, output={"out": str(tmp_path / name)}, **changes)

    def stop(metrics, engine) -> None:
        if metrics.round == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dice_ray.run(config, engine="local", on_round=stop)
    return tmp_path / name


def _reference(tmp_path: Path) -> dict[str, pd.DataFrame]:
    run = dice_ray.run(dice_ray.as_config(CONFIG, output={"out": str(tmp_path / "reference")}), engine="local")
    return {name: run.table(name) for name in ("rounds", "proximal")}


def _assert_undisturbed(resumed: dice_ray.Run, tmp_path: Path) -> None:
    """The resumed run's tables equal an undisturbed run's."""
    for name, table in _reference(tmp_path).items():
        pd.testing.assert_frame_equal(resumed.table(name), table)


def _stamps(run: Path) -> list[tuple[Path, int]]:
    """Every file and folder of ``run`` with its modification time: unchanged means untouched."""
    return sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))


def _newest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("round-*"))[-1]


def _resumes_from_the_older(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Resume ``run``, whose newest checkpoint is to be skipped: it resumes from the previous one (after round 5)
    and ends with an undisturbed run's tables. Returns what it printed to stderr."""
    capsys.readouterr()
    resumed = dice_ray.resume(run, engine="local")
    err = capsys.readouterr().err
    assert resumed.manifest["resumes"][-1]["from_round"] == 6
    _assert_undisturbed(resumed, tmp_path)
    return err


def test_an_unfinished_run_opens_with_the_rows_its_checkpoints_committed(tmp_path: Path) -> None:
    """open_run of an interrupted run: its round-by-round tables hold the rows committed with its last checkpoint
    (round 8), equal to a finished run's; it used to say 'no rounds table'. A table nothing committed says why."""
    run = dice_ray.open_run(_interrupted(tmp_path, "stopped"))
    assert run.status == "interrupted" and run.tables() == ["nodes", "proximal", "rounds"]
    reference = _reference(tmp_path)
    for name in ("rounds", "proximal"):
        rows = run.table(name)
        assert rows["round"].max() == 8
        pd.testing.assert_frame_equal(rows, reference[name].query("round <= 8").reset_index(drop=True))
    with pytest.raises(dice_ray.InputError, match="the run is interrupted and no checkpoint has committed its rows"):
        run.table("dice")


def test_a_running_run_shows_its_rows_between_checkpoints(tmp_path: Path, monkeypatch) -> None:
    """open_run follows a running run: rows reach part files every few seconds (``loop.FLUSH_SECONDS``; 0 here, so
    every round), not only with each checkpoint (a run before its first checkpoint showed none). Interrupted or
    diverged, a run keeps the rows of the rounds it finished (a diverged run's curve was lost)."""
    from dice_ray.engine import loop

    monkeypatch.setattr(loop, "FLUSH_SECONDS", 0.0)
    out, seen = tmp_path / "live", []

    def follow(metrics, engine) -> None:
        seen.append(int(dice_ray.open_run(out).rounds["round"].max()))
        if metrics.round == 3:
            raise KeyboardInterrupt

    config = dice_ray.as_config(CONFIG, output={"out": str(out), "checkpoint_every": 50})
    with pytest.raises(KeyboardInterrupt):
        dice_ray.run(config, engine="local", on_round=follow)
    assert seen == [0, 1, 2, 3]
    monkeypatch.setattr(loop, "FLUSH_SECONDS", 1e9)  # rows reach the disk when the run stops
    config = dice_ray.as_config(CONFIG, optim={"lr": 1e3}, output={"out": str(tmp_path / "diverged")})
    with pytest.raises(FloatingPointError, match=r"round (\d+)") as stopped:
        dice_ray.run(config, engine="local")
    failed = int(re.search(r"round (\d+)", str(stopped.value))[1])
    rounds = dice_ray.open_run(tmp_path / "diverged").rounds
    assert failed > 0 and sorted(set(rounds["round"])) == list(range(failed))


def test_a_changed_byte_skips_that_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _interrupted(tmp_path, "flipped")
    newest = _newest(run)
    data = bytearray((newest / "state.npz").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of the parameters
    (newest / "state.npz").write_bytes(bytes(data))
    err = _resumes_from_the_older(run, tmp_path, capsys)
    assert f"skipping checkpoint {newest}: state.npz does not match its recorded SHA-256" in err
    assert err.count("skipping checkpoint") == 1  # said once (it was twice: two looks at the checkpoints)


def test_a_planted_pickle_is_never_unpickled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Someone replaces driver.npz with a pickle and rewrites its digest: the file is refused, nothing runs."""
    run = _interrupted(tmp_path, "planted")
    marker = tmp_path / "code-ran"
    for checkpoint in sorted((run / "checkpoints").glob("round-*")):
        (checkpoint / "driver.npz").write_bytes(pickle.dumps(Planted(marker)))
        meta = json.loads((checkpoint / "meta.json").read_text())
        meta["sha256"]["driver.npz"] = hashlib.sha256((checkpoint / "driver.npz").read_bytes()).hexdigest()
        (checkpoint / "meta.json").write_text(json.dumps(meta))
    before = _stamps(run)
    capsys.readouterr()
    code = main(["--resume", str(run), "--engine", "local"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: cannot resume {str(run)!r}: none of its 2 checkpoints verifies")
    assert all("driver.npz is not a file of plain arrays" in line for line in err[:-1]) and len(err) == 3
    assert not marker.exists()
    assert _stamps(run) == before  # untouched


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
    _assert_undisturbed(resumed, tmp_path)
    # digests that are not a mapping (a traceback), or that leave state.npz out (loaded unchecked): skipped too
    for name, digests, needle in (("listed", ["x"], "records its digests wrongly"),
                                  ("none-listed", {}, "records no digest of state.npz")):
        run = _interrupted(tmp_path, name)
        newest = _newest(run)
        meta = json.loads((newest / "meta.json").read_text())
        (newest / "meta.json").write_text(json.dumps({**meta, "sha256": digests}))
        (newest / "state.npz").write_bytes(b"cut")
        assert needle in _resumes_from_the_older(run, tmp_path / f"reference-{name}", capsys)


def test_the_table_rows_a_checkpoint_needs_are_verified_with_it(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The rows of rounds up to a checkpoint live in parts beside it (checkpoints/<table>-<first>-<last>.parquet);
    its meta.json records their digests. A part gone: that checkpoint is skipped and the tables still equal an
    undisturbed run's (it used to resume with those rounds' rows silently missing). A part damaged that every
    checkpoint needs: exit 2, nothing changed (it used to train on and crash when writing the tables)."""
    run = _interrupted(tmp_path, "parts")
    (run / "checkpoints" / "rounds-000000006-000000008.parquet").unlink()  # only the newest checkpoint's
    err = _resumes_from_the_older(run, tmp_path, capsys)
    assert "rounds-000000006-000000008.parquet (rows up to this round) is missing" in err

    run = _interrupted(tmp_path, "extra")  # a part the checkpoint does not list: its rows were added twice
    parts = run / "checkpoints"
    copied = (parts / "rounds-000000006-000000008.parquet").read_bytes()
    (parts / "rounds-000000006-000000007.parquet").write_bytes(copied)
    err = _resumes_from_the_older(run, tmp_path / "reference-extra", capsys)
    assert "rounds-000000006-000000007.parquet (rows up to this round) is not one it recorded" in err

    run = _interrupted(tmp_path, "damaged")
    part = run / "checkpoints" / "proximal-000000003-000000005.parquet"  # both checkpoints' rows
    part.write_bytes(part.read_bytes()[:100])
    before = _stamps(run)
    code = main(["--resume", str(run), "--engine", "local"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "none of its 2 checkpoints verifies" in err[-1], err
    assert _stamps(run) == before


def test_the_config_digest_counts_the_precision_and_not_the_placement() -> None:
    """A checkpoint belongs to the numbers' config: the local step's precision changes them (a resume of an fp32 run
    under bf16 used to be taken: its manifest's engine section was left out whole); where it runs does not."""
    from dice_ray.checkpoint import config_digest

    digest = config_digest(dice_ray.as_config(CONFIG))
    for placement in ({"actors": 3}, {"transport": "object_store"}, {"max_recoveries": 0}, {"precision": "fp32"}):
        assert config_digest(dice_ray.as_config(CONFIG, engine=placement)) == digest
    for precision in ("tf32", "bf16"):
        assert config_digest(dice_ray.as_config(CONFIG, engine={"precision": precision})) != digest


def test_a_checkpoint_whose_folder_names_another_round_is_not_trusted(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A resume takes the round from the folder's name: renamed to a later round, it used to skip to the end,
    delete the checkpoints with the table parts and fail. The folder must agree with its meta.json; a checkpoint of
    the run's last round or beyond (never written: the tables are final then) is refused with nothing changed."""
    run = _interrupted(tmp_path, "renamed")
    newest = _newest(run)
    newest.rename(newest.parent / "round-009999")
    err = _resumes_from_the_older(run, tmp_path, capsys)
    assert "its folder names round 9999, its meta.json round 8" in err

    run = _interrupted(tmp_path, "beyond")
    newest = _newest(run)
    meta = json.loads((newest / "meta.json").read_text())
    (newest / "meta.json").write_text(json.dumps({**meta, "round": 9999}))
    newest.rename(newest.parent / "round-009999")
    before = _stamps(run)
    capsys.readouterr()
    assert main(["--resume", str(run), "--engine", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert "round-009999 is of round 9999, but the run has rounds 0..9" in err and len(err.splitlines()) == 1
    assert _stamps(run) == before


def test_a_resume_after_training_refuses_a_damaged_rounds_table(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A run stopped after training (rounds.parquet written) whose rounds.parquet was replaced: one line, exit 2,
    nothing changed (it used to mark the run running and fail with Arrow's traceback)."""
    run = tmp_path / "after"
    dice_ray.run(dice_ray.as_config(CONFIG, rounds=4, output={"out": str(run)}), engine="local")
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))
    (run / "rounds.parquet").write_bytes(b"not parquet")
    before = _stamps(run)
    capsys.readouterr()
    assert main(["--resume", str(run), "--engine", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert "rounds.parquet is not a readable Parquet table" in err and len(err.splitlines()) == 1
    assert _stamps(run) == before


@pytest.mark.parametrize("key, edit, needle", [
    ("state", lambda s: s[:5], "its state is [5, "),
    ("state", lambda s: s.astype(str), "state holds <U"),
    ("state", lambda s: s * float("nan"), "its state is not finite"),
    ("state", lambda s: s[:, :7], "its state is [8, 7], not [8, 17226]"),
    ("state", lambda s: s[:, :1], "its state is [8, 1], not [8, 17226]"),  # was broadcast: trained from there
    ("opt.momentum_buffer", lambda s: s[:, :1], "opt.momentum_buffer is [8, 1], not [8, 17226]"),  # broadcast too
    ("opt.momentum_buffer", lambda s: s * float("nan"), "its opt.momentum_buffer is not finite"),  # "diverged"
    ("opt.momentum_buffer", lambda s: None, "does not fit this run (KeyError: 'opt.momentum_buffer')"),
])
def test_a_checkpoint_edited_with_its_digests_rewritten_is_one_line(tmp_path: Path, capsys, key, edit,
                                                                   needle) -> None:
    """Digests catch damage, not edits: whoever edits a checkpoint can rewrite them. Arrays that cannot be this
    run's state end in one line, exit 2, with the run directory as it was (they were tracebacks from torch,
    'training diverged' hundreds of rounds later, or, one column wide, broadcast into every column and trained
    from)."""
    import numpy as np

    run = _interrupted(tmp_path, "edited", optim={"name": "momentum"})
    for checkpoint in sorted((run / "checkpoints").glob("round-*")):
        with np.load(checkpoint / "state.npz") as arrays:
            saved = {key: arrays[key] for key in arrays.files}
        saved[key] = edit(saved[key])
        if saved[key] is None:
            del saved[key]
        with open(checkpoint / "state.npz", "wb") as f:
            np.savez(f, **saved)
        meta = json.loads((checkpoint / "meta.json").read_text())
        meta["sha256"]["state.npz"] = hashlib.sha256((checkpoint / "state.npz").read_bytes()).hexdigest()
        (checkpoint / "meta.json").write_text(json.dumps(meta))
    before = [stamp for stamp in _stamps(run) if stamp[0].name != ".lock"]
    capsys.readouterr()
    assert main(["--resume", str(run), "--engine", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and err.startswith(f"error: cannot resume {str(run)!r}: "), err
    # refused before anything is written (the manifest said 'failed' with a resume that never ran)
    assert [stamp for stamp in _stamps(run) if stamp[0].name != ".lock"] == before
