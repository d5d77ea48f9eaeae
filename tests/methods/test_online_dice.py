"""In-loop DICE-E (``influence.online``): the perturbations travel with the training run, through the groups'
gossip and their checkpoints, and give the numbers of the recursion on replayed windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from oracles import BATCHNORM_MLP, config_from

from dice_ray.errors import InputError
from dice_ray.runner import simulate

# 8-node ring, momentum (so the optimizer state is perturbed too), probes in rounds 1, 2 and 4 over 3 hops,
# whole batches and one single sample each: rounds 2..7 carry perturbations of several probes at once.
BASE = {"nodes": 8, "rounds": 8, "seed": 3, "topology": {"name": "ring"},
        "data": {"dataset": "digits", "heldout_size": 64},
        "optim": {"name": "momentum", "lr": 0.05, "momentum": 0.9, "batch_size": 16},
        "influence": {"enabled": True, "hops": 3, "rounds": [1, 2, 4], "probe_samples": 1},
        "output": {"progress": False, "eval_every": 4}}
ESTIMATES = ("est_first_order", "est_curvature")


def config(out: Path, **changes) -> object:
    return config_from(BASE, out, **changes)


def tables(run: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(run / f"{name}.parquet") for name in ("influence", "dice")}


@pytest.fixture(scope="module")
def replayed(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """The reference: DICE-GT and DICE-E measured on windows replayed after training."""
    return tables(simulate(config(tmp_path_factory.mktemp("replayed")), engine_kind="local"))


def assert_same_estimates(got: dict[str, pd.DataFrame], want: dict[str, pd.DataFrame],
                          estimates: tuple[str, ...] = ESTIMATES) -> None:
    for name, table in want.items():
        mine = got[name]
        assert list(mine.columns) == list(table.columns) and len(mine) == len(table)
        keys = [c for c in table.columns if c not in ("gt", *estimates) and not c.endswith(("_hop", "_horizon"))]
        pd.testing.assert_frame_equal(mine[keys], table[keys])  # the same probes, targets, steps, supports
        for column in [c for c in table.columns if c.startswith(estimates)]:
            scale = np.abs(table[column].to_numpy()).max()
            assert np.abs(mine[column].to_numpy() - table[column].to_numpy()).max() <= 1e-5 * scale, column


# None: the local engine; 3 actors (~16 s) is left to the slow run, so the default keeps CI under 20 minutes
@pytest.mark.parametrize("actors", [None, 1, pytest.param(3, marks=pytest.mark.slow)])
def test_in_loop_estimates_equal_the_replayed_ones(replayed, ray_local, tmp_path: Path, actors: int | None) -> None:
    changes = {"influence__online": True}
    if actors is not None:
        changes["engine__actors"] = actors
    run = simulate(config(tmp_path / "online", **changes), engine_kind="local" if actors is None else "ray")
    got = tables(run)
    assert_same_estimates(got, replayed)
    # DICE-GT still comes from replays, filled in beside the in-loop estimates
    pd.testing.assert_frame_equal(got["influence"][["gt"]], replayed["influence"][["gt"]])
    # curvature differs from first-order from the second step on (the Jacobian is not the identity)
    later = got["influence"][got["influence"]["step"] >= 2]
    assert (later["est_curvature"] != later["est_first_order"]).mean() > 0.9


def test_in_loop_without_ground_truth_leaves_it_empty(replayed, tmp_path: Path) -> None:
    run = simulate(config(tmp_path / "e", influence__online=True, influence__ground_truth=False), engine_kind="local")
    got = tables(run)
    assert got["influence"]["gt"].isna().all() and got["dice"]["gt"].isna().all()
    assert_same_estimates(got, replayed)


@pytest.mark.slow  # CI's default run stays under 20 minutes; python -m pytest -q -m slow runs it
def test_perturbations_in_flight_survive_a_lost_group(ray_local, tmp_path: Path) -> None:
    """A group killed at round 5 is restored from the checkpoint after round 4, when the probes of rounds 2
    and 4 are in flight: their perturbations come back with it and the tables equal an undisturbed run's."""
    common = {"influence__online": True, "engine__actors": 2, "output__checkpoint_every": 5}
    undisturbed = simulate(config(tmp_path / "a", **common))

    def kill(metrics, engine) -> None:
        import ray

        if metrics.round == 5 and engine.epoch == 1:
            ray.kill(engine.groups[1], no_restart=False)

    disturbed = simulate(config(tmp_path / "b", **common), on_round=kill)
    [recovery] = json.loads((disturbed / "manifest.json").read_text())["recoveries"]
    assert recovery["restored_from_round"] == 4
    for name, table in tables(undisturbed).items():
        pd.testing.assert_frame_equal(tables(disturbed)[name], table)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])  # Adam: the perturbations carry j's lagging step counter
