"""The Python API end to end (config object -> run -> DataFrames -> a report), and a user's own data set and loss:
a regression task with an MSE loss through DICE-GT and DICE-E, where the curvature estimate is still exactly the
forward-mode derivative of the replay."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from torch.func import jvp

import dice_ray
from dice_ray.engine import start_ray
from dice_ray.experiment import prepare
from dice_ray.methods.dice.estimator import estimate_cascade, update_difference
from dice_ray.methods.dice.measure import window_for
from dice_ray.methods.dice.trajectory import record_trajectory


@dice_ray.register_dataset("toy-regression", input_shape=(1, 2, 3), num_classes=1)
def toy_regression(seed: int):
    """y = sin(x · w) + noise: a smooth regression task with float targets [n]."""
    rng = np.random.default_rng([seed, 11])
    x = rng.normal(size=(600, 1, 2, 3)).astype(np.float32)
    w = rng.normal(size=6)
    y = (np.sin(x.reshape(600, -1) @ w) + 0.05 * rng.normal(size=600)).astype(np.float32)
    return x[:500], y[:500], x[500:], y[500:]


REGRESSION = {"nodes": 8, "rounds": 8, "seed": 1, "topology": {"name": "exponential"},
              "data": {"dataset": "toy-regression", "heldout_size": 64}, "model": {"name": "mlp-tanh", "loss": "mse"},
              "optim": {"lr": 0.1, "batch_size": 8}, "output": {"progress": False, "eval_every": 4}}


def test_python_api_end_to_end(tmp_path: Path) -> None:
    config = dice_ray.RunConfig(nodes=8, rounds=8, data={"dataset": "digits", "heldout_size": 64},
                                influence={"enabled": True, "hops": 2, "rounds": [2, 4]},
                                output={"out": str(tmp_path / "run"), "progress": False})
    run = dice_ray.run(config, engine="local")
    assert run.status == "complete" and run.manifest["config"]["nodes"] == 8
    assert isinstance(run.rounds, pd.DataFrame) and len(run.rounds) == 8 * 8
    assert {"rounds", "nodes", "influence", "dice"} <= set(run.tables())
    assert run.rounds is run.table("rounds")  # read once, then cached
    assert {"rounds", "nodes", "alignment", "path"} <= set(dir(run))  # tables too, for completion in a notebook
    alignment = run.alignment()
    assert set(alignment["variant"]) == {"first-order", "curvature"}
    assert not (run.path / "alignment.parquet").exists()  # a report is data: files only when asked
    pd.testing.assert_frame_equal(run.alignment(write=True), alignment)
    assert (run.path / "alignment.parquet").is_file() and list(run.path.glob("alignment_hop*.png"))
    # the table the file holds, dtypes and NaN included (it had int64 counts and None where the file reads NaN)
    pd.testing.assert_frame_equal(pd.read_parquet(run.path / "alignment.parquet"), alignment)
    again = dice_ray.open_run(run.path)
    pd.testing.assert_frame_equal(again.dice, run.dice)
    assert again.config == config
    with pytest.raises(dice_ray.InputError, match="no proximal table"):
        again.table("proximal")
    with pytest.raises(dice_ray.InputError, match="no proximal table"):
        _ = again.proximal
    assert not hasattr(again, "proximal") and getattr(again, "proximal", None) is None  # as a missing attribute
    # overrides as keywords, the same validation and one-line errors as the command line
    with pytest.raises(dice_ray.InputError) as err:
        dice_ray.run(config, engine="local", optim={"lr": -1})
    assert str(err.value) == "config: optim.lr: learning rate must be a positive number no larger than 1000, got -1.0"
    with pytest.raises(dice_ray.InputError, match="already exists"):
        dice_ray.run(config, engine="local")


def test_open_run_says_what_is_wrong_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(dice_ray.InputError, match="run directory '.*missing' does not exist"):
        dice_ray.open_run(tmp_path / "missing")  # (it said "not a dice-ray run directory (no manifest.json)")
    with pytest.raises(dice_ray.InputError, match="is not a dice-ray run directory"):
        dice_ray.open_run(tmp_path)
    with pytest.raises(dice_ray.InputError, match="a run directory is a path .*, not int 5"):
        dice_ray.open_run(5)  # a TypeError
    (tmp_path / "manifest.json").write_text("[]")  # JSON, not a run's manifest: Run.status was an AttributeError
    with pytest.raises(dice_ray.InputError, match="manifest.json is not a dice-ray manifest"):
        _ = dice_ray.open_run(tmp_path).status


def test_api_errors_name_the_config_field_before_the_flag(tmp_path: Path) -> None:
    """The errors a Python caller gets name what they set (a config field, an argument), the flag only beside it."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(dice_ray.InputError, match=r"set output.overwrite \(--overwrite\) or choose another "
                                                  r"output.out \(--out\)"):
        dice_ray.run(nodes=4, engine="local", output={"out": str(taken)})
    with pytest.raises(dice_ray.InputError, match="on_round is called after every round .*: 5 cannot be called"):
        dice_ray.run(nodes=4, engine="local", on_round=5, output={"out": str(tmp_path / "never")})
    assert not (tmp_path / "never").exists()  # it failed at round 0, after the run directory was written
    (tmp_path / "a-file").write_text("")
    with pytest.raises(dice_ray.InputError, match=r"^output.out \(--out\) '.*a-file' exists and is not a directory"):
        dice_ray.run(nodes=4, engine="local", output={"out": str(tmp_path / "a-file")})
    with pytest.raises(dice_ray.InputError, match=r"engine=.*picks ray or local; .*RunConfig\(engine=\{\.\.\.\}\)"):
        dice_ray.run(nodes=4, engine={"cpus_per_actor": 64})
    with pytest.raises(dice_ray.InputError, match=r"^cannot resume '.*missing': the run directory"):
        dice_ray.resume(tmp_path / "missing")
    for status, message in (("complete", r"^cannot resume '.*old': the run is already complete$"),
                            ("interrupted", r"^a resume continues the run with its own config; rounds cannot change "
                                            r"\(only engine.address, engine.actors, ")):
        (tmp_path / "old").mkdir(exist_ok=True)
        (tmp_path / "old" / "manifest.json").write_text(json.dumps({"status": status, "config": {"nodes": 4}}))
        with pytest.raises(dice_ray.InputError, match=message):
            dice_ray.resume(tmp_path / "old", rounds=30)
    # a run on the local engine resumes there: Ray's placement would do nothing (it was taken, unused)
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"status": "interrupted", "engine": "local",
                                                                "config": {"nodes": 4}}))
    with pytest.raises(dice_ray.InputError, match=r"^engine.actors places the run on Ray; this run has engine local"):
        dice_ray.resume(tmp_path / "old", engine__actors=3)


