"""What the reports read from a run directory: its tables and its recorded config, never importing what it names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dice_ray.errors import InputError, first_line
from dice_ray.results import TABLES, kept_topology_file
from dice_ray.rundir import read_json

NONEMPTY = ("rounds", "nodes")  # a finished run writes a row per participant (and round) into these
FINITE = {"rounds": ("train_loss",)}  # a run whose training loss is not finite stops as diverged: such a value was
# written by someone else (other float columns may hold NaN: a proximal score where an examiner has no z′, say)
PROBED = "a run with influence writes rows for every probe: the table was replaced"


def read_columns(run: Path, name: str, empty: str | None = None) -> dict[str, np.ndarray]:
    """Return table ``name`` of ``run`` as column name -> numpy array (nulls of float columns as NaN); a table
    without rows is an ``InputError`` ending in ``empty`` where given (what the run writes there)."""
    path = run / f"{name}.parquet"
    if not path.is_file():
        raise missing_table(path, "run the simulation with influence.enabled (--influence) first")
    table = _with_rows(read_table(path), path, empty)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def _with_rows(table: pa.Table, path: Path, empty: str | None) -> pa.Table:
    if empty is not None and table.num_rows == 0:
        raise InputError(f"{path} holds no rows: {empty}")
    return table


def read_table(path: Path) -> pa.Table:
    """The Parquet table at ``path`` (a run's table, named as in ``results.TABLES``), with every column its schema
    documents; a file cut short, not Parquet, without those columns, with text where numbers belong, without rows
    (``NONEMPTY``) or with a NaN where a run writes numbers (``FINITE``) is an ``InputError`` naming it."""
    try:
        table = plain(pq.read_table(path))
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"{path} is not a readable Parquet table ({first_line(err)}): it was cut short or "
                         "replaced") from None
    schema = TABLES.get(path.stem)
    missing = [] if schema is None else [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise InputError(f"{path} lacks column {missing[0]!r} of the {path.stem} table: it is not a dice-ray "
                         f"{path.stem} table of this version")
    for field in [] if schema is None else schema:  # the types the reports compute with, or one line
        column = table.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type)
            except pa.ArrowException:
                raise InputError(f"{path}: column {field.name!r} holds {column.type}, not {field.type}: it is not a "
                                 f"dice-ray {path.stem} table") from None
            table = table.set_column(table.schema.get_field_index(field.name), field.name, column)
    if path.stem in NONEMPTY and table.num_rows == 0:
        raise InputError(f"{path} holds no rows: a finished run writes one per participant"
                         f"{' and round' if path.stem == 'rounds' else ''}; the table was replaced")
    for name in FINITE.get(path.stem, ()):
        values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise InputError(f"{path}: column {name!r} holds {values[bad[0]]} in {len(bad)} of {len(values)} rows "
                             f"(first: row {bad[0]}); a run writes finite numbers there: the table was changed")
    return table


def plain(table: pa.Table) -> pa.Table:
    """``table`` without the pandas metadata a file may carry (dice-ray writes none): ``to_pandas`` follows it, and
    a crafted one (a dtype, an index) made the reports fail with IndexError or ValueError tracebacks."""
    kept = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
    return table.replace_schema_metadata(kept or None)


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


def read_manifest(run: Path) -> dict[str, Any]:
    """``run``'s manifest.json as a dict with its ``config`` a dict; missing or malformed: an ``InputError``."""
    path = run / "manifest.json"
    try:
        manifest = read_json(path)
    except FileNotFoundError:
        raise not_a_run(run) from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path} is not readable JSON ({type(err).__name__}: {first_line(err)[:120]}): it was cut "
                         "short or replaced") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise InputError(f"{path} is not a dice-ray manifest (no config section)")
    return manifest


def not_a_run(folder: Path) -> InputError:
    """The error for a folder without a manifest."""
    return InputError(f"{folder} is not a dice-ray run directory (no manifest.json): give the folder a simulation "
                      "wrote (its output.out, --out)")


def missing_table(path: Path, hint: str) -> InputError:
    """The error for a run's table ``path`` that does not exist: the run did not finish (its manifest says so: its
    tables are written at the end), else ``hint`` (the run was made without the method that writes the table)."""
    if not (path.parent / "manifest.json").exists():
        return not_a_run(path.parent)
    try:
        status = read_json(path.parent / "manifest.json").get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    if status not in (None, "complete"):
        return InputError(f"{path.parent} is not a complete run (status {status!r}, so {path.name} is not written "
                          f"yet): finish it with dice_ray.resume({str(path.parent)!r}) (python -m "
                          f"dice_ray.simulate --resume {path.parent})")
    return InputError(f"{path} does not exist: {hint}")


def measured(values: np.ndarray) -> bool:
    """Whether a column read by ``read_columns`` holds any value: not all null (float nulls read as NaN, others as
    None). A run with ``influence.ground_truth`` off writes its ``gt`` columns all null."""
    if values.dtype.kind == "f":
        return bool(len(values)) and not bool(np.isnan(values).all())
    return any(v is not None for v in values)


def read_frame(run: Path, name: str, hint: str, empty: str | None = None) -> pd.DataFrame:
    """Return table ``name`` of ``run`` as a DataFrame; a missing table is an ``InputError`` ending in ``hint``, one
    without rows too where ``empty`` says what the run writes there."""
    path = run / f"{name}.parquet"
    if not path.is_file():
        raise missing_table(path, hint)
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
