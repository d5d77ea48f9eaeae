"""Misbehaving participants: the injected effect is really there, for the chosen participants only."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dice_ray.cli.simulate import main as simulate
from dice_ray.config import build_config
from dice_ray.core.misbehavior import Misbehavior, Scale, register_misbehavior
from dice_ray.core.participants import ParticipantBlock
from dice_ray.errors import InputError
from dice_ray.experiment import prepare


def misbehaving_run(kind: str, **extra):
    config = build_config({"nodes": 6, "topology": {"name": "star"}, "data": {"dataset": "digits", "heldout_size": 32},
                           "optim": {"batch_size": 8},
                           "misbehavior": {"kind": kind, "count": 2, **extra}})
    experiment = prepare(config)
    ds, part = experiment.dataset, experiment.partition

    def block(misbehaving=experiment.misbehaving):
        return ParticipantBlock(config, np.arange(6), ds.x_train, ds.y_train, part.train, part.val,
                                experiment.heldout, ds.input_shape, ds.num_classes, misbehaving=misbehaving)

    return experiment, block


def sent_updates(block) -> tuple[torch.Tensor, torch.Tensor]:
    """The updates every participant sends at round 0 [6, D] with ``block``'s misbehaviour, and honestly."""
    bad, honest = block(), block(np.array([], np.int64))
    start = bad.population.params.clone()
    bad.half_step(0)
    honest.half_step(0)
    return bad.population.params - start, honest.population.params - start


def test_selection_random_ids_and_degree() -> None:
    experiment, _ = misbehaving_run("label-flip")
    assert len(experiment.misbehaving) == 2
    assert np.array_equal(experiment.misbehaving, misbehaving_run("label-flip")[0].misbehaving)  # seeded
    assert misbehaving_run("label-flip", selection="degree", count=1)[0].misbehaving.tolist() == [0]  # the star's hub
    assert misbehaving_run("scale", selection="ids", ids=[4, 1], count=None)[0].misbehaving.tolist() == [1, 4]
    assert misbehaving_run("label-flip", count=None, fraction=0.5)[0].misbehaving.size == 3


def test_label_flip_flips_the_chosen_participants_labels_only() -> None:
    experiment, block = misbehaving_run("label-flip")
    bad, honest = block(), block(np.array([], np.int64))
    for i in range(6):
        span = slice(bad.offsets[i], bad.offsets[i] + bad.counts[i])
        if i in experiment.misbehaving:
            assert torch.equal(bad.y_local[span], 9 - honest.y_local[span])
        else:
            assert torch.equal(bad.y_local[span], honest.y_local[span])
    half = misbehaving_run("label-flip", flip_fraction=0.5)[1]()
    i = int(experiment.misbehaving[0])
    span = slice(half.offsets[i], half.offsets[i] + half.counts[i])
    changed = (half.y_local[span] != honest.y_local[span]).float().mean()
    assert 0.3 < changed < 0.6  # half flipped (labels 4.5 <-> 4.5 cannot change, none exist)


def test_feature_noise_has_the_configured_scale() -> None:
    experiment, block = misbehaving_run("feature-noise", sigma=0.5)
    noisy, clean = block(), block(np.array([], np.int64))
    i = int(experiment.misbehaving[0])
    span = slice(noisy.offsets[i], noisy.offsets[i] + noisy.counts[i])
    assert (noisy.x_local[span] - clean.x_local[span]).std() == pytest.approx(0.5, rel=0.05)
    j = next(k for k in range(6) if k not in experiment.misbehaving)
    other = slice(noisy.offsets[j], noisy.offsets[j] + noisy.counts[j])
    assert torch.equal(noisy.x_local[other], clean.x_local[other])


@pytest.mark.parametrize(("kind", "factor"), [("free-ride", 0.0), ("sign-flip", -1.0), ("scale", 3.0)])
def test_corrupted_updates_are_c_times_the_honest_update(kind: str, factor: float) -> None:
    experiment, block = misbehaving_run(kind, factor=3.0)
    sent, honest_update = sent_updates(block)
    for k in range(6):
        expected = honest_update[k] * (factor if k in experiment.misbehaving else 1.0)
        torch.testing.assert_close(sent[k], expected, rtol=1e-5, atol=1e-7)
    if kind == "free-ride":
        assert (sent[experiment.misbehaving] == 0).all()


def test_ground_truth_labels_in_tables_and_manifest(tmp_path) -> None:
    out = tmp_path / "run"
    assert simulate(["--engine", "local", "--no-progress", "--dataset", "digits", "--nodes", "6", "--rounds", "3",
                     "--misbehavior", "sign-flip", "--misbehaving-ids", "2,5", "--misbehaving-selection", "ids",
                     "--out", str(out)]) == 0
    nodes = pd.read_parquet(out / "nodes.parquet")
    assert nodes.loc[nodes["misbehaving"], "node"].tolist() == [2, 5]
    assert '"misbehaving": [\n    2,\n    5\n  ]' in (out / "manifest.json").read_text()


