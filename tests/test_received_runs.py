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


def test_a_received_run_does_not_choose_where_its_resume_sends_mlflow_records(tmp_path: Path, monkeypatch,
                                                                               capsys) -> None:
    """The MLflow tracking URI a run recorded is not used by its resume: MLflow sends this machine's host name, and
    the credentials it is given (MLFLOW_TRACKING_TOKEN, ...), with the records. They go where the session says
    (MLFLOW_TRACKING_URI, else the run directory's store), with one warning line when that is elsewhere. The
    checkpoints' digest does not count the URI; a checkpoint an earlier version wrote, whose digest counted it, is
    still taken."""
    from mlflow.tracking import MlflowClient

    from dice_ray.checkpoint import _digest, config_digest

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sender = f"sqlite:///{tmp_path / 'sender.db'}"

    def interrupted(name: str) -> Path:
        def stop(metrics, engine) -> None:
            if metrics.round == 3:
                raise RuntimeError("interrupted")

        config = dice_ray.RunConfig(nodes=4, rounds=5, seed=0, data={"dataset": "digits", "heldout_size": 16},
                                    optim={"batch_size": 8},
                                    output={"out": str(tmp_path / name), "progress": False, "checkpoint_every": 2,
                                            "log": ["mlflow"], "tracking_uri": sender})
        with pytest.raises(RuntimeError, match="interrupted"):
            dice_ray.run(config, engine="local", on_round=stop)
        return tmp_path / name

    def runs(uri: str) -> list[str]:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("dice-ray")
        return [r.info.status for r in client.search_runs([experiment.experiment_id])] if experiment else []

    run = interrupted("run")
    assert runs(sender) == ["FAILED"]
    capsys.readouterr()
    resumed = dice_ray.resume(run, engine="local")
    err = capsys.readouterr().err
    assert f"the run sent its MLflow records to {sender!r}" in err and "the run directory (mlflow.db)" in err
    assert err.count("MLflow records") == 1 and resumed.status == "complete"
    assert runs(sender) == ["FAILED"] and runs(f"sqlite:///{run.resolve()}/mlflow.db") == ["FINISHED"]
    assert resumed.config.output.tracking_uri == sender  # the manifest still records what the run was given

    earlier = interrupted("earlier")  # as an earlier version wrote it: the URI counted in its checkpoints' digest
    recorded = json.loads((earlier / "manifest.json").read_text())["config"]
    counted = _digest(json.loads(json.dumps(recorded)), counted=True)
    assert counted != config_digest(dice_ray.as_config(recorded))
    for meta in (earlier / "checkpoints").glob("round-*/meta.json"):
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "config_digest": counted}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sender)  # the session says where: there, without a warning
    capsys.readouterr()
    resumed = dice_ray.resume(earlier, engine="local")
    assert "MLflow records" not in capsys.readouterr().err
    assert resumed.manifest["resumes"][-1]["from_round"] == 4 and resumed.status == "complete"
    assert sorted(runs(sender)) == ["FAILED", "FINISHED"]  # "earlier"'s MLflow run there, continued
    pd.testing.assert_frame_equal(resumed.rounds, pd.read_parquet(run / "rounds.parquet"))


def _file_topology_run(tmp_path: Path, monkeypatch, on_round=None) -> tuple[Path, Path, Path]:
    """(sender, receiver, run): a run made in ``sender`` on the ring in its relative topo/graph.txt; ``receiver``'s
    topo/graph.txt is another graph (a star with a chord)."""
    sender, receiver = tmp_path / "sender", tmp_path / "receiver"
    for folder, edges in ((sender, "0 1\n1 2\n2 3\n3 0\n"), (receiver, "0 1\n0 2\n0 3\n1 2\n")):
        (folder / "topo").mkdir(parents=True)
        (folder / "topo" / "graph.txt").write_text(edges)
    monkeypatch.chdir(sender)
    config = dice_ray.RunConfig(nodes=4, rounds=4, seed=0, data={"dataset": "digits", "heldout_size": 16},
                                topology={"name": "file", "file": "topo/graph.txt"}, optim={"batch_size": 8},
                                influence={"enabled": True, "hops": 1, "rounds": [1]},
                                output={"out": str(tmp_path / "run"), "progress": False, "checkpoint_every": 1})
    dice_ray.run(config, engine="local", on_round=on_round)
    return sender, receiver, tmp_path / "run"