def test_the_api_refuses_what_it_cannot_use_before_any_work(tmp_path: Path, monkeypatch) -> None:
    """A config of the wrong type and a method that is not a Method raise InputError, not a TypeError from inside;
    keyword settings that do nothing in the run are refused as the command line refuses such flags (a dict or file
    config may keep them); nothing is written."""
    monkeypatch.chdir(tmp_path)
    for config in (5, [1, 2]):
        with pytest.raises(dice_ray.InputError, match="a config is a RunConfig, a dict or a YAML file's path"):
            dice_ray.run(config, engine="local")
    with pytest.raises(dice_ray.InputError, match="methods are dice_ray.Method objects"):
        dice_ray.run(nodes=4, engine="local", methods=["foo"])
    for fields, message in (({"misbehavior": {"count": 3}}, r"^misbehavior.count needs misbehavior.kind"),
                            ({"optim": {"momentum": 0.9}}, r"^optim.momentum applies only with optim.name"),
                            ({"influence": {"hops": 2}}, r"^influence.hops applies to influence, which this run")):
        with pytest.raises(dice_ray.InputError, match=message):
            dice_ray.run(nodes=4, engine="local", **fields)
    assert not (tmp_path / "runs").exists()
    kept = dice_ray.run({"nodes": 4, "rounds": 1, "influence": {"hops": 2}, "output": {"progress": False}},
                        engine="local")  # a config may keep a setting that does nothing here
    assert kept.path.is_absolute() and kept.path.parent == (tmp_path / "runs").resolve()


def test_default_run_directories_of_the_same_second_do_not_collide(tmp_path: Path, monkeypatch) -> None:
    """A loop of runs without output.out in one process: each gets its own directory (a -2 suffix within a second)."""
    from dice_ray.runner import run_directory

    monkeypatch.chdir(tmp_path)
    config = dice_ray.RunConfig(nodes=4)
    first = run_directory(config)
    first.mkdir(parents=True)
    (first / "manifest.json").write_text("{}")
    second = run_directory(config)
    assert second != first and second.parent == first.parent and not second.exists()


