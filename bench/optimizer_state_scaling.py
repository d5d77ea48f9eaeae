"""How DICE-E's error against DICE-GT shrinks with the learning rate, per optimizer and hop: the part of Δ that lives
in the optimizer state does not shrink with η.

A whole-batch probe's Δ covers j's optimizer state too: momentum's buffer and Adam's moments change by about a
gradient in the step the counterfactual skips, whatever η. SGD has no such state, and every variant's error shrinks
like η² at every hop (second order like η³). Momentum's step is linear in its buffer: the curvature and second-order
expansions stay exact in it, but first order (J = I) drops it, so its error from hop 2 on is a fixed fraction of
DICE-GT. Adam's step is not linear in its moments (1/√v̂, early in training with v̂ small), so from hop 2 on every
expansion along Δ keeps an error of order η, a fixed fraction of DICE-GT that falls as training goes on (v̂ grows)
but not with η; hop 1 and the direct term are untouched (the first local step after the probe is j's own at hop 2).

For each (optimizer, η): 6 participants on a ring, tanh MLP, digits, batch 8, whole-batch probes of every source at
one round, 3 hops, all four variants; printed per variant and step s, Σ_k |GT − E| / Σ_k |GT| over the terms
d_k^{(s)}, and under each η after the first the factor by which that error fell when η was quartered (GT itself is
O(η), so |GT − E| = O(η²) shows as ~4, O(η³) as ~16, a plateau as ~1; below ~1e-5 it is float32's rounding). One
local run per case, one thread, deterministic (about 10 s)::

    python bench/optimizer_state_scaling.py                        # sgd momentum adam, probe round 3
    python bench/optimizer_state_scaling.py --optimizers adam --probe-round 12
    python bench/optimizer_state_scaling.py --optimizers adam --lr 0.01 --model mlp --probe-round 1   # outside it
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import dice_ray

VARIANTS = ("first-order", "curvature", "second-order", "exact-readout")
LEARNING_RATES = {"sgd": (0.04, 0.01, 0.0025), "momentum": (0.04, 0.01, 0.0025), "adam": (0.002, 0.0005, 0.000125)}
HOPS = 3


def errors(optimizer: str, lr: float, probe_round: int, out: Path, model: str = "mlp-tanh") -> np.ndarray:
    """[variant, step 1..HOPS]: Σ|GT − E| / Σ|GT| over the run's influence terms of that step."""
    config = dice_ray.RunConfig(
        seed=1, nodes=6, rounds=probe_round + HOPS + 1, topology={"name": "ring"},
        data={"dataset": "digits", "heldout_size": 64}, model={"name": model},
        optim={"name": optimizer, "lr": lr, "batch_size": 8},
        output={"out": str(out), "progress": False, "eval_every": 100, "checkpoint_every": 0},
        influence={"enabled": True, "hops": HOPS, "rounds": [probe_round], "variants": list(VARIANTS)})
    terms = dice_ray.run(config, engine="local").influence
    table = np.zeros((len(VARIANTS), HOPS))
    for s in range(1, HOPS + 1):
        at = terms[terms["step"] == s]
        gt = at["gt"].to_numpy(float)
        for i, variant in enumerate(VARIANTS):
            est = at[f"est_{variant.replace('-', '_')}"].to_numpy(float)
            table[i, s - 1] = np.abs(gt - est).sum() / np.abs(gt).sum()
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="+", choices=tuple(LEARNING_RATES), default=list(LEARNING_RATES))
    parser.add_argument("--probe-round", type=int, default=3)
    parser.add_argument("--lr", type=float, nargs="+", help="learning rates (default: three per optimizer, 4x apart)")
    parser.add_argument("--model", default="mlp-tanh", help="registered model (default mlp-tanh; mlp is ReLU)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.func.jvp's note on torch.jit.script
    steps = "  ".join(f"s={s}" for s in range(1, HOPS + 1))
    print(f"{'optimizer':>9} {'lr':>9}  " + "  ".join(f"{v + ' ' + steps:>28}" for v in VARIANTS))
    with tempfile.TemporaryDirectory() as scratch:
        for optimizer in args.optimizers:
            before = None
            for lr in args.lr or LEARNING_RATES[optimizer]:
                table = errors(optimizer, lr, args.probe_round, Path(scratch) / f"{optimizer}-{lr}", args.model)
                print(f"{optimizer:>9} {lr:>9g}  " + "  ".join(
                    f"{' '.join(f'{e:8.1e}' for e in row):>28}" for row in table), flush=True)
                if before is not None:
                    print(f"{'':>9} {'fell by':>9}  " + "  ".join(
                        f"{' '.join(f'{f:8.1f}' for f in row):>28}" for row in before / table), flush=True)
                before = table


if __name__ == "__main__":
    main()
