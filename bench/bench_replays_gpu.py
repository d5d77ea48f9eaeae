"""DICE-GT replays on CPUs against replays on a GPU: the README's 160-probe alignment study, timed on each.

The study is README's alignment command (digits, the paper's MLP, 16-node ring, η = 0.05, batch 16, 30 rounds,
``--influence --hops 3``: whole-batch probes of every source over the last 10 rounds that leave room for 3 hops, DICE-GT
and the default DICE-E variants), measured as a run measures it: ``measure_influence`` on a local Ray, one task
recording the windows and one task per 4 probes replaying them. On the CPU the tasks ask for no GPU
(``engine.gpus_per_task 0``); on the GPU each asks for ``--gpu-shares`` of one and computes on CUDA. Each side runs
``--repeats`` times (the first also starts Ray's workers, and on the GPU their CUDA contexts); the ratio is of the
fastest runs. Printed and saved (``--json``): seconds per run, CPU seconds / GPU seconds, the largest absolute
difference of the DICE-GT columns (influence terms d_k^{(s)} and DICE^{(r)}) and of the DICE-E ones between the devices
(``fp32`` precision: TF32 off, so only float32 rounding differs), and the alignment (lowest Spearman over hops of the
hop terms, DICE-E curvature against DICE-GT) on each device. Without CUDA the GPU part is skipped and says so.

    python bench/bench_replays_gpu.py                      # the 160 probes (2 cores: CPU runs 19 s, then 10 s)
    python bench/bench_replays_gpu.py --quick              # 24 probes on an 8-node ring (2 cores: 20 s in all)
    python bench/bench_replays_gpu.py --gpu-shares 0.25 0.0625 --json replays_gpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from _studies import replays_alone

warnings.filterwarnings("ignore")

GT_COLUMNS = {"influence": ("gt",), "dice": ("gt", "gt_hop", "gt_horizon")}
ESTIMATE_COLUMNS = {"influence": ("est_first_order", "est_curvature"), "dice": ("est_first_order", "est_curvature")}
GT_TOLERANCE = 1e-5  # fp32 on both devices: DICE-GT may differ by float32 rounding of the replayed states only
KEYS = {"influence": ("probe_id", "step", "target"), "dice": ("probe_id", "hops")}


def study(quick: bool, gt_only: bool, gpus_per_task: float) -> Any:
    """The alignment study's experiment (``quick``: 8 nodes, 12 rounds, 2 hops, 3 probe rounds)."""
    from dice_ray.config import build_config
    from dice_ray.experiment import prepare

    size = {"nodes": 8, "rounds": 12} if quick else {"nodes": 16, "rounds": 30}
    influence = {"enabled": True, "hops": 2 if quick else 3, "last": 3 if quick else 10}
    experiment = prepare(build_config({
        **size, "topology": {"name": "ring"}, "data": {"dataset": "digits"},
        "optim": {"lr": 0.05, "batch_size": 16}, "influence": influence,
        "engine": {"gpus_per_task": gpus_per_task, "precision": "fp32"}, "output": {"progress": False}}))
    return replays_alone(experiment) if gt_only else experiment


def timed(experiment: Any, repeats: int) -> tuple[list[float], dict[str, list[dict]]]:
    """Seconds of each of ``repeats`` measurements of every probe on the connected Ray, and the last one's rows."""
    from dice_ray.engine.tasks import RayTasks
    from dice_ray.methods.dice.replays import measure_influence

    seconds, rows = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        influence, dice = measure_influence(experiment, RayTasks(experiment.config.engine))
        seconds.append(time.perf_counter() - start)
        rows = {"influence": influence, "dice": dice}
    return seconds, rows


def task_device(share: float) -> str:
    """The device a task with ``share`` of a GPU computes on (the replay tasks' own rule)."""
    import ray

    from dice_ray.engine.tasks import start_task

    return ray.get(ray.remote(num_cpus=1, num_gpus=share)(start_task).remote())


def column(rows: list[dict], table: str, name: str) -> np.ndarray:
    """``name`` of ``rows`` sorted by the table's key, as float64 (None as NaN)."""
    ordered = sorted(rows, key=lambda r: tuple(r[k] for k in KEYS[table]))
    return np.array([np.nan if r[name] is None else r[name] for r in ordered], np.float64)


def max_difference(a: dict[str, list[dict]], b: dict[str, list[dict]], columns: dict[str, tuple]) -> float:
    """The largest |a − b| over ``columns`` of both tables (NaN where a column is absent; inf where one table alone
    has a NaN)."""
    worst = 0.0
    for table, names in columns.items():
        for name in names:
            if not a[table] or name not in a[table][0]:
                continue
            x, y = column(a[table], table, name), column(b[table], table, name)
            if x.shape != y.shape:
                return float("inf")
            if not np.array_equal(np.isnan(x), np.isnan(y)):  # NaN on one side only: a difference
                return float("inf")
            worst = max(worst, float(np.nanmax(np.abs(x - y), initial=0.0)))
    return worst


