"""Checkpoints: the simulation state every K rounds, and the per-round tables up to it, on disk atomically.

A run directory holds, while a run is in progress::

    checkpoints/
      round-000049/                    the state after round 49: state.npz, driver.pkl, meta.json
      rounds-000000000-000000049.parquet    rows of rounds.parquet for rounds 0..49 (one part per interval)

The state is everything a later round reads: the participants' stacked states and optimizer states,
in global participant order (so a resume may use a different number of actors), the round counter, and
what the driver accumulates over rounds (the proximal-influence ledger, collaborator selection's graph).
Minibatches, time-varying W^t and misbehaviour are pure functions of (seed, participant, round), so no
random-generator state exists to save. A checkpoint directory is written under a temporary name and
renamed into place; the parts of the tables up to its round are written before it, so the newest
checkpoint always has every row it needs. When the run ends the parts become the final tables and the
directory is removed (unless ``output.keep_checkpoints``).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dice_ray.results import TableWriter, write_json_atomic, write_table_atomic

CHECKPOINTS = "checkpoints"

# Fields a resumed run may change: where and how it runs, never what it computes.
_PLACEMENT_FIELDS = {"engine": None,
                     "output": {"out", "progress", "overwrite", "checkpoint_every", "keep_checkpoints"}}


def config_digest(config: Any) -> str:
    """Return a digest of everything in ``config`` (a ``RunConfig``) that determines the numbers."""
    data = config.model_dump(mode="json")
    for section, fields in _PLACEMENT_FIELDS.items():
        if fields is None:
            data.pop(section, None)
        else:
            for name in fields:
                data.get(section, {}).pop(name, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    """A saved state: the participants after round ``round``."""

    round: int
    path: Path

    def load(self) -> dict[str, np.ndarray]:
        """Return the state arrays (``state`` [N, D] and ``opt.<name>``, global participant order)."""
        with np.load(self.path / "state.npz") as arrays:
            return {name: arrays[name] for name in arrays.files}

    def load_driver_state(self) -> Any:
        """Return the driver-side state saved with the participants' (None if there was none)."""
        path = self.path / "driver.pkl"
        return pickle.loads(path.read_bytes()) if path.exists() else None


