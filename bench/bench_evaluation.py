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
                   maximum of the windows' strided views, no indices, no copy into the channels-last layout), sized
                   without the outputs of layers that are views of their input (``population.VIEWS``: Flatten);
    views-counted  the same, with passes sized as until 2026-12-07, counting a Flatten's output as an activation
                   of its own (with ``--model mnist-mlp``, the default run's 784-input MLP, the held-out passes held
                   2 participants instead of 16).

Also printed: whether both give every participant the same numbers, bit for bit (they must), and a training round's
time for scale.

Run::

    python bench/bench_evaluation.py                          # the CNN at N = 256, 5 repeats (~4 min on 2 cores)
    python bench/bench_evaluation.py --model mlp --nodes 1024 16384
    python bench/bench_evaluation.py --model mnist-mlp --nodes 16 256   # the default run's model (mnist5k)
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

VARIANTS = ("chunks-of-64", "auto.indices", "views-counted", "auto")


def views_counted_rows(block: Any) -> tuple[int, int]:
    """Participants per pass of the validation and held-out evaluations as sized until 2026-12-07 (a Flatten's
    output counted as an activation): measured with ``population.VIEWS`` emptied, the sizes cached anew after."""
    pop, views = block.population, population_module.VIEWS
    population_module.VIEWS = ()
    population_module._MEASURED_BYTES.pop(pop.model, None)
    try:
        rows = [pop.evaluation_passes(block.x_val[:1, 0], block.x_val.shape[1], least=population_module.MIN_PASS_ROWS),
                pop.evaluation_passes(block.x_heldout[:1], block.x_heldout.shape[0])]
    finally:
        population_module.VIEWS = views
        population_module._MEASURED_BYTES.pop(pop.model, None)
    return tuple(r[0].stop - r[0].start if r else 1 for r in rows)


def evaluate(block: Any, variant: str, old_rows: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """``ParticipantBlock.evaluate``'s two measurements, as ``variant`` computes them."""
    pop, earlier = block.population, variant == "chunks-of-64"
    threads, pop.step_threads = pop.step_threads, (1 if earlier else pop.step_threads)
    chunk = 64 if earlier else None
    values_only = population_module.values_only
    if variant != "auto":  # the poolings as a step's forward pass computes them
        population_module.values_only = contextlib.nullcontext
    val_chunk = heldout_chunk = chunk
    if variant == "views-counted":
        val_chunk, heldout_chunk = old_rows
    try:
        val = pop.evaluate(block.x_val, block.y_val, sample_weights=block.val_mask, chunk=val_chunk)
        heldout = pop.evaluate(block.x_heldout, block.y_heldout, shared_input=True, chunk=heldout_chunk)
    finally:
        pop.step_threads, population_module.values_only = threads, values_only
    return [*val, *heldout]


def default_engine(nodes: int, heldout: int) -> Any:
    """The default run's engine (mnist5k, its 784-input MLP) at ``nodes`` participants."""
    import dice_ray
    from dice_ray.engine.local import LocalEngine
    from dice_ray.experiment import prepare
    from dice_ray.hooks import round_hooks
    from dice_ray.methods.catalog import methods_for

    config = dice_ray.RunConfig(nodes=nodes, data={"heldout_size": heldout}, output={"progress": False})
    return LocalEngine(prepare(config), round_hooks(methods_for(config)))


def measure(model: str, nodes: int, repeats: int, heldout: int) -> dict[str, Any]:
    engine = default_engine(nodes, heldout) if model == "mnist-mlp" else engine_for(
        nodes, "auto", "auto", True, model=model, heldout=heldout)
    for t in range(2):
        engine.run_round(t, evaluate=False)
    start = time.perf_counter()
    engine.run_round(2, evaluate=False)
    round_s = time.perf_counter() - start
    block = engine.block
    old_rows = views_counted_rows(block)
    groups = block.population.evaluation_passes(block.x_heldout[:1], block.x_heldout.shape[0])
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    results = {}
    for r in range(repeats + 1):  # the first repeat warms up (and measures the model's largest layer output)
        for name in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            start = time.perf_counter()
            results[name] = evaluate(block, name, old_rows)
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
    parser.add_argument("--model", choices=(*SHAPES, "mnist-mlp"), default="cnn")
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
