"""What the faster ``engine.precision`` modes change in dice-ray's numbers, measured on the CPU.

``tf32``: on a GPU, TF32 tensor cores round the operands of matrix products and convolutions to 10-bit mantissas
(float32 has 23) and accumulate in float32. This script emulates that on the CPU: a ``TorchDispatchMode`` rounds the
dense float32 operands of every matrix product and convolution — forward, backward, and inside torch.func's ``vmap``,
``grad`` and ``jvp`` — either in the training run's local steps only (``tf32``: what dice-ray's mode does, TF32
switched on around each step) or in every computation of the run (``tf32-everywhere``: what a process-wide TF32
switch does, replays and derivatives included). NVIDIA does not document how each cuBLAS / cuDNN kernel rounds to
TF32, so two roundings bound it: to nearest (ties to even) and truncation. Sparse products (gossip) are left alone:
cuSPARSE has no TF32 mode. ``bf16``: dice-ray's own mode, the training run's local steps under the CPU's
``torch.autocast`` to bfloat16.

Each config runs on the local engine in fp32 and in each mode, and the tables are compared:
    (a) training, calibration: bench_gpu.py's (a'') configs (the MLP on 1x8x8 and the CNN on 3x32x32, N = 64,
        5 rounds, evaluated every round) with TF32 everywhere, as the H200 measured its tf32 mode
        (docs/results/scaling.md: 1.9e-5 MLP, 3.4e-3 CNN).
    (b) DICE: bench_gpu.py's (a') config (in-loop DICE-E, every variant, and DICE-GT; 16-node ring on digits, hops 3,
        probes of rounds 10 and 12), whole-minibatch and single-sample probes: DICE-GT's shift on its scale; how
        DICE-E's own error |GT − E| (median over probes) grows inside the mode's run; the alignment report.
    (c) proximal influence and the ledger, first-order and exact readouts: 16 participants on digits, exponential
        graph, two label-flippers, 20 rounds: the scores' shift on their scale and rank correlation, the anomaly
        report's ROC AUC, the ledger's totals and ranks.

Every run uses one torch thread (a dispatch mode holds in its own thread only). ~7 min on 2 cores.

    python bench/precision_on_cpu.py
    python bench/precision_on_cpu.py --parts dice --roundings nearest --json precision.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _compare import error_growth, on_scale
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


# A mode: (name, rounding): tf32 or tf32-everywhere with nearest or truncate, bf16 with None; None: fp32.
Mode = tuple[str, str | None]


def label(mode: Mode) -> str:
    return mode[0] + (f" ({mode[1]})" if mode[1] else "")


@contextlib.contextmanager
def steps_under(make: Callable[[], Any]) -> Any:
    """The training run's local steps (the populations ``ParticipantBlock`` builds: the engines', and a DICE-GT
    replay's factual window) run under ``make()``, as ``Population._step_precision`` runs dice-ray's modes; the
    methods' own populations (replays' counterfactual steps, derivatives) are untouched."""
    import dice_ray.core.participants as participants
    from dice_ray.core.population import Population

    class Stepped(Population):
        def _step_precision(self) -> Any:
            return make()

    participants.Population = Stepped
    try:
        yield
    finally:
        participants.Population = Population


def run_tables(config: dict[str, Any], mode: Mode | None, tables: tuple[str, ...],
               reports: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run ``config`` on the local engine in fp32 (``mode`` None) or ``mode``; return its ``tables`` and ``reports``
    (``alignment``, ``anomaly``) as DataFrames, and what an emulated TF32 rounded."""
    import dice_ray

    with tempfile.TemporaryDirectory(prefix="precision-on-cpu-") as tmp:
        config = {**config, "output": {**config.get("output", {}), "out": str(Path(tmp) / "run"), "progress": False,
                                       "checkpoint_every": 0}}
        tf32 = Tf32(mode[1]) if mode and mode[0].startswith("tf32") else None
        context: Any = contextlib.nullcontext()
        if mode is not None and mode[0] == "tf32-everywhere":  # as tf32 was before its scope: fp32's config
            context = tf32
        elif mode is not None:  # the run's own mode (DICE-GT then replays its factual side), its steps emulated
            config["engine"] = {**config.get("engine", {}), "precision": mode[0]}
            context = steps_under(lambda: tf32) if mode[0] == "tf32" else contextlib.nullcontext()
        start = time.perf_counter()
        with context:
            run = dice_ray.run(dice_ray.RunConfig(**config), engine="local")
        out: dict[str, Any] = {name: run.table(name) for name in tables}
        for name in reports:
            out[name] = getattr(run, name)()
        out["wall_s"] = time.perf_counter() - start
        out["rounded"] = dict(tf32.rounded) if tf32 else {}
        out["left_alone"] = dict(tf32.seen) if tf32 else {}
        return out


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
            mode = ("tf32-everywhere", rounding)
            moved = run_tables(config, mode, ("rounds",))
            diff = compare(table, moved["rounds"].sort_values(["round", "node"]).reset_index(drop=True))
            rows.append({"model": model, "nodes": 64, "mode": label(mode), "max": diff["max"],
                         "by_round": diff["by_round"], "rounded_ops": moved["rounded"],
                         "wall_s": [fp32["wall_s"], moved["wall_s"]]})
            print(f"(a) {model} N=64, 5 rounds, {label(mode)} vs fp32: largest |difference| of the rounds table "
                  f"{diff['max']:.1e}; train loss by round " + " ".join(f"{v:.0e}" for v in diff["by_round"])
                  + f"; rounded {sum(moved['rounded'].values())} products ({fp32['wall_s']:.0f} s, "
                  f"{moved['wall_s']:.0f} s)", flush=True)
    return rows


