"""GPU check: CUDA participant-group actors against CPU actors (same numbers) and against the fused step (speed).

Everything goes through the public API: ``dice_ray.run(dice_ray.RunConfig(...), engine="ray")`` and the ``Run``
handle's tables and manifest, on a local Ray started once in this process. Parts:

    (a) equivalence: the same config on CPU actors (``engine.gpus_per_actor`` 0) and on CUDA actors with
        ``gpus_per_actor`` 1 and 0.5 (two actors per GPU); rounds.parquet compared column by column (train,
        validation and held-out losses, consensus distance; evaluation every round). The MLP on 1x8x8 inputs
        and the CNN on 3x32x32 inputs, N = 64 (``--quick``: 16), 5 rounds. Target: within 1e-4. Float32 reductions
        (matmul, convolution, the gossip sums) run in another order on the GPU (cuBLAS / cuDNN kernels, other
        blocking) than on the CPU, so bitwise equality is not expected; the differences start at float32
        rounding (~1e-7 relative) and SGD carries them along a few rounds. cuDNN may also use TF32 for float32
        convolutions (PyTorch's default ``torch.backends.cudnn.allow_tf32 = True``): 10-bit mantissas, ~1e-3
        relative — so the CNN is also run with TF32 off in the actors (``bench/_bench_fp32.py`` in the run's
        ``imports``), to tell the two apart. The printed "holds to" is the tightest of 1e-7 … 1e-2 that bounds
        every difference.
    (b) round time: seconds per round inside one run (between the ends of rounds 3 and R−2: no start-up, no
        last evaluation; ``on_round`` timestamps), at N = 256 and 4,096, for the MLP (1x8x8) and the CNN on
        3x32x32 (``--resnet18`` adds ResNet-18 at N = 256), with ``gpus_per_actor`` 1 and 0.5; exponential graph,
        batch 16, SGD lr 0.05, no evaluation but after the last round.
    (c) the fused step: ONE copy of the same model taking one SGD step on the concatenated batch of all N
        participants (N·16 samples) on the same GPU — the same FLOPs without per-participant state or gossip;
        median seconds per step (``torch.cuda.synchronize``), ``torch.cuda.max_memory_allocated``. (b) / (c) is
        the price of N separate models.
    (d) GPU memory per participant: the peak of the actors' GPU memory (``nvidia-smi``, sampled every 0.2 s
        during each run of (b); the PyTorch cache included, as the device sees it), divided by N, and the
        slope between N = 256 and 4,096 (fixed costs such as CUDA contexts cancel).
    (s) CPU sanity, always (the only part on a machine without CUDA): the CNN on 3x32x32 data (the data path
        the GPU parts use), N = 16, 3 rounds, CPU actors, run twice: identical tables; the fused step's rebuilt
        CNN has the registered one's parameter count (the timed models are checked the same way in (c)).

3x32x32 data: ``data.synthetic_shape`` [3, 32, 32] of the ``synthetic`` set where the run config takes that
field, else the ``bench-random-3x32x32`` set registered by ``bench/_bench_data.py`` (named in the run's
``imports``; ``bench/`` goes on ``PYTHONPATH`` for Ray's workers). The header line says which.

Without a CUDA device every CUDA part prints "skipped: no CUDA device", the sanity part runs (< 60 s on 2
cores), and the script exits 0. One call on a GPU machine measures everything; it prints an estimate first
(default ~7 min on one H200, ``--quick`` ~3 min: guesses until measured; a run of (b) stops its timed rounds
at twice ``--target-s``).

    python bench/bench_gpu.py                         # everything (GPU), or the CPU sanity part alone
    python bench/bench_gpu.py --quick                 # N = 256 only, shorter runs
    python bench/bench_gpu.py --json gpu.json --resnet18
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _tables import print_markdown
from torch import nn

BENCH = Path(__file__).resolve().parent
BATCH, LR, CLASSES = 16, 0.05, 10
SHAPES = {"mlp": (1, 8, 8), "cnn": (3, 32, 32), "resnet18": (3, 32, 32)}
TOLERANCE = 1e-4
COMPARED = ("train_loss", "val_loss", "heldout_loss", "consensus_distance")
# Guessed seconds per round on one H200 (gpus_per_actor 1), only to size runs and print the estimate.
GUESS_S = {("mlp", 256): 0.01, ("mlp", 4096): 0.05, ("cnn", 256): 0.03, ("cnn", 4096): 0.4,
           ("resnet18", 256): 0.6}
STARTUP_GUESS_S = 20.0  # per run: actors, CUDA contexts, data (more at N = 4,096 on 3x32x32)


class StopRun(Exception):
    """Raised from ``on_round`` once a timed run has spent its budget: enough rounds are timed."""


# -- run configs ----------------------------------------------------------------------------------------------


def synthetic_shape_configurable() -> bool:
    """Whether this version's run config takes ``data.synthetic_shape``."""
    import dice_ray

    try:
        dice_ray.RunConfig(data={"dataset": "synthetic", "synthetic_shape": [3, 32, 32]})
    except dice_ray.InputError:
        return False
    return True


