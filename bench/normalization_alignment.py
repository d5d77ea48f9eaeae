"""How well DICE-E follows DICE-GT through per-sample normalization (GroupNorm, LayerNorm), against the same model
without it, as the learning rate falls.

A small CNN (two 3x3 convolutions of 8 channels, a hidden layer of 32, tanh) in three forms: no normalization,
GroupNorm(4, C) after every layer, and LayerNorm (GroupNorm(1, C) after the convolutions, ``nn.LayerNorm`` after
the hidden layer). Normalization makes the weights before it scale-invariant: their effective step is η/‖W‖², so at
the same η the loss is far more curved along the update Δ, and a Taylor expansion in Δ (every DICE-E variant) holds
only at smaller η. For each (model, η): 8 participants on a ring, digits, SGD, batch 16, 20 rounds, whole-batch
probes of every source in the last 4 rounds that leave room for 3 hops (32 probes), all four variants; printed per
variant over every per-participant term d_k^{(s)} (the influence table, steps 0-3): the fraction with GT's sign,
Spearman's correlation, and Σ|GT − E| / Σ|GT|. One run per case in this process (no Ray), one thread::

    python bench/normalization_alignment.py                         # --lr 0.1 0.03 0.01
    python bench/normalization_alignment.py --models none gn --lr 0.1
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

import dice_ray
from dice_ray.core.models import register_model

VARIANTS = ("first-order", "curvature", "second-order", "exact-readout")


def _norm(kind: str, channels: int, hidden: bool) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "ln" and hidden:
        return nn.LayerNorm(channels)
    return nn.GroupNorm(4 if kind == "gn" else 1, channels)


def small_cnn(kind: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), _norm(kind, 8, False), nn.Tanh(),
                         nn.Conv2d(8, 8, 3, padding=1, stride=2), _norm(kind, 8, False), nn.Tanh(), nn.Flatten(),
                         nn.Linear(8 * ((h + 1) // 2) * ((w + 1) // 2), 32), _norm(kind, 32, True), nn.Tanh(),
                         nn.Linear(32, num_classes))


for _kind in ("none", "gn", "ln"):
    register_model(f"bench-small-cnn-{_kind}")(lambda shape, classes, k=_kind: small_cnn(k, shape, classes))


def alignment(model: str, lr: float, out: Path) -> dict[str, tuple[float, float, float]]:
    """Variant -> (sign agreement, Spearman, Σ|GT − E| / Σ|GT|) over the run's influence terms."""
    config = dice_ray.RunConfig(
        seed=0, nodes=8, rounds=20, topology={"name": "ring"}, data={"dataset": "digits", "heldout_size": 100},
        model={"name": model}, optim={"name": "sgd", "lr": lr, "batch_size": 16},
        output={"out": str(out), "progress": False, "eval_every": 20, "checkpoint_every": 0},
        influence={"enabled": True, "hops": 3, "last": 4, "variants": list(VARIANTS)})
    terms = dice_ray.run(config, engine="local").influence
    gt = terms["gt"].to_numpy(float)
    result = {}
    for variant in VARIANTS:
        est = terms[f"est_{variant.replace('-', '_')}"].to_numpy(float)
        signed = np.abs(gt) > 1e-7  # a GT of rounding size has no sign to agree with
        result[variant] = (float(np.mean(np.sign(est[signed]) == np.sign(gt[signed]))),
                           float(spearmanr(gt, est)[0]), float(np.abs(gt - est).sum() / np.abs(gt).sum()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=("none", "gn", "ln"), default=["none", "gn", "ln"])
    parser.add_argument("--lr", nargs="+", type=float, default=[0.1, 0.03, 0.01])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.func.jvp's note on torch.jit.script
    print(f"{'model':>5} {'lr':>6}  " + "  ".join(f"{v:>24}" for v in VARIANTS))
    print(f"{'':>5} {'':>6}  " + "  ".join(f"{'sign  spearman  rel.err':>24}" for _ in VARIANTS))
    with tempfile.TemporaryDirectory() as scratch:
        for kind in args.models:
            for lr in args.lr:
                row = alignment(f"bench-small-cnn-{kind}", lr, Path(scratch) / f"{kind}-{lr}")
                print(f"{kind:>5} {lr:>6}  " + "  ".join(f"{s:>6.2f} {r:>9.2f} {e:>7.3f}" for s, r, e in row.values()),
                      flush=True)


if __name__ == "__main__":
    main()
