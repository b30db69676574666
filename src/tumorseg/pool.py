"""Worker processes that end with their parent.

A `prepare` killed from outside (the out-of-memory killer, `kill -9`) cannot stop its pool: the
workers, re-parented, would idle on for ever. Each worker watches its parent and exits when it is
gone; the output files are safe either way (atomic writes).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor

PARENT_POLL_S = 1.0


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers exit within about a second of the calling process's death."""
    return ProcessPoolExecutor(max_workers=workers, initializer=_exit_with_parent, initargs=(os.getpid(),))


def _exit_with_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
