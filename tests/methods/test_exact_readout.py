"""Exact-readout DICE-E (``exact-readout``): the perturbation read with the z′ loss itself, so hop 1 is DICE-GT.

At hop 1 the propagated perturbation is W^t_kj Δ exactly (θ_{k∖z}^{t+1} = θ_k^{t+1} − W^t_kj Δ), so the readout
L(θ_k; z′) − L(θ_k − δ; z′) is the counterfactual difference itself; the direct term L(θ_j^t + u) − L(θ_j^t + u − Δ)
is d_j^{(½)} for a whole batch (Δ = u). What is left is float32 rounding of two nearby losses: each is within a few
units of roundoff u = 2⁻²⁴ of its value L ≈ 2.3 (mean cross entropy over z′), so |e − d| ≲ 10 u L ≈ 1.4e-6 against
hop-1 terms of 1e-4 to 1e-2 here: a relative error ≤ 1e-3 (the bar) holds with a 10x margin where the terms are
smallest. DICE-GT is evaluated in float64.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from oracles import BATCHNORM_MLP
from test_online_dice import BASE, tables
from torch.func import functional_call

from dice_ray.config import build_config
from dice_ray.core.losses import Loss
from dice_ray.core.population import model_state_layouts
from dice_ray.experiment import prepare
from dice_ray.methods.dice.estimator import (
    estimate_cascade,
    estimate_cascades,
    float64_losses,
    sample_second_order_difference,
    sample_update_difference,
    update_difference,
)
from dice_ray.methods.dice.ground_truth import counterfactual_half_step, ground_truth_cascade
from dice_ray.methods.dice.measure import window_for
from dice_ray.methods.dice.trajectory import record_trajectory
from dice_ray.runner import simulate

BAR = 1e-3  # the bar for hop 1 against DICE-GT (float32 cancellation)
UNIT_ROUNDOFF = 2.0**-24
FLOOR = 4 * UNIT_ROUNDOFF * 3.0  # float32 rounding of a difference of two z′ losses (L ≤ 3 here), per term
_WINDOWS: dict[tuple[str, str], object] = {}


@pytest.fixture(autouse=True)
def quiet_jvp():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.func.jvp's deprecation notices
        yield


def window(model: str, optimizer: str):
    """An 8-participant exponential graph, digits, batch 4 (a single sample moves the step by a third of the
    batch's gradient spread: terms well above float32 rounding), recorded at round 2 over 2 hops (one per setting)."""
    if (model, optimizer) not in _WINDOWS:
        cfg = build_config({"nodes": 8, "seed": 1, "topology": {"name": "exponential"},
                            "data": {"dataset": "digits", "heldout_size": 64}, "model": {"name": model},
                            "optim": {"name": optimizer, "lr": 0.01 if optimizer == "adam" else 0.1,
                                      "batch_size": 4}})
        experiment = prepare(cfg)
        _WINDOWS[model, optimizer] = window_for(experiment, record_trajectory(experiment, 2, 2))
    return _WINDOWS[model, optimizer]


def relative_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.abs(estimate - truth).sum() / np.abs(truth).sum())


@pytest.mark.parametrize(("model", "probe"), [("mlp", "batch"), ("mlp", "sample"), ("mlp-tanh", "batch"),
                                              ("mlp-tanh", "sample"), (BATCHNORM_MLP, "batch")])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_hop_one_and_direct_term_equal_ground_truth(model: str, optimizer: str, probe: str) -> None:
    """With BatchNorm, Δ and the state the readout moves carry the running statistics (a skipped step skips their
    update too); a single sample's probe is refused there (``experiment.check_normalization``)."""
    w = window(model, optimizer)
    for source in (0, 5):
        if probe == "batch":
            delta, opt_delta = update_difference(w, source)
            removed, second = None, None
        else:
            delta, opt_delta = sample_update_difference(w, source, 3)
            removed, second = np.array([3]), sample_second_order_difference(w, source, 3)
            if optimizer == "adam":  # Adam's step is far from linear in one sample's gradient: start from the
                delta, opt_delta = exact_update_difference(w, source, removed)  # exact Δ (see below)
                second = None
        truth = ground_truth_cascade(w, source, 1, removed)
        for exact_b in (False, True):  # b^{(1)} = W b₀: a + b is as exact as a at hop 1 (b₀ = 0 but for Adam)
            got = estimate_cascade(w, source, delta, opt_delta, 1, "exact-readout", second, exact_b=exact_b)
            # every term within the bar or the float32 floor (single-sample terms are ~1e-4: the floor is 1e-3 of them)
            assert np.all(np.abs(got.values[1] - truth.values[1]) <= BAR * np.abs(truth.values[1]) + FLOOR)
            assert abs(got.half - truth.half) <= BAR * abs(truth.half) + FLOOR
            if probe == "batch":
                assert relative_error(got.values[1], truth.values[1]) <= BAR
            if probe == "batch":  # Δ = u: the direct term is DICE-GT's (to float32 rounding of two losses)
                assert abs(got.half - truth.half) <= 16 * UNIT_ROUNDOFF * 3.0


