"""What ``engine.precision`` tf32 would change in dice-ray's numbers, emulated on the CPU.

On a GPU, TF32 tensor cores round the inputs of matrix products and convolutions to 10-bit mantissas (float32 has
23) and accumulate in float32. This script emulates that on the CPU: a ``TorchDispatchMode`` rounds the dense float32
inputs of every matrix product and convolution — forward, backward, and inside torch.func's ``vmap``, ``grad`` and
``jvp``, where DICE-E's derivatives are taken — and runs each config twice on the local engine, in fp32 and
emulated TF32, then compares the tables. NVIDIA does not document how each cuBLAS / cuDNN kernel rounds to TF32, so
two roundings bound it: to nearest (ties to even) and truncation (the larger, biased error). Sparse products
(gossip) are left alone: cuSPARSE has no TF32 mode.

    (a) training, calibration: bench_gpu.py's (a'') configs (the MLP on 1x8x8 and the CNN on 3x32x32, N = 64,
        5 rounds, evaluated every round): the largest difference of the rounds table, to set beside what the H200
        measured for tf32 (docs/results/scaling.md: 1.9e-5 MLP, 3.4e-3 CNN).
    (b) DICE: bench_gpu.py's (a') config (in-loop DICE-E, every variant, and DICE-GT; 16-node ring on digits, hops 3,
        probes of rounds 10 and 12): each column's shift on its scale; each estimate's shift against the method's
        own error |GT − E| in fp32 (median over probes and hops); the alignment report's Pearson and Spearman.
    (c) proximal influence and the ledger: 16 participants on digits, exponential graph, two label-flippers,
        20 rounds: the score's shift on its scale and its rank correlation, the anomaly report's ROC AUC, the
        ledger's totals (shift on scale, Spearman) and whether its ranking changes.

Every run uses one torch thread (a dispatch mode holds in its own thread only; on one thread the local step's
passes run in turn). A run under emulation takes a few times its fp32 time.

    python bench/tf32_on_cpu.py                 # everything, ~10 min on 2 cores
    python bench/tf32_on_cpu.py --parts dice --json tf32.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
ROUNDINGS = ("nearest", "truncate")
LOW_BITS = 13  # float32's 23 mantissa bits less TF32's 10


def to_tf32(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """``x`` with its float32 mantissas cut to TF32's 10 bits (``rounding``: nearest, ties to even, or truncate);
    anything else as it is."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.layout != torch.strided:
        return x
    bits = x.view(torch.int32)
    if rounding == "nearest":
        bits = bits + ((1 << (LOW_BITS - 1)) - 1 + ((bits >> LOW_BITS) & 1))
    return (bits & ~((1 << LOW_BITS) - 1)).view(torch.float32)


# The operators TF32 applies to, and which of their arguments are the multiplied operands (a bias or an accumulated
# ``self`` is added in float32).
OPERANDS = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2), aten.bmm.default: (0, 1),
            aten.baddbmm.default: (1, 2), aten.convolution.default: (0, 1),
            aten.convolution_backward.default: (0, 1, 2)}


class Tf32(TorchDispatchMode):
    """Rounds the operands of matrix products and convolutions to TF32 (``rounding``); counts what it rounded."""

    def __init__(self, rounding: str) -> None:
        super().__init__()
        self.rounding = rounding
        self.rounded: Counter[str] = Counter()
        self.seen: Counter[str] = Counter()  # matrix-like operators it left alone (sparse operands, mv, dot)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        where = OPERANDS.get(func)
        if where is not None and all(args[i].layout == torch.strided for i in where):
            args = tuple(to_tf32(a, self.rounding) if i in where else a for i, a in enumerate(args))
            self.rounded[str(func.overloadpacket)] += 1
        elif where is not None or func.overloadpacket in (aten.mv, aten.addmv, aten.dot, aten.vdot):
            self.seen[str(func.overloadpacket)] += 1
        return func(*args, **kwargs)


