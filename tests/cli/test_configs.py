"""Every shipped config is valid and resolves to a runnable experiment (data, topology, batch sizes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dice_ray.config import build_config, load_config
from dice_ray.errors import InputError
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


def test_the_docs_config_and_sweep_paths_work_from_any_working_directory(tmp_path, monkeypatch, capsys):
    """The docs' commands name configs/NAME.yaml and sweeps/NAME.yaml: from another folder they said 'does not
    exist'. Such a path (or the bare name) is the bundled file where no such file is here; a file here wins."""
    from dice_ray.cli.simulate import build_parser, resolve_config
    from dice_ray.cli.sweep import main as sweep

    monkeypatch.chdir(tmp_path)
    for given in ("configs/anomaly-proximal.yaml", "anomaly-proximal"):
        assert resolve_config(build_parser().parse_args(["--config", given])).nodes == 64
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "anomaly-proximal.yaml").write_text("nodes: 5\n")  # the user's own, here
    assert resolve_config(build_parser().parse_args(["--config", "configs/anomaly-proximal.yaml"])).nodes == 5
    with pytest.raises(InputError, match="config file 'other/default.yaml' does not exist"):
        resolve_config(build_parser().parse_args(["--config", "other/default.yaml"]))  # not named as the repo's
    (tmp_path / "file").write_text("")
    assert sweep(["sweeps/lr_batch.yaml", "--out", str(tmp_path / "file" / "x")]) == 2  # found: then refused for
    assert "sweep out" in capsys.readouterr().err  # its out (a file in the way), not for a missing sweep file


def test_a_bundled_sweep_reads_the_same_base_from_any_working_directory(tmp_path, monkeypatch):
    """Its base.config (configs/alignment.yaml, as the repository's sweeps name theirs) used to be read relative to
    the working directory only: from a notebook in docs/ the sweep did not load. A base config beside the sweep file
    is found too."""
    from dice_ray.sweep import bundled_sweep, load_sweep

    root = load_sweep(bundled_sweep("lr_batch"))
    monkeypatch.chdir(tmp_path)
    assert load_sweep(bundled_sweep("lr_batch.yaml")).base == root.base
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "mine.yaml").write_text("nodes: 6\nrounds: 3\n")
    sweep = tmp_path / "elsewhere" / "sweep.yaml"
    sweep.write_text("out: s\nbase: {config: mine.yaml}\nspace: {optim.lr: {grid: [0.1, 0.2]}}\n")
    assert load_sweep(sweep).base["nodes"] == 6
    with pytest.raises(InputError, match=r"no bundled sweep 'nope'.*lr_batch"):
        bundled_sweep("nope")


@pytest.mark.parametrize(("fields", "message"), [
    ({"nodez": 3}, "config: unknown key 'nodez' (did you mean 'nodes'?)"),
    ({"optim": {"lrr": 0.1}}, "config: unknown key 'optim.lrr' (did you mean 'lr'?)"),
    ({"data": {"shrink": {"fractin": 0.1}}}, "config: unknown key 'data.shrink.fractin' (did you mean 'fraction'?)"),
    ({"optim": {"colour": "red"}}, "config: unknown key 'optim.colour'"),
    ({"model": {"name": "resnet19"}}, "config: model.name: model 'resnet19' is unknown; choose one of "),
])
def test_a_config_built_in_python_names_what_is_wrong_and_what_was_meant(fields: dict, message: str) -> None:
    """As the command line does: an unknown key with the closest known one, and an unknown model when the config is
    built (it used to pass until the run built the model)."""
    with pytest.raises(InputError) as err:
        build_config(fields)
    assert str(err.value).startswith(message) and str(err.value).count("(did you mean") <= 1
    if "colour" in message:
        assert "did you mean" not in str(err.value)