def exact_update_difference(w, source: int, removed: np.ndarray):
    """θ_j^{t+½} − θ_{j∖z}^{t+½} and the optimizer-state difference, by the local step without z (DICE-GT's)."""
    traj = w.trajectory
    width = delta_width(w)
    half_cf, opt_cf = counterfactual_half_step(w, source, removed)
    opt = {name: traj.opt_states[1][name][source] - value for name, value in opt_cf.items() if name != "step"}
    return traj.halves[0][source, :width] - half_cf[:width], opt


def delta_width(w) -> int:
    return update_difference(w, 0)[0].shape[0]


def test_adam_single_sample_start_is_what_hop_one_misses() -> None:
    """For Adam the single-sample Δ of ``sample_update`` is the step's linearisation in the removed sample's
    gradient: hop 1 is then exact for that Δ — the readout equals the loss difference along W_kj Δ — and what
    separates it from DICE-GT is Δ alone (the exact start above closes it)."""
    w = window("mlp-tanh", "adam")
    delta, opt_delta = sample_update_difference(w, 0, 3)
    got = estimate_cascade(w, 0, delta, opt_delta, 1, "exact-readout")
    column = w.trajectory.mixing[0][:, [0]].toarray().ravel()
    rows = got.supports[1]
    states = w.trajectory.states[1][rows]
    moved = states.clone()
    moved[:, : delta.shape[0]] -= torch.as_tensor(column[rows], dtype=delta.dtype)[:, None] * delta
    want = (w.zprime_losses(rows, states) - w.zprime_losses(rows, moved)).numpy()
    np.testing.assert_allclose(got.values[1], want, rtol=0, atol=16 * UNIT_ROUNDOFF * 3.0)


@pytest.mark.parametrize("model", ["mlp", BATCHNORM_MLP])
def test_the_readout_is_taken_in_float64(model: str) -> None:
    """L(θ_k; z′) − L(θ_k − W_kj Δ; z′) is a difference of nearby losses: read in float32 it carried ~1e-7 of rounding
    (1e-2 of a single sample's term); it is read in float64, equal to the same difference taken here in float64
    with the model's own forward pass (functional_call), to float64 rounding of two losses (L ≤ 3)."""
    w = window(model, "sgd")
    delta, opt_delta = update_difference(w, 2)
    got = estimate_cascade(w, 2, delta, opt_delta, 1, "exact-readout")
    rows = got.supports[1]
    column = torch.as_tensor(w.trajectory.mixing[0][:, [2]].toarray().ravel()[rows], dtype=torch.float64)
    states = w.trajectory.states[1][rows].double()
    moved = states.clone()
    moved[:, : delta.shape[0]] -= column[:, None] * delta.double()
    model64 = copy.deepcopy(w.model).double().eval()
    params, buffers = model_state_layouts(model64)  # a state is [parameters | floating-point buffers]
    x, y = w.heldout

    def loss(state: torch.Tensor) -> float:
        views = {**params.views(state[: params.offsets[-1]]), **buffers.views(state[params.offsets[-1]:])}
        logits = functional_call(model64, views, (x.double(),))
        return float(torch.nn.functional.cross_entropy(logits, y))

    want = np.array([loss(a) - loss(b) for a, b in zip(states, moved, strict=True)])
    np.testing.assert_allclose(got.values[1], want, rtol=0, atol=64 * 2.0**-53 * 3.0)


class _LogisticLoss(Loss):
    """Binary cross-entropy of logits [N, 1] against float targets [N]: torch computes it in its target's dtype."""

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(outputs[:, 0], targets, reduction="none")