def largest(rows: dict[str, list[dict]], columns: dict[str, tuple]) -> float:
    """The largest |value| over ``columns`` of both tables (the scale the differences are small against)."""
    return max(float(np.nanmax(np.abs(column(rows[table], table, name)), initial=0.0))
               for table, names in columns.items() for name in names if rows[table] and name in rows[table][0])


def alignment(rows: dict[str, list[dict]]) -> float | None:
    """The lowest Spearman over hops r of DICE-E curvature's hop terms against DICE-GT's (None without estimates)."""
    from scipy.stats import spearmanr

    dice = rows["dice"]
    if not dice or dice[0].get("est_curvature_hop") is None:
        return None
    lows = []
    for r in sorted({row["hops"] for row in dice}):
        at = [row for row in dice if row["hops"] == r]
        lows.append(float(spearmanr([row["gt_hop"] for row in at], [row["est_curvature_hop"] for row in at])[0]))
    return min(lows)


def spearman(value: float | None) -> str:
    return "n/a (no estimates)" if value is None else f"{value:.4f}"


def machine() -> dict[str, Any]:
    import ray
    import torch

    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="24 probes on an 8-node ring instead of 160")
    parser.add_argument("--gt-only", action="store_true", help="DICE-GT alone (no DICE-E variants in the tasks)")
    parser.add_argument("--gpu-shares", type=float, nargs="+", default=None,
                        help="GPU share of each task, one GPU run per value (default: engine's default share)")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per device (the fastest counts)")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    from dice_ray.config import TASK_GPU_SHARE
    from dice_ray.engine import start_ray
    from dice_ray.methods.dice.probes import select_probes

    shares = args.gpu_shares or [TASK_GPU_SHARE]
    start_ray(num_cpus=args.cpus)
    import ray

    cpus, gpus = ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0)
    experiment = study(args.quick, args.gt_only, 0.0)
    probes = len(select_probes(experiment.config))
    config = experiment.config
    print(f"alignment study: {probes} probes ({config.nodes}-node ring, digits MLP, {config.rounds} rounds, hops "
          f"{config.influence.hops}, variants {','.join(config.influence.variants) or 'none'}); Ray: {cpus:g} CPUs, "
          f"{gpus:g} GPUs", flush=True)
    out: dict[str, Any] = {"machine": machine(), "probes": probes, "nodes": config.nodes, "rounds": config.rounds,
                           "hops": config.influence.hops, "variants": list(config.influence.variants),
                           "quick": args.quick, "repeats": args.repeats, "ray_cpus": cpus, "ray_gpus": gpus}

    def save() -> None:  # after each part: a GPU part that fails still leaves the CPU one
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n")

    seconds, cpu_rows = timed(experiment, args.repeats)
    out["cpu"] = {"device": task_device(0.0), "seconds": seconds, "best_s": min(seconds),
                  "alignment_spearman_min": alignment(cpu_rows)}
    print(f"  cpu tasks        runs {', '.join(f'{s:.1f}' for s in seconds)} s; alignment Spearman >= "
          f"{spearman(out['cpu']['alignment_spearman_min'])}", flush=True)
    save()

    if not torch.cuda.is_available() or gpus < max(shares):
        reason = "CUDA is not available" if not torch.cuda.is_available() else f"Ray sees {gpus:g} GPUs"
        out["gpu_skipped"] = reason
        print(f"  gpu part skipped: {reason}")
    else:
        out["gpu"] = []
        for share in shares:
            seconds, gpu_rows = timed(study(args.quick, args.gt_only, share), args.repeats)
            row = {"share": share, "device": task_device(share), "seconds": seconds, "best_s": min(seconds),
                   "cpu_over_gpu": out["cpu"]["best_s"] / min(seconds),
                   "max_abs_diff_gt": max_difference(cpu_rows, gpu_rows, GT_COLUMNS),
                   "max_abs_gt": largest(cpu_rows, GT_COLUMNS),
                   "max_abs_diff_estimates": max_difference(cpu_rows, gpu_rows, ESTIMATE_COLUMNS),
                   "alignment_spearman_min": alignment(gpu_rows)}
            row["gt_within_tolerance"] = row["max_abs_diff_gt"] <= GT_TOLERANCE
            out["gpu"].append(row)
            print(f"  gpu tasks {share:<6g} runs {', '.join(f'{s:.1f}' for s in seconds)} s on {row['device']}; "
                  f"cpu/gpu {row['cpu_over_gpu']:.2f}x; max |GT cpu - gpu| {row['max_abs_diff_gt']:.2e} "
                  f"({'within' if row['gt_within_tolerance'] else 'ABOVE'} {GT_TOLERANCE:g}) "
                  f"(largest |GT| {row['max_abs_gt']:.2e}); max |DICE-E cpu - gpu| "
                  f"{row['max_abs_diff_estimates']:.2e}; alignment Spearman >= "
                  f"{spearman(row['alignment_spearman_min'])}",
                  flush=True)
            save()
    save()
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
