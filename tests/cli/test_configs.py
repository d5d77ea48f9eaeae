"""Every shipped config is valid and resolves to a runnable experiment (data, topology, batch sizes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dice_ray.config import build_config, load_config
from dice_ray.experiment import prepare
from dice_ray.methods.dice.probes import select_probes

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_is_valid_and_prepares(path: Path) -> None:
    config = build_config(load_config(path))
    experiment = prepare(config)
    assert experiment.nodes == config.nodes
    if config.influence.enabled:
        probes = select_probes(config)
        assert probes and max(p.round for p in probes) + config.influence.hops <= config.rounds - 1


def test_bundled_config_is_found_from_any_working_directory(tmp_path, monkeypatch):
    import dice_ray

    monkeypatch.chdir(tmp_path)  # not the repository root: "configs/..." does not exist here
    path = dice_ray.bundled_config("anomaly-proximal")
    assert path.is_absolute() and path == dice_ray.bundled_config("anomaly-proximal.yaml")
    assert dice_ray.RunConfig.model_validate(__import__("yaml").safe_load(path.read_text())).proximal.enabled
    with pytest.raises(dice_ray.InputError, match=r"no bundled config 'nope'.*anomaly-proximal"):
        dice_ray.bundled_config("nope")
