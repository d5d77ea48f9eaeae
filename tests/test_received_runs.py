"""A run directory received from someone else is data: opening it, reading its config and tables, and analyzing it
import nothing its config names; resuming or retraining it refuses, naming the modules, unless allowed, and joins
no Ray cluster the directory names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import dice_ray
from dice_ray.cli.analyze import main as analyze
from dice_ray.cli.simulate import main as simulate
from dice_ray.config import rerun_config

PLANTED = "dice_ray_planted_module"


@pytest.fixture(scope="module")
def received(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run whose manifest was edited to import a module that sits beside it."""
    folder = tmp_path_factory.mktemp("received")
    config = dice_ray.RunConfig(nodes=4, rounds=4, seed=0, data={"dataset": "digits", "heldout_size": 16},
                                optim={"batch_size": 8}, influence={"enabled": True, "hops": 1, "rounds": [1]},
                                ledger={"enabled": True, "hops": 1},
                                output={"out": str(folder / "run"), "progress": False, "checkpoint_every": 0})
    dice_ray.run(config, engine="local")
    manifest = json.loads((folder / "run" / "manifest.json").read_text())
    manifest["config"]["imports"] = [PLANTED]
    manifest["config"]["data"]["dataset"] = "registered-by-the-planted-module"
    (folder / "run" / "manifest.json").write_text(json.dumps(manifest))
    (folder / f"{PLANTED}.py").write_text(f"open({str(folder / 'RAN')!r}, 'w').write('ran')\n")
    return folder


@pytest.fixture
def beside(received: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work in the received folder, with it importable (as ``python`` started there has it)."""
    monkeypatch.chdir(received)
    monkeypatch.syspath_prepend(str(received))
    yield received
    assert PLANTED not in sys.modules, "the planted module was imported"
    assert not (received / "RAN").exists(), "the planted module ran"


def test_opening_reading_and_analyzing_a_received_run_runs_nothing_it_names(beside: Path, capsys) -> None:
    run = dice_ray.open_run("run")
    assert run.config.imports == [PLANTED]  # validated, names taken as recorded
    assert run.config.data.dataset == "registered-by-the-planted-module"
    assert len(run.rounds) and run.status == "complete"
    assert len(run.alignment()) and run.cascade()
    assert analyze(["cascade", "run"]) == 0
    assert analyze(["contributions", "run"]) == 0


def test_resuming_or_retraining_a_received_run_is_refused_naming_its_modules(beside: Path, capsys) -> None:
    manifest_path = beside / "run" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["status"] = "interrupted"
    manifest_path.write_text(json.dumps(manifest))
    try:
        with pytest.raises(dice_ray.InputError, match=f"imports {PLANTED}.*--allow-imports"):
            dice_ray.resume("run", engine="local")
        assert simulate(["--resume", "run", "--engine", "local"]) == 2
        assert f"imports {PLANTED}" in capsys.readouterr().err
        assert analyze(["contributions", "run", "--loo", "--local"]) == 2
        assert f"imports {PLANTED}" in capsys.readouterr().err
    finally:
        manifest["status"] = "complete"
        manifest_path.write_text(json.dumps(manifest))


def test_allowed_imports_are_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal is the only thing between a resume and the module: allowed, it runs (here, in a fresh folder)."""
    (tmp_path / "dice_ray_allowed_module.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rerun_config({"imports": ["dice_ray_allowed_module"], "nodes": 4}, "a run", allow_imports=True)
    assert (tmp_path / "RAN").exists()
    monkeypatch.delitem(sys.modules, "dice_ray_allowed_module")


def test_allow_imports_without_resume_is_refused(capsys) -> None:
    assert simulate(["--allow-imports", "--engine", "local", "--rounds", "1"]) == 2
    assert "--allow-imports applies to --resume only" in capsys.readouterr().err


def test_a_received_run_does_not_choose_the_cluster_its_resume_or_retraining_joins(tmp_path: Path) -> None:
    """A run directory may come from someone else: the Ray address its config records is not joined (Ray unpickles
    what a cluster sends back). Here it names a port where nothing listens: joining it would stop the resume and the
    retraining with "no Ray head"; they run on a local Ray instead, each saying so in one warning line."""
    run = tmp_path / "run"

    def stop(metrics, engine) -> None:
        if metrics.round == 3:
            raise RuntimeError("interrupted")

    config = dice_ray.RunConfig(nodes=4, rounds=5, seed=0, data={"dataset": "digits", "heldout_size": 16},
                                optim={"batch_size": 8}, ledger={"enabled": True, "hops": 1},
                                output={"out": str(run), "progress": False, "checkpoint_every": 2})
    with pytest.raises(RuntimeError, match="interrupted"):
        dice_ray.run(config, engine="local", on_round=stop)

    def record_address() -> None:
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["config"]["engine"]["address"], manifest["engine"] = "127.0.0.1:1", "ray"
        (run / "manifest.json").write_text(json.dumps(manifest))

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root)
    for argv in (["-m", "dice_ray.simulate", "--resume", str(run)],
                 ["-m", "dice_ray.analyze", "contributions", str(run), "--loo"]):
        record_address()
        done = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "the run was placed on the Ray cluster at '127.0.0.1:1'" in done.stderr, done.stderr[-2000:]
        assert "this one runs on a local Ray" in done.stderr
    assert len(pd.read_parquet(run / "rounds.parquet")) == 4 * 5 and (run / "loo.parquet").is_file()
