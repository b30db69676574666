"""Worker processes that end with their parent.

A `prepare` killed from outside (the out-of-memory killer, `kill -9`) cannot stop its pool: the
workers, re-parented, would idle on for ever. Each worker watches its parent and exits when it is
gone; the output files are safe either way (atomic writes). Each runs PyTorch (linear resampling)
on one thread: the workers are the parallelism, and a forked child must not reuse its parent's
OpenMP threads (PyTorch's DataLoader workers do the same).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from typing import Any, TypeVar

from .errors import TumorsegError
from .lock import pid_alive

PARENT_POLL_S = 1.0
T = TypeVar("T")


class WorkerPool(ProcessPoolExecutor):
    """Left by an exception (Ctrl-C, SIGTERM, an error), the pool starts none of the jobs still
    queued: the executor's own exit would run every one of them first (an interrupted `prepare`
    went on through its queued cases). The jobs under way finish."""

    def __init__(self, workers: int, **kwargs: Any) -> None:
        super().__init__(max_workers=workers, **kwargs)
        self.workers = workers

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False

    def as_done(self, fn: Callable[..., T], jobs: Iterable[tuple]) -> Iterator[tuple[int, T]]:
        """(index, fn(*job)) for each job, in the order they finish, with no more jobs given out
        than there are workers: the executor hands one job to its workers ahead of those running,
        where no cancel reaches it, so a pool left early would still start it."""
        todo = enumerate(jobs)
        running: dict[Future, int] = {}

        def give_out() -> None:
            for index, job in itertools.islice(todo, 1):
                running[self.submit(fn, *job)] = index

        try:
            for _ in range(self.workers):
                give_out()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    give_out()  # the next job starts before this one's result is handled
                    yield running.pop(future), future.result()
        except BrokenProcessPool:  # a worker killed (the out-of-memory killer, kill -9): the others are stopped
            raise TumorsegError(f"a worker process was killed (out of memory?) with {self.workers} workers: run "
                                "again with fewer --workers") from None


def worker_pool(workers: int, context: BaseContext | None = None) -> WorkerPool:
    """A process pool (of `context`'s start method; None: the default) whose workers exit within
    about a second of the calling process's death."""
    return WorkerPool(workers, mp_context=context, initializer=_exit_with_parent, initargs=(os.getpid(),))


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
