import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tumorseg.errors import TumorsegError
from tumorseg.pool import worker_pool

PARENT = """
import multiprocessing, os, sys, time
from tumorseg.pool import worker_pool
multiprocessing.set_start_method(sys.argv[1])
pool = worker_pool(1)
print(pool.submit(os.getpid).result(), flush=True)
time.sleep(60)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's new parent may be slow to reap it)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_a_pool_works_as_a_pool(method):
    with worker_pool(2, multiprocessing.get_context(method)) as pool:
        assert list(pool.map(abs, [-1, -2, 3])) == [1, 2, 3]


@pytest.mark.parametrize("method", ["fork", "forkserver"])  # forkserver: Python 3.14's default on Linux
def test_workers_exit_when_their_parent_is_killed(method):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, method], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)  # the killed parent's resource tracker complains of its semaphores
    worker = int(parent.stdout.readline())
    assert _running(worker)
    parent.kill()  # as the out-of-memory killer would: no clean-up in the parent
    parent.wait()
    deadline = time.monotonic() + 15
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(worker)


def _mark(path: str) -> None:
    time.sleep(0.3)
    Path(path).touch()


def test_a_pool_left_by_an_exception_starts_none_of_the_queued_jobs(tmp_path):
    """Ctrl-C or SIGTERM in a 1,000-case prepare stops within the cases under way, not after the last."""
    with pytest.raises(KeyboardInterrupt):
        with worker_pool(1) as pool:
            for i in range(8):
                pool.submit(_mark, str(tmp_path / str(i)))
            raise KeyboardInterrupt
    ran = len(list(tmp_path.iterdir()))
    assert 1 <= ran <= 2  # the job under way and at most one handed to the worker already
    with worker_pool(1) as pool:  # left normally, every job runs
        for i in range(8, 12):
            pool.submit(_mark, str(tmp_path / str(i)))
    assert len(list(tmp_path.iterdir())) == ran + 4


def test_as_done_gives_out_no_job_ahead_of_the_workers(tmp_path):
    """Handed out one by one, an interrupted pool ends with the job under way: the executor alone would
    also run the one it had queued for its workers (3 jobs here, not 2)."""
    with pytest.raises(KeyboardInterrupt):
        with worker_pool(1) as pool:
            for _ in pool.as_done(_mark, [(str(tmp_path / str(i)),) for i in range(8)]):
                time.sleep(1.0)  # the next job runs meanwhile
                raise KeyboardInterrupt
    assert len(list(tmp_path.iterdir())) == 2
    with worker_pool(2) as pool:  # every job, each once, its index beside its result
        done = list(pool.as_done(pow, [(i, 2) for i in range(7)]))
    assert sorted(done) == [(i, i * i) for i in range(7)]


def _killed(_: int) -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would


def test_a_killed_worker_is_one_line():
    with pytest.raises(TumorsegError, match=r"^a worker process was killed \(out of memory\?\) with 2 workers: run "
                                            r"again with fewer --workers$"):
        with worker_pool(2) as pool:
            list(pool.as_done(_killed, [(i,) for i in range(4)]))