def test_the_console_script_is_the_same_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``dice-ray simulate …`` is ``python -m dice_ray.simulate …``; bad input: one line, exit status 2."""
    out = subprocess.run([sys.executable, "-m", "dice_ray.cli", "simulate", "--nodes", "1"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = subprocess.run([sys.executable, "-m", "dice_ray", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and all(word in out.stdout for word in ("simulate", "analyze", "sweep"))
    from dice_ray.cli.main import main

    assert main([]) == 2 and capsys.readouterr().err.startswith("usage: dice-ray")  # an error: on stderr

    for command in ("simulate", "analyze", "sweep"):  # each subcommand's usage names the command typed
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert capsys.readouterr().out.startswith(f"usage: dice-ray {command} ")


def test_the_reports_are_reached_from_the_package_alone() -> None:
    """``import dice_ray`` then ``dice_ray.reports.alignment_report``, as the how-to pages write it: the reports are
    imported when first read (a fresh interpreter; matplotlib is not imported before)."""
    code = ("import sys, dice_ray\nassert 'dice_ray.reports' not in sys.modules and 'matplotlib' not in sys.modules\n"
            "print(dice_ray.reports.alignment_report.__name__, dice_ray.reports.Cascade.__name__)\n"
            "try:\n    dice_ray.no_such_name\nexcept AttributeError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["alignment_report Cascade", "module 'dice_ray' has no attribute 'no_such_name'"]


def test_regression_with_mse_runs_end_to_end_with_influence(tmp_path: Path) -> None:
    config = dice_ray.as_config(REGRESSION, influence={"enabled": True, "hops": 2, "rounds": [2, 4]},
                                output={**REGRESSION["output"], "out": str(tmp_path / "reg")})
    run = dice_ray.run(config, engine="local")
    rounds = run.rounds.dropna(subset=["heldout_loss"])
    first, last = (rounds[rounds["round"] == t]["heldout_loss"].mean() for t in (3, 7))
    assert last < first  # it learns
    assert rounds["heldout_acc"].isna().all()  # MSE has no accuracy
    final = json.loads((run.path / "manifest.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert final["final"]["heldout_acc_mean"] is None and final["final"]["heldout_loss_mean"] == pytest.approx(
        rounds[rounds["round"] == 7]["heldout_loss"].mean())  # strict JSON: null, not NaN
    dice = run.dice
    assert dice["gt"].notna().all() and dice["est_curvature"].notna().all()
    # the estimate tracks the ground truth on this smooth model
    assert np.corrcoef(dice["gt"], dice["est_curvature"])[0, 1] > 0.9


def test_unknown_loss_and_bad_custom_data_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(dice_ray.InputError, match="loss 'hinge' is unknown"):
        dice_ray.RunConfig(model={"loss": "hinge"})

    @dice_ray.register_dataset("ragged")
    def ragged():
        return np.zeros((4, 3), np.float32), np.zeros(5, np.int64), np.zeros((2, 3), np.float32), np.zeros(2, np.int64)

    with pytest.raises(dice_ray.InputError, match="4 training inputs for 5 targets"):
        dice_ray.run(dice_ray.RunConfig(data={"dataset": "ragged"}, output={"out": str(tmp_path / "r")}),
                     engine="local")
    assert not (tmp_path / "r").exists()


def test_curvature_estimate_on_mse_equals_forward_mode_derivative_of_the_replay() -> None:
    from oracles import explicit_replay  # the exactness check of the built-in loss, on this one

    experiment = prepare(dice_ray.as_config(REGRESSION, optim={"name": "momentum", "lr": 0.1}))
    window = window_for(experiment, record_trajectory(experiment, 2, 3))
    traj, minibatch = window.trajectory, window.batches
    traj.states = [s.double() for s in traj.states]
    traj.halves = [s.double() for s in traj.halves]
    traj.opt_states = [{k: v.double() for k, v in o.items()} for o in traj.opt_states]
    window.model = window.model.double()
    window.heldout = (window.heldout[0].double(), window.heldout[1].double())
    window.batches = lambda t: (minibatch(t)[0].double(), minibatch(t)[1].double())
    assert window.loss.name == "mse"
    source, hops = 3, 3
    delta, opt_delta = update_difference(window, source)
    cascade = estimate_cascade(window, source, delta, opt_delta, hops, "curvature")
    run, width = explicit_replay(window, source, hops)
    opt_source = {k: traj.opt_states[1][k][source] for k in opt_delta}
    _, derivatives = jvp(run, (traj.halves[0][source, :width], opt_source), (delta, opt_delta))
    for s in range(1, hops + 1):
        exact = derivatives[s - 1].detach().numpy()[cascade.supports[s]]
        assert np.abs(exact).max() > 0
        np.testing.assert_allclose(cascade.values[s], exact, rtol=1e-5, atol=1e-12)


def _digits(seed: int) -> tuple[np.ndarray, ...]:  # a data set factory, registered below through a partial
    x = np.random.default_rng(seed).normal(size=(60, 4)).astype(np.float32)
    return x[:50], (x[:50, 0] > 0).astype(np.int64), x[50:], (x[50:, 0] > 0).astype(np.int64)


def test_a_name_the_ray_workers_would_not_know_is_said_before_any_work(tmp_path: Path, capsys) -> None:
    """Ray workers look names up after importing the config's imports. A loss registered by a script run as a file
    would be unknown in every worker: refused in one line, before Ray starts or a directory is made. A name defined
    in a module the imports do not list (a partial's function counts, not functools) gets a warning line. A script
    the imports name (run as a file or with ``python -m``) is imported as that module, registers its names again
    there, and passes."""
    from dice_ray.config import check_workers_register

    dice_ray.register_dataset("test-api-partial", functools.partial(_digits))
    config = dice_ray.RunConfig(nodes=4, rounds=2, data={"dataset": "test-api-partial"})
    check_workers_register(config)  # a run's workers receive the data: its set's name is not looked up there
    assert capsys.readouterr().err == ""
    check_workers_register(config, data_in_workers=True)  # a sweep's trials load it
    assert capsys.readouterr().err.strip() == (
        f"warning: data set 'test-api-partial' is defined in the module {__name__}, which the config's imports do not "
        f"list: unless a listed module registers it, Ray workers will not know it (imports: [{__name__}], --imports "
        f"{__name__})")
    check_workers_register(dice_ray.as_config(config, imports=[__name__]), data_in_workers=True)
    assert capsys.readouterr().err == ""
    code = ("import torch, dice_ray\n"
            "dice_ray.register_loss('test-api-script-loss')(type('L', (dice_ray.Loss,), {'per_sample': "
            "lambda self, o, t: torch.nn.functional.cross_entropy(o, t, reduction='none')}))\n"
            "if __name__ == '__main__':\n"
            f"    dice_ray.run(dice_ray.RunConfig(nodes=4, rounds=2, data={{'dataset': 'digits'}}, "
            f"model={{'loss': 'test-api-script-loss'}}, output={{'out': {str(tmp_path / 's')!r}}}), engine=ENGINE)\n")
    for engine in ("'ray'", "'local'"):
        (tmp_path / "script.py").write_text(code.replace("ENGINE", engine))
        done = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        if engine == "'ray'":
            assert done.returncode == 1, done.stderr[-2000:]
            assert "InputError: loss 'test-api-script-loss' is registered by the script itself" in (
                done.stderr.strip().splitlines()[-1])
            assert not (tmp_path / "s").exists() and "Started a local Ray" not in done.stderr
        else:
            assert done.returncode == 0 and (tmp_path / "s" / "rounds.parquet").exists(), done.stderr[-2000:]
    check = ("import sys, torch, dice_ray\nfrom dice_ray.config import check_workers_register\n"
             "dice_ray.register_model('test-api-m')(lambda s, c: torch.nn.Sequential(torch.nn.Flatten(), "
             "torch.nn.Linear(64, c)))\n"
             "if __name__ == '__main__':  # the config imports as_module too: its names register again\n"
             "    check_workers_register(dice_ray.RunConfig(model={'name': 'test-api-m'}, imports=['as_module']))\n"
             "    print('known')\n")
    (tmp_path / "as_module.py").write_text(check)
    for argv in (["-m", "as_module"], ["as_module.py"]):
        done = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "known" and not done.stderr.strip(), done.stderr[-2000:]


def test_registered_names_load_in_ray_workers(ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data set, model and loss registered in a module listed in ``imports`` are found by the participant-group
    actors and by the Ray tasks after training (DICE-GT replays, leave-one-out retraining) too."""
    module = tmp_path / "my_data.py"
    module.write_text("import numpy as np\nimport torch\nimport dice_ray\n\n"
                      "@dice_ray.register_dataset('worker-data')\n"
                      "def load(seed):\n    rng = np.random.default_rng(seed)\n"
                      "    x = rng.normal(size=(300, 4)).astype(np.float32)\n    y = (x[:, 0] > 0).astype(np.int64)\n"
                      "    return x[:250], y[:250], x[250:], y[250:]\n\n"
                      "@dice_ray.register_model('worker-model')\n"
                      "def model(input_shape, num_classes):\n"
                      "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, num_classes))\n\n"
                      "@dice_ray.register_loss('worker-loss')\n"
                      "class Loss(dice_ray.Loss):\n"
                      "    def per_sample(self, outputs, targets):\n"
                      "        return 2 * torch.nn.functional.cross_entropy(outputs, targets, reduction='none')\n\n"
                      "@dice_ray.register_misbehavior('worker-misbehavior')\n"
                      "class Bad(dice_ray.Misbehavior):\n"
                      "    def __init__(self, c=1.0):\n        self.c = c\n\n"
                      "    def corrupt(self, x, y, num_classes, rng):\n        return x, 1 - y\n\n"
                      "    def factor(self, participant):\n        return self.c\n")
    sys.path.insert(0, str(tmp_path))
    import ray

    ray.shutdown()  # a fresh Ray whose workers find the module: on PYTHONPATH, as on a cluster's machines
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    start_ray(num_cpus=2)
    try:
        config = dice_ray.RunConfig(imports=["my_data"], nodes=4, rounds=3, data={"dataset": "worker-data"},
                                    model={"name": "worker-model", "loss": "worker-loss"}, engine={"actors": 2},
                                    misbehavior={"kind": "worker-misbehavior", "count": 1, "options": {"c": -2.0}},
                                    influence={"enabled": True, "hops": 1, "rounds": [1]},
                                    ledger={"enabled": True, "hops": 1, "loo": True},
                                    output={"out": str(tmp_path / "w"), "progress": False})
        run = dice_ray.run(config)
        assert json.loads((run.path / "manifest.json").read_text())["status"] == "complete"
        assert len(run.manifest["placement"]) == 2
        assert np.isfinite(run.rounds["train_loss"].to_numpy()).all()
        assert np.isfinite(run.dice["gt"].to_numpy()).all() and len(run.table("loo")) > 0
        assert run.table("nodes")["misbehaving"].sum() == 1
    finally:
        sys.path.remove(str(tmp_path))
        ray.shutdown()


def test_a_data_set_the_ray_workers_do_not_know_still_runs_on_ray(ray_local, tmp_path: Path, capsys) -> None:
    """A run's actors and its tasks after training (DICE-GT replays, leave-one-out retraining) receive the data from
    the driver and never look the data set up: one registered in a notebook or a module the imports do not list
    runs on Ray, with no warning."""
    dice_ray.register_dataset("test-api-unlisted", functools.partial(_digits))
    config = dice_ray.RunConfig(nodes=4, rounds=3, data={"dataset": "test-api-unlisted"}, engine={"actors": 2},
                                influence={"enabled": True, "hops": 1, "rounds": [1]},
                                ledger={"enabled": True, "hops": 1, "loo": True},
                                output={"out": str(tmp_path / "u"), "progress": False})
    run = dice_ray.run(config)
    assert run.manifest["status"] == "complete" and len(run.manifest["placement"]) == 2
    assert np.isfinite(run.dice["gt"].to_numpy()).all() and len(run.table("loo")) > 0
    said = capsys.readouterr().err
    assert "warning" not in said
    # the replays' and retraining's processes are in the memory summary (often the largest: 5.2 GB at N = 1,024)
    peak = run.manifest["peak_rss_mib"]["tasks"]
    assert peak > 100 and f"largest task process {peak:.0f} MiB" in said
    local = dice_ray.run(dice_ray.as_config(config, output={"out": str(tmp_path / "l"), "progress": False}),
                         engine="local")
    assert local.manifest["peak_rss_mib"]["tasks"] is None  # the tasks ran in this process: the driver's peak
