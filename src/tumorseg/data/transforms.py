"""MONAI augmentation pipelines: on for training, off for validation.

"light" is the seed-sized set (flips, intensity scale and shift); "heavy" adds what the
BraTS winners use (rotation, scaling, gamma, noise). Patches smaller than the prepared
size are sampled with a foreground ratio, as nnU-Net oversamples tumour.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from monai import transforms as mt

AUGMENTATIONS: tuple[str, ...] = ("none", "light", "heavy")
KEYS = ("image", "label")


def train_transform(
    patch: Sequence[int] | None, full: Sequence[int], augment: str = "light", fg_ratio: float = 0.33
) -> mt.Compose:
    """Patch sampling plus augmentation for dictionaries with "image" (C,...) and "label" (1,...)."""
    steps: list = []
    if patch is not None and tuple(patch) != tuple(full):
        steps.append(
            mt.RandCropByPosNegLabeld(
                KEYS, label_key="label", spatial_size=tuple(patch), pos=fg_ratio, neg=1.0 - fg_ratio, num_samples=1
            )
        )
    if augment == "heavy":
        steps += [
            mt.RandAffined(
                KEYS,
                prob=0.2,
                rotate_range=(np.pi / 6,) * 3,
                scale_range=(0.15,) * 3,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            mt.RandGaussianNoised("image", prob=0.15, std=0.05),
            mt.RandAdjustContrastd("image", prob=0.15, gamma=(0.7, 1.5)),
        ]
    if augment in ("light", "heavy"):
        steps += [mt.RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in range(3)]
        steps += [
            mt.RandScaleIntensityd("image", factors=0.1, prob=0.5),
            mt.RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    steps.append(mt.ToTensord(KEYS, track_meta=False))
    return mt.Compose(steps)


def eval_transform() -> mt.Compose:
    """Validation: the prepared arrays as they are."""
    return mt.Compose([mt.ToTensord(KEYS, track_meta=False)])
