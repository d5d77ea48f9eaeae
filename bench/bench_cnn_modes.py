"""Seconds per CNN round on the CPU: the layer modes ``auto`` picks there against PyTorch's own, in one process.

Workload: ``bench_peers.py``'s dice-ray side (the registered "cnn" on 1x28x28 inputs — mnist5k where every participant
gets a batch, else ``bench-random-1x28x28``; with ``--model mlp`` its MLP on synthetic 1x8x8 data — batch 16, SGD lr
0.05, exponential graph, uniform weights, no evaluation inside timed rounds), as ``LocalEngine`` rounds (the local step,
then gossip) in this one process, torch threads = all cores, one engine per variant:

    baseline        ``model.conv`` native, ``model.pool`` native, step chunks sized by the gradients alone, passes
                    one after another on all threads (what every CPU run did before 2026-12-05);
    chunks          step chunks sized by gradients and the activations kept for the backward pass;
    gather          the gather max pooling (``model.pool`` gather: PyTorch's numbers, bit for bit), gradient chunks;
    auto.in-turn    native convolutions, gather pooling, activation chunks, passes one after another (what ``auto``
                    ran on a CPU from 2026-12-05 until passes ran side by side);
    auto            what ``auto`` runs on a CPU today: the same, with the passes side by side, one per thread, each
                    on one thread, where a participant's pass holds mostly activations (``Population.step_workers``:
                    the CNN's do, the MLP's do not; the baseline's numbers, bit for bit);
    auto.side-by-side   the same, the passes side by side whatever they hold (what the rule keeps from the MLP);
    auto.relu-first the same as ``auto`` with the CNN's ReLU before its pooling in each block (the registered
                    model's order until 2026-12-05; now it pools first: the same numbers, bit for bit);
    channels-last   + ``model.conv`` channels-last (the minibatch laid out [B, H, W, P, C]: numbers to float32
                    rounding, and dependent on the passes' sizes, so a choice, not the default);
    channels-last.gradient-chunks   the same, chunks by the gradients alone.

Machines like this one are noisy (the same run's round moved by 0.5-0.7 s between processes minutes apart), so the
variants are timed round-robin in one process, the order reversed every round, and each variant's round is
compared with the baseline's round of the same turn (``--against``: another variant's): the ratios' median and
range are the result. Also printed: the fused step (``bench_gpu.fused_step``: one model's SGD step on all N·16
images of a round, no per-participant state, no gossip), the floor a stacked round can approach, and whether each
variant's state equals the baseline's (bit for bit but for channels-last, whose float32 rounding differences grow
over rounds as training amplifies them).

Run::

    python bench/bench_cnn_modes.py                  # N = 256, 12 timed rounds per variant (~2 min on 2 cores)
    python bench/bench_cnn_modes.py --nodes 64 256 1024 --rounds 8
    python bench/bench_cnn_modes.py --variants auto.in-turn auto --against auto.in-turn --rounds 40
    python bench/bench_cnn_modes.py --model mlp --nodes 4096 16384 --rounds 8 --variants auto.in-turn \
        auto.side-by-side --against auto.in-turn
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from bench_gpu import fused_step
from bench_peers import SHAPES, dice_config

import dice_ray
from dice_ray.engine.local import LocalEngine
from dice_ray.experiment import prepare
from dice_ray.hooks import round_hooks
from dice_ray.methods.catalog import methods_for

# variant -> (model.conv, model.pool, step chunks counting activations, passes side by side: None = as auto decides
#             [, the CNN's ReLU before its pooling])
VARIANTS = {"baseline": ("native", "native", False, False), "chunks": ("native", "native", True, False),
            "gather": ("native", "gather", False, False), "auto.in-turn": ("auto", "auto", True, False),
            "auto": ("auto", "auto", True, None), "auto.side-by-side": ("auto", "auto", True, True),
            "auto.relu-first": ("auto", "auto", True, None, True),
            "channels-last": ("channels-last", "gather", True, None),
            "channels-last.gradient-chunks": ("channels-last", "gather", False, None)}


def engine_for(nodes: int, conv: str, pool: str, activations: bool, side_by_side: bool | None = None,
               relu_first: bool = False, model: str = "cnn", heldout: int | None = None) -> LocalEngine:
    config, _, _ = dice_config(model, nodes, 10_000, "/nonexistent/bench-cnn-modes")
    if heldout is not None:  # bench_peers keeps z′ at one batch: its one evaluation is not timed
        config["data"]["heldout_size"] = heldout
    config["model"] = {**config["model"], "conv": conv, "pool": pool}
    run_config = dice_ray.RunConfig(**config)
    engine = LocalEngine(prepare(run_config), round_hooks(methods_for(run_config)))
    if not activations:
        engine.block.population.step_row_bytes = 0  # chunks by the gradients alone: the rule before 2026-12-05
    if side_by_side is not None:  # 1: passes one after another, each on all threads
        engine.block.population.step_threads = torch.get_num_threads() if side_by_side else 1
    if relu_first:
        relu_before_pooling(engine)
    return engine


def relu_before_pooling(engine: LocalEngine) -> None:
    """Put the CNN's ReLU back before its pooling in each conv block, in place (the same function, bit for bit)."""
    layers = engine.block.population.model
    for i in range(len(layers) - 1):
        if isinstance(layers[i], torch.nn.MaxPool2d) and isinstance(layers[i + 1], torch.nn.ReLU):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]


