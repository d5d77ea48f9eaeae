"""Sweeps on Ray Tune: bad sweep files, a grid sweep killed and resumed, failed trials, Optuna, metrics.

The sweeps run the command line in a subprocess (its own Ray), as a user runs it; trials are tiny
simulations on the embedded digits data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from child_processes import as_in_a_terminal, killed_if_left

from dice_ray.cli.sweep import main
from dice_ray.config import build_config
from dice_ray.errors import InputError
from dice_ray.results import DICE, NODES, TRIALS, write_table_atomic
from dice_ray.sweep.metrics import detection
from dice_ray.sweep.spec import bundles, load_sweep

ROOT = Path(__file__).resolve().parents[2]
BASE = {"nodes": 6, "rounds": 8, "topology": {"name": "ring"}, "data": {"dataset": "digits", "heldout_size": 64},
        "optim": {"batch_size": 8}, "output": {"eval_every": 4},
        "misbehavior": {"kind": "label-flip", "selection": "ids", "ids": [2]},
        "influence": {"enabled": True, "hops": 1, "last": 1}}
# 8 trials; lr 1000 really diverges (non-finite loss by round 3), so two trials fail.
GRID = {"base": BASE, "space": {"optim.lr": {"grid": [0.02, 0.05, 0.1, 1000]}, "seed": {"grid": [0, 1]}},
        "max_concurrent": 2, "plot": {"x": "optim.lr", "y": ["spearman_h1_curvature"], "by": "seed", "logx": True}}


def _write(tmp: Path, name: str, spec: dict) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(spec))
    return path


def _sweep(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dice_ray.sweep", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("change, message", [
    ({"space": {"optim.lrr": {"grid": [0.1]}}}, "unknown key 'optim.lrr'"),
    ({"space": {"optim.lr": {"grid": [0.1, -1]}}}, "space.optim.lr = -1"),
    ({"space": {"optim.lr": {"between": [0.1, 1]}}}, "space.optim.lr: expected one of"),
    ({"space": {"optim.lr": {"grid": [0.1, 0.05, 0.1]}}}, "space.optim.lr: grid lists 0.1 twice"),  # ran it twice
    ({"space": {"optim.batch_size": {"grid": [8, 8.0]}}}, "space.optim.batch_size: grid lists 8 twice"),
    ({"space": {"optim.lr": {"uniform": [0.1, 1]}}}, "needs search optuna"),
    ({"space": {"optim.lr": {"loguniform": [0, 1]}}, "search": "optuna", "num_samples": 2,
      "metric": "final_heldout_acc"}, "loguniform needs low > 0"),
    ({"search": "optuna", "num_samples": 2}, "needs num_samples and metric"),
    ({"space": {"influence.rounds": {"grid": [[1, 2]]}}},  # it said "space.influence.rounds.grid.0.bool: ..."
     "space.influence.rounds: grid value [1, 2] is not a number, text, true/false or null"),
    # a real range over an integer field: it passed with its bounds (4.0, 8.0) and stopped the sweep at the first draw
    ({"space": {"nodes": {"uniform": [4, 8]}}, "search": "optuna", "num_samples": 2, "metric": "final_heldout_acc"},
     "space.nodes = 5.33"),
    ({"search": "optuna", "num_samples": 2, "metric": "auc"}, "metric 'auc' is not reported"),
    ({"plot": {"x": "nodes", "y": ["final_heldout_acc"]}}, "plot: 'nodes' is not a field"),
    ({"base": {**BASE, "optim": {"bogus": 1}}}, "base: config: unknown key 'optim.bogus'"),
    ({"metrics": ["accuracy", "auroc"]}, "metrics: 'auroc' is unknown"),
    ({"metrics": ["proximal_detection"], "plot": None}, "'proximal_detection' measures nothing in these trials"),
    ({"space": {"influence.every": {"grid": [1, 20]}}}, "influence.every 20 probes no round"),
    ({"base": {**BASE, "optim": {"batch_size": 100000}}}, "sweep: trial {'optim.lr': 0.02, 'seed': 0}: "),
    # a swept field that does nothing: every trial the same run (the docs' own example swept alpha on iid)
    ({"space": {"data.alpha": {"grid": [0.5, 1.0]}}}, "sweep: space.data.alpha does nothing in any trial: it "
                                                     "applies only with data.partition (--partition) dirichlet; this "
                                                     "run has data.partition iid"),
    ({"space": {"proximal.every": {"grid": [1, 2]}}}, "space.proximal.every does nothing in any trial: it applies "
                                                      "to proximal, which this run leaves off (proximal.enabled, "
                                                      "--proximal)"),

    # 3.2 million trials were listed for 8 minutes before anything ran
    ({"space": {"seed": {"grid": list(range(2000))}, "optim.lr": {"grid": [0.01 * (i + 1) for i in range(100)]}}},
     "space: a grid of 200,000 trials, more than 100,000"),
    ({"base": {**BASE, "optim": {True: 1}}}, "base: config: optim: key True is not a name"),
    # from an audit: a traceback (exit 1); taken as 1; quietly every group; points dropped from the plot unsaid
    ({"base": {"config": 5}}, "sweep: base: config: expected a file path, got int 5"),
    ({"max_concurrent": True}, "sweep: max_concurrent"),
    ({"metrics": []}, "sweep: metrics"),
    ({"space": {"optim.lr": {"grid": [0.02, 0.05]}, "seed": {"grid": [0, 1]}},
      "plot": {"x": "seed", "y": ["final_heldout_acc"], "logx": True}},
     "sweep: plot: logx needs positive numbers on the x axis; seed takes [0, 1]"),
])
def test_bad_sweep_file_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              change: dict, message: str) -> None:
    out = tmp_path / "sweep"
    path = _write(tmp_path, "bad.yaml", {**GRID, "out": str(out), **change})
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error: sweep") and len(err.splitlines()) == 1
    assert not out.exists()


def test_numbers_in_exponent_notation_are_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """YAML 1.1 reads 1e-2 as text: the trial's value and its column were text, and [1e-2, 0.01] two trials."""
    spec = _write(tmp_path, "s.yaml", {**GRID, "out": str(tmp_path / "sweep")})
    text = spec.read_text()
    spec.write_text(text.replace("- 0.02\n", "- 2e-2\n"))
    assert load_sweep(spec).spec.space["optim.lr"]["grid"][0] == 0.02
    spec.write_text(text.replace("- 0.05\n", "- 2e-2\n"))
    assert main([str(spec)]) == 2
    assert "space.optim.lr: grid lists 0.02 twice" in capsys.readouterr().err


