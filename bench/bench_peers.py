"""dice-ray against Flower's simulation engine, the same per-participant work: seconds per round.

Workload, on both sides, per participant (Flower: client) and round: ONE SGD step, batch 16, lr 0.05, on
    mlp  the project's registered "mlp" on 1x8x8 inputs (64 -> 128 -> 64 -> 10, ReLU; 17,226 parameters);
    cnn  the project's registered "cnn" on 1x28x28 inputs (two 3x3 conv-maxpool-ReLU blocks of 16 and 32
         channels, a 64-unit hidden layer, 10 classes; 105,866 parameters), rebuilt in plain torch for Flower.
dice-ray (``dice_ray.run(RunConfig(...), engine="ray")``, the project venv): N participants on an exponential
graph (uniform weights), gossip after every step, its default actor plan (on 2 cores: one actor, 2 threads),
data ``synthetic`` (1x8x8; for the CNN ``data.synthetic_shape`` [1, 28, 28] where the config takes that field,
else the real ``mnist5k`` images where they give every participant a batch, else the registered
``bench-random-1x28x28`` set of ``bench/_bench_data.py``; the table says which). No evaluation but after the
last round; no checkpoints. Flower (``bench/_flower_side.py`` in its own venv, default
``~/.cache/dice-ray/bench-flower-venv``, made on first use with ``pip install flwr[simulation] torch==2.14.1``:
Flower pins its own Ray): N clients, 1 CPU each, FedAvg over all N every round, random tensors of the same
shapes, the current ``run_simulation`` API (``--flower-api start_simulation`` for the legacy one).

Round time, both sides: every run is a fresh process, timed whole (dice-ray: the manifest's ``wall_seconds``;
Flower: the ``run_simulation`` call); s/round = (length of an R2-round run − length of an R1-round run) / (R2 − R1),
so start-up (Ray, actors, data) and the last evaluation cancel. R1 is small; R2 is chosen from R1's in-run round
times so that the R2 − R1 extra rounds take about ``--target-s`` seconds (and once more from the R2 run's, if
they took less than half of it). The in-run rate (time between rounds' ends inside the longer run) is printed
beside it as a check; "*" marks a cell where the two disagree by > 30%. Before each run the script waits (up to
``--settle-s``) for the CPUs to be < 25% busy. For each (N, model) both sides run back to back, alternating which
goes first; ``--repeats`` runs it all again (the lowest s/round counts). Flower runs have a per-run timeout
(``--timeout``) and are reported "timed out" past it. Also printed: where the time goes (a Flower client's own
work against its CPU time per client-round: the per-message overhead). Targets at N = 256: Flower / dice-ray
≥ 100 for the MLP, ≥ 10 for the CNN.

Run::

    python bench/bench_peers.py                        # N = 64 256 1024, mlp and cnn (~30 min on 2 cores)
    python bench/bench_peers.py --nodes 64 256         # the targets' N only (~14 min)
    python bench/bench_peers.py --quick                # smoke run: N = 64, short runs
    python bench/bench_peers.py --models mlp --nodes 256 --repeats 2 --json peers.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _rates import burst_rate
from _tables import print_markdown, print_plain

BENCH = Path(__file__).resolve().parent
FLOWER_SIDE = BENCH / "_flower_side.py"
DEFAULT_VENV = Path.home() / ".cache" / "dice-ray" / "bench-flower-venv"
FLOWER_PACKAGES = ("flwr[simulation]>=1.20,<2", "torch==2.14.1")
BATCH, LR = 16, 0.05
SHAPES = {"mlp": (1, 8, 8), "cnn": (1, 28, 28)}
TARGETS = {"mlp": 100.0, "cnn": 10.0}  # Flower s/round / dice-ray s/round at N = 256
MNIST5K_TRAIN = 4500  # mnist5k's fixed 90/10 split: training images


# -- Flower's venv ------------------------------------------------------------------------------------------


def flower_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def flower_versions(venv: Path) -> str | None:
    """'flwr X, ray Y, torch Z' if ``venv`` has a Python that imports all three, else None."""
    python = flower_python(venv)
    if not python.is_file():
        return None
    probe = ("import flwr, ray, torch; "
             "print(f'flwr {flwr.__version__}, ray {ray.__version__}, torch {torch.__version__}')")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_flower_venv(venv: Path) -> str:
    """Make Flower's venv at ``venv`` unless it already imports flwr, ray and torch; return their versions.

    Outside the project venv on purpose: ``flwr[simulation]`` pins its own Ray."""
    versions = flower_versions(venv)
    if versions:
        print(f"Flower venv {venv}: {versions}", flush=True)
        return versions
    print(f"creating Flower's venv at {venv}: python -m venv, then pip install {' '.join(FLOWER_PACKAGES)} "
          "(first use only; a few minutes) ...", flush=True)
    start = time.perf_counter()
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(flower_python(venv)), "-m", "pip", "install", "--quiet", *FLOWER_PACKAGES], check=True,
                   stdout=sys.stderr)
    versions = flower_versions(venv)
    if not versions:
        raise SystemExit(f"Flower's venv at {venv} does not import flwr, ray and torch after installing them")
    print(f"created Flower's venv in {time.perf_counter() - start:.0f} s: {versions}", flush=True)
    return versions


# -- dice-ray's side ----------------------------------------------------------------------------------------


def synthetic_shape_configurable() -> bool:
    """Whether this version's run config takes ``data.synthetic_shape``."""
    import dice_ray

    try:
        dice_ray.RunConfig(data={"dataset": "synthetic", "synthetic_shape": [1, 28, 28]})
    except dice_ray.InputError:
        return False
    return True


