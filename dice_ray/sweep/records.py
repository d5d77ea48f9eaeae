"""A sweep directory's records: one ``result.json`` per finished trial, and ``trials.parquet`` built from them.

```
SWEEP_DIR/
  sweep.json            the validated sweep (a resumed sweep must match it)
  trials.parquet        one row per finished trial; rebuilt atomically after every trial
  summary.png           the summary plot (when the sweep file has `plot:` and a trial finished)
  trials/<trial_id>/    the trial's run directory (manifest.json, rounds.parquet, ...) and result.json
  tune/                 Ray Tune's own experiment state
```

``result.json`` is written atomically by the sweep's driver as soon as the trial ends, so it exists exactly
for the finished trials (ok or failed); ``--resume`` skips those and reruns the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from dice_ray.errors import InputError
from dice_ray.results import TRIALS, write_json_atomic, write_table_atomic
from dice_ray.rundir import read_json

RESULT = "result.json"


def trial_dir(out: Path, trial_id: str) -> Path:
    """Return the directory of trial ``trial_id`` (its run directory, and its ``result.json``)."""
    return out / "trials" / trial_id


def write_result(out: Path, row: dict[str, Any]) -> None:
    """Record a finished trial: ``row`` has the TRIALS columns plus ``params`` and ``metrics`` dicts."""
    path = trial_dir(out, row["trial_id"])
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / RESULT, row)


def finished_trials(out: Path) -> dict[str, dict[str, Any]]:
    """Return the recorded rows of the finished trials under ``out``, by trial id; a ``result.json`` that is not
    one (``check_result``) is an ``InputError`` naming it."""
    rows = {}
    for path in sorted((out / "trials").glob(f"*/{RESULT}")):
        try:
            row = read_json(path)
            problem = check_result(row, path.parent.name)
        except (OSError, ValueError) as err:
            problem = type(err).__name__
        if problem is not None:
            raise InputError(f"{path} is not a trial's result ({problem}): the sweep directory was damaged; delete "
                             "that trial's folder to run it again")
        rows[row["trial_id"]] = row
    return rows


def check_result(row: Any, folder: str) -> str | None:
    """What makes ``row`` (a ``result.json`` read from the trial folder ``folder``) not one ``write_result`` writes,
    or None: the TRIALS fields of their types, ``params`` a mapping, ``metrics`` a mapping of numbers or nulls."""
    if not isinstance(row, dict):
        return "not a JSON object"
    kinds = {"trial_id": str, "status": str, "error": (str, type(None)), "run_dir": str, "start_time": str,
             "wall_seconds": (int, float, type(None))}
    for name, kind in kinds.items():
        if name not in row:
            return f"no {name}"
        if not isinstance(row[name], kind) or isinstance(row[name], bool):
            return f"{name} {row[name]!r}"
    if row["trial_id"] != folder:
        return f"trial_id {row['trial_id']!r} in the folder {folder!r}"
    if row["status"] not in ("ok", "failed"):
        return f"status {row['status']!r}"
    if not isinstance(row.get("params"), dict):
        return f"params {row.get('params')!r}"
    metrics = row.get("metrics")
    if not isinstance(metrics, dict) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in metrics.values()):
        return f"metrics {metrics!r}"[:120]
    return None


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types, e.g. a choice of ints and names
        return pa.array([None if v is None else json.dumps(v) if not isinstance(v, str) else v for v in values])


def write_trials_table(out: Path, rows: list[dict[str, Any]], fields: list[str], grid: bool = True) -> Path:
    """Write ``trials.parquet``: the TRIALS columns, one column per swept field (``fields``, dotted names) and
    one float64 column per metric any trial reported. Rows in ``grid`` order (its trial ids: the same in every run
    of the sweep), else in start order (an Optuna search's trials take Tune's ids, new in each run). Returns its
    path."""
    rows = sorted(rows, key=(lambda r: r["trial_id"]) if grid else (lambda r: (r["start_time"], r["trial_id"])))
    metrics = list(dict.fromkeys(c for row in rows for c in row["metrics"]))
    arrays = [pa.array([row[f.name] for row in rows], type=f.type) for f in TRIALS]
    schema = list(TRIALS)
    for field in fields:
        arrays.append(_column([row["params"].get(field) for row in rows]))
        schema.append(pa.field(field, arrays[-1].type, metadata={"description": f"swept config field {field}"}))
    for name in metrics:
        arrays.append(pa.array([row["metrics"].get(name) for row in rows], type=pa.float64()))
        schema.append(pa.field(name, pa.float64(), metadata={
            "description": "trial metric (dice_ray/sweep/metrics.py); null where it failed or does not apply"}))
    table_schema = pa.schema(schema)
    path = out / "trials.parquet"
    write_table_atomic(path, {f.name: a.to_pylist() for f, a in zip(table_schema, arrays, strict=True)}, table_schema)
    return path
