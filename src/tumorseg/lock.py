"""One tumorseg run per output folder: a lock file naming the process that holds the folder.

Two runs writing into one folder (two `prepare`, two `train` into one run folder) would
interleave their files and each trust the other's half-written state; the second is refused
with one line naming the first. A lock left behind by a killed process (SIGKILL, a crash, a
power cut) is recognised by its pid being gone on this host and taken over. The holder touches
its lock every minute; one untouched for `STALE_AFTER_S` is taken over too, wherever it was
written (a container's or a requeued job's former host, a pid since reused).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from .errors import TumorsegError
from .log import say
from .write_failure import write_failure

LOCK_NAME = ".tumorseg.lock"
UNREADABLE_GRACE_S = 5.0
HEARTBEAT_S = 60.0  # how often a holder touches its lock
STALE_AFTER_S = 15 * 60.0  # a lock untouched this long has no live holder anywhere


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> str:
    """A lock's text; bytes that are no UTF-8 (a damaged file) read as replacement characters: unreadable."""
    return path.read_bytes().decode("utf-8", "replace")


def _holder(text: str) -> dict | None:
    """A lock's content, or None when it is unreadable (then nobody can prove they hold it)."""
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _started_at(pid: int) -> float | None:
    """When process `pid` started (s since the epoch; Linux's /proc), None where that is unknown."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _dead(holder: dict | None, path: Path) -> bool:
    """Whether the lock's process is gone. An unreadable lock counts as dead unless it is a few
    seconds old: then its run may be between creating it and writing its content. On this host
    the process itself tells (gone, or its pid now another process's, started after the lock), so
    a live holder that stopped touching its lock (suspended: Ctrl-Z, SIGSTOP) keeps it; a lock of
    another host (or of this one under a former container name) is gone once left untouched."""
    untouched = time.time() - path.stat().st_mtime
    if holder is None:
        return untouched > UNREADABLE_GRACE_S
    if holder.get("host") == socket.gethostname():
        started = _started_at(holder["pid"])
        reused = started is not None and started > float(holder.get("started", 0)) + 1.0
        return not pid_alive(holder["pid"]) or reused
    return untouched > STALE_AFTER_S


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "another tumorseg run (its lock is being written or unreadable)"
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder.get("started", 0)))
    return f"tumorseg {holder.get('command', '?')} (pid {holder['pid']} on {holder.get('host', '?')}, since {since})"


def _create(path: Path, text: str) -> bool:
    """Create the lock exclusively (O_CREAT|O_EXCL: exactly one of two racing runs succeeds); False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:  # a read-only folder
        raise TumorsegError(f"{path.parent}: cannot write there ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    except OSError as exc:  # a full disk: an empty lock left would turn the next run away as "in use"
        path.unlink(missing_ok=True)
        raise TumorsegError(f"{path}: cannot write ({write_failure(exc, path, size=len(text))})") from None
    return True


def _take_over(path: Path, stale: str) -> bool:
    """Move a dead holder's lock aside; False (lock restored) when it changed since it was read,
    i.e. another run took it over first."""
    aside = path.with_name(f".tmp-{os.getpid()}-{path.name}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True
    if _read(aside) == stale:
        aside.unlink()
        return True
    os.rename(aside, path)
    return False


def live_holder(folder: str | os.PathLike, name: str = LOCK_NAME) -> str | None:
    """The run holding `folder` now, in words (`folder_lock`'s line names it alike), or None: for a
    reader of a folder that a live run is still writing (evaluate, report of a predict under way)."""
    folder = Path(folder)
    for path in (folder / name, *sorted(folder.glob(f"{name}.rank*"))):  # torchrun's ranks 1.. write on after rank 0
        try:
            holder = _holder(_read(path))
            mine = holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname()
            if not mine and not _dead(holder, path):
                return _describe(holder)
        except OSError:  # none, or released meanwhile
            continue
    return None


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str, name: str = LOCK_NAME) -> Iterator[Path]:
    """Hold `folder/name` (created with the folder) for the duration; `what` is the command
    ("predict") reported to a second run. Raises TumorsegError when a live process holds it.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # an existing file of that name, a read-only disk
        raise TumorsegError(f"{folder}: cannot create the output folder ({exc.strerror})") from None
    path = folder / name
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": what, "started": time.time(),
                       "argv": sys.argv})
    while not _create(path, mine):
        try:
            stale = _read(path)
            holder = _holder(stale)
            dead = _dead(holder, path)
        except FileNotFoundError:
            continue  # released meanwhile
        except IsADirectoryError:
            raise TumorsegError(f"{path}: a folder where tumorseg keeps its lock file; remove it") from None
        if not dead or not _take_over(path, stale):
            with contextlib.suppress(OSError):
                holder = _holder(_read(path)) or holder  # the run that took it over first
            raise TumorsegError(f"{folder} is in use by {_describe(holder)}; "
                                f"wait for it or remove {path} if it is gone")
        say(f"note: {path} was left by {_describe(holder)}, which is gone; "
            "taking it over")
    done = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, done), daemon=True, name="tumorseg-lock")
    beat.start()
    try:
        yield path
    finally:
        done.set()
        beat.join()
        with contextlib.suppress(OSError):
            if path.read_text() == mine:  # never remove a lock someone else took over
                path.unlink()


def _heartbeat(path: Path, done: threading.Event) -> None:
    """Touch the lock every `HEARTBEAT_S` until `done`: a run on any host sees it is held."""
    while not done.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)
