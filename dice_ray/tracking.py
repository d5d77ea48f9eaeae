"""Experiment tracking: send a run's per-round metrics and summaries to TensorBoard and MLflow.

``output.log`` (``--log tensorboard,mlflow``) names the trackers. They are views: the Parquet tables stay
the source of truth, and every number a tracker gets is one the tables hold too, but for the per-round
``rounds_per_second`` —

- every round: ``train_loss`` (mean over participants) and ``rounds_per_second`` (since the previous round; not
  for a session's first);
- on evaluation rounds also ``val_loss``, ``val_acc``, ``heldout_loss``, ``heldout_acc`` (means over
  participants) and ``consensus_distance``;
- after the run, where computed: ``dice/mean_abs_<column>`` (mean |DICE| over probes, step = hops r) from
  ``dice.parquet``, and ``detection/proximal_auc`` (ROC AUC of the cumulative proximal influence over all
  (examiner, in-neighbour) pairs, step = scoring round) from ``proximal.parquet`` when some participants
  misbehave.

TensorBoard event files go to ``<run>/tensorboard/`` (``tensorboard --logdir runs/``); MLflow runs go to
``output.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store ``sqlite:///<run>/mlflow.db``
(``mlflow ui --backend-store-uri sqlite:///runs/<run>/mlflow.db``), experiment ``dice-ray``, one MLflow run
per dice-ray run, with the flattened config as parameters. Sweeps log each trial through Ray Tune's own
logger callbacks instead (``dice_ray.sweep.runner``).
"""

from __future__ import annotations

import os
import platform
import socket
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dice_ray.errors import InputError, first_line

__all__ = ["Tracker", "open_tracker", "check_tracking", "tracking_uri"]

EXPERIMENT = "dice-ray"
ROUND_METRICS = ("train_loss", "val_loss", "val_acc", "heldout_loss", "heldout_acc")
DICE_COLUMNS = ("gt", "est_first_order", "est_curvature")


def tracking_uri(config_uri: str | None, directory: Path) -> str:
    """The MLflow tracking URI: the config's, else ``MLFLOW_TRACKING_URI``, else SQLite in ``directory``."""
    return config_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(directory).resolve()}/mlflow.db"


