"""Experiment tracking (``output.log``): real TensorBoard event files and a real MLflow SQLite store, read
back with their own readers and compared with the run's tables (the source of truth)."""

from __future__ import annotations

import mlflow  # noqa: F401 (the test extra installs it: an mlflow that cannot import fails here, not skips the file)
import numpy as np
import pandas as pd
import pytest
import tensorboard  # noqa: F401

import dice_ray
from dice_ray.cli.simulate import build_parser, main
from dice_ray.config import RunConfig


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracking") / "run"
    seen = []
    config = RunConfig(nodes=8, rounds=6, seed=0, data={"dataset": "digits", "val_fraction": 0.3},
                       optim={"lr": 0.05, "batch_size": 8},
                       output={"out": str(out), "eval_every": 2, "progress": False, "log": ["tensorboard", "mlflow"]},
                       misbehavior={"kind": "label-flip", "count": 2},
                       proximal={"enabled": True},
                       influence={"enabled": True, "hops": 1, "rounds": [3, 4], "variants": ["first-order"]})
    run = dice_ray.run(config, engine="local", on_round=lambda m, e: seen.append(m.round))
    return run, seen


def _means(run, column):
    return run.rounds.dropna(subset=[column]).groupby("round")[column].mean()


def test_tensorboard_events_match_rounds_table(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, seen = tracked_run
    assert seen == list(range(6))  # the user's callback still runs beside the tracker
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "heldout_acc", "heldout_loss", "val_loss", "val_acc", "consensus_distance",
            "rounds_per_second", "dice/mean_abs_gt", "dice/mean_abs_est_first_order",
            "detection/proximal_auc"} <= tags
    for column in ("train_loss", "heldout_acc", "val_loss"):
        logged = pd.Series({e.step: e.value for e in events.Scalars(column)})
        expected = _means(run, column)
        assert list(logged.index) == list(expected.index)
        np.testing.assert_allclose(logged.to_numpy(), expected.to_numpy(), rtol=1e-5)
    consensus = run.rounds.dropna(subset=["consensus_distance"]).groupby("round").consensus_distance.first()
    logged = {e.step: e.value for e in events.Scalars("consensus_distance")}
    np.testing.assert_allclose([logged[t] for t in consensus.index], consensus.to_numpy(), rtol=1e-5)
    dice = run.dice.groupby("hops").gt.apply(lambda v: v.abs().mean())
    logged = {e.step: e.value for e in events.Scalars("dice/mean_abs_gt")}
    np.testing.assert_allclose([logged[h] for h in dice.index], dice.to_numpy(), rtol=1e-5)
    aucs = [e.value for e in events.Scalars("detection/proximal_auc")]
    assert all(0 <= a <= 1 for a in aucs) and len(aucs) == run.proximal["round"].nunique()


