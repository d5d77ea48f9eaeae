"""Running dice-ray in a child process the way a user's terminal runs it, and never leaving one behind."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator


def as_in_a_terminal() -> None:
    """``preexec_fn`` for a child that a test stops with SIGINT: SIGINT back to its default handling, as a terminal's
    Ctrl-C finds it. A shell's background job (``pytest &`` without job control) starts with SIGINT ignored, its
    children inherit that, and Python then installs no ``KeyboardInterrupt`` handler: the run never stops."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def killed_if_left(process: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """The child is killed if it still runs when the block ends (a failed assertion, a timeout), so a failing test
    does not leave a run training on the machine's cores for the rest of the suite."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
