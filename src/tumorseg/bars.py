"""Progress bars that end their lines, so that a last line (an error, an interrupt, an epoch's
figures) stands on its own, in a terminal and in a log file."""

from __future__ import annotations

import sys


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
    return not sys.stderr.isatty()
