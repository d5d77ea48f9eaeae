"""Golden tables: representative runs must keep their numbers across refactors.

The tables in ``tests/golden/`` were recorded before the round-hook refactor (issue 12) and are compared here
with fresh runs: every key column equal, every float column equal to 1e-7 of its largest value. Regenerate them
only for a change that is meant to change numbers: ``DICE_RAY_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py``.
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
TOLERANCE = 1e-7

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
    folder = GOLDEN / case
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
                assert diff <= TOLERANCE * scale, f"{name}.{column}: differs by {diff:.3g} (scale {scale:.3g})"
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