def test_a_sweep_file_that_cannot_be_read_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["/proc/self/mem"]) == 2  # a read fails with EIO (as one without permission does)
    err = capsys.readouterr().err.strip()
    assert err == "error: sweep file '/proc/self/mem' cannot be read: Input/output error"


def test_existing_sweep_directory_needs_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's")
    assert main([str(_write(tmp_path, "s.yaml", {**GRID, "out": str(out)}))]) == 2
    assert "set resume (--resume) to finish it" in capsys.readouterr().err
    assert main([str(_write(tmp_path, "s.yaml", {**GRID, "out": str(out)})), "--resume"]) == 2
    assert "not a sweep directory" in capsys.readouterr().err
    missing = tmp_path / "never"  # --resume of a sweep that never ran started a new one
    assert main([str(_write(tmp_path, "s.yaml", {**GRID, "out": str(missing)})), "--resume"]) == 2
    assert "does not exist: there is nothing to resume" in capsys.readouterr().err and not missing.exists()


def test_retry_failed_needs_resume_and_a_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "s.yaml", {**GRID, "out": str(tmp_path / "sweep")})
    assert main([str(path), "--retry-failed"]) == 2
    assert "retry_failed (--retry-failed) goes with resume (--resume)" in capsys.readouterr().err
    optuna = _write(tmp_path, "o.yaml", {**GRID, "out": str(tmp_path / "sweep"), "search": "optuna",
                                         "num_samples": 2, "metric": "final_heldout_acc", "plot": None,
                                         "space": {"optim.lr": {"loguniform": [0.01, 0.1]}}})
    assert main([str(optuna), "--resume", "--retry-failed"]) == 2
    assert "an optuna search replaces them when num_samples (--num-samples) is raised" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The 8-trial grid sweep, SIGKILLed once 3 trials are recorded, then finished with --resume."""
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "lr-seed"
    path = _write(tmp, "grid.yaml", {**GRID, "out": str(out)})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([sys.executable, "-m", "dice_ray.sweep", str(path)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(list(out.glob("trials/*/result.json"))) < 3 and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and the local Ray it started
    first.wait()
    before = {p.parent.name: (p.stat().st_mtime_ns, (p.parent / "manifest.json").stat().st_mtime_ns)
              for p in out.glob("trials/*/result.json")}
    resumed = _sweep(str(path), "--resume")
    return {"out": out, "before": before, "resumed": resumed}


@pytest.mark.slow  # CI's default run stays under 20 minutes; python -m pytest -q -m slow runs it
def test_killed_sweep_resumes_without_redoing_finished_trials(killed_and_resumed: dict) -> None:
    out, before, resumed = killed_and_resumed["out"], killed_and_resumed["before"], killed_and_resumed["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 3 <= len(before) < 8
    assert f"{len(before)} finished before, running {8 - len(before)}" in resumed.stdout
    for trial, stamps in before.items():  # finished trials were not run again
        result = out / "trials" / trial / "result.json"
        assert (result.stat().st_mtime_ns, (result.parent / "manifest.json").stat().st_mtime_ns) == stamps
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 8 and trials["trial_id"].is_unique
    assert sorted(zip(trials["optim.lr"], trials["seed"], strict=True)) == sorted(
        (lr, s) for lr in (0.02, 0.05, 0.1, 1000) for s in (0, 1))
    assert list(trials.columns[:len(TRIALS)]) == TRIALS.names
    assert pq.read_schema(out / "trials.parquet").field("status").metadata[b"description"]
    # one progress line per trial of this run, and the summary
    assert resumed.stdout.count(" ok: ") + resumed.stdout.count(" failed: ") == 8 - len(before)
    assert "8 trials, 6 ok, 2 failed" in resumed.stdout
    # what a trial prints is its console.log, not lines of Ray's worker output among the sweep's
    assert "peak memory:" not in resumed.stdout + resumed.stderr  # a trial's summary line
    for trial in trials.query("status == 'ok'")["trial_id"]:  # (a trial the kill cut short: "trained before")
        assert "peak memory:" in (out / "trials" / trial / "console.log").read_text()


@pytest.mark.slow  # CI's default run stays under 20 minutes; python -m pytest -q -m slow runs it
def test_diverged_trials_are_recorded_failed_and_the_others_finish(killed_and_resumed: dict) -> None:
    out = killed_and_resumed["out"]
    trials = pd.read_parquet(out / "trials.parquet")
    failed = trials[trials["status"] == "failed"]
    assert sorted(failed["optim.lr"]) == [1000, 1000]
    assert failed["error"].str.contains("FloatingPointError: round").all()
    assert failed["final_heldout_acc"].isna().all()
    ok = trials[trials["status"] == "ok"]
    assert len(ok) == 6 and ok["error"].isna().all()
    assert ok["final_heldout_acc"].between(0, 1).all() and ok["wall_seconds"].gt(0).all()
    assert ok["spearman_h1_curvature"].between(-1, 1).all() and ok["auc_dice_e"].between(0, 1).all()
    for run_dir, seed in zip(ok["run_dir"], ok["seed"], strict=True):
        manifest = json.loads((out / run_dir / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["seed"] == seed  # seeds come from the config
        assert (out / run_dir / "dice.parquet").is_file()
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # CI's default run stays under 20 minutes; python -m pytest -q -m slow runs it
def test_retry_failed_reruns_the_failed_trials_only(killed_and_resumed: dict) -> None:
    """After the resumed sweep: --retry-failed runs the two diverging trials again (they fail again, from their
    checkpoints), and no finished one."""
    out = killed_and_resumed["out"]
    ok = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/result.json")
          if json.loads(p.read_text())["status"] == "ok"}
    retried = _sweep(str(out.parent / "grid.yaml"), "--resume", "--retry-failed")
    assert retried.returncode == 0, retried.stderr[-2000:]
    assert "6 finished before, running 2" in retried.stdout and "8 trials, 6 ok, 2 failed" in retried.stdout
    assert retried.stdout.count(" failed: optim.lr=1000") == 2
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/result.json") if p.parent.name in ok} == ok


@pytest.mark.slow  # CI's default run stays under 20 minutes; python -m pytest -q -m slow runs it
def test_resuming_a_finished_sweep_summarizes_without_starting_ray(killed_and_resumed: dict) -> None:
    out = killed_and_resumed["out"]
    script = ("import sys, ray; from dice_ray.cli.sweep import main; code = main(sys.argv[1:]); "
              "print('ray started:', ray.is_initialized()); sys.exit(code)")
    again = subprocess.run([sys.executable, "-c", script, str(out.parent / "grid.yaml"), "--resume"], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "8 finished before, running 0" in again.stdout and "ray started: False" in again.stdout


@pytest.mark.slow  # CI's default run stays under 20 minutes; python -m pytest -q -m slow runs it
def test_each_trial_runs_its_actors_in_its_own_placement_group(killed_and_resumed: dict) -> None:
    out = killed_and_resumed["out"]
    ok = pd.read_parquet(out / "trials.parquet").query("status == 'ok'")
    groups = []
    for run_dir in ok["run_dir"]:
        placement = json.loads((out / run_dir / "manifest.json").read_text())["placement"]
        assert len(placement) == 1 and placement[0]["threads"] == 1  # one actor, in a 1-CPU bundle
        groups.append(placement[0]["placement_group"])
    assert all(groups) and len(set(groups)) == len(groups)


@pytest.mark.slow  # CI's default run stays under 20 minutes; python -m pytest -q -m slow runs it
def test_a_trial_computes_what_a_plain_run_of_its_config_computes(killed_and_resumed: dict, tmp_path: Path) -> None:
    from dice_ray.runner import simulate

    out = killed_and_resumed["out"]
    trial = pd.read_parquet(out / "trials.parquet").query("status == 'ok'").iloc[0]
    config = json.loads((out / trial["run_dir"] / "manifest.json").read_text())["config"]
    config["output"]["out"] = str(tmp_path / "plain")
    config["influence"]["enabled"] = False
    plain = simulate(build_config(config), engine_kind="local")  # one process, no Ray, no Tune
    pd.testing.assert_frame_equal(pd.read_parquet(out / trial["run_dir"] / "rounds.parquet"),
                                  pd.read_parquet(plain / "rounds.parquet"), check_exact=False, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # ~45 s here (two sweeps, each its own Ray); the default run keeps CI under 20 minutes
def test_optuna_sweep_resumes_with_its_finished_trials(tmp_path: Path) -> None:
    out = tmp_path / "optuna"
    base = {**BASE, "misbehavior": {}, "influence": {}}
    path = _write(tmp_path, "optuna.yaml", {"base": base, "space": {"optim.lr": {"loguniform": [0.01, 0.3]},
                                                                   "optim.batch_size": {"choice": [4, 8]}},
                                            "search": "optuna", "num_samples": 2, "metric": "final_heldout_acc",
                                            "mode": "max", "max_concurrent": 2, "out": str(out)})
    first = _sweep(str(path))
    assert first.returncode == 0, first.stderr[-2000:]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/result.json")}
    assert len(stamps) == 2
    more = _sweep(str(path), "--resume", "--num-samples", "3")
    assert more.returncode == 0, more.stderr[-2000:]
    assert "2 finished before, running 1" in more.stdout and "best final_heldout_acc" in more.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(trials) == 3 and (trials["status"] == "ok").all()
    assert trials["optim.lr"].between(0.01, 0.3).all() and set(trials["optim.batch_size"]) <= {4, 8}
    assert trials["optim.lr"].nunique() == 3  # the resumed search draws a new point, not its first one again
    result = sorted(out.glob("trials/*/result.json"))[0]  # a result whose params are not a point of the space:
    row = json.loads(result.read_text())  # the search is told them, and Optuna failed on them with a traceback
    params = {**row["params"], "optim.lr": 5.0}
    result.write_text(json.dumps({**row, "params": params}))
    damaged = _sweep(str(path), "--resume", "--num-samples", "4")
    assert damaged.returncode == 2 and damaged.stderr.strip().splitlines() == [
        f"error: {result}: its params {params} are not a point of this sweep's space: the sweep directory was "
        "damaged; delete that trial's folder to run it again"], damaged.stderr[-2000:]


def test_an_optuna_draw_the_config_refuses_is_a_failed_trial_and_the_search_goes_on(tmp_path: Path) -> None:
    """Each field's values are valid alone, some drawn together are not (4 participants, 5 or more misbehaving): such
    a trial is recorded failed with the config's line and the others run. It stopped the whole sweep with exit 2,
    and --resume drew the same point again. Optuna's and Tune's own lines about it are not printed."""
    out = tmp_path / "optuna"
    path = _write(tmp_path, "optuna.yaml", {
        "base": {**BASE, "rounds": 2, "misbehavior": {"kind": "label-flip"}, "influence": {}},
        "space": {"nodes": {"choice": [12, 4]}, "misbehavior.count": {"int": [1, 8]}}, "search": "optuna",
        "num_samples": 4, "metric": "final_heldout_acc", "mode": "max", "max_concurrent": 2, "out": str(out)})
    done = _sweep(str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    trials = pd.read_parquet(out / "trials.parquet")
    failed = trials[trials["status"] == "failed"]
    assert len(trials) == 4 and len(failed) and (failed["nodes"] == 4).all() and (trials["nodes"] == 12).any()
    assert failed["error"].str.contains("exceeds the 4 participants").all()
    assert (trials.loc[trials["nodes"] == 12, "status"] == "ok").all()
    assert "not acceptable" not in done.stdout + done.stderr and "A new study created" not in done.stdout + done.stderr


def test_a_metric_the_script_registers_is_refused_before_any_trial(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials compute their metrics in Ray workers, which import base.imports, not the script: a metric group the
    script registered passed the checks and every trial failed with KeyError after its whole simulation."""
    from dice_ray.sweep.metrics import METRICS, TrialMetric
    from dice_ray.sweep.spec import load_sweep

    def in_the_script(run: Path, config: object) -> dict[str, float]:
        return {"x": 0.0}

    in_the_script.__module__ = "__main__"
    monkeypatch.setitem(METRICS, "script-metric", TrialMetric(in_the_script, lambda config: ["x"]))
    path = _write(tmp_path, "m.yaml", {"base": {**BASE, "rounds": 2}, "space": {"seed": {"grid": [0, 1]}},
                                       "out": str(tmp_path / "out")})
    with pytest.raises(InputError, match=r"sweep: sweep metric 'script-metric' is registered by the script itself, "
                                         r"which Ray workers do not run: move it into a module and list that in "
                                         r"base.imports$"):
        load_sweep(path)


