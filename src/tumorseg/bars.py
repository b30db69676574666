"""Progress bars that end their lines, so that a last line (an error, an interrupt, an epoch's
figures) stands on its own, in a terminal and in a log file, and that in a log file update once a
minute rather than ten times a second."""

from __future__ import annotations

import os
import sys
from typing import Any

LOG_INTERVAL_S = 60.0  # seconds between a bar's updates in a log file: tqdm's 0.1 s would write a line per step


def progress_bar(iterable: Any = None, **options: Any) -> Any:
    """A tqdm bar (`options`: tqdm's); in a log file (`in_log_file`) it updates every
    `LOG_INTERVAL_S`, for the command and the Python API alike. `TQDM_MININTERVAL`, where set, wins."""
    from tqdm import tqdm  # not at import: `tumorseg --help` stays instant

    if in_log_file() and "TQDM_MININTERVAL" not in os.environ:
        options.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, **options)


def in_log_file() -> bool:
    """Whether the bars' stream, stderr, goes to a file or a pipe (nohup, SLURM, `2> log`): not a
    terminal, and not a Jupyter kernel's cell, where a bar redraws in place as in a terminal."""
    return sys.stderr is not None and not _terminal() and "ipykernel" not in sys.modules


def end_bars() -> None:
    """Close the progress bars an error or interrupt left open, before the line that says so:
    their own close, at garbage collection, would come after it."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)  # no bar where tqdm was never imported
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def leave_in_log() -> bool:
    """`leave` for a bar that goes once done: in a terminal it is cleared, while in a log file its
    last state stays and ends its line. A bar cleared in a log file leaves a carriage return that
    the next line would follow on the same line."""
    return not _terminal()


def _terminal() -> bool:
    """Whether stderr is a terminal; a stream a program put there may have no `isatty` (a logger's
    adapter with `write` alone)."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (OSError, ValueError):  # closed
        return False
