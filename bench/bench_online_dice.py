"""In-loop DICE-E (``--online-dice``) against DICE-E on windows replayed after training: time, memory, numbers.

Both variants run the same whole ``python -m dice_ray.simulate`` command (DICE-E only, both variants, no
DICE-GT: ``influence.ground_truth`` false), each in a fresh process with its own local Ray, alternating
(replay, online, replay, online, ...) ``--repeats`` times. Per variant it prints the lowest and the median of
the run's wall time (the manifest's ``wall_seconds``: actors, training, influence, tables; Ray's start not
included) and the peak RSS of the driver and of the largest participant-group actor (the replay's influence
tasks run in other worker processes, not counted here: the windows they hold, R + 1 states of every
participant per probe round, are the replay's memory cost); then the ratios online / replay of the
medians measured in this one run, and the largest difference between the two runs' ``dice.parquet``
estimates, relative to the largest value (they compute the same recursion).

Run::

    python bench/bench_online_dice.py                  # 16-node ring, digits, 30 rounds, 160 probes, 3 hops
    python bench/bench_online_dice.py --nodes 64 --topology exponential --dataset mnist5k --rounds 60 \\
        --set influence.sample_sources=8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

VARIANTS = ("replay", "online")
ESTIMATES = ("est_first_order", "est_curvature")


def run(args: argparse.Namespace, variant: str, out: Path) -> dict:
    """Run ``simulate`` once for ``variant``; return its wall seconds and peak memory (MiB)."""
    cmd = [sys.executable, "-m", "dice_ray.simulate", "--no-progress", "--overwrite", "--out", str(out),
           "--nodes", str(args.nodes), "--topology", args.topology, "--dataset", args.dataset,
           "--rounds", str(args.rounds), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
           "--influence", "--hops", str(args.hops), "--set", "influence.ground_truth=false",
           "--checkpoint-every", "0", *[x for s in args.set for x in ("--set", s)]]
    if variant == "online":
        cmd.append("--online-dice")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{done.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    peaks = manifest["peak_rss_mib"]
    return {"wall_s": manifest["wall_seconds"], "driver_mib": peaks["driver"], "actor_mib": max(peaks["actors"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hops", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()

    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for variant in VARIANTS:
                results[variant].append(run(args, variant, Path(tmp) / variant))
                print(f"repeat {i + 1} {variant}: {results[variant][-1]}", flush=True)
        dice = {v: pd.read_parquet(Path(tmp) / v / "dice.parquet") for v in VARIANTS}
    print(f"\nN = {args.nodes} {args.topology}, {args.dataset}, {args.rounds} rounds, {args.hops} hops, "
          f"{len(dice['replay']) // args.hops} probes; {args.repeats} runs each")
    print(f"{'variant':>8} {'wall best s':>11} {'wall median s':>13} {'driver MiB':>10} {'largest actor MiB':>17}")
    median = {}
    for variant, rows in results.items():
        walls = [r["wall_s"] for r in rows]
        median[variant] = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
        print(f"{variant:>8} {min(walls):>11.2f} {median[variant]['wall_s']:>13.2f} "
              f"{median[variant]['driver_mib']:>10.0f} {median[variant]['actor_mib']:>17.0f}")
    for key, label in (("wall_s", "wall time"), ("actor_mib", "largest group actor's peak RSS")):
        print(f"online / replay, {label}: {median['online'][key] / median['replay'][key]:.2f}")
    for column in ESTIMATES:
        a, b = dice["replay"][column].to_numpy(), dice["online"][column].to_numpy()
        print(f"largest |online - replay| / max |replay|, {column}: {np.abs(a - b).max() / np.abs(a).max():.1e}")


if __name__ == "__main__":
    main()
