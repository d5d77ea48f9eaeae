"""Cost of the online contribution ledger: a training run with it against the same run without it.

Workload: like ``configs/contributions.yaml``'s (the embedded MNIST subset, the MLP, SGD batch 8, exponential graph; lr
0.05, no misbehaviour, no ``data.shrink``) with N participants. Both runs train the same rounds from the same state in
this process, alternating (off, on, off, on, ...) ``--repeats`` times; a variant's time is the mean over rounds (after
the first, no evaluation inside timed rounds) of each round's lowest time over the repeats — robust to bursts of other
load, and fair to ``--ledger-every`` k > 1, whose ledger rounds are a minority. The ratio (ledger on) / (ledger off) is
measured in this one run, in wall-clock time and (local engine) in this process's CPU time, which other work on a shared
machine disturbs less. ``--engine ray`` times ``RayEngine`` (default actor plan) instead of ``LocalEngine``.

The ledger's extra work per round is one batched gradient of every participant on z′ (``--heldout-size``
samples; the local step uses ``--batch-size``), taken on the rounds t, t+1, ..., t+R of every ledger round t,
plus sampled dot products for the pairs within R hops. Run::

    python bench/bench_ledger.py                          # N = 16 64, local engine
    python bench/bench_ledger.py --engine ray --nodes 16
    python bench/bench_ledger.py --heldout-size 500 --every 8 --hops 3

``--whole-run CONFIG`` times whole runs instead, as the CLI runs them (``simulate``: actors, training, tables;
one local Ray shared by all runs, its start not counted): CONFIG with ``ledger.enabled`` false and true,
alternating ``--repeats`` times, with ``--set`` overrides; it prints each variant's best and median and their
ratios::

    python bench/bench_ledger.py --whole-run configs/contributions.yaml --repeats 5
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from dice_ray.config import build_config
from dice_ray.experiment import prepare
from dice_ray.hooks import round_hooks
from dice_ray.methods.catalog import methods_for


def _config(n: int, args: argparse.Namespace, ledger: bool):
    return build_config({
        "seed": 0, "nodes": n, "rounds": args.rounds, "topology": {"name": "exponential"},
        "data": {"dataset": "mnist5k", "heldout_size": args.heldout_size}, "model": {"name": "mlp"},
        "optim": {"name": "sgd", "lr": 0.05, "batch_size": args.batch_size},
        "ledger": {"enabled": ledger, "every": args.every, "hops": args.hops, "zprime": args.zprime},
        "output": {"progress": False}})


def _round_seconds(experiment, engine_kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (wall-clock, this process's CPU) seconds of every round after the first (warm-up)."""
    if engine_kind == "ray":
        from dice_ray.engine import RayEngine

        engine = RayEngine(experiment, hooks=round_hooks(methods_for(experiment.config)))
    else:
        from dice_ray.engine import LocalEngine

        engine = LocalEngine(experiment, round_hooks(methods_for(experiment.config)))
    times, cpu = [], []
    try:
        for t in range(experiment.config.rounds):
            start, start_cpu = time.perf_counter(), time.process_time()
            engine.run_round(t, False)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    finally:
        engine.close()
    return np.array(times[1:]), np.array(cpu[1:])


def _whole_runs(args: argparse.Namespace) -> None:
    import statistics
    import tempfile

    from dice_ray.config import apply_sets, load_config
    from dice_ray.engine import start_ray
    from dice_ray.runner import simulate

    start_ray()
    base = apply_sets(load_config(args.whole_run), args.set)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for flag in (False, True):
                raw = {**base, "ledger": {**base.get("ledger", {}), "enabled": flag},
                       "output": {**base.get("output", {}), "out": f"{tmp}/{int(flag)}-{i}", "progress": False}}
                start = time.perf_counter()
                simulate(build_config(raw))
                seconds[flag].append(time.perf_counter() - start)
                print(f"repeat {i}: ledger {'on ' if flag else 'off'} {seconds[flag][-1]:.2f} s", flush=True)
    best = {flag: min(v) for flag, v in seconds.items()}
    median = {flag: statistics.median(v) for flag, v in seconds.items()}
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("\n| config | overrides | without (s, best / median) | with ledger (s, best / median) | ratio of best | "
          "ratio of medians |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.whole_run} | {' '.join(args.set) or '-'} | {best[False]:.2f} / {median[False]:.2f} | "
          f"{best[True]:.2f} / {median[True]:.2f} | {best[True] / best[False]:.2f} | "
          f"{median[True] / median[False]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--hops", type=int, default=3)
    parser.add_argument("--heldout-size", type=int, default=500)
    parser.add_argument("--zprime", choices=("heldout", "validation"), default="heldout")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--engine", choices=("local", "ray"), default="local")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (local engine)")
    parser.add_argument("--whole-run", metavar="CONFIG", help="time whole runs of CONFIG with and without the ledger")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of --whole-run's CONFIG (repeatable)")
    args = parser.parse_args()
    if args.whole_run:
        _whole_runs(args)
        return
    if args.engine == "ray":
        from dice_ray.engine import start_ray

        start_ray()
    else:
        import torch

        torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f}; engine {args.engine}; ledger every {args.every}, R = {args.hops}, "
          f"z′ {args.zprime} (held-out {args.heldout_size}), batch {args.batch_size}")
    rows = []
    for n in args.nodes:
        experiments = {flag: prepare(_config(n, args, flag)) for flag in (False, True)}
        best = {False: np.inf, True: np.inf}
        best_cpu = {False: np.inf, True: np.inf}
        for _ in range(args.repeats):
            for flag in (False, True):
                wall, cpu = _round_seconds(experiments[flag], args.engine)
                best[flag], best_cpu[flag] = np.minimum(best[flag], wall), np.minimum(best_cpu[flag], cpu)
        best = {flag: float(v.mean()) for flag, v in best.items()}
        best_cpu = {flag: float(v.mean()) for flag, v in best_cpu.items()}
        ratio, ratio_cpu = best[True] / best[False], best_cpu[True] / best_cpu[False]
        rows.append((n, best[False], best[True], ratio, ratio_cpu))
        print(f"N = {n}: without {best[False] * 1e3:.1f} ms/round, with ledger {best[True] * 1e3:.1f} ms/round, "
              f"ratio {ratio:.2f} (CPU time of this process: {ratio_cpu:.2f})", flush=True)
    zprime = args.heldout_size if args.zprime == "heldout" else "validation"
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("\n| N | engine | every | R | z′ | without (ms/round) | with ledger (ms/round) | ratio | CPU-time ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, off, on, ratio, ratio_cpu in rows:
        cpu = f"{ratio_cpu:.2f}" if args.engine == "local" else "(in actors)"
        print(f"| {n} | {args.engine} | {args.every} | {args.hops} | {zprime} | {off * 1e3:.1f} | "
              f"{on * 1e3:.1f} | {ratio:.2f} | {cpu} |")


if __name__ == "__main__":
    main()
