"""DICE-E against its exact checks (concepts §4): path enumeration, forward-mode replay, O(η²) agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import BATCHNORM_MLP, explicit_replay, make_window
from torch.func import jvp

from dice_ray.config import build_config
from dice_ray.core.population import model_state_layouts
from dice_ray.experiment import prepare
from dice_ray.methods.dice.adjoint import adjoint_horizon
from dice_ray.methods.dice.estimator import (
    Window,
    estimate_cascade,
    estimate_cascades,
    first_order_all_sources,
    sample_update_difference,
    update_difference,
)
from dice_ray.methods.dice.ground_truth import counterfactual_half_step, ground_truth_cascade
from dice_ray.methods.dice.measure import window_for
from dice_ray.methods.dice.paths import path_cascade
from dice_ray.methods.dice.trajectory import first_reached, reach


@pytest.mark.parametrize("topology", ["ring", "exponential", "random-matching"])
@pytest.mark.parametrize("variant", ["first-order", "curvature"])
def test_recursion_equals_path_enumeration(topology: str, variant: str) -> None:
    window, _ = make_window(topology)
    delta, opt_delta = update_difference(window, 1)
    fast = estimate_cascade(window, 1, delta, opt_delta, 3, variant)
    slow = path_cascade(window, 1, delta, 3, variant)
    for s in (1, 2, 3):
        np.testing.assert_array_equal(fast.supports[s], slow.supports[s])
        np.testing.assert_allclose(fast.values[s], slow.values[s], rtol=1e-5, atol=1e-8)
    assert fast.half == pytest.approx(slow.half)


@pytest.mark.parametrize("model", ["mlp-tanh", BATCHNORM_MLP])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_curvature_estimate_equals_forward_mode_derivative_of_the_replay(optimizer: str, model: str) -> None:
    """K′(0), K the path from the factual run (0) to the counterfactual one (−1) of ``oracles.explicit_replay``: for
    Adam with j's step counter one behind, which moves j's later steps by the counter's own difference; with
    BatchNorm, δ carries the running statistics too (its later steps move them toward the batch's)."""
    window, _ = make_window("exponential", nodes=8, optimizer=optimizer, lr=0.01 if optimizer == "adam" else 0.1,
                            dtype=torch.float64, model=model)
    source, hops = 3, 3
    delta, opt_delta = update_difference(window, source)  # parameters and, for momentum and Adam, their state
    cascade = estimate_cascade(window, source, delta, opt_delta, hops, "curvature")
    lag = opt_delta.pop("step", None)
    run, width = explicit_replay(window, source, hops, lag=0.0 if lag is None else float(lag))
    opt_source = {k: window.trajectory.opt_states[1][k][source] for k in opt_delta}
    zero, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
    _, derivatives = jvp(run, (window.trajectory.halves[0][source, :width], opt_source, zero),
                         (delta, opt_delta, one))
    for s in range(1, hops + 1):
        exact = derivatives[s - 1].detach().numpy()[cascade.supports[s]]
        np.testing.assert_allclose(cascade.values[s], exact, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_ground_truth_minus_estimate_shrinks_like_lr_squared(optimizer: str) -> None:
    """|GT − E| / |GT| halves when η halves (GT ~ η, GT − E ~ η²), at every hop, for the curvature variant: also
    under momentum, whose step is linear in the buffer part of Δ (which does not shrink with η). First order drops
    that part (J = I): under momentum its error from hop 2 on stays a fixed fraction of GT (concepts, optimizer
    state)."""
    errors: dict[str, dict[float, list[float]]] = {"curvature": {}, "first-order": {}}
    for lr in (0.1, 0.05, 0.025):
        window, _ = make_window("ring", nodes=8, optimizer=optimizer, lr=lr, t0=5, batch=16)
        delta, opt_delta = update_difference(window, 0)
        gt = ground_truth_cascade(window, 0, 3)
        for variant, by_lr in errors.items():
            est = estimate_cascade(window, 0, delta, opt_delta, 3, variant)
            by_lr[lr] = [np.abs(gt.values[s] - est.values[s]).sum() / np.abs(gt.values[s]).sum() for s in (1, 2, 3)]
    for big, small in ((0.1, 0.05), (0.05, 0.025)):
        ratios = np.array(errors["curvature"][small]) / np.array(errors["curvature"][big])
        assert ((ratios > 0.3) & (ratios < 0.7)).all(), (big, small, errors)
        ratios = np.array(errors["first-order"][small]) / np.array(errors["first-order"][big])
        shrinking = ratios < 0.7
        assert shrinking.all() if optimizer == "sgd" else (shrinking[0] and not shrinking[1:].any()), (big, errors)


def test_one_hop_ground_truth_needs_no_replay() -> None:
    """θ_{k∖z}^{t+1} = θ_k^{t+1} − W^t_kj (θ_j^{t+½} − θ_{j∖z}^{t+½}) (concepts §3): the replay agrees."""
    window, _ = make_window("exponential", nodes=8)
    traj, j = window.trajectory, 2
    half_cf, _ = counterfactual_half_step(window, j)
    w = traj.mixing[0].toarray()
    closed = traj.states[1] - torch.as_tensor(w[:, [j]], dtype=torch.float32) * (traj.halves[0][j] - half_cf)
    losses = window.population(1, np.arange(8), states=closed).evaluate(*window.heldout, shared_input=True)[0]
    factual = window.population(1, np.arange(8)).evaluate(*window.heldout, shared_input=True)[0]
    gt = ground_truth_cascade(window, j, 1)
    np.testing.assert_allclose(gt.values[1], (factual - losses).numpy()[gt.supports[1]], atol=1e-6)


def test_replay_hands_back_its_counterfactual_states() -> None:
    """The states the replay compares with are θ_{k∖z}^{t+s}: at s = 1 the closed form of concepts §3, and at
    every step their first-order loss change e* = ∇L(θ_k)ᵀ(θ_k − θ_{k∖z}) tracks d_k^{(s)} at least as
    closely as the curvature estimate does (bench/alignment_floor.py's floor)."""
    window, _ = make_window("ring", nodes=6, lr=0.2)
    traj, j = window.trajectory, 1
    states: list[torch.Tensor] = []
    gt = ground_truth_cascade(window, j, 3, counterfactual=states)
    assert [len(s) for s in states] == [len(gt.supports[s]) for s in (1, 2, 3)]
    half_cf, _ = counterfactual_half_step(window, j)
    w = torch.as_tensor(traj.mixing[0].toarray(), dtype=torch.float32)
    closed = traj.states[1] - w[:, [j]] * (traj.halves[0][j] - half_cf)
    torch.testing.assert_close(states[0], closed[gt.supports[1]], rtol=0, atol=1e-6)
    delta, opt_delta = update_difference(window, j)
    curvature = estimate_cascade(window, j, delta, opt_delta, 3, "curvature")
    width = delta.shape[-1]
    for s in (1, 2, 3):
        rows = gt.supports[s]
        exact = (traj.states[s][rows] - states[s - 1])[:, :width].double()
        floor = (window.test_gradients(s, rows).double() * exact).sum(dim=1).numpy()
        assert np.abs(gt.values[s] - floor).sum() <= np.abs(gt.values[s] - curvature.values[s]).sum() * 1.01


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_replay_that_removes_nothing_is_the_recorded_run(optimizer: str) -> None:
    """On the CPU in fp32, DICE-GT compares its counterfactual states with the recorded ones (``replay_factual`` is
    off): replaying a probe that removes nothing (j's step on its whole minibatch) reproduces them bit for bit — j's
    step alone, the reached participants' gossip (over only the columns they read) and their steps — and every term
    is exactly 0."""
    window, _ = make_window("exponential", nodes=32, optimizer=optimizer)
    traj, hops = window.trajectory, 3
    assert not window.replay_factual
    for j in (0, 13):
        states: list[torch.Tensor] = []
        gt = ground_truth_cascade(window, j, hops, np.zeros(0, np.int64), counterfactual=states)
        assert len(gt.supports[hops]) < 32  # the replay follows a part of the network
        for s in range(1, hops + 1):
            assert torch.equal(states[s - 1], traj.states[s][gt.supports[s]])
            assert not gt.values[s].any()
        assert gt.half == 0


def test_a_round_computes_test_gradients_and_losses_only_for_the_participants_its_probes_reach() -> None:
    """The window's z′ gradients and losses (shared by a round's probes) are computed once per participant read, not
    for all N; the values are the ones computed for everyone."""
    window, _ = make_window("ring", nodes=24)
    computed: list[tuple[int, list[int]]] = []
    compute = window.compute_test_gradients

    def counted(s: int, rows: np.ndarray) -> torch.Tensor:
        computed.append((s, rows.tolist()))
        return compute(s, rows)

    window.compute_test_gradients = counted
    reached: dict[int, set[int]] = {s: set() for s in range(1, 4)}
    for j in (5, 6):
        delta, opt_delta = update_difference(window, j)
        estimate_cascades(window, j, delta, opt_delta, 3, ["first-order", "curvature", "exact-readout"])
        gt = ground_truth_cascade(window, j, 3)
        for s in reached:
            reached[s] |= set(gt.supports[s].tolist())
            # each reached participant once (the second probe adds only those the first did not reach), no other
            assert sorted(r for t, rows in computed if t == s for r in rows) == sorted(reached[s])
    assert len(reached[3]) == 8  # a ring's 3-hop reach from 5 and from 6, of 24
    everyone = np.arange(24)
    for s in range(1, 4):
        rows = np.array(sorted(reached[s]))
        torch.testing.assert_close(window.test_gradients(s, rows), compute(s, everyone)[rows], rtol=0, atol=1e-7)
        everyone_losses = window.zprime_losses(everyone, window.trajectory.states[s]).numpy()
        np.testing.assert_allclose(window.test_losses(s, rows).numpy(), everyone_losses[rows], rtol=1e-12)


def test_single_sample_ground_truth_removes_exactly_that_sample() -> None:
    window, _ = make_window("ring", nodes=6)
    j, removed = 4, np.array([3])
    x, y = window.batches(window.trajectory.t0)
    keep = [i for i in range(x.shape[1]) if i != 3]
    state, _ = counterfactual_half_step(window, j, removed)
    pop = window.population(0, np.array([j]))
    pop.half_step(x[[j]][:, keep], y[[j]][:, keep])
    torch.testing.assert_close(state, pop.state[0])
    whole, _ = counterfactual_half_step(window, j)
    torch.testing.assert_close(whole, window.trajectory.states[0][j])  # whole batch: no step at all


def test_supports_and_first_reached_follow_the_graph() -> None:
    window, experiment = make_window("ring", nodes=8, hops=3)
    supports = reach(window.trajectory.mixing, 0)
    assert [s.tolist() for s in supports] == [[0], [0, 1, 7], [0, 1, 2, 6, 7], [0, 1, 2, 3, 5, 6, 7]]
    assert [n.tolist() for n in first_reached(supports)] == [[], [1, 7], [2, 6], [3, 5]]
    hops = experiment.topology.hop_distances(0)
    for s, new in enumerate(first_reached(supports)[1:], start=1):
        assert (hops[new] == s).all()


def test_single_sample_update_difference_is_exact_for_sgd() -> None:
    """For SGD on a mean loss, Δ = −η (g_z − ḡ)/(|B| − 1) is the exact difference of the two steps."""
    window, _ = make_window("ring", nodes=6, dtype=torch.float64)
    j, pos = 2, 5
    delta, _ = sample_update_difference(window, j, pos)
    without, _ = counterfactual_half_step(window, j, np.array([pos]))
    with_z, _ = counterfactual_half_step(window, j, np.array([], np.int64))  # the full step, in float64 too
    width = delta.shape[0]
    exact = with_z[:width] - without[:width]
    torch.testing.assert_close(delta, exact, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
@pytest.mark.parametrize("variant", ["first-order", "curvature"])
def test_adjoint_horizon_equals_forward_recursion_for_every_source(optimizer: str, variant: str) -> None:
    window, experiment = make_window("exponential", nodes=8, optimizer=optimizer, hops=3)
    all_sources = adjoint_horizon(window, experiment.q, 3, variant)
    for j in range(8):
        delta, opt_delta = update_difference(window, j)
        forward = estimate_cascade(window, j, delta, opt_delta, 3, variant).horizon_total(experiment.q, 3)
        assert all_sources[j] == pytest.approx(forward, rel=1e-4, abs=1e-9)


def test_adams_adjoint_horizon_carries_the_lagging_counter() -> None:
    """Under Adam the shared adjoint adds every source's lag terms (its later steps moved by the counter one behind)
    but keeps J at the factual counter, where the forward recursion takes the source's lagging one: within 5% of the
    forward horizon totals, and several times closer than without the lag terms."""
    window, experiment = make_window("exponential", nodes=8, optimizer="adam", lr=0.01, hops=3, dtype=torch.float64)
    all_sources = adjoint_horizon(window, experiment.q, 3, "curvature")
    forward, without = [], []
    for j in range(8):
        delta, opt_delta = update_difference(window, j)
        forward.append(estimate_cascade(window, j, delta, opt_delta, 3, "curvature").horizon_total(experiment.q, 3))
        no_lag = {k: v for k, v in opt_delta.items() if k != "step"}
        without.append(estimate_cascade(window, j, delta, no_lag, 3, "curvature").horizon_total(experiment.q, 3))
    forward, without = np.array(forward), np.array(without)
    scale = np.abs(forward).max()
    assert np.abs(all_sources - forward).max() < 0.05 * scale
    assert np.abs(all_sources - forward).max() < 0.3 * np.abs(without - forward).max()


def test_first_order_for_all_sources_equals_per_source_recursion() -> None:
    window, _ = make_window("exponential", nodes=8, hops=3)
    deltas = torch.stack([update_difference(window, j)[0] for j in range(8)])
    half, values = first_order_all_sources(window, deltas, 3)
    for j in range(8):
        cascade = estimate_cascade(window, j, deltas[j], {}, 3, "first-order")
        assert half[j] == pytest.approx(cascade.half, rel=1e-5)
        for s in (1, 2, 3):
            np.testing.assert_allclose(values[s - 1][cascade.supports[s], j], cascade.values[s], rtol=1e-4, atol=1e-9)
            outside = np.setdiff1d(np.arange(8), cascade.supports[s])
            assert (values[s - 1][outside, j] == 0).all()


def test_validation_zprime_uses_each_targets_own_split() -> None:
    """With z′_k = k's validation split, test gradients and GT losses are k's own (concepts §2)."""
    window, experiment = make_window("ring", nodes=6)
    ds, part = experiment.dataset, experiment.partition
    k = 3
    x_val = torch.from_numpy(ds.x_train[part.val[k]])
    y_val = torch.from_numpy(ds.y_train[part.val[k]])
    width = model_state_layouts(window.model)[0].width
    m = max(len(v) for v in part.val)
    xs = torch.zeros(6, m, *ds.input_shape)
    ys = torch.zeros(6, m, dtype=torch.int64)
    mask = torch.zeros(6, m, dtype=torch.bool)
    for i, v in enumerate(part.val):
        xs[i, : len(v)], ys[i, : len(v)], mask[i, : len(v)] = torch.from_numpy(ds.x_train[v]), \
            torch.from_numpy(ds.y_train[v]), True
    own = Window(window.trajectory, window.model, window.optimizer, window.batches, window.heldout, (xs, ys, mask))
    reference = window.population(2, np.array([k]))
    window.model.eval()
    expected = reference.loss_and_grad(x_val[None], y_val[None])[1][0]
    window.model.train()
    torch.testing.assert_close(own.test_gradients(2, np.array([k]))[0], expected, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(own.test_gradients(2, np.array([k]))[0], window.test_gradients(2, np.array([k]))[0])
    delta, opt_delta = update_difference(own, 0)
    gt = ground_truth_cascade(own, 0, 2)
    est = estimate_cascade(own, 0, delta, opt_delta, 2, "curvature")
    for s in (1, 2):
        assert np.corrcoef(gt.values[s], est.values[s])[0, 1] > 0.95
    assert width == delta.shape[0]


@pytest.mark.parametrize("kind", ["scale", "free-ride"])
def test_influence_replays_and_estimates_follow_corrupted_updates(kind: str) -> None:
    """Participants sending θ + cΔ are replayed (GT) and differentiated (E) as they behave."""
    from dice_ray.methods.dice.trajectory import record_windows

    cfg = build_config({"nodes": 6, "topology": {"name": "ring"}, "data": {"dataset": "digits", "heldout_size": 64},
                        "model": {"name": "mlp-tanh"}, "optim": {"lr": 0.05, "batch_size": 8},
                        "misbehavior": {"kind": kind, "selection": "ids", "ids": [1], "factor": 3.0}})
    experiment = prepare(cfg)
    window = window_for(experiment, record_windows(experiment, [2], 3)[0])
    delta, opt_delta = update_difference(window, 1)
    gt = ground_truth_cascade(window, 1, 3)
    if kind == "free-ride":  # it sends what it received: its minibatch changes nothing anywhere
        assert gt.half == 0 and all(np.abs(v).max() < 1e-7 for v in gt.values[1:])  # float rounding only
        return
    est = estimate_cascade(window, 0, *update_difference(window, 0), 3, "curvature")
    truth = ground_truth_cascade(window, 0, 3)  # source 0's cascade passes through the scaling participant 1
    for s in (1, 2, 3):
        np.testing.assert_allclose(est.values[s], truth.values[s], rtol=0.15, atol=2e-5)
    assert np.abs(gt.values[1]).sum() > 0 and delta.abs().sum() > 0


# Participants 4 and 6 of an 8-node exponential graph hold no data: source 3's cascade reaches both (3 → 4 at hop 1).
IDLE = [4, 6]


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_participants_with_no_data_do_not_step_in_replays_or_estimates(optimizer: str) -> None:
    """They take no local step in training (θ^{t+½} = θ^t): DICE-GT's replay and DICE-E's J must not step them either.
    Both are checked against the explicit run in which they do not step: DICE-GT is its loss difference without j's
    update, the curvature estimate its forward-mode derivative along that update."""
    window, _ = make_window("exponential", nodes=8, optimizer=optimizer, dtype=torch.float64, idle=IDLE)
    traj, source, hops = window.trajectory, 3, 3
    torch.testing.assert_close(traj.halves[0][IDLE], traj.states[0][IDLE])  # training did not step them
    run, width = explicit_replay(window, source, hops)
    factual = {k: traj.opt_states[1][k][source] for k in traj.opt_states[1] if k != "step"}
    before = {k: traj.opt_states[0][k][source] for k in factual}
    with_update = run(traj.halves[0][source, :width], factual)
    without = run(traj.states[0][source, :width], before)
    gt = ground_truth_cascade(window, source, hops)
    delta, opt_delta = update_difference(window, source)
    cascade = estimate_cascade(window, source, delta, opt_delta, hops, "curvature")
    _, derivatives = jvp(run, (traj.halves[0][source, :width], factual), (delta, opt_delta))
    for s in range(1, hops + 1):
        rows = gt.supports[s]
        assert set(IDLE) <= set(rows.tolist()) or s == 1
        exact = (with_update[s - 1] - without[s - 1]).detach().numpy()[rows]
        # the recorded trajectory is float32 (the explicit run recomputes it in float64): ~1e-7 relative rounding
        np.testing.assert_allclose(gt.values[s], exact, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(cascade.values[s], derivatives[s - 1].detach().numpy()[rows], rtol=1e-5,
                                   atol=1e-12)


def test_a_participant_with_no_data_influences_no_one() -> None:
    """Its probes (whole batch or one sample of the stand-in batch it never steps on) are 0 by ground truth and by
    every estimate."""
    from dice_ray.methods.dice.estimator import estimate_cascades, sample_second_order_difference

    window, _ = make_window("exponential", nodes=8, optimizer="adam", idle=IDLE)
    variants = ["first-order", "curvature", "second-order", "exact-readout"]
    for removed in (None, np.array([2])):
        gt = ground_truth_cascade(window, 4, 3, removed)
        if removed is None:
            delta, opt_delta = update_difference(window, 4)
            second = None
        else:
            delta, opt_delta = sample_update_difference(window, 4, 2)
            second = sample_second_order_difference(window, 4, 2)
        estimates = estimate_cascades(window, 4, delta, opt_delta, 3, variants, second, True, True)
        for cascade in [gt, *estimates.values()]:
            assert cascade.half == 0.0 and all(np.all(v == 0) for v in cascade.values)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_dice_gt_of_a_probe_that_removes_nothing_is_zero_in_every_mode(precision: str) -> None:
    """A probe that removes no sample changes nothing: DICE-GT must be exactly 0. In a bf16 run the recorded steps
    are bfloat16 and a replay's float32; compared with the recorded states a term carried their difference (7-19% of
    a single-sample probe's), so such a run's factual side is replayed too (tf32 here: that path, in float32)."""
    from dice_ray.methods.dice.trajectory import record_windows

    config = build_config({"nodes": 8, "rounds": 8, "seed": 3, "topology": {"name": "ring"},
                           "data": {"dataset": "digits", "heldout_size": 64}, "engine": {"precision": precision},
                           "optim": {"name": "momentum", "batch_size": 16, "lr": 0.1}, "output": {"progress": False}})
    experiment = prepare(config)
    window = window_for(experiment, record_windows(experiment, [4], 2)[0])
    assert window.replay_factual is (precision != "fp32")
    nothing = ground_truth_cascade(window, 0, 2, np.zeros(0, np.int64))
    assert nothing.half == 0 and all(not v.any() for v in nothing.values[1:])
    one = ground_truth_cascade(window, 0, 2, np.array([0]))
    assert one.half != 0 and all(v.any() for v in one.values[1:])
    # The factual replay is kept for the source's next probe; another source, or a cleared cache, replays afresh.
    other = ground_truth_cascade(window, 1, 2, np.array([0]))
    window.clear_cache()
    for cascade, source in ((one, 0), (other, 1)):
        again = ground_truth_cascade(window, source, 2, np.array([0]))
        assert again.half == cascade.half
        assert all(np.array_equal(a, b) for a, b in zip(again.values, cascade.values, strict=True))


def test_a_large_influence_measurement_is_said_before_the_run() -> None:
    """The default probes (the last 10 rounds x every participant) grow as N, and each replays the participants it
    reaches in R hops: past COSTLY_REPLAYS probe-participant pairs the run says how many and how to choose fewer; in
    the loop, an upper bound of the perturbations' memory past FLIGHT_WARNING_BYTES. The README's 16-participant
    study says nothing."""
    from dice_ray.experiment import config_topology
    from dice_ray.methods.dice.probes import influence_cost

    def config(**influence: object) -> object:
        return build_config({"nodes": influence.pop("nodes", 16), "rounds": 30, "data": {"dataset": "digits"},
                             "topology": {"name": influence.pop("topology", "exponential")},
                             "influence": {"enabled": True, "hops": 3, **influence}})

    def cost(c: object, width: int = 4_000) -> str | None:
        return influence_cost(c, width, config_topology(c).mixing_matrix)

    assert cost(config()) is None
    said = cost(config(nodes=256))
    w = config_topology(config(nodes=256)).mixing_matrix(0).toarray()
    reached = np.count_nonzero(np.linalg.matrix_power(w + np.eye(256), 3)[:, 0])  # the same from every source
    assert said.startswith(f"warning: influence: 2,560 probes (10 rounds x 256 a round), each following {reached} of "
                           "256 participants on average")
    assert "--sample-sources K" in said and len(said.splitlines()) == 1
    assert cost(config(nodes=256, sample_sources=8)) is None
    # a ring's probe reaches 7 participants in 3 hops, whatever N: 10 N x 7 pairs pass 200,000 between N = 2,048 and
    # 4,096 (the participants themselves, N x 10 N, would have at N = 256)
    assert cost(config(nodes=2048, topology="ring")) is None
    assert "40,960 probes (10 rounds x 4,096 a round), each following 7 of 4,096" in cost(config(nodes=4096,
                                                                                                 topology="ring"))
    online = cost(config(nodes=256, online=True, sample_sources=64, variants=["first-order", "curvature"]), 100_000)
    # 64 sources a round, 4 rounds in flight (R = 3), 256 participants, 100k numbers, 1 perturbation (curvature's a;
    # first-order keeps a scale per participant), 4 bytes
    assert f"up to 256 probes in flight keep up to {256 * 256 * 100_000 * 1 * 4 / 2**30:,.0f} GiB" in online
    assert cost(config(nodes=256, online=True, sample_sources=64, variants=["first-order"]), 100_000) is None