def dice_data(model: str, nodes: int) -> tuple[dict[str, Any], list[str], dict[str, str], str]:
    """Return (the run config's data section, its imports, extra environment, a label) for ``model`` at N."""
    samples = max(10_000, 40 * nodes)  # synthetic: 80/20 split, 10% validation: >= 28 training samples each
    if model == "mlp":
        return {"dataset": "synthetic", "synthetic_samples": samples}, [], {}, "synthetic 1x8x8"
    if synthetic_shape_configurable():
        return ({"dataset": "synthetic", "synthetic_samples": samples, "synthetic_shape": list(SHAPES[model])}, [],
                {}, "synthetic 1x28x28")
    if MNIST5K_TRAIN // nodes >= BATCH:  # no validation split: every participant keeps >= 16 images
        return {"dataset": "mnist5k", "val_fraction": 0.0}, [], {}, "mnist5k (real)"
    return ({"dataset": "bench-random-1x28x28"}, ["_bench_data"], {"DICE_BENCH_SAMPLES": str(24 * nodes)},
            "bench-random-1x28x28")


def dice_config(model: str, nodes: int, rounds: int, out: str,
                conv: str = "auto") -> tuple[dict[str, Any], dict[str, str], str]:
    data, imports, env, label = dice_data(model, nodes)
    data["heldout_size"] = BATCH  # the one evaluation (after the last round) cancels out; keep it short
    config = {"imports": imports, "nodes": nodes, "rounds": rounds, "seed": 0,
              "topology": {"name": "exponential", "weights": "uniform"}, "data": data,
              "model": {"name": model, "init": "same", "conv": conv},
              "optim": {"name": "sgd", "lr": LR, "batch_size": BATCH},
              "output": {"out": out, "progress": False, "eval_every": 10_000_000, "checkpoint_every": 0,
                         "overwrite": True}}
    return config, env, label