@pytest.mark.slow  # ~20 s (three Tune runs); the default run keeps CI under 20 minutes
def test_a_grid_runs_in_chunks_of_tune_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A grid runs GRID_CHUNK trials per Tune run (Tune held 90,000 at once for minutes before the first trial and
    after Ctrl-C), or CHUNK_WAVES waves of max_concurrent trials if that is more (each chunk's tail idles up to a
    wave): every trial is run once and recorded, one Tune run per chunk."""
    from dice_ray.sweep import runner

    assert runner.grid_chunk(2) == runner.GRID_CHUNK and runner.grid_chunk(64) == 64 * runner.CHUNK_WAVES
    monkeypatch.setattr(runner, "GRID_CHUNK", 2)
    monkeypatch.setattr(runner, "CHUNK_WAVES", 1)
    out = tmp_path / "chunks"
    base = {**BASE, "rounds": 2, "misbehavior": {}, "influence": {}}
    path = _write(tmp_path, "chunks.yaml", {"base": base, "space": {"seed": {"grid": [0, 1, 2]}}, "max_concurrent": 2,
                                            "out": str(out)})
    handler = signal.getsignal(signal.SIGINT)
    assert main([str(path)]) == 0
    assert signal.getsignal(signal.SIGINT) is handler  # Tune left its own, and a Ctrl-C between chunks went unseen
    printed = capsys.readouterr().out
    assert "[3/3]" in printed and "sweep done" in printed
    trials = pd.read_parquet(out / "trials.parquet")
    assert sorted(trials["seed"]) == [0, 1, 2] and (trials["status"] == "ok").all()
    assert len([p for p in (out / "tune").iterdir() if p.is_dir()]) == 2


@pytest.mark.slow  # ~65 s: two sweeps, each its own Ray; the default run keeps CI under 20 minutes
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_a_sweep_with_one_line_and_it_resumes(tmp_path: Path, stop: str) -> None:
    """SIGINT (Ctrl-C) once a trial is recorded: the sweep stops, says how to continue, exit 130; --resume runs only
    the trials left. SIGTERM (a scheduler's stop) the same, exit 143 (Ray's handler dumped a stack and aborted)."""
    out = tmp_path / "stopped"
    base = {**BASE, "rounds": 2, "misbehavior": {}, "influence": {}}
    path = _write(tmp_path, "stop.yaml", {"base": base, "space": {"seed": {"grid": [0, 1, 2, 3, 4, 5]}},
                                          "max_concurrent": 1, "out": str(out)})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sweep = subprocess.Popen([sys.executable, "-m", "dice_ray.sweep", str(path)], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=as_in_a_terminal)
    with killed_if_left(sweep):
        deadline = time.time() + 300
        while not list(out.glob("trials/*/result.json")) and sweep.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        sweep.send_signal(getattr(signal, stop))
        _, err = sweep.communicate(timeout=120)
    assert sweep.returncode == (130 if stop == "SIGINT" else 143), err[-2000:]
    said = "interrupted" if stop == "SIGINT" else "terminated (SIGTERM)"
    assert err.strip().splitlines()[-1].startswith(said) and "Traceback" not in err
    assert f"continue with python -m dice_ray.sweep {path} --resume" in err
    recorded = len(list(out.glob("trials/*/result.json")))
    assert 1 <= recorded < 6
    resumed = _sweep(str(path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{recorded} finished before, running {6 - recorded}" in resumed.stdout
    assert len(pd.read_parquet(out / "trials.parquet")) == 6


def test_the_resume_line_repeats_what_overrode_the_sweep_file() -> None:
    """The resume line of an interrupted sweep repeats --num-samples and --max-concurrent: a resume without them ran
    the file's number of trials (14 where 6 were asked for)."""
    from dice_ray.cli.sweep import build_parser, resume_options

    args = build_parser("sweep").parse_args(["s.yaml", "--out", "my runs/a", "--num-samples", "6", "--max-concurrent",
                                             "2"])
    assert resume_options(args) == " --out 'my runs/a' --num-samples 6 --max-concurrent 2"
    assert resume_options(build_parser("sweep").parse_args(["s.yaml", "--resume", "--retry-failed"])) == \
        " --retry-failed"


