"""README's headline numbers, rerun: each row's command, repeated, printed as the median with its range, the date and
the machine, so a reader who reruns it can see whether they land inside the range.

Rows (``--rows``, comma-separated; all by default):

    default     ``python -m dice_ray.simulate --nodes 256`` with the defaults (100 rounds): wall seconds, rounds/s,
                the actor's peak memory.
    flower      ``bench/bench_peers.py --models mlp cnn --nodes 256``: Flower s/round / dice-ray s/round per repeat
                (each repeat alternates which side goes first; Flower lives in its own venv, see bench_peers).
    memory      ``bench/bench_memory.py --nodes 16384 --optimizers sgd``: the actor's peak / the stacked state.
    alignment   README's 16-node ring command (``--influence --hops 3``): the lowest Spearman, over hops and
                variants, of each hop's DICE-E against DICE-GT, and curvature's error against first-order's at hop 3.
                Deterministic: same config and seed, same numbers.
    detection   ``configs/anomaly-proximal.yaml``, label flippers, seeds 0-2: proximal influence's ROC AUC after 2
                and 20 rounds and the training-loss baseline's after 2, mean (min) over seeds. Deterministic.
    collaborators  docs/results/collaborators.md's 64 participants with 10% label flippers, seeds 0-2, static
                against influence-based rewiring: mean final honest accuracy, and on how many seeds it rose.
    contributions  ``configs/contributions.yaml --loo``, seeds 0-4: Spearman of the ledger's totals against
                leave-one-out, and whether every flipper and no one else is flagged harmful.

Timing rows repeat ``--repeats`` times (default 3); the alignment row runs ``--deterministic-repeats`` times
(default 1: a rerun gives the same numbers by construction, which the golden-table tests check), and the other
deterministic rows run their seeds once. Each repeat is a
fresh process. The machine should be quiet: the script prints the load average before each row.

    python bench/headline.py                              # everything (~35 min on 2 cores)
    python bench/headline.py --rows default,memory --repeats 5 --json headline.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _tables import print_markdown

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("default", "flower", "memory", "alignment", "detection", "collaborators", "contributions")
DETERMINISTIC = ("alignment", "detection", "collaborators", "contributions")
SEEDED_ONCE = ("detection", "collaborators", "contributions")  # deterministic rows that run their seeds once


def machine() -> str:
    """CPU model, cores, torch's CPU kernels, the versions that decide the numbers."""
    import numpy
    import ray
    import torch

    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
            f"numpy {numpy.__version__}, ray {ray.__version__}, Python {platform.python_version()}")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min)"


