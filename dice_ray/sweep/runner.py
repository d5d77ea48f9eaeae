"""Running a sweep on Ray Tune: every trial is a full simulation in its own placement group.

Each trial is a Tune function trainable (``run_trial``) that builds the trial's run config, calls
``simulate`` and computes the trial metrics from the run directory. Tune reserves a placement group per
trial, sized from the trial's config (``spec.bundles``: an empty bundle for the trainable, which only
drives, and one per participant-group actor); ``RayEngine`` puts the trial's actors into those bundles, and
the influence tasks the trial starts stay in them. Trial seeds come from the configs, never from Tune.

The driver records every trial as it ends (``records.write_result``, then ``trials.parquet`` again), so a
killed sweep loses only the trials that were running. A trial that raises (bad input, diverged training)
reports ``status: failed`` with its error and the sweep goes on. A trial whose process dies (its machine lost,
say) is started again by Tune, up to ``TRIAL_RETRIES`` times, wherever its placement group fits then (on a node
an autoscaler adds), and continues from its run directory's last checkpoint (``simulate_or_resume``); after
that it is recorded failed from Tune's error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from dice_ray.engine.runtime import dropped_log_lines
from dice_ray.errors import InputError, first_line
from dice_ray.results import write_atomic, write_json_atomic
from dice_ray.rundir import LOCK, MANIFEST, DirectoryLock, check_can_make, read_json
from dice_ray.sweep.metrics import compute_metrics
from dice_ray.sweep.plot import plot_trials
from dice_ray.sweep.records import finished_trials, trial_dir, write_result, write_trials_table
from dice_ray.sweep.spec import Sweep, bundles
from dice_ray.tracking import check_tracking

TRIAL_RETRIES = 3  # restarts of a trial whose process died (not of one that raised: that is a result)
# Grid trials per Tune run. Tune's start and its stop on Ctrl-C grow faster than the trials it holds: 9,000 at once
# started in ~25 s and stopped at once; 90,000 had not started one trial after 150 s, nor stopped 8 min after Ctrl-C.
GRID_CHUNK = 1000
# A chunk ends with a tail where fewer trials than max_concurrent run (on average half a wave of trials idles): a
# chunk holds at least CHUNK_WAVES waves, so the tail costs at most 1/CHUNK_WAVES of the slots (1/80 on average).
CHUNK_WAVES = 40


def grid_chunk(max_concurrent: int) -> int:
    """Grid trials per Tune run: GRID_CHUNK, or CHUNK_WAVES waves of ``max_concurrent`` trials if that is more."""
    return max(GRID_CHUNK, CHUNK_WAVES * max_concurrent)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _identify(sweep: Sweep, tune_config: dict[str, Any], tune_trial_id: str) -> tuple[str, dict[str, Any]]:
    """(trial id, swept values) of a Tune trial: a grid trial carries its id, an Optuna trial takes Tune's; both carry
    their values (a grid trial's resolved from its id, ``_grid_space``)."""
    return tune_config.get("trial_id", tune_trial_id), {field: tune_config[field] for field in sweep.spec.space}


def simulate_or_resume(config: Any) -> tuple[Path, float]:
    """Run a trial's simulation; if its run directory holds an interrupted run of the same config (a sweep
    killed mid-trial), continue it from its last checkpoint instead of starting over (``simulate --resume``); if it
    holds the finished run of the same config (a trial that ended after the sweep was stopped, unrecorded), use it.
    Returns the run directory and the seconds its simulation took before (a used run's recorded wall time; else
    0)."""
    from dice_ray.checkpoint import CheckpointStore, config_digest
    from dice_ray.config import read_recorded
    from dice_ray.runner import simulate

    run = Path(config.output.out)
    try:
        manifest = read_json(run / MANIFEST)
        status = manifest.get("status")
    except (OSError, ValueError, AttributeError):
        manifest, status = {}, None
    if status == "complete" and (run / "rounds.parquet").exists():
        try:
            if config_digest(read_recorded(manifest.get("config"), str(run))) == config_digest(config):
                earlier = manifest.get("wall_seconds")
                return run, float(earlier) if isinstance(earlier, int | float) and earlier >= 0 else 0.0
        except InputError:
            pass  # another program's directory: the trial runs anew
    store = CheckpointStore(run, config_digest(config))
    latest = store.latest()
    try:
        if latest is not None:
            store.check(latest)
    except ValueError:
        latest = None
    resumable = status in ("running", "interrupted", "failed") and (
        latest is not None or (run / "rounds.parquet").exists())
    return simulate(config, resume=resumable), 0.0


def run_trial(tune_config: dict[str, Any], sweep: Sweep, out: str) -> None:
    """The Tune trainable: run one trial's simulation and report its row (``records`` format) as JSON, with
    the sweep's ``metric`` (NaN when missing or failed) beside it for the search algorithm."""
    from ray import tune

    trial_id, params = _identify(sweep, tune_config, tune.get_context().get_trial_id())
    started = time.time()
    row: dict[str, Any] = {"trial_id": trial_id, "status": "ok", "error": None,
                           "run_dir": str(trial_dir(Path("."), trial_id)), "start_time": _now(),
                           "params": params, "metrics": {}}
    console = io.StringIO()  # what the trial prints (its summary line, warnings): its console.log, not the sweep's
    try:
        with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            config = sweep.trial_config(params, trial_dir(Path(out), trial_id))
            run, earlier = simulate_or_resume(config)
            started -= earlier
            row["metrics"] = compute_metrics(run, config, sweep.spec.metrics)
    except Exception as err:  # a failed trial is a result: recorded with its error while the sweep goes on
        row.update(status="failed", error=first_line(err, named=True))
    if trial_dir(Path(out), trial_id).is_dir() and console.getvalue():
        write_atomic(trial_dir(Path(out), trial_id) / "console.log", lambda p: p.write_text(console.getvalue()))
    row["wall_seconds"] = time.time() - started
    report = {"row": json.dumps(row)}
    if sweep.spec.metric is not None:
        value = row["metrics"].get(sweep.spec.metric)
        report[sweep.spec.metric] = math.nan if value is None else value
    report.update({k: v for k, v in row["metrics"].items() if isinstance(v, int | float) and k not in report})
    tune.report(report)  # the numbers also reach Tune's logger callbacks (output.log, see _trackers)


def _trial_line(row: dict[str, Any], done: int, total: int, show: list[str]) -> str:
    params = " ".join(f"{k}={v}" for k, v in row["params"].items())
    if row["status"] == "ok":
        numbers = {k: v for k, v in row["metrics"].items() if isinstance(v, int | float) and not isinstance(v, bool)}
        shown = [k for k in show if k in numbers] or list(numbers)[:3]  # none of those measured: the first ones
        detail = " ".join(f"{k}={numbers[k]:.4g}" for k in shown)
    else:
        detail = row["error"]
    wall = "" if row.get("wall_seconds") is None else f" ({row['wall_seconds']:.1f} s)"
    return f"[{done}/{total}] {row['trial_id']} {row['status']}: {params} | {detail}{wall}"


def _shown(sweep: Sweep) -> list[str]:
    spec = sweep.spec
    return list(dict.fromkeys([*([spec.metric] if spec.metric else []), *(spec.plot.y if spec.plot else []),
                               "final_heldout_acc"]))


def _recorder(sweep: Sweep, out: Path, total: int, done: int, recorded: dict[str, dict[str, Any]]) -> Any:
    """A Tune callback (in the driver) that records each trial the moment it ends and prints one line; ``done``:
    how many trials finished before (the count its lines go on from), ``recorded``: the rows recorded before, to
    which it adds (a failed trial being retried keeps its row in the table until it ends again)."""
    from ray import tune

    class Recorder(tune.Callback):
        rows = dict(recorded)  # every trial recorded, by id
        ran: set[str] = set()  # the trials this run recorded

        def _record(self, row: dict[str, Any]) -> None:
            write_result(out, row)
            self.rows[row["trial_id"]] = row
            self.ran.add(row["trial_id"])
            write_trials_table(out, list(self.rows.values()), list(sweep.spec.space), sweep.spec.search == "grid")
            print(_trial_line(row, done + len(self.ran), total, _shown(sweep)), flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._record(json.loads(trial.last_result["row"]))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            trial_id, params = _identify(sweep, trial.config, trial.trial_id)
            error = trial.get_error()
            message = first_line(error, named=True) if error else "the trial's process failed"
            self._record({"trial_id": trial_id, "status": "failed", "error": message,
                          "run_dir": str(trial_dir(Path("."), trial_id)), "start_time": _now(),
                          "wall_seconds": None, "params": params, "metrics": {}})

    return Recorder()


def _tracked(sweep: Sweep) -> Any:
    """The base config's ``output.log`` and ``output.tracking_uri`` (an ``OutputConfig``)."""
    from dice_ray.config import OutputConfig

    return OutputConfig(**{k: v for k, v in (sweep.base.get("output") or {}).items() if k in ("log", "tracking_uri")})


def _trackers(sweep: Sweep, out: Path) -> list[Any]:
    """Ray Tune's own logger callbacks for the base config's ``output.log``: each trial's reported metrics go
    to TensorBoard files under tune/ and to MLflow (``output.tracking_uri``, else MLFLOW_TRACKING_URI, else
    sqlite:///<sweep directory>/mlflow.db), experiment = the sweep directory's name."""
    from dice_ray.tracking import quiet_mlflow, tracking_uri

    output = _tracked(sweep)
    callbacks: list[Any] = []
    if "tensorboard" in output.log:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if "mlflow" in output.log:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        class MLflowTrials(MLflowLoggerCallback):
            """Tune's MLflow callback, ending a trial that diverged or whose run failed (reported, not raised: Tune
            saw it complete) as FAILED, as ``trials.parquet`` records it."""

            def setup(self, *args: Any, **kwargs: Any) -> None:
                with quiet_mlflow():  # its note that it creates a new store's tables, as for a plain run
                    super().setup(*args, **kwargs)

            def log_trial_end(self, trial: Any, failed: bool = False) -> None:
                row = json.loads((trial.last_result or {}).get("row", "{}"))
                super().log_trial_end(trial, failed or row.get("status") == "failed")

        callbacks.append(MLflowTrials(tracking_uri(output.tracking_uri, out), experiment_name=out.name))
    return callbacks


def _claim(sweep: Sweep, out: Path, resume: bool, lock: DirectoryLock) -> None:
    """Refuse a directory another process writes (``lock``), and to mix two sweeps in one directory: a non-empty
    one is reused only with ``resume`` and the same sweep (``Sweep.fingerprint``)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"sweep out {str(out)!r} exists and is not a directory")
    check_can_make(out, f"sweep out {str(out)!r}")
    if resume and not out.exists():  # (a sweep stopped before it wrote anything leaves an empty one: that resumes)
        raise InputError(f"sweep directory {str(out)!r} does not exist: there is nothing to resume; run the sweep "
                         "without resume (--resume)")
    lock.check()
    if not (out.is_dir() and any(p.name != LOCK for p in out.iterdir())):
        return
    if not resume:
        raise InputError(f"sweep directory {str(out)!r} already exists; set resume (--resume) to finish it or "
                         "choose another out")
    recorded = out / "sweep.json"
    if not recorded.is_file():
        raise InputError(f"{str(out)!r} is not a sweep directory (no sweep.json); choose another out")
    try:
        fingerprint = read_json(recorded)
    except (OSError, ValueError) as err:
        raise InputError(f"{str(recorded)!r} is not readable JSON ({type(err).__name__}): the sweep directory was "
                         "damaged; choose another out") from None
    if fingerprint != json.loads(json.dumps(sweep.fingerprint())):
        raise InputError(f"sweep directory {str(out)!r} holds another sweep (base, space, search or metrics "
                         "differ); choose another out")


def _check_fits(sweep: Sweep, joined: bool) -> None:
    """Refuse trials that need more CPUs or GPUs than the local Ray has (Tune would wait forever). A cluster the
    sweep joined (``joined``) may grow: its autoscaler adds the nodes the pending trials ask for (cluster.yaml's
    GPU workers start at 0), so there it is one line saying the trials wait for nodes."""
    import ray

    have = ray.cluster_resources()
    for params, need in sweep.needs:
        for kind in ("CPU", "GPU"):
            total = sum(b.get(kind, 0.0) for b in need)
            if total > have.get(kind, 0.0) + 1e-9:
                message = (f"a trial with {params} needs {total:g} {kind}s (engine.actors x cpus/gpus per actor) "
                           f"but the Ray cluster has {have.get(kind, 0.0):g}")
                if not joined:
                    raise InputError(f"sweep: {message}")
                print(f"sweep: {message} now; its trials wait for the cluster's autoscaler to add nodes", flush=True)
                return


def _searcher(sweep: Sweep, done: dict[str, dict[str, Any]]) -> Any:
    """OptunaSearch over the space, told the results of the trials already finished (resume). A resumed search draws
    with a seed moved on by the trials done: told points do not advance a seeded sampler, which would otherwise draw
    the first trials' parameters again."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    def distribution(kind: str, values: list[Any]) -> Any:
        if kind in ("grid", "choice"):
            return optuna.distributions.CategoricalDistribution(values)
        if kind == "int":
            return optuna.distributions.IntDistribution(values[0], values[1])
        return optuna.distributions.FloatDistribution(values[0], values[1], log=kind == "loguniform")

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory" on every sweep
    spec = sweep.spec
    space = {field: distribution(*next(iter(dist.items()))) for field, dist in spec.space.items()}
    searcher = OptunaSearch(space=space, metric=spec.metric, mode=spec.mode, seed=spec.seed + len(done))
    for row in done.values():
        value = row["metrics"].get(spec.metric)
        failed = row["status"] != "ok" or value is None
        searcher.add_evaluated_point(row["params"], None if failed else value, error=failed)
    return searcher


def _check_told(sweep: Sweep, out: Path, done: dict[str, dict[str, Any]]) -> None:
    """Refuse (``InputError``) a finished trial of an Optuna search whose params are not a point of the space: the
    search is told them, and Optuna fails on them with a traceback."""
    for trial, row in done.items():
        if set(row["params"]) != set(sweep.spec.space) or not all(
                _in_space(dist, row["params"][field]) for field, dist in sweep.spec.space.items()):
            raise InputError(f"{trial_dir(out, trial) / 'result.json'}: its params {row['params']} are not a point of "
                             "this sweep's space: the sweep directory was damaged; delete that trial's folder to run "
                             "it again")


def _in_space(dist: dict[str, list[Any]], value: Any) -> bool:
    """Whether ``value`` is a point of a space field's distribution (``{kind: values}``)."""
    kind, values = next(iter(dist.items()))
    if kind in ("grid", "choice"):
        return value in values
    number = isinstance(value, int if kind == "int" else int | float) and not isinstance(value, bool)
    return number and values[0] <= value <= values[1]


def run_sweep(sweep: Sweep, resume: bool = False, address: str | None = None, retry_failed: bool = False) -> Path:
    """Run the trials of ``sweep`` not yet finished in its directory; return the path of trials.parquet.

    Without ``resume`` the sweep directory must be new or empty; with ``retry_failed`` too, a grid's failed trials
    run again (from their last checkpoint, where they have one). Prints one line per finished trial and a
    summary; writes the summary plot when the sweep file asks for one."""
    from dice_ray.engine import start_ray

    if retry_failed and not resume:
        raise InputError("sweep: retry_failed (--retry-failed) goes with resume (--resume): it reruns the failed "
                         "trials of a sweep directory")
    if retry_failed and sweep.spec.search != "grid":
        raise InputError("sweep: retry_failed (--retry-failed) reruns a grid's failed trials; an optuna search "
                         "replaces them when num_samples (--num-samples) is raised")
    out = sweep.out.resolve()
    output = _tracked(sweep)
    check_tracking(output.log, output.tracking_uri, "base.output.tracking_uri")
    lock = DirectoryLock(out, "sweep directory")  # one writer per sweep directory
    _claim(sweep, out, resume, lock)
    recorded = finished_trials(out) if out.is_dir() else {}
    done = {trial: row for trial, row in recorded.items() if row["status"] == "ok" or not retry_failed}
    if sweep.spec.search == "optuna":
        _check_told(sweep, out, done)
    # Keep trials in this working directory (Tune would move each into a folder of its own), so relative paths
    # in the config (data_dir, topology.file) mean what they mean to simulate; Tune's older output mode prints
    # nothing per trial at verbose 0, leaving one line per trial to the recorder.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if _remaining(sweep, done):  # a finished sweep's resume only summarizes: no Ray to start (~10 s)
        joined = bool(address or os.environ.get("RAY_ADDRESS"))
        start_ray(address)
        _check_fits(sweep, joined)
    with lock:
        return _run_trials(sweep, out, done, recorded)


def _run_trials(sweep: Sweep, out: Path, done: dict[str, dict[str, Any]],
                recorded: dict[str, dict[str, Any]]) -> Path:
    from ray import tune

    write_json_atomic(out / "sweep.json", sweep.fingerprint())

    spec = sweep.spec
    total = _total(sweep, len(done))
    todo = [t.trial_id for t in sweep.grid if t.trial_id not in done] if spec.search == "grid" else []
    count = _remaining(sweep, done)
    print(f"sweep {out}: {total} trials ({spec.search}); {len(done)} finished before, running {count}, "
          f"up to {spec.max_concurrent} at a time", flush=True)
    started, interrupted = time.time(), False
    if count > 0:
        light = dataclasses.replace(sweep, grid=[], examples=[], needs=[])  # what a trial needs: shipped with the
        # trainable to every trial's actor (a grid of 90,000 made it 11 MiB)

        def resources(tune_config: dict[str, Any]) -> tune.PlacementGroupFactory:
            _, params = _identify(light, tune_config, "")
            try:
                config = light.trial_config(params, Path("check"))
            except (InputError, ValueError):  # a drawn combination the config refuses (misbehavior.count above
                return tune.PlacementGroupFactory([{"CPU": 1}])  # the nodes drawn): run_trial records it failed
            return tune.PlacementGroupFactory(bundles(config))

        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=light, out=str(out)), resources)
        recorder = _recorder(sweep, out, total, len(done), recorded)
        # A grid runs in chunks (grid_chunk), one Tune run each; an optuna search in one run.
        size = grid_chunk(spec.max_concurrent)
        chunks = [todo[i:i + size] for i in range(0, len(todo), size)] if spec.search == "grid" else [[]]
        name = f"tune-{dt.datetime.now():%Y%m%d-%H%M%S}"
        for index, chunk in enumerate(chunks):
            if spec.search == "grid":
                param_space = _grid_space(sweep, chunk)
                tune_config = tune.TuneConfig(num_samples=1, max_concurrent_trials=spec.max_concurrent)
            else:
                param_space = {}
                tune_config = tune.TuneConfig(search_alg=_searcher(sweep, done), num_samples=count,
                                              max_concurrent_trials=spec.max_concurrent)
            run_config = tune.RunConfig(name=name if len(chunks) == 1 else f"{name}-{index:04d}",
                                        storage_path=str(out / "tune"), verbose=0,
                                        callbacks=[recorder, *_trackers(sweep, out)],
                                        failure_config=tune.FailureConfig(max_failures=TRIAL_RETRIES))
            stopped = _fit(tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                                      run_config=run_config))
            if stopped or any(t not in recorder.ran for t in chunk):
                interrupted = True
                break  # Tune returns normally when interrupted (Ctrl-C): no further chunk
    path, rows = _summarize(sweep, out, time.time() - started, interrupted)
    if interrupted or rows < total:  # the sweep did not finish (a retried trial's old row does not count)
        raise KeyboardInterrupt(f"{rows} of {total} trials recorded")
    return path


