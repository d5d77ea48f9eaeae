"""Checkpoints: the simulation state every K rounds, and the per-round tables up to it, on disk atomically.

A run directory holds, while a run is in progress::

    checkpoints/
      round-000049/                    the state after round 49: state.npz, driver.npz, meta.json (SHA-256s)
      rounds-000000000-000000049.parquet    rounds.parquet's rows, rounds 0..49 (a part per interval; more if it fills)

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
import os
import queue
import re
import shutil
import sys
import threading
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dice_ray.errors import first_line
from dice_ray.results import TableWriter, write_json_atomic, write_table_atomic
from dice_ray.rundir import MANIFEST, read_json

CHECKPOINTS = "checkpoints"
PART = r"-(\d{9})-(\d{9})"  # a part's name: <table>-<first round>-<last round>.parquet
WRITE_BYTES = 1 << 24  # a checkpoint's arrays go to the file (and to its digest) in pieces of about 16 MiB

# Fields left out of the config digest: placement and output, not the simulated numbers (what a resumed run may change
# is ``config.RESUME_FIELDS``). Of the engine section only ``precision`` changes the numbers: it enters the digest
# unless it is the default fp32 (so the digests of runs recorded before it counted, all fp32, stay what they were).
_PLACEMENT_FIELDS = {"engine": None,
                     "output": {"out", "progress", "overwrite", "checkpoint_every", "keep_checkpoints"}}
_NUMBERS_FIELDS = {"engine": {"precision": "fp32"}}  # section -> field -> the value left out of the digest
# Fields hashed as their default whatever their value: where the records go, not the numbers. They counted once (a
# resume does not take a received run's MLflow URI, ``config.forget_tracking_uri``), so the digests of runs that
# kept the default stay what they were, and ``CheckpointStore.check`` takes checkpoints hashed with them counted.
_UNCOUNTED_FIELDS = {"output": {"tracking_uri": None}}


def config_digest(config: Any) -> str:
    """Return a digest of everything in ``config`` (a ``RunConfig``) that determines the numbers."""
    return _digest(config.recorded())


def _digest(data: dict[str, Any], counted: bool = False) -> str:
    """The digest of a recorded config ``data`` (as ``RunConfig.recorded`` writes it; changed in place), with the
    fields of ``_UNCOUNTED_FIELDS`` counted as earlier versions counted them (``counted``) or not."""
    kept = {section: {name: data.get(section, {}).get(name, default) for name, default in fields.items()}
            for section, fields in _NUMBERS_FIELDS.items()}
    for section, fields in _PLACEMENT_FIELDS.items():
        if fields is None:
            data.pop(section, None)
        else:
            for name in fields:
                data.get(section, {}).pop(name, None)
    for section, fields in kept.items():
        changed = {name: value for name, value in fields.items() if value != _NUMBERS_FIELDS[section][name]}
        if changed:
            data.setdefault(section, {}).update(changed)
    for section, fields in ({} if counted else _UNCOUNTED_FIELDS).items():
        if isinstance(data.get(section), dict):
            data[section].update({name: value for name, value in fields.items() if name in data[section]})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    """A saved state: the participants after round ``round``."""

    round: int
    path: Path

    def _arrays(self, name: str) -> dict[str, np.ndarray]:
        """The arrays of ``name``: plain arrays (never a pickle: a checkpoint never runs code), stored uncompressed as
        ``np.savez`` stores them (a compressed member could inflate without bound); an array whose header asks for
        more memory than there is is a ``ValueError`` too."""
        self._plain_arrays(name)
        try:
            with np.load(self.path / name, allow_pickle=False) as arrays:
                return {key: arrays[key] for key in arrays.files}
        except MemoryError as err:
            raise ValueError(f"an array's header asks for more memory than there is ({str(err)[:80]})") from None

    def _plain_arrays(self, name: str) -> None:
        """Raise ``ValueError`` unless every member of ``name`` is an uncompressed ``.npy`` array of numbers whose
        size is the one its header gives: read from the headers, without loading the arrays (a whole state: at N =
        16,384 a verify that loaded it took 2.2 GB and a second more)."""
        with zipfile.ZipFile(self.path / name) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError("it has compressed members; dice-ray stores its arrays uncompressed")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version not in ((1, 0), (2, 0)):
                        raise ValueError(f"{info.filename} is a .npy file of version {version}, not 1.0 or 2.0")
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                        else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(member)
                    if dtype.hasobject:
                        raise ValueError(f"{info.filename} holds Python objects, not numbers")
                    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != info.file_size - member.tell():
                        raise ValueError(f"{info.filename}'s size is not the one its header gives")

    def load(self) -> dict[str, np.ndarray]:
        """Return the state arrays (``state`` [N, D], ``opt.<name>`` and the hooks' arrays, global order)."""
        return self._arrays("state.npz")

    def load_driver_state(self) -> dict[str, np.ndarray] | None:
        """Return the methods' driver state saved with the participants' (arrays; None if there was none)."""
        return self._arrays("driver.npz") if (self.path / "driver.npz").exists() else None

    def verify(self) -> str | None:
        """Return why this checkpoint cannot be trusted (a file missing, its SHA-256 not the one recorded in
        ``meta.json``, which is written last, or not plain arrays), or None if every file is intact."""
        try:
            meta = read_json(self.path / "meta.json")
            digests = meta["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return "meta.json is unreadable or records no digests"
        if meta.get("round") != self.round:  # a renamed folder would make a resume skip or redo rounds
            return f"its folder names round {self.round}, its meta.json round {meta.get('round')!r}"
        if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
            return "meta.json records its digests wrongly"
        loaded = ["state.npz", *(["driver.npz"] if (self.path / "driver.npz").exists() else [])]
        unlisted = [name for name in loaded if name not in digests]
        if unlisted:  # what a resume loads is never unchecked
            return f"meta.json records no digest of {unlisted[0]}"
        for name, digest in digests.items():
            path = self.path / name
            if not path.is_file():
                return f"{name} is missing"
            if _sha256(path) != digest:
                return f"{name} does not match its recorded SHA-256"
            try:
                self._plain_arrays(name)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:  # pickles: refused, never unpickled
                return f"{name} is not a file of plain arrays ({first_line(err)[:120]})"
        parts = meta.get("parts", {})  # the table rows up to this round (``RoundTables``' parts beside it)
        if not isinstance(parts, dict):
            return "meta.json records its table parts wrongly"
        for name, digest in parts.items():
            path = self.path.parent / str(name)
            if not path.is_file():
                return f"the table part {name} (rows up to this round) is missing"
            if _sha256(path) != digest:
                return f"the table part {name} (rows up to this round) does not match its recorded SHA-256"
        if "parts" in meta:  # (a checkpoint of an earlier version listed none) every part of rows up to this round is
            for path in sorted(self.path.parent.glob("*-*-*.parquet")):  # one it lists: another would add its rows
                rounds = re.fullmatch(rf"(.+){PART}", path.stem)
                if rounds and int(rounds[2]) <= self.round and path.name not in parts:
                    return f"the table part {path.name} (rows up to this round) is not one it recorded"
        return None


class Rows:
    """An array given as blocks of its rows (axis 0), joined only if read as a whole: the Ray engine's groups return
    their rows of a snapshot, and ``CheckpointStore.save`` writes them one after another into the checkpoint, never
    concatenated in the driver's memory (at N = 4,096 that was one more state there, and 0.14 s a checkpoint)."""

    def __init__(self, parts: Sequence[np.ndarray]):
        parts = [np.asarray(p) for p in parts]
        tails = {p.shape[1:] for p in parts}
        if not parts or min(p.ndim for p in parts) == 0 or len(tails) > 1:
            raise ValueError(f"row blocks must be arrays of one shape past their first axis, not {sorted(tails)}")
        self.parts = parts
        self.dtype = np.result_type(*parts)
        self.shape = (sum(len(p) for p in parts), *parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        joined = np.concatenate(self.parts)
        return joined if dtype is None else joined.astype(dtype, copy=False)


def row_blocks(array: np.ndarray | Rows) -> list[np.ndarray]:
    """The row blocks of ``array``: a ``Rows``'s parts, a plain array's itself."""
    return array.parts if isinstance(array, Rows) else [np.asarray(array)]


class _Hashed:
    """A write-only stream over an open binary ``file`` that computes the SHA-256 of what passes through it in a
    second thread, while the first goes on writing (hashlib and the file's writes release the GIL). It can neither
    seek nor tell, so ``zipfile`` writes each member's sizes after its data instead of seeking back over bytes
    already hashed. What ``write`` is given must not change until ``digest`` returns."""

    def __init__(self, file: Any):
        self.file = file
        self._sha = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._hash, name="checkpoint-sha256", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                self._sha.update(data)
            except BaseException as err:  # noqa: BLE001 (raised again by ``digest`` in the writing thread)
                self._failed = err

    def write(self, data: Any) -> int:
        written = self.file.write(data)
        self._queue.put(data)
        return written

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        """Stop the hashing thread (also after a failed write); ``digest`` then has every byte written."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def digest(self) -> str:
        self.close()
        if self._failed is not None:
            raise self._failed
        return self._sha.hexdigest()


def write_arrays(path: Path, arrays: Mapping[str, np.ndarray | Rows], finite: str | None = None) -> str:
    """Write ``arrays`` (plain arrays or ``Rows``) to ``path`` as ``np.savez`` stores them (a zip of uncompressed
    ``.npy`` members, which ``np.load`` reads), fsynced, and return the file's SHA-256, computed while it is written
    instead of reading the file again (that took 0.4 s of a 1 s checkpoint at N = 4,096). Arrays of Python objects
    are refused (a checkpoint holds no pickle). With ``finite``, raise ``FloatingPointError`` with the indices of
    the rows of ``arrays[finite]`` that hold a value that is not finite, checked as they are written."""
    bad: list[np.ndarray] = []
    with open(path, "wb") as file:
        stream = _Hashed(file)
        try:
            with zipfile.ZipFile(stream, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for name, array in arrays.items():
                    blocks = row_blocks(array)
                    dtype = np.result_type(*blocks)
                    if dtype.hasobject:
                        raise ValueError(f"{name} holds Python objects; a checkpoint holds arrays of numbers")
                    shape = (sum(len(b) for b in blocks), *blocks[0].shape[1:]) if blocks[0].ndim else ()
                    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array_header_1_0(member, {
                            "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
                        first = 0
                        for block in blocks:
                            block = np.ascontiguousarray(block, dtype)  # (a 0-d array as one row)
                            step = max(1, WRITE_BYTES // max(block[:1].nbytes, 1))
                            for a in range(0, len(block), step):
                                rows = block[a: a + step]
                                if name == finite:
                                    bad.append(first + a + np.flatnonzero(
                                        ~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)))
                                member.write(rows.data)
                            first += len(block)
                    if name == finite and sum(len(b) for b in bad):
                        raise FloatingPointError(
                            f"non-finite parameters at participants {np.concatenate(bad)[:5].tolist()}")
            file.flush()
            os.fsync(file.fileno())
        finally:
            stream.close()
    return stream.digest()


def _sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path``, hashed once per version of the file in a process (``_HASHED``)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key in _HASHED:
        return _HASHED[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > RACY_NS:
        if len(_HASHED) >= 100:
            del _HASHED[next(iter(_HASHED))]
        _HASHED[key] = h.hexdigest()
    return h.hexdigest()


# The digests of files hashed in this process, by the file's path and version (inode, size, modification and change
# times: a write changes the change time, which no user call sets back). A resume checks the newest checkpoint, then
# the run that resumes checks it again: a second hash of an unchanged 2 GB state cost a second more. A file changed
# less than RACY_NS before it was looked at is not kept: file times tick coarsely (a few ms), so a write in the
# same tick would leave them as they were. The newest hundred are kept.
_HASHED: dict[tuple, str] = {}
RACY_NS = 2_000_000_000


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                 if re.fullmatch(r"round-\d+", p.name) and p.is_dir() and (p / "meta.json").exists()]
        return sorted(found, key=lambda c: c.round)

    def latest(self, warn: bool = True) -> Checkpoint | None:
        """Return the newest checkpoint whose files verify (``Checkpoint.verify``), or None; each newer one that
        does not is skipped with a one-line warning (``warn``: a second look says nothing new)."""
        for checkpoint in reversed(self.checkpoints()):
            problem = checkpoint.verify()
            if problem is None:
                return checkpoint
            if warn:
                print(f"warning: skipping checkpoint {checkpoint.path}: {problem}", file=sys.stderr)
        return None

    def check(self, checkpoint: Checkpoint) -> None:
        """Raise ``ValueError`` if ``checkpoint`` was written by a run with a different config. A checkpoint an
        earlier version wrote, whose digest counted ``_UNCOUNTED_FIELDS``, is taken if it matches the run's recorded
        config counted so (its manifest: the config this run resumes)."""
        meta = read_json(checkpoint.path / "meta.json")
        found = meta.get("config_digest")
        if found != self.digest and found != self._counted_digest():
            raise ValueError(f"checkpoint {checkpoint.path} belongs to a different config (digest "
                             f"{meta.get('config_digest')}, this run {self.digest})")

    def _counted_digest(self) -> str | None:
        """The digest of the run's recorded config with ``_UNCOUNTED_FIELDS`` counted (None: no manifest)."""
        try:
            data = read_json(self.root.parent / MANIFEST)["config"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return _digest(data, counted=True) if isinstance(data, dict) else None

    def save(self, round_: int, snapshot: Mapping[str, np.ndarray | Rows],
             driver_state: Mapping[str, np.ndarray] | None = None, parts: Mapping[str, str] | None = None
             ) -> Checkpoint:
        """Write the state after round ``round_`` atomically, with ``driver_state`` (arrays: what the methods'
        drivers accumulate over rounds); drop checkpoints beyond the newest ``keep``. ``snapshot``'s arrays may be
        ``Rows`` (the groups' blocks, written one after another). Every file is fsynced, and ``meta.json`` with
        their SHA-256 digests is written last, before the directory is renamed into place, with the digests of the
        table ``parts`` committed up to this round (``RoundTables.part_digests``): a resume from it needs them
        intact. A state with a parameter that is not finite raises ``FloatingPointError`` and replaces nothing."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"round-{round_:06d}"
        tmp = self.root / f".tmp-round-{round_:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = {"state.npz": snapshot}
        if driver_state:
            files["driver.npz"] = driver_state
        digests = {}
        try:
            for name, arrays in files.items():
                digests[name] = write_arrays(tmp / name, arrays, finite="state" if name == "state.npz" else None)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, FloatingPointError):  # never replace a good checkpoint with a poisoned one
                raise FloatingPointError(f"round {round_}: {err}") from None
            raise
        write_json_atomic(tmp / "meta.json", {"round": round_, "config_digest": self.digest, "time": time.time(),
                                              "shapes": {k: list(v.shape) for k, v in snapshot.items()},
                                              "sha256": digests, "parts": dict(parts or {})})
        _fsync(tmp / "meta.json")
        _fsync(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync(self.root)
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
        self._digests: dict[tuple[str, int, int], str] = {}  # (part name, size, mtime) -> SHA-256: each hashed once

    def _parts(self, name: str) -> list[tuple[int, int, Path]]:
        """The committed parts of table ``name``: (first round, last round, path), in round order (files named
        otherwise are not this store's and are left alone)."""
        parts = []
        for p in self.root.glob(f"{name}-*-*.parquet"):
            rounds = re.fullmatch(rf"{re.escape(name)}{PART}", p.stem)
            if rounds:
                parts.append((int(rounds[1]), int(rounds[2]), p))
        return sorted(parts)

    def written(self) -> set[str]:
        """The tables that have parts (any name, the schemas' or not)."""
        return {m[1] for p in self.root.glob("*-*-*.parquet") if (m := re.fullmatch(rf"(.+){PART}", p.stem))}

    def part_digests(self) -> dict[str, str]:
        """The SHA-256 of every committed part (file name -> digest), for the checkpoint saved with them. A part is
        never rewritten under its name (a rollback writes a new one), so each is hashed once."""
        out = {}
        for name in self.schemas:
            for *_, path in self._parts(name):
                stat = path.stat()
                key = (path.name, stat.st_size, stat.st_mtime_ns)
                if key not in self._digests:
                    self._digests[key] = _sha256(path)
                out[path.name] = self._digests[key]
        return out

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
        return self.committed(name) or self.schemas[name].empty_table()

    def committed(self, name: str) -> pa.Table | None:
        """The committed rows of ``name`` (parts in round order; read with its schema if ``schemas`` has one), None
        without a part."""
        parts = [pq.read_table(p, schema=self.schemas.get(name)) for *_, p in self._parts(name)]
        return pa.concat_tables(parts) if parts else None

    def finish(self, last_round: int) -> None:
        """Commit what is buffered and write each table, from its parts, to ``<run_dir>/<name>.parquet``, in
        the order of ``schemas`` (name the table whose presence marks a finished run last)."""
        self.commit(last_round)
        for name, schema in self.schemas.items():
            with TableWriter(self.run_dir / f"{name}.parquet", schema) as writer:
                for *_, path in self._parts(name):
                    writer.write_table(pq.read_table(path, schema=schema))
