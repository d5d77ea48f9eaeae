"""The round loop of a run: metrics into tables, checkpoints every K rounds, recovery from lost actors.

``train`` drives an engine (``RayEngine`` or ``LocalEngine``) from round ``start`` to the last round. Every
``output.checkpoint_every`` rounds the engine snapshots the participants' state with the round's results;
the rows of the tables so far and then the state are written (``checkpoint.py``). If an actor or a
machine is lost, Ray restarts the actor, every group is restored from the newest checkpoint (or the
initial state before the first one), the rows after it are dropped, and the rounds since are replayed:
the run finishes with the numbers an undisturbed run computes. Non-finite losses or parameters stop the
run (``FloatingPointError``) with the round and the participants named.

``Drivers`` holds the driver halves of the run's methods (``hooks.DriverHook``): every round's records go to
them, the rows they return to the tables, and their accumulated state into every checkpoint. Rounds run in
segments that end before each round a method changes W (collaborator selection), so its driver holds every
record up to the round a new W^t is chosen for.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dice_ray.checkpoint import CheckpointStore, RoundTables
from dice_ray.config import RunConfig
from dice_ray.engine.metrics import RoundMetrics, RoundPlan
from dice_ray.engine.ray_engine import ACTOR_FAILURES
from dice_ray.errors import first_line
from dice_ray.hooks import DriverHook, Method

FLUSH_ROWS = 1 << 20  # rows buffered in memory before they go to a part file between checkpoints
FLUSH_SECONDS = 10.0  # and seconds: a reader following a running run (``open_run``) sees rows at least this often


@dataclass
class TrainingReport:
    """What happened in ``train``: the last round's metrics and every recovery from a failure."""

    last: RoundMetrics | None = None
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: int = 0


class Drivers:
    """The driver halves of a run's methods (``hooks.DriverHook``), by name, in method order: what the driver
    accumulates over rounds beside the tables. Saved with each checkpoint (``state``) and restored with it."""

    def __init__(self, experiment: Any, methods: list[Method]):
        self.by_name: dict[str, DriverHook] = {m.name: m.driver(experiment) for m in methods if m.driver is not None}
        for driver in self.by_name.values():
            driver.setup(self.by_name)

    def tables(self) -> dict[str, Any]:
        """The per-round tables of every method (name -> schema)."""
        return {name: schema for d in self.by_name.values() for name, schema in d.tables.items()}

    def record(self, metrics: RoundMetrics, tables: RoundTables) -> None:
        """Hand every method its round's records (combined over blocks); append the rows it returns, each table's
        checked against its schema first (``check_rows``)."""
        for name, driver in self.by_name.items():
            try:
                combined = driver.combine(metrics.records.get(name, []))
            except (KeyError, ValueError) as err:
                raise ValueError(f"method {name!r}, round {metrics.round}: its blocks' records do not combine "
                                 f"({type(err).__name__}: {err}); every block's record needs the same keys") from err
            rows = driver.on_round(metrics.round, combined)
            for table, columns in rows.items():
                check_rows(name, metrics.round, table, columns, driver.tables)
                tables.append(table, columns)

    def state(self) -> dict[str, np.ndarray]:
        """Every driver's ``state()``, keys prefixed by the method name (``proximal.sums``, …)."""
        return {f"{name}.{key}": value for name, d in self.by_name.items() for key, value in d.state().items()}

    def load_state(self, arrays: dict[str, np.ndarray] | None) -> None:
        """Set every driver from ``state()``'s arrays (None: the initial state)."""
        arrays = arrays or {}
        for name, driver in self.by_name.items():
            prefix = f"{name}."
            driver.load_state({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})

    def impose_mixing(self, engine: Any) -> None:
        """After a restore: hand the engine the W any method imposes now."""
        for driver in self.by_name.values():
            w = driver.mixing()
            if w is not None:
                engine.set_mixing_matrix(w)

    def segments(self, plans: Iterator[RoundPlan]) -> Iterator[list[RoundPlan]]:
        """Split ``plans`` before every round a method changes W (one segment without such a method)."""
        segment: list[RoundPlan] = []
        for plan in plans:
            if segment and any(d.due(plan.t) for d in self.by_name.values()):
                yield segment
                segment = []
            segment.append(plan)
        if segment:
            yield segment

    def before(self, t: int, engine: Any) -> None:
        """Before round t (a segment's first): the methods due then choose W (every earlier round's records are
        in by now)."""
        for driver in self.by_name.values():
            if driver.due(t):
                w = driver.before_round(t)
                if w is not None:
                    engine.set_mixing_matrix(w)

    def finish(self) -> list[tuple[str, Any, Any]]:
        """(table name, rows, schema) of every table the methods write once, after the last round."""
        out = []
        for driver in self.by_name.values():
            schemas = driver.finish_schemas()
            out += [(name, rows, schemas[name]) for name, rows in driver.finish().items()]
        return out

    def summary(self) -> dict[str, Any]:
        """Every method's facts for the manifest."""
        return {key: value for d in self.by_name.values() for key, value in d.summary().items()}