def test_interrupted_run_resumes_with_its_perturbations(optimizer: str, tmp_path: Path) -> None:
    optim = {"optim__name": optimizer, "optim__lr": 0.01 if optimizer == "adam" else BASE["optim"]["lr"]}
    cfg = config(tmp_path / "run", influence__online=True, output__checkpoint_every=3, **optim)

    def interrupt(metrics, engine) -> None:
        if metrics.round == 4:  # the checkpoint after round 2 holds the probes of rounds 1 and 2 in flight
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(cfg, engine_kind="local", on_round=interrupt)
    assert not (tmp_path / "run" / "influence.parquet").exists()
    simulate(cfg, engine_kind="local", resume=True)
    reference = simulate(config(tmp_path / "ref", influence__online=True, **optim), engine_kind="local")
    for name, table in tables(reference).items():
        pd.testing.assert_frame_equal(tables(tmp_path / "run")[name], table)


@pytest.mark.slow  # ~30 s (three runs and a 3-actor resume); the default run keeps CI under 20 minutes
def test_a_checkpoint_keeps_the_perturbations_where_the_cascades_reached(ray_local, tmp_path: Path) -> None:
    """A checkpoint saves one entry per (probe, participant its perturbation has reached), not a row per participant
    and probe in flight (92% zeros at N = 1,024), first-order δ as a scale per entry and Δ_j; a resume on 3 actors
    from the local engine's checkpoint ends with the tables of the run that was not stopped."""
    import hashlib
    import shutil

    from dice_ray.methods.dice.probes import select_probes

    cfg = config(tmp_path / "run", influence__online=True, output__checkpoint_every=3, output__keep_checkpoints=True)

    def interrupt(metrics, engine) -> None:
        if metrics.round == 4:  # the checkpoint after round 2 holds the probes of rounds 1 and 2 in flight
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(cfg, engine_kind="local", on_round=interrupt)
    [checkpoint] = sorted((tmp_path / "run" / "checkpoints").glob("round-*"))
    with np.load(checkpoint / "state.npz") as arrays:
        saved = {key: arrays[key] for key in arrays.files}
    owner, probe = saved["cascade.owner"], saved["cascade.probe"]
    assert np.all(np.diff(owner) >= 0) and len(set(zip(owner.tolist(), probe.tolist(), strict=True))) == len(owner)
    flying = [p for p in select_probes(cfg) if p.round <= 2]
    for p in flying:  # on the ring, after 2 - t + 1 hops: the source and that many neighbours on each side
        hops = 2 - p.round + 1
        reached = {(p.source + d) % 8 for d in range(-hops, hops + 1)}
        assert set(owner[probe == p.probe_id].tolist()) == reached, p
    assert len(owner) < 8 * len(flying) and saved["cascade.curvature"].shape == (len(owner), saved["state"].shape[1])

    shutil.copytree(tmp_path / "run", tmp_path / "earlier")
    reference = tables(simulate(config(tmp_path / "ref", influence__online=True), engine_kind="local"))
    simulate(config(tmp_path / "run", influence__online=True, output__checkpoint_every=3, engine__actors=3),
             engine_kind="ray", resume=True)
    assert_same_estimates(tables(tmp_path / "run"), reference)

    # The layout of earlier versions: a row per participant, a slot per probe in flight (cascade.ids, cascade.mask),
    # first-order δ as rows [P, A, D]. Its curvature perturbations would restore; its first-order rows cannot become
    # a scale and a direction exactly: refused in one line, before anything is written.
    earlier = tmp_path / "earlier" / "checkpoints" / checkpoint.name
    ids = np.array(sorted(p.probe_id for p in flying))
    slot = np.searchsorted(ids, probe)
    entries = {k: v for k, v in saved.items()
               if k.startswith("cascade.") and k not in ("cascade.owner", "cascade.probe")}
    entries["cascade.first-order"] = entries["cascade.first-order"][:, None] * entries.pop("cascade.direction")
    dense = {k: v for k, v in saved.items() if not k.startswith("cascade.")}
    dense["cascade.ids"] = np.tile(ids, (8, 1))
    dense["cascade.mask"] = np.zeros((8, len(ids)), bool)
    dense["cascade.mask"][owner, slot] = True
    for key, value in entries.items():
        dense[key] = np.zeros((8, len(ids), *value.shape[1:]), value.dtype)
        dense[key][owner, slot] = value
    with open(earlier / "state.npz", "wb") as f:
        np.savez(f, **dense)
    meta = json.loads((earlier / "meta.json").read_text())
    meta["sha256"]["state.npz"] = hashlib.sha256((earlier / "state.npz").read_bytes()).hexdigest()
    (earlier / "meta.json").write_text(json.dumps(meta))
    before = sorted(p.name for p in (tmp_path / "earlier").iterdir())
    with pytest.raises(InputError, match="first-order perturbations are rows, as versions before 2026-12-07 saved"):
        simulate(config(tmp_path / "earlier", influence__online=True, output__checkpoint_every=3), engine_kind="local",
                 resume=True)
    assert sorted(p.name for p in (tmp_path / "earlier").iterdir()) == before


