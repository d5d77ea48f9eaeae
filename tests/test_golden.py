"""Golden tables: representative runs must keep their numbers across refactors, on any machine.

The tables in ``tests/golden/`` were recorded before the round-hook refactor (issue 12) and are compared here
with fresh runs: every key (non-float) column equal, every float column within ``tolerance(rounds)`` of its
scale (its largest absolute value). Regenerate them only for a change that is meant to change numbers:
``DICE_RAY_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py``.

Why the tolerance is what it is. A golden test must catch a change of the numbers, not a change of the machine
or of a dependency's rounding. The runs are float32 (unit roundoff u = 2^-24). Another CPU, another torch
release or another kernel choice (AVX2, AVX-512, the scalar ``default`` kernels; other blocking or threading)
reorders the sums inside matrix products, convolutions and gossip, which moves each result by a few u of the
magnitude of its terms. A round chains the forward and backward pass, the optimizer update and gossip, each
with such reductions: we allow ``ULPS_PER_ROUND`` u of relative error per round, accumulated linearly over the
run's rounds (at these learning rates ten rounds of training do not amplify a perturbation exponentially).
DICE-GT columns are differences between two nearby runs and lose digits to cancellation, which is why the
per-round budget is not a single ulp. Measured on one AMD EPYC with torch 2.14.1 (the tables were recorded
with its AVX2 kernels: ``ATEN_CPU_CAPABILITY=avx2`` reproduces them to 1e-12), the worst column under the
AVX-512 and scalar kernels differs by 2.2e-6 of its scale (``dice.gt_horizon`` of the ``methods`` case), about
a ninth of the budget at ten rounds; the planted changes below (one learning-rate digit, one skipped gossip
term) move the tables by orders of magnitude more than the budget, and fail.

Bit-identity is a property of the design only on one machine (any number of actors, a resumed run): those
tests are ``tests/engine/test_engine.py::test_same_numbers_for_1_3_and_n_actors`` and the checkpoint tests, not here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dice_ray

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("DICE_RAY_REGEN_GOLDEN") == "1"
UNIT_ROUNDOFF = 2.0**-24  # float32
ULPS_PER_ROUND = 32


def tolerance(rounds: int) -> float:
    """Relative tolerance (on a column's scale) for a run of ``rounds`` float32 rounds (see the module docstring)."""
    return ULPS_PER_ROUND * UNIT_ROUNDOFF * rounds

SMALL = {"nodes": 9, "rounds": 10, "seed": 5, "data": {"dataset": "digits", "heldout_size": 64},
         "optim": {"batch_size": 8}, "output": {"progress": False, "eval_every": 3}}

CASES: dict[str, tuple[dict, str]] = {
    # replayed DICE-GT and both DICE-E variants over 3 hops, whole batches and single samples, momentum
    "influence": ({"topology": {"name": "ring"}, "optim": {"name": "momentum", "lr": 0.05},
                   "influence": {"enabled": True, "hops": 3, "rounds": [2, 5], "probe_samples": 1}}, "local"),
    # proximal influence, the contribution ledger and in-loop DICE-E together on 3 actors, with a label flipper
    "methods": ({"proximal": {"enabled": True, "zprime": "heldout"}, "ledger": {"enabled": True, "hops": 2},
                 "influence": {"enabled": True, "online": True, "hops": 2, "rounds": [3, 4]},
                 "misbehavior": {"kind": "label-flip", "count": 1}, "engine": {"actors": 3}}, "ray"),
    # collaborator selection (outlier rule) rewiring W every 4 rounds on 2 actors, with a sign-flipper
    "rewiring": ({"rounds": 12, "proximal": {"enabled": True, "zprime": "heldout"},
                  "rewiring": {"mode": "outlier", "every": 4, "keep": 3},
                  "misbehavior": {"kind": "sign-flip", "count": 1}, "engine": {"actors": 2}}, "ray"),
}
RESUMED = {"proximal": {"enabled": True, "zprime": "heldout"}, "ledger": {"enabled": True, "hops": 2},
           "influence": {"enabled": True, "online": True, "hops": 2, "rounds": [3, 5]},
           "output": {"checkpoint_every": 4}}


def _config(changes: dict, out: Path) -> dice_ray.RunConfig:
    data = json.loads(json.dumps(SMALL))
    for section, value in changes.items():
        if isinstance(value, dict):
            data.setdefault(section, {}).update(value)
        else:
            data[section] = value
    data["output"]["out"] = str(out)
    return dice_ray.RunConfig.model_validate(data)


def _tables(run: Path) -> dict[str, pd.DataFrame]:
    return {p.stem: pd.read_parquet(p) for p in sorted(run.glob("*.parquet"))}


def _compare(case: str, run: Path) -> None:
    """Assert the tables of ``run`` equal the golden tables of ``case`` (see the module docstring)."""
    folder = GOLDEN / case
    rounds = json.loads((run / "manifest.json").read_text())["config"]["rounds"]
    rtol = tolerance(rounds)
    got = _tables(run)
    if REGEN:
        folder.mkdir(parents=True, exist_ok=True)
        for name, table in got.items():
            table.to_parquet(folder / f"{name}.parquet", index=False)
        return
    want = {p.stem: pd.read_parquet(p) for p in sorted(folder.glob("*.parquet"))}
    assert want, f"no golden tables in {folder}"
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name, table in want.items():
        mine = got[name]
        assert [c for c in mine if c in table or mine[c].notna().any()] == list(table) and len(mine) == len(table), name
        for column in table.columns:
            a, b = mine[column], table[column]
            if pd.api.types.is_float_dtype(b.dtype):
                x, y = a.to_numpy(np.float64), b.to_numpy(np.float64)
                assert np.array_equal(np.isnan(x), np.isnan(y)), f"{name}.{column}: missing values differ"
                scale = max(float(np.nanmax(np.abs(y))) if np.isfinite(y).any() else 0.0, 1e-30)
                diff = float(np.nanmax(np.abs(x - y))) if np.isfinite(y).any() else 0.0
                assert diff <= rtol * scale, (f"{name}.{column}: differs by {diff:.3g} (scale {scale:.3g}, "
                                              f"tolerance {rtol:.2g} of it)")
            else:
                pd.testing.assert_series_equal(a, b, check_names=False, obj=f"{name}.{column}")


@pytest.mark.parametrize("case", list(CASES))
def test_golden_tables(case: str, ray_local, tmp_path: Path) -> None:
    changes, engine = CASES[case]
    run = dice_ray.run(_config(changes, tmp_path / case), engine=engine)
    _compare(case, run.path)


def test_golden_tables_of_a_resumed_run(tmp_path: Path) -> None:
    """Interrupted after round 6 (the checkpoint after round 3 holds a probe in flight), then resumed."""
    config = _config(RESUMED, tmp_path / "resumed")

    def interrupt(metrics, engine) -> None:
        if metrics.round == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dice_ray.run(config, engine="local", on_round=interrupt)
    run = dice_ray.resume(tmp_path / "resumed", engine="local")
    _compare("resumed", run.path)


# -- the tolerance still catches real changes: plant one and see the comparison fail --------------------------


def test_a_changed_learning_rate_digit_fails_the_golden_test(tmp_path: Path) -> None:
    changes, engine = CASES["influence"]
    changed = {**changes, "optim": {**changes["optim"], "lr": 0.06}}  # 0.05 -> 0.06
    run = dice_ray.run(_config(changed, tmp_path / "lr"), engine=engine)
    with pytest.raises(AssertionError, match="differs by"):
        _compare("influence", run.path)


def test_one_skipped_gossip_term_fails_the_golden_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In round 4 participant 0 drops its term from participant 1 (its weight goes to itself: W stays stochastic)."""
    from dice_ray.core.topology import Topology

    original = Topology.mixing_matrix

    def skipping(self: Topology, t: int):
        w = original(self, t)
        if t != 4:
            return w
        w = w.tolil(copy=True)
        w[0, 0], w[0, 1] = w[0, 0] + w[0, 1], 0.0
        return type(original(self, t))(w.tocsr())

    monkeypatch.setattr(Topology, "mixing_matrix", skipping)
    changes, engine = CASES["influence"]
    run = dice_ray.run(_config(changes, tmp_path / "skip"), engine=engine)
    with pytest.raises(AssertionError, match="differs by"):
        _compare("influence", run.path)
