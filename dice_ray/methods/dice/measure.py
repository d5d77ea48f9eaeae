"""Measure probes: DICE-GT and DICE-E (every variant asked for) of each probe, as rows of the influence tables.

``measure_probes`` is the unit of work one Ray task runs (the probes of one round); it knows nothing of
Ray. Row layouts are those of ``results.INFLUENCE`` and ``results.DICE``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dice_ray.core.misbehavior import misbehavior, sent_factors
from dice_ray.core.models import build_model, use_layer_modes
from dice_ray.core.participants import ParticipantBlock
from dice_ray.methods.dice.estimator import (
    Cascade,
    Window,
    estimate_cascades,
    reading_b,
    sample_second_order_difference,
    sample_update_difference,
    update_difference,
)
from dice_ray.methods.dice.ground_truth import ground_truth_cascade
from dice_ray.methods.dice.probes import Probe
from dice_ray.methods.dice.trajectory import Trajectory

COLUMNS = {"first-order": "est_first_order", "curvature": "est_curvature", "second-order": "est_second_order",
           "exact-readout": "est_exact_readout"}


def measure_probes(window: Window, probes: list[Probe], q: np.ndarray, hops: int, variants: list[str],
                   ground_truth: bool, distances: dict[int, np.ndarray],
                   with_b: bool = True, exact_b: bool = False) -> tuple[list[dict], list[dict]]:
    """Return (influence rows, dice rows) for ``probes`` (all of round ``window.trajectory.t0``).

    ``distances[j]``: hop distances from source j (``Topology.hop_distances``) for the ``distance`` column;
    ``with_b``: ``influence.second_order_b``; ``exact_b``: ``influence.exact_readout_b``.
    """
    influence: list[dict[str, Any]] = []
    dice: list[dict[str, Any]] = []
    for probe in probes:
        j = probe.source
        if probe.sample_index is None:
            delta, opt_delta = update_difference(window, j)
            removed = None
        else:
            delta, opt_delta = sample_update_difference(window, j, probe.sample_index)
            removed = np.array([probe.sample_index])
        # b₀, the second-order part of a single sample's Δ (zero for a whole batch), for the variants that read b
        second = sample_second_order_difference(window, j, probe.sample_index) \
            if probe.sample_index is not None and any(reading_b(variants, with_b, exact_b).values()) else None
        cascades: dict[str, Cascade | None] = {
            "gt": ground_truth_cascade(window, j, hops, removed) if ground_truth else None,
            **{COLUMNS[v]: cascade
               for v, cascade in estimate_cascades(window, j, delta, opt_delta, hops, variants, second,
                                                   with_b, exact_b).items()},
        }
        rows_influence, rows_dice = probe_rows(probe, cascades, hops, q, distances[j])
        influence += rows_influence
        dice += rows_dice
    return influence, dice


def warn_unreadable(influence: list[dict[str, Any]]) -> None:
    """One warning line if the exact readout read NaN anywhere: there θ_k − δ_k is no model's state (a BatchNorm
    running variance moved below 0), so L(θ_k − δ_k; z′) is not a number (concepts §4, models with BatchNorm)."""
    column = COLUMNS["exact-readout"]
    values = np.array([row.get(column) for row in influence], dtype=float)
    bad = int(np.isnan(values).sum()) if len(values) and not np.isnan(values).all() else 0
    if bad:
        import sys

        print(f"warning: the exact readout is NaN for {bad} of {len(values)} terms: θ_k − δ_k is no model's state "
              "there (a BatchNorm running variance moved below 0; see concepts, models with BatchNorm)",
              file=sys.stderr)


def probe_rows(probe: Probe, cascades: dict[str, Cascade | None], hops: int, q: np.ndarray,
               distances: np.ndarray) -> tuple[list[dict], list[dict]]:
    """Return (influence rows, dice rows) of one probe from its cascades (column name -> ``Cascade`` or None
    where not measured; at least one measured). ``distances``: hop distances from the probe's source."""
    j = probe.source
    done = [c for c in cascades.values() if c is not None]
    supports = done[0].supports
    base = {"round": probe.round, "source": j, "probe_id": probe.probe_id, "sample_index": probe.sample_index}
    influence = [{**base, "target": j, "step": 0, "distance": 0,
                  **{name: None if c is None else c.half for name, c in _all(cascades).items()}}]
    for s in range(1, hops + 1):
        for i, k in enumerate(supports[s].tolist()):
            influence.append({**base, "target": k, "step": s, "distance": int(distances[k]),
                              **{name: None if c is None else float(c.values[s][i])
                                 for name, c in _all(cascades).items()}})
    dice = [{**base, "hops": r,
             **{name: None if c is None else c.dice(q, r) for name, c in _all(cascades).items()},
             **{f"{name}_hop": None if c is None else c.hop_term(q, r) for name, c in _all(cascades).items()},
             **{f"{name}_horizon": None if c is None else c.horizon_total(q, r) for name, c in _all(cascades).items()}}
            for r in range(1, hops + 1)]
    return influence, dice


def window_for(experiment: Any, trajectory: Trajectory) -> Window:
    """Return the ``Window`` of ``trajectory`` for ``experiment`` (its model, optimizer, minibatches and z′), on the
    trajectory's device: every tensor a replay or estimate creates from it follows it there."""
    import torch

    device = trajectory.device
    ds = experiment.dataset
    block = ParticipantBlock.for_experiment(experiment, device=str(device))  # also sets the precision's CUDA modes
    model = build_model(experiment.config.model.name, ds.input_shape, ds.num_classes, experiment.config.seed).to(device)
    # the convolutions and poolings the recording's block ran
    use_layer_modes(model, experiment.config.model.conv, experiment.config.model.pool, device)
    heldout = (torch.as_tensor(np.array(experiment.heldout[0]), device=device),
               torch.as_tensor(np.array(experiment.heldout[1]), device=device))
    validation = (block.x_val, block.y_val, block.val_mask) if experiment.config.influence.zprime == "validation" \
        else None
    factors = sent_factors(misbehavior(experiment.config.misbehavior), experiment.misbehaving, experiment.misbehaving,
                           experiment.nodes)
    return Window(trajectory, model, experiment.config.optim.spec(), block.minibatch, heldout, validation, factors,
                  block.population.loss, idle=block.nodes[block.idle],
                  replay_factual=experiment.config.engine.precision != "fp32" or device.type != "cpu")


def measure_round(experiment: Any, trajectory: Trajectory, probes: list[Probe],
                  given: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = ()) -> tuple[list[dict],
                                                                                                   list[dict]]:
    """Measure ``probes`` (all of round ``trajectory.t0``) with the run's influence settings. ``given[s]``: (rows,
    z′ gradients, z′ losses) at θ^{t0+s} computed for the round's tasks (``replays.zprime_task``)."""
    inf = experiment.config.influence
    distances = {j: experiment.topology.hop_distances(j, probes[0].round) for j in {p.source for p in probes}}
    window = window_for(experiment, trajectory)
    for s, (rows, gradients, losses) in enumerate(given):
        window.given(s, rows, gradients, losses)
    return measure_probes(window, probes, experiment.q, inf.hops, list(inf.variants), inf.ground_truth, distances,
                          inf.second_order_b, inf.exact_readout_b)


def _all(cascades: dict[str, Cascade | None]) -> dict[str, Cascade | None]:
    """Every column, with None for variants not computed."""
    return {name: cascades.get(name) for name in ("gt", *COLUMNS.values())}