def test_online_dice_without_influence_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dice_ray.cli.simulate import main

    code = main(["--engine", "local", "--dataset", "digits", "--nodes", "8", "--rounds", "8", "--online-dice",
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--influence" in err, err
    assert not (tmp_path / "x").exists()


def test_in_loop_with_time_varying_graph_adam_scaled_updates_and_validation_zprime(ray_local, tmp_path: Path) -> None:
    """Random matching (W changes every round), Adam (two optimizer-state perturbations), two participants
    sending 10x their update, z′ = each target's validation split; 2 actors against the replay; all three variants
    (second-order: b₀ of single samples under Adam, and its z′ Hessian forms on each target's own split)."""
    changes = {"topology__name": "random-matching", "optim__name": "adam", "optim__lr": 0.01,
               "misbehavior__kind": "scale", "misbehavior__count": 2, "data__val_fraction": 0.2,
               "influence__zprime": "validation", "influence__ground_truth": False,
               "influence__variants": ["first-order", "curvature", "second-order"]}
    replayed = tables(simulate(config(tmp_path / "replay", **changes), engine_kind="local"))
    online = tables(simulate(config(tmp_path / "online", influence__online=True, engine__actors=2, **changes)))
    assert_same_estimates(online, replayed, (*ESTIMATES, "est_second_order"))
    assert online["influence"]["est_second_order"].notna().all()


def test_in_loop_estimates_with_participants_that_hold_no_data(tmp_path: Path) -> None:
    """Participants 2 and 5 hold no data: in the round loop as on replayed windows they do not step (J = I), and
    their own probes are 0 by every estimate and by DICE-GT."""
    changes = {"data__shrink": {"ids": [2, 5], "fraction": 1.0}, "optim__name": "adam", "optim__lr": 0.01,
               "influence__variants": ["first-order", "curvature", "second-order", "exact-readout"]}
    estimates = (*ESTIMATES, "est_second_order", "est_exact_readout")
    replayed = tables(simulate(config(tmp_path / "replay", **changes), engine_kind="local"))
    online = tables(simulate(config(tmp_path / "online", influence__online=True, **changes), engine_kind="local"))
    assert_same_estimates(online, replayed, estimates)
    for table in (replayed["dice"], online["dice"]):
        idle = table[table["source"].isin([2, 5])]
        assert len(idle) and (idle[["gt", *estimates]].to_numpy() == 0).all()
        assert (table[~table["source"].isin([2, 5])]["gt"] != 0).all()


def test_in_loop_estimates_through_batchnorm_equal_the_replayed_ones(tmp_path: Path) -> None:
    """A model with BatchNorm: δ carries its running statistics (moved toward each later batch's, gossiped, read by
    the eval-mode z′ loss), in the loop as on replayed windows, with Adam and two participants sending 3x their
    update (their running statistics as stepped). Hop 1 of the exact readout is DICE-GT's."""
    changes = {"model__name": BATCHNORM_MLP, "optim__name": "adam", "optim__lr": 0.01, "influence__probe_samples": 0,
               "misbehavior__kind": "scale", "misbehavior__count": 2, "misbehavior__factor": 3.0,
               "influence__variants": ["first-order", "curvature", "second-order", "exact-readout"]}
    estimates = (*ESTIMATES, "est_second_order", "est_exact_readout")
    replayed = tables(simulate(config(tmp_path / "replay", **changes), engine_kind="local"))
    online = tables(simulate(config(tmp_path / "online", influence__online=True, **changes), engine_kind="local"))
    assert_same_estimates(online, replayed, estimates)
    one_hop = online["influence"][online["influence"]["step"] == 1]
    gt, exact = one_hop["gt"].to_numpy(), one_hop["est_exact_readout"].to_numpy()
    assert np.abs(exact - gt).max() <= 1e-3 * np.abs(gt).max()
