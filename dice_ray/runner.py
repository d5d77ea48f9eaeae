"""The run as a library object: one experiment end to end, the command line's and the API's shared body.

``simulate(config)`` prepares the experiment, starts the engine, runs the round loop with its hooks, runs the work
after training (influence replays, retraining), and keeps the run's record (``Manifest``) in its run directory.
``dice_ray.run`` / ``dice_ray.resume`` call it; the command-line front ends (``python -m dice_ray.simulate``,
``dice-ray``) parse arguments and call the API. Results: a run directory with ``manifest.json``, ``rounds.parquet``
and ``nodes.parquet``, and the tables of the methods the config enables (``dice_ray.results``).
"""

from __future__ import annotations

import datetime as dt
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dice_ray.checkpoint import CHECKPOINTS, CheckpointStore, RoundTables, config_digest
from dice_ray.config import (
    RESUME_FIELDS,
    RunConfig,
    check_workers_register,
    forget_address,
    forget_download,
    forget_tracking_uri,
    rerun_config,
    set_dotted,
)
from dice_ray.engine import (
    Engine,
    LocalEngine,
    RayEngine,
    check_local_cpus,
    cluster_plan,
    start_ray,
    starts_local_ray,
)
from dice_ray.engine.loop import Drivers, TrainingReport, train
from dice_ray.engine.runtime import peak_rss_mib
from dice_ray.engine.tasks import Tasks, task_backend
from dice_ray.errors import InputError, absent, first_line
from dice_ray.experiment import Experiment, prepare
from dice_ray.hooks import Method, RoundHook, Stage, round_hooks
from dice_ray.methods.catalog import check_methods, methods_for
from dice_ray.methods.dice.probes import influence_cost
from dice_ray.results import (
    NODES,
    ROUNDS,
    TOPOLOGY_FILE,
    keep_topology_file,
    kept_topology_file,
    write_atomic,
    write_json_atomic,
    write_table_atomic,
)
from dice_ray.rundir import LOCK, MANIFEST, DirectoryLock, check_can_make, read_json, read_manifest
from dice_ray.tracking import check_tracking, open_tracker
from dice_ray.version import __version__

# The manifest's records a resume reads or extends, and their types
RECORD_TYPES: dict[str, type] = {"resumes": list, "recoveries": list, "task_retries": list, "checkpoints_written": int,
                                 "methods": list, "model": dict, "placement": list, "config": dict}


def resume_config(run: Path, changes: dict[str, Any] | None = None,
                  allow_imports: bool = False) -> tuple[RunConfig, dict[str, Any]]:
    """Return (config, manifest) of the run in ``run``, with the placement ``changes`` (dotted field -> value,
    only ``config.RESUME_FIELDS``) applied; raise ``InputError`` if it cannot be resumed, or if its config names
    modules to import and ``allow_imports`` is False (``config.rerun_config``)."""
    refused = f"cannot resume {str(run)!r}"
    if not run.is_dir():
        raise InputError(f"{refused}: the run directory {absent(run, 'folder')}")
    if not (run / MANIFEST).is_file():
        raise InputError(f"{refused}: no manifest.json there; not a dice-ray run directory")
    DirectoryLock(run).check()
    try:
        manifest = read_manifest(run)
    except InputError as err:
        raise InputError(f"{refused}: {err}") from None
    data = manifest["config"]
    for name, kind in RECORD_TYPES.items():  # what a resume reads and extends: a changed one failed after training
        if name in manifest and not isinstance(manifest[name], kind):
            raise InputError(f"{refused}: manifest.json's {name!r} is not a {kind.__name__}: the manifest was changed")
    if manifest.get("status") == "complete":
        raise InputError(f"{refused}: the run is already complete")
    forget_address(data, f"resuming {str(run)!r}", (changes or {}).get("engine.address"))
    forget_tracking_uri(data, f"resuming {str(run)!r}")
    forget_download(data, f"resuming {str(run)!r}")
    for dotted, value in (changes or {}).items():
        if dotted not in RESUME_FIELDS:
            raise InputError(f"a resume continues the run with its own config; {dotted} cannot change "
                             f"(only {', '.join(RESUME_FIELDS)} can)")
        set_dotted(data, dotted, value)
    set_dotted(data, "output.out", str(run))
    config = rerun_config(data, refused, allow_imports)
    if not (run / "rounds.parquet").exists():
        store = CheckpointStore(run, config_digest(config))
        latest = store.latest()  # the newest that verifies; newer ones that do not are skipped with a warning
        if latest is None and store.checkpoints():
            raise InputError(f"{refused}: none of its {len(store.checkpoints())} checkpoints verifies (changed "
                             "or truncated files); nothing was changed")
        try:
            if latest is not None:
                store.check(latest)
        except ValueError as err:
            raise InputError(f"{refused}: {err}") from None
        if latest is not None and latest.round >= config.rounds - 1:  # the last round's state is the final one
            raise InputError(f"{refused}: its checkpoint {latest.path.name} is of round {latest.round}, but the "
                             f"run has rounds 0..{config.rounds - 1} and no rounds.parquet; nothing was changed")
    elif (problem := unreadable(run / "rounds.parquet")) is not None:
        raise InputError(f"{refused}: {problem}; nothing was changed")
    return config, manifest