def test_mlflow_run_matches_rounds_table(tracked_run):
    from mlflow.tracking import MlflowClient

    run, _ = tracked_run
    client = MlflowClient(f"sqlite:///{run.path.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("dice-ray")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    assert found.data.params["optim.lr"] == "0.05" and found.data.params["nodes"] == "8"
    history = client.get_metric_history(found.info.run_id, "heldout_acc")
    logged = pd.Series({m.step: m.value for m in history}).sort_index()
    expected = _means(run, "heldout_acc")
    assert list(logged.index) == list(expected.index)
    np.testing.assert_allclose(logged.to_numpy(), expected.to_numpy(), rtol=1e-5)
    train = pd.Series({m.step: m.value for m in client.get_metric_history(found.info.run_id, "train_loss")})
    np.testing.assert_allclose(train.sort_index().to_numpy(), _means(run, "train_loss").to_numpy(), rtol=1e-5)
    assert "detection/proximal_auc" in found.data.metrics


def test_log_option_is_comma_separated_and_validated(tmp_path, capsys):
    args = build_parser().parse_args(["--log", "tensorboard,mlflow"])
    assert getattr(args, "output.log") == "tensorboard,mlflow"
    assert RunConfig(output={"log": "tensorboard, mlflow"}).output.log == ["tensorboard", "mlflow"]
    assert main(["--log", "wandb", "--out", str(tmp_path / "x"), "--engine", "local"]) == 2
    assert "output.log" in capsys.readouterr().err


def test_tracking_uri_from_config_and_environment(tmp_path, monkeypatch):
    from dice_ray.tracking import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    assert tracking_uri(None, tmp_path) == "sqlite:////elsewhere/m.db"
    assert tracking_uri("file:///x", tmp_path) == "file:///x"


@pytest.mark.slow  # ~30 s here (a sweep with its own Ray); the default run keeps CI under 20 minutes
def test_sweep_logs_each_trial_through_tune_callbacks(tmp_path):
    """A two-trial grid sweep with ``output.log``: Tune's TBX and MLflow logger callbacks record each trial's
    parameters and reported metrics, equal to trials.parquet; a trial that diverged ends as a FAILED MLflow run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from mlflow.tracking import MlflowClient

    root = Path(__file__).resolve().parents[1]
    base = {"nodes": 6, "rounds": 4, "topology": {"name": "ring"}, "data": {"dataset": "digits", "heldout_size": 64},
            "optim": {"batch_size": 8}, "output": {"eval_every": 2, "log": ["tensorboard", "mlflow"]}}
    spec = {"base": base, "space": {"optim.lr": {"grid": [0.05, 1000]}}, "max_concurrent": 2,
            "out": str(tmp_path / "sweep")}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "dice_ray.sweep", str(tmp_path / "s.yaml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Creating initial MLflow database tables" not in done.stdout + done.stderr  # as for a plain run
    out = tmp_path / "sweep"
    trials = pd.read_parquet(out / "trials.parquet")
    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert len(runs) == len(trials) == 2
    by_lr = {float(r.data.params["optim.lr"]): r for r in runs}  # the trial's parameters, not only its id
    assert sorted(by_lr) == [0.05, 1000] and {r.data.params["trial_id"] for r in runs} == set(trials["trial_id"])
    for lr, status in zip(trials["optim.lr"], trials["status"], strict=True):
        assert by_lr[lr].info.status == ("FAILED" if status == "failed" else "FINISHED")
    assert sorted(trials["status"]) == ["failed", "ok"]  # lr 1000 diverges
    ok = trials[trials["status"] == "ok"]
    np.testing.assert_allclose(by_lr[0.05].data.metrics["final_heldout_acc"], ok["final_heldout_acc"], rtol=1e-6)
    assert list(out.glob("tune/**/events.out.tfevents.*"))


def test_overwrite_removes_the_earlier_runs_tracker_records(tmp_path):
    """--overwrite replaces a run directory: an earlier run's TensorBoard events and MLflow store went on beside the
    new run's (two event files, curves of both runs in one folder)."""
    out = tmp_path / "run"
    base = {"nodes": 4, "rounds": 2, "data": {"dataset": "digits", "heldout_size": 16}}
    tracked = {"out": str(out), "progress": False, "log": ["tensorboard", "mlflow"]}
    dice_ray.run(dice_ray.as_config(base, output=tracked), engine="local")
    assert (out / "mlflow.db").is_file() and len(list((out / "tensorboard").iterdir())) == 1
    dice_ray.run(dice_ray.as_config(base, output={"out": str(out), "progress": False, "overwrite": True}),
                 engine="local")
    assert not (out / "tensorboard").exists() and not (out / "mlflow.db").exists()


def _killed_at(round_: int, config: dict) -> None:
    """Run ``config`` in a subprocess that kills itself outright (as SIGKILL would) after round ``round_``."""
    import json
    import subprocess
    import sys

    killed = subprocess.run([sys.executable, "-c", (
        "import json, os, sys, dice_ray\n"
        f"def stop(m, e):\n    if m.round == {round_}: os._exit(9)\n"
        "dice_ray.run(json.loads(sys.argv[1]), engine='local', on_round=stop)\n"), json.dumps(config)],
        capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr


def _mlflow_runs(out):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("dice-ray")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def test_a_resume_continues_the_runs_mlflow_run_with_every_round_once(tmp_path):
    """A SIGKILL leaves no chance to close the MLflow run: it stayed RUNNING for ever. And each session was its own
    MLflow run, so a run's curve was split between them and the rounds between a checkpoint and an interruption were
    in both. The resume, which holds the run directory's lock, continues that MLflow run (its parameters as the
    first session logged them) after the last round it holds."""
    import json

    out = tmp_path / "run"
    config = {"nodes": 4, "rounds": 4, "data": {"dataset": "digits", "heldout_size": 16},
              "output": {"out": str(out), "progress": False, "log": ["mlflow"], "checkpoint_every": 1}}
    _killed_at(2, config)
    client, runs = _mlflow_runs(out)
    assert [r.info.status for r in runs] == ["RUNNING"]
    dice_ray.resume(out, engine="local")
    client, runs = _mlflow_runs(out)
    assert [r.info.status for r in runs] == ["FINISHED"]
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss"))
    assert steps == [0, 1, 2, 3]
    assert runs[0].data.params["nodes"] == "4"
    # the killed session's checkpoints (after rounds 0, 1, 2) count: the manifest is written at each (it said 0)
    assert json.loads((out / "manifest.json").read_text())["checkpoints_written"] == 3

    stopped = tmp_path / "stopped"  # Ctrl-C after round 4, evaluated (sent); the checkpoint is after round 3

    def interrupt(metrics, engine) -> None:
        if metrics.round == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dice_ray.run(dice_ray.as_config(config, rounds=6, output={"out": str(stopped), "checkpoint_every": 2,
                                                                  "eval_every": 1}),
                     engine="local", on_round=interrupt)
    client, runs = _mlflow_runs(stopped)
    assert [r.info.status for r in runs] == ["KILLED"]
    dice_ray.resume(stopped, engine="local")
    client, runs = _mlflow_runs(stopped)
    assert [r.info.status for r in runs] == ["FINISHED"]
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(6))
    expected = dice_ray.open_run(stopped).rounds.groupby("round").train_loss.mean()
    np.testing.assert_allclose([m.value for m in sorted(history, key=lambda m: m.step)], expected, rtol=1e-5)


def _steps(folder, tag):
    """The steps of ``tag`` as TensorBoard shows them (its reader purges what a resumed session logs again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return sorted(e.step for e in events.Scalars(tag))


def test_every_round_reaches_tensorboard_once_through_kills_interrupts_and_replays(tmp_path):
    """An audit found, per round: the last rounds before a SIGKILL lost (tensorboardX's flush did not wait for its
    writer thread, so the resume, which starts after its checkpoint, never logged them again), the rounds between a
    checkpoint and a Ctrl-C logged twice after the resume, and the rounds replayed after a lost actor logged twice."""

    from dice_ray.engine.metrics import RoundMetrics
    from dice_ray.tracking import Tracker

    base = {"nodes": 4, "rounds": 6, "data": {"dataset": "digits", "heldout_size": 16}}
    killed = tmp_path / "killed"
    config = {**base, "output": {"out": str(killed), "progress": False, "log": ["tensorboard"],
                                 "checkpoint_every": 2, "eval_every": 6}}
    _killed_at(4, config)
    dice_ray.resume(killed, engine="local")  # from the checkpoint after round 3
    assert _steps(killed / "tensorboard", "train_loss") == list(range(6))

    stopped = tmp_path / "stopped"

    def interrupt(metrics, engine) -> None:
        if metrics.round == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dice_ray.run(dice_ray.as_config(config, output={"out": str(stopped)}), engine="local", on_round=interrupt)
    dice_ray.resume(stopped, engine="local")  # round 4 again, from the checkpoint after round 3
    assert _steps(stopped / "tensorboard", "train_loss") == list(range(6))

    tracker = Tracker(["tensorboard"], tmp_path / "replayed")  # a lost actor: rounds 1 and 2 run again
    for t in (0, 1, 2, 1, 2, 3):
        tracker.on_round(RoundMetrics(t, np.full(4, float(t))))
    tracker.finish()
    assert _steps(tmp_path / "replayed" / "tensorboard", "train_loss") == [0, 1, 2, 3]
    assert _steps(tmp_path / "replayed" / "tensorboard", "rounds_per_second") == [1, 2, 3]  # none for start-up


def test_a_tracking_uri_mlflow_cannot_use_is_one_line_before_anything_is_written(tmp_path, capsys):
    """A SQLite file under a file, an unknown scheme, a server nobody answers at: one line, exit 2, no run directory
    (they failed mid-run: a manifest left 'running', tracebacks, or four minutes of MLflow's retries first)."""
    import socket

    (tmp_path / "afile").write_text("")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    for uri, needle in ((f"sqlite:///{tmp_path}/afile/x.db", "FileExistsError"), ("foo://bar", "unsupported URI"),
                        (f"http://127.0.0.1:{port}", "no MLflow server answers there (Connection refused)")):
        out = tmp_path / "run"
        assert main(["--engine", "local", "--dataset", "digits", "--nodes", "4", "--rounds", "1", "--no-progress",
                     "--log", "mlflow", "--set", f"output.tracking_uri={uri}", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: output.tracking_uri {uri!r}: ") and (
            needle in err), err
        assert not out.exists()