def _fit(tuner: Any) -> bool:
    """Run ``tuner``; return whether Ctrl-C (SIGINT) stopped it. A Tune run catches SIGINT with its own handler and
    puts back the one it found only when a SIGINT comes: after a run without one, its handler stayed installed and
    a Ctrl-C between two chunks went to it, unseen. The handler found is put back here, and finding it back after
    the run (in the main thread, where Tune installs one) means Tune took a SIGINT."""
    before = signal.getsignal(signal.SIGINT)
    catches = threading.current_thread() is threading.main_thread() and not int(
        os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
    try:
        # Lines that say the wrong thing here: Tune's way to resume and its offer to checkpoint on a second Ctrl-C
        # (this sweep's way is --resume, printed after; it keeps no Tune state), and
        # Optuna's note that a failed trial's NaN makes it a failed trial (the trial's own line says why it failed),
        # and, after a stop, Tune's list of the trials it found no metrics files of (the running ones: this sweep
        # records its own results, trials/<id>/result.json, and says how many it has)
        with dropped_log_lines("ray.tune.tune", "Experiment has been interrupted", "Stop signal received"), \
                dropped_log_lines("ray.tune.search.optuna.optuna_search", "The value nan is not acceptable"), \
                dropped_log_lines("ray.tune.analysis.experiment_analysis", "Failed to fetch metrics for"):
            tuner.fit()
    finally:
        after = signal.getsignal(signal.SIGINT)
        if catches:
            signal.signal(signal.SIGINT, before)
    return catches and after is before


def _grid_space(sweep: Sweep, todo: list[str]) -> dict[str, Any]:
    """Tune's param space of the grid trials ``todo``: one grid over their ids (a grid of the sweep is not always the
    product Tune's grid_search would make, and finished trials are left out), and each field of the space resolved
    from the id, so every trial's config, which Tune's logger callbacks record, holds its parameters."""
    from ray import tune

    params = {trial_id: sweep.params[trial_id] for trial_id in todo}
    space: dict[str, Any] = {"trial_id": tune.grid_search(todo)}
    for field in sweep.spec.space:
        space[field] = tune.sample_from(lambda config, field=field: params[config["trial_id"]][field])
    return space


def _remaining(sweep: Sweep, done: dict[str, dict[str, Any]]) -> int:
    """The number of trials left to run, ``done`` being those recorded (and not to run again)."""
    if sweep.spec.search == "grid":
        return sum(t.trial_id not in done for t in sweep.grid)
    return _total(sweep, len(done)) - len(done)


def _total(sweep: Sweep, recorded: int) -> int:
    """The number of trials the sweep runs, ``recorded`` of them recorded (a grid's size; an optuna search's samples,
    or more where more ran)."""
    return len(sweep.grid) if sweep.spec.search == "grid" else max(sweep.spec.num_samples or 0, recorded)


def _summarize(sweep: Sweep, out: Path, wall: float, interrupted: bool = False) -> tuple[Path, int]:
    """Rebuild trials.parquet and the plot from every recorded trial; print the summary line (``interrupted``: the
    sweep stopped before its trials ended). Returns the table's path and the number of trials recorded."""
    spec = sweep.spec
    rows = list(finished_trials(out).values())
    path = write_trials_table(out, rows, list(spec.space), spec.search == "grid")
    ok = [r for r in rows if r["status"] == "ok"]
    state = "done" if len(rows) >= _total(sweep, len(rows)) and not interrupted else "stopped"
    lines = [f"sweep {state} in {wall:.0f} s: {len(rows)} trials, {len(ok)} ok, {len(rows) - len(ok)} failed; "
             f"table {path}"]
    if spec.plot is not None and ok:
        lines.append(f"plot {plot_trials(rows, spec.plot, out / 'summary.png')}")
    scored = [r for r in ok if r["metrics"].get(spec.metric or "") is not None]
    if scored:
        best = (max if spec.mode == "max" else min)(scored, key=lambda r: r["metrics"][spec.metric])
        lines.append(f"best {spec.metric} = {best['metrics'][spec.metric]:.4g} at {best['params']} "
                     f"({best['trial_id']})")
    print("\n".join(lines), flush=True)
    return path, len(rows)
