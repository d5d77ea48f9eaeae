"""Detection by proximal influence with the exact readout beside the first-order score: ROC AUC over time.

The detection study of ``docs/results/detection.md`` (``configs/anomaly-proximal.yaml``: 64 participants, exponential
graph, 8 misbehaving at random, every examiner scoring its in-neighbours every round on its own validation split),
run twice per misbehaviour and seed: ``proximal.readout`` first-order (q_k W_kl ∇L(θ_k^{t+1}; z′_k)ᵀΔ_l, today's
score) and exact (q_k [L(θ_k^{t+1}; z′_k) − L(θ_k^{t+1} − W_kl Δ_l; z′_k)], the counterfactual effect of the
neighbour's update). Prints the overall ROC AUC of the cumulative score after 1, 2, 3, 5, 10 and 20 rounds, mean (min)
over seeds, for each readout (``Run.anomaly``: the detection report's ``proximal`` method).

    python bench/detection_readout.py                                    # 5 misbehaviours x 3 seeds x 2 readouts
    python bench/detection_readout.py --kinds label-flip --seeds 0
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _tables import print_plain

import dice_ray
from dice_ray.core.misbehavior import BUILT_IN_FIELDS

HORIZONS = [1, 2, 3, 5, 10, 20]


def auc_by_horizon(kind: str, seed: int, readout: str, out: Path) -> dict[int, float]:
    """ROC AUC of the cumulative proximal score at every horizon, for one run."""
    config = dice_ray.as_config(dice_ray.bundled_config("anomaly-proximal"), seed=seed,
                                misbehavior={"kind": kind}, proximal={"readout": readout},
                                output={"out": str(out), "overwrite": True, "progress": False,
                                        "checkpoint_every": 0})
    table = dice_ray.run(config, engine="local").anomaly(HORIZONS)
    mine = table[table["method"] == "proximal"].set_index("horizon")["auc"]
    return {h: float(mine[h]) for h in HORIZONS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=list(BUILT_IN_FIELDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.kinds:
            aucs = {readout: [auc_by_horizon(kind, seed, readout, Path(folder) / "run") for seed in args.seeds]
                    for readout in ("first-order", "exact")}
            for readout, runs in aucs.items():
                cells = [f"{np.mean([r[h] for r in runs]):.3f} ({min(r[h] for r in runs):.3f})" for h in HORIZONS]
                rows.append([kind, readout, str(len(runs)), *cells])
            print_plain(["misbehaviour", "readout", "seeds", *(f"AUC after {h}" for h in HORIZONS)], rows[-2:])
    print("\nall:")
    print_plain(["misbehaviour", "readout", "seeds", *(f"AUC after {h}" for h in HORIZONS)], rows)


if __name__ == "__main__":
    main()