def check_tracking(logs: list[str] | tuple, config_uri: str | None, field: str = "output.tracking_uri") -> None:
    """Refuse, in one line (``InputError``), an MLflow tracking URI this process cannot use, before a run or sweep
    writes anything. Only a URI given (``field``, else ``MLFLOW_TRACKING_URI``) is tried: the default is the run
    directory's own SQLite store. A server gets one try of 10 s (MLflow itself retries for minutes, then prints a
    traceback mid-run); a SQLite file is created where it does not exist yet, as the run would."""
    uri = config_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if "mlflow" not in logs or not uri:
        return
    given = f"{field} {uri!r}" if config_uri else f"MLFLOW_TRACKING_URI {uri!r}"
    where = urllib.parse.urlsplit(uri)
    if where.scheme in ("http", "https"):
        try:
            port = where.port or (443 if where.scheme == "https" else 80)
            socket.create_connection((where.hostname or "localhost", port), timeout=10).close()
        except OSError as err:
            raise InputError(f"{given}: no MLflow server answers there ({err.strerror or err})") from None
    tries = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    before = {name: os.environ.get(name) for name in tries}
    os.environ.update(tries)
    try:
        from mlflow.tracking import MlflowClient

        with quiet_mlflow():
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 (MLflow's own exceptions, OSError, SQLAlchemy's, requests'...)
        raise InputError(f"{given}: MLflow cannot record there ({type(err).__name__}: "
                         f"{first_line(err)[:200]})") from None
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def quiet_mlflow() -> Any:
    """MLflow's note, on a new SQLite store, that it creates and upgrades its tables: said on every run and trial."""
    from dice_ray.engine.runtime import dropped_log_lines

    return dropped_log_lines("mlflow.store.db.utils", "Creating initial MLflow database tables",
                             "Updating database tables")


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config dict to dotted names with string values (MLflow parameters)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = str(value)[:500]
    return flat


def round_values(metrics: Any) -> dict[str, float]:
    """The tracked values of one round's ``RoundMetrics``: means over participants where measured."""
    values = {}
    for name in ROUND_METRICS:
        array = getattr(metrics, name, None)
        if array is not None:
            values[name] = float(np.mean(array))
    if getattr(metrics, "consensus_distance", None) is not None:
        values["consensus_distance"] = float(metrics.consensus_distance)
    return values


def summaries(out: Path) -> list[tuple[str, float, int]]:
    """(name, value, step) of the influence and detection summaries of the run in ``out``, where computed."""
    import pyarrow.parquet as pq

    rows: list[tuple[str, float, int]] = []
    if (out / "dice.parquet").exists():
        dice = pq.read_table(out / "dice.parquet").to_pandas()
        for column in DICE_COLUMNS:
            if column in dice and dice[column].notna().any():
                for hops, value in dice.groupby("hops")[column].apply(lambda v: v.abs().mean()).items():
                    if np.isfinite(value):
                        rows.append((f"dice/mean_abs_{column}", float(value), int(hops)))
    if (out / "proximal.parquet").exists():
        from sklearn.metrics import roc_auc_score

        proximal = pq.read_table(out / "proximal.parquet",
                                 columns=["round", "cumulative_score", "neighbor_is_anomalous"]).to_pandas()
        for t, part in proximal.groupby("round"):
            labels = part["neighbor_is_anomalous"].to_numpy()
            if 0 < labels.sum() < len(labels):
                rows.append(("detection/proximal_auc", float(roc_auc_score(labels, part["cumulative_score"])), int(t)))
    return rows


class EventFile:
    """A TensorBoard event file in ``logdir``, written as events come: tensorboardX's ``SummaryWriter`` hands them
    to a thread, and its ``flush`` does not wait for that thread, so a SIGKILL lost the rounds flushed last.
    ``purge_step``: TensorBoard hides the earlier files' events of this step and later (a resume logs the rounds
    after its checkpoint again)."""

    def __init__(self, logdir: Path, purge_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        logdir.mkdir(parents=True, exist_ok=True)
        # TensorBoard reads a folder's event files in name order, and a later file's purge applies to the earlier ones
        # only: a name led by the time in ns sorts in the order written (and after tensorboardX's, led by seconds)
        self.events = EventsWriter(str(logdir / f"events.out.tfevents.{time.time_ns()}"), f".{os.getpid()}")
        if purge_step is not None:
            self.events.write_event(Event(step=purge_step, wall_time=time.time(),
                                          session_log=SessionLog(status=SessionLog.START)))

    def add_scalar(self, name: str, value: float, step: int) -> None:
        """Write ``value`` of scalar ``name`` at ``step`` (the round) to the event file, at once."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        self.events.write_event(Event(summary=scalar(name, value), step=step, wall_time=time.time()))

    def flush(self) -> None:
        """Flush the event file to disk."""
        self.events.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.events.close()


class Tracker:
    """The trackers of one run; ``on_round`` is a ``simulate`` callback, ``finish`` logs summaries and closes.

    With no tracker configured every method does nothing, so ``simulate`` calls them unconditionally. ``start``: the
    first round this session runs (a resume's: TensorBoard drops what an earlier session logged from there on, and
    MLflow's run of this directory and host goes on, from the round after the last it holds, with its parameters).
    ``checkpoint_every``: MLflow's batched values are sent at each checkpoint round too (and at evaluation rounds),
    so a resume, which starts after its checkpoint, finds every round before it recorded."""

    def __init__(self, logs: list[str], out: Path, config: dict[str, Any] | None = None,
                 uri: str | None = None, start: int = 0, checkpoint_every: int = 0):
        self.out = Path(out)
        self.writer: Any = None
        self.client: Any = None
        self.run_id: str | None = None
        self._pending: list[Any] = []
        self._last: float | None = None  # the previous round's end (the first round's rate would count start-up)
        self._logged = start - 1  # the last round sent: a round replayed after a recovery is not sent again
        self._mlflow_from = start  # a continued MLflow run's first round not yet held
        self.checkpoint_every = checkpoint_every
        if "tensorboard" in logs:
            self.writer = EventFile(self.out / "tensorboard", start if start > 0 else None)
        if "mlflow" in logs:
            from mlflow.tracking import MlflowClient

            with quiet_mlflow():
                self.client = MlflowClient(tracking_uri(uri, self.out))
                experiment = self.client.get_experiment_by_name(EXPERIMENT)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
            tags = {"run_dir": str(self.out.resolve()), "host": platform.node()}
            wanted = {} if start > 0 else {"filter_string": "attributes.status = 'RUNNING'"}  # a new run: stale ones
            earlier = [r for r in self.client.search_runs([experiment_id], order_by=["attributes.start_time DESC"],
                                                          **wanted)
                       if all(r.data.tags.get(k) == v for k, v in tags.items())]  # this directory's, latest first
            if start > 0 and earlier:  # a resume continues the run's MLflow run, after the last round it holds
                self.run_id = earlier[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                held = self.client.get_metric_history(self.run_id, "train_loss")
                self._mlflow_from = max([start, *[m.step + 1 for m in held]])
            # An earlier session of this run directory that is still RUNNING was killed (SIGKILL, power): this
            # process holds the directory's lock, so no other writes it. Said so, instead of RUNNING for ever.
            for stale in earlier:
                if stale.info.status == "RUNNING" and stale.info.run_id != self.run_id:
                    self.client.set_terminated(stale.info.run_id, status="KILLED")
            if self.run_id is None:
                self.run_id = self.client.create_run(experiment_id, run_name=self.out.name, tags=tags).info.run_id
                if config:
                    self._log_params(flat_params(config))

    @property
    def active(self) -> bool:
        """Whether the run logs to any tracker."""
        return self.writer is not None or self.client is not None

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, name: str, value: float, step: int, mlflow: bool = True) -> None:
        """Send one scalar to every tracker (MLflow's are batched until ``flush``; not to MLflow if not ``mlflow``)."""
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)
        if self.client is not None and mlflow:
            from mlflow.entities import Metric

            self._pending.append(Metric(name, value, int(time.time() * 1000), step))

    def flush(self) -> None:
        """Flush TensorBoard's events and send MLflow the metrics held since the last flush."""
        if self.writer is not None:
            self.writer.flush()
        if self.client is not None:
            for i in range(0, len(self._pending), 1000):
                self.client.log_batch(self.run_id, metrics=self._pending[i:i + 1000])
            self._pending = []

    def on_round(self, metrics: Any, engine: Any = None) -> None:
        """Log round t's values (see the module docstring), once: a round replayed after a lost actor was sent
        before, with the same numbers. TensorBoard's are on disk at once; MLflow's are sent at evaluation rounds
        (visible as the run goes) and checkpoint rounds."""
        now = time.time()
        if not self.active or metrics.round <= self._logged:
            self._last = now
            return
        values = round_values(metrics)
        if self._last is not None:
            values["rounds_per_second"] = 1.0 / max(now - self._last, 1e-9)
        self._last, self._logged = now, metrics.round
        for name, value in values.items():
            self.log(name, value, metrics.round, mlflow=metrics.round >= self._mlflow_from)
        every = self.checkpoint_every
        if metrics.heldout_acc is not None or (every > 0 and (metrics.round + 1) % every == 0):
            self.flush()
        elif self.writer is not None:
            self.writer.flush()

    def chain(self, callback: Callable[[Any, Any], None] | None) -> Callable[[Any, Any], None] | None:
        """Return one ``on_round`` callback calling this tracker, then the user's ``callback``."""
        if not self.active:
            return callback

        def both(metrics: Any, engine: Any) -> None:
            self.on_round(metrics, engine)
            if callback is not None:
                callback(metrics, engine)

        return both

    def finish(self, status: str = "FINISHED") -> None:
        """Log the run's summaries (on success) and close every tracker with ``status``."""
        if not self.active:
            return
        if status == "FINISHED":
            for name, value, step in summaries(self.out):
                self.log(name, value, step)
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.client is not None:
            self.client.set_terminated(self.run_id, status=status)
            self.client = None


def open_tracker(config: Any, out: Path, start: int = 0) -> Tracker:
    """The ``Tracker`` of a ``RunConfig`` (``output.log``, ``output.tracking_uri``) for run directory ``out``, whose
    session runs from round ``start``."""
    return Tracker(list(config.output.log), out, config.recorded() if config.output.log else None,
                   config.output.tracking_uri, start, config.output.checkpoint_every)
