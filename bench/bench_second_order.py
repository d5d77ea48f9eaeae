"""Second-order DICE-E against the curvature variant: cost, and alignment with DICE-GT per hop.

For every (model, rounds) setting — 16 participants, exponential graph, digits split Dirichlet(α = 0.5), SGD
η = 0.05, batch 16, whole-batch probes of every source over the last ``--last`` rounds that leave room for R = 3
hops — one run is trained in this process (no Ray) and every probe is measured with DICE-GT and four estimates:
first-order, curvature, second-order, and second-order without b (b ≡ 0: e = ∇ᵀa − ½ aᵀH′a, the z′ Hessian term
alone). Per hop r it prints, over the probes, the relative error Σ|GT − E| / Σ|GT| and the Spearman correlation
of the hop-r term Σ_{k ∈ N^{(r)}(j)} q_k e_k^{(r)} (the alignment report's ``hop`` quantity), and the estimator
seconds of second-order against curvature (test gradients are computed once per window and shared: they are
excluded from both; DICE-GT replays are unchanged by the variant).

    python bench/bench_second_order.py                          # mlp and mlp-tanh, 30 and 100 rounds
    python bench/bench_second_order.py --models mlp --rounds 30 --last 1

Targets: estimator time ≤ 2.5x curvature; ReLU ("mlp") hop-1 error ≤ 0.25x first-order's with Spearman ≥ 0.99,
hops 2–3 no worse than curvature; tanh every hop ≤ 0.25x curvature's error.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from scipy import stats

from dice_ray.config import build_config
from dice_ray.experiment import prepare
from dice_ray.methods.dice.estimator import estimate_cascade, update_difference
from dice_ray.methods.dice.ground_truth import ground_truth_cascade
from dice_ray.methods.dice.measure import window_for
from dice_ray.methods.dice.probes import probe_rounds, select_probes
from dice_ray.methods.dice.trajectory import record_windows

ESTIMATES = ("first-order", "curvature", "second-order", "second-order, b = 0")
HOPS = 3


def measure(model: str, rounds: int, last: int, lr: float) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Return (hop terms: name -> [probes, HOPS] for gt and every estimate, seconds per estimate kind)."""
    config = build_config({"seed": 0, "nodes": 16, "rounds": rounds, "topology": {"name": "exponential"},
                           "data": {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5},
                           "model": {"name": model}, "optim": {"lr": lr, "batch_size": 16},
                           "influence": {"enabled": True, "hops": HOPS, "last": last}, "output": {"progress": False}})
    experiment = prepare(config)
    q = experiment.q
    starts, probes = probe_rounds(config), select_probes(config)
    terms: dict[str, list[list[float]]] = {name: [] for name in ("gt", *ESTIMATES)}
    seconds = dict.fromkeys(ESTIMATES, 0.0)
    for t, trajectory in zip(starts, record_windows(experiment, starts, HOPS), strict=True):
        window = window_for(experiment, trajectory)
        for s in range(HOPS + 1):  # the shared test gradients, outside the timings
            window.test_gradients(s, np.arange(16))
        for probe in (p for p in probes if p.round == t and p.sample_index is None):
            j = probe.source
            delta, opt_delta = update_difference(window, j)
            cascades = {"gt": ground_truth_cascade(window, j, HOPS)}
            for name in ESTIMATES:
                variant, with_b = (name, True) if name != "second-order, b = 0" else ("second-order", False)
                start = time.perf_counter()
                cascades[name] = estimate_cascade(window, j, delta, opt_delta, HOPS, variant, with_b=with_b)
                seconds[name] += time.perf_counter() - start
            for name, cascade in cascades.items():
                terms[name].append([cascade.hop_term(q, r) for r in range(1, HOPS + 1)])
    return {name: np.array(v) for name, v in terms.items()}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "mlp-tanh"])
    parser.add_argument("--rounds", nargs="+", type=int, default=[30, 100], help="early and late")
    parser.add_argument("--last", type=int, default=3, help="probe rounds per run (16 sources each)")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    for model in args.models:
        for rounds in args.rounds:
            terms, seconds = measure(model, rounds, args.last, args.lr)
            gt = terms["gt"]
            print(f"\n{model}, {rounds} rounds, {len(gt)} probes; estimator seconds: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items())
                  + f"; second-order / curvature = {seconds['second-order'] / seconds['curvature']:.2f}x")
            print(f"{'hop':>3} {'variant':>20} {'rel.err':>8} {'spearman':>8} {'err/first':>9} {'err/curv':>8}")
            for r in range(HOPS):
                errors = {k: np.abs(gt[:, r] - terms[k][:, r]).sum() / np.abs(gt[:, r]).sum() for k in ESTIMATES}
                for k in ESTIMATES:
                    rho = stats.spearmanr(gt[:, r], terms[k][:, r]).statistic
                    print(f"{r + 1:>3} {k:>20} {errors[k]:8.4f} {rho:8.4f} {errors[k] / errors['first-order']:9.3f} "
                          f"{errors[k] / errors['curvature']:8.3f}")


if __name__ == "__main__":
    main()