def cpu_banner(threads: int | None = None) -> None:
    """Use ``threads`` (default: every core) for torch's threads; print the machine, torch, the load and the date
    (a bench's first line)."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d')}")


def interleaved_rounds(engines: dict[str, LocalEngine], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each engine's ``rounds`` timed rounds (no evaluation), after ``warmup`` untimed ones (the first
    measures the step's memory, converts W, warms the allocator): the engines take turns every round, the order
    reversed every round, so that the machine's drift falls on all of them alike."""
    for t in range(warmup):
        for engine in engines.values():
            engine.run_round(t, evaluate=False)
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    order = list(engines)
    for t in range(warmup, warmup + rounds):
        for name in order if t % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            engines[name].run_round(t, evaluate=False)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def measure(nodes: int, rounds: int, warmup: int, variants: list[str], model: str = "cnn",
            against: str = "baseline") -> dict[str, Any]:
    engines = {name: engine_for(nodes, *VARIANTS[name], model=model) for name in dict.fromkeys(["baseline", *variants])}
    seconds = interleaved_rounds(engines, rounds, warmup)
    chunks = {name: len(e.block.population.step_chunks()) for name, e in engines.items()}
    base = engines["baseline"].block.population.state
    fused = fused_step(model, nodes, "cpu", steps=max(3, rounds // 2), warmup=1, shape=SHAPES[model])["s_per_step"]
    result: dict[str, Any] = {"model": model, "nodes": nodes, "fused_step_s": fused, "variants": {}}
    for name, times in seconds.items():
        ratios = [a / b for a, b in zip(times, seconds[against], strict=True)]
        state = engines[name].block.population.state
        result["variants"][name] = {
            "passes": chunks[name], "round_s": statistics.median(times), "round_s_range": [min(times), max(times)],
            "against": against, "vs": statistics.median(ratios), "vs_range": [min(ratios), max(ratios)],
            "vs_fused": statistics.median(times) / fused, "same_state_bitwise": bool(torch.equal(state, base)),
            "max_rel_state_diff": float((state - base).abs().max() / base.abs().max())}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[256])
    parser.add_argument("--model", choices=tuple(SHAPES), default="cnn",
                        help="bench_peers' model (mlp: only the passes' variants change anything)")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per variant first")
    parser.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != "baseline"],
                        default=[v for v in VARIANTS if v != "baseline"], help="timed beside the baseline")
    parser.add_argument("--against", default="baseline", help="the variant whose round of the same turn each round "
                        "is divided by (default: the baseline)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core; 1: what an "
                        "actor of one CPU runs, its passes one after another)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.against not in ("baseline", *args.variants):
        parser.error(f"--against {args.against!r} is not timed; choose baseline or one of {', '.join(args.variants)}")
    cpu_banner(args.threads)
    results = []
    for nodes in args.nodes:
        result = measure(nodes, args.rounds, args.warmup, args.variants, args.model, args.against)
        results.append(result)
        print(f"\nN = {nodes}: fused step {result['fused_step_s']:.3f} s (one {args.model} on {nodes * 16} images)")
        print(f"| variant | passes | s/round (median, range) | × {args.against} (median, range) | × fused "
              "| state vs baseline |")
        print("|---|---:|---|---|---:|---|")
        for name, v in result["variants"].items():
            same = "bit for bit" if v["same_state_bitwise"] else f"max rel diff {v['max_rel_state_diff']:.1e}"
            print(f"| {name} | {v['passes']} | {v['round_s']:.3f} [{v['round_s_range'][0]:.3f}, "
                  f"{v['round_s_range'][1]:.3f}] | {v['vs']:.3f} [{v['vs_range'][0]:.3f}, "
                  f"{v['vs_range'][1]:.3f}] | {v['vs_fused']:.2f} | {same} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
