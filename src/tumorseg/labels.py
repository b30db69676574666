"""BraTS label conventions: the one place that knows labels, regions and modalities.

Raw BraTS segmentations use labels 0 (background), 1 (necrotic / non-enhancing core),
2 (oedema) and 4 (enhancing tumour); label 3 is unused. Training uses 0..3 (4 -> 3) so
class indices are contiguous.
"""

from __future__ import annotations

import numpy as np

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
SEED_CHANNELS: tuple[str, ...] = ("t2", "t1ce", "flair")  # the seed's channel order

RAW_LABELS: tuple[int, ...] = (0, 1, 2, 4)
NUM_CLASSES = 4  # background + 3 tumour classes after the 4 -> 3 remap
CLASS_NAMES: tuple[str, ...] = ("background", "necrotic core", "oedema", "enhancing tumour")

# Regions scored by BraTS, in training labels (0..3). Order is the channel order of
# region-based outputs everywhere in tumorseg.
REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
REGION_LABELS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
REGION_NAMES: dict[str, str] = {
    "WT": "whole tumour",
    "TC": "tumour core",
    "ET": "enhancing tumour",
}


def invalid_raw_labels(seg: np.ndarray) -> list[int]:
    """Labels present in a raw segmentation that BraTS does not allow (3 included)."""
    present = np.unique(seg)
    return [int(v) for v in present if v not in RAW_LABELS]


def to_training_labels(seg: np.ndarray) -> np.ndarray:
    """Raw BraTS labels (0,1,2,4) -> contiguous training labels (0,1,2,3), uint8.

    The caller validates with `invalid_raw_labels` first; values are assumed valid here.
    """
    out = np.asarray(seg).astype(np.uint8, copy=True)
    out[out == 4] = 3
    return out


def to_raw_labels(mask: np.ndarray) -> np.ndarray:
    """Training labels (0..3) -> BraTS labels (0,1,2,4), uint8."""
    out = np.asarray(mask).astype(np.uint8, copy=True)
    out[out == 3] = 4
    return out


def regions_from_labels(mask: np.ndarray) -> np.ndarray:
    """Training labels (...) -> boolean region masks (3, ...) in the order WT, TC, ET."""
    return np.stack([np.isin(mask, REGION_LABELS[r]) for r in REGIONS])


def regions_from_raw_labels(seg: np.ndarray) -> np.ndarray:
    """Raw BraTS labels (...) -> boolean region masks (3, ...) in the order WT, TC, ET."""
    return regions_from_labels(np.where(seg == 4, 3, seg))


def labels_from_regions(regions: np.ndarray) -> np.ndarray:
    """Boolean region masks (3, ...) WT, TC, ET -> training labels, nested as BraTS defines.

    ET inside TC inside WT: voxels in WT only are oedema (2), in TC but not ET necrotic (1),
    in ET enhancing (3).
    """
    wt, tc, et = (np.asarray(r, dtype=bool) for r in regions)
    out = np.zeros(wt.shape, dtype=np.uint8)
    out[wt] = 2
    out[tc] = 1
    out[et] = 3
    return out
