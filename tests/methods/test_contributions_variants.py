"""The contribution ledger's curvature and second-order variants (``ledger.variants``): every term equals the
replayed DICE-E recursion's (``estimator.estimate_cascade``, itself exact against forward-mode differentiation
of the replay: tests/methods/test_second_order.py), on the local engine and on 2 Ray actors, through a checkpoint; the
first-order column is untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from oracles import config_from

from dice_ray.runner import simulate

ALL = ["first-order", "curvature", "second-order"]
COLUMNS = {"first-order": ("influence", "est_first_order"), "curvature": ("influence_curvature", "est_curvature"),
           "second-order": ("influence_second_order", "est_second_order")}
# 8-node ring, momentum (the optimizer state is perturbed too, and stays with its owner), a participant that
# sends 3x its update (the Jacobian I + c(J − I)); ledger rounds 0, 2, 4 over R = 2 hops; the replayed estimator
# measures the probes of rounds 0 and 2 (the last ledger round is truncated by the end of the run).
BASE = {"nodes": 8, "rounds": 6, "seed": 3, "topology": {"name": "ring"},
        "data": {"dataset": "digits", "heldout_size": 64},
        "optim": {"name": "momentum", "lr": 0.05, "momentum": 0.9, "batch_size": 16},
        "misbehavior": {"kind": "scale", "selection": "ids", "ids": [2], "factor": 3.0},
        "ledger": {"enabled": True, "hops": 2, "every": 2, "variants": ALL},
        "output": {"progress": False, "eval_every": 3}}
KEYS = ["round", "probe_round", "step", "source", "target"]


def config(out: Path, **changes) -> object:
    return config_from(BASE, out, **changes)


def contributions(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "contributions.parquet")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These runs are tiny: one torch thread keeps them fast on a shared machine (measured on 2 busy cores: the
    module's fixture took 44 s with two threads, 6 s with one). Restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local(tmp_path_factory, one_thread) -> Path:
    """The ledger with all three variants, and the replayed DICE-E of the same run's probes of rounds 0 and 2."""
    run = config(tmp_path_factory.mktemp("local"), influence__enabled=True, influence__hops=2,
                 influence__rounds=[0, 2], influence__variants=ALL, influence__ground_truth=False)
    return simulate(run, engine_kind="local")


def test_every_term_equals_the_replayed_estimate(local: Path) -> None:
    """Term by term: the ledger's (t, s, j, k) is q_k times influence.parquet's e_k^{(s)} of probe (j, t) for k first
    reached at hop s (and the direct term), for every variant; summed per probe, dice.parquet's DICE-E^{(R)}."""
    ledger = contributions(local)
    q = pd.read_parquet(local / "nodes.parquet")["q"].to_numpy()
    replayed = pd.read_parquet(local / "influence.parquet").rename(columns={"round": "probe_round"})
    mine = ledger[ledger["probe_round"] <= 2].merge(replayed, on=["probe_round", "source", "step", "target"])
    assert len(mine) == (ledger["probe_round"] <= 2).sum() > 2 * 8 * 3  # every term has its replayed one
    for variant, (column, estimate) in COLUMNS.items():
        want = q[mine["target"]] * mine[estimate].to_numpy()
        scale = np.abs(want).max()
        assert np.abs(mine[column].to_numpy() - want).max() <= 1e-5 * scale, variant
    dice = pd.read_parquet(local / "dice.parquet").query("hops == 2").set_index(["round", "source"])
    for variant, (column, estimate) in COLUMNS.items():
        ours = ledger[ledger["probe_round"] <= 2].groupby(["probe_round", "source"])[column].sum()
        theirs = dice[estimate].to_numpy()
        assert np.abs(ours.to_numpy() - theirs).max() <= 1e-5 * np.abs(theirs).max(), variant
    # the variants differ where they should: curvature from hop 2 on, second-order from the self term on
    later = ledger[ledger["step"] == 2]
    assert (later["influence_curvature"] != later["influence"]).all()
    assert (ledger["influence_second_order"] != ledger["influence_curvature"]).all()
    shares = pd.read_parquet(local / "shares.parquet")
    for column, _ in COLUMNS.values():
        total = ledger.groupby("source")[column].sum().to_numpy()
        np.testing.assert_allclose(shares["total" + column[len("influence"):]], total, rtol=1e-12)
        np.testing.assert_allclose(ledger.groupby(["source", "target"])[column.replace("influence", "cumulative")]
                                   .last(), ledger.groupby(["source", "target"])[column].sum(), rtol=1e-12)


