"""Second-order and exact-readout DICE-E against the curvature variant: alignment with DICE-GT per hop, and cost.

For every (model, rounds, seed) setting — 16 participants, exponential graph, digits split Dirichlet(α = 0.5), SGD η =
0.05, batch 16, whole-batch probes of every source over the last ``--last`` rounds that leave room for R = 3 hops — one
run is trained in this process (no Ray) and every probe is measured with DICE-GT and six estimates: first-order,
curvature, second-order, second-order without b (b ≡ 0: e = ∇ᵀa − ½ aᵀH′a, the z′ Hessian term alone,
``influence.second_order_b`` false), and exact-readout (the z′ loss difference L(θ_k) − L(θ_k − a) along the curvature
perturbation a, ``influence.exact_readout_b`` false, its default; and with b: δ = a + b read exactly, second order's
propagation). Per (model, rounds) and hop r it prints, over the
probes of all seeds, the relative error Σ|GT − E| / Σ|GT| and the Spearman correlation of the hop-r term Σ_{k ∈
N^{(r)}(j)} q_k e_k^{(r)} (the alignment report's ``hop`` quantity), with the spread of the error ratios over the seeds.
``--kinks``: what is left at hop 1 on the ReLU MLP, split by z′ samples whose activation pattern flips between the two
runs; ``--adjoint``: what the missing second-order adjoint form would save.

Cost: the estimator seconds of each variant in the same process, every variant warmed up once before timing and the
variants run in a rotating order per probe (and curvature with second-order in one pass, ``estimate_cascades``,
the cost of asking for both); test gradients and the exact readout's shared L(θ_k; z′) are computed once per window
and shared by every probe (excluded from all), and DICE-GT replays are unchanged by the variant. The ratios to
curvature (and exact-readout / second-order) are printed for every z′ size in ``--heldout-sizes`` (the z′ Hessian
form's and loss's cost grows with z′, a local step's does not), on replayed windows and in the round loop
(``--online-dice``, whole local runs).

    python bench/bench_second_order.py                                   # mlp and mlp-tanh, 30 and 100 rounds
    python bench/bench_second_order.py --models mlp --rounds 30 --seeds 0 --last 1

Targets: estimator time ≤ 2.5x curvature; ReLU ("mlp") hop-1 error ≤ 0.25x first-order's with Spearman ≥ 0.99,
hops 2–3 no worse than curvature; tanh every hop ≤ 0.25x curvature's error. Exact readout: cost ≤ ½ second-order's
at every z′ size; hops 2–3 error within 5% of second-order's or better.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from _tables import print_plain
from scipy import stats

from dice_ray.config import build_config
from dice_ray.experiment import prepare
from dice_ray.methods.dice.estimator import estimate_cascade, estimate_cascades, update_difference
from dice_ray.methods.dice.ground_truth import ground_truth_cascade
from dice_ray.methods.dice.measure import window_for
from dice_ray.methods.dice.probes import probe_rounds, select_probes
from dice_ray.methods.dice.trajectory import record_windows

EXACT_B = "exact-readout, with b"  # δ = a + b read exactly: second order's propagation (influence.exact_readout_b)
ESTIMATES = ("first-order", "curvature", "second-order", "second-order, b = 0", "exact-readout", EXACT_B)
BOTH = "curvature + second-order"  # one pass (estimate_cascades): curvature read off second-order's a
TIMED = (*ESTIMATES, BOTH)
HOPS = 3
NODES = 16


def _config(model: str, rounds: int, seed: int, last: int, lr: float, heldout: int | None):
    data = {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5}
    if heldout is not None:
        data["heldout_size"] = heldout
    return build_config({"seed": seed, "nodes": NODES, "rounds": rounds, "topology": {"name": "exponential"},
                         "data": data, "model": {"name": model}, "optim": {"lr": lr, "batch_size": 16},
                         "influence": {"enabled": True, "hops": HOPS, "last": last}, "output": {"progress": False}})


def _estimate(window, j: int, name: str):
    delta, opt_delta = update_difference(window, j)
    if name == BOTH:
        return estimate_cascades(window, j, delta, opt_delta, HOPS, ["curvature", "second-order"])["second-order"]
    if name == EXACT_B:
        return estimate_cascade(window, j, delta, opt_delta, HOPS, "exact-readout", exact_b=True)
    variant, with_b = (name, True) if name != "second-order, b = 0" else ("second-order", False)
    return estimate_cascade(window, j, delta, opt_delta, HOPS, variant, with_b=with_b)


def measure(model: str, rounds: int, seed: int, last: int, lr: float, ground_truth: bool = True,
            heldout: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, float], int]:
    """Return (hop terms: name -> [probes, HOPS] for gt (if measured) and every estimate, estimator seconds per
    estimate, z′ size)."""
    config = _config(model, rounds, seed, last, lr, heldout)
    experiment = prepare(config)
    q = experiment.q
    starts, probes = probe_rounds(config), select_probes(config)
    terms: dict[str, list[list[float]]] = {name: [] for name in (("gt",) if ground_truth else ()) + ESTIMATES}
    seconds = dict.fromkeys(TIMED, 0.0)
    size = 0
    for t, trajectory in zip(starts, record_windows(experiment, starts, HOPS), strict=True):
        window = window_for(experiment, trajectory)
        size = len(window.heldout[1])
        for s in range(HOPS + 1):  # the shared test gradients and losses, outside the timings
            window.test_gradients(s, np.arange(NODES))
            window.test_losses(s, np.arange(NODES))
        here = [p for p in probes if p.round == t and p.sample_index is None]
        for name in TIMED:  # warm-up: first calls of vmapped and nested forward-mode passes are slower
            _estimate(window, here[0].source, name)
        for i, probe in enumerate(here):
            cascades = {"gt": ground_truth_cascade(window, probe.source, HOPS)} if ground_truth else {}
            for name in TIMED[i % len(TIMED):] + TIMED[: i % len(TIMED)]:
                start = time.perf_counter()
                cascades[name] = _estimate(window, probe.source, name)
                seconds[name] += time.perf_counter() - start
            del cascades[BOTH]
            for name, cascade in cascades.items():
                terms[name].append([cascade.hop_term(q, r) for r in range(1, HOPS + 1)])
    return {name: np.array(v) for name, v in terms.items()}, seconds, size


def _errors(terms: dict[str, np.ndarray], r: int) -> dict[str, float]:
    gt = terms["gt"][:, r]
    return {k: float(np.abs(gt - terms[k][:, r]).sum() / np.abs(gt).sum()) for k in ESTIMATES}


def alignment_table(model: str, rounds: int, seeds: list[int], last: int, lr: float) -> None:
    runs = []
    for seed in seeds:
        terms, _, _ = measure(model, rounds, seed, last, lr)
        runs.append(terms)
    pooled = {k: np.concatenate([run[k] for run in runs]) for k in runs[0]}
    print(f"\n{model}, {rounds} rounds, seeds {' '.join(map(str, seeds))}: {len(pooled['gt'])} probes "
          f"(relative error and Spearman over all of them; ratios: pooled [lowest, highest over the seeds])")
    header = ["hop", "variant", "rel.err", "spearman", "err/first", "err/curv", "err/second"]
    rows = []
    for r in range(HOPS):
        errors = _errors(pooled, r)
        per_seed = [_errors(run, r) for run in runs]
        for k in ESTIMATES:
            rho = stats.spearmanr(pooled["gt"][:, r], pooled[k][:, r]).statistic
            ratios = []
            for base in ("first-order", "curvature", "second-order"):
                spread = [e[k] / e[base] for e in per_seed]
                ratios.append(f"{errors[k] / errors[base]:.3f} [{min(spread):.3f}, {max(spread):.3f}]")
            rows.append([str(r + 1), k, f"{errors[k]:.3g}", f"{rho:.4f}", *ratios])
    print_plain(header, rows)


def kink_table(rounds: list[int], seeds: list[int], last: int, lr: float) -> None:
    """What is left at hop 1 on the ReLU MLP: split each hop-1 term's residual GT − E₂ (δ = W_kj Δ is exact there)
    over the z′ samples, by whether any ReLU of the sample changes sign between θ_k and θ_k − δ (float64)."""
    from torch import nn
    from torch.func import functional_call, jvp

    from dice_ray.core.population import model_state_layouts

    print("\nhop-1 residual of second-order on the ReLU MLP, by z' samples whose ReLU pattern flips between the runs")
    header = ["rounds", "terms", "samples flipping", "|residual|, all", "flipping only", "others only"]
    rows = []
    for r in rounds:
        flipping, totals = [], np.zeros(3)
        terms = 0
        for seed in seeds:
            config = _config("mlp", r, seed, last, lr, None)
            experiment = prepare(config)
            starts, probes = probe_rounds(config), select_probes(config)
            for t, trajectory in zip(starts, record_windows(experiment, starts, HOPS), strict=True):
                window = window_for(experiment, trajectory)
                model = window.double_model().eval()
                layout = model_state_layouts(model)[0]
                x, y = (v.double() if v.is_floating_point() else v for v in window.heldout)
                signs: list[torch.Tensor] = []
                hooks = [m.register_forward_hook(lambda _m, i, _o, signs=signs: signs.append(i[0] > 0))
                         for m in model.modules() if isinstance(m, nn.ReLU)]

                def losses(flat, model=model, layout=layout, x=x, y=y):
                    logits = functional_call(model, layout.views(flat), (x,))
                    return nn.functional.cross_entropy(logits, y, reduction="none")

                for probe in (p for p in probes if p.round == t and p.sample_index is None):
                    delta = update_difference(window, probe.source)[0].double()
                    column = trajectory.mixing[0][:, [probe.source]].toarray().ravel()
                    for k in np.flatnonzero(column):
                        theta = trajectory.states[1][k, :layout.width].double()
                        d = float(column[k]) * delta
                        signs.clear()
                        with torch.no_grad():
                            exact = losses(theta) - losses(theta - d)  # per sample, both runs' ReLU patterns
                        flips = torch.zeros(len(y), dtype=torch.bool)
                        for before, after in zip(signs[: len(signs) // 2], signs[len(signs) // 2:], strict=True):
                            flips |= (before != after).flatten(1).any(dim=1)
                        signs.clear()
                        first, second = jvp(lambda p, d=d: jvp(losses, (p,), (d,))[1], (theta,), (d,))
                        signs.clear()
                        residual = (exact - (first - 0.5 * second)).detach() / len(y)
                        flipping.append(float(flips.double().mean()))
                        totals += [abs(float(residual.sum())), abs(float(residual[flips].sum())),
                                   abs(float(residual[~flips].sum()))]
                        terms += 1
                for hook in hooks:
                    hook.remove()
        rows.append([str(r), str(terms), f"{np.mean(flipping):.1%}",
                     *(f"{v / terms:.3g}" for v in totals)])
    print_plain(header, rows)


def adjoint_table(model: str, rounds: int, seed: int, lr: float) -> None:
    """The horizon total of every source of one probe round: the curvature adjoint (one backward pass for all
    sources) against the forward recursions, curvature and second-order (one per source; second-order has no
    adjoint form, concepts §4). Seconds, the lowest of 3, test gradients shared and excluded."""
    from dice_ray.methods.dice.adjoint import adjoint_horizon

    config = _config(model, rounds, seed, 1, lr, None)
    experiment = prepare(config)
    trajectory = next(iter(record_windows(experiment, probe_rounds(config), HOPS)))
    window = window_for(experiment, trajectory)
    for s in range(HOPS + 1):
        window.test_gradients(s, np.arange(NODES))

    def forward(variant: str) -> list[float]:
        return [_estimate(window, j, variant).horizon_total(experiment.q, HOPS) for j in range(NODES)]

    runs = {"curvature adjoint, all sources": lambda: adjoint_horizon(window, experiment.q, HOPS, "curvature"),
            "curvature, per source": lambda: forward("curvature"),
            "second-order, per source": lambda: forward("second-order")}
    seconds = {}
    for name, run in runs.items():
        run()
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        seconds[name] = best
    base = seconds["curvature adjoint, all sources"]
    print(f"\nhorizon totals of all {NODES} sources, {model}, {rounds} rounds, R = {HOPS} (seconds, lowest of 3)")
    print_plain(["estimate", "seconds", "/ curvature adjoint"],
                [[name, f"{v:.3f}", f"{v / base:.1f}x"] for name, v in seconds.items()])


def _spread(values: list[float]) -> str:
    """The median of repeated ratios with their range, as README's rows print them."""
    return f"{np.median(values):.2f}x [{min(values):.2f}, {max(values):.2f}]"