def python(*args: str, cwd: Path = ROOT) -> None:
    subprocess.run([sys.executable, *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def summary(values: list[float]) -> dict[str, Any]:
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "values": [float(v) for v in values]}


def cell(s: dict[str, Any], fmt: str) -> str:
    if s["min"] == s["max"]:
        return f"{s['median']:{fmt}}" + (f" (all {len(s['values'])} equal)" if len(s["values"]) > 1 else "")
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def row_default(repeats: int, tmp: Path) -> dict[str, Any]:
    walls, rates, peaks = [], [], []
    for i in range(repeats):
        out = tmp / f"default-{i}"
        python("-m", "dice_ray.simulate", "--nodes", "256", "--no-progress", "--out", str(out))
        manifest = json.loads((out / "manifest.json").read_text())
        walls.append(manifest["wall_seconds"])
        rates.append(manifest["rounds_per_second"])
        peaks.append(max(manifest["peak_rss_mib"]["actors"]) / 1024)
    return {"wall_s": summary(walls), "rounds_per_s": summary(rates), "actor_peak_gib": summary(peaks),
            "text": f"{cell(summary(walls), '.1f')} s, {cell(summary(rates), '.2f')} rounds/s, actor peak "
                    f"{cell(summary(peaks), '.2f')} GiB"}


def row_flower(repeats: int, tmp: Path, target_s: float, settle_s: float) -> dict[str, Any]:
    out = tmp / "peers.json"
    python("bench/bench_peers.py", "--models", "mlp", "cnn", "--nodes", "256", "--repeats", str(repeats),
           "--target-s", str(target_s), "--settle-s", str(settle_s), "--json", str(out))
    cells = json.loads(out.read_text())["cells"]
    result, texts = {}, []
    for c in cells:
        flower = [r["s_per_round"] for r in c["repeats"]["flower"] if r.get("status") == "ok"]
        dice = [r["s_per_round"] for r in c["repeats"]["dice"] if r.get("status") == "ok"]
        ratios = [f / d for f, d in zip(flower, dice, strict=False)]
        if not ratios:
            continue
        result[c["model"]] = {"flower_s": summary(flower), "dice_s": summary(dice), "ratio": summary(ratios)}
        texts.append(f"{c['model'].upper()} {cell(summary(ratios), '.1f')}× (Flower {cell(summary(flower), '.3f')} "
                     f"s/round, dice-ray {cell(summary(dice), '.4f')})")
    result["text"] = "; ".join(texts)
    return result


def row_memory(repeats: int, tmp: Path) -> dict[str, Any]:
    ratios = []
    for i in range(repeats):
        out = tmp / f"memory-{i}.json"
        python("bench/bench_memory.py", "--nodes", "16384", "--optimizers", "sgd", "--json", str(out))
        ratios.append(json.loads(out.read_text())["results"][0]["peak_over_state"])
    return {"peak_over_state": summary(ratios), "text": f"actor peak {cell(summary(ratios), '.2f')}× the stacked state"}


def repeats_of(row: str, args: argparse.Namespace) -> int:
    """How many times ``row`` ran."""
    if row in SEEDED_ONCE:
        return 1
    return args.deterministic_repeats if row in DETERMINISTIC else args.repeats


def row_alignment(repeats: int, tmp: Path) -> dict[str, Any]:
    """The lowest Spearman of the hop-r terms over hops and variants, and the relative error of the per-participant
    terms at hop 3 for first-order and curvature (README: "curvature halves the first-order error at hop 3")."""
    import dice_ray

    lows, ratios = [], []
    for i in range(repeats):
        out = tmp / f"alignment-{i}"
        python("-m", "dice_ray.simulate", "--dataset", "digits", "--nodes", "16", "--topology", "ring", "--lr", "0.05",
               "--batch-size", "16", "--rounds", "30", "--influence", "--hops", "3", "--no-progress", "--out", str(out))
        table = dice_ray.open_run(out).alignment()
        lows.append(float(table[table.quantity == "hop"].spearman.min()))
        terms = table[(table.quantity == "terms") & (table.hops == 3)].set_index("variant")["relative_error"]
        ratios.append(float(terms["curvature"] / terms["first-order"]))
    return {"spearman_min": summary(lows), "curvature_over_first_order_hop3": summary(ratios),
            "text": f"Spearman ≥ {cell(summary(lows), '.4f')} at every hop; curvature's relative error of the "
                    f"hop-3 terms {cell(summary(ratios), '.2f')}× first-order's"}


def row_detection(repeats: int, tmp: Path) -> dict[str, Any]:
    """Seeds 0-2, as docs/results/detection.md: the mean over seeds (and its minimum) of each AUC."""
    import dice_ray

    at2, at20, loss2 = [], [], []
    for seed in (0, 1, 2):
        out = tmp / f"detection-{seed}"
        python("-m", "dice_ray.simulate", "--config", "configs/anomaly-proximal.yaml", "--misbehavior", "label-flip",
               "--seed", str(seed), "--no-progress", "--out", str(out))
        report = dice_ray.open_run(out).anomaly([2, 20])
        auc = report.set_index(["method", "horizon"]).auc
        at2.append(float(auc[("proximal", 2)]))
        at20.append(float(auc[("proximal", 20)]))
        loss2.append(float(auc[("train-loss", 2)]))

    def mean_min(values: list[float]) -> str:
        return f"{np.mean(values):.3f} (min {np.min(values):.3f})"

    return {"auc_2": at2, "auc_20": at20, "loss_2": loss2,
            "text": f"ROC AUC {mean_min(at2)} after 2 rounds, {mean_min(at20)} at round 20 (training-loss "
                    f"baseline {mean_min(loss2)} at round 2); mean over seeds 0-2"}


def row_collaborators(repeats: int, tmp: Path) -> dict[str, Any]:
    from dice_ray.reports.collaborators import collaborator_row

    static, rewired = [], []
    for seed in (0, 1, 2):
        for mode, into in (("none", static), ("influence", rewired)):
            out = tmp / f"collab-{mode}-{seed}"
            rewiring = [] if mode == "none" else ["--rewire-every", "10", "--rewire-keep", "6", "--rewire-candidates",
                                                  "4"]  # a rewiring option with --rewire none is refused
            python("-m", "dice_ray.simulate", "--nodes", "64", "--rounds", "50", "--lr", "0.1", "--batch-size", "16",
                   "--val-fraction", "0.2", "--eval-every", "10", "--rewire", mode, *rewiring, "--proximal", "--seed",
                   str(seed),
                   "--misbehavior", "label-flip", "--misbehaving-fraction", "0.1", "--engine", "local",
                   "--no-progress", "--out", str(out))
            into.append(collaborator_row(out)["honest_acc"])
    wins = sum(b > a for a, b in zip(static, rewired, strict=True))
    return {"static": static, "influence": rewired, "wins": wins,
            "text": f"honest accuracy up on {wins} of 3 seeds ({np.mean(static):.4f} → {np.mean(rewired):.4f})"}


def row_contributions(repeats: int, tmp: Path) -> dict[str, Any]:
    import dice_ray

    spearman, clean = [], True
    for seed in range(5):
        out = tmp / f"contrib-{seed}"
        python("-m", "dice_ray.simulate", "--config", "configs/contributions.yaml", "--seed", str(seed), "--loo",
               "--no-progress", "--out", str(out))
        report = dice_ray.open_run(out).contributions(loo=True)
        rows = report.table
        spearman.append(report.agreement["loo"]["spearman"])
        clean &= bool(rows.loc[rows["misbehaving"], "harmful"].all()) and not rows.loc[~rows["misbehaving"],
                                                                                       "harmful"].any()
    return {"spearman": spearman, "every_flipper_flagged_no_one_else": clean,
            "text": f"Spearman {min(spearman):.2f}–{max(spearman):.2f} over 5 seeds; "
                    + ("every flipper flagged, no one else" if clean else "NOT every flipper alone flagged")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the timing rows (default 3)")
    parser.add_argument("--deterministic-repeats", type=int, default=1, help="repeats of the deterministic rows")
    parser.add_argument("--flower-target-s", type=float, default=20.0, help="bench_peers' --target-s")
    parser.add_argument("--flower-settle-s", type=float, default=30.0, help="bench_peers' --settle-s")
    parser.add_argument("--json", type=Path, default=None, help="write every value here")
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    where = machine()
    print(f"{when}; {where}", flush=True)
    results: dict[str, Any] = {"date": when, "machine": where}
    with tempfile.TemporaryDirectory(prefix="headline-") as tmp:
        for row in rows:
            print(f"{row}: {load()} ...", flush=True)
            if row == "flower":
                got = row_flower(args.repeats, Path(tmp), args.flower_target_s, args.flower_settle_s)
            elif row in DETERMINISTIC:
                got = globals()[f"row_{row}"](args.deterministic_repeats, Path(tmp))
            else:
                got = globals()[f"row_{row}"](args.repeats, Path(tmp))
            results[row] = got
            print(f"{row}: {got['text']}", flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    print()
    print_markdown(["row", "median (range over repeats)", "repeats"],
                   [[row, results[row]["text"], str(repeats_of(row, args))] for row in rows])
    print(f"\n{when}; {where}")


if __name__ == "__main__":
    main()