def fitting_snapshot(checkpoint: Any, nodes: int, width: int) -> dict[str, np.ndarray]:
    """The arrays of ``checkpoint``, if they can be the state of ``nodes`` participants of states ``width`` wide:
    numbers only, ``state`` [nodes, width] and finite (a checkpoint is never written otherwise; its digests can be
    recomputed by whoever edits it); else an ``InputError``."""
    snapshot = checkpoint.load()
    odd = [name for name, value in snapshot.items() if value.dtype.kind not in "fiub"]
    state = snapshot.get("state")
    # the participants' and optimizers' state: a run never saves them otherwise (a NaN there read as divergence)
    infinite = [name for name, value in snapshot.items() if (name == "state" or name.startswith("opt."))
                and value.dtype.kind == "f" and not np.isfinite(value).all()]
    problem = (f"{odd[0]} holds {snapshot[odd[0]].dtype}, not numbers" if odd else "it has no state" if state is None
               else f"its state is {list(state.shape)}, not [{nodes}, {width}]" if state.shape != (nodes, width)
               else f"its {infinite[0]} is not finite" if infinite else None)
    if problem is not None:
        raise InputError(f"cannot resume {str(checkpoint.path.parent.parent)!r}: checkpoint {checkpoint.path.name} "
                         f"cannot be this run's: {problem}")
    return snapshot


def _fitting_checkpoint(out: Path, experiment: Experiment, methods: list[Method], drivers: Drivers,
                        store: CheckpointStore, checkpoint: Any) -> dict[str, np.ndarray]:
    """The arrays of ``checkpoint``, the one a resume of ``out`` continues from, checked before anything is written
    or started: this run's config wrote it, its arrays can be this run's (``fitting_snapshot``), and they restore a
    block (on PyTorch's ``meta`` device: shapes without data, ~2 s at N = 100,000) and the methods' drivers, which
    keep it; else an ``InputError``."""
    store.check(checkpoint)
    snapshot = fitting_snapshot(checkpoint, experiment.nodes, experiment.state_width)
    try:
        LocalEngine(experiment, round_hooks(methods), device="meta").restore(snapshot)
        drivers.load_state(checkpoint.load_driver_state())
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as err:  # arrays of another run
        raise InputError(f"cannot resume {str(out)!r}: checkpoint {checkpoint.path.name} does not fit this run "
                         f"({type(err).__name__}: {first_line(err)[:160]})") from None
    return snapshot