def test_a_run_keeps_its_topology_file_and_reads_it_from_anywhere(tmp_path: Path, monkeypatch, capsys) -> None:
    """A run copies its topology file into its directory (topology_file.txt, with its SHA-256 in the manifest): a
    report and a resume from another folder read the graph the run trained on. (A relative path was read again
    from the current folder: another graph, or 'does not exist'.) A copy changed since is one line, exit 2."""
    def stop(metrics, engine) -> None:
        if metrics.round == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _file_topology_run(tmp_path / "stopped", monkeypatch, stop)
    sender, receiver, run = _file_topology_run(tmp_path, monkeypatch)
    kept = run / "topology_file.txt"
    assert kept.read_text() == (sender / "topo" / "graph.txt").read_text()
    assert json.loads((run / "manifest.json").read_text())["topology_file"]["name"] == kept.name
    assert analyze(["cascade", str(run)]) == 0
    here = pd.read_parquet(run / "cascade.parquet")
    monkeypatch.chdir(receiver)  # its topo/graph.txt is another graph
    assert analyze(["cascade", str(run)]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(run / "cascade.parquet"), here)
    resumed = dice_ray.resume(tmp_path / "stopped" / "run", engine="local")
    pd.testing.assert_frame_equal(resumed.rounds, pd.read_parquet(run / "rounds.parquet"))

    again = json.loads((run / "manifest.json").read_text())["config"]  # run again in place, from its own copy
    again["topology"]["file"], again["output"]["overwrite"] = str(kept), True
    dice_ray.run(dice_ray.RunConfig(**again), engine="local")  # the copy was deleted before it was read
    assert kept.read_text() == (sender / "topo" / "graph.txt").read_text()
    kept.write_text("0 1\n0 2\n0 3\n1 2\n")
    capsys.readouterr()
    assert analyze(["cascade", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "the run's copy of its topology file, topology_file.txt, was changed since the run" in err
    assert len(err.splitlines()) == 1


def test_a_report_refuses_a_graph_or_size_that_is_not_the_one_the_run_recorded(tmp_path: Path, monkeypatch,
                                                                               capsys) -> None:
    """A run of an earlier version kept no copy of its topology file: reports rebuild the graph from the path its
    config names. A relative one read from another folder used to give another graph silently (wrong hop distances
    and positions), and a manifest whose participant count was changed, IndexErrors or a 7 TiB allocation. Both are
    checked against nodes.parquet."""
    sender, receiver, run = _file_topology_run(tmp_path, monkeypatch)
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["topology_file"]  # as an earlier version recorded it
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert analyze(["cascade", str(run)]) == 0  # where the run was made: its own graph
    monkeypatch.chdir(receiver)
    capsys.readouterr()
    assert analyze(["cascade", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "(read from 'topo/graph.txt') is not the one the run trained on" in err and len(err.splitlines()) == 1

    monkeypatch.chdir(sender)
    manifest["config"]["nodes"] = 1_000_000
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert analyze(["cascade", str(run)]) == 2
    assert "manifest.json records 1000000 participants, nodes.parquet 4" in capsys.readouterr().err


def test_a_config_recorded_by_an_earlier_version_with_a_repeated_id_is_read_as_recorded() -> None:
    """Earlier versions accepted an id or round listed twice (counted once); a new config refuses it, but a run,
    checkpoint or sweep directory that records one still opens, reports and resumes as it ran."""
    from dice_ray.config import build_config, read_recorded
    from dice_ray.errors import InputError

    recorded = {"nodes": 8, "influence": {"enabled": True, "hops": 1, "sources": [1, 1]},
                "misbehavior": {"kind": "sign-flip", "selection": "ids", "ids": [2, 2]}}
    config = read_recorded(recorded, "run 'old'")
    assert config.influence.sources == [1, 1] and config.misbehavior.number(8) == 1
    with pytest.raises(InputError, match="lists 1 twice"):
        build_config(recorded)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped after round 3 with checkpoints after rounds 1 and 3, TensorBoard on: one to receive."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    config = dice_ray.as_config({"nodes": 4, "rounds": 6, "data": {"dataset": "digits", "heldout_size": 16}},
                                output={"out": str(out), "progress": False, "checkpoint_every": 2,
                                        "log": ["tensorboard"]})

    def stop(metrics, engine) -> None:
        if metrics.round == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dice_ray.run(config, engine="local", on_round=stop)
    return out


def _copy(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


def _one_line(code: int, capsys: pytest.CaptureFixture[str], needle: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err


def test_a_received_run_writes_nothing_outside_itself_through_links(interrupted: Path, tmp_path: Path,
                                                                     capsys) -> None:
    """Found by an audit: a .lock linked to a user's file had it overwritten with the lock's JSON; a linked
    checkpoints/, tensorboard/ or mlflow.db took the resume's checkpoints, parts and events outside (a rollback also
    deleted a file there). A symbolic link or a special file anywhere in a run directory is refused, nothing written."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("precious")
    for name, target in ((".lock", outside / "precious.txt"), ("checkpoints", outside), ("tensorboard", outside)):
        run = _copy(interrupted, tmp_path / f"link-{name.strip('.')}")
        path = run / name
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        path.symlink_to(target)
        capsys.readouterr()
        _one_line(simulate(["--resume", str(run), "--engine", "local"]), capsys, f"{path} is a symbolic link")
    assert [p.name for p in outside.iterdir()] == ["precious.txt"] and (outside / "precious.txt").read_text() == (
        "precious")
    run = _copy(interrupted, tmp_path / "fifo")
    os.mkfifo(run / "checkpoints" / "pipe")
    _one_line(simulate(["--resume", str(run), "--engine", "local"]), capsys, "is not a regular file or folder")


def test_a_received_runs_crafted_files_are_one_line_each(interrupted: Path, tmp_path: Path, capsys) -> None:
    """Found by an audit, each a traceback (or a hang, or unbounded memory) before: a manifest that is a FIFO or
    nested too deeply; manifest records of the wrong type (one failed after training); a checkpoint whose array header
    asks for 1.5 TiB, or whose members are compressed (a zip bomb's way); pandas metadata naming another dtype."""
    import hashlib
    import zipfile

    import numpy as np
    import pyarrow.parquet as pq

    run = _copy(interrupted, tmp_path / "fifo-manifest")
    (run / "manifest.json").unlink()
    os.mkfifo(run / "manifest.json")
    _one_line(analyze(["alignment", str(run)]), capsys, "manifest.json is not a regular file")
    run = _copy(interrupted, tmp_path / "deep")
    (run / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    _one_line(analyze(["anomaly", str(run)]), capsys, "nested too deeply")
    _one_line(simulate(["--resume", str(run), "--engine", "local"]), capsys, "manifest.json is not readable JSON")
    run = _copy(interrupted, tmp_path / "records")
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "recoveries": "x"}))
    _one_line(simulate(["--resume", str(run), "--engine", "local"]), capsys, "'recoveries' is not a list")

    def rewrite_state(run: Path, write) -> None:
        for checkpoint in sorted((run / "checkpoints").glob("round-*")):
            write(checkpoint / "state.npz")
            meta = json.loads((checkpoint / "meta.json").read_text())
            meta["sha256"]["state.npz"] = hashlib.sha256((checkpoint / "state.npz").read_bytes()).hexdigest()
            (checkpoint / "meta.json").write_text(json.dumps(meta))

    def huge(path: Path) -> None:  # a header claiming 4e11 float32 over a few bytes
        with zipfile.ZipFile(path, "w") as archive:
            header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
            header["shape"] = (4 * 10**11,)
            with archive.open("state.npy", "w") as f:
                np.lib.format.write_array_header_1_0(f, header)
                f.write(b"\0" * 16)

    def compressed(path: Path) -> None:
        with np.load(path) as arrays:
            saved = {key: arrays[key] for key in arrays.files}
        with open(path, "wb") as f:
            np.savez_compressed(f, **saved)

    for name, write, needle in (("huge", huge, "size is not the one its header gives"),
                                ("compressed", compressed, "has compressed members")):
        run = _copy(interrupted, tmp_path / name)
        rewrite_state(run, write)
        capsys.readouterr()
        code = simulate(["--resume", str(run), "--engine", "local"])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and "none of its 2 checkpoints verifies" in err, err
    run = tmp_path / "pandas-metadata"
    dice_ray.run(dice_ray.as_config({"nodes": 4, "rounds": 2, "data": {"dataset": "digits", "heldout_size": 16}},
                                    output={"out": str(run), "progress": False}), engine="local")
    for name in ("rounds", "nodes"):
        table = pq.read_table(run / f"{name}.parquet")
        crafted = {"index_columns": [], "column_indexes": [], "columns": [
            {"name": c, "field_name": c, "pandas_type": "int32", "numpy_type": "period[D]", "metadata": None}
            for c in table.column_names]}
        pq.write_table(table.replace_schema_metadata({b"pandas": json.dumps(crafted).encode()}),
                       run / f"{name}.parquet")
    opened = dice_ray.open_run(run)
    assert len(opened.rounds) == 8 and len(opened.nodes) == 4  # an IndexError or ValueError before


def test_a_received_run_does_not_download_into_the_folder_it_names(tmp_path: Path, capsys) -> None:
    """A received run's data.download made a resume fetch a data set from the network into the folder its config
    names (it made the folder before failing offline): dropped, with one warning line, as its address is."""
    from dice_ray.runner import resume_config

    out = tmp_path / "run"
    dice_ray.run(dice_ray.as_config({"nodes": 4, "rounds": 2, "data": {"dataset": "digits", "heldout_size": 16}},
                                    output={"out": str(out), "progress": False}), engine="local")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["status"] = "interrupted"
    manifest["config"]["data"].update(download=True, data_dir=str(tmp_path / "elsewhere"))
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "rounds.parquet").unlink()
    capsys.readouterr()
    config, _ = resume_config(out)
    assert config.data.download is False and "a run directory does not choose what is fetched" in (
        capsys.readouterr().err)
