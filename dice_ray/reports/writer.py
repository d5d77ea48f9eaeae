"""Write a computed report into a folder: its tables (atomically, with their schemas) and its figures (PNG)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import pandas as pd
import pyarrow as pa

from dice_ray.results import write_table_atomic

__all__ = ["Report", "write_frame", "write_report"]


class Report(Protocol):
    """What every report (``Alignment``, ``Cascade``, ``Detection``, ``Collaborators``, ``Contributions``) offers
    the writer."""

    def tables(self) -> dict[str, tuple[pd.DataFrame, pa.Schema]]: ...

    def figures(self) -> dict[str, Callable[[Path], None]]: ...


def write_frame(path: Path, frame: pd.DataFrame, schema: pa.Schema) -> None:
    """Write the columns of ``frame`` that ``schema`` names to ``path`` atomically; NaN and None become null."""
    write_table_atomic(path, {name: frame[name] for name in schema.names}, schema)


def write_report(report: Report, folder: str | Path) -> list[Path]:
    """Write ``report``'s tables (``<name>.parquet``) and figures into ``folder``; return the paths, tables first."""
    folder = Path(folder)
    written = []
    for name, (frame, schema) in report.tables().items():
        write_frame(folder / f"{name}.parquet", frame, schema)
        written.append(folder / f"{name}.parquet")
    for name, draw in report.figures().items():
        draw(folder / name)
        written.append(folder / name)
    return written
