"""The lines tumorseg writes for people (notes, warnings, a run's progress) go through the
`tumorseg` logger, so a program using the Python API can quiet them
(`logging.getLogger("tumorseg").setLevel(logging.WARNING)`, before or after importing tumorseg,
leaves warnings and errors) or take them (`LOGGER.handlers.clear(); LOGGER.propagate = True` after
importing `LOGGER` from here). By default each line is written to stderr as it is, with no level or
time: the command's lines."""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("tumorseg")
LEVELS: dict[str, int] = {"warning:": logging.WARNING, "error:": logging.ERROR}  # else INFO


class StderrLines(logging.Handler):
    """Each message alone on the stderr of the moment (a test's capture, a notebook's cell), through
    tqdm where it is loaded, so an open progress bar is drawn again below the line, not cut by it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
            if tqdm is not None:
                tqdm.write(line, file=sys.stderr)
            else:
                sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's own rule: a failed write is reported, never raised
            self.handleError(record)


if not any(isinstance(h, StderrLines) for h in LOGGER.handlers):  # once, however often this is imported
    LOGGER.addHandler(StderrLines())
    if LOGGER.level == logging.NOTSET:  # a level the program set before importing tumorseg stays
        LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False  # a root handler the program set up would write each line twice


def say(line: str) -> None:
    """Write `line` for people: a warning or an error where it says so ("warning: ...", "error:
    ..."), else a note or a step of the run (INFO)."""
    # logging.config's dictConfig and fileConfig disable the loggers made before them by default,
    # which would drop even the errors without a trace: the way to quiet tumorseg is its level
    LOGGER.disabled = False
    level = next((lvl for prefix, lvl in LEVELS.items() if line.startswith(prefix)), logging.INFO)
    LOGGER.log(level, line)
