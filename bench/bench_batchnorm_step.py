"""What DICE-E's pure local step costs through BatchNorm, against its floor: the parameters' step alone.

DICE-E differentiates the local step over the whole state (``Population.functional_state_step``): the parameters'
optimizer step and BatchNorm's running statistics moved toward the batch's. The statistics come from the forward
pass the gradient runs, so the whole state's step should cost what the parameters' step alone costs
(``Population.functional_step``, which moves nothing). This prints, per model, the median time of one forward-mode
derivative (``torch.func.jvp``, first order; nested, second order) of each, interleaved in one process, and their
ratio: about 1.0 is the floor.

Until 2026-12-06 the statistics took a second forward pass. Measured that day (Intel Xeon, 2 cores, torch 2.14.1, the
default command, twice each, ratio's median over 7 pairs): before (7f9ef36) 1.16 and 1.18 first order, 1.23 and 1.29
second order (whole state 74-82 ms and 192-197 ms); after, 1.13 and 1.11, 1.16 and 1.09 (64-66 ms and 163-181 ms).

    python bench/bench_batchnorm_step.py                      # the MLP with BatchNorm, ~1 min on 2 cores
    python bench/bench_batchnorm_step.py --models resnet18    # ResNet-18 on 3x32x32, P = 2: ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.func import jvp

from dice_ray.core.models import build_model
from dice_ray.core.population import OptimizerSpec, Population, initial_state

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name == "batchnorm-mlp":  # two BatchNorm layers between tanh layers, on 1x8x8 inputs
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.Tanh(), nn.BatchNorm1d(128), nn.Linear(128, 64),
                             nn.Tanh(), nn.BatchNorm1d(64), nn.Linear(64, 10)), (1, 8, 8)
    return build_model(name, (3, 32, 32), 10), (3, 32, 32)


def _timed(step, state: torch.Tensor, tangent: torch.Tensor, second: bool) -> float:
    start = time.perf_counter()
    if second:
        one = torch.ones((), dtype=state.dtype)
        jvp(lambda e: jvp(lambda f: step(state + f * tangent), (e,), (one,))[1], (torch.zeros_like(one),), (one,))
    else:
        jvp(step, (state,), (tangent,))
    return time.perf_counter() - start


def measure(name: str, participants: int, batch: int, repeats: int) -> None:
    torch.manual_seed(0)
    model, shape = _model(name)
    pop = Population(model, initial_state(model, np.arange(participants), 0), OptimizerSpec("momentum", 0.05))
    x, y = torch.randn(participants, batch, *shape), torch.randint(0, 10, (participants, batch))
    opt = {n: v.clone() for n, v in pop.opt_state.items()}
    width = pop.param_layout.width
    steps = {"whole state": lambda s: pop.functional_state_step(s, opt, x, y)[0],
             "parameters alone": lambda s: pop.functional_step(s[:, :width], opt, x, y)[0]}
    tangent = torch.randn_like(pop.state)
    for second in (False, True):
        times: dict[str, list[float]] = {k: [] for k in steps}
        for k in steps:  # warm up
            _timed(steps[k], pop.state, tangent, second)
        for i in range(repeats):
            for k in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
                times[k].append(_timed(steps[k], pop.state, tangent, second))
        ratios = [a / b for a, b in zip(times["whole state"], times["parameters alone"], strict=True)]
        print(f"{name}, P={participants}, batch {batch}, {'second' if second else 'first'}-order: whole state "
              f"{statistics.median(times['whole state']) * 1e3:.1f} ms, parameters alone "
              f"{statistics.median(times['parameters alone']) * 1e3:.1f} ms, ratio {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] over {repeats} pairs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["batchnorm-mlp"], help="batchnorm-mlp and/or resnet18")
    parser.add_argument("--participants", type=int, default=None, help="default: 64 (the MLP), 2 (ResNet-18)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the same numbers every rerun)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        participants = args.participants or (2 if name == "resnet18" else 64)
        measure(name, participants, args.batch, args.repeats if name != "resnet18" else min(args.repeats, 3))


if __name__ == "__main__":
    main()
