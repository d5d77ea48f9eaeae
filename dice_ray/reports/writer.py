"""Write a computed report into a folder: its tables (atomically, with their schemas) and its figures (PNG)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import pandas as pd
import pyarrow as pa

from dice_ray.results import write_table_atomic
from dice_ray.rundir import check_can_make

__all__ = ["AsWritten", "Report", "write_frame", "write_report"]


class Report(Protocol):
    """What every report (``Alignment``, ``Cascade``, ``Detection``, ``Collaborators``, ``Contributions``) offers
    the writer."""

    def tables(self) -> dict[str, tuple[pd.DataFrame, pa.Schema]]: ...

    def figures(self) -> dict[str, Callable[[Path], None]]: ...


class AsWritten:
    """Base of a report dataclass: its tables (``tables()``) hold the columns their schemas name as the written
    file reads back with ``pd.read_parquet``: integers of the schema's width, None as NaN in float columns (a report
    returned by the Python API is the table ``python -m dice_ray.analyze`` writes). Other columns are left as built."""

    def tables(self) -> dict[str, tuple[pd.DataFrame, pa.Schema]]:
        raise NotImplementedError

    def __post_init__(self) -> None:
        for frame, schema in self.tables().values():
            for field in schema:
                if field.name in frame:
                    read = pa.array(frame[field.name], type=field.type, from_pandas=True).to_pandas()
                    frame[field.name] = read.set_axis(frame.index)


def write_frame(path: Path, frame: pd.DataFrame, schema: pa.Schema) -> None:
    """Write the columns of ``frame`` that ``schema`` names to ``path`` atomically; NaN and None become null."""
    write_table_atomic(path, {name: frame[name] for name in schema.names}, schema)


def write_report(report: Report, folder: str | Path) -> list[Path]:
    """Write ``report``'s tables (``<name>.parquet``) and figures into ``folder``; return the paths, tables first.
    A folder that cannot be written is an ``InputError`` (a run received read-only), before any file."""
    folder = Path(folder)
    check_can_make(folder, f"folder {str(folder)!r}", "the report writes there: copy the run somewhere writable")
    written = []
    for name, (frame, schema) in report.tables().items():
        write_frame(folder / f"{name}.parquet", frame, schema)
        written.append(folder / f"{name}.parquet")
    for name, draw in report.figures().items():
        draw(folder / name)
        written.append(folder / name)
    return written
