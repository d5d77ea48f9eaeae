"""Peak memory of a participant-group actor against the size of the stacked state it hosts, per N and optimizer.

Workload: ``python -m dice_ray.simulate`` on the Ray engine with its default plan (on 2 cores: one actor hosting
every participant), the paper's MLP (64 -> 128 -> 64 -> 10, 17,226 parameters, 68.9 KB of float32 state per
participant) on ``synthetic`` digits-shaped data (40 samples per participant), batch 16, exponential graph,
``--rounds`` rounds, evaluated and checkpointed every 2nd round (so the peak includes evaluation and a
checkpoint's trip through the object store). Each run is a fresh process; its manifest records every actor's
peak RSS (``getrusage`` ru_maxrss: private memory plus the object-store pages the actor wrote).

Printed per (N, optimizer): S = the stacked state N x D x 4 bytes; the actor's peak RSS; peak / S; and
(peak - base) / S, where base is the same run's actor peak at N = 16 (torch, Ray's worker, the data code: a
fixed cost measured in the same invocation). Optimizer state adds 1x S for momentum and 2x S for Adam.

Run::

    python bench/bench_memory.py                              # N = 1024 4096 16384; sgd momentum adam (~6 min)
    python bench/bench_memory.py --nodes 16384 --optimizers sgd
    python bench/bench_memory.py --nodes 100000 --optimizers sgd --rounds 3 --no-checkpoint   # ~7 GB of state
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _tables import print_markdown, print_plain

PARAMS, BASE_N = 17_226, 16


def run(nodes: int, optimizer: str, rounds: int, checkpoint: bool, workdir: Path) -> dict[str, Any]:
    """One simulation in a fresh process; return its manifest's memory and time figures."""
    out = workdir / f"n{nodes}-{optimizer}"
    every = 2 if checkpoint else 0
    cmd = [sys.executable, "-m", "dice_ray.simulate", "--dataset", "synthetic", "--nodes", str(nodes),
           "--set", f"data.synthetic_samples={max(10_000, 40 * nodes)}", "--model", "mlp", "--optimizer", optimizer,
           "--lr", "0.05", "--batch-size", "16", "--topology", "exponential", "--rounds", str(rounds),
           "--eval-every", "2", "--checkpoint-every", str(every), "--engine", "ray", "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"N={nodes} {optimizer}: simulate exited {done.returncode}:\n{done.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    peaks = manifest["peak_rss_mib"]
    return {"nodes": nodes, "optimizer": optimizer, "actor_peak_mib": max(peaks["actors"]),
            "actors": len(peaks["actors"]), "driver_peak_mib": peaks["driver"],
            "wall_s": time.perf_counter() - start, "state_mib": nodes * PARAMS * 4 / 2**20}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--optimizers", nargs="+", default=["sgd", "momentum", "adam"],
                   choices=["sgd", "momentum", "adam"])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--no-checkpoint", action="store_true", help="no checkpoint (a 100,000-participant run's "
                   "checkpoint alone is 7 GB through the object store)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        base = run(BASE_N, "sgd", args.rounds, not args.no_checkpoint, Path(tmp))
        print(f"base: N={BASE_N} actor peak {base['actor_peak_mib']:.0f} MiB (fixed cost)", flush=True)
        for n in args.nodes:
            for opt in args.optimizers:
                # N = BASE_N with SGD is the base run itself (its run directory exists): reuse it
                r = dict(base) if (n, opt) == (BASE_N, "sgd") else run(n, opt, args.rounds, not args.no_checkpoint,
                                                                          Path(tmp))
                r["peak_over_state"] = r["actor_peak_mib"] / r["state_mib"]
                r["growth_over_state"] = (r["actor_peak_mib"] - base["actor_peak_mib"]) / r["state_mib"]
                results.append(r)
                print(f"N={n} {opt}: actor peak {r['actor_peak_mib']:.0f} MiB, state {r['state_mib']:.0f} MiB, "
                      f"peak/S {r['peak_over_state']:.2f}, (peak-base)/S {r['growth_over_state']:.2f} "
                      f"({r['wall_s']:.0f} s)", flush=True)
    header = ["N", "optimizer", "state S MiB", "actor peak MiB", "peak / S", "(peak − base) / S", "driver peak MiB"]
    rows = [[str(r["nodes"]), r["optimizer"], f"{r['state_mib']:.0f}", f"{r['actor_peak_mib']:.0f}",
             f"{r['peak_over_state']:.2f}", f"{r['growth_over_state']:.2f}", f"{r['driver_peak_mib']:.0f}"]
            for r in results]
    print(f"\n== peak actor RSS against the stacked state S (base = N={BASE_N}: {base['actor_peak_mib']:.0f} MiB) ==")
    print_plain(header, rows)
    print()
    print_markdown(header, rows)
    sgd = [r for r in results if r["optimizer"] == "sgd" and r["nodes"] >= 16384]
    for r in sgd:
        verdict = "met" if r["peak_over_state"] <= 3 else "not met"
        print(f"target (SGD, N={r['nodes']}): peak / S = {r['peak_over_state']:.2f} ≤ 3: {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"base": base, "results": results}, indent=2))


if __name__ == "__main__":
    main()
