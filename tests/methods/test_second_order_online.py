"""Second-order DICE-E inside the round loop: b travels with a through gossip and checkpoints, and the in-loop
numbers equal the replayed recursion's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_online_dice import config, tables

from dice_ray.runner import simulate

ALL = ["first-order", "curvature", "second-order"]
SMALL = {"influence__rounds": [1, 2], "influence__sources": [0, 3]}  # 8 probes, two rounds in flight at once
ESTIMATES = ("est_first_order", "est_curvature", "est_second_order")


@pytest.fixture(scope="module")
def replayed(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """Momentum, whole batches and single samples, all three variants on replayed windows."""
    run = config(tmp_path_factory.mktemp("replayed"), influence__variants=ALL, **SMALL)
    return tables(simulate(run, engine_kind="local"))


def assert_same(got: dict[str, pd.DataFrame], want: dict[str, pd.DataFrame]) -> None:
    for name, table in want.items():
        mine = got[name]
        assert list(mine.columns) == list(table.columns) and len(mine) == len(table)
        for column in [c for c in table.columns if c.startswith(ESTIMATES)]:
            scale = np.abs(table[column].to_numpy()).max()
            assert np.abs(mine[column].to_numpy() - table[column].to_numpy()).max() <= 1e-5 * scale, column


@pytest.mark.parametrize("actors", [None, 2])  # None: the local engine
def test_in_loop_second_order_equals_the_replayed_one(replayed, ray_local, tmp_path: Path, actors) -> None:
    changes = {"influence__online": True, "influence__variants": ALL, **SMALL}
    if actors is not None:
        changes["engine__actors"] = actors
    got = tables(simulate(config(tmp_path / "online", **changes), engine_kind="local" if actors is None else "ray"))
    assert_same(got, replayed)
    influence = got["influence"]
    assert influence["est_second_order"].notna().all()
    # the second-order terms differ from the curvature ones (the z′ Hessian from step 0 on, b from step 2 on)
    assert (influence["est_second_order"] != influence["est_curvature"]).mean() > 0.9
    # and they are closer to DICE-GT over all terms
    gt = influence["gt"].to_numpy()
    assert np.abs(gt - influence["est_second_order"]).sum() < np.abs(gt - influence["est_curvature"]).sum()


def test_second_order_alone_and_resumed_from_a_checkpoint(replayed, tmp_path: Path) -> None:
    """Only second-order on (a is carried without being recorded), interrupted while probes are in flight and
    resumed: the same numbers as the replayed recursion, the other estimate columns empty."""
    cfg = config(tmp_path / "run", influence__online=True, influence__variants=["second-order"],
                 output__checkpoint_every=3, **SMALL)

    def interrupt(metrics, engine) -> None:  # the checkpoint after round 2 holds both probe rounds in flight
        if metrics.round == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(cfg, engine_kind="local", on_round=interrupt)
    got = tables(simulate(cfg, engine_kind="local", resume=True))
    for name, table in replayed.items():
        mine = got[name]
        assert mine["est_curvature"].isna().all() and mine["est_first_order"].isna().all()
        scale = np.abs(table["est_second_order"].to_numpy()).max()
        assert np.abs(mine["est_second_order"].to_numpy() - table["est_second_order"].to_numpy()).max() <= 1e-5 * scale


def test_default_variants_leave_the_second_order_columns_empty(tmp_path: Path) -> None:
    got = tables(simulate(config(tmp_path / "default", influence__rounds=[2], influence__probe_samples=0),
                          engine_kind="local"))
    assert got["influence"]["est_second_order"].isna().all()
    assert got["dice"][["est_second_order", "est_second_order_hop", "est_second_order_horizon"]].isna().all().all()


def test_second_order_without_b_in_the_loop_and_replayed(replayed, tmp_path: Path) -> None:
    """``influence.second_order_b`` false: in the loop and on replayed windows the same numbers; against b carried,
    the same up to step 1 (b^{(1)} = W b₀ = 0 here: whole batches, and single samples under momentum, whose step is
    linear in the gradient) and different from step 2 on, where b enters; the other variants untouched."""
    changes = {"influence__variants": ALL, "influence__second_order_b": False, **SMALL}
    without = tables(simulate(config(tmp_path / "replay", **changes), engine_kind="local"))
    assert_same(tables(simulate(config(tmp_path / "online", influence__online=True, **changes),
                                engine_kind="local")), without)
    mine, full = without["influence"], replayed["influence"]
    for column in ("est_first_order", "est_curvature"):
        np.testing.assert_array_equal(mine[column].to_numpy(), full[column].to_numpy())
    early = (mine["step"] <= 1).to_numpy()
    np.testing.assert_allclose(mine["est_second_order"][early], full["est_second_order"][early], rtol=1e-6, atol=0)
    late = np.abs(mine["est_second_order"][~early].to_numpy() - full["est_second_order"][~early].to_numpy())
    assert late.max() > 1e-5 * np.abs(full["est_second_order"][~early]).max()  # measured 1.5e-4: b is small here
