"""Worker processes that end with their parent.

A `prepare` killed from outside (the out-of-memory killer, `kill -9`) cannot stop its pool: the
workers, re-parented, would idle on for ever. Each worker watches its parent and exits when it is
gone; the output files are safe either way (atomic writes). Each runs PyTorch (linear resampling)
on one thread: the workers are the parallelism, and a forked child must not reuse its parent's
OpenMP threads (PyTorch's DataLoader workers do the same).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import BaseContext

from .lock import pid_alive

PARENT_POLL_S = 1.0


class _Pool(ProcessPoolExecutor):
    """Left by an exception (Ctrl-C, SIGTERM, an error), the pool starts none of the jobs still
    queued: the executor's own exit would run every one of them first (an interrupted `prepare`
    went on through its queued cases). The jobs under way finish."""

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False


def worker_pool(workers: int, context: BaseContext | None = None) -> ProcessPoolExecutor:
    """A process pool (of `context`'s start method; None: the default) whose workers exit within
    about a second of the calling process's death."""
    return _Pool(max_workers=workers, mp_context=context, initializer=_exit_with_parent, initargs=(os.getpid(),))


def _exit_with_parent(parent: int) -> None:
    """Exit when the pool's creator is gone: re-parented (fork), or the creator not alive (under
    forkserver, Python 3.14's default, a worker's parent is the fork server, not the creator)."""
    os.environ["OMP_NUM_THREADS"] = "1"  # for a PyTorch imported from here on
    if "torch" in sys.modules:  # already imported (forked from a parent that used it): no import for a pool that needs none
        sys.modules["torch"].set_num_threads(1)
    first = os.getppid()

    def watch() -> None:
        while os.getppid() == first and pid_alive(parent):
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