def self_check() -> None:
    """The mode rounds what it should: a linear layer's forward and its weight gradient equal the products of
    hand-rounded operands; an elementwise product is untouched."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 16, generator=gen), torch.randn(4, 16, generator=gen, requires_grad=True)
    with Tf32("nearest") as mode:
        out = torch.nn.functional.linear(x, w)
        out.sum().backward()
        plain = x * 2
    assert torch.equal(out, to_tf32(x, "nearest") @ to_tf32(w.detach(), "nearest").T), "forward not rounded"
    assert torch.equal(w.grad, to_tf32(torch.ones(8, 4), "nearest").T @ to_tf32(x, "nearest")), "backward not rounded"
    assert torch.equal(plain, x * 2) and mode.rounded, "the mode rounded an elementwise product, or nothing"
    assert to_tf32(torch.tensor([1 + 2.0 ** -11]), "nearest").item() == 1.0  # a tie: to even
    assert to_tf32(torch.tensor([1 + 3 * 2.0 ** -11]), "nearest").item() == 1 + 2.0 ** -9
    assert to_tf32(torch.tensor([-(1 + 3 * 2.0 ** -11)]), "truncate").item() == -(1 + 2.0 ** -10)


def run_tables(config: dict[str, Any], rounding: str | None, tables: tuple[str, ...],
               reports: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run ``config`` on the local engine, in fp32 (``rounding`` None) or emulated TF32; return its ``tables`` and
    ``reports`` (``alignment``, ``anomaly``) as DataFrames, and what the mode rounded."""
    import dice_ray

    with tempfile.TemporaryDirectory(prefix="tf32-on-cpu-") as tmp:
        config = {**config, "output": {**config.get("output", {}), "out": str(Path(tmp) / "run"), "progress": False,
                                       "checkpoint_every": 0}}
        mode = Tf32(rounding) if rounding else None
        start = time.perf_counter()
        if mode is None:
            run = dice_ray.run(dice_ray.RunConfig(**config), engine="local")
        else:
            with mode:
                run = dice_ray.run(dice_ray.RunConfig(**config), engine="local")
        out: dict[str, Any] = {name: run.table(name) for name in tables}
        for name in reports:
            out[name] = getattr(run, name)()
        out["wall_s"] = time.perf_counter() - start
        out["rounded"] = dict(mode.rounded) if mode else {}
        out["left_alone"] = dict(mode.seen) if mode else {}
        return out


