"""Seconds per evaluation of every participant on the CPU: ``Population.evaluate``'s passes against the earlier ones.

Workload: ``bench_peers.py``'s dice-ray side (the registered "cnn" on 1x28x28 inputs, or with ``--model mlp`` its MLP on
synthetic 1x8x8 data; batch 16, SGD, exponential graph), two rounds trained, then what a run's evaluation computes
(``ParticipantBlock.evaluate``): each participant's loss and accuracy on its validation split (none in the CNN's mnist5k
config) and on the shared held-out batch z′ (``--heldout`` images: 500, a run's default). Three variants, timed
round-robin in one process (the order reversed every repeat), each repeat's time divided by the other variants' times of
the same repeat:

    chunks-of-64   what every run did before 2026-12-05: groups of 64 participants, all samples in one forward pass,
                   one group after another on all threads;
    auto.indices   groups of as many participants as keep a pass's largest layer output within ``EVAL_PASS_BYTES``
                   (``Population.evaluation_passes``; at least one, all its samples at once), side by side on threads,
                   one thread each, where the model's step runs so (``evaluation_workers``); max poolings as a local
                   step's forward pass computes them on a CPU (``model.pool`` gather: each window's maximum's index,
                   then a gather): what ``evaluate`` did until later on 2026-12-05;
    auto           ``evaluate`` today: the same passes, the poolings' values alone (``pooling.values_only``: the
                   maximum of the windows' strided views, no indices, no copy into the channels-last layout).

Also printed: whether both give every participant the same numbers, bit for bit (they must), and a training round's
time for scale.

Run::

    python bench/bench_evaluation.py                          # the CNN at N = 256, 5 repeats (~4 min on 2 cores)
    python bench/bench_evaluation.py --model mlp --nodes 1024 16384
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _tables import print_markdown
from bench_cnn_modes import cpu_banner, engine_for
from bench_peers import SHAPES

from dice_ray.core import population as population_module

VARIANTS = ("chunks-of-64", "auto.indices", "auto")


def evaluate(block: Any, variant: str) -> list[torch.Tensor]:
    """``ParticipantBlock.evaluate``'s two measurements, as ``variant`` computes them."""
    pop, earlier = block.population, variant == "chunks-of-64"
    threads, pop.step_threads = pop.step_threads, (1 if earlier else pop.step_threads)
    chunk = 64 if earlier else None
    values_only = population_module.values_only
    if variant != "auto":  # the poolings as a step's forward pass computes them
        population_module.values_only = contextlib.nullcontext
    try:
        val = pop.evaluate(block.x_val, block.y_val, sample_weights=block.val_mask, chunk=chunk)
        heldout = pop.evaluate(block.x_heldout, block.y_heldout, shared_input=True, chunk=chunk)
    finally:
        pop.step_threads, population_module.values_only = threads, values_only
    return [*val, *heldout]


def measure(model: str, nodes: int, repeats: int, heldout: int) -> dict[str, Any]:
    engine = engine_for(nodes, "auto", "auto", True, model=model, heldout=heldout)
    for t in range(2):
        engine.run_round(t, evaluate=False)
    start = time.perf_counter()
    engine.run_round(2, evaluate=False)
    round_s = time.perf_counter() - start
    block = engine.block
    groups = block.population.evaluation_passes(block.x_heldout[:1], block.x_heldout.shape[0])
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    results = {}
    for r in range(repeats + 1):  # the first repeat warms up (and measures the model's largest layer output)
        for name in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            start = time.perf_counter()
            results[name] = evaluate(block, name)
            if r:
                seconds[name].append(time.perf_counter() - start)
    same = all(torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0))
               for name in VARIANTS[:-1] for a, b in zip(results["auto"], results[name], strict=True))
    vs = {}
    for name in VARIANTS[:-1]:
        ratios = [a / b for a, b in zip(seconds["auto"], seconds[name], strict=True)]
        vs[name] = [statistics.median(ratios), min(ratios), max(ratios)]
    return {"model": model, "nodes": nodes, "heldout": int(block.x_heldout.shape[0]), "round_s": round_s,
            "heldout_passes": len(groups), "workers": block.population.evaluation_workers(),
            "seconds": {name: [statistics.median(s), min(s), max(s)] for name, s in seconds.items()},
            "vs": vs, "same_numbers_bitwise": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(SHAPES), default="cnn")
    parser.add_argument("--nodes", type=int, nargs="+", default=[256])
    parser.add_argument("--repeats", type=int, default=5, help="timed evaluations per variant")
    parser.add_argument("--heldout", type=int, default=500, help="z′ images (data.heldout_size; a run's default)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cpu_banner()
    results, rows = [], []
    for nodes in args.nodes:
        res = measure(args.model, nodes, args.repeats, args.heldout)
        results.append(res)
        spans = [*(res["seconds"][name] for name in VARIANTS), *(res["vs"][name] for name in VARIANTS[:-1])]
        rows.append([args.model, str(nodes), f"{res['round_s']:.3f}", f"{res['heldout_passes']}, {res['workers']}",
                     *(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in spans),
                     "bit for bit" if res["same_numbers_bitwise"] else "DIFFERENT"])
        print(f"N = {nodes} measured", flush=True)
    print_markdown(["model", "N", "training round s", "held-out passes, threads", *(f"{name} s" for name in VARIANTS),
                    *(f"auto × {name} (median, range)" for name in VARIANTS[:-1]), "same numbers"], rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