def unreadable(path: Path) -> str | None:
    """Why the Parquet table at ``path`` cannot be read (cut short, replaced), or None."""
    try:
        pq.read_metadata(path)
    except (OSError, pa.ArrowException) as err:
        return f"{path.name} is not a readable Parquet table ({first_line(err)[:120]})"
    return None


def run_directory(config: RunConfig) -> Path:
    """Return the run directory to create; refuse to reuse a non-empty one without ``overwrite``. Without
    ``output.out``: runs/DATE-TIME-TOPOLOGY-nN, with -2, -3, ... where a run of the same second has it (a loop of
    runs in one process)."""
    out = config.output.out
    if out is None:
        stem = f"runs/{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{config.topology.name}-n{config.nodes}"
        out, n = stem, 2
        while Path(out).exists():
            out, n = f"{stem}-{n}", n + 1
    path = Path(out)
    try:
        exists = path.exists()
    except OSError as err:  # a name too long, say: Path.exists raises what is not "no such file"
        raise InputError(f"output.out (--out) {out!r} cannot be a folder here: {err.strerror}") from None
    if exists and not path.is_dir():
        raise InputError(f"output.out (--out) {out!r} exists and is not a directory")
    check_can_make(path, f"output.out (--out) {out!r}")
    if path.is_dir():
        DirectoryLock(path).check()  # a live run's directory is never reused, not even with --overwrite
    if path.is_dir() and any(p.name != LOCK for p in path.iterdir()):
        if not config.output.overwrite:
            raise InputError(f"run directory {out!r} already exists and is not empty; set output.overwrite "
                             "(--overwrite) or choose another output.out (--out)")
        if not (path / MANIFEST).is_file():  # overwrite deletes a run's tables and plots: never another folder's
            raise InputError(f"output.out (--out) {out!r} holds files and is not a dice-ray run directory (no "
                             "manifest.json): output.overwrite (--overwrite) replaces only a run; choose another "
                             "output.out")
    return path


def _versions() -> dict[str, str]:
    import importlib.metadata

    import pyarrow
    import torch

    return {"dice_ray": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "ray": importlib.metadata.version("ray"),  # (read from its metadata: a local run imports no Ray)
            "numpy": np.__version__, "pyarrow": pyarrow.__version__}


def _nodes_table(experiment: Experiment, blocks: list[np.ndarray]) -> dict[str, Any]:
    w = experiment.topology.mixing_matrix(0)
    actor = np.zeros(experiment.nodes, np.int32)
    for i, block in enumerate(blocks):
        actor[block] = i
    return {
        "node": np.arange(experiment.nodes, dtype=np.int32),
        "n_train": [len(t) for t in experiment.partition.train],
        "n_val": [len(v) for v in experiment.partition.val],
        "q": experiment.q,
        "in_degree": np.asarray(experiment.topology.adjacency(0).sum(axis=1)).ravel(),
        "self_weight": w.diagonal(),
        "actor": actor,
        "misbehaving": np.isin(np.arange(experiment.nodes), experiment.misbehaving),
    }


SESSION_COUNTS: dict[str, Any] = {"recoveries": [], "checkpoints_written": 0, "task_retries": []}