def on_scale(x: np.ndarray, y: np.ndarray) -> float:
    """max |x − y| / max |x| (inf where NaN is on one side only; NaN where both are all NaN)."""
    if not np.array_equal(np.isnan(x), np.isnan(y)):
        return math.inf
    both = ~np.isnan(x)
    if not both.any():
        return math.nan
    return float(np.max(np.abs(x[both] - y[both])) / (np.max(np.abs(x[both])) or 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    keep = ~(np.isnan(x) | np.isnan(y))
    return float(spearmanr(x[keep], y[keep]).statistic) if keep.sum() > 2 else math.nan


# -- (a) training ------------------------------------------------------------------------------------------------


def training(roundings: list[str]) -> list[dict[str, Any]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_gpu import compare, run_config, synthetic_shape_configurable

    rows = []
    for model in ("mlp", "cnn"):
        config = run_config(model, 64, 5, 0.0, "unused", synthetic_shape_configurable(), 1)
        config["model"]["conv"] = "native"  # one form on both sides (auto is native on a CPU)
        fp32 = run_tables(config, None, ("rounds",))
        table = fp32["rounds"].sort_values(["round", "node"]).reset_index(drop=True)
        for rounding in roundings:
            tf32 = run_tables(config, rounding, ("rounds",))
            diff = compare(table, tf32["rounds"].sort_values(["round", "node"]).reset_index(drop=True))
            rows.append({"model": model, "nodes": 64, "rounding": rounding, "max": diff["max"],
                         "by_round": diff["by_round"], "rounded_ops": tf32["rounded"],
                         "wall_s": [fp32["wall_s"], tf32["wall_s"]]})
            print(f"(a) {model} N=64, 5 rounds, TF32 ({rounding}) vs fp32: largest |difference| of the rounds table "
                  f"{diff['max']:.1e}; train loss by round " + " ".join(f"{v:.0e}" for v in diff["by_round"])
                  + f"; rounded {sum(tf32['rounded'].values())} products ({fp32['wall_s']:.0f} s, "
                  f"{tf32['wall_s']:.0f} s)", flush=True)
    return rows


# -- (b) DICE ----------------------------------------------------------------------------------------------------

DICE_CONFIG = {"nodes": 16, "rounds": 16, "seed": 0, "topology": {"name": "ring"}, "data": {"dataset": "digits"},
               "optim": {"lr": 0.05, "batch_size": 16},
               "influence": {"enabled": True, "online": True, "hops": 3, "rounds": [10, 12],
                             "variants": "first-order,curvature,second-order,exact-readout"}}
VARIANTS = ("first_order", "curvature", "second_order", "exact_readout")


def dice(roundings: list[str]) -> list[dict[str, Any]]:
    fp32 = run_tables(DICE_CONFIG, None, ("dice",), ("alignment",))
    base = fp32["dice"].sort_values(["probe_id", "hops"]).reset_index(drop=True)
    rows = []
    for rounding in roundings:
        tf32 = run_tables(DICE_CONFIG, rounding, ("dice",), ("alignment",))
        moved = tf32["dice"].sort_values(["probe_id", "hops"]).reset_index(drop=True)
        row: dict[str, Any] = {"rounding": rounding, "probes": int(base["probe_id"].nunique()), "rows": len(base),
                               "on_scale": {}, "vs_own_error": {}, "own_error_ratio": {}, "alignment": {},
                               "rounded_ops": tf32["rounded"], "wall_s": [fp32["wall_s"], tf32["wall_s"]]}
        for column in base.columns:
            if column.startswith(("gt", "est")) and np.issubdtype(base[column].dtype, np.floating):
                value = on_scale(base[column].to_numpy(np.float64), moved[column].to_numpy(np.float64))
                if not math.isnan(value):
                    row["on_scale"][column] = value
        for variant in VARIANTS:  # the shift of each estimate against how far the estimate is from GT in fp32
            for suffix in ("", "_hop", "_horizon"):
                est, gt = f"est_{variant}{suffix}", f"gt{suffix}"
                shift = np.abs(moved[est].to_numpy(np.float64) - base[est].to_numpy(np.float64))
                error = np.abs(base[gt].to_numpy(np.float64) - base[est].to_numpy(np.float64))
                if np.isnan(error).all():
                    continue
                row["vs_own_error"][est] = float(np.nanmedian(shift) / np.nanmedian(error))
                error_tf32 = np.abs(moved[gt].to_numpy(np.float64) - moved[est].to_numpy(np.float64))
                row["own_error_ratio"][est] = float(np.nanmedian(error_tf32) / np.nanmedian(error))
        gt_shift = np.abs(moved["gt"].to_numpy(np.float64) - base["gt"].to_numpy(np.float64))
        row["gt_shift_vs_curvature_error"] = float(np.nanmedian(gt_shift) / np.nanmedian(
            np.abs(base["gt"].to_numpy(np.float64) - base["est_curvature"].to_numpy(np.float64))))
        a, b = fp32["alignment"], tf32["alignment"]
        key = ["hops", "quantity", "variant"]
        joined = a.merge(b, on=key, suffixes=("", "_tf32"))
        for stat in ("pearson", "spearman"):
            change = (joined[stat] - joined[f"{stat}_tf32"]).abs()
            row["alignment"][stat] = float(change.max())
            at = joined.loc[change.idxmax()]
            row["alignment"][f"{stat}_where"] = (f"{at['variant']} {at['quantity']} r={at['hops']}: "
                                                 f"{at[stat]:.3f} -> {at[f'{stat}_tf32']:.3f}")
        cumulative = joined[joined["quantity"] == "cumulative"]
        row["spearman_cumulative"] = {f"{v} r={h}": [float(s), float(t)] for v, h, s, t in cumulative[
            ["variant", "hops", "spearman", "spearman_tf32"]].itertuples(index=False)}
        rows.append(row)
        worst = max(row["on_scale"].values())
        print(f"(b) DICE, 16-node ring, digits, {row['rows']} rows, TF32 ({rounding}) vs fp32: largest shift on a "
              f"column's scale {worst:.1e} (" + ", ".join(f"{k} {v:.1e}" for k, v in row["on_scale"].items())
              + "); median shift / median |GT − E| in fp32: "
              + ", ".join(f"{k} {v:.2g}" for k, v in row["vs_own_error"].items())
              + "; median |GT − E| in TF32 / in fp32: "
              + ", ".join(f"{k} {v:.2g}" for k, v in row["own_error_ratio"].items())
              + "; Spearman of DICE^(r), fp32 -> TF32: "
              + ", ".join(f"{k} {s:.3f} -> {t:.3f}" for k, (s, t) in row["spearman_cumulative"].items())
              + f"; GT's median shift / median |GT − E_curvature| {row['gt_shift_vs_curvature_error']:.2g}; "
              f"alignment's largest change: Pearson {row['alignment']['pearson_where']}, Spearman "
              f"{row['alignment']['spearman_where']} ({fp32['wall_s']:.0f} s, {tf32['wall_s']:.0f} s)", flush=True)
    return rows


# -- (c) proximal influence and the ledger -----------------------------------------------------------------------

PROXIMAL_CONFIG = {"nodes": 16, "rounds": 20, "seed": 0, "topology": {"name": "exponential"},
                   "data": {"dataset": "digits"}, "optim": {"lr": 0.05, "batch_size": 16},
                   "misbehavior": {"kind": "label-flip", "count": 2}, "proximal": {"enabled": True},
                   "ledger": {"enabled": True}}


EXACT_CONFIG = {**PROXIMAL_CONFIG, "proximal": {"enabled": True, "readout": "exact"},
                "ledger": {"enabled": True, "variants": ["exact-readout"]}}


def proximal_and_ledger(roundings: list[str]) -> list[dict[str, Any]]:
    rows = []
    for readout, config, total in (("first-order", PROXIMAL_CONFIG, "total"),
                                   ("exact", EXACT_CONFIG, "total_exact_readout")):
        rows += proximal_and_ledger_of(readout, config, total, roundings)
    return rows


def proximal_and_ledger_of(readout: str, config: dict[str, Any], total: str,
                           roundings: list[str]) -> list[dict[str, Any]]:
    fp32 = run_tables(config, None, ("proximal", "shares"), ("anomaly",))
    key = ["round", "examiner", "neighbor"]
    base = fp32["proximal"].sort_values(key).reset_index(drop=True)
    shares = fp32["shares"].sort_values("participant").reset_index(drop=True)
    rows = []
    for rounding in roundings:
        tf32 = run_tables(config, rounding, ("proximal", "shares"), ("anomaly",))
        moved = tf32["proximal"].sort_values(key).reset_index(drop=True)
        moved_shares = tf32["shares"].sort_values("participant").reset_index(drop=True)
        auc = fp32["anomaly"].merge(tf32["anomaly"], on=["horizon", "method"], suffixes=("", "_tf32"))
        auc = auc[auc["method"].str.startswith("proximal")]
        x, y = base["score"].to_numpy(np.float64), moved["score"].to_numpy(np.float64)
        t, u = shares[total].to_numpy(np.float64), moved_shares[total].to_numpy(np.float64)
        row = {"readout": readout, "rounding": rounding, "scores": len(base), "score_on_scale": on_scale(x, y),
               "score_spearman": spearman(x, y),
               "cumulative_on_scale": on_scale(base["cumulative_score"].to_numpy(np.float64),
                                               moved["cumulative_score"].to_numpy(np.float64)),
               "auc_change": float(np.nanmax(np.abs(auc["auc"] - auc["auc_tf32"]))),
               "ledger_total_on_scale": on_scale(t, u), "ledger_spearman": spearman(t, u),
               "ledger_rank_changes": int((shares["rank"].to_numpy() != moved_shares["rank"].to_numpy()).sum()),
               "rounded_ops": tf32["rounded"], "wall_s": [fp32["wall_s"], tf32["wall_s"]]}
        rows.append(row)
        print(f"(c) proximal influence and the ledger, readouts {readout}, 16 participants, 2 label-flippers, TF32 "
              f"({rounding}) vs fp32: "
              f"score shift on its scale {row['score_on_scale']:.1e} (Spearman {row['score_spearman']:.6f}), "
              f"cumulative {row['cumulative_on_scale']:.1e}; ROC AUC's largest change {row['auc_change']:.1e}; "
              f"ledger totals {row['ledger_total_on_scale']:.1e} on their scale (Spearman "
              f"{row['ledger_spearman']:.6f}, {row['ledger_rank_changes']} of {len(t)} ranks moved) "
              f"({fp32['wall_s']:.0f} s, {tf32['wall_s']:.0f} s)", flush=True)
    return rows


PARTS = {"training": training, "dice": dice, "proximal": proximal_and_ledger}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--roundings", nargs="+", choices=ROUNDINGS, default=list(ROUNDINGS))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    torch.set_num_threads(1)
    self_check()
    print(f"TF32 emulated on the CPU (torch {torch.__version__}, 1 thread); roundings: {', '.join(args.roundings)}",
          flush=True)
    results: dict[str, Any] = {"torch": torch.__version__, "roundings": args.roundings}
    for part in args.parts:
        results[part] = PARTS[part](args.roundings)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
