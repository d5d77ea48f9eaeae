"""How much of DICE-E's error is the linearization of the test loss, and how much the propagation?

DICE-E (concepts §4) approximates
d_k^{(s)} = L(θ_k^{t+s}) − L(θ_{k∖z}^{t+s}) by e_k^{(s)} = ∇L(θ_k^{t+s}; z′)ᵀ δ_k^{(s)},
with δ propagated by the recursion (``first-order``: J = I; ``curvature``: J = I − ηH). Two errors add up:
δ ≠ θ_k − θ_{k∖z} (propagation, what curvature corrects) and L not linear along δ (the test loss; no
variant of the recursion with a first-order readout can remove it). This script measures the second alone: the
*floor* e*_k^{(s)} = ∇L(θ_k^{t+s}; z′)ᵀ (θ_k^{t+s} − θ_{k∖z}^{t+s}), the estimate with the exact perturbation taken
from the DICE-GT replay. ``second-order`` reads the perturbation to second order instead (e₂ = ∇ᵀ(a + b) − ½ aᵀH′a,
concepts §4), so it can go below that floor; its own floor is the second-order readout of the exact perturbation,
e₂* = ∇ᵀδ* − ½ δ*ᵀH′δ*. For every step s it prints the relative error Σ|GT − E| / Σ|GT| over all recorded terms of
first-order, curvature, second-order and the two floors. When curvature is at the floor, no propagation can do
better with a first-order readout, and the curvature/first-order error ratio is bounded below by floor /
first-order.

Workload: the README's alignment setting — digits, the paper's MLP, 16-node ring, η = 0.05, batch 16,
whole-batch probes of every source over the last 10 rounds that leave room for R = 3 hops — for each
``--rounds`` value (one run in this process each, no Ray)::

    python bench/alignment_floor.py                       # --rounds 30 70 100
    python bench/alignment_floor.py --rounds 30 --topology exponential
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from dice_ray.config import build_config
from dice_ray.experiment import prepare
from dice_ray.methods.dice.estimator import estimate_cascades, update_difference
from dice_ray.methods.dice.ground_truth import ground_truth_cascade
from dice_ray.methods.dice.measure import window_for
from dice_ray.methods.dice.probes import probe_rounds, select_probes
from dice_ray.methods.dice.trajectory import record_windows

VARIANTS = ("first-order", "curvature", "second-order")


def relative_errors(rounds: int, topology: str, hops: int, lr: float) -> dict[int, dict[str, float]]:
    """Per step s = 1..hops: Σ|GT − E| / Σ|GT| over every term d_k^{(s)} of every probe, E ∈ {first-order,
    curvature, second-order, floor, floor₂}."""
    config = build_config({"seed": 0, "nodes": 16, "rounds": rounds, "topology": {"name": topology},
                           "data": {"dataset": "digits"}, "optim": {"lr": lr, "batch_size": 16},
                           "influence": {"enabled": True, "hops": hops}, "output": {"progress": False}})
    experiment = prepare(config)
    starts, probes = probe_rounds(config), select_probes(config)
    sums = {s: dict.fromkeys(("gt", *VARIANTS, "floor", "floor2"), 0.0) for s in range(1, hops + 1)}
    for t, trajectory in zip(starts, record_windows(experiment, starts, hops), strict=True):
        window = window_for(experiment, trajectory)
        for probe in (p for p in probes if p.round == t and p.sample_index is None):
            j = probe.source
            delta, opt_delta = update_difference(window, j)
            states: list[torch.Tensor] = []
            gt = ground_truth_cascade(window, j, hops, counterfactual=states)
            estimates = estimate_cascades(window, j, delta, opt_delta, hops, list(VARIANTS))
            width = delta.shape[-1]
            for s in range(1, hops + 1):
                rows = gt.supports[s]
                exact = (trajectory.states[s][rows] - states[s - 1])[:, :width].double()
                floor = (window.test_gradients(s, rows).double() * exact).sum(dim=1).numpy()
                exact32 = exact.to(delta.dtype)
                floor2 = floor - 0.5 * window.hessian_forms(s, rows, exact32, exact32).double().numpy()
                sums[s]["gt"] += float(np.abs(gt.values[s]).sum())
                sums[s]["floor"] += float(np.abs(gt.values[s] - floor).sum())
                sums[s]["floor2"] += float(np.abs(gt.values[s] - floor2).sum())
                for v, cascade in estimates.items():
                    sums[s][v] += float(np.abs(gt.values[s] - cascade.values[s]).sum())
    return {s: {k: v / part["gt"] for k, v in part.items() if k != "gt"} for s, part in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, nargs="+", default=[30, 70, 100])
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--hops", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.func.jvp's note on torch.jit.script
    torch.set_num_threads(2)
    print("| run length | step s | first-order | curvature | second-order | floor (exact δ) | floor₂ (exact δ, "
          "second-order readout) | curvature / first-order | floor / first-order | second-order / floor |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rounds in args.rounds:
        for s, err in relative_errors(rounds, args.topology, args.hops, args.lr).items():
            print(f"| {rounds} | {s} | {err['first-order']:.4f} | {err['curvature']:.4f} | {err['second-order']:.4f} | "
                  f"{err['floor']:.4f} | {err['floor2']:.4f} | {err['curvature'] / err['first-order']:.2f} | "
                  f"{err['floor'] / err['first-order']:.2f} | {err['second-order'] / err['floor']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
