"""DataLoaders over prepared folders, single-process or under torchrun (DDP).

Both use a DistributedSampler (one replica when not distributed) so shuffling depends only
on the seed and the epoch: a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import os
import signal

from monai.data import DataLoader
from monai.data.utils import worker_init_fn as seed_worker
from torch.utils.data.distributed import DistributedSampler

from .dataset import PreparedDataset


def make_loader(
    dataset: PreparedDataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader whose sampler is re-seeded per epoch with `loader.sampler.set_epoch(epoch)`."""
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
    )
    return _Loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        drop_last=False,
        worker_init_fn=_start_worker,
    )


class _Loader(DataLoader):
    """MONAI's DataLoader without torch's warning on more workers than cores (given twice: when the
    loader is made and when its first epoch starts): `train` says it once, as a note (`workers_note`)."""

    def check_worker_number_rationality(self) -> None:
        return None


def workers_note(workers: int) -> str | None:
    """A note where `workers` loader processes are more than this process may run on (a recipe's 8
    on a laptop), else None."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers <= cores:
        return None
    return (f"note: {workers} loader workers on {cores} CPU cores, more than can run at once: "
            f"--workers {cores} may be as fast")


def _start_worker(worker_id: int) -> None:
    """MONAI's seeding of the worker's random transforms, and a quiet exit on SIGTERM: `scancel`
    and `docker stop` signal every process of the job, and torch's worker, killed by a signal not
    its parent's, made the main process raise over its own clean exit. Exiting with 0, as torch's
    worker does on its parent's SIGTERM, leaves that exit to the main process."""
    signal.signal(signal.SIGTERM, _quit)
    seed_worker(worker_id)


def _quit(signum: int, frame: object) -> None:
    os._exit(0)


def shard(case_ids: list[str], rank: int, world_size: int) -> list[str]:
    """Each validation case exactly once across ranks (no padding duplicates)."""
    return case_ids[rank::world_size]