class CheckpointStore:
    """The checkpoints of one run directory, newest ``keep`` kept."""

    def __init__(self, run_dir: str | Path, digest: str, keep: int = 2):
        self.root = Path(run_dir) / CHECKPOINTS
        self.digest = digest
        self.keep = keep

    def checkpoints(self) -> list[Checkpoint]:
        """Return the complete checkpoints, oldest first (temporary directories are not listed)."""
        if not self.root.is_dir():
            return []
        found = [Checkpoint(int(p.name.split("-")[1]), p) for p in self.root.glob("round-*")
                 if p.is_dir() and (p / "meta.json").exists()]
        return sorted(found, key=lambda c: c.round)

    def latest(self) -> Checkpoint | None:
        """Return the newest complete checkpoint, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    def check(self, checkpoint: Checkpoint) -> None:
        """Raise ``ValueError`` if ``checkpoint`` was written by a run with a different config."""
        meta = json.loads((checkpoint.path / "meta.json").read_text())
        if meta.get("config_digest") != self.digest:
            raise ValueError(f"checkpoint {checkpoint.path} belongs to a different config (digest "
                             f"{meta.get('config_digest')}, this run {self.digest})")

    def save(self, round_: int, snapshot: Mapping[str, np.ndarray], driver_state: Any = None) -> Checkpoint:
        """Write the state after round ``round_`` atomically, with ``driver_state`` (picklable: what the driver
        accumulates over rounds, e.g. the proximal-influence ledger); drop checkpoints beyond the newest
        ``keep``."""
        bad = np.flatnonzero(~np.isfinite(snapshot["state"]).all(axis=1))
        if len(bad):  # never replace a good checkpoint with a poisoned one
            raise FloatingPointError(f"round {round_}: non-finite parameters at participants {bad[:5].tolist()}")
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"round-{round_:06d}"
        tmp = self.root / f".tmp-round-{round_:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with open(tmp / "state.npz", "wb") as f:
            np.savez(f, **snapshot)
        if driver_state is not None:
            (tmp / "driver.pkl").write_bytes(pickle.dumps(driver_state))
        write_json_atomic(tmp / "meta.json", {"round": round_, "config_digest": self.digest, "time": time.time(),
                                              "shapes": {k: list(v.shape) for k, v in snapshot.items()}})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old.path, ignore_errors=True)
        return Checkpoint(round_, final)

    def remove_after(self, round_: int) -> None:
        """Delete checkpoints newer than ``round_`` (they belong to rounds a resume recomputes)."""
        for c in self.checkpoints():
            if c.round > round_:
                shutil.rmtree(c.path, ignore_errors=True)


class RoundTables:
    """Tables with a ``round`` column, written as parts under ``checkpoints/`` until the run ends.

    ``append`` buffers rows; ``commit(t)`` writes the buffered rows (rounds ≤ t) as one part;
    ``rollback(t)`` forgets every row after round t, buffered or in parts (after a failure, or on resume);
    ``finish()`` joins the parts into the final tables in the run directory, each written atomically.
    """

    def __init__(self, run_dir: str | Path, schemas: Mapping[str, pa.Schema]):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.schemas = dict(schemas)
        self.pending: dict[str, dict[str, list]] = {name: {} for name in self.schemas}

    def _parts(self, name: str) -> list[tuple[int, int, Path]]:
        parts = []
        for p in self.root.glob(f"{name}-*-*.parquet"):
            first, last = (int(v) for v in p.stem.rsplit("-", 2)[1:])
            parts.append((first, last, p))
        return sorted(parts)

    def append(self, name: str, columns: Mapping[str, Any]) -> None:
        """Buffer rows of table ``name`` (column name -> values, every schema column)."""
        buffer = self.pending[name]
        for key, values in columns.items():
            buffer.setdefault(key, []).extend(values)

    def buffered_rows(self) -> int:
        """Return the number of rows buffered in memory (all tables)."""
        return sum(len(b.get("round", [])) for b in self.pending.values())

    def commit(self, round_: int) -> None:
        """Write the buffered rows of every table (all of rounds ≤ ``round_``) as parts, atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        for name, buffer in self.pending.items():
            if buffer.get("round"):
                first = min(buffer["round"])
                write_table_atomic(self.root / f"{name}-{first:09d}-{round_:09d}.parquet", buffer, self.schemas[name])
            self.pending[name] = {}

    def rollback(self, round_: int) -> None:
        """Forget every row of a round after ``round_``: buffered rows, and rows in parts (parts reaching past
        ``round_`` are cut back to it, atomically)."""
        for name, buffer in self.pending.items():
            keep = [i for i, t in enumerate(buffer.get("round", [])) if t <= round_]
            self.pending[name] = {key: [values[i] for i in keep] for key, values in buffer.items()}
        if not self.root.is_dir():
            return
        for name in self.schemas:
            for first, last, path in self._parts(name):
                if first > round_:
                    path.unlink()
                elif last > round_:
                    table = pq.read_table(path)
                    table = table.filter(pc.less_equal(table["round"], round_))
                    write_table_atomic(self.root / f"{name}-{first:09d}-{round_:09d}.parquet", table.to_pydict(),
                                       self.schemas[name])
                    path.unlink()

    def read(self, name: str) -> pa.Table:
        """Return the committed rows of ``name`` (parts in round order)."""
        parts = [pq.read_table(p, schema=self.schemas[name]) for *_, p in self._parts(name)]
        return pa.concat_tables(parts) if parts else self.schemas[name].empty_table()

    def finish(self, last_round: int) -> None:
        """Commit what is buffered and write each table, from its parts, to ``<run_dir>/<name>.parquet``, in
        the order of ``schemas`` (name the table whose presence marks a finished run last)."""
        self.commit(last_round)
        for name, schema in self.schemas.items():
            with TableWriter(self.run_dir / f"{name}.parquet", schema) as writer:
                for *_, path in self._parts(name):
                    writer.write(pq.read_table(path, schema=schema).to_pydict())
