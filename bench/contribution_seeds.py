"""The contribution ledger's variants against leave-one-participant-out over many seeds, and the ground truth's
own noise floor.

For every seed of ``configs/contributions.yaml`` (16 participants, exponential graph, η = 0.01, 100 rounds;
1, 6, 11 flip every label, 3, 8, 13 hold half the data), in this process, one torch thread, local engine:

1. the ledger: first-order at the config's ``ledger.every`` (2), and all three variants (first-order, curvature,
   second-order) at ``--every`` (default 20: the second-order ledger costs 6-20 s per ledger round here); the
   training is the same run whatever the ledger (it only reads it);
2. leave-one-out (LOO): the full run and one retraining run without each participant's data (17 runs);
3. the ground truth's reproducibility: LOO again with every participant's minibatch order changed — its data set,
   the initial model, W and the label flips as before; each participant's list of training indices is permuted
   with another seed, so z_k^t draws other samples of the same D_k — and Spearman(LOO, LOO′);
4. copies: participants 9 and 14 get exactly the training data of 0 and 5 (two extra pairs of equal data
   sets; 9's and 14's own data leave the run). The two members of a pair have equal LOO effects up to minibatch
   order and position (the graph is vertex-transitive), so their gap, against the spread (std) of the
   well-behaved participants' effects in step 2, is the noise of one LOO value (5 runs). The first-order ledger
   of that run is compared the same way.

Prints one row per seed and the distribution (median, worst) per variant; writes ``contribution_seeds.parquet``
(one row per seed) and ``contribution_seeds.png`` to ``--out``::

    python bench/contribution_seeds.py --seeds 0-9 --out runs/contribution-seeds      # ~30 min on 2 busy cores
    python bench/contribution_seeds.py --seeds 0 --rounds 20 --out /tmp/cs              # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("first-order", "curvature", "second-order")
SUFFIX = {"first-order": "", "curvature": "_curvature", "second-order": "_second_order"}
COPIES = ((0, 9), (5, 14))  # (original, copy): the copy trains on the original's data set


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def _config(seed: int, out: Path, rounds: int | None, **ledger):
    from dice_ray.config import build_config, load_config

    data = load_config(ROOT / "configs" / "contributions.yaml")
    data["seed"] = seed
    if rounds is not None:
        data["rounds"] = rounds
    data["ledger"] = {**data["ledger"], **ledger}
    data["output"] = {**data.get("output", {}), "out": str(out), "overwrite": True, "progress": False,
                      "checkpoint_every": 0}
    return build_config(data)


def _ledger_totals(experiment, out: Path) -> pd.DataFrame:
    """Run the experiment with its ledger on the local engine; return shares.parquet (totals per variant)."""
    from dice_ray.runner import simulate

    return pd.read_parquet(simulate(experiment.config, engine_kind="local", experiment=experiment) / "shares.parquet")


def _loo(experiment, participants: list[int] | None = None) -> np.ndarray:
    """Leave-one-out effects Σ_k q_k (L_k(full) − L_k(without j)) [N] (NaN outside ``participants``, default
    all): the full run and one per participant, here."""
    from dice_ray.methods.retraining import final_losses

    q = np.asarray(experiment.q, np.float64)
    full = final_losses(experiment, [])
    out = np.full(experiment.nodes, np.nan)
    for j in range(experiment.nodes) if participants is None else participants:
        out[j] = q @ (full - final_losses(experiment, [j]))
    return out


def _with_partition(experiment, train: list[np.ndarray]):
    from dice_ray.data import Partition

    return dataclasses.replace(experiment, partition=Partition(train, list(experiment.partition.val)))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(stats.spearmanr(a, b).statistic)


def measure_seed(seed: int, args: argparse.Namespace, bar) -> dict:
    """One seed's row (see the module docstring)."""
    from dice_ray.experiment import prepare

    out = Path(args.out) / f"s{seed}"
    row: dict = {"seed": seed}
    timings: dict[str, float] = {}

    def stage(name: str):
        bar.set_postfix_str(f"seed {seed}: {name}")
        timings[name] = time.perf_counter()

    stage("ledger (first-order, every 2)")
    base = prepare(_config(seed, out / "first", args.rounds, variants=["first-order"]))
    honest = ~np.isin(np.arange(base.nodes), base.misbehaving)
    first = _ledger_totals(base, out / "first")["total"].to_numpy()
    bar.update()
    stage(f"ledger (3 variants, every {args.every})")
    varied = prepare(_config(seed, out / "variants", args.rounds, variants=list(VARIANTS), every=args.every))
    shares = _ledger_totals(varied, out / "variants")
    totals = {v: shares["total" + SUFFIX[v]].to_numpy() for v in VARIANTS}
    bar.update()
    stage("leave-one-out")
    loo = _loo(base)
    bar.update()
    stage("leave-one-out, other minibatch order")
    permuted = [np.random.default_rng([seed, 7919, k]).permutation(part)
                for k, part in enumerate(base.partition.train)]
    loo2 = _loo(_with_partition(base, permuted))
    bar.update()
    stage("copies: leave-one-out and first-order ledger")
    train = list(base.partition.train)
    for a, c in COPIES:
        train[c] = train[a].copy()
    copied = _with_partition(prepare(_config(seed, out / "copies", args.rounds, variants=["first-order"])), train)
    loo_copies = _loo(copied, [j for pair in COPIES for j in pair])
    ledger_copies = _ledger_totals(copied, out / "copies")["total"].to_numpy()
    bar.update()

    row["spearman_first_order_every2"] = _spearman(first, loo)
    row["spearman_first_order_every2_honest"] = _spearman(first[honest], loo[honest])
    for v in VARIANTS:
        key = v.replace("-", "_")
        row[f"spearman_{key}"] = _spearman(totals[v], loo)
        row[f"spearman_{key}_honest"] = _spearman(totals[v][honest], loo[honest])
    for v in VARIANTS[1:]:  # how far the variant's totals are from the first-order ones, and its ranks
        key = v.replace("-", "_")
        row[f"{key}_vs_first_rel"] = float(np.abs(totals[v] - totals["first-order"]).max()
                                           / np.abs(totals["first-order"]).max())
        row[f"{key}_rank_changes"] = int((stats.rankdata(totals[v]) != stats.rankdata(totals["first-order"])).sum())
    row["loo_vs_loo2"] = _spearman(loo, loo2)
    row["loo_vs_loo2_honest"] = _spearman(loo[honest], loo2[honest])
    row["first_order_vs_loo2_honest"] = _spearman(first[honest], loo2[honest])
    spread = float(np.std(loo[honest]))
    row["loo_honest_std"] = spread
    row["loo_order_change_rel"] = float(np.median(np.abs(loo - loo2)[honest])) / spread  # per-participant change
    # a pair's gap against the spread of the well-behaved participants' effects (of the run without copies)
    row["copy_gap_rel"] = float(np.mean([abs(loo_copies[a] - loo_copies[c]) for a, c in COPIES])) / spread
    originals = honest & ~np.isin(np.arange(base.nodes), [c for _, c in COPIES])
    row["copy_gap_ledger_rel"] = float(np.mean([abs(ledger_copies[a] - ledger_copies[c]) for a, c in COPIES])) \
        / float(np.std(ledger_copies[originals]))
    row["flippers_flagged_min"] = int(min((totals[v][~honest] > 0).sum() for v in VARIANTS))  # of 3, worst variant
    row["honest_flagged_max"] = int(max((totals[v][honest] > 0).sum() for v in VARIANTS))
    row["seconds"] = time.perf_counter() - timings["ledger (first-order, every 2)"]
    return row


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Median and worst (lowest) over the seeds of every Spearman column."""
    columns = [c for c in table if c.startswith(("spearman", "loo_vs", "first_order_vs"))]
    return pd.DataFrame({"median": table[columns].median(), "worst": table[columns].min(),
                         "mean": table[columns].mean()})


def plot(table: pd.DataFrame, path: Path, every: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("first-order\n(every 2)", "spearman_first_order_every2"),
              (f"first-order\n(every {every})", "spearman_first_order"),
              (f"curvature\n(every {every})", "spearman_curvature"),
              (f"second-order\n(every {every})", "spearman_second_order"),
              ("LOO vs LOO′\n(ground truth)", "loo_vs_loo2")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True, sharey=True)
    for ax, suffix, title in ((axes[0], "", "all 16 participants"), (axes[1], "_honest", "13 well-behaved")):
        for i, (_, column) in enumerate(groups):
            values = table[column + suffix].to_numpy()
            ax.scatter(np.full(len(values), i) + np.linspace(-0.12, 0.12, len(values)), values, s=14)
            ax.hlines(np.median(values), i - 0.25, i + 0.25, color="black")
        ax.set_xticks(range(len(groups)), [g for g, _ in groups], fontsize=8)
        ax.set_title(f"Spearman with leave-one-out, {title}", fontsize=9)
        ax.axhline(0, color="grey", lw=0.5)
    axes[0].set_ylabel("Spearman (one dot per seed; bar: median)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-9", help="seeds, e.g. 0-9 or 0,3,5")
    parser.add_argument("--every", type=int, default=20, help="ledger.every of the three-variant ledger")
    parser.add_argument("--rounds", type=int, default=None, help="override the config's rounds (smoke runs)")
    parser.add_argument("--out", default="runs/contribution-seeds", help="folder for the runs and the table")
    args = parser.parse_args(argv)

    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)  # one core; two threads on a shared 2-core machine are much slower
    seeds = _seeds(args.seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tqdm(total=5 * len(seeds), unit="stage", file=sys.stderr, dynamic_ncols=True) as bar:
        for seed in seeds:
            rows.append(measure_seed(seed, args, bar))
            pd.DataFrame(rows).to_parquet(out / "contribution_seeds.parquet", index=False)  # kept as it grows
    table = pd.DataFrame(rows)
    plot(table, out / "contribution_seeds.png", args.every)
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        print()
        print(summary(table).to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out / 'contribution_seeds.parquet'} and {out / 'contribution_seeds.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