def test_a_search_checks_its_largest_trial_too(tmp_path: Path) -> None:
    """Each swept value fit the machine alone, but an Optuna search then drew engine.actors 2 x cpus_per_actor 2
    (4 CPUs on 2) and Tune waited forever: the largest values of the fields that size a trial are checked together,
    so the sweep is refused before it starts (``_check_fits``, against the Ray cluster)."""
    spec = {"base": {**BASE, "rounds": 2}, "search": "optuna", "num_samples": 4, "metric": "final_heldout_acc",
            "space": {"engine.actors": {"choice": [1, 2]}, "engine.cpus_per_actor": {"choice": [1, 2]}},
            "out": str(tmp_path / "s")}
    sweep = load_sweep(_write(tmp_path, "big.yaml", spec))
    cpus = {json.dumps(params, sort_keys=True): sum(b.get("CPU", 0.0) for b in need) for params, need in sweep.needs}
    assert cpus[json.dumps({"engine.actors": 2, "engine.cpus_per_actor": 2}, sort_keys=True)] == 4.0


def test_detection_auc_ranks_sources_by_mean_dice(tmp_path: Path) -> None:
    config = build_config({"nodes": 4, "rounds": 5, "misbehavior": {"kind": "label-flip", "selection": "ids",
                                                                     "ids": [1, 3]},
                           "influence": {"enabled": True, "hops": 2}})
    nodes = {f.name: [0] * 4 for f in NODES} | {"node": range(4), "misbehaving": [False, True, False, True],
                                                 "q": [0.25] * 4, "self_weight": [0.5] * 4}
    write_table_atomic(tmp_path / "nodes.parquet", nodes, NODES)
    # whole-batch probes at hops 2: sources 1 and 3 (misbehaving) raise losses; hop-1 rows and a single-sample
    # probe say the opposite and must be ignored
    harm = {0: -2.0, 1: 1.0, 2: -1.0, 3: 0.5}
    rows = [{"round": 3, "source": j, "probe_id": j, "sample_index": None, "hops": 2, "gt": -h, "est_curvature": h,
             "est_first_order": -h} for j, h in harm.items()]
    rows += [{"round": 3, "source": j, "probe_id": j, "sample_index": None, "hops": 1, "gt": 0.0,
              "est_curvature": -h, "est_first_order": 0.0} for j, h in harm.items()]
    rows.append({"round": 3, "source": 0, "probe_id": 9, "sample_index": 0, "hops": 2, "gt": 0.0,
                 "est_curvature": 99.0, "est_first_order": 0.0})
    write_table_atomic(tmp_path / "dice.parquet", rows, DICE)
    assert detection(tmp_path, config) == {"auc_dice_e": 1.0, "auc_dice_gt": 0.0}
    first_order = config.model_copy(update={"influence": config.influence.model_copy(
        update={"variants": ["first-order"], "ground_truth": False})})
    assert detection(tmp_path, first_order) == {"auc_dice_e": 0.0}