def dice_worker(model: str, nodes: int, rounds: int, conv: str = "auto") -> None:
    """One dice-ray run (this process, the project venv); print its timings as one JSON line."""
    import dice_ray

    marks: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        config, _, label = dice_config(model, nodes, rounds, str(Path(tmp) / "run"), conv)
        start = time.perf_counter()
        run = dice_ray.run(dice_ray.RunConfig(**config), engine="ray",
                           on_round=lambda metrics, engine: marks.append(time.perf_counter()))
        call_s = time.perf_counter() - start
        manifest = run.manifest
        shape = tuple(manifest["data"]["input_shape"])
        if shape != SHAPES[model]:
            raise SystemExit(f"dice-ray ran {model} on inputs {shape}, not {SHAPES[model]}")
        last = run.rounds[run.rounds["round"] == rounds - 1]
        print(json.dumps({"run_s": float(manifest["wall_seconds"]), "call_s": call_s,
                          "round_ends": [m - start for m in marks], "actors": int(manifest["actors"]),
                          "threads": [p.get("threads") for p in manifest.get("placement", [])],
                          "data": label, "final_train_loss": float(last["train_loss"].mean()),
                          "ray": manifest.get("versions", {}).get("ray")}))


# -- running one side ---------------------------------------------------------------------------------------


