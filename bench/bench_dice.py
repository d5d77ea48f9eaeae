"""Benchmark of the DICE machinery, each part as a ratio to its floor measured in the same run.

At N = 64 participants on an exponential graph (synthetic 1x8x8 data, the paper's MLP, SGD, batch 16):

(a) first-order DICE-E for all sources and all targets, R = 1..4 (``first_order_all_sources``), against
    its floor: the N·R test-gradient evaluations it cannot avoid (R batched passes over N participants).
    Target ≤ 2x.
(b) the curvature recursion (``estimate_cascade``) against literal path enumeration of Theorem 2
    (``path_cascade``) for R = 1..4: same numbers to 1e-6, and at R = 4 at least 20x faster. Path
    enumeration grows like degree^R, so it is timed on ``--path-sources`` sources and scaled per source.
(c) the adjoint horizon total for all sources with curvature (``adjoint_horizon``) against its floor:
    R·N Hessian-vector products (R batched passes over N participants) plus N test gradients. Target ≤ 2x.
(d) DICE-GT replays per second as Ray tasks with 1 worker against all workers (2 here). Target ≥ 1.6x.
(e) a DICE-GT replay per probe at N = 64, 256 and 1,024 (``--scale-nodes``, R = 3) against its floor: the work it
    cannot avoid, the z′ losses of the participants it reaches (|S_s| at every hop, and j's half-step) and their
    local steps (hops 1..R-1). The ratio stays flat as N grows: a replay follows the cascade, not the network.

Run::

    python bench/bench_dice.py                # ~3 min on 2 cores
    python bench/bench_dice.py --quick        # smoke run
    python bench/bench_dice.py --parts e      # only (e)
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Any

import numpy as np
import torch
from _studies import replays_alone

warnings.filterwarnings("ignore")


def experiment_for(nodes: int, rounds: int, hops: int) -> Any:
    from dice_ray.config import build_config
    from dice_ray.experiment import prepare

    return prepare(build_config({
        "nodes": nodes, "rounds": rounds, "topology": {"name": "exponential"},
        "data": {"dataset": "synthetic", "synthetic_samples": 40 * nodes, "heldout_size": 256},
        "model": {"name": "mlp"}, "optim": {"lr": 0.05, "batch_size": 16},
        "influence": {"enabled": True, "hops": hops, "rounds": [rounds - 1 - hops],
                      "sources_per_task": 1},
    }))


def report(hops: int, took: float, floor: float) -> None:
    print(f"  R = {hops}: {took * 1e3:8.1f} ms, floor {floor * 1e3:8.1f} ms, ratio {took / floor:5.2f} (target <= 2)")


def clock(fn: Any, repeats: int = 3) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--path-sources", type=int, default=2, help="sources timed for path enumeration")
    parser.add_argument("--quick", action="store_true", help="N = 16, R up to 3")
    parser.add_argument("--parts", default="abcde", help="which parts to run (letters)")
    parser.add_argument("--scale-nodes", type=int, nargs="+", default=[64, 256, 1024], help="(e)'s N")
    parser.add_argument("--scale-sources", type=int, default=4, help="(e)'s probes timed per N")
    args = parser.parse_args()
    n = 16 if args.quick else args.nodes
    max_hops = 3 if args.quick else 4
    torch.set_num_threads(1)
    if set(args.parts) & set("abcd"):
        machinery(args.parts, n, max_hops, min(args.path_sources, n))
    if "e" in args.parts:
        replay_scaling([16] if args.quick else args.scale_nodes, args.scale_sources)


def machinery(parts: str, n: int, max_hops: int, path_sources: int) -> None:
    """Parts (a) to (d), on one window of N participants."""
    from dice_ray.methods.dice.estimator import update_difference
    from dice_ray.methods.dice.measure import window_for
    from dice_ray.methods.dice.trajectory import record_windows

    experiment = experiment_for(n, 12, max_hops)
    t0 = 12 - 1 - max_hops
    trajectory = record_windows(experiment, [t0], max_hops)[0]
    window = window_for(experiment, trajectory)
    everyone = np.arange(n)
    deltas = torch.stack([update_difference(window, j)[0] for j in range(n)])
    print(f"N = {n}, exponential graph, MLP ({deltas.shape[1]} parameters), torch threads 1, "
          f"load {os.getloadavg()[0]:.2f}")

    if "a" in parts:
        part_a(window, deltas, everyone, max_hops)
    if "b" in parts:
        part_b(window, deltas, everyone, max_hops, path_sources)
    if "c" in parts:
        part_c(window, deltas, everyone, max_hops, experiment)
    if "d" in parts:
        part_d(experiment, t0, max_hops)


def part_a(window: Any, deltas: torch.Tensor, everyone: np.ndarray, max_hops: int) -> None:
    from dice_ray.methods.dice.estimator import first_order_all_sources

    print("\n(a) first-order DICE-E, all sources x all targets, against N·R test gradients")
    for hops in range(1, max_hops + 1):
        floor, _ = clock(lambda h=hops: [window.compute_test_gradients(s, everyone) for s in range(h + 1)])
        took, _ = clock(lambda h=hops: (window.clear_cache(), first_order_all_sources(window, deltas, h))[1])
        report(hops, took, floor)



def part_b(window: Any, deltas: torch.Tensor, everyone: np.ndarray, max_hops: int, path_sources: int) -> None:
    from dice_ray.methods.dice.estimator import estimate_cascade
    from dice_ray.methods.dice.paths import path_cascade

    print("\n(b) curvature recursion against Theorem 2 path enumeration (per source; test gradients shared)")
    sources = list(range(path_sources))
    for hops in range(1, max_hops + 1):
        for s in range(hops + 1):
            window.test_gradients(s, everyone)  # both methods read the same cached test gradients
        fast_t, fast = clock(lambda h=hops: [estimate_cascade(window, j, deltas[j], {}, h, "curvature")
                                             for j in sources], repeats=2)
        slow_t, slow = clock(lambda h=hops: [path_cascade(window, j, deltas[j], h, "curvature") for j in sources],
                             repeats=1)
        diff = max(np.abs(a.values[s] - b.values[s]).max() for a, b in zip(fast, slow, strict=True)
                   for s in range(1, hops + 1))
        per = 1e3 / len(sources)
        print(f"  R = {hops}: recursion {fast_t * per:8.1f} ms, paths {slow_t * per:9.1f} ms, "
              f"speed-up {slow_t / fast_t:7.1f}x (target at R=4: >= 20x), max |difference| {diff:.1e} "
              f"(target <= 1e-6)")



def part_c(window: Any, deltas: torch.Tensor, everyone: np.ndarray, max_hops: int, experiment: Any) -> None:
    from dice_ray.methods.dice.adjoint import adjoint_horizon

    n = len(everyone)
    print("\n(c) adjoint horizon total, all sources, curvature, against R·N HVPs + N test gradients")
    grads = torch.zeros_like(deltas)
    dmap = {j: (deltas[j], {}) for j in range(n)}
    for hops in range(1, max_hops + 1):
        def floor_work(h: int = hops) -> None:
            window.compute_test_gradients(h, everyone)
            for s in range(1, h):
                window.jvp_step(s, everyone, grads, {})

        floor, _ = clock(floor_work)
        took, _ = clock(lambda h=hops: (window.clear_cache(),
                                        adjoint_horizon(window, experiment.q, h, "curvature", dmap))[1])
        report(hops, took, floor)



def part_d(experiment: Any, t0: int, max_hops: int) -> None:
    print("\n(d) DICE-GT replays per second on Ray: 1 worker against all workers")
    import ray

    from dice_ray.engine import start_ray
    from dice_ray.engine.tasks import RayTasks
    from dice_ray.methods.dice.probes import select_probes
    from dice_ray.methods.dice.replays import measure_task, record_windows_task

    experiment = replays_alone(experiment)
    probes = select_probes(experiment.config)
    rates = {}
    label = lambda job: {}  # noqa: E731 (no retries are recorded here)
    for cpus in (1, os.cpu_count() or 2):
        start_ray(num_cpus=cpus)
        tasks = RayTasks(experiment.config.engine)
        exp_ref = tasks.share(experiment)
        [window_ref] = tasks.call(record_windows_task, exp_ref, [t0], max_hops)
        ray.wait([window_ref])
        # start and warm every worker first (a worker's first task imports torch: seconds)
        tasks.map(measure_task, [(exp_ref, window_ref, probes[:1])] * (2 * cpus), "warm-up", label)
        start = time.perf_counter()
        tasks.map(measure_task, [(exp_ref, window_ref, [p]) for p in probes], "replays", label)
        rates[cpus] = len(probes) / (time.perf_counter() - start)
        ray.shutdown()
        print(f"  {cpus} worker(s): {rates[cpus]:6.2f} replays/s ({len(probes)} replays of {max_hops} rounds)")
    one, many = rates[1], rates[max(rates)]
    print(f"  speed-up {many / one:.2f}x (target >= 1.6x)")


def replay_scaling(sizes: list[int], sources: int, hops: int = 3) -> None:
    """(e): DICE-GT replay time per probe against its floor, at each N of ``sizes``."""
    print(f"\n(e) a DICE-GT replay per probe (R = {hops}, whole-batch probes, the round's factual z′ losses "
          "shared) against its floor: the reached participants' z′ losses and local steps")
    for n in sizes:
        replay_against_floor(n, sources, hops)


def replay_against_floor(n: int, sources: int, hops: int) -> None:
    """One line of (e): ``sources`` probes of round 8 of an N-participant run."""
    from dice_ray.methods.dice.ground_truth import ground_truth_cascade
    from dice_ray.methods.dice.measure import window_for
    from dice_ray.methods.dice.trajectory import reach, record_windows

    experiment = experiment_for(n, 12, hops)
    window = window_for(experiment, record_windows(experiment, [12 - 1 - hops], hops)[0])
    traj = window.trajectory
    picked = [int(j) for j in np.linspace(0, n - 1, min(sources, n)).round()]
    supports = {j: reach(traj.mixing[:hops], j) for j in picked}
    for j in picked:  # the factual losses a round's probes share, and a first replay (warm-up)
        for s in range(1, hops + 1):
            window.test_losses(s, supports[j][s])
    ground_truth_cascade(window, picked[0], hops)

    def floor_work() -> None:
        for j in picked:
            window.zprime_losses(np.array([j, j]), torch.stack([traj.halves[0][j]] * 2))
            for s in range(1, hops + 1):
                rows = window.index(supports[j][s])
                window.zprime_losses(supports[j][s], traj.states[s][rows])
                if s < hops:
                    x, y = window.batches(traj.t0 + s)
                    window.population(s, supports[j][s]).half_step(x[rows], y[rows])

    floor, _ = clock(floor_work)
    took, _ = clock(lambda: [ground_truth_cascade(window, j, hops) for j in picked])
    reached = np.mean([len(supports[j][hops]) for j in picked])
    print(f"  N = {n:5d}: {took / len(picked) * 1e3:8.1f} ms a probe, floor {floor / len(picked) * 1e3:8.1f} ms, "
          f"ratio {took / floor:5.2f}; reaches {reached:.0f} of {n} participants in {hops} hops")


if __name__ == "__main__":
    main()