def test_trial_resources_follow_node_count_and_actors(tmp_path: Path) -> None:
    spec = {"base": {"data": {"dataset": "synthetic"}}, "space": {"nodes": {"grid": [16, 600]}},
            "nodes_per_actor": 256, "cpus_per_actor": 2, "out": str(tmp_path / "s")}
    sweep = load_sweep(_write(tmp_path, "r.yaml", spec))
    small, large = (sweep.trial_config(t.params, tmp_path / t.trial_id) for t in sweep.grid)
    assert bundles(small) == [{}, {"CPU": 2.0, "GPU": 0.0}]
    assert large.engine.actors == 3 and bundles(large) == [{}] + [{"CPU": 2.0, "GPU": 0.0}] * 3
    assert large.output.out == str(tmp_path / sweep.grid[1].trial_id) and not large.output.progress
    explicit = load_sweep(_write(tmp_path, "e.yaml", {**spec, "base": {**spec["base"], "engine": {
        "actors": 5, "cpus_per_actor": 1, "gpus_per_actor": 0.5}}}))
    assert bundles(explicit.trial_config({"nodes": 600}, tmp_path)) == [{}] + [{"CPU": 1.0, "GPU": 0.5}] * 5
    with pytest.raises(InputError, match="no room in a trial for its influence tasks"):
        load_sweep(_write(tmp_path, "i.yaml", {**spec, "base": {"influence": {"enabled": True},
                                                                "engine": {"cpus_per_actor": 0.5}}}))


