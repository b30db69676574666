"""BraTS postprocessing in two steps, both decided on validation cases (after nnU-Net).

1. Whole-tumour islands: a glioma is nearly always one connected lesion, so predicted tumour
   outside the largest connected whole-tumour component is usually a false positive far
   from the lesion. Such islands barely move Dice but dominate HD95 (README, "Measured").
   nnU-Net removes them when that raises validation Dice and lowers no class; we also
   remove them on a Dice tie, because their cost is in HD95, which Dice does not see.
2. Small enhancing tumour: BraTS scores a case with no enhancing tumour (ET) in the ground
   truth as Dice 1 only if the prediction has no ET either, and 0 otherwise. A network that
   predicts a few scattered ET voxels in such a case loses the whole case, so nnU-Net
   (Isensee et al., BraTS 2020) relabels predicted ET as necrosis when it has fewer voxels
   than a threshold tuned on validation. The voxels stay in the tumour core, so WT and TC
   are unchanged.

Everything here works on training labels 0..3 (3 = ET, 1 = necrosis).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..evaluation.metrics import region_dice_from_labels
from ..labels import CAVITY_CLASS
from ..prepare.crop import largest_component

ET_LABEL = 3  # training label of enhancing tumour (raw BraTS label 4)
NECROSIS_LABEL = 1


def suppress_small_et(labels: np.ndarray, threshold: int | None) -> np.ndarray:
    """Relabel all predicted ET voxels as necrosis when there are fewer than `threshold`.

    Args:
        labels: training labels 0..3 of one case, any shape (usually (X, Y, Z)).
        threshold: minimum number of ET voxels to keep them; None (or 0) leaves `labels` alone.

    Returns:
        `labels` itself when nothing changes, else a relabelled copy.
    """
    if not threshold:
        return labels
    et = labels == ET_LABEL
    count = int(np.count_nonzero(et))
    if count == 0 or count >= threshold:
        return labels
    out = labels.copy()
    out[et] = NECROSIS_LABEL
    return out


def keep_largest_tumour(labels: np.ndarray) -> np.ndarray:
    """Set tumour voxels outside the largest 26-connected whole-tumour component to background.

    Returns `labels` itself when there is at most one component, else a cleaned copy.
    """
    tumour = (labels > 0) & (labels != CAVITY_CLASS)  # a kept resection cavity is not tumour
    largest = largest_component(tumour, connectivity=3)
    if largest is None:
        return labels
    out = labels.copy()
    out[tumour & ~largest] = 0
    return out


def postprocess(labels: np.ndarray, largest_tumour: bool = False, et_threshold: int | None = None) -> np.ndarray:
    """Apply the postprocessing steps chosen on validation, in the order they were tuned."""
    if largest_tumour:
        labels = keep_largest_tumour(labels)
    return suppress_small_et(labels, et_threshold)


def _et_row(pred: np.ndarray, gt: np.ndarray) -> tuple[int, float, float]:
    """ET voxel count, ET Dice as predicted, ET Dice with all its ET removed."""
    kept = region_dice_from_labels(pred, gt)["ET"]
    removed = region_dice_from_labels(suppress_small_et(pred, np.iinfo(np.int64).max), gt)["ET"]
    return int(np.count_nonzero(pred == ET_LABEL)), kept, removed


def case_statistics(pred: np.ndarray, gt: np.ndarray) -> dict[str, list]:
    """Everything the tuning needs from one validation case, a few numbers instead of volumes.

    Under DDP each rank reduces its own cases to these, so only they travel between ranks.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    cleaned = keep_largest_tumour(pred)
    return {
        "dice": list(region_dice_from_labels(pred, gt).values()),
        "dice_cleaned": list(region_dice_from_labels(cleaned, gt).values()),
        "et": list(_et_row(pred, gt)),
        "et_cleaned": list(_et_row(cleaned, gt)),
    }


def choose_postprocessing(stats: Sequence[dict[str, list]], et_candidates: Iterable[int]) -> dict[str, bool | int | None]:
    """Both steps from `case_statistics` of the validation cases (see `tune_postprocessing`)."""
    if not stats:
        return {"largest_tumour": False, "et_threshold": None}
    dice = np.mean([s["dice"] for s in stats], axis=0)
    cleaned = np.mean([s["dice_cleaned"] for s in stats], axis=0)
    largest = bool(np.all(cleaned >= dice - 1e-12))
    rows = [s["et_cleaned" if largest else "et"] for s in stats]
    return {"largest_tumour": largest, "et_threshold": _best_et_threshold(rows, et_candidates)}


def tune_postprocessing(
    pred_label_list: Sequence[np.ndarray],
    gt_label_list: Sequence[np.ndarray],
    et_candidates: Iterable[int],
) -> dict[str, bool | int | None]:
    """Choose both steps on validation cases: `{"largest_tumour": bool, "et_threshold": int | None}`.

    Keeping only the largest tumour is chosen unless it lowers the mean Dice of any region
    (WT, TC or ET; a tie keeps it: its gain is in HD95, which Dice does not see). The ET
    threshold is then tuned on the predictions as they will be after that step.
    """
    if len(pred_label_list) != len(gt_label_list):
        raise ValueError(f"{len(pred_label_list)} predictions but {len(gt_label_list)} ground truths")
    return choose_postprocessing([case_statistics(p, g) for p, g in zip(pred_label_list, gt_label_list)], et_candidates)


def tune_et_threshold(
    pred_label_list: Sequence[np.ndarray],
    gt_label_list: Sequence[np.ndarray],
    candidates: Iterable[int],
) -> int | None:
    """The ET threshold giving the highest mean ET Dice over cases; None if none helps.

    Args:
        pred_label_list: predicted training labels (0..3) per case, before this ET step.
        gt_label_list: ground-truth training labels per case, same shapes.
        candidates: thresholds (voxel counts) to try.

    Returns:
        The best candidate, or None when no candidate beats leaving predictions as they
        are. Ties go to no postprocessing, then to the smallest threshold. ET Dice uses the
        BraTS empty rule (both empty -> 1).
    """
    if len(pred_label_list) != len(gt_label_list):
        raise ValueError(f"{len(pred_label_list)} predictions but {len(gt_label_list)} ground truths")
    rows = [_et_row(np.asarray(p), np.asarray(g)) for p, g in zip(pred_label_list, gt_label_list)]
    return _best_et_threshold(rows, candidates)


def _best_et_threshold(rows: Sequence[Sequence], candidates: Iterable[int]) -> int | None:
    """Best threshold from per-case (ET count, Dice kept, Dice removed) rows; see `tune_et_threshold`."""
    if not rows:
        return None
    best, best_score = None, float(np.mean([kept for _, kept, _ in rows]))
    for t in sorted({int(c) for c in candidates}):
        if t <= 0:
            continue
        score = float(np.mean([removed if 0 < n < t else kept for n, kept, removed in rows]))
        if score > best_score + 1e-12:
            best, best_score = t, score
    return best