def test_dice_flags_label_flippers_as_harmful(tmp_path) -> None:
    """configs/anomaly.yaml's setting (shorter): label flippers' minibatches raise their neighbours' loss, so
    their mean DICE is positive and ranks first, by ground truth and by the estimator alike."""
    out = tmp_path / "run"
    config = Path(__file__).resolve().parents[2] / "configs" / "anomaly.yaml"
    assert simulate(["--config", str(config), "--engine", "local", "--no-progress", "--rounds", "20",
                     "--set", "influence.last=5", "--set", "influence.variants=[first-order]",
                     "--out", str(out)]) == 0
    dice = pd.read_parquet(out / "dice.parquet")
    flippers = pd.read_parquet(out / "nodes.parquet").query("misbehaving")["node"].tolist()
    assert len(flippers) == 2
    for column in ("gt", "est_first_order"):
        mean = dice.groupby("source")[column].mean()
        assert sorted(mean.nlargest(2).index) == sorted(flippers)
        assert (mean[flippers] > 0).all() and (mean.drop(flippers) < 0).all()


def test_an_honest_block_reads_the_training_split_in_place_and_a_corrupting_one_never_writes_it() -> None:
    """Memory: without data corruption a block indexes the training split it was given (on a Ray node, the object
    store's array) instead of copying its rows; with corruption it corrupts a copy, leaving the split as it was."""
    experiment, block = misbehaving_run("label-flip")
    y_before = experiment.dataset.y_train.copy()
    honest = block(np.array([], np.int64))
    assert np.shares_memory(honest.x_data.numpy(), experiment.dataset.x_train)
    bad = block()
    assert not np.shares_memory(bad.x_data.numpy(), experiment.dataset.x_train)
    assert np.array_equal(experiment.dataset.y_train, y_before)
    assert not torch.equal(bad.y_local, honest.y_local)  # the flipped labels live in the copy


# -- kinds added with register_misbehavior ---------------------------------------------------------------------------

@register_misbehavior("test-target-label")
class TargetLabel(Misbehavior):
    """Every local label becomes ``target`` (a data kind with an option)."""

    def __init__(self, target: int = 0) -> None:
        if not 0 <= target <= 9:
            raise ValueError(f"target {target} is not a digit")
        self.target = target

    def corrupt(self, x, y, num_classes, rng):
        assert len(y) > 0, "corrupt was given a participant without data"
        y[:] = self.target
        return x, y


@register_misbehavior("test-by-participant")
class ByParticipant(Misbehavior):
    """Participant k sends θ + (k + 1)·scale·Δ (an update kind whose c differs by participant)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def factor(self, participant):
        return (participant + 1) * self.scale


@register_misbehavior("test-scale-copy")
class ScaleCopy(Misbehavior):
    """The built-in ``scale`` with c = 10, written as a user would."""

    def factor(self, participant):
        return 10.0


@register_misbehavior("test-scale-subclass")
class ScaleSubclass(Scale):
    """A subclass of a built-in kind: its options are its own (``misbehavior.options``), not the section's fields."""

    def __init__(self, factor: float = 10.0) -> None:
        if not isinstance(factor, (int, float)):
            raise TypeError(f"factor {factor!r} is not a number")
        super().__init__(factor)


@register_misbehavior("test-no-factor")
class NoFactor(Misbehavior):
    def factor(self, participant):
        return None


@register_misbehavior("test-wrong-shape")
class WrongShape(Misbehavior):
    def corrupt(self, x, y, num_classes, rng):
        return x[:1], y[:1]


def test_a_registered_data_kind_corrupts_the_chosen_participants_with_its_options() -> None:
    experiment, block = misbehaving_run("test-target-label", options={"target": 3})
    bad, honest = block(), block(np.array([], np.int64))
    for i in range(6):
        span = slice(bad.offsets[i], bad.offsets[i] + bad.counts[i])
        if i in experiment.misbehaving:
            assert (bad.y_local[span] == 3).all()
        else:
            assert torch.equal(bad.y_local[span], honest.y_local[span])
    assert torch.equal(bad.x_local, honest.x_local)


def test_a_registered_update_kind_sends_its_own_factor_per_participant() -> None:
    experiment, block = misbehaving_run("test-by-participant", options={"scale": 0.5})
    sent, honest = sent_updates(block)
    for k in range(6):
        c = (k + 1) * 0.5 if k in experiment.misbehaving else 1.0
        torch.testing.assert_close(sent[k], c * honest[k], rtol=1e-5, atol=1e-7)