class Manifest:
    """A run's record, ``manifest.json`` in its run directory: the config, where and how it ran, and how it ended
    (``status`` running, complete, failed or interrupted). ``write`` replaces the file atomically."""

    def __init__(self, out: Path, fields: dict[str, Any]):
        self.out, self.fields = out, fields
        # what the earlier sessions recorded: this session's counts are added to them (``add_failures``)
        self._earlier = {name: fields.get(name, default) for name, default in SESSION_COUNTS.items()}

    @classmethod
    def begin(cls, experiment: Experiment, out: Path, engine_kind: str, save_states: bool) -> Manifest:
        """The record of a new run of ``experiment`` in ``out``."""
        config = experiment.config
        return cls(out, {
            "status": "running", "config": config.recorded(), "seed": config.seed,
            "versions": _versions(), "host": platform.node(), "argv": sys.argv,
            "start_time": _now(), "engine": engine_kind, "save_states": save_states,
            "topology": experiment.topology.describe(),
            "data": {"dataset": config.data.dataset, "n_train": int(len(experiment.dataset.y_train)),
                     "n_test": int(len(experiment.dataset.y_test)), "heldout": int(len(experiment.heldout[1])),
                     "input_shape": list(experiment.dataset.input_shape),
                     "num_classes": experiment.dataset.num_classes},
            "model": {"name": config.model.name, "parameters": experiment.param_count,
                      "state_layout": experiment.state_layout},
            "misbehaving": experiment.misbehaving.tolist(),
        })

    @classmethod
    def resumed(cls, out: Path, start: int) -> Manifest:
        """The record in ``out``, continued from round ``start`` (listed under ``resumes``)."""
        fields = read_json(out / MANIFEST)
        fields.setdefault("resumes", []).append({"time": _now(), "from_round": start})
        fields.update(status="running", argv_resume=sys.argv)
        fields.pop("error", None)
        return cls(out, fields)

    def update(self, **fields: Any) -> None:
        """Set top-level ``fields`` of the record (written by the next ``write``)."""
        self.fields.update(fields)

    def get(self, name: str, default: Any = None) -> Any:
        """The record's field ``name`` (``default`` if it has none)."""
        return self.fields.get(name, default)

    def write(self) -> None:
        """Write the record to ``manifest.json``, atomically."""
        self.fields["config"]["output"]["out"] = str(self.out)
        write_json_atomic(self.out / MANIFEST, self.fields)

    def add_failures(self, report: TrainingReport, retries: list[dict]) -> None:
        """Record the earlier sessions' recoveries, checkpoint count and resubmitted tasks (``engine.tasks``) with this
        session's so far (called again as they grow: each call replaces the last one's)."""
        self.fields["recoveries"] = self._earlier["recoveries"] + report.recoveries
        self.fields["checkpoints_written"] = self._earlier["checkpoints_written"] + report.checkpoints
        self.fields["task_retries"] = self._earlier["task_retries"] + retries

    def end(self, err: BaseException, store: CheckpointStore, report: TrainingReport, retries: list[dict]) -> None:
        """Record a run stopped by ``err`` (interrupted by the user, or failed) and write it if the disk lets us (a
        full or read-only disk leaves it saying "running")."""
        latest = store.latest()
        self.update(status="interrupted" if isinstance(err, KeyboardInterrupt) else "failed",
                    error=f"{type(err).__name__}: {err}", end_time=_now(),
                    last_checkpoint_round=latest.round if latest else None)
        self.add_failures(report, retries)
        try:
            self.write()
        except OSError:
            pass


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def simulate(config: RunConfig, engine_kind: str = "ray", save_states: bool = False,
             experiment: Experiment | None = None, resume: bool = False,
             on_round: Callable[[Any, Any], None] | None = None, methods: list[Method] | tuple = ()) -> Path:
    """Run the simulation of ``config``; return its run directory (see the module docstring).

    ``resume``: continue the run in ``config.output.out`` from its last checkpoint (``--resume``).
    ``on_round(metrics, engine)`` is called after every round (``RoundMetrics``, and the engine running it),
    e.g. to watch a run. ``methods``: a user's own ``hooks.Method``s, run after the built-in ones the config enables.
    """
    started = time.time()  # "in all" counts Ray's start too (5-15 s: the silence before the first bar)
    experiment = experiment or prepare(config)
    config = experiment.config
    check_tracking(config.output.log, config.output.tracking_uri)  # before anything is made or written
    check_methods(methods)
    cost = influence_cost(config, experiment.state_width, experiment.topology.mixing_matrix)
    if cost and not resume:
        print(cost, file=sys.stderr)
    out = Path(config.output.out) if resume else run_directory(config)
    if engine_kind == "ray":  # a cluster that cannot hold the run's actors or tasks: one line, the directory untouched
        check_workers_register(config)
        check_local_cpus(config.engine, experiment.nodes)  # before a local Ray starts
        if config.output.progress and starts_local_ray(config.engine):
            print("starting a local Ray (--engine local runs without it)...", file=sys.stderr)  # (a join: one line)
        start_ray(config.engine.address)
        cluster_plan(config.engine, experiment.nodes)
    with DirectoryLock(out):  # one writer per run directory, for as long as this process writes it
        return _simulate(experiment, out, engine_kind, save_states, resume, on_round, methods, started)