def data_section(model: str, nodes: int, shape_ok: bool) -> tuple[dict[str, Any], list[str], int | None]:
    """(data section, imports, DICE_BENCH_SAMPLES or None) giving every participant >= 16 training samples."""
    if SHAPES[model] == (1, 8, 8):
        return {"dataset": "synthetic", "synthetic_samples": max(10_000, 40 * nodes)}, [], None
    if shape_ok:  # synthetic: an 80/20 train/test split; no validation split
        return ({"dataset": "synthetic", "synthetic_samples": max(2_000, 20 * nodes),
                 "synthetic_shape": list(SHAPES[model]), "val_fraction": 0.0}, [], None)
    return {"dataset": "bench-random-3x32x32", "val_fraction": 0.0}, ["_bench_data"], max(1_000, 16 * nodes + 64)


def run_config(model: str, nodes: int, rounds: int, gpus: float, out: str, shape_ok: bool, eval_every: int,
               fp32: bool = False) -> tuple[dict[str, Any], int | None]:
    data, imports, samples = data_section(model, nodes, shape_ok)
    data["heldout_size"] = 64 if eval_every == 1 else BATCH
    if eval_every == 1 and data.get("val_fraction") == 0.0:
        data["val_fraction"] = 0.2  # equivalence runs compare validation losses too
        samples = samples and int(samples * 1.3)
        if "synthetic_samples" in data:
            data["synthetic_samples"] = int(data["synthetic_samples"] * 1.3)
    config = {"imports": imports + (["_bench_fp32"] if fp32 else []), "nodes": nodes, "rounds": rounds, "seed": 0,
              "topology": {"name": "exponential", "weights": "uniform"}, "data": data,
              "model": {"name": model, "init": "same"},
              "optim": {"name": "sgd", "lr": LR, "batch_size": BATCH},
              "engine": {"gpus_per_actor": gpus},
              "output": {"out": out, "progress": False, "eval_every": eval_every, "checkpoint_every": 0,
                         "overwrite": True}}
    return config, samples


# -- GPU memory, as the device sees it -------------------------------------------------------------------------