def test_every_method_measures_a_registered_kind_as_the_built_in_one(tmp_path: Path) -> None:
    """A user's copy of ``scale`` (c = 10) gives the built-in's tables bit for bit: training, DICE-GT's replays,
    in-loop DICE-E, proximal influence and the ledger all follow the kind, not its name."""
    import dice_ray

    def tables(kind: str) -> dict[str, pd.DataFrame]:
        config = dice_ray.RunConfig(nodes=8, rounds=6, seed=1, topology={"name": "ring"},
                                    data={"dataset": "digits", "heldout_size": 64}, optim={"batch_size": 8},
                                    misbehavior={"kind": kind, "selection": "ids", "ids": [2, 5]},
                                    influence={"enabled": True, "hops": 2, "rounds": [2, 3], "online": True},
                                    proximal={"enabled": True}, ledger={"enabled": True, "hops": 1},
                                    output={"out": str(tmp_path / kind), "progress": False})
        run = dice_ray.run(config, engine="local")
        return {name: run.table(name) for name in ("rounds", "dice", "influence", "proximal", "contributions")}

    built_in, user = tables("scale"), tables("test-scale-copy")
    for name, table in built_in.items():
        pd.testing.assert_frame_equal(user[name], table, check_exact=True, obj=name)


@pytest.mark.parametrize(("section", "message"), [
    ({"kind": "test-target-label", "options": {"target": 12}}, "target 12 is not a digit"),
    ({"kind": "test-target-label", "options": {"colour": 1}}, "unexpected keyword argument 'colour'"),
    ({"kind": "label-flip", "options": {"fraction": 0.5}}, "built-in 'label-flip' takes misbehavior.flip_fraction"),
    ({"kind": "free-ride", "options": {"c": 0.5}}, "built-in 'free-ride' takes no options"),
    ({"kind": "test-by-participant", "factor": 3.0}, "misbehavior.factor is a built-in kind's option"),
    ({"kind": "test-scale-subclass", "options": {"factor": "high"}}, "misbehavior.options {'factor': 'high'}"),
    ({"kind": "none", "options": {"target": 1}}, "misbehavior.options need a misbehavior.kind"),
    ({"kind": "no-such-kind"}, "misbehaviour 'no-such-kind' is unknown; choose one of none, label-flip"),
])
def test_bad_kinds_and_options_are_refused_in_one_line(section: dict, message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)) as err:
        build_config({"nodes": 6, "misbehavior": {"count": 1, **section}})
    assert "\n" not in str(err.value)


def test_a_kind_that_changes_the_data_shape_is_refused() -> None:
    with pytest.raises(InputError, match=r"'test-wrong-shape' returned data of shapes \(1, 1, 8, 8\)"):
        misbehaving_run("test-wrong-shape")[1]()


def test_register_misbehavior_takes_a_misbehavior_subclass_and_no_built_in_name() -> None:
    for name in ("none", "scale"):
        with pytest.raises(ValueError, match=f"misbehaviour '{name}' is built in"):
            register_misbehavior(name)
    with pytest.raises(TypeError, match="takes a Misbehavior subclass"):
        register_misbehavior("test-function")(lambda x, y: (x, y))


def test_a_registered_kind_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert simulate(["--engine", "local", "--no-progress", "--dataset", "digits", "--nodes", "6", "--rounds", "2",
                     "--misbehavior", "test-target-label", "--misbehaving", "2",
                     "--set", "misbehavior.options.target=7", "--out", str(out)]) == 0
    manifest = (out / "manifest.json").read_text()
    assert '"kind": "test-target-label"' in manifest and '"target": 7' in manifest
    assert pd.read_parquet(out / "nodes.parquet")["misbehaving"].sum() == 2


def test_a_subclass_of_a_built_in_kind_takes_its_options() -> None:
    experiment, block = misbehaving_run("test-scale-subclass", options={"factor": 2.0})
    sent, honest = sent_updates(block)
    k = int(experiment.misbehaving[0])
    torch.testing.assert_close(sent[k], 2.0 * honest[k], rtol=1e-5, atol=1e-7)


def test_a_factor_that_is_no_number_is_refused_before_any_work() -> None:
    with pytest.raises(InputError, match=r"'test-no-factor': factor\(\d+\) returned None, not a finite number"):
        misbehaving_run("test-no-factor")


def test_options_must_be_json_values() -> None:
    with pytest.raises(InputError, match="misbehavior.options"):
        build_config({"nodes": 6, "misbehavior": {"kind": "test-by-participant", "count": 1,
                                                  "options": {"scale": np.float32(2)}}})


def test_a_participant_without_data_is_not_given_to_corrupt() -> None:
    """The kind sees n ≥ 1 samples (the docs' backdoor takes x.max(), which an empty array has not)."""
    config = build_config({"nodes": 6, "data": {"dataset": "digits", "heldout_size": 32,
                                                "shrink": {"ids": [2], "fraction": 1.0}},
                           "misbehavior": {"kind": "test-target-label", "selection": "ids", "ids": [2, 3]}})
    experiment = prepare(config)
    ds, part = experiment.dataset, experiment.partition
    block = ParticipantBlock(config, np.arange(6), ds.x_train, ds.y_train, part.train, part.val, experiment.heldout,
                             ds.input_shape, ds.num_classes, misbehaving=experiment.misbehaving)
    assert block.counts[2] == 0
    assert (block.y_local[block.offsets[3]: block.offsets[3] + block.counts[3]] == 0).all()