def _simulate(experiment: Experiment, out: Path, engine_kind: str, save_states: bool, resume: bool,
              on_round: Callable[[Any, Any], None] | None, methods: list[Method] | tuple, started: float) -> Path:
    config = experiment.config
    store = CheckpointStore(out, config_digest(config))
    # rounds.parquet last: its presence marks a finished training run
    chosen = methods_for(config, list(methods))
    drivers = Drivers(experiment, chosen)
    tables = RoundTables(out, {**drivers.tables(), "rounds": ROUNDS})
    if resume:
        training_done = (out / "rounds.parquet").exists()
        latest = store.latest(warn=False)  # resume_config looked first, and warned
        start = config.rounds if training_done else (latest.round + 1 if latest else 0)
        manifest = Manifest.resumed(out, start)  # read, not written yet
        _check_same_methods(out, manifest.get("methods", []), chosen)
        _check_same_layout(out, manifest.get("model", {}), experiment)
        snapshot = _fitting_checkpoint(out, experiment, chosen, drivers, store, latest) if 0 < start < config.rounds \
            else None
        manifest.update(engine=engine_kind)  # where it runs now: a later resume without --engine continues so
    else:
        start = 0
        out.mkdir(parents=True, exist_ok=True)
        kept = keep_topology_file(config, out)  # first: the file may be this directory's own copy, overwritten
        for stale in [*out.glob("*.parquet"), *out.glob("*.png"), out / "states.npy",  # an overwritten run's
                      *out.glob(f"{TOPOLOGY_FILE}*")]:                             # tables, reports, plots, graph
            if kept is None or stale.name != kept["name"]:
                stale.unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)  # an overwritten run's tracker records
        (out / "mlflow.db").unlink(missing_ok=True)
        manifest = Manifest.begin(experiment, out, engine_kind, save_states)
        manifest.update(methods=[m.name for m in chosen])
        if kept is not None:
            manifest.update(topology_file=kept)
    manifest.write()
    tracker = open_tracker(config, out, start)  # output.log: TensorBoard / MLflow views of the tables
    on_round = tracker.chain(on_round)
    engine: Any = None
    training_s = 0.0  # the round loop's seconds (not the engine's start, nor the work after training)
    actor_info: list[dict[str, Any]] = []
    report = TrainingReport()
    tasks = task_backend(engine_kind, config, config.output.progress)  # the stages' work after training
    written = [0]  # checkpoints this session, as the manifest last recorded them

    def recorded(metrics: Any, engine: Any) -> None:
        """After a round that wrote a checkpoint: the manifest records the session's counts (a SIGKILL later kept
        none of them: a resumed run said 2 checkpoints written of 7)."""
        if report.checkpoints != written[0]:
            written[0] = report.checkpoints
            manifest.add_failures(report, tasks.retries)
            manifest.write()
        if on_round is not None:
            on_round(metrics, engine)

    try:
        if start < config.rounds:
            engine = _start_engine(experiment, engine_kind, round_hooks(chosen))
            blocks = engine.blocks
            manifest.update(actors=len(blocks))
            write_table_atomic(out / "nodes.parquet", _nodes_table(experiment, blocks), NODES)
            if start > 0:  # ``latest``: the checkpoint that verified and fitted above (the drivers hold its state)
                engine.restore(snapshot, config.engine.restart_timeout)
                snapshot = None  # in the engine now: a whole state less for the rest of the run
                drivers.impose_mixing(engine)
                tables.rollback(latest.round)
                store.remove_after(latest.round)
            else:
                tables.rollback(-1)
            training = time.time()
            _run_rounds(engine, config, tables, store, drivers, start, recorded, report)
            training_s = time.time() - training
            for name, rows, schema in drivers.finish():  # before rounds.parquet, which marks the end of training
                write_table_atomic(out / f"{name}.parquet", rows, schema)
            manifest.update(**drivers.summary())
            if save_states:  # before rounds.parquet: a resume takes a run with it as trained
                states = engine.states()

                def save(tmp: Path) -> None:
                    with open(tmp, "wb") as f:
                        np.save(f, states)

                write_atomic(out / "states.npy", save)
            tables.finish(config.rounds - 1)
            actor_info = engine.info()
            engine.close()  # frees the actors' CPUs for the influence tasks
            engine = None
            manifest.update(placement=actor_info)  # now: a resume after training still knows where it ran
            manifest.write()
        for method in chosen:  # the work after training, in method order (the engine's CPUs are free now)
            for stage in method.stages:
                _run_stage(stage(experiment, out), tasks)
    except BaseException as err:
        manifest.end(err, store, report, tasks.retries)
        tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        if engine is not None:
            engine.close()
        raise

    if not config.output.keep_checkpoints:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    wall = time.time() - started
    final = _final_metrics(out / "rounds.parquet", config.rounds - 1)
    if not actor_info:  # resumed after training: the actors that trained are those the manifest names
        actor_info = manifest.get("placement", [])
    actor_peaks = [a["peak_rss_mib"] for a in actor_info] if engine_kind != "local" else []  # local: the driver
    rate = (config.rounds - start) / training_s if training_s > 0 else None
    task_peak = tasks.peak_rss_mib()  # the work after training: replays, retraining (None: none in other processes)
    manifest.update(status="complete", end_time=_now(), wall_seconds=wall, training_seconds=training_s,
                    rounds_per_second=rate,
                    peak_rss_mib={"driver": peak_rss_mib(), "actors": actor_peaks, "tasks": task_peak},
                    placement=actor_info,
                    final=final)
    manifest.add_failures(report, tasks.retries)
    manifest.write()
    tracker.finish()
    actors = f", actors {sum(actor_peaks):.0f} MiB in total (largest {max(actor_peaks):.0f} MiB)" if actor_peaks else ""
    actors += f", largest task process {task_peak:.0f} MiB" if task_peak is not None else ""
    trained = (f"rounds {start}..{config.rounds - 1} x {config.nodes} participants in {training_s:.1f} s "
               f"({rate:.2f} rounds/s), {wall:.1f} s in all" if rate else
               f"{config.nodes} participants trained before, {wall:.1f} s now")
    held_out = (f"accuracy {final['heldout_acc_mean']:.3f}" if final["heldout_acc_mean"] is not None else
                f"loss {final['heldout_loss_mean']:.4g}")  # a loss without accuracy (MSE): its loss
    retried = [f"{len(report.recoveries)} lost actor(s) replaced"] if report.recoveries else []
    retried += [f"{len(tasks.retries)} task(s) run again"] if tasks.retries else []
    retried_line = f"; {', '.join(retried)} (manifest.json: recoveries, task_retries)" if retried else ""
    print(f"done: {trained}; final held-out {held_out}; peak memory: driver {peak_rss_mib():.0f} MiB{actors}"
          f"{retried_line}; results in {out}/", file=sys.stderr)
    return out


