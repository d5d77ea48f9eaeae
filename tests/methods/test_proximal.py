"""Proximal influence (concepts §5): the online scores equal a brute-force computation, do not depend on
placement, and rank label flippers above honest neighbours."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.func import functional_call, grad

from dice_ray.cli.simulate import main as simulate
from dice_ray.config import build_config
from dice_ray.core.participants import ParticipantBlock
from dice_ray.engine import LocalEngine
from dice_ray.experiment import prepare
from dice_ray.methods.proximal import ProximalHook, ProximalLedger


def config(kind: str = "sign-flip", **extra) -> dict:
    return {"nodes": 8, "rounds": 4, "seed": 3, "topology": {"name": "exponential"},
            "data": {"dataset": "digits", "heldout_size": 32, "val_fraction": 0.2, "participant_weights": "data-size"},
            "model": {"name": "mlp-tanh", "init": "independent"}, "optim": {"batch_size": 8, "lr": 0.1},
            "misbehavior": {"kind": kind, "count": 2, "factor": 3.0},
            "proximal": {"enabled": True, **extra}}


@pytest.mark.parametrize(("kind", "zprime"), [("sign-flip", "validation"), ("scale", "heldout")])
def test_score_equals_brute_force_gradient_dot_update(kind: str, zprime: str) -> None:
    """p_{k←l}^t = q_k W_kl ∇L(θ_k^{t+1}; z′_k)ᵀ Δ_l with Δ_l = θ_l^{t+½} − θ_l^t the update l sent (corrupted
    for misbehaving l), from two saved snapshots and torch.func.grad of one model at a time."""
    experiment = prepare(build_config(config(kind, zprime=zprime)))
    engine = LocalEngine(experiment, [ProximalHook])
    ledger = ProximalLedger(8, experiment.q, experiment.misbehaving, window=2)
    for t in range(2):
        engine.run_round(t, evaluate=False)
    before = engine.states().copy()
    reference = ParticipantBlock.for_experiment(experiment)  # replays round 2's local step from θ^2
    reference.population.state.copy_(torch.from_numpy(before))
    reference.half_step(2)
    sent = reference.population.state.numpy().copy()
    m = engine.run_round(2, evaluate=False)
    rows = ledger.rows(2, m.records["proximal"][0])
    after = engine.states()

    block, pop = engine.block, engine.block.population
    width = pop.param_layout.width
    delta = torch.from_numpy(sent[:, :width] - before[:, :width]).double()
    w = experiment.topology.mixing_matrix(2)

    def loss(flat: torch.Tensor, k: int) -> torch.Tensor:
        params = pop.param_layout.views(flat)
        if zprime == "heldout":
            return torch.nn.functional.cross_entropy(functional_call(pop.model, params, (block.x_heldout,)),
                                                     block.y_heldout)
        mask = block.val_mask[k]
        logits = functional_call(pop.model, params, (block.x_val[k][mask],))
        return torch.nn.functional.cross_entropy(logits, block.y_val[k][mask])

    expected = []
    for k in range(8):
        g = grad(loss)(torch.from_numpy(after[k, :width]), k).double()
        for nb in experiment.topology.in_neighbors(k, 2):
            expected.append((k, int(nb), experiment.q[k] * w[k, nb] * float(g @ delta[nb])))
    got = list(zip(rows["examiner"].tolist(), rows["neighbor"].tolist(), rows["score"].tolist(), strict=True))
    assert [pair for *pair, _ in got] == [pair for *pair, _ in expected]
    np.testing.assert_allclose([s for *_, s in got], [s for *_, s in expected], rtol=1e-5, atol=1e-9)
    assert any(abs(s) > 1e-6 for *_, s in expected)
    bad = set(experiment.misbehaving.tolist())
    assert rows["neighbor_is_anomalous"].tolist() == [nb in bad for _, nb, _ in expected]


def test_ledger_cumulative_and_window_sums() -> None:
    ledger = ProximalLedger(3, np.array([0.5, 0.25, 0.25]), np.array([2]), window=2)
    pair = {"examiner": np.array([0, 0]), "neighbor": np.array([1, 2]), "weight": np.array([0.3, 0.3]),
            "cosine": np.zeros(2)}
    out = [ledger.rows(t, {**pair, "dot": np.array([1.0, 2.0]) * (t + 1)}) for t in range(3)]
    np.testing.assert_allclose(out[2]["score"], [1.5, 3.0])
    np.testing.assert_allclose(out[2]["cumulative_score"], [0.5 * 6, 0.5 * 12])
    np.testing.assert_allclose(out[2]["window_score"], [0.5 * 5, 0.5 * 10])
    assert out[2]["neighbor_is_anomalous"].tolist() == [False, True]
    np.testing.assert_allclose(ledger.cumulative(0, np.array([2, 1, 0])), [6.0, 3.0, np.nan])


def _run(tmp_path, name: str, *flags: str) -> pd.DataFrame:
    out = tmp_path / name
    assert simulate(["--no-progress", "--dataset", "digits", "--nodes", "8", "--rounds", "4", "--batch-size", "8",
                     "--seed", "3", "--topology", "exponential", "--misbehavior", "scale", "--misbehaving", "2",
                     "--proximal", "--proximal-every", "2", "--out", str(out), *flags]) == 0
    return pd.read_parquet(out / "proximal.parquet")


def test_same_table_for_one_and_two_actors(ray_local, tmp_path) -> None:
    one = _run(tmp_path, "one", "--actors", "1")
    two = _run(tmp_path, "two", "--actors", "2")
    assert sorted(set(one["round"])) == [0, 2]
    assert len(one) == 2 * 8 * 3  # exponential, 8 nodes: in-neighbours at offsets 1, 2, 4
    pd.testing.assert_frame_equal(one[["round", "examiner", "neighbor", "neighbor_is_anomalous"]],
                                  two[["round", "examiner", "neighbor", "neighbor_is_anomalous"]])
    for column in ("weight", "score", "cumulative_score", "window_score", "update_cosine"):
        np.testing.assert_allclose(one[column], two[column], rtol=1e-5, atol=1e-7, err_msg=column)
    local = _run(tmp_path, "local", "--engine", "local")
    np.testing.assert_allclose(one["score"], local["score"], rtol=1e-5, atol=1e-7)


def test_label_flippers_score_higher_than_honest_neighbours(tmp_path) -> None:
    out = tmp_path / "flip"
    assert simulate(["--engine", "local", "--no-progress", "--dataset", "digits", "--nodes", "16", "--rounds", "15",
                     "--batch-size", "16", "--lr", "0.1", "--val-fraction", "0.2", "--misbehavior", "label-flip",
                     "--misbehaving", "3", "--proximal", "--out", str(out)]) == 0
    table = pd.read_parquet(out / "proximal.parquet")
    last = table[table["round"] == table["round"].max()]
    assert roc_auc_score(last["neighbor_is_anomalous"], last["cumulative_score"]) > 0.85
    assert last.loc[last["neighbor_is_anomalous"], "cumulative_score"].mean() > 0  # harmful on average


@pytest.mark.parametrize(("flags", "message"), [
    (["--proximal-every", "0"], "proximal.every"),
    (["--rewire", "influence"], "needs proximal influence"),
    (["--proximal", "--rewire", "influence", "--rewire-keep", "0"], "rewiring.keep"),
    (["--proximal", "--rewire", "random", "--rewire-every", "0"], "rewiring.every"),
    (["--proximal", "--rewire", "random", "--rewire-keep", "16"], "exceeds the 15 other"),
    (["--proximal", "--rewire", "random", "--topology", "random-matching"], "static topology"),
    (["--rewire", "sometimes"], "rewiring.mode"),
])
def test_bad_proximal_and_rewiring_config_exits_2(tmp_path, capsys, flags: list[str], message: str) -> None:
    assert simulate(["--no-progress", "--dataset", "digits", "--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("readout", ["first-order", "exact"])
def test_scoring_in_slices_gives_the_same_numbers_to_float64_rounding(readout: str, monkeypatch) -> None:
    """The float64 scoring works through a slice of the coordinates at a time, the exact readout through a bounded
    number of edges (``core.tensors.FLOAT64_SLICE_BYTES``; float64 copies of whole blocks took 6x the state's memory
    at N = 4,096): in slices of 300 coordinates (and an edge at a time) it gives the scores of one slice to float64
    rounding."""
    from dice_ray.core import tensors

    def scores() -> tuple[list[dict], int]:
        engine = LocalEngine(prepare(build_config(config(readout=readout))), [ProximalHook])
        records = [engine.run_round(t, evaluate=False).records["proximal"][0] for t in range(3)]
        return records, engine.block.population.param_layout.width

    whole, width = scores()
    monkeypatch.setattr(tensors, "FLOAT64_SLICE_BYTES", 8 * 3 * 8 * 300)  # P = M = 8: 300 columns a slice
    assert width > 3 * 300
    for one, other in zip(whole, scores()[0], strict=True):
        assert one.keys() == other.keys() and len(one["dot"]) > 8
        for key in ("examiner", "neighbor", "weight"):
            np.testing.assert_array_equal(one[key], other[key], err_msg=key)
        for key in ("dot", "cosine"):
            np.testing.assert_allclose(other[key], one[key], rtol=1e-12, atol=1e-12 * np.abs(one[key]).max(),
                                       err_msg=key)