def cost_table(model: str, rounds: int, seed: int, last: int, lr: float, sizes: list[int], repeats: int) -> None:
    print(f"\nestimator seconds, {model}, {rounds} rounds, seed {seed}, {NODES * last} probes "
          f"(median of {repeats}, ratios as median [range] over the repeats; test gradients and DICE-GT "
          f"replays excluded)")
    header = ["|z'|", *TIMED, "second-order / curvature", "b = 0 / curvature", "both / curvature",
              "exact / curvature", "exact (b) / curvature", "exact / second-order"]
    rows = []
    for size in sizes:
        runs = []
        for _ in range(repeats):
            _, seconds, actual = measure(model, rounds, seed, last, lr, ground_truth=False, heldout=size)
            runs.append(seconds)
        rows.append([str(actual), *(f"{np.median([run[k] for run in runs]):.3f}" for k in TIMED),
                     *(_spread([run[k] / run["curvature"] for run in runs])
                       for k in ("second-order", "second-order, b = 0", BOTH, "exact-readout", EXACT_B)),
                     _spread([run["exact-readout"] / run["second-order"] for run in runs])])
    print_plain(header, rows)


def online_cost_table(model: str, rounds: int, seed: int, sizes: list[int], repeats: int) -> None:
    """In the round loop (``--online-dice``, local engine, this process): probes of the last 10 rounds that leave room
    for R hops, DICE-E only; a variant's estimator time is its run's wall time minus the same run's without
    influence in the same repeat (median and range over ``repeats``)."""
    import tempfile

    import dice_ray

    print(f"\nin the round loop: {model}, {rounds} rounds, seed {seed}, {NODES * 10} probes, seconds of whole runs "
          f"(median of {repeats}) and the estimator's part (minus the same repeat's run without influence)")
    kinds = {"no influence": None, "curvature": ["curvature"], "second-order": ["second-order"],
             "second-order, b = 0": ["second-order"], BOTH: ["curvature", "second-order"],
             "exact-readout": ["exact-readout"]}
    header = ["|z'|", *kinds, "second-order / curvature", "b = 0 / curvature", "both / curvature",
              "exact / curvature", "exact / second-order"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            runs = []
            for _ in range(repeats):
                seconds = {}
                for name, variants in kinds.items():
                    config = _config(model, rounds, seed, 10, 0.05, size).model_dump()
                    config["influence"].update(enabled=variants is not None, online=variants is not None,
                                               ground_truth=False, variants=variants or ["curvature"],
                                               second_order_b=name != "second-order, b = 0")
                    config["output"].update(out=f"{folder}/run", overwrite=True, checkpoint_every=0)
                    start = time.perf_counter()
                    dice_ray.run(dice_ray.RunConfig.model_validate(config), engine="local")
                    seconds[name] = time.perf_counter() - start
                runs.append(seconds)
            extras = [{name: run[name] - run["no influence"] for name in kinds} for run in runs]
            rows.append([str(size), *(f"{np.median([run[k] for run in runs]):.2f}" for k in kinds),
                         *(_spread([extra[k] / extra["curvature"] for extra in extras])
                           for k in ("second-order", "second-order, b = 0", BOTH, "exact-readout")),
                         _spread([extra["exact-readout"] / extra["second-order"] for extra in extras])])
    print_plain(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "mlp-tanh"])
    parser.add_argument("--rounds", nargs="+", type=int, default=[30, 100], help="early and late")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--last", type=int, default=3, help="probe rounds per run (16 sources each)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--heldout-sizes", nargs="+", type=int, default=[16, 64, 360],
                        help="z′ sizes of the cost table (digits' held-out split has 360 images)")
    parser.add_argument("--repeats", type=int, default=3, help="cost runs per z′ size (median and range printed)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: ratios free of thread scheduling)")
    parser.add_argument("--adjoint", action="store_true", help="only the horizon totals' cost: the curvature "
                                                               "adjoint against the per-source recursions")
    parser.add_argument("--kinks", action="store_true", help="only the ReLU MLP's hop-1 residual split by z′ samples "
                                                             "whose activation pattern flips")
    parser.add_argument("--no-cost", action="store_true", help="only the alignment tables")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    if args.kinks:
        kink_table(args.rounds, args.seeds, args.last, args.lr)
        return
    if args.adjoint:
        adjoint_table(args.models[0], args.rounds[0], args.seeds[0], args.lr)
        return
    for model in args.models:
        for rounds in args.rounds:
            alignment_table(model, rounds, args.seeds, args.last, args.lr)
    if args.no_cost:
        return
    for model in args.models:
        cost_table(model, args.rounds[0], args.seeds[0], args.last, args.lr, args.heldout_sizes, args.repeats)
    online_cost_table(args.models[0], args.rounds[0], args.seeds[0], args.heldout_sizes, args.repeats)


if __name__ == "__main__":
    main()