def _check_same_methods(out: Path, recorded: list[str], chosen: list[Method]) -> None:
    """Refuse to resume the run in ``out`` without a method it used (``recorded``: a user's, passed to the run as
    ``methods=``), before anything changes: it would finish without that method's tables."""
    missing = [name for name in recorded if name not in {m.name for m in chosen}]
    if missing:
        raise InputError(f"cannot resume {str(out)!r}: it used the method {missing[0]!r}; pass it again "
                         f"(dice_ray.resume(path, methods=[...])) to continue the run")


def _check_same_layout(out: Path, recorded: dict[str, Any], experiment: Experiment) -> None:
    """Refuse to resume a run whose checkpoints lay the model's tensors out in another order than this dice-ray does
    (a run written before frozen parameters became constants of the step, 2026-12-06, recorded no layout: then every
    parameter was trained)."""
    layout = experiment.state_layout
    before = recorded.get("state_layout", layout if not layout["frozen"] else "every parameter trained")
    if before != layout:
        raise InputError(f"run {str(out)!r} holds participants' states laid out as {before} (written by another "
                         f"dice-ray), and this one lays them out as {layout}: resume it with the dice-ray that "
                         "started it")


def _run_stage(stage: Stage, tasks: Tasks) -> None:
    """Run ``stage`` through ``tasks``; write the tables it returns atomically."""
    for name, rows in stage.run(tasks).items():
        write_table_atomic(stage.out / f"{name}.parquet", rows, stage.tables[name])