def run_json(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` in its own process group; return the JSON of its last stdout line, or {'timed_out': True}
    (the whole group killed) or {'error': ...}."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        time.sleep(3)  # Ray's processes die with their parent
        return {"timed_out": True}
    if proc.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-8:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(out.strip().splitlines()[-1])


def settle(limit_s: float = 30.0) -> float:
    """Wait (up to ``limit_s``) until the machine's CPU busy share over 0.5 s is below 25% — the previous run's
    Ray processes take a few seconds to go — and return that share (%)."""

    def busy_idle() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4], fields[3] + fields[4]

    deadline = time.monotonic() + limit_s
    while True:
        b0, i0 = busy_idle()
        time.sleep(0.5)
        b1, i1 = busy_idle()
        busy = 100.0 * (b1 - b0) / max(b1 - b0 + i1 - i0, 1)
        if busy < 25 or time.monotonic() > deadline:
            return busy


def one_run(side: str, model: str, nodes: int, rounds: int, args: argparse.Namespace) -> dict[str, Any]:
    if side == "flower":
        cmd = [str(flower_python(args.flower_venv)), str(FLOWER_SIDE), "--model", model, "--nodes", str(nodes),
               "--rounds", str(rounds), "--api", args.flower_api, "--cpus", str(args.cpus)]
        env = None
    else:
        cmd = [sys.executable, __file__, "--worker-dice", model, str(nodes), str(rounds), "--dice-conv", args.dice_conv]
        env = {**os.environ, **dice_config(model, nodes, rounds, "")[1]}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), env.get("PYTHONPATH", "")) if p)
    busy = settle(args.settle_s)
    load = os.getloadavg()[0]
    res = run_json(cmd, args.timeout if side == "flower" else args.dice_timeout, env)
    res.update(rounds=rounds, load1_before=load, busy_pct_before=busy)
    state = ("timed out" if res.get("timed_out") else "FAILED" if "error" in res
             else f"{res['run_s']:.2f} s")
    print(f"    {side:<8} N={nodes:<5} {model} {rounds:>5} rounds: {state}  (before: load1 {load:.2f}, "
          f"cpu busy {busy:.0f}%)", flush=True)
    if "error" in res:
        print("      " + res["error"].replace("\n", "\n      "), flush=True)
    return res


def in_run_rate(res: dict[str, Any], side: str) -> float | None:
    """Seconds per round inside one run, from its round ends: Flower from the second round on; dice-ray from
    the fourth round on and without the last (it evaluates), between the ends of chunks of rounds (``_rates``:
    short rounds reach the driver in bursts). A dice-ray run too short for two chunks: from its first round's end to
    its last's (too fast by at most the first chunk's length: a pilot then plans more rounds, not fewer)."""
    ends = res.get("round_ends") or []
    whole = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else None
    if side == "flower":
        return whole
    return burst_rate(ends, min(3, max(len(ends) - 3, 0)), len(ends) - 2)[0] or whole


def measure(side: str, model: str, nodes: int, args: argparse.Namespace, plan: dict[str, int] | None
            ) -> dict[str, Any]:
    """R1- and R2-round runs of ``side``; return the difference quotient with both runs. ``plan`` (R1, R2)
    comes from an earlier repeat, else R2 is chosen from R1's in-run rate."""
    r1 = plan["r1"] if plan else (2 if side == "flower" else 5)
    first = one_run(side, model, nodes, r1, args)
    if "run_s" not in first:
        return {"side": side, "status": "timed out" if first.get("timed_out") else "failed", "runs": [first]}
    rate = in_run_rate(first, side) or first["run_s"] / r1

    def rounds_for(rate: float) -> int:
        extra = math.ceil(args.target_s / max(rate, 1e-4))
        lo, hi = (2, 50) if side == "flower" else (3, 20_000)
        extra = min(max(extra, lo), hi)
        if side == "flower":  # the longer run must fit in the timeout: its start-up plus the extra rounds
            extra = max(1, min(extra, int((0.8 * args.timeout - first["run_s"]) / rate)))
        return r1 + extra

    r2 = plan["r2"] if plan else rounds_for(rate)
    second = one_run(side, model, nodes, r2, args)
    if "run_s" not in second:
        return {"side": side, "status": "timed out" if second.get("timed_out") else "failed", "r1": r1, "r2": r2,
                "runs": [first, second], "pilot_s_per_round": rate}
    # A short pilot can misjudge the rate (its few rounds include warm-up): if the extra rounds took less than
    # half the target, once more with the rate of the longer run.
    better = in_run_rate(second, side)
    if not plan and better and (r2 - r1) * better < 0.5 * args.target_s and rounds_for(better) > 1.5 * r2:
        r2 = rounds_for(better)
        third = one_run(side, model, nodes, r2, args)
        if "run_s" not in third:
            return {"side": side, "status": "timed out" if third.get("timed_out") else "failed", "r1": r1,
                    "r2": r2, "runs": [first, second, third], "pilot_s_per_round": rate}
        second = third
    diff = (second["run_s"] - first["run_s"]) / (r2 - r1)
    return {"side": side, "status": "ok", "r1": r1, "r2": r2, "s_per_round": diff,
            "in_run_s_per_round": in_run_rate(second, side), "startup_s": first["run_s"] - r1 * diff,
            "runs": [first, second]}


# -- report -------------------------------------------------------------------------------------------------


def best(results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return results[0]
    return {**min(ok, key=lambda r: r["s_per_round"]), "all_s_per_round": [r["s_per_round"] for r in ok]}


def noisy(side: dict[str, Any]) -> bool:
    """Whether the difference quotient disagrees with the in-run rate by more than 30% (or is not positive):
    start-up times that varied more than the extra rounds took."""
    diff, inside = side.get("s_per_round"), side.get("in_run_s_per_round")
    return side["status"] == "ok" and (diff <= 0 or (inside is not None and abs(diff / inside - 1) > 0.3))


def fmt(side: dict[str, Any], key: str = "s_per_round") -> str:
    if side["status"] != "ok":
        return side["status"]
    value = side.get(key)
    return "—" if value is None else f"{value:.4f}" + ("*" if key == "s_per_round" and noisy(side) else "")


def table(cells: dict[tuple[int, str], dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["N", "model", "dice-ray data", "Flower s/round", "dice-ray s/round", "Flower / dice-ray",
              "Flower in-run", "dice-ray in-run", "ratio in-run", "rounds R1→R2 (Flower; dice-ray)"]
    rows = []
    for (n, model), cell in cells.items():
        fl, dr = cell["flower"], cell["dice"]
        ratio = (f"{fl['s_per_round'] / dr['s_per_round']:.1f}×" if fl["status"] == dr["status"] == "ok"
                 and dr["s_per_round"] > 0 else "—")
        fi, di = fl.get("in_run_s_per_round"), dr.get("in_run_s_per_round")
        ratio_in = f"{fi / di:.1f}×" if fi and di else "—"
        data = next((r.get("data") for r in dr.get("runs", []) if r.get("data")), "—")
        rounds = "; ".join(f"{s['r1']}→{s['r2']}" if "r2" in s else "—" for s in (fl, dr))
        rows.append([str(n), model, data, fmt(fl), fmt(dr), ratio, fmt(fl, "in_run_s_per_round"),
                     fmt(dr, "in_run_s_per_round"), ratio_in, rounds])
    return header, rows






def report(cells: dict[tuple[int, str], dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    header, rows = table(cells)
    print("\n== seconds per round: (R2-run length − R1-run length) / (R2 − R1); in-run: between rounds' ends ==")
    print_plain(header, rows)
    flagged = any(noisy(c[s]) for c in cells.values() for s in ("flower", "dice"))
    footnote = ("* the difference of run lengths is off the in-run rate by > 30%: start-up varied more than the "
                "extra rounds took (a busy machine?); raise --target-s or rerun" if flagged else "")
    if footnote:
        print(footnote)

    checks: dict[str, Any] = {}
    print("\n== targets at N=256 (Flower s/round / dice-ray s/round) ==")
    for model, goal in TARGETS.items():
        cell = cells.get((256, model))
        if cell is None:
            print(f"{model}: N=256 not measured in this run")
            continue
        fl, dr = cell["flower"], cell["dice"]
        if fl["status"] != "ok" or dr["status"] != "ok":
            print(f"{model}: no ratio (Flower {fl['status']}, dice-ray {dr['status']})"
                  + ("; Flower slower than its timeout: target met" if fl["status"] == "timed out" else ""))
            checks[model] = {"met": fl["status"] == "timed out" and dr["status"] == "ok"}
            continue
        ratio = fl["s_per_round"] / dr["s_per_round"]
        checks[model] = {"ratio": ratio, "target": goal, "met": ratio >= goal}
        print(f"{model}: {ratio:.1f}×  target ≥ {goal:g}×  {'met' if ratio >= goal else 'NOT met'}")

    print("\n== where the time goes (in-run rates: start-up noise does not enter) ==")
    for (n, model), cell in cells.items():
        fl, dr = cell["flower"], cell["dice"]
        parts = []
        if fl["status"] == "ok" and fl.get("in_run_s_per_round"):
            per_client = fl["in_run_s_per_round"] * args.cpus / n  # CPU-seconds per client and round
            compute = [c for r in fl["runs"] for c in r.get("client_compute_s", [])[1:]]
            mean_compute = sum(compute) / len(compute) if compute else float("nan")
            parts.append(f"Flower {per_client * 1e3:.1f} ms of a CPU per client-round, of which the client's own "
                         f"work {mean_compute * 1e3:.1f} ms: ~{(per_client - mean_compute) * 1e3:.1f} ms per "
                         f"message round trip; start-up {fl['startup_s']:.0f} s")
        if dr["status"] == "ok" and dr.get("in_run_s_per_round"):
            parts.append(f"dice-ray {dr['in_run_s_per_round'] * args.cpus / n * 1e3:.2f} ms of a CPU per "
                         f"participant-round (step + gossip), start-up {dr['startup_s']:.0f} s")
        print(f"N={n} {model}: " + "; ".join(parts))

    print("\n== Markdown ==\n")
    print_markdown(header, rows)
    print()
    if footnote:
        print(footnote + "\n")
    print("Targets at N=256: " + ("not measured in this run" if not checks else "") + ", ".join(
        f"{m} {c['ratio']:.1f}× (≥ {c['target']:g}×: {'met' if c['met'] else 'not met'})" if "ratio" in c
        else f"{m}: {'met (Flower timed out)' if c['met'] else 'no ratio'}" for m, c in checks.items()))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=None, help="N values (default 64 256 1024)")
    parser.add_argument("--models", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 64, ~5 s of extra rounds per run")
    parser.add_argument("--repeats", type=int, default=1, help="measure everything this many times, alternating "
                                                              "which side goes first; the lowest s/round counts")
    parser.add_argument("--target-s", type=float, default=None,
                        help="seconds the R2 − R1 extra rounds should take (default 40; --quick 5)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one Flower run may take")
    parser.add_argument("--dice-timeout", type=float, default=900.0, help="seconds one dice-ray run may take")
    parser.add_argument("--flower-venv", type=Path, default=DEFAULT_VENV,
                        help=f"Flower's venv, made on first use (default {DEFAULT_VENV})")
    parser.add_argument("--flower-api", choices=("run_simulation", "start_simulation"), default="run_simulation")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs Flower's Ray gets (default: all; "
                                                                          "dice-ray's local Ray takes all)")
    parser.add_argument("--settle-s", type=float, default=30.0,
                        help="before each run, wait up to this long for the CPUs to be < 25%% busy (default 30)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    parser.add_argument("--dice-conv", default="auto", choices=("auto", "native", "unfold", "channels-last"),
                        help="dice-ray's model.conv (default auto; see bench_cnn_modes.py for the CPU variants)")
    parser.add_argument("--worker-dice", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_dice:
        model, nodes, rounds = args.worker_dice
        dice_worker(model, int(nodes), int(rounds), args.dice_conv)
        return
    args.nodes = args.nodes or ([64] if args.quick else [64, 256, 1024])
    args.target_s = args.target_s or (5.0 if args.quick else 40.0)

    start = time.perf_counter()
    import torch

    import dice_ray

    flower = ensure_flower_venv(args.flower_venv)
    print(f"dice-ray {dice_ray.__version__} (torch {torch.__version__}); Flower side: {flower}, {args.flower_api}; "
          f"{os.cpu_count()} CPUs, {args.cpus} for Flower's clients; batch {BATCH}, lr {LR}; "
          f"R2 − R1 rounds ≈ {args.target_s:g} s", flush=True)
    # One small untimed run per side first: the first run after an install or a quiet spell reads Python,
    # torch and Ray from a cold disk cache and starts several seconds slower than the rest.
    print("warm-up runs (untimed): N=8, 1 round, each side ...", flush=True)
    for side in ("flower", "dice"):
        one_run(side, "mlp", 8, 1, args)
    plans: dict[tuple[int, str, str], dict[str, int]] = {}
    runs: dict[tuple[int, str], dict[str, list[dict[str, Any]]]] = {}
    turn = 0
    for repeat in range(args.repeats):
        for n in args.nodes:
            for model in args.models:
                sides = ("flower", "dice") if turn % 2 == 0 else ("dice", "flower")
                turn += 1
                print(f"[{repeat + 1}/{args.repeats}] N={n} {model}: {' then '.join(sides)}", flush=True)
                for side in sides:
                    res = measure(side, model, n, args, plans.get((n, model, side)))
                    if "r2" in res and res["status"] == "ok":
                        plans[(n, model, side)] = {"r1": res["r1"], "r2": res["r2"]}
                    runs.setdefault((n, model), {"flower": [], "dice": []})[side].append(res)
                    if res["status"] == "ok":
                        print(f"  {side}: {res['s_per_round']:.4f} s/round (in-run "
                              f"{res['in_run_s_per_round'] or float('nan'):.4f})", flush=True)
                save(args, flower, runs, {})  # so far, in case the run is cut short
    cells = {key: {side: best(r) for side, r in row.items()} for key, row in runs.items()}
    checks = report(cells, args)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    save(args, flower, runs, checks)


def save(args: argparse.Namespace, flower: str, runs: dict[tuple[int, str], dict[str, list[dict[str, Any]]]],
         checks: dict[str, Any]) -> None:
    """Write every measurement (each repeat's, and the best per cell) to ``--json``, if given."""
    if not args.json:
        return
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    cells = [{"nodes": n, "model": m, **{side: best(r) for side, r in row.items() if r}, "repeats": row}
             for (n, m), row in runs.items()]
    args.json.write_text(json.dumps({"args": settings, "flower": flower, "checks": checks, "cells": cells}, indent=1))


if __name__ == "__main__":
    main()
