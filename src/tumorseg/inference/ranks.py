"""One `predict` over many processes: `torchrun` ranks share the cases and the output folder.

Each rank predicts its share (`shard`) under a lock of its own (`claim`), and the ranks meet
(`meet`) before the report, which is rank 0's alone, on torchrun's key-value store rather than a
process group: prediction needs no collective, so there is nothing to set up or tear down, and
a rank whose launcher is gone stops waiting in one line.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..errors import TumorsegError
from ..io import sweep_stale_temps
from ..layouts import Case
from ..lock import LOCK_NAME, folder_lock
from ..log import say


_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar("tumorseg_predict_alone", default=False)


def rank_world() -> tuple[int, int]:
    """This process's RANK and the WORLD_SIZE under `torchrun`; (0, 1) otherwise, or `alone`."""
    if _ALONE.get():
        return 0, 1
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """This process predicts every case itself, torchrun's variables or not (a script calling
    `predict` on one rank of its own job)."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def shard(cases: list[Case]) -> list[Case]:
    """This process's share under `torchrun` (RANK of WORLD_SIZE): every case exactly once over
    the ranks, whatever each rank finds already done; all of them otherwise."""
    rank, world = rank_world()
    return cases[rank::world]


@contextlib.contextmanager
def claim(out_dir: Path, outputs: list[str]) -> Iterator[None]:
    """Lock the output folder and sweep the temporaries killed runs left there.

    Under torchrun the ranks share the folder by design, so each rank r holds its own lock,
    `.tumorseg.lock.rank<r>` (rank 0 the plain one, so a plain `predict` into the folder meets
    the job): a second job is refused rank by rank. A rank sweeps only the temporaries of its
    own `outputs`: the other ranks' are live, and from other hosts their pids mean nothing here.
    """
    rank, world = rank_world()
    with folder_lock(out_dir, "predict", LOCK_NAME if rank == 0 else f"{LOCK_NAME}.rank{rank}"):
        sweep_stale_temps(out_dir, outputs if world > 1 else None)
        yield



def meet(step: str, launcher: int | None, timeout: timedelta = timedelta(days=1)) -> None:
    """Under torchrun, wait until every rank has reached `step` (nothing otherwise).

    Prediction makes no process group: the ranks meet on torchrun's own key-value store (or rank
    0's, where torchrun shares none), with a key of their own per meeting (no group to set up, tear
    down or share with a caller's NCCL). A rank whose launcher (`launcher`, its parent's pid when it
    started) is gone stops waiting in one line instead of holding its memory for the day others may take."""
    rank, world = rank_world()
    if world == 1:
        return
    import torch.distributed as dist

    deadline = time.monotonic() + timeout.total_seconds()
    try:
        _check_launcher(launcher, step)
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts it; else rank 0
        host = rank == 0 and not agent
        address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        if address not in _STORES:  # one per process: rank 0's, made anew, could not take the same port back
            _STORES[address] = dist.TCPStore(*address, world, is_master=host,
                                             timeout=STORE_CONNECT if agent else timeout)  # rank 0 may come late
        store = _STORES[address]
        key = f"tumorseg/predict/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{next(_MEETINGS)}/{step}"
        if store.add(key, 1) == world:
            store.set(f"{key}/all", "1")
        _poll(lambda: store.check([f"{key}/all"]), launcher, step, deadline, timeout)
        store.add(f"{key}/seen", 1)
        if host:  # its store goes with it: every rank must have seen the meeting first
            _poll(lambda: store.add(f"{key}/seen", 0) >= world, launcher, step, deadline, timeout)
    except (KeyError, ValueError, RuntimeError) as exc:
        _check_launcher(launcher, step)  # a killed launcher took its store along: say that, not this
        raise TumorsegError(f"RANK and WORLD_SIZE are set but the ranks cannot meet ({type(exc).__name__}: {exc}): "
                            "start several processes with torchrun") from None


def _poll(done: Callable[[], bool], launcher: int | None, step: str, deadline: float, timeout: timedelta) -> None:
    """Until `done()`, looking at the launcher between looks (a timed-out store wait logs a warning each
    time); a note once the others are long in coming, as they never come where one rank alone predicts."""
    noted = time.monotonic() + WAIT_NOTE_S
    while not done():
        _check_launcher(launcher, step)
        if time.monotonic() > deadline:
            raise TumorsegError(f"not every rank reached '{step}' within {timeout}")
        if noted is not None and time.monotonic() > noted:
            noted = None
            rank, world = rank_world()
            say(f"note: rank {rank} waits for the other {world - 1} rank(s) to reach '{step}': every rank of the "
                "job predicts its share (a script predicting on one rank alone: predict(..., distributed=False))")
        time.sleep(MEETING_POLL)


_MEETINGS = itertools.count()
_STORES: dict[tuple[str, int], Any] = {}
WAIT_NOTE_S = 120.0  # a rank's share done, the others' may take longer than that: no note sooner
STORE_CONNECT = timedelta(minutes=5)  # to torchrun's agent's store, up before any rank starts
MEETING_POLL = 0.05  # s between looks: the last rank to arrive leaves at once and may exit (torchrun then
# stops the others), so the ranks waiting for it must not sleep through their last lines


def launcher_pid() -> int | None:
    """torchrun's agent (this process's parent) where torchrun started it: `meet` stops waiting when
    it is gone. None for ranks started otherwise (by hand, by a shell that may exit): no launcher to watch."""
    return os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None


def _check_launcher(launcher: int | None, step: str) -> None:
    if launcher is not None and os.getppid() != launcher:
        raise TumorsegError(f"the torchrun launcher (pid {launcher}) is gone; this rank stopped after "
                            f"'{step}': its cases are written, run the same command again for the others")
