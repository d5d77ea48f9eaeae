"""Seconds per D-SGD round (concepts §1: local SGD step, then gossip θ_k ← Σ_l W_kl θ_l), five ways.

Workload: N participants (default N = 16, 64, 256), each the paper's MLP (64 -> 128 -> 64 -> 10, ReLU,
17,226 parameters) on digits-shaped synthetic data (1x8x8, 10 classes, at least 40 samples per
participant), batch size 16, plain SGD with lr 0.05, exponential topology with uniform weights. Every
variant trains on the same minibatches z_k^t (``ParticipantBlock.minibatch``) from the same initial model;
no evaluation inside timed rounds.

    (a)  this engine on Ray: ``RayEngine`` with the default actor plan (one actor per machine, using its CPUs);
    (a') the same population math in this process, no Ray: ``LocalEngine`` (torch threads = 2);
    (b)  the paper code's way: one ``nn.Module`` + ``torch.optim.SGD`` per participant stepped in a
         Python loop, then gossip parameter by parameter over all N² pairs of a dense W (zeros included);
    (b') the same loop, gossiping only along the edges of W (its nonzeros);
    (c)  the fused ideal: ONE model stepping on the concatenated batch of all participants (N*16
         samples) — the same samples and FLOPs, but one parameter set to update and nothing to mix.

Each (variant, N) runs in a fresh subprocess, so its peak RSS (``getrusage`` ru_maxrss) is its own (for
(a) the Ray actors' peaks too), ``--repeats`` times (default 2, going round all pairs before repeating);
a variant's time is the lowest of its processes' medians of per-round seconds. (b) times fewer rounds at
large N (its N² gossip costs seconds per round). Before each timed section the script prints the 1-minute
load average and the machine's CPU busy share over 0.5 s: timings are only meaningful on a quiet machine.

(a) is timed as ``python -m dice_ray.simulate`` runs it, with rounds queued ahead (``RayEngine.run_rounds``);
one round at a time (``run_round``) is printed too. Also printed: for (a), the median span of each Ray
actor method (``ray.timeline``); at the largest N, (a')'s round split into
``ParticipantBlock.half_step`` and ``ParticipantBlock.mix``. The tables are repeated as Markdown at the end.

Run::

    python bench/bench_rounds.py                      # N = 16 64 256, 20 timed rounds, ~5 min on 2 cores
    python bench/bench_rounds.py --quick              # smoke run: N = 16 64, 3 rounds, 1 repeat
    python bench/bench_rounds.py --nodes 256 --rounds 50 --json bench.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _tables import print_markdown, print_plain
from torch import nn

VARIANTS = ("local", "fused", "loop_edges", "loop_dense", "ray")  # the order they run in, per N
SHOWN = ("ray", "local", "loop_dense", "loop_edges", "fused")  # the order of the table's columns
LABELS = {"ray": "(a) Ray", "local": "(a′) local", "loop_dense": "(b) loop, N² mix",
          "loop_edges": "(b′) loop, edge mix", "fused": "(c) fused"}
BATCH, LR, THREADS = 16, 0.05, 2
TARGETS = {"b/a": (">=", 30.0), "b′/a": (">=", 8.0), "a/a′": ("<=", 1.3), "a/c": ("<=", 3.0)}


# -- the workload -------------------------------------------------------------------------------------


def run_config(nodes: int) -> dict[str, Any]:
    """Return the config dict of the benchmark workload for N = ``nodes``."""
    return {"nodes": nodes, "seed": 0,
            "topology": {"name": "exponential", "weights": "uniform"},
            "data": {"dataset": "synthetic", "synthetic_samples": max(10_000, 40 * nodes)},
            "model": {"name": "mlp", "init": "same"},
            "optim": {"name": "sgd", "lr": LR, "batch_size": BATCH},
            "output": {"eval_every": 1_000_000}}


def quiet_check(label: str, settle_s: float = 10.0) -> dict[str, float]:
    """Print and return the 1-minute load average and the machine's CPU busy share over 0.5 s, after
    waiting (up to ``settle_s``) for that share to fall below 25% (e.g. Ray's processes after a start)."""

    def busy_idle() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, idle

    deadline = time.monotonic() + settle_s
    while True:
        b0, i0 = busy_idle()
        time.sleep(0.5)
        b1, i1 = busy_idle()
        busy = 100.0 * (b1 - b0) / max(b1 - b0 + i1 - i0, 1)
        if busy < 25 or time.monotonic() > deadline:
            break
    load = os.getloadavg()[0]
    print(f"  [{label}] load1={load:.2f}  cpu busy (last 0.5 s)={busy:.0f}%", file=sys.stderr, flush=True)
    return {"load1": load, "busy_pct": busy}


def time_rounds(step: Callable[[int], float], warmup: int, rounds: int, label: str) -> dict[str, Any]:
    """Run ``step(t)`` (one round; returns its mean train loss) for ``warmup`` untimed rounds, then time
    ``rounds`` rounds. Returns per-round seconds (list), their median and mean, and the loss of round 0."""
    losses = [step(t) for t in range(warmup)]
    quiet = quiet_check(label)
    seconds, timed_from = [], time.time()
    for t in range(warmup, warmup + rounds):
        start = time.perf_counter()
        loss = step(t)
        seconds.append(time.perf_counter() - start)
        losses.append(loss)
    return {"seconds": seconds, "s_per_round": float(np.median(seconds)), "mean_s": float(np.mean(seconds)),
            "rounds": rounds, "first_loss": float(losses[0]), "last_loss": float(losses[-1]),
            "timed_from": timed_from, "timed_to": time.time(), **quiet}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- (a) and (a'): this package --------------------------------------------------------------------------


def bench_ray(experiment: Any, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """(a): ``RayEngine`` with the default plan on a local 2-CPU Ray."""
    import ray

    from dice_ray.config import EngineConfig
    from dice_ray.engine import RayEngine, plan_actors, start_ray

    start = time.perf_counter()
    start_ray(num_cpus=THREADS)
    cpus = ray.cluster_resources().get("CPU", 0.0)
    plan = plan_actors(EngineConfig(), experiment.nodes, cpus, 0.0)
    engine = RayEngine(experiment, plan)
    try:
        setup = time.perf_counter() - start
        out = time_rounds(lambda t: float(engine.run_round(t, evaluate=False).train_loss.mean()),
                          args.warmup, args.rounds, label)
        if hasattr(engine, "run_rounds"):  # rounds queued ahead (pipelined): seconds per round over a batch
            first = args.warmup + args.rounds
            quiet_check(f"{label} run_rounds")
            start_batch = time.perf_counter()
            for _ in engine.run_rounds((t, False) for t in range(first, first + args.rounds)):
                pass
            out["pipelined_s_per_round"] = (time.perf_counter() - start_batch) / args.rounds
            # (a) is reported as the CLI runs it: rounds queued ahead; the one-round-at-a-time figure stays.
            out["sync_s_per_round"], out["s_per_round"] = out["s_per_round"], out["pipelined_s_per_round"]
        info = engine.info()
        time.sleep(2.5)  # workers report task events to the GCS about once a second
        tasks = task_durations(ray.timeline(), out["timed_from"], out["timed_to"])
    finally:
        engine.close()
        ray.shutdown()
    return {**out, "setup_s": setup, "actors": len(plan.blocks), "threads_per_actor": plan.threads_per_actor,
            "actor_peak_rss_mib": [float(i["peak_rss_mib"]) for i in info], "task_s": tasks}


def task_durations(events: list[dict[str, Any]], since: float, until: float) -> dict[str, float]:
    """Median seconds of each Ray actor method (half_step, mix, the coordinator's) started between epoch
    times ``since`` and ``until``, from ``ray.timeline()`` events. A method's span includes storing its
    return values in the object store (for ``half_step``: the [P, D] half-step states)."""
    spans: dict[str, list[float]] = {}
    for e in events:
        if e.get("ph") == "X" and str(e.get("cat", "")).startswith("task::") and since <= e["ts"] / 1e6 < until:
            spans.setdefault(e["name"], []).append(e["dur"] / 1e6)
    return {name: float(np.median(v)) for name, v in spans.items() if name not in ("__init__", "info")}


def bench_local(experiment: Any, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """(a'): ``LocalEngine``, all participants in this process."""
    from dice_ray.engine import LocalEngine

    start = time.perf_counter()
    engine = LocalEngine(experiment)
    setup = time.perf_counter() - start
    out = time_rounds(lambda t: float(engine.run_round(t, evaluate=False).train_loss.mean()),
                      args.warmup, args.rounds, label)
    return {**out, "setup_s": setup}


def bench_breakdown(experiment: Any, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """(a') split: seconds per round in ``block.half_step(t)`` (of which drawing the minibatch) and in
    ``block.mix(W, [state])`` (W converted to a device tensor once, as the engines do); medians over
    ``args.rounds`` rounds after ``args.warmup``."""
    from dice_ray.engine import LocalEngine

    engine = LocalEngine(experiment)
    block = engine.block
    w = block.mixing_rows(experiment.topology.mixing_matrix(0))
    parts: dict[str, list[float]] = {"minibatch": [], "half_step": [], "mix": []}
    for t in range(args.warmup + args.rounds):
        if t == args.warmup:
            quiet = quiet_check(label)
        t0 = time.perf_counter()
        block.minibatch(t)  # an extra draw, timed alone: half_step draws the same batch again
        t1 = time.perf_counter()
        block.half_step(t)
        t2 = time.perf_counter()
        block.mix(w, [block.population.state])
        t3 = time.perf_counter()
        if t >= args.warmup:
            for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                parts[key].append(seconds)
    return {**{f"{k}_s": float(np.median(v)) for k, v in parts.items()}, **quiet}


# -- (b), (b') and (c): the baselines ------------------------------------------------------------------


def baseline_models(experiment: Any, count: int) -> tuple[Any, list[nn.Module]]:
    """Return (a ``ParticipantBlock`` of all N participants, only to draw the same minibatches, and
    ``count`` ``nn.Module`` copies holding the block's initial parameters)."""
    from dice_ray.engine import LocalEngine

    block = LocalEngine(experiment).block
    pop = block.population
    template = copy.deepcopy(pop.model)
    with torch.no_grad():
        for name, value in pop.param_layout.views(pop.params[0]).items():
            template.get_parameter(name).copy_(value)
    return block, [copy.deepcopy(template) for _ in range(count)]


def local_sgd_loop(models: list[nn.Module], optimizers: list[torch.optim.Optimizer], x: torch.Tensor,
                   y: torch.Tensor) -> float:
    """One forward/backward/step per participant k on its batch x[k], y[k]; return the mean loss."""
    total = 0.0
    for k, (model, opt) in enumerate(zip(models, optimizers, strict=True)):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[k]), y[k])
        loss.backward()
        opt.step()
        total += loss.item()
    return total / len(models)


@torch.no_grad()
def gossip_dense(params: list[list[torch.Tensor]], w: list[list[float]]) -> None:
    """θ_k ← Σ_l W_kl θ_l over ALL (k, l) pairs of a dense W, parameter by parameter (as the paper's code
    does), then copy the results back into the models."""
    n = len(params)
    mixed = [[torch.zeros_like(p) for p in params[k]] for k in range(n)]
    for k in range(n):
        for l_ in range(n):
            for acc, p in zip(mixed[k], params[l_], strict=True):
                acc += w[k][l_] * p
    for k in range(n):
        for p, value in zip(params[k], mixed[k], strict=True):
            p.copy_(value)


@torch.no_grad()
def gossip_edges(params: list[list[torch.Tensor]], indptr: np.ndarray, indices: np.ndarray,
                 data: np.ndarray) -> None:
    """θ_k ← Σ_l W_kl θ_l over the nonzeros of W only (CSR rows), parameter by parameter."""
    n = len(params)
    mixed = [[torch.zeros_like(p) for p in params[k]] for k in range(n)]
    for k in range(n):
        for l_, weight in zip(indices[indptr[k]:indptr[k + 1]].tolist(), data[indptr[k]:indptr[k + 1]].tolist(),
                              strict=True):
            for acc, p in zip(mixed[k], params[l_], strict=True):
                acc += weight * p
    for k in range(n):
        for p, value in zip(params[k], mixed[k], strict=True):
            p.copy_(value)


def bench_loop(experiment: Any, args: argparse.Namespace, label: str, dense: bool) -> dict[str, Any]:
    """(b) with ``dense`` (N² gossip), else (b') (gossip along edges)."""
    n = experiment.nodes
    block, models = baseline_models(experiment, n)
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR) for m in models]
    params = [list(m.parameters()) for m in models]
    w = experiment.topology.mixing_matrix(0)
    w_dense = w.toarray().tolist()

    def step(t: int) -> float:
        x, y = block.minibatch(t)
        loss = local_sgd_loop(models, optimizers, x, y)
        if dense:
            gossip_dense(params, w_dense)
        else:
            gossip_edges(params, w.indptr, w.indices, w.data)
        return loss

    # (b)'s N² gossip is slow at large N: fewer timed rounds there (the unit is seconds per round anyway).
    rounds = args.rounds if not dense else min(args.rounds, max(args.dense_rounds, args.rounds * 16 // n))
    warmup = args.warmup if not dense else min(args.warmup, 1)
    sub = argparse.Namespace(**{**vars(args), "rounds": rounds, "warmup": warmup})
    return time_rounds(step, sub.warmup, sub.rounds, label)


def bench_fused(experiment: Any, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """(c): one model, one SGD step on all participants' batches concatenated (N*16 samples)."""
    block, (model,) = baseline_models(experiment, 1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step(t: int) -> float:
        x, y = block.minibatch(t)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x.flatten(0, 1)), y.flatten())
        loss.backward()
        opt.step()
        return loss.item()

    return time_rounds(step, args.warmup, args.rounds, label)


# -- one (variant, N) per subprocess --------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """Run one variant at one N (``--worker VARIANT --nodes N``) and write its result as JSON."""
    from dice_ray.config import build_config
    from dice_ray.experiment import prepare

    torch.set_num_threads(THREADS)
    n = args.nodes[0]
    experiment = prepare(build_config(run_config(n)))
    if args.worker in ("loop_dense", "loop_edges", "fused"):
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)  # first use imports torch._dynamo (~140 MiB)
    base_rss = peak_rss_mib()  # imports (torch alone is ~500 MiB) and the data set, before any model
    sizes = [len(t) for t in experiment.partition.train]
    assert min(sizes) >= BATCH, f"smallest local training set {min(sizes)} < batch {BATCH}"
    label = f"N={n} {LABELS.get(args.worker, args.worker)}"
    if args.worker == "ray":
        out = bench_ray(experiment, args, label)
    elif args.worker == "local":
        out = bench_local(experiment, args, label)
    elif args.worker == "breakdown":
        out = bench_breakdown(experiment, args, label)
    elif args.worker in ("loop_dense", "loop_edges"):
        out = bench_loop(experiment, args, label, dense=args.worker == "loop_dense")
    else:
        out = bench_fused(experiment, args, label)
    out.update(variant=args.worker, nodes=n, peak_rss_mib=peak_rss_mib(), base_rss_mib=base_rss,
               min_local_train=min(sizes))
    Path(args.worker_out).write_text(json.dumps(out))


def spawn(variant: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``variant`` at N = ``n`` in a fresh Python process; return its result dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", variant, "--worker-out", str(out), "--nodes", str(n),
               "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--dense-rounds", str(args.dense_rounds),
               "--repeats", "1"]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        return json.loads(out.read_text())


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the run with the lowest median seconds per round, with every run's median added."""
    return {**min(runs, key=lambda r: r["s_per_round"]), "all_s_per_round": [r["s_per_round"] for r in runs]}


# -- report ---------------------------------------------------------------------------------------------


def ratios(row: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Return the ratios b/a, b′/a, a/a′, a/c, a′/c of one N's per-round times."""
    s = {v: row[v]["s_per_round"] for v in SHOWN}
    return {"b/a": s["loop_dense"] / s["ray"], "b′/a": s["loop_edges"] / s["ray"], "a/a′": s["ray"] / s["local"],
            "a/c": s["ray"] / s["fused"], "a′/c": s["local"] / s["fused"]}


def table(results: dict[int, dict[str, dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """Return (header, rows) of the time table: seconds per round, ratios, peak memory."""
    header = ["N", *(f"{LABELS[v]} s/round" for v in SHOWN), "b/a", "b′/a", "a/a′", "a/c", "a′/c"]
    rows = []
    for n, row in results.items():
        rows.append([str(n), *(f"{row[v]['s_per_round']:.4f}" for v in SHOWN),
                     *(f"{x:.2f}" for x in ratios(row).values())])
    return header, rows


def memory_table(results: dict[int, dict[str, dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """Return (header, rows) of peak RSS (MiB): each process's peak, and in brackets its growth over the
    RSS after imports and data loading; for (a) also each actor's peak."""
    header = ["N", *(f"{LABELS[v].split()[0]} peak RSS MiB" for v in SHOWN), "(a) actors' peak RSS MiB"]
    rows = []
    for n, row in results.items():
        cells = [f"{row[v]['peak_rss_mib']:.0f} (+{row[v]['peak_rss_mib'] - row[v]['base_rss_mib']:.0f})"
                 for v in SHOWN]
        actors = " / ".join(f"{m:.0f}" for m in row["ray"]["actor_peak_rss_mib"])
        rows.append([str(n), *cells, actors])
    return header, rows






def report(results: dict[int, dict[str, dict[str, Any]]], breakdown: dict[str, Any] | None) -> dict[str, Any]:
    """Print the tables, the sanity check, the targets and the breakdown; return the checks."""
    header, rows = table(results)
    mem_header, mem_rows = memory_table(results)
    print("\n== seconds per round (median over timed rounds) and ratios ==")
    print_plain(header, rows)
    print("\n== peak RSS, MiB (in brackets: growth over imports + data set) ==")
    print_plain(mem_header, mem_rows)
    print("\nmedian s/round of every process (the table keeps the lowest): " + "; ".join(
        f"N={n} " + ", ".join(f"{v} " + "/".join(f"{x:.4f}" for x in row[v]["all_s_per_round"]) for v in SHOWN)
        for n, row in results.items()))
    print("timed rounds:", "; ".join(f"N={n}: " + ", ".join(f"{v} {row[v]['rounds']}" for v in SHOWN)
                                      for n, row in results.items()))
    print("load1 / cpu busy % before each timed section: " + "; ".join(
        f"N={n} " + ", ".join(f"{v} {row[v]['load1']:.2f}/{row[v]['busy_pct']:.0f}%" for v in SHOWN)
        for n, row in results.items()))
    print("setup (s): " + "; ".join(f"N={n} ray {row['ray']['setup_s']:.1f}, local {row['local']['setup_s']:.2f}"
                                     for n, row in results.items()))

    checks: dict[str, Any] = {"sanity": {}, "targets": {}}
    print("\n== sanity: mean train loss of round 0 (same init, same minibatches) ==")
    for n, row in results.items():
        first = {v: row[v]["first_loss"] for v in SHOWN}
        diff = abs(first["ray"] - first["local"])
        checks["sanity"][n] = {"a_minus_a_prime": diff, "ok": diff <= 1e-4}
        print(f"N={n}: " + ", ".join(f"{v} {x:.6f}" for v, x in first.items())
              + f"  |a − a′| = {diff:.1e} {'OK' if diff <= 1e-4 else 'FAIL (> 1e-4)'}")

    n_max = max(results)
    r = ratios(results[n_max])
    print(f"\n== targets at N={n_max} (measured, not tuned) ==")
    for key, (op, goal) in TARGETS.items():
        met = r[key] >= goal if op == ">=" else r[key] <= goal
        checks["targets"][key] = {"measured": r[key], "target": f"{op} {goal:g}", "met": met}
        print(f"{key:>5} = {r[key]:7.2f}   target {op} {goal:g}   {'met' if met else 'NOT met'}")

    print(f"\n== (a) inside Ray at N={n_max}: median seconds per actor method (ray.timeline) ==")
    ray_row = results[n_max]["ray"]
    spans = ray_row.get("task_s", {})
    print(", ".join(f"{name} {value:.4f}" for name, value in spans.items())
          + f"; one round at a time {ray_row.get('sync_s_per_round', ray_row['s_per_round']):.4f} "
            f"({ray_row['actors']} actors x "
          f"{ray_row['threads_per_actor']} thread). With several groups, half_step includes storing its [P, D] "
          "states in the object store; one group runs step_and_mix, one task per round.")
    if "pipelined_s_per_round" in ray_row:
        piped = {n: (row["ray"]["pipelined_s_per_round"], row["local"]["s_per_round"]) for n, row in results.items()}
        print("(a) rounds queued ahead (RayEngine.run_rounds, as in the table), s/round: "
              + ", ".join(f"N={n} {a:.4f} (a/a′ {a / a_local:.2f})" for n, (a, a_local) in piped.items()))

    if breakdown is not None:
        total = breakdown["half_step_s"] + breakdown["mix_s"]
        print(f"\n== (a′) breakdown at N={breakdown['nodes']}: seconds per round (median) ==")
        print(f"half_step {breakdown['half_step_s']:.4f} ({100 * breakdown['half_step_s'] / total:.0f}%), "
              f"of which minibatch draw {breakdown['minibatch_s']:.4f}; "
              f"mix {breakdown['mix_s']:.4f} ({100 * breakdown['mix_s'] / total:.0f}%); sum {total:.4f}")

    print("\n== Markdown ==\n")
    print_markdown(header, rows)
    print()
    print_markdown(mem_header, mem_rows)
    print()
    print(f"Targets at N={n_max}: " + ", ".join(
        f"{k} = {c['measured']:.2f} ({c['target']}: {'met' if c['met'] else 'not met'})"
        for k, c in checks["targets"].items()))
    if breakdown is not None:
        print(f"\n(a′) at N={breakdown['nodes']}: half_step {breakdown['half_step_s'] * 1e3:.1f} ms "
              f"(minibatch draw {breakdown['minibatch_s'] * 1e3:.1f} ms), mix {breakdown['mix_s'] * 1e3:.1f} ms "
              "per round.")
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=None, help="N values (default 16 64 256)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3)")
    parser.add_argument("--dense-rounds", type=int, default=3,
                        help="fewest timed rounds for (b); it times max(this, rounds*16/N), capped at --rounds")
    parser.add_argument("--repeats", type=int, default=None,
                        help="fresh processes per (variant, N); the lowest median counts (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 16 64, 3 rounds, 1 warm-up, 1 repeat")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.nodes = args.nodes or ([16, 64] if args.quick else [16, 64, 256])
    args.rounds = args.rounds or (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.repeats = args.repeats or (1 if args.quick else 2)
    if args.worker:
        worker(args)
        return

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {THREADS}; batch {BATCH}, lr {LR}, "
          f"exponential/uniform, mlp 64-128-64-10; rounds {args.rounds} (warm-up {args.warmup})", flush=True)
    start = time.perf_counter()
    # Repeats go round all (N, variant) pairs in turn, so a burst of outside load hits one run of a
    # variant rather than all of them; each variant keeps its best process (lowest median).
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {n: {v: [] for v in VARIANTS} for n in args.nodes}
    breakdowns = []
    for repeat in range(args.repeats):
        for n in args.nodes:
            for variant in VARIANTS:
                res = spawn(variant, n, args)
                runs[n][variant].append(res)
                print(f"[{repeat + 1}/{args.repeats}] N={n:>4} {LABELS[variant]:<22} {res['s_per_round']:.4f} s/round "
                      f"({res['rounds']} rounds), peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
        breakdowns.append(spawn("breakdown", max(args.nodes), args))
    results = {n: {v: best(r) for v, r in row.items()} for n, row in runs.items()}
    breakdown = min(breakdowns, key=lambda b: b["half_step_s"] + b["mix_s"])
    checks = report(results, breakdown)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()},
                                         "results": results, "breakdown": breakdown, "checks": checks}, indent=1))


if __name__ == "__main__":
    main()
