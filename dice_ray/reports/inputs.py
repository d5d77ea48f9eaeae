"""What the reports read from a run directory: its tables and its recorded config, never importing what it names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dice_ray.errors import InputError
from dice_ray.results import kept_topology_file
from dice_ray.rundir import MANIFEST, DirectoryLock, not_a_run, read_json, read_manifest, read_table

PROBED = "a run with influence writes rows for every probe: the table was replaced"


def read_columns(run: Path, name: str, empty: str | None = None) -> dict[str, np.ndarray]:
    """Return table ``name`` of ``run`` as column name -> numpy array (nulls of float columns as NaN); a table
    without rows is an ``InputError`` ending in ``empty`` where given (what the run writes there)."""
    path = run / f"{name}.parquet"
    if not path.is_file():
        raise missing_table(path, "run the simulation with influence.enabled (--influence) first",
                            "influence.enabled")
    table = _with_rows(read_table(path), path, empty)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def _with_rows(table: pa.Table, path: Path, empty: str | None) -> pa.Table:
    if empty is not None and table.num_rows == 0:
        raise InputError(f"{path} holds no rows: {empty}")
    return table


def check_participants(path: Path, column: str, ids: Any, n: int, every: bool = False) -> None:
    """Raise an ``InputError`` naming ``path`` if a participant id of ``column`` (``ids``) is not one of the run's
    ``n`` (0 .. n − 1), or, with ``every``, if the column does not list each of them once (a table of one row per
    participant): such a table was cut or changed, and would otherwise fail as a KeyError or be misread."""
    ids = np.asarray(ids)
    bad = ids[(ids < 0) | (ids >= n)]
    if len(bad):
        raise InputError(f"{path}: {column} {bad[0]} is not one of the run's {n} participants (nodes.parquet): the "
                         "table was changed")
    if every and (len(ids) != n or len(np.unique(ids)) != n):
        raise InputError(f"{path}: column {column!r} lists {len(np.unique(ids))} of the run's {n} participants in "
                         f"{len(ids)} rows, not each once: the table was cut short or changed")


def missing_table(path: Path, hint: str, enabled: str | None = None) -> InputError:
    """The error for a run's table ``path`` that does not exist: the run did not finish (its manifest says so: its
    tables are written at the end), else ``hint`` (the run was made without the method that writes the table). With
    ``enabled`` (the config field that turns that method on, ``influence.enabled``), an unfinished run whose recorded
    config leaves it off gets ``hint`` too: finishing it would not write the table."""
    if not (path.parent / MANIFEST).exists():
        return not_a_run(path.parent)
    try:
        manifest = read_json(path.parent / MANIFEST)
        status = manifest.get("status")
    except (OSError, ValueError, AttributeError):
        manifest, status = {}, None
    holder = DirectoryLock(path.parent).holder()
    if holder is not None:  # a live run: resuming it is refused, waiting is the advice
        return InputError(f"{path.parent} is still running ({holder}), and {path.name} is written when it "
                          "finishes: wait for it")
    if status not in (None, "complete") and not _left_off(path.parent, manifest, enabled):
        return InputError(f"{path.parent} is not a complete run (status {status!r}, so {path.name} is not written "
                          f"yet): finish it with dice_ray.resume({str(path.parent)!r}) (python -m "
                          f"dice_ray.simulate --resume {path.parent})")
    return InputError(f"{path} does not exist: {hint}")


def _left_off(run: Path, manifest: dict, enabled: str | None) -> bool:
    """Whether the config recorded in ``run``'s ``manifest`` sets the boolean field ``enabled`` (dotted) false;
    False where it cannot tell (no field given, a config that does not read)."""
    from dice_ray.config import read_recorded

    if enabled is None:
        return False
    try:
        value: Any = read_recorded(manifest["config"], f"run {str(run)!r}")
    except (InputError, KeyError, TypeError, ValueError):
        return False
    for part in enabled.split("."):
        value = getattr(value, part, None)
    return value is False


def measured(values: np.ndarray) -> bool:
    """Whether a column read by ``read_columns`` holds any value: not all null (float nulls read as NaN, others as
    None). A run with ``influence.ground_truth`` off writes its ``gt`` columns all null."""
    if values.dtype.kind == "f":
        return bool(len(values)) and not bool(np.isnan(values).all())
    return any(v is not None for v in values)


def read_frame(run: Path, name: str, hint: str, empty: str | None = None, enabled: str | None = None) -> pd.DataFrame:
    """Return table ``name`` of ``run`` as a DataFrame; a missing table is an ``InputError`` ending in ``hint``
    (``missing_table``, with ``enabled``), one without rows too where ``empty`` says what the run writes there."""
    path = run / f"{name}.parquet"
    if not path.is_file():
        raise missing_table(path, hint, enabled)
    return _with_rows(read_table(path), path, empty).to_pandas()


def recorded_config(run: Path) -> Any:
    """The ``RunConfig`` recorded in ``run``'s manifest, read without importing anything it names."""
    from dice_ray.config import read_recorded

    return read_recorded(read_manifest(run)["config"], f"run {str(run)!r}")


def recorded_topology(run: Path) -> tuple[Any, Any]:
    """(the run's recorded config, its topology), read without importing anything the config names. The topology
    is rebuilt from the config and the run's copy of its topology file (a run of an earlier version kept none: the
    file its config names is read again, a relative path from this folder), so it is checked against what the run
    recorded in ``nodes.parquet``: as many participants, the same in-degrees in W^0; else an ``InputError`` (a
    manifest or topology file changed since, or another file of that name here)."""
    from dice_ray.config import read_recorded
    from dice_ray.experiment import config_topology

    manifest = read_manifest(run)
    config = read_recorded(manifest["config"], f"run {str(run)!r}")
    kept = kept_topology_file(run, manifest)
    path = run / "nodes.parquet"
    if not path.is_file():
        return config, config_topology(config, kept)
    recorded = read_table(path).column("in_degree").to_numpy(zero_copy_only=False)
    if len(recorded) != config.nodes:
        raise InputError(f"{run}: manifest.json records {config.nodes} participants, nodes.parquet {len(recorded)}: "
                         "the run directory was changed")
    topology = config_topology(config, kept)
    if not np.array_equal(np.asarray(topology.adjacency(0).sum(axis=1)).ravel(), recorded):
        named = f" (read from {str(kept or config.topology.file)!r})" if config.topology.file else ""
        raise InputError(f"{run}: the communication graph rebuilt from its config{named} is not the one the run "
                         "trained on (nodes.parquet's in-degrees differ): its manifest or topology file changed, or "
                         "a relative path names another file from this folder")
    return config, topology