# -- (b) DICE ----------------------------------------------------------------------------------------------------

DICE_CONFIG = {"nodes": 16, "rounds": 16, "seed": 0, "topology": {"name": "ring"}, "data": {"dataset": "digits"},
               "optim": {"lr": 0.05, "batch_size": 16},
               "influence": {"enabled": True, "online": True, "hops": 3, "rounds": [10, 12],
                             "variants": "first-order,curvature,second-order,exact-readout"}}
VARIANTS = ("first_order", "curvature", "second_order", "exact_readout")


def dice(modes: list[Mode]) -> list[dict[str, Any]]:
    rows = []
    for samples in (0, 1):  # the whole minibatch, one sample
        config = {**DICE_CONFIG, "influence": {**DICE_CONFIG["influence"], "probe_samples": samples}}
        probes = "whole-minibatch probes" if samples == 0 else "single-sample probes"
        fp32 = run_tables(config, None, ("dice",), ("alignment",))
        base = fp32["dice"].sort_values(["probe_id", "hops"]).reset_index(drop=True)
        for mode in modes:
            moved_run = run_tables(config, mode, ("dice",), ("alignment",))
            moved = moved_run["dice"].sort_values(["probe_id", "hops"]).reset_index(drop=True)
            row: dict[str, Any] = {"mode": label(mode), "probes": probes, "rows": len(base), "gt_on_scale": {},
                                   "own_error_ratio": {}, "rounded_ops": moved_run["rounded"],
                                   "wall_s": [fp32["wall_s"], moved_run["wall_s"]]}
            for suffix in ("", "_hop", "_horizon"):
                row["gt_on_scale"][f"gt{suffix}"] = on_scale(base[f"gt{suffix}"].to_numpy(np.float64),
                                                             moved[f"gt{suffix}"].to_numpy(np.float64))
                for variant in VARIANTS:  # how DICE-E's own error grows inside the mode's run
                    growth = error_growth(base, moved, f"est_{variant}{suffix}", f"gt{suffix}")
                    if not math.isnan(growth):
                        row["own_error_ratio"][f"est_{variant}{suffix}"] = growth
            joined = fp32["alignment"].merge(moved_run["alignment"], on=["hops", "quantity", "variant"],
                                             suffixes=("", "_mode"))
            change = (joined["spearman"] - joined["spearman_mode"]).abs()
            at = joined.loc[change.idxmax()]
            row["spearman_largest_change"] = {"variant": at["variant"], "quantity": at["quantity"],
                                              "hops": int(at["hops"]), "fp32": float(at["spearman"]),
                                              "mode": float(at["spearman_mode"])}
            cumulative = change[joined["quantity"] == "cumulative"]
            row["spearman_cumulative_largest_change"] = float(cumulative.max())
            rows.append(row)
            ratios, gt_moved = row["own_error_ratio"], row["gt_on_scale"]
            print(f"(b) DICE, {probes}, {label(mode)} vs fp32: DICE-GT's shift on its scale {gt_moved['gt']:.1e} "
                  f"(hop {gt_moved['gt_hop']:.1e}, horizon {gt_moved['gt_horizon']:.1e}); "
                  "median |GT − E| in the mode's run / in fp32: " + ", ".join(
                      f"{v} {ratios[f'est_{v}']:.2f}x, hop {ratios[f'est_{v}_hop']:.2f}x" for v in VARIANTS)
                  + f"; alignment (Spearman): largest change {at['variant']} {at['quantity']} r={int(at['hops'])} "
                  f"{at['spearman']:.3f} -> {at['spearman_mode']:.3f}, DICE^(r) within "
                  f"{row['spearman_cumulative_largest_change']:.3f} ({fp32['wall_s']:.0f} s, "
                  f"{moved_run['wall_s']:.0f} s)", flush=True)
    return rows


