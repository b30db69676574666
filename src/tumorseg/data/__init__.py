"""Step 2 of the pipeline: prepared `.npy` arrays -> augmented batches."""

from .dataset import PreparedDataset, split_ids
from .loader import make_loader, shard, workers_note
from .transforms import AUGMENTATIONS, eval_transform, train_transform

__all__ = ["AUGMENTATIONS", "PreparedDataset", "eval_transform", "make_loader", "shard", "split_ids", "train_transform",
           "workers_note"]
