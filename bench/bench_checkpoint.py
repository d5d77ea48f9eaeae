"""What a checkpoint costs: seconds per checkpoint and the driver's memory, against the same run without checkpoints.

Workload: ``python -m dice_ray.simulate`` on ``synthetic`` data, the paper's MLP with momentum (so the state is the
parameters and one optimizer buffer: 2 x 17,226 float32 numbers per participant, 538 MiB at N = 4,096), batch 8,
exponential graph, ``--rounds`` rounds; once with ``--checkpoint-every K`` and once without, on the Ray engine (its
groups hand the state to the driver through the object store) and on the local engine, each a fresh process,
``--repeats`` times interleaved. From each pair's manifests:

- seconds per checkpoint = (training seconds with checkpoints - without) / checkpoints written, and that against
  the round time without them;
- the driver's extra peak memory (RSS, ``getrusage``) in states: (peak with - peak without) / S, S the state's size.
  On the Ray engine the driver's RSS counts the object-store pages it reads, so it moves with where the store puts
  each snapshot.

Run::

    python bench/bench_checkpoint.py                          # N = 4096, Ray and local, 3 repeats (~3 min on 2 cores)
    python bench/bench_checkpoint.py --nodes 16384 --engines ray --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _tables import print_markdown, print_plain

PARAMS = 17_226  # the paper's MLP on 1x8x8 inputs


def run(nodes: int, engine: str, rounds: int, every: int, out: Path) -> dict[str, Any]:
    """One simulation in a fresh process; return its manifest's time, checkpoint and memory figures."""
    cmd = [sys.executable, "-m", "dice_ray.simulate", "--dataset", "synthetic", "--nodes", str(nodes),
           "--set", f"data.synthetic_samples={24 * nodes}", "--batch-size", "8", "--optimizer", "momentum",
           "--momentum", "0.9", "--rounds", str(rounds), "--set", f"output.checkpoint_every={every}",
           "--engine", engine, "--no-progress", "--out", str(out), "--overwrite"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"N={nodes} {engine} every {every}: simulate exited {done.returncode}:\n{done.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"training_s": manifest["training_seconds"], "checkpoints": manifest["checkpoints_written"],
            "driver_mib": manifest["peak_rss_mib"]["driver"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[4096])
    p.add_argument("--engines", nargs="+", default=["ray", "local"], choices=["ray", "local"])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--every", type=int, default=2, help="checkpoint every K rounds")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write every run's figures here")
    args = p.parse_args(argv)

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        for n in args.nodes:
            state_mib = n * PARAMS * 2 * 4 / 2**20
            for engine in args.engines:
                for repeat in range(args.repeats):
                    plain = run(n, engine, args.rounds, 0, Path(tmp) / "plain")
                    saved = run(n, engine, args.rounds, args.every, Path(tmp) / "saved")
                    per = (saved["training_s"] - plain["training_s"]) / max(saved["checkpoints"], 1)
                    r = {"nodes": n, "engine": engine, "repeat": repeat, "state_mib": state_mib, "plain": plain,
                         "saved": saved, "s_per_checkpoint": per,
                         "checkpoint_over_round": per / (plain["training_s"] / args.rounds),
                         "driver_extra_states": (saved["driver_mib"] - plain["driver_mib"]) / state_mib}
                    results.append(r)
                    print(f"N={n} {engine} #{repeat}: {per:.2f} s a checkpoint ({saved['checkpoints']} written; "
                          f"{r['checkpoint_over_round']:.2f}x a round), driver {plain['driver_mib']:.0f} -> "
                          f"{saved['driver_mib']:.0f} MiB (+{r['driver_extra_states']:.2f} states)", flush=True)

    def spread(values: list[float], fmt: str) -> str:
        return f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}, {format(max(values), fmt)}]"

    header = ["N", "engine", "state S MiB", "s / checkpoint", "checkpoint / round", "driver extra peak / S"]
    rows = []
    for n in args.nodes:
        for engine in args.engines:
            rs = [r for r in results if r["nodes"] == n and r["engine"] == engine]
            rows.append([str(n), engine, f"{rs[0]['state_mib']:.0f}",
                         spread([r["s_per_checkpoint"] for r in rs], ".2f"),
                         spread([r["checkpoint_over_round"] for r in rs], ".2f"),
                         spread([r["driver_extra_states"] for r in rs], ".2f")])
    print(f"\n== a checkpoint every {args.every} rounds against none: median [min, max] over {args.repeats} pairs ==")
    print_plain(header, rows)
    print()
    print_markdown(header, rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
