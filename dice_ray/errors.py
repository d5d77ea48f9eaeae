"""The one exception type for bad user input.

Anything the user can get wrong (a config value, a file, a data folder) raises ``InputError`` with a
one-line message naming the problem; the command-line entry points print it and exit with status 2
before any work starts.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Literal, NoReturn


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop), raised in the main thread as Ctrl-C's ``KeyboardInterrupt`` is
    (``stops_on_sigterm``): a run or a sweep stops as an interrupted one, says how to resume, and resumes."""


class SigtermSeen:
    """Whether a SIGTERM came while ``stops_on_sigterm`` was on (a library that catches the ``Terminated`` it raised,
    as Ray Tune does, ends with a plain ``KeyboardInterrupt``)."""

    received = False


@contextlib.contextmanager
def stops_on_sigterm() -> Iterator[SigtermSeen]:
    """Within: SIGTERM raises ``Terminated`` in the main thread (elsewhere, where Python takes no signals, nothing
    changes); the earlier handler is put back after. Yields a ``SigtermSeen``."""
    seen = SigtermSeen()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def terminate(signum: int, frame: Any) -> None:
        seen.received = True
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)


class InputError(ValueError):
    """Invalid user input: the message is one line that names the bad option and its value."""


class NoTable(InputError, AttributeError):
    """A run directory without the table asked for (``Run.table``). An ``AttributeError`` too, so ``run.dice`` of a
    run without DICE answers ``hasattr`` and ``getattr(run, "dice", None)`` as a missing attribute does."""


def absent(path: str | os.PathLike, want: Literal["file", "folder"]) -> str:
    """How ``path``, which is not the ``want`` it should be, falls short: "does not exist", or what is there instead
    (a folder given for a file, a file for a folder), for the one line that names it."""
    if want == "file" and os.path.isdir(path):
        return "is a folder, not a file"
    if want == "folder" and os.path.isfile(path):
        return "is a file, not a folder"
    if os.path.exists(path):  # a device, a FIFO, a socket (/dev/null said "does not exist")
        return "is not a regular file" if want == "file" else "is not a folder"
    return "does not exist"


def first_line(err: BaseException, named: bool = False) -> str:
    """The first line of ``err``'s message (its type's name if it has none): what a one-line error quotes of it;
    ``named``: led by its type's name ("ValueError: ...")."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    return f"{type(err).__name__}: {lines[0]}" if named else lines[0]


def report(err: InputError) -> int:
    """Print ``err`` as the one ``error:`` line of a command-line entry point; return its exit status, 2."""
    print(f"error: {err}", file=sys.stderr)
    return 2


def unknown_name(what: str, value: str, names: Sequence[str], registry: bool) -> str:
    """The one line for a name that is not one of ``names``: the closest of them, or (``registry``: names a user may
    register) where a name of one's own comes from."""
    close = difflib.get_close_matches(value, names, n=1) or [n for n in names if n.lower() == str(value).lower()]
    hint = (f" (did you mean {close[0]!r}?)" if close else
            " (one you register is known once its module is imported: imports, --imports MODULE)" if registry else "")
    return f"{what} {value!r} is unknown; choose one of {', '.join(names)}{hint}"


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error:`` line and exit status 2, like ``InputError``. An
    option is given in full (argparse took ``--node 8`` for ``--nodes``, and would take a prefix a later option makes
    ambiguous): a prefix is an unrecognized option, with the one it is closest to."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}{self._hint(message)} (see --help)", file=sys.stderr)
        sys.exit(2)

    def _hint(self, message: str) -> str:
        """For an unrecognized option: the known one it is closest to, or where a registered method's flags come
        from."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        unknown = next((word.split("=")[0] for word in message.split()[2:] if word.startswith("--")), None)
        if unknown is None:
            return ""
        close = difflib.get_close_matches(unknown, list(self._option_string_actions), n=1)
        return (f"; did you mean {close[0]}?" if close else
                "; a registered method's options are flags once its module is imported (--imports MODULE)")
