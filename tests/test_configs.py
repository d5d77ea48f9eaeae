"""Every shipped config is valid and resolves to a runnable experiment (data, topology, batch sizes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dice_ray.config import build_config, load_config
from dice_ray.experiment import prepare
from dice_ray.methods.dice.probes import select_probes

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_is_valid_and_prepares(path: Path) -> None:
    config = build_config(load_config(path))
    experiment = prepare(config)
    assert experiment.nodes == config.nodes
    if config.influence.enabled:
        probes = select_probes(config)
        assert probes and max(p.round for p in probes) + config.influence.hops <= config.rounds - 1