def test_proximal_detection_metric_is_the_anomaly_reports_whole_run_row(tmp_path: Path) -> None:
    from dice_ray.cli.analyze import anomaly
    from dice_ray.runner import simulate
    from dice_ray.sweep.metrics import metric_columns, proximal_detection

    config = build_config({**BASE, "influence": {}, "proximal": {"enabled": True, "window": 3},
                           "output": {"out": str(tmp_path / "run"), "progress": False}})
    assert "auc_proximal" in metric_columns(config)
    run = simulate(config, engine_kind="local")
    values = proximal_detection(run, config)
    report = next(r for r in anomaly(run, [config.rounds]) if r["method"] == "proximal")
    assert values == {"auc_proximal": report["auc"], "auc_proximal_examiner_mean": report["auc_examiner_mean"],
                      "precision_proximal": report["precision"], "auc_proximal_mean": report["auc_mean"],
                      "rounds_to_auc_proximal": report["rounds_to_auc"]}
    assert 0 <= values["auc_proximal"] <= 1


def test_a_trial_line_shows_what_was_measured() -> None:
    """The line printed as each trial ends shows the sweep's metric and plotted columns, or, where none of those
    was measured (metrics without accuracy, a regression's missing accuracy), the first ones measured."""
    from dice_ray.sweep.runner import _trial_line

    row = {"trial_id": "t0", "status": "ok", "params": {"optim.lr": 0.1}, "wall_seconds": 2.0,
           "metrics": {"auc_dice_e": 0.75, "auc_dice_gt": 0.5, "detected": True, "final_heldout_acc": None}}
    line = _trial_line(row, 1, 2, ["final_heldout_acc"])
    assert line == "[1/2] t0 ok: optim.lr=0.1 | auc_dice_e=0.75 auc_dice_gt=0.5 (2.0 s)"
    assert _trial_line(row, 1, 2, ["auc_dice_gt"]).endswith("| auc_dice_gt=0.5 (2.0 s)")