def run_stage(run: Path, stage: type[Stage], changes: dict[str, Any], local: bool = False,
              allow_imports: bool = False, progress: bool = True) -> None:
    """Run one method's ``stage`` on the finished run directory ``run`` now (e.g. retraining asked for after the run:
    ``analyze contributions --loo``), with its recorded config and the dotted fields ``changes``: as Ray tasks, or
    in this process if ``local``. A config that names modules to import is refused unless ``allow_imports``
    (``config.rerun_config``)."""
    manifest = read_manifest(run)  # a dict with a config section, or one line
    data = manifest["config"]
    forget_address(data, f"{stage.name} of run {str(run)!r}", warn=not local)
    forget_download(data, f"{stage.name} of run {str(run)!r}")
    for dotted, value in changes.items():
        set_dotted(data, dotted, value)
    experiment = prepare(rerun_config(data, f"{stage.name} of run {str(run)!r}", allow_imports),
                         kept_topology_file(run, manifest))
    if not local:
        check_workers_register(experiment.config)
    _run_stage(stage(experiment, run), task_backend("local" if local else "ray", experiment.config, progress))


def _start_engine(experiment: Experiment, engine_kind: str, hooks: list[type[RoundHook]]) -> Engine:
    """Return the engine of ``engine_kind`` ('local' or 'ray', starting or joining Ray) running ``hooks``."""
    if engine_kind == "local":
        return LocalEngine(experiment, hooks)
    start_ray(experiment.config.engine.address)
    return RayEngine(experiment, hooks=hooks)


def _run_rounds(engine: Any, config: RunConfig, tables: RoundTables, store: CheckpointStore, drivers: Drivers,
                start: int, on_round: Callable[[Any, Any], None] | None, report: TrainingReport) -> None:
    """``engine.loop.train`` with a progress bar (rounds, mean training loss, held-out accuracy, rounds/s)."""
    from tqdm import tqdm

    bar = tqdm(total=config.rounds, initial=start, unit="round", disable=not config.output.progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        train(engine, config, tables, store, drivers, start, on_round, bar, report)
    finally:
        bar.close()


def _final_metrics(rounds_path: Path, last: int) -> dict[str, float | None]:
    """Return the mean held-out accuracy and loss and the consensus distance after the last round; None where there
    is none (a loss without accuracy, such as MSE), which JSON writes as null."""
    table = pq.read_table(rounds_path, filters=[("round", "=", last)],
                          columns=["heldout_acc", "heldout_loss", "consensus_distance"]).to_pandas()

    def mean(column: str) -> float | None:
        value = table[column].mean()
        return float(value) if np.isfinite(value) else None

    return {"heldout_acc_mean": mean("heldout_acc"), "heldout_loss_mean": mean("heldout_loss"),
            "consensus_distance": mean("consensus_distance")}
