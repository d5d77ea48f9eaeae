"""One writer per run (or sweep) directory: an OS-level lock held for as long as a process writes it.

``DirectoryLock`` takes ``fcntl.flock`` on ``<dir>/.lock`` and writes who holds it (pid, host, since, command)
into that file. A second ``simulate --out``/``--resume`` or ``sweep --resume`` on a live directory is refused
at once with one line naming the holder, before it touches anything. The kernel releases the lock when its
process ends, however it ends (a SIGKILL too), so a lock left by a killed process never blocks a resume; the
file stays, as a record of the last writer.

A run directory may come from someone else: what dice-ray reads of one it reads here, as plain data (``read_json``,
``read_manifest``, ``read_table``), never unpickling or importing anything it names, and a link or special file in
one is refused (``refuse_links``).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import platform
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dice_ray.errors import InputError, first_line
from dice_ray.results import TABLES

LOCK = ".lock"
MANIFEST = "manifest.json"  # a run's record (``runner.Manifest``): what makes a folder a run directory
NONEMPTY = ("rounds", "nodes")  # a finished run writes a row per participant (and round) into these
FINITE = {"rounds": ("train_loss",)}  # a run whose training loss is not finite stops as diverged: such a value was
# written by someone else (other float columns may hold NaN: a proximal score where an examiner has no z′, say)


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']} (since {holder['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def check_can_make(path: Path, what: str, hint: str = "") -> None:
    """Refuse, before any work, a folder ``path`` that cannot be made or written: its nearest existing ancestor (or
    itself) is not a directory, is not writable (a read-only file system too, for root as well), or refuses a folder
    made and removed in it (what access() cannot tell: a pseudo file system such as /proc). ``what`` names it in the
    error (e.g. "--out 'runs/x'"); ``hint`` follows it."""
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    problem = None
    if not existing.is_dir():
        problem = f"{str(existing)!r} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{str(existing)!r} is not writable"
    else:
        try:
            with tempfile.TemporaryDirectory(dir=existing):
                pass
        except OSError as err:
            problem = f"cannot make a folder in {str(existing)!r} ({err.strerror or err})"
    if problem:
        raise InputError(f"{what}: {problem}{f'; {hint}' if hint else ''}")


JSON_LIMIT = 64 * 2**20  # bytes: a manifest, a checkpoint's meta.json or a trial's result.json is far smaller


def read_json(path: Path) -> Any:
    """The JSON document at ``path``, in a directory that may come from someone else: a regular file (a FIFO would
    block, /dev/zero never end) of at most ``JSON_LIMIT`` bytes, nested shallowly enough to parse (deep nesting is a
    RecursionError); else ``ValueError`` naming the problem (``OSError`` where it cannot be read)."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path.name} is not a regular file")
    if info.st_size > JSON_LIMIT:
        raise ValueError(f"{path.name} holds {info.st_size} bytes, more than any dice-ray writes")
    try:
        return json.loads(path.read_text())
    except RecursionError:
        raise ValueError(f"{path.name} is nested too deeply to be one dice-ray writes") from None


def refuse_links(directory: Path, what: str = "run directory") -> None:
    """Refuse (``InputError``) a ``directory`` holding, at any depth, a symbolic link or a special file (a FIFO, a
    device): dice-ray writes neither, and through one a directory received from someone else would make a resume
    write (or delete, or read, or wait) outside it. The directory itself may be a link (a user's own ``--out``)."""
    for root, folders, files in os.walk(directory):  # never descends into a linked folder
        for name in [*folders, *files]:
            path = Path(root) / name
            try:
                mode = path.lstat().st_mode
            except FileNotFoundError:  # removed since it was listed (a live run's checkpoint rotation)
                continue
            if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file or folder"
                raise InputError(f"{what} {str(directory)!r}: {path} is {kind}; dice-ray writes none, and a directory "
                                 "received from someone else could make it write elsewhere through one: replace it "
                                 "with a copy of what it points to, or remove it")


class DirectoryLock:
    """The write lock of ``directory`` (``what`` names it in the error: "run directory", "sweep directory")."""

    def __init__(self, directory: str | Path, what: str = "run directory"):
        self.directory, self.what = Path(directory), what
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK

    def holder(self) -> str | None:
        """Who writes the directory now ("pid … on … (since …)"), or None if nobody does. Creates nothing."""
        if not self.path.is_file():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(self.path.read_text(errors="replace"))
        finally:
            os.close(fd)  # also drops the shared lock just taken
        return None

    def check(self) -> None:
        """Raise ``InputError`` if another process writes the directory, or if it holds a link or a special file
        (``refuse_links``): the check every writer makes before it starts, and again as it takes the lock."""
        if self.directory.is_dir():
            refuse_links(self.directory, self.what)
        holder = self.holder()
        if holder is not None:
            raise InputError(f"{self.what} {str(self.directory)!r} is being written by {holder}; wait for it to "
                             "finish or stop it first")

    def acquire(self) -> DirectoryLock:
        """Take the lock (creating the directory if needed) or raise ``InputError`` naming the holder."""
        self.check()
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.check()  # raced with another writer: name it
            raise InputError(f"{self.what} {str(self.directory)!r} is being written by another process") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": platform.node(), "argv": sys.argv,
                                 "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


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


def read_manifest(run: Path) -> dict[str, Any]:
    """``run``'s manifest.json as a dict with its ``config`` a dict; missing or malformed: an ``InputError``."""
    path = run / MANIFEST
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