@pytest.mark.parametrize("path", sorted(ROOT.glob("sweeps/*.yaml")), ids=lambda p: p.name)
def test_every_bundled_sweep_is_valid(path: Path) -> None:
    """The sweeps the docs run validate, every trial included (a rule added to the run config once made
    anomaly_fraction.yaml's base, which leaves misbehavior.fraction to its space, refused)."""
    sweep = load_sweep(path)
    assert len(sweep.grid) >= 2 and all(set(t.params) == set(sweep.spec.space) for t in sweep.grid)


def test_a_trial_that_finished_unrecorded_is_not_run_again(tmp_path: Path) -> None:
    """Ctrl-C stops the sweep while a trial's run goes on to its end, unrecorded; the resumed sweep takes that
    finished run as it is (it used to train it again from round 0): the same config's, by its digest."""
    from dice_ray.runner import simulate
    from dice_ray.sweep.records import trial_dir
    from dice_ray.sweep.runner import simulate_or_resume

    sweep = load_sweep(_write(tmp_path, "s.yaml", {**GRID, "out": str(tmp_path / "sweep")}))
    trial = sweep.grid[0]
    config = sweep.trial_config(trial.params, trial_dir(tmp_path / "sweep", trial.trial_id))
    run = simulate(config, engine_kind="local")
    stamp = (run / "rounds.parquet").stat().st_mtime_ns
    assert simulate_or_resume(config) == (run, json.loads((run / "manifest.json").read_text())["wall_seconds"])
    assert (run / "rounds.parquet").stat().st_mtime_ns == stamp  # and its row counts the run's own wall time