def test_first_order_column_is_the_first_order_ledgers(local: Path, tmp_path: Path) -> None:
    """Adding variants leaves the first-order terms bitwise as they were, and the ranking follows rank_by."""
    plain = contributions(simulate(config(tmp_path / "plain", ledger__variants=["first-order"]), engine_kind="local"))
    both = contributions(local)
    pd.testing.assert_frame_equal(plain[[*KEYS, "influence", "cumulative"]], both[[*KEYS, "influence", "cumulative"]])
    assert plain[["influence_curvature", "cumulative_second_order"]].isna().all().all()
    shares = pd.read_parquet(local / "shares.parquet")
    assert shares["rank"].tolist() == shares["total"].rank(method="first").astype(int).tolist()


def test_two_actors_and_second_order_alone_resumed(local: Path, ray_local, tmp_path: Path) -> None:
    """On 2 Ray actors the terms are the local engine's (to float32 precision: two blocks train in vmaps of another
    width); second-order alone (a carried, not recorded; no first-order pass), interrupted with perturbations in
    flight and resumed from the checkpoint after round 3, gives the same second-order terms."""
    want = contributions(local)
    two = contributions(simulate(config(tmp_path / "two", engine__actors=2), engine_kind="ray"))
    pd.testing.assert_frame_equal(two[KEYS], want[KEYS])
    for column in [c for c in want if c.startswith(("influence", "cumulative"))]:
        if want[column].isna().all():  # a variant this run does not compute (exact-readout)
            assert two[column].isna().all(), column
            continue
        scale = np.abs(want[column].to_numpy()).max()
        assert np.abs(two[column].to_numpy() - want[column].to_numpy()).max() <= 1e-5 * scale, column

    cfg = config(tmp_path / "alone", ledger__variants=["second-order"], output__checkpoint_every=3)

    def interrupt(metrics, engine) -> None:  # the checkpoint after round 3 holds ledger round 2's cascades
        if metrics.round == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(cfg, engine_kind="local", on_round=interrupt)
    alone = contributions(simulate(cfg, engine_kind="local", resume=True))
    pd.testing.assert_frame_equal(alone[KEYS], want[KEYS])
    assert alone["influence"].isna().all() and alone["influence_curvature"].isna().all()
    scale = np.abs(want["influence_second_order"].to_numpy()).max()
    assert np.abs(alone["influence_second_order"] - want["influence_second_order"]).max() <= 1e-5 * scale
    shares = pd.read_parquet(tmp_path / "alone" / "shares.parquet")
    assert shares["total"].isna().all()
    assert shares["rank"].tolist() == shares["total_second_order"].rank(method="first").astype(int).tolist()


def test_report_shows_every_variant(local: Path, capsys) -> None:
    from dice_ray.cli.analyze import main as analyze

    assert analyze(["contributions", str(local), "--loo", "--local"]) == 0
    printed = capsys.readouterr().out
    assert "ledger total vs loo: Spearman" in printed  # the ranking variant (first-order)
    assert "curvature ledger total vs loo" in printed and "second-order ledger total vs loo" in printed
    report = pd.read_parquet(local / "contributions_report.parquet")
    shares = pd.read_parquet(local / "shares.parquet")
    for column in ("total", "total_curvature", "total_second_order"):
        np.testing.assert_array_equal(report[column], shares[column])


def test_second_order_without_b_equals_the_replayed_estimate_without_b(local: Path, tmp_path: Path) -> None:
    """``ledger.second_order_b`` false: the ledger's second-order terms equal the replayed estimate without b
    (``influence.second_order_b`` false), and differ from the ones with b at step 2, where b enters."""
    run = simulate(config(tmp_path / "without", influence__enabled=True, influence__hops=2, influence__rounds=[0, 2],
                          influence__variants=ALL, influence__ground_truth=False, influence__second_order_b=False,
                          ledger__second_order_b=False), engine_kind="local")
    ledger = contributions(run)
    q = pd.read_parquet(run / "nodes.parquet")["q"].to_numpy()
    replayed = pd.read_parquet(run / "influence.parquet").rename(columns={"round": "probe_round"})
    mine = ledger[ledger["probe_round"] <= 2].merge(replayed, on=["probe_round", "source", "step", "target"])
    want = q[mine["target"]] * mine["est_second_order"].to_numpy()
    assert np.abs(mine["influence_second_order"].to_numpy() - want).max() <= 1e-5 * np.abs(want).max()
    full = contributions(local).set_index(KEYS)["influence_second_order"]
    at_two = ledger.set_index(KEYS)["influence_second_order"].loc[full.index][
        full.index.get_level_values("step") == 2]
    assert np.abs(at_two.to_numpy() - full[full.index.get_level_values("step") == 2].to_numpy()).max() > 0
