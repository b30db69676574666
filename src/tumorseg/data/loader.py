"""DataLoaders over prepared folders, single-process or under torchrun (DDP).

Both use a DistributedSampler (one replica when not distributed) so shuffling depends only
on the seed and the epoch: a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from monai.data import DataLoader
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
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        drop_last=False,
    )


def shard(case_ids: list[str], rank: int, world_size: int) -> list[str]:
    """Each validation case exactly once across ranks (no padding duplicates)."""
    return case_ids[rank::world_size]