class GpuMemory:
    """Samples ``nvidia-smi`` every 0.2 s in a thread: the peak, MiB, of the summed memory of compute processes
    other than this one, and of the device's used memory above what it was at the start."""

    def __init__(self) -> None:
        self.smi = shutil.which("nvidia-smi")
        self.peak_procs = 0.0
        self.peak_device = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline = self._device_used() if self.smi else 0.0

    def _query(self, what: str) -> list[list[str]]:
        done = subprocess.run([self.smi, f"--query-{what}", "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=10)
        return [[c.strip() for c in line.split(",")] for line in done.stdout.strip().splitlines() if line.strip()]

    def _device_used(self) -> float:
        rows = self._query("gpu=memory.used")
        return float(sum(float(r[0]) for r in rows)) if rows else 0.0

    def _loop(self) -> None:
        me = str(os.getpid())
        while not self._stop.is_set():
            try:
                procs = sum(float(r[1]) for r in self._query("compute-apps=pid,used_memory")
                            if len(r) > 1 and r[0] != me and r[1].replace(".", "").isdigit())
                self.peak_procs = max(self.peak_procs, procs)
                self.peak_device = max(self.peak_device, self._device_used() - self.baseline)
            except (subprocess.SubprocessError, ValueError, OSError):
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> GpuMemory:
        if self.smi:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict[str, float | None]:
        if not self.smi:
            return {"procs_mib": None, "device_mib": None}
        return {"procs_mib": self.peak_procs or None, "device_mib": self.peak_device or None}


# -- one dice-ray run ----------------------------------------------------------------------------------------


def dice_run(model: str, nodes: int, rounds: int, gpus: float, shape_ok: bool, *, eval_every: int = 10_000_000,
             budget_s: float | None = None, fp32: bool = False) -> dict[str, Any]:
    """Run the config; return its rounds table, round-end timestamps, placement, and (GPU) memory peaks. With
    ``budget_s``, stop after that many seconds of rounds past the third (the run then ends 'failed' on purpose,
    its timestamps kept)."""
    import dice_ray

    marks: list[float] = []

    def on_round(metrics: Any, engine: Any) -> None:
        marks.append(time.perf_counter())
        if budget_s is not None and len(marks) > 8 and marks[-1] - marks[3] > budget_s:
            raise StopRun

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        config, samples = run_config(model, nodes, rounds, gpus, str(Path(tmp) / "run"), shape_ok, eval_every, fp32)
        if samples is not None:
            os.environ["DICE_BENCH_SAMPLES"] = str(samples)
        stopped = False
        start = time.perf_counter()
        with GpuMemory() if gpus > 0 else _NoMemory() as memory:
            try:
                run = dice_ray.run(dice_ray.RunConfig(**config), engine="ray", on_round=on_round)
            except StopRun:
                stopped = True
                run = dice_ray.open_run(Path(tmp) / "run")
        manifest = run.manifest
        shape = tuple(manifest["data"]["input_shape"])
        if shape != SHAPES[model]:
            raise SystemExit(f"dice-ray ran {model} on inputs {shape}, not {SHAPES[model]}")
        rounds_table = None if stopped else run.rounds.sort_values(["round", "node"]).reset_index(drop=True)
        placement = manifest.get("placement") or []
        return {"rounds_table": rounds_table, "ends": [m - start for m in marks], "stopped_early": stopped,
                "actors": manifest.get("actors"), "devices": sorted({str(p.get("device")) for p in placement}) or ["?"],
                "wall_s": time.perf_counter() - start, "memory": memory.result(), "data": manifest["data"]["dataset"],
                "parameters": manifest["model"]["parameters"]}


class _NoMemory:
    def __enter__(self) -> _NoMemory:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def result(self) -> dict[str, None]:
        return {"procs_mib": None, "device_mib": None}


def in_run_s_per_round(ends: list[float], stopped: bool) -> tuple[float | None, int]:
    """(seconds per round between the ends of round 3 and of the last round before the final evaluation, the
    number of rounds in between)."""
    hi = len(ends) - 1 if stopped else len(ends) - 2
    return ((ends[hi] - ends[3]) / (hi - 3), hi - 3) if hi > 3 else (None, 0)


# -- the fused step ---------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.skip(x))


def build_model(name: str) -> nn.Module:
    """The same architectures as dice-ray's registered "mlp", "cnn" and "resnet18" on ``SHAPES[name]``."""
    channels, height, width = SHAPES[name]
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, 128), nn.ReLU(),
                             nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, CLASSES))
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(32 * (height // 4) * (width // 4), 64), nn.ReLU(), nn.Linear(64, CLASSES))
    layers: list[nn.Module] = [nn.Conv2d(channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, CLASSES))


def fused_step(model_name: str, nodes: int, device: str, steps: int = 20, warmup: int = 5) -> dict[str, Any]:
    """Median seconds of one SGD step of one model on N·16 samples on ``device``; peak allocated memory."""
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x = torch.randn(nodes * BATCH, *SHAPES[model_name], device=device)
    y = torch.randint(0, CLASSES, (nodes * BATCH,), device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    out = {"s_per_step": float(np.median(seconds)), "loss": float(loss.item()),
           "parameters": sum(p.numel() for p in model.parameters()),
           "max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
    del model, opt, x, y
    if cuda:
        torch.cuda.empty_cache()
    return out


# -- comparisons ------------------------------------------------------------------------------------------------


def compare(a: Any, b: Any) -> dict[str, Any]:
    """Largest absolute difference of each compared column of two rounds tables (NaN where both are NaN)."""
    out: dict[str, Any] = {}
    if list(a[["round", "node"]].itertuples(index=False)) != list(b[["round", "node"]].itertuples(index=False)):
        return {"rows_differ": True, "max": math.inf}
    for col in COMPARED:
        x, y = a[col].to_numpy(np.float64), b[col].to_numpy(np.float64)
        both = ~(np.isnan(x) & np.isnan(y))
        out[col] = float(np.max(np.abs(x[both] - y[both]))) if both.any() else None
    finite = [v for v in out.values() if v is not None]
    out["max"] = max(finite) if finite else 0.0
    return out


def holds_to(diff: float) -> str:
    """The tightest of 1e-7 … 1e-2 bounding ``diff`` ('exact' for 0)."""
    if diff == 0:
        return "exact"
    for exp in range(-7, -1):
        if diff <= 10.0 ** exp:
            return f"1e{exp}"
    return f"> 1e-2 ({diff:.1e})"


# -- the parts ---------------------------------------------------------------------------------------------------


def sanity(shape_ok: bool) -> dict[str, Any]:
    """(s): CPU actors, N = 16: the CNN on 3x32x32 data (the GPU parts' data path) twice, 3 rounds, evaluated
    every round: identical tables; its parameter count against this script's rebuilt CNN; a fused step."""
    out: dict[str, Any] = {}
    start = time.perf_counter()
    first = dice_run("cnn", 16, 3, 0.0, shape_ok, eval_every=1)
    second = dice_run("cnn", 16, 3, 0.0, shape_ok, eval_every=1)
    identical = first["rounds_table"].equals(second["rounds_table"])
    finite = bool(np.isfinite(first["rounds_table"]["train_loss"]).all())
    out.update(twice_identical=identical, twice=compare(first["rounds_table"], second["rounds_table"]),
               finite=finite, data=first["data"])
    print(f"(s) CPU, N=16, cnn on 3x32x32 ({first['data']}), 3 rounds, run twice: tables "
          f"{'identical' if identical else 'DIFFER'} (largest difference {out['twice']['max']:.1e}; mean train "
          f"loss {first['rounds_table']['train_loss'].mean():.4f}; {first['actors']} actor(s), {first['devices']})",
          flush=True)
    fused = fused_step("cnn", 16, "cpu", steps=3, warmup=2)
    out["fused_cpu_cnn_16"] = fused
    out["parameters_match"] = fused["parameters"] == first["parameters"]
    print(f"(s) CPU fused step, cnn, 16x16 samples: {fused['s_per_step'] * 1e3:.1f} ms; its model has "
          f"{fused['parameters']:,} parameters, dice-ray's registered cnn {first['parameters']:,}"
          + ("" if out["parameters_match"] else " — MISMATCH"), flush=True)
    out["ok"] = identical and finite and out["parameters_match"]
    out["seconds"] = time.perf_counter() - start
    return out


def equivalence(models: list[str], nodes: int, shape_ok: bool) -> list[dict[str, Any]]:
    """(a): CPU vs gpus_per_actor 1 vs 0.5 (and, for convolutions, 1 with TF32 off)."""
    rows = []
    for model in models:
        cpu = dice_run(model, nodes, 5, 0.0, shape_ok, eval_every=1)
        variants = [("gpus_per_actor=1", 1.0, False), ("gpus_per_actor=0.5", 0.5, False)]
        if model != "mlp":
            variants.append(("gpus_per_actor=1, TF32 off", 1.0, True))
        for label, gpus, fp32 in variants:
            gpu = dice_run(model, nodes, 5, gpus, shape_ok, eval_every=1, fp32=fp32)
            diff = compare(cpu["rounds_table"], gpu["rounds_table"])
            row = {"model": model, "nodes": nodes, "variant": label, "actors": gpu["actors"],
                   "devices": gpu["devices"], **diff, "holds_to": holds_to(diff["max"]),
                   "within_tolerance": diff["max"] <= TOLERANCE}
            rows.append(row)
            print(f"(a) {model} N={nodes}: CPU ({cpu['actors']} actors) vs {label} ({gpu['actors']} actors on "
                  f"{gpu['devices']}): largest |difference| {diff['max']:.2e} -> holds to {row['holds_to']} "
                  f"({'within' if row['within_tolerance'] else 'NOT within'} {TOLERANCE:g}); "
                  + ", ".join(f"{c} {diff[c]:.1e}" for c in COMPARED if diff.get(c) is not None), flush=True)
    return rows


def timing(cases: list[tuple[str, int]], fractions: list[float], shape_ok: bool, target_s: float
           ) -> list[dict[str, Any]]:
    """(b) and (d): in-run seconds per round and GPU memory of each (model, N, gpus_per_actor)."""
    rows = []
    for model, nodes in cases:
        for gpus in fractions:
            guess = GUESS_S.get((model, nodes), 0.1) * (1.5 if gpus < 1 else 1.0)
            rounds = min(max(math.ceil(target_s / guess), 10), 400) + 5
            res = dice_run(model, nodes, rounds, gpus, shape_ok, budget_s=2.0 * target_s)
            rate, timed = in_run_s_per_round(res["ends"], res["stopped_early"])
            mem = res["memory"]
            peak = mem["procs_mib"] or mem["device_mib"]
            row = {"model": model, "nodes": nodes, "gpus_per_actor": gpus, "actors": res["actors"],
                   "devices": res["devices"], "s_per_round": rate, "rounds_timed": timed,
                   "stopped_early": res["stopped_early"], "run_wall_s": res["wall_s"], "gpu_mib": mem,
                   "gpu_mib_per_participant": peak / nodes if peak else None, "data": res["data"],
                   "parameters": res["parameters"]}
            rows.append(row)
            print(f"(b) {model} N={nodes} gpus_per_actor={gpus:g}: {res['actors']} actor(s) on {res['devices']}, "
                  + (f"{rate:.4f} s/round" if rate else "no rate") + f" over {row['rounds_timed']} rounds"
                  + (" (stopped at its time budget)" if res["stopped_early"] else "")
                  + f"; GPU peak {peak or float('nan'):.0f} MiB (run {res['wall_s']:.0f} s)", flush=True)
    return rows


def fused(cases: list[tuple[str, int]], timed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(c), for each (model, N); warns where the rebuilt model's parameter count is not dice-ray's."""
    counts = {r["model"]: r["parameters"] for r in timed}
    rows = []
    for model, nodes in cases:
        res = fused_step(model, nodes, "cuda")
        rows.append({"model": model, "nodes": nodes, **res})
        same = counts.get(model) in (None, res["parameters"])
        print(f"(c) fused {model} on {nodes}x{BATCH} samples: {res['s_per_step'] * 1e3:.2f} ms/step, "
              f"max allocated {res['max_allocated_mib'] or float('nan'):.0f} MiB"
              + ("" if same else f"; WARNING: {res['parameters']:,} parameters, dice-ray's {counts[model]:,}"),
              flush=True)
    return rows


# -- report ----------------------------------------------------------------------------------------------------




def report(results: dict[str, Any]) -> None:
    print("\n== Markdown ==\n")
    if results.get("equivalence"):
        print_markdown(["model", "N", "CPU vs", "actors", *(f"max abs Δ {c}" for c in COMPARED), "holds to",
                        f"≤ {TOLERANCE:g}"],
                       [[r["model"], str(r["nodes"]), r["variant"], str(r["actors"]),
                         *("—" if r.get(c) is None else f"{r[c]:.1e}" for c in COMPARED), r["holds_to"],
                         "yes" if r["within_tolerance"] else "no"] for r in results["equivalence"]])
        print()
    if results.get("timing"):
        fused_by = {(f["model"], f["nodes"]): f for f in results.get("fused", [])}
        rows = []
        for r in results["timing"]:
            f = fused_by.get((r["model"], r["nodes"]))
            rate = r["s_per_round"]
            rows.append([r["model"], "x".join(map(str, SHAPES[r["model"]])), str(r["nodes"]),
                         f"{r['gpus_per_actor']:g}", str(r["actors"]), "—" if rate is None else f"{rate:.4f}",
                         "—" if f is None else f"{f['s_per_step']:.4f}",
                         "—" if f is None or rate is None else f"{rate / f['s_per_step']:.1f}",
                         "—" if not r["gpu_mib_per_participant"] else f"{r['gpu_mib_per_participant']:.2f}",
                         "—" if f is None or f["max_allocated_mib"] is None else f"{f['max_allocated_mib']:.0f}"])
        print_markdown(["model", "input", "N", "gpus/actor", "actors", "dice-ray s/round", "fused s/step",
                        "dice-ray / fused", "GPU MiB per participant (peak / N)", "fused max allocated MiB"], rows)
        print()
        for model in sorted({r["model"] for r in results["timing"]}):
            for gpus in sorted({r["gpus_per_actor"] for r in results["timing"]}):
                pts = {r["nodes"]: (r["gpu_mib"]["procs_mib"] or r["gpu_mib"]["device_mib"])
                       for r in results["timing"] if r["model"] == model and r["gpus_per_actor"] == gpus}
                if len(pts) >= 2 and all(pts.values()):
                    lo, hi = min(pts), max(pts)
                    slope = (pts[hi] - pts[lo]) / (hi - lo)
                    print(f"GPU memory per participant, {model}, gpus_per_actor={gpus:g}: {slope:.3f} MiB "
                          f"(slope between N={lo} and N={hi})")


def estimate(args: argparse.Namespace, cases: list[tuple[str, int]]) -> float:
    """Guessed seconds of the whole GPU part on one H200."""
    eq_runs = len(args.eq_models) * 3 + sum(m != "mlp" for m in args.eq_models)
    total = eq_runs * (STARTUP_GUESS_S * 0.75)
    for model, nodes in cases:
        for gpus in args.fractions:
            guess = GUESS_S.get((model, nodes), 0.1) * (1.5 if gpus < 1 else 1.0)
            rounds = min(max(math.ceil(args.target_s / guess), 10), 400) + 5
            total += STARTUP_GUESS_S * (2 if nodes >= 4096 else 1) + min(rounds * guess, 2.0 * args.target_s + 5)
        total += 5  # fused step
    return total + 30  # Ray start, imports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 16 for (a); N = 256 only, shorter runs for (b)")
    parser.add_argument("--json", type=Path, default=None, help="write all results to this JSON file")
    parser.add_argument("--nodes", type=int, nargs="+", default=None, help="N of (b)-(d) (default 256 4096)")
    parser.add_argument("--fractions", type=float, nargs="+", default=None,
                        help="gpus_per_actor values of (b) (default 1 0.5; --quick 1)")
    parser.add_argument("--resnet18", action="store_true", help="also time ResNet-18 on 3x32x32 at N = 256")
    parser.add_argument("--target-s", type=float, default=None,
                        help="seconds of timed rounds per run of (b) (default 6; --quick 3)")
    args = parser.parse_args()
    args.nodes = args.nodes or ([256] if args.quick else [256, 4096])
    args.fractions = args.fractions or ([1.0] if args.quick else [1.0, 0.5])
    args.target_s = args.target_s or (3.0 if args.quick else 6.0)
    args.eq_models = ["mlp", "cnn"]
    eq_nodes = 16 if args.quick else 64

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH", "")) if p)
    sys.path.insert(0, str(BENCH))  # Ray's workers (started later) get it from PYTHONPATH; this process here
    start = time.perf_counter()
    import dice_ray

    shape_ok = synthetic_shape_configurable()
    cuda = torch.cuda.is_available()
    cases = [(m, n) for m in ("mlp", "cnn") for n in args.nodes]
    if args.resnet18:
        cases.append(("resnet18", 256))
    gpu_name = torch.cuda.get_device_name(0) if cuda else None
    print(f"dice-ray {dice_ray.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"CUDA: {gpu_name or 'none'} ({torch.cuda.device_count()} device(s)); 3x32x32 data: "
          + ("synthetic with data.synthetic_shape" if shape_ok else
             "bench-random-3x32x32 (bench/_bench_data.py; the config has no data.synthetic_shape)"), flush=True)
    results: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "cuda": gpu_name, "synthetic_shape_configurable": shape_ok, "skipped": []}
    if cuda:
        print(f"estimated time of the GPU parts: ~{estimate(args, cases) / 60:.0f} min on one H200 "
              "(guessed round times; (b) stops a run's timed rounds at twice --target-s)", flush=True)

    results["sanity"] = sanity(shape_ok)

    parts = ([f"(a) equivalence {m} N={eq_nodes}: CPU vs gpus_per_actor={g}" for m in args.eq_models
              for g in ("1", "0.5")]
             + [f"(b) round time {m} N={n} gpus_per_actor={g:g}" for m, n in cases for g in args.fractions]
             + [f"(c) fused step {m} N={n}" for m, n in cases]
             + ["(d) GPU memory per participant"])
    if not cuda:
        for part in parts:
            print(f"{part}: skipped: no CUDA device", flush=True)
        results["skipped"] = parts
    else:
        results["equivalence"] = equivalence(args.eq_models, eq_nodes, shape_ok)
        results["timing"] = timing(cases, args.fractions, shape_ok, args.target_s)
        import ray

        ray.shutdown()  # the actors are gone already; the fused steps get the GPU alone
        results["fused"] = fused(cases, results["timing"])
        report(results)
    results["wall_s"] = time.perf_counter() - start
    ok = results["sanity"]["ok"] and all(r["within_tolerance"] for r in results.get("equivalence", []))
    results["ok"] = ok
    print(f"\nsanity {'OK' if results['sanity']['ok'] else 'FAILED'}"
          + ("" if not cuda else f"; equivalence within {TOLERANCE:g}: "
             + ("all" if ok else "NOT all (see (a))"))
          + f"; wall time {results['wall_s']:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    sys.exit(0 if results["sanity"]["ok"] else 1)


if __name__ == "__main__":
    main()