def test_float_targets_are_read_in_float64() -> None:
    """A loss that computes in its target's dtype reads float32 targets in float32: the float64 losses cast float
    targets too, so they equal the same losses taken here in float64, to float64 rounding (in float32 ~1e-8 off)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    params, _ = model_state_layouts(model)
    states = torch.randn(4, params.width) * 0.5
    x, y = torch.randn(32, 5), torch.randint(0, 2, (32,)).float()
    got = float64_losses(copy.deepcopy(model).double(), _LogisticLoss(), states, x, y, shared_input=True)
    assert got.dtype == torch.float64
    want = torch.stack([_LogisticLoss().per_sample(functional_call(model.double(), params.views(s), (x.double(),)),
                                                   y.double()).mean() for s in states.double()])
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=64 * 2.0**-53 * float(want.max()))


def test_later_hops_read_the_curvature_perturbation() -> None:
    """The readout is exact, the propagation is curvature's: at hop 2 the exact readout is within second order of
    the curvature estimate and closer to DICE-GT than it on the smooth model, and it carries no adjoint form."""
    from dice_ray.methods.dice.adjoint import adjoint_horizon

    w = window("mlp-tanh", "sgd")
    delta, opt_delta = update_difference(w, 2)
    got = estimate_cascades(w, 2, delta, opt_delta, 2, ["curvature", "exact-readout"])
    truth = ground_truth_cascade(w, 2, 2)
    exact, curvature = got["exact-readout"].values[2], got["curvature"].values[2]
    assert relative_error(exact, truth.values[2]) < relative_error(curvature, truth.values[2])
    with pytest.raises(ValueError, match="no adjoint form"):
        adjoint_horizon(w, np.full(8, 1 / 8), 2, "exact-readout")


def config(out: Path, rounds: int | None = None, **changes) -> object:
    """test_online_dice's run (8-node ring, momentum, probes with single samples) with ``changes`` (section__field)
    and ``rounds``."""
    data = json.loads(json.dumps(BASE))
    if rounds is not None:
        data["rounds"] = rounds
    for key, value in changes.items():
        section, _, field = key.partition("__")
        data.setdefault(section, {})[field] = value
    data["output"]["out"] = str(out)
    return build_config(data)


SMALL = {"influence__rounds": [1, 2], "influence__sources": [0, 3]}  # momentum, whole batches and single samples
VARIANTS = ["curvature", "exact-readout"]


def assert_same_exact(got, want) -> None:
    """In-loop and replayed exact terms agree to float32 rounding of a loss difference: a few u of the losses
    (≈ 2.3), far below the terms themselves."""
    for name, table in want.items():
        mine = got[name]
        assert len(mine) == len(table)
        for column in [c for c in table.columns if c.startswith("est_exact_readout")]:
            assert np.abs(mine[column].to_numpy() - table[column].to_numpy()).max() <= 64 * UNIT_ROUNDOFF * 3.0


@pytest.mark.parametrize("exact_b", [False, True])
def test_in_loop_exact_readout_equals_the_replayed_one(tmp_path, exact_b: bool) -> None:
    changes = {"influence__variants": VARIANTS, "influence__exact_readout_b": exact_b, **SMALL}
    replayed = tables(simulate(config(tmp_path / "replay", **changes), engine_kind="local"))
    online = tables(simulate(config(tmp_path / "online", influence__online=True, **changes), engine_kind="local"))
    assert_same_exact(online, replayed)
    influence = replayed["influence"]
    hop1 = influence[influence["step"] == 1]
    assert relative_error(hop1["est_exact_readout"].to_numpy(), hop1["gt"].to_numpy()) <= BAR
    whole = influence[(influence["step"] == 0) & influence["sample_index"].isna()]
    np.testing.assert_allclose(whole["est_exact_readout"], whole["gt"], rtol=0, atol=16 * UNIT_ROUNDOFF * 3.0)
    assert (influence["est_exact_readout"] != influence["est_curvature"]).all()


@pytest.mark.parametrize("model", ["mlp", BATCHNORM_MLP])
def test_ledger_exact_readout_terms_are_the_replayed_ones(tmp_path, model: str) -> None:
    """The ledger's exact-readout column (``ledger.variants``): q_k times the replayed exact term of the same probe,
    its cumulative sums and totals consistent (with BatchNorm: Δ and δ carry its running statistics)."""
    import pandas as pd

    run = simulate(config(tmp_path / "ledger", model__name=model, ledger__enabled=True, ledger__hops=2, ledger__every=2,
                          ledger__variants=["first-order", "exact-readout"], influence__hops=2,
                          influence__rounds=[0, 2], influence__variants=["exact-readout"], influence__probe_samples=0,
                          influence__ground_truth=False, rounds=6), engine_kind="local")
    ledger = pd.read_parquet(run / "contributions.parquet")
    q = pd.read_parquet(run / "nodes.parquet")["q"].to_numpy()
    replayed = pd.read_parquet(run / "influence.parquet").rename(columns={"round": "probe_round"})
    mine = ledger[ledger["probe_round"] <= 2].merge(replayed, on=["probe_round", "source", "step", "target"])
    assert len(mine) == (ledger["probe_round"] <= 2).sum() > 2 * 8
    want = q[mine["target"]] * mine["est_exact_readout"].to_numpy()
    assert np.abs(mine["influence_exact_readout"].to_numpy() - want).max() <= 64 * UNIT_ROUNDOFF * 3.0
    shares = pd.read_parquet(run / "shares.parquet")
    np.testing.assert_allclose(shares["total_exact_readout"], ledger.groupby("source")["influence_exact_readout"].sum(),
                               rtol=1e-12)


@pytest.mark.parametrize("model", ["mlp", BATCHNORM_MLP])
def test_proximal_exact_score_is_the_one_hop_counterfactual(tmp_path, model: str) -> None:
    """``proximal.readout`` exact: p_{k←l}^t = q_k d_k^{(1)} of the whole-batch probe (l, t) — DICE-GT's hop-1
    term, replayed — for every scored edge (with BatchNorm: the update l sends moves its running statistics too);
    the first-order readout stays its first-order approximation."""
    import pandas as pd

    base = {"proximal__enabled": True, "proximal__zprime": "heldout", "proximal__every": 2, "rounds": 5,
            "influence__enabled": False, "model__name": model}
    exact_run = simulate(config(tmp_path / "exact", proximal__readout="exact", **base), engine_kind="local")
    first_run = simulate(config(tmp_path / "first", **base), engine_kind="local")
    exact = pd.read_parquet(exact_run / "proximal.parquet")
    first = pd.read_parquet(first_run / "proximal.parquet")
    assert list(exact.columns) == list(first.columns)
    experiment = prepare(config(tmp_path / "replay", **base))
    q = experiment.q
    for t in (0, 2):
        w = window_for(experiment, record_trajectory(experiment, t, 1))
        rows = exact[exact["round"] == t]
        for source in sorted(set(rows["neighbor"].tolist())):
            truth = ground_truth_cascade(w, source, 1)
            mine = rows[rows["neighbor"] == source]
            want = q[mine["examiner"]] * truth.values[1][np.searchsorted(truth.supports[1], mine["examiner"])]
            np.testing.assert_allclose(mine["score"], want, rtol=0, atol=16 * UNIT_ROUNDOFF * 3.0)
            assert relative_error(mine["score"].to_numpy(), want) <= BAR
    merged = exact.merge(first, on=["round", "examiner", "neighbor"], suffixes=("", "_first"))
    assert (merged["score"] != merged["score_first"]).all()
    np.testing.assert_allclose(merged["update_cosine"], merged["update_cosine_first"])


def test_an_exact_readout_of_no_models_state_is_said_once(capsys: pytest.CaptureFixture[str]) -> None:
    """Where θ_k − δ_k moved a BatchNorm running variance below 0 (ResNet-18 on batches of 4, hop 2), L(θ_k − δ_k)
    is NaN: the run says so in one line instead of leaving NaN unexplained in the table; a variant not computed
    (all null) is not a warning."""
    from dice_ray.methods.dice.measure import warn_unreadable

    warn_unreadable([{"est_exact_readout": 0.1}, {"est_exact_readout": float("nan")}, {"est_exact_readout": 0.2}])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the exact readout is NaN for 1 of 3 terms")
    warn_unreadable([{"est_exact_readout": None}, {"est_exact_readout": None}])
    warn_unreadable([{"est_curvature": 0.1}])
    assert capsys.readouterr().err == ""