def test_a_sweep_out_that_cannot_be_made_or_a_damaged_sweep_directory_is_one_line_before_ray(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by an audit: these were tracebacks (the first after Ray had started)."""
    spec = {**GRID, "plot": None}
    (tmp_path / "file").write_text("")
    damaged = tmp_path / "damaged"
    (damaged / "trials" / "t1").mkdir(parents=True)
    cases = [(tmp_path / "file" / "sweep", "is not a directory"), (damaged, "sweep.json' is not readable JSON"),
             (damaged, "result.json is not a trial's result")]
    for i, (out, needle) in enumerate(cases):
        if i == 1:
            (damaged / "sweep.json").write_text('{"base": ')
        if i == 2:
            path = _write(tmp_path, "fingerprint.yaml", {**spec, "out": str(damaged)})
            (damaged / "sweep.json").write_text(json.dumps(load_sweep(path).fingerprint()))
            (damaged / "trials" / "t1" / "result.json").write_text("[1, 2")
        code = main([str(_write(tmp_path, f"s{i}.yaml", {**spec, "out": str(out)})), "--resume"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "file").is_dir()
    row = {"trial_id": "t1", "status": "ok", "error": None, "run_dir": "trials/t1", "start_time": "2026-12-06",
           "wall_seconds": 1.0, "params": {}, "metrics": {"final_heldout_acc": 0.5}}
    edits = [({"trial_id": "t1"}, "no status"), ({**row, "metrics": "abc"}, "metrics 'abc'"),
             ({**row, "params": None}, "params None"), ({**row, "status": 5}, "status 5"),
             ({**row, "metrics": {"final_heldout_acc": "high"}}, "metrics {"), ({**row, "trial_id": "t9"}, "'t9'")]
    for edited, needle in edits:  # a result.json edited by hand: tracebacks after Ray had started
        (damaged / "trials" / "t1" / "result.json").write_text(json.dumps(edited))
        code = main([str(_write(tmp_path, "s2.yaml", {**spec, "out": str(damaged)})), "--resume"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "is not a trial's result (" in err and needle in err, err


@pytest.mark.parametrize(("metric", "title"), [
    ("spearman_h2_curvature", "Spearman, hop 2 (curvature)"),
    ("relative_error_h1_first_order", "Relative error, hop 1 (first-order)"),
    ("auc_dice_gt", "ROC AUC, DICE-GT"),
    ("final_heldout_acc", "final held-out accuracy"),
])
def test_a_summary_panel_is_titled_in_words(metric: str, title: str) -> None:
    from dice_ray.sweep.plot import metric_title

    assert metric_title(metric) == title


def test_the_alignment_metrics_carry_the_higher_order_variants_correction(tmp_path: Path) -> None:
    """correction_h{r}_{variant}: the alignment report's part beyond first order, for second-order (curvature on)."""
    import dice_ray
    from dice_ray.reports import alignment_report
    from dice_ray.sweep.metrics import compute_metrics, metric_columns

    variants = ["first-order", "curvature", "second-order"]
    config = dice_ray.RunConfig(**{**BASE, "influence": {**BASE["influence"], "variants": variants},
                                   "output": {**BASE["output"], "out": str(tmp_path / "run"), "progress": False}})
    run = dice_ray.run(config, engine="local").path
    columns = metric_columns(config, ["alignment"])
    assert "correction_h1_second_order" in columns and "correction_h1_curvature" not in columns
    values = compute_metrics(run, config, ["alignment"])
    assert set(values) == set(columns)
    table = alignment_report(run).table
    expected = table.query("hops == 1 and quantity == 'cumulative' and variant == 'second-order'").correction.item()
    assert values["correction_h1_second_order"] == pytest.approx(expected) and 0 <= expected < 0.5


def test_a_data_set_the_script_registers_is_refused_before_any_trial(tmp_path: Path) -> None:
    """Each trial prepares its own data in a Ray worker, which imports base.imports, not the script: a data set the
    script registered would fail every trial (a plain run takes it: its workers receive the arrays)."""
    import functools

    import numpy as np

    import dice_ray
    from dice_ray.sweep.spec import load_sweep

    def data(seed: int) -> tuple[np.ndarray, ...]:
        x = np.random.default_rng(seed).normal(size=(60, 4)).astype(np.float32)
        return x[:50], (x[:50, 0] > 0).astype(np.int64), x[50:], (x[50:, 0] > 0).astype(np.int64)

    data.__module__ = "__main__"
    dice_ray.register_dataset("sweep-script-data", functools.partial(data))
    path = _write(tmp_path, "d.yaml", {"base": {**BASE, "rounds": 2, "data": {"dataset": "sweep-script-data"}},
                                       "space": {"seed": {"grid": [0, 1]}}, "out": str(tmp_path / "out")})
    with pytest.raises(InputError, match=r"sweep: data set 'sweep-script-data' is registered by the script itself, "
                                         r"which Ray workers do not run: move it into a module and list that in "
                                         r"base.imports$"):
        load_sweep(path)