def check_rows(method: str, t: int, table: str, columns: Any, schemas: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the method, round and table if the rows a driver returned for ``table`` are not
    what its schema declares: a table it does not declare, a schema column missing or one it does not have, or
    columns of different lengths (instead of Arrow's or a KeyError's message, which name none of them)."""
    where = f"method {method!r}, round {t}, table {table!r}"
    if table not in schemas:
        raise ValueError(f"{where}: not one of the tables the method declares ({', '.join(schemas) or 'none'})")
    if not isinstance(columns, Mapping):
        raise ValueError(f"{where}: rows must be a mapping of column name -> values, got {type(columns).__name__}")
    names = schemas[table].names
    missing, extra = [c for c in names if c not in columns], [c for c in columns if c not in names]
    if missing or extra:
        raise ValueError(f"{where}: the rows' columns are not the schema's (missing: {', '.join(missing) or '-'}; "
                         f"not in the schema: {', '.join(map(str, extra)) or '-'})")
    lengths = {c: len(columns[c]) for c in names}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{where}: columns of different lengths ("
                         + ", ".join(f"{c} {n}" for c, n in lengths.items()) + ")")


def schedule(config: RunConfig, start: int) -> Iterator[RoundPlan]:
    """Return the plans of rounds ``start``..T−1: evaluate every ``eval_every`` rounds and after the last;
    snapshot every ``checkpoint_every`` rounds (not after the last: the tables are final then)."""
    rounds, every, ckpt = config.rounds, config.output.eval_every, config.output.checkpoint_every
    for t in range(start, rounds):
        last = t == rounds - 1
        yield RoundPlan(t, (t + 1) % every == 0 or last, ckpt > 0 and (t + 1) % ckpt == 0 and not last)


def round_rows(metrics: RoundMetrics, n: int) -> dict[str, list]:
    """Return round ``metrics`` as the N rows of ``rounds.parquet`` (None where not evaluated)."""
    values: dict[str, list] = {"round": [metrics.round] * n, "node": list(range(n)),
                               "train_loss": metrics.train_loss.tolist(),
                               "consensus_distance": [metrics.consensus_distance] * n}
    for key in ("val_loss", "val_acc", "heldout_loss", "heldout_acc"):
        array = getattr(metrics, key)
        values[key] = [None] * n if array is None else array.tolist()
    return values


def check_finite(metrics: RoundMetrics) -> None:
    """Raise ``FloatingPointError`` naming the round and participants if a loss or parameter is not finite."""
    bad = np.flatnonzero(~np.isfinite(metrics.train_loss))
    if len(bad):
        raise FloatingPointError(f"round {metrics.round}: non-finite training loss at participants "
                                 f"{bad[:5].tolist()}{' …' if len(bad) > 5 else ''}")
    if metrics.consensus_distance is not None and not np.isfinite(metrics.consensus_distance):
        raise FloatingPointError(f"round {metrics.round}: non-finite parameters (consensus distance is "
                                 f"{metrics.consensus_distance})")


def train(engine: Any, config: RunConfig, tables: RoundTables, store: CheckpointStore, drivers: Drivers,
          start: int = 0, on_round: Callable[[RoundMetrics, Any], None] | None = None, bar: Any = None,
          report: TrainingReport | None = None) -> TrainingReport:
    """Run rounds ``start``..T−1 on ``engine`` (its state, and ``drivers``, are those after round ``start``−1);
    see the module docstring. ``on_round(metrics, engine)`` is called after each round's rows are recorded;
    ``bar`` is a tqdm bar; ``report`` (returned) collects the recoveries, also when an exception ends the run.
    """
    n = config.nodes
    report = report if report is not None else TrainingReport()
    initial = drivers.state() if start == 0 else None  # restored after a failure before any checkpoint
    flushed = time.monotonic()
    while start < config.rounds:
        seen = start - 1
        try:
            for m in _rounds(engine, drivers, schedule(config, start)):
                check_finite(m)
                tables.append("rounds", round_rows(m, n))
                drivers.record(m, tables)
                if m.snapshot is not None:
                    tables.commit(m.round)
                    store.save(m.round, m.snapshot, drivers.state(), tables.part_digests())
                    m.snapshot = None  # on disk now: let its memory (object-store pages, for Ray) go before the next
                    report.checkpoints += 1
                    flushed = time.monotonic()
                elif tables.buffered_rows() >= FLUSH_ROWS or time.monotonic() - flushed >= FLUSH_SECONDS:
                    tables.commit(m.round)
                    flushed = time.monotonic()
                report.last, seen = m, m.round
                if bar is not None:
                    post = {"loss": f"{m.train_loss.mean():.4f}"}
                    if m.heldout_acc is not None:
                        post["acc"] = f"{m.heldout_acc.mean():.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update()
                if on_round is not None:
                    on_round(m, engine)
            start = config.rounds
        except (FloatingPointError, KeyboardInterrupt):  # the rounds done: a diverged run's curve, kept
            tables.rollback(seen)  # (an interrupted round's rows, some recorded) ...
            tables.commit(seen)  # ... and a resume rolls back to its checkpoint
            raise
        except ACTOR_FAILURES as err:
            if len(report.recoveries) >= config.engine.max_recoveries:
                raise RuntimeError(f"round {seen + 1}: {first_line(err, named=True)[:300]}; gave up after "
                                   f"{len(report.recoveries)} recoveries (engine.max_recoveries)") from err
            latest = store.latest()
            restored = latest.round if latest is not None else -1
            engine.restore(latest.load() if latest is not None else None, config.engine.restart_timeout)
            drivers.load_state(latest.load_driver_state() if latest is not None else initial)
            drivers.impose_mixing(engine)
            tables.rollback(restored)
            recovery = {"failed_in_round": seen + 1, "error": first_line(err, named=True)[:300],
                        "restored_from_round": restored, "replayed_rounds": [restored + 1, seen + 1],
                        "time": dt.datetime.now(dt.timezone.utc).isoformat()}
            report.recoveries.append(recovery)
            print(f"warning: round {seen + 1} failed ({recovery['error']}); restored the state after round "
                  f"{restored} and replaying rounds {restored + 1}..{seen + 1}", file=sys.stderr)
            if bar is not None:
                bar.n = restored + 1
                bar.refresh()
            start = restored + 1
    return report


def _rounds(engine: Any, drivers: Drivers, plans: Iterator[RoundPlan]) -> Iterator[RoundMetrics]:
    """The engine's rounds, segment by segment (rewiring W^t between segments)."""
    for segment in drivers.segments(plans):
        drivers.before(segment[0].t, engine)
        yield from engine.run_rounds(segment)

