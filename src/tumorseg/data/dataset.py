"""A Dataset over the arrays `tumorseg prepare` writes, read from disk on demand.

Arrays are memory-mapped, so only the samples in flight are in memory and datasets far
larger than RAM train; the page cache keeps hot cases fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import TumorsegError
from ..io import read_npy
from ..prepare import load_manifest


def split_ids(prepared_dir: str | Path, split: str) -> list[str]:
    """Case ids of a split ("train" or "val") of a prepared folder, checked to exist on disk."""
    prepared_dir = Path(prepared_dir)
    manifest = load_manifest(prepared_dir)
    if split not in manifest["split"]:
        raise TumorsegError(f"{prepared_dir}: manifest has no '{split}' split")
    ids = manifest["split"][split]
    for case_id in ids:
        for kind in ("images", "masks"):
            if not (prepared_dir / kind / f"{case_id}.npy").is_file():
                raise TumorsegError(f"{prepared_dir / kind / f'{case_id}.npy'}: missing (re-run 'tumorseg prepare')")
    return ids


class PreparedDataset(Dataset):
    """Samples `{"image": (C, X, Y, Z) float32, "label": (1, X, Y, Z) uint8, "case_id": str}`.

    Args:
        prepared_dir: output folder of `tumorseg prepare`.
        case_ids: which cases (e.g. `split_ids(prepared_dir, "train")`).
        transform: optional MONAI dictionary transform applied to each sample; if it
            returns a list (patch samplers), the first element is used.
        channels: the number of image channels the manifest names, checked on each case.
        classes: the training classes the manifest allows (0 .. classes - 1), checked on each mask.
    """

    def __init__(self, prepared_dir: str | Path, case_ids: list[str], transform: Callable | None = None,
                 channels: int | None = None, classes: int | None = None) -> None:
        self.root = Path(prepared_dir)
        self.case_ids = list(case_ids)
        self.transform = transform
        self.channels = channels
        self.classes = classes

    def __len__(self) -> int:
        return len(self.case_ids)

    def load(self, index: int) -> dict:
        case_id = self.case_ids[index]
        again = "run the same `tumorseg prepare` again: it redoes damaged arrays"
        image = read_npy(self.root / "images" / f"{case_id}.npy", again)
        label = read_npy(self.root / "masks" / f"{case_id}.npy", again)
        self._check_shapes(case_id, image.shape, label.shape)
        # One copy out of the page cache; the arrays on disk are never written to.
        label = np.array(label)
        remade = "delete it and run the same `tumorseg prepare` again"  # its re-run checks shapes, not values
        if self.classes is not None and label.size and not self._classes_only(label):
            found = ", ".join(str(v) for v in np.unique(label)[:8])
            raise TumorsegError(f"{self.root / 'masks' / f'{case_id}.npy'}: labels {found} outside the training "
                                f"classes 0..{self.classes - 1}; {remade}")
        image = np.array(image, dtype=np.float32)
        if not np.isfinite(image).all():  # a loss and Dice of NaN would train on and pick a best epoch of nothing
            bad = int(np.count_nonzero(~np.isfinite(image)))
            raise TumorsegError(f"{self.root / 'images' / f'{case_id}.npy'}: {bad} NaN or infinite value(s); {remade}")
        return {
            "image": torch.from_numpy(image),
            "label": torch.from_numpy(label.astype(np.uint8, copy=False)[None]),
            "case_id": case_id,
        }

    def _classes_only(self, label: np.ndarray) -> bool:
        """Whether a mask holds whole numbers 0 .. classes - 1 alone (prepare writes uint8: one max)."""
        if label.dtype == np.uint8:
            return int(label.max()) < self.classes
        whole = label.dtype.kind in "iu" or bool(np.all(np.mod(label, 1) == 0))  # NaN and 1.5 are not
        return whole and label.min() >= 0 and label.max() < self.classes

    def _check_shapes(self, case_id: str, image: tuple[int, ...], label: tuple[int, ...]) -> None:
        """A hand-copied or mismatched array fails here, naming its file, not deep in a transform."""
        path = self.root / "images" / f"{case_id}.npy"
        if len(image) != 4 or (self.channels is not None and image[0] != self.channels):
            want = f"({self.channels}, X, Y, Z)" if self.channels is not None else "(C, X, Y, Z)"
            raise TumorsegError(f"{path}: image array of shape {image}, expected {want}")
        if tuple(label) != tuple(image[1:]):
            raise TumorsegError(f"{self.root / 'masks' / f'{case_id}.npy'}: mask of shape {label} does not match "
                                f"its image's {image[1:]}")

    def __getitem__(self, index: int) -> dict:
        sample = self.load(index)
        if self.transform is not None:
            sample = self.transform(sample)
            if isinstance(sample, list):
                sample = sample[0]
        return sample