# -- (c) proximal influence and the ledger -----------------------------------------------------------------------

PROXIMAL_CONFIG = {"nodes": 16, "rounds": 20, "seed": 0, "topology": {"name": "exponential"},
                   "data": {"dataset": "digits"}, "optim": {"lr": 0.05, "batch_size": 16},
                   "misbehavior": {"kind": "label-flip", "count": 2}, "proximal": {"enabled": True},
                   "ledger": {"enabled": True}}
EXACT_CONFIG = {**PROXIMAL_CONFIG, "proximal": {"enabled": True, "readout": "exact"},
                "ledger": {"enabled": True, "variants": ["exact-readout"]}}


def proximal_and_ledger(modes: list[Mode]) -> list[dict[str, Any]]:
    rows = []
    key = ["round", "examiner", "neighbor"]
    for readout, config, total in (("first-order", PROXIMAL_CONFIG, "total"),
                                   ("exact", EXACT_CONFIG, "total_exact_readout")):
        fp32 = run_tables(config, None, ("proximal", "shares"), ("anomaly",))
        base = fp32["proximal"].sort_values(key).reset_index(drop=True)
        shares = fp32["shares"].sort_values("participant").reset_index(drop=True)
        for mode in modes:
            moved_run = run_tables(config, mode, ("proximal", "shares"), ("anomaly",))
            moved = moved_run["proximal"].sort_values(key).reset_index(drop=True)
            moved_shares = moved_run["shares"].sort_values("participant").reset_index(drop=True)
            auc = fp32["anomaly"].merge(moved_run["anomaly"], on=["horizon", "method"], suffixes=("", "_mode"))
            auc = auc[auc["method"].str.startswith("proximal")]
            x, y = base["score"].to_numpy(np.float64), moved["score"].to_numpy(np.float64)
            t, u = shares[total].to_numpy(np.float64), moved_shares[total].to_numpy(np.float64)
            row = {"readout": readout, "mode": label(mode), "scores": len(base), "score_on_scale": on_scale(x, y),
                   "score_spearman": spearman(x, y),
                   "auc_change": float(np.nanmax(np.abs(auc["auc"] - auc["auc_mode"]))),
                   "ledger_total_on_scale": on_scale(t, u), "ledger_spearman": spearman(t, u),
                   "ledger_rank_changes": int((shares["rank"].to_numpy() != moved_shares["rank"].to_numpy()).sum()),
                   "rounded_ops": moved_run["rounded"], "wall_s": [fp32["wall_s"], moved_run["wall_s"]]}
            rows.append(row)
            print(f"(c) proximal influence and the ledger, {readout} readouts, {label(mode)} vs fp32: scores' shift "
                  f"on their scale {row['score_on_scale']:.1e} (Spearman {row['score_spearman']:.5f}); ROC AUC's "
                  f"largest change {row['auc_change']:.1e}; ledger totals {row['ledger_total_on_scale']:.1e} on "
                  f"their scale (Spearman {row['ledger_spearman']:.5f}, {row['ledger_rank_changes']} of {len(t)} "
                  f"ranks moved) ({fp32['wall_s']:.0f} s, {moved_run['wall_s']:.0f} s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("training", "dice", "proximal"),
                        default=["training", "dice", "proximal"])
    parser.add_argument("--roundings", nargs="+", choices=ROUNDINGS, default=list(ROUNDINGS),
                        help="TF32's roundings to emulate")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    torch.set_num_threads(1)
    self_check()
    print(f"precision modes on the CPU (torch {torch.__version__}, 1 thread); TF32 emulated, rounded "
          f"{' and '.join(args.roundings)}; bf16 by the CPU's autocast", flush=True)
    scoped = [("tf32", r) for r in args.roundings]
    parts = {"training": lambda: training(args.roundings),
             "dice": lambda: dice(scoped + [("tf32-everywhere", r) for r in args.roundings] + [("bf16", None)]),
             "proximal": lambda: proximal_and_ledger(scoped + [("bf16", None)])}
    results: dict[str, Any] = {"torch": torch.__version__, "roundings": args.roundings}
    for part in args.parts:
        results[part] = parts[part]()
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
