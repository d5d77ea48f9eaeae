"""The round loop of a run: metrics into tables, checkpoints every K rounds, recovery from lost actors.

``train`` drives an engine (``RayEngine`` or ``LocalEngine``) from round ``start`` to the last round. Every
``output.checkpoint_every`` rounds the engine snapshots the participants' state with the round's results;
the rows of the tables so far and then the state are written (``checkpoint.py``). If an actor or a
machine is lost, Ray restarts the actor, every group is restored from the newest checkpoint (or the
initial state before the first one), the rows after it are dropped, and the rounds since are replayed:
the run finishes with the numbers an undisturbed run computes. Non-finite losses or parameters stop the
run (``FloatingPointError``) with the round and the participants named.

``OnlineState`` is what the driver accumulates over rounds beside the tables: the proximal-influence ledger
(``proximal.py``), the contribution ledger L[j→k] (``contributions.py``) and collaborator selection's current
graph and history (``rewiring.py``). It is saved with
each checkpoint and restored with it. Rounds run in segments that end before each rewiring, so the ledger
holds every score up to the round a new W^t is chosen for.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dice_ray.checkpoint import CheckpointStore, RoundTables
from dice_ray.config import RunConfig
from dice_ray.contributions import ContributionLedger
from dice_ray.engine.metrics import RoundMetrics, RoundPlan
from dice_ray.influence.online import CascadeRecorder, online_probes
from dice_ray.proximal import ProximalLedger
from dice_ray.rewiring import Rewirer

FLUSH_ROWS = 1 << 20  # rows buffered in memory before they go to a part file between checkpoints


@dataclass
class TrainingReport:
    """What happened in ``train``: the last round's metrics and every recovery from a failure."""

    last: RoundMetrics | None = None
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: int = 0


@dataclass
class OnlineState:
    """Driver-side state that evolves with the rounds (None where the run does not use it)."""

    ledger: ProximalLedger | None = None
    rewirer: Rewirer | None = None
    contributions: ContributionLedger | None = None
    cascades: CascadeRecorder | None = None  # in-loop DICE-E terms (influence.online)

    @classmethod
    def for_experiment(cls, experiment: Any) -> OnlineState:
        """Return the initial state of ``experiment`` (an ``experiment.Experiment``)."""
        config = experiment.config
        ledger = (ProximalLedger(config.nodes, experiment.q, experiment.misbehaving, config.proximal.window)
                  if config.proximal.enabled else None)
        rewirer = (Rewirer(config, experiment.topology.mixing_matrix(0), ledger)
                   if config.rewiring.mode != "none" else None)
        contributions = ContributionLedger(config.nodes, experiment.q) if config.ledger.enabled else None
        cascades = CascadeRecorder() if online_probes(config) else None
        return cls(ledger, rewirer, contributions, cascades)

    def record(self, metrics: RoundMetrics, tables: RoundTables) -> None:
        """Add a round's proximal scores to the ledger and its rows to the ``proximal`` table, and its
        contribution-ledger terms to L[j→k] and the ``contributions`` table."""
        if metrics.proximal is not None and self.ledger is not None:
            tables.append("proximal", self.ledger.rows(metrics.round, metrics.proximal))
        if metrics.ledger is not None and self.contributions is not None:
            tables.append("contributions", self.contributions.rows(metrics.round, metrics.ledger))
        if self.cascades is not None:
            self.cascades.add(metrics.cascade)

    def restore(self, saved: OnlineState) -> None:
        """Take every field of ``saved`` (a checkpoint's driver state)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(saved, f.name, None))

    def segments(self, plans: Iterator[RoundPlan]) -> Iterator[list[RoundPlan]]:
        """Split ``plans`` before every round collaborator selection rewires (one segment without it)."""
        segment: list[RoundPlan] = []
        for plan in plans:
            if self.rewirer is not None and self.rewirer.due(plan.t) and segment:
                yield segment
                segment = []
            segment.append(plan)
        if segment:
            yield segment

    def before(self, t: int, engine: Any) -> None:
        """Rewire before round t if it is due (every earlier round's scores are in the ledger by now)."""
        if self.rewirer is not None and self.rewirer.due(t):
            engine.set_mixing_matrix(self.rewirer.rewire(t))


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


def train(engine: Any, config: RunConfig, tables: RoundTables, store: CheckpointStore, online: OnlineState,
          start: int = 0, on_round: Callable[[RoundMetrics, Any], None] | None = None, bar: Any = None,
          report: TrainingReport | None = None) -> TrainingReport:
    """Run rounds ``start``..T−1 on ``engine`` (its state, and ``online``, are those after round ``start``−1);
    see the module docstring. ``on_round(metrics, engine)`` is called after each round's rows are recorded;
    ``bar`` is a tqdm bar; ``report`` (returned) collects the recoveries, also when an exception ends the run.
    """
    from dice_ray.engine.ray_engine import ACTOR_FAILURES

    n = config.nodes
    report = report if report is not None else TrainingReport()
    initial = copy.deepcopy(online) if start == 0 else None  # restored after a failure before any checkpoint
    while start < config.rounds:
        seen = start - 1
        try:
            for m in _rounds(engine, online, schedule(config, start)):
                check_finite(m)
                tables.append("rounds", round_rows(m, n))
                online.record(m, tables)
                if m.snapshot is not None:
                    tables.commit(m.round)
                    store.save(m.round, m.snapshot, online)
                    report.checkpoints += 1
                elif tables.buffered_rows() >= FLUSH_ROWS:
                    tables.commit(m.round)
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
        except ACTOR_FAILURES as err:
            if len(report.recoveries) >= config.engine.max_recoveries:
                raise RuntimeError(f"round {seen + 1}: {_one_line(err)}; gave up after "
                                   f"{len(report.recoveries)} recoveries (engine.max_recoveries)") from err
            latest = store.latest()
            restored = latest.round if latest is not None else -1
            engine.restore(latest.load() if latest is not None else None, config.engine.restart_timeout)
            saved = latest.load_driver_state() if latest is not None else copy.deepcopy(initial)
            online.restore(saved)
            if online.rewirer is not None:
                engine.set_mixing_matrix(online.rewirer.w)
            tables.rollback(restored)
            recovery = {"failed_in_round": seen + 1, "error": _one_line(err), "restored_from_round": restored,
                        "replayed_rounds": [restored + 1, seen + 1],
                        "time": dt.datetime.now(dt.timezone.utc).isoformat()}
            report.recoveries.append(recovery)
            print(f"warning: round {seen + 1} failed ({recovery['error']}); restored the state after round "
                  f"{restored} and replaying rounds {restored + 1}..{seen + 1}", file=sys.stderr)
            if bar is not None:
                bar.n = restored + 1
                bar.refresh()
            start = restored + 1
    return report


def _rounds(engine: Any, online: OnlineState, plans: Iterator[RoundPlan]) -> Iterator[RoundMetrics]:
    """The engine's rounds, segment by segment (rewiring W^t between segments)."""
    for segment in online.segments(plans):
        online.before(segment[0].t, engine)
        yield from engine.run_rounds(segment)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
