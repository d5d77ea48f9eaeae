"""Chaos: long runs with every method on, on 3 participant-group actors, while a seeded schedule kills a random
group actor (or the coordinator) every few rounds. Every table equals an undisturbed run's to 1e-6.

The ledger and in-loop DICE-E need the static topology's path weights, and collaborator selection changes W, so
the config refuses them together: one run has proximal influence, the ledger and in-loop DICE-E, the other
proximal influence and collaborator selection. Each kill is injected once (a replayed round is not killed again).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
from oracles import assert_same_tables

import dice_ray

pytestmark = [pytest.mark.chaos, pytest.mark.slow]  # about 2-4 minutes each: python -m pytest -q -m slow

BASE = {"nodes": 9, "seed": 7, "data": {"dataset": "digits", "heldout_size": 64}, "optim": {"batch_size": 8},
        "proximal": {"enabled": True, "zprime": "heldout"},
        "engine": {"actors": 3, "max_recoveries": 100, "restart_timeout": 120},
        "output": {"progress": False, "eval_every": 10, "checkpoint_every": 8}}
MEASURING = {"rounds": 160, "ledger": {"enabled": True, "hops": 2, "every": 5},
             "influence": {"enabled": True, "online": True, "ground_truth": False, "hops": 2, "every": 23,
                           "sample_sources": 2}}
REWIRING = {"rounds": 120, "rewiring": {"mode": "outlier", "every": 12, "keep": 3},
            "misbehavior": {"kind": "label-flip", "count": 2}}


def _schedule(seed: int, rounds: int, every: int, targets: int) -> dict[int, int]:
    """Round -> which actor to kill after it (seeded): one kill every ``every`` rounds on average."""
    rng = np.random.default_rng(seed)
    kills = np.sort(rng.choice(np.arange(3, rounds - 2), size=rounds // every, replace=False))
    return {int(t): int(rng.integers(targets)) for t in kills}


def _tables(run: dice_ray.Run) -> dict[str, pd.DataFrame]:
    return {name: run.table(name) for name in run.tables() if name != "nodes"}


def _chaos(config: dice_ray.RunConfig, schedule: dict[int, int], coordinator: bool) -> tuple[dice_ray.Run, float]:
    pending = dict(schedule)

    def strike(metrics, engine) -> None:
        if metrics.round in pending:
            target = pending.pop(metrics.round)
            ray.kill(engine.coordinator if coordinator else engine.groups[target], no_restart=False)

    started = time.monotonic()
    run = dice_ray.run(config, on_round=strike)
    assert not pending, f"kills not injected: {pending}"
    return run, time.monotonic() - started


@pytest.mark.parametrize(("name", "changes", "coordinator"), [("measuring", MEASURING, False),
                                                              ("rewiring", REWIRING, True)])
def test_every_table_survives_repeated_failures(ray_local, tmp_path: Path, name: str, changes: dict,
                                                coordinator: bool) -> None:
    config = dice_ray.as_config(BASE, **changes, output={"out": str(tmp_path / "chaos")})
    schedule = _schedule(11, config.rounds, 20, 1 if coordinator else 3)
    reference = dice_ray.run(config.model_copy(update={"output": config.output.model_copy(
        update={"out": str(tmp_path / "undisturbed")})}))
    run, seconds = _chaos(config, schedule, coordinator)
    recoveries = run.manifest["recoveries"]
    assert len(recoveries) == len(schedule) >= 6
    assert all(r["restored_from_round"] >= r["failed_in_round"] - 9 for r in recoveries)  # at most 8 rounds lost
    assert_same_tables(_tables(run), _tables(reference))
    print(f"\n{name}: {len(schedule)} {'coordinator' if coordinator else 'group'} kills over {config.rounds} "
          f"rounds, {seconds:.0f} s (undisturbed {reference.manifest['wall_seconds']:.0f} s)")
