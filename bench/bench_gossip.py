"""Seconds per CPU round with today's gossip against the earlier form, interleaved in one process.

Workloads (``--workloads``), each N participants (``--nodes``, default 256) as ``LocalEngine`` rounds (the local step,
then gossip; no evaluation), torch threads = all cores:

    mlp     ``bench_peers.py``'s MLP (64 -> 128 -> 64 -> 10 on 1x8x8, 17,226 parameters), batch 16, SGD lr 0.05,
            exponential graph, uniform weights;
    mnist   the default run's model and data (``configs/default.yaml``: the 109k-parameter MLP on mnist5k, batch 8);
    cnn     ``bench_peers.py``'s CNN (105,866 parameters on 1x28x28), batch 16.

Two engines per workload, the same config, seed and minibatches, differing only in ``Population.mix_``:

    fresh-chunks   what every CPU run did before 2026-12-05: each column chunk's product a new tensor (which PyTorch
                   zero-fills before the sparse product adds into it), then copied into the state;
    auto           ``mix_`` today: the first product of each chunk written into one buffer kept between rounds
                   (``addmm`` with beta 0, nothing to zero), then copied into the state.

Their rounds alternate (the order reversed every round); each round of ``auto`` is divided by the ``fresh-chunks``
round of the same turn, and the ratios' median and range are the result. Also printed: whether both states are equal
bit for bit after the timed rounds (they must be).

Run::

    python bench/bench_gossip.py                                  # mlp, mnist, cnn at N = 256 (~30 s on 2 cores)
    python bench/bench_gossip.py --workloads mlp --nodes 1024 4096 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import types
from pathlib import Path
from typing import Any

import torch
import yaml
from _tables import print_markdown
from bench_cnn_modes import cpu_banner, engine_for, interleaved_rounds

import dice_ray
from dice_ray.engine.local import LocalEngine
from dice_ray.experiment import prepare
from dice_ray.hooks import round_hooks
from dice_ray.methods.catalog import methods_for

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def fresh_chunks_mix_(self: Any, weights: Any, sources: Any) -> None:
    """``Population.mix_`` on a CPU as it was before 2026-12-05 (the baseline)."""
    pairs = list(zip(weights, sources, strict=True)) if isinstance(weights, list) else [(weights, sources)]

    def product(w: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(w, src) if w.is_sparse_csr else w @ src

    rows = sum(src.shape[0] for _, src in pairs)
    width = max(256, (1 << 20) // max(rows, 1))
    for a in range(0, self.state.shape[1], width):
        chunk = product(pairs[0][0], pairs[0][1][:, a:a + width])
        for w, src in pairs[1:]:
            chunk += product(w, src[:, a:a + width])
        self.state[:, a:a + width] = chunk


def engine(workload: str, nodes: int) -> LocalEngine:
    if workload == "mnist":
        config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
        run_config = dice_ray.RunConfig(**{**config, "nodes": nodes})
        return LocalEngine(prepare(run_config), round_hooks(methods_for(run_config)))
    return engine_for(nodes, "auto", "auto", True, None, model=workload)


def measure(workload: str, nodes: int, rounds: int, warmup: int) -> dict[str, Any]:
    engines = {"fresh-chunks": engine(workload, nodes), "auto": engine(workload, nodes)}
    baseline = engines["fresh-chunks"].block.population
    baseline.mix_ = types.MethodType(fresh_chunks_mix_, baseline)
    seconds = interleaved_rounds(engines, rounds, warmup)
    ratios = [a / b for a, b in zip(seconds["auto"], seconds["fresh-chunks"], strict=True)]
    return {"workload": workload, "nodes": nodes, "rounds": rounds,
            "fresh_chunks_s": statistics.median(seconds["fresh-chunks"]), "auto_s": statistics.median(seconds["auto"]),
            "vs": statistics.median(ratios), "vs_range": [min(ratios), max(ratios)],
            "bitwise_equal": bool(torch.equal(engines["auto"].block.population.state, baseline.state))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=("mlp", "mnist", "cnn"), default=["mlp", "mnist", "cnn"])
    parser.add_argument("--nodes", type=int, nargs="+", default=[256])
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds per engine (default: 60 mlp, 30 mnist, "
                        "14 cnn)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per engine first")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cpu_banner()
    default_rounds = {"mlp": 60, "mnist": 30, "cnn": 14}
    results = []
    for workload in args.workloads:
        for nodes in args.nodes:
            result = measure(workload, nodes, args.rounds or default_rounds[workload], args.warmup)
            results.append(result)
            print(f"{workload} N={nodes}: auto {result['auto_s']:.4f} s/round, fresh-chunks "
                  f"{result['fresh_chunks_s']:.4f}, auto / fresh-chunks {result['vs']:.3f}", flush=True)
    print_markdown(["workload", "N", "rounds", "fresh-chunks s/round", "auto s/round",
                    "auto / fresh-chunks (median, range)", "states"],
                   [[r["workload"], str(r["nodes"]), str(r["rounds"]), f"{r['fresh_chunks_s']:.4f}",
                     f"{r['auto_s']:.4f}",
                     f"{r['vs']:.3f} [{r['vs_range'][0]:.3f}, {r['vs_range'][1]:.3f}]",
                     "bit for bit" if r["bitwise_equal"] else "DIFFER"] for r in results])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not all(r["bitwise_equal"] for r in results):
        raise SystemExit("the two forms of gossip gave different states")


if __name__ == "__main__":
    main()
