"""BraTS postprocessing in three steps, all decided on validation cases.

1. Whole-tumour islands (after nnU-Net): a glioma is nearly always one connected lesion, so predicted tumour
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
3. Small components, per region: the BraTS 2023+ ranking scores each predicted component that
   touches no true lesion as a false-positive lesion (lesion-wise Dice 0 for it), so a speck
   costs as much as a missed tumour. Components smaller than a size tuned per region on the
   validation cases' lesion-wise Dice are removed, as BraTS 2023 teams do: a whole-tumour
   component becomes background, a tumour-core one oedema, an enhancing one necrosis, so the
   outer regions are unchanged. Each region's largest component stays whatever its size: a
   region predicted only in small parts is more likely a small true region than specks (removing
   it scores Dice 0 and HD95 374 where the truth has it; README, "Measured"), and a region the
   truth lacks is step 2's job. Regions go outside in (WT, TC, ET), each size chosen for its own
   region given the outer ones (an inner region's components lie inside one outer component),
   for the mean lesion-wise Dice of the three regions: a whole-tumour size also removes the
   core and enhancing components inside, which that mean sees.

Everything here works on training labels 0..3 (3 = ET, 1 = necrosis).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from scipy import ndimage

import torch

from ..evaluation.lesionwise import LesionTable, challenge_parameters, lesion_table
from ..evaluation.metrics import bounding_box, region_dice_from_labels
from ..labels import CAVITY_CLASS, REGION_LABELS, REGIONS
from ..prepare.crop import largest_component

ET_LABEL = 3  # training label of enhancing tumour (raw BraTS label 4)
NECROSIS_LABEL = 1
OEDEMA_LABEL = 2
REMOVED_AS = {"WT": 0, "TC": OEDEMA_LABEL, "ET": NECROSIS_LABEL}  # a removed component's voxels: the next region out
NO_COMPONENT_STEP = (0, 0, 0)
_CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connected, as the lesion-wise metrics count components
ET_THRESHOLDS = (50, 100, 200, 300, 500, 750, 1000, 1500)  # candidates, voxels at the prepared spacing
COMPONENT_SIZES = (5, 10, 20, 50, 100, 200, 500, 1000)
_TABLE_FIELDS = ("sizes", "lesion_voxels", "scored", "pairs")


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


def _tumour(labels: np.ndarray) -> np.ndarray:
    return (labels > 0) & (labels != CAVITY_CLASS)  # a kept resection cavity is not tumour


def keep_largest_tumour(labels: np.ndarray) -> np.ndarray:
    """Set tumour voxels outside the largest 26-connected whole-tumour component to background.

    Returns `labels` itself when there is at most one component, else a cleaned copy.
    """
    tumour = _tumour(labels)
    box = bounding_box(tumour)  # components never leave it: labelling the box alone is 10-50x less work
    largest = None if box is None else largest_component(tumour[box], connectivity=3)
    if largest is None:
        return labels
    out = labels.copy()
    out[box][tumour[box] & ~largest] = 0
    return out


def remove_small_components(labels: np.ndarray, minimum: Sequence[int] = NO_COMPONENT_STEP) -> np.ndarray:
    """Remove each region's 26-connected components of fewer than `minimum` voxels (WT, TC, ET;
    0: keep all) but its largest, outside in; a removed component's voxels take the next region
    out's label (`REMOVED_AS`). Returns `labels` itself when nothing changes, else a cleaned copy."""
    box = bounding_box(_tumour(labels)) if any(minimum) else None  # every region's components lie in it
    if box is None:
        return labels
    out = labels
    for region, least in zip(REGIONS, minimum):
        if not least:
            continue
        parts, count = ndimage.label(np.isin(out[box], REGION_LABELS[region]), _CONNECTIVITY)
        sizes = np.bincount(parts.ravel(), minlength=count + 1)
        small = sizes < least
        small[0] = False
        if count:
            small[1 + np.argmax(sizes[1:])] = False  # the region's largest stays
        if small.any():
            out = out.copy() if out is labels else out
            out[box][small[parts]] = REMOVED_AS[region]
    return out


def postprocess(
    labels: np.ndarray,
    largest_tumour: bool = False,
    et_threshold: int | None = None,
    min_component: Sequence[int] = NO_COMPONENT_STEP,
) -> np.ndarray:
    """Apply the postprocessing steps chosen on validation, in the order they were tuned."""
    if largest_tumour:
        labels = keep_largest_tumour(labels)
    return remove_small_components(suppress_small_et(labels, et_threshold), min_component)


def _et_row(pred: np.ndarray, gt: np.ndarray) -> tuple[int, float, float]:
    """ET voxel count, ET Dice as predicted, ET Dice with all its ET removed."""
    kept = region_dice_from_labels(pred, gt)["ET"]
    removed = region_dice_from_labels(suppress_small_et(pred, np.iinfo(np.int64).max), gt)["ET"]
    return int(np.count_nonzero(pred == ET_LABEL)), kept, removed


def _component_rows(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], challenge: str) -> list[dict]:
    """Per region (WT, TC, ET): the `LesionTable` of its predicted components and, for TC and ET,
    each component's enclosing component of the region outside it."""
    dilation, threshold = challenge_parameters(challenge)
    rows: list[dict] = []
    outer = None
    for region in REGIONS:
        parts, count = ndimage.label(np.isin(pred, REGION_LABELS[region]), _CONNECTIVITY)
        parent = np.zeros(count + 1, np.int64)
        if outer is not None:
            inside = parts > 0
            parent[parts[inside]] = outer[inside] - 1  # one outer component holds each inner one
        table = lesion_table(parts, np.isin(gt, REGION_LABELS[region]), spacing, dilation, threshold)
        rows.append({"table": table, "parent": parent[1:]})
        outer = parts
    return rows


def case_statistics(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), challenge: str = "GLI"
) -> dict[str, list]:
    """Everything the tuning needs from one validation case, a few numbers instead of volumes.

    Under DDP each rank reduces its own cases to these, so only they travel between ranks.
    `spacing` (mm) and `challenge` set the lesion-wise metric the component sizes are tuned on.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    cleaned = keep_largest_tumour(pred)
    return {
        "dice": list(region_dice_from_labels(pred, gt).values()),
        "dice_cleaned": list(region_dice_from_labels(cleaned, gt).values()),
        "et": list(_et_row(pred, gt)),
        "et_cleaned": list(_et_row(cleaned, gt)),
        "components": _component_rows(pred, gt, spacing, challenge),
    }


def _kept(rows: list[dict], largest: bool, et_threshold: int | None, minimum: Sequence[int]) -> list[np.ndarray]:
    """Which predicted components of each region `postprocess` keeps with these settings."""
    tumour: list[np.ndarray] = []  # kept by the largest-tumour step
    kept: list[np.ndarray] = []
    for i, row in enumerate(rows):
        sizes = row["table"].sizes
        if i == 0:
            tumour.append(np.arange(sizes.size) == np.argmax(sizes) if largest and sizes.size else np.ones(sizes.size, bool))
            keep = tumour[0].copy()
        else:
            parent = row["parent"]
            tumour.append(tumour[-1][parent])
            keep = kept[-1][parent]
        candidates = keep.copy()  # what the outer regions' steps left
        keep &= sizes >= minimum[i]
        if minimum[i] and candidates.any():  # the largest of them stays (`remove_small_components`)
            keep[np.flatnonzero(candidates)[np.argmax(sizes[candidates])]] = True
        if REGIONS[i] == "ET" and et_threshold and 0 < int(sizes[tumour[i]].sum()) < et_threshold:
            keep[:] = False  # the ET step counts what the largest-tumour step left
        kept.append(keep)
    return kept


def _lesion_dice(stats: Sequence[dict], largest: bool, et_threshold: int | None, minimum: Sequence[int]) -> np.ndarray:
    """Mean lesion-wise Dice per region over the cases, with these settings."""
    return np.mean([[row["table"].dice(keep) for row, keep in zip(s["components"], _kept(s["components"], largest,
                                                                                            et_threshold, minimum))]
                    for s in stats], axis=0)


def _best_minimum(stats: Sequence[dict], largest: bool, et_threshold: int | None, candidates: Iterable[int]) -> list[int]:
    """Component sizes per region, outside in, each the best for the mean lesion-wise Dice of the
    regions given the outer ones (so the mean never falls); ties go to keeping more (0: keep all,
    then the smallest size)."""
    minimum = list(NO_COMPONENT_STEP)
    for i in range(len(REGIONS)):
        best_score = float(np.mean(_lesion_dice(stats, largest, et_threshold, minimum)))
        for t in sorted({int(c) for c in candidates if int(c) > 1}):
            score = float(np.mean(_lesion_dice(stats, largest, et_threshold, minimum[:i] + [t] + minimum[i + 1:])))
            if score > best_score + 1e-12:
                minimum[i], best_score = t, score
    return minimum


def choose_postprocessing(
    stats: Sequence[dict[str, list]], et_candidates: Iterable[int], component_candidates: Iterable[int] = ()
) -> dict[str, bool | int | None | list[int] | float]:
    """All steps from `case_statistics` of the validation cases (see `tune_postprocessing`):
    `largest_tumour`, `et_threshold`, `min_component` (WT, TC, ET voxels; 0 = off) and, given
    cases, `lesion_dice`: their mean lesion-wise Dice over the regions with all three steps."""
    if not stats:
        return {"largest_tumour": False, "et_threshold": None, "min_component": list(NO_COMPONENT_STEP)}
    dice = np.mean([s["dice"] for s in stats], axis=0)
    cleaned = np.mean([s["dice_cleaned"] for s in stats], axis=0)
    largest = bool(np.all(cleaned >= dice - 1e-12))
    rows = [s["et_cleaned" if largest else "et"] for s in stats]
    et_threshold = _best_et_threshold(rows, et_candidates)
    minimum = _best_minimum(stats, largest, et_threshold, component_candidates)
    return {"largest_tumour": largest, "et_threshold": et_threshold, "min_component": minimum,
            "lesion_dice": float(np.mean(_lesion_dice(stats, largest, et_threshold, minimum)))}


def choose_default(stats: Sequence[dict[str, list]]) -> dict:
    """`choose_postprocessing` over training's candidate thresholds and sizes."""
    return choose_postprocessing(stats, ET_THRESHOLDS, COMPONENT_SIZES)


def statistics_state(stats: Sequence[dict]) -> list[dict]:
    """`case_statistics` as a checkpoint stores them: tensors and plain types (loadable with
    `weights_only=True`), so an ensemble of runs can choose its post-processing on all their
    validation cases (`statistics_from_state`)."""
    return [{**{k: list(s[k]) for k in ("dice", "dice_cleaned", "et", "et_cleaned")},
             "components": [{**{f: torch.from_numpy(np.ascontiguousarray(getattr(row["table"], f))) for f in _TABLE_FIELDS},
                             "parent": torch.from_numpy(np.ascontiguousarray(row["parent"]))}
                            for row in s["components"]]}
            for s in stats]


def _array(value: Any, name: str) -> np.ndarray:
    """A stored statistics array: a tensor, or a list where an exported model's JSON metadata carries it."""
    array = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value, bool if name == "scored" else np.int64)
    return array.reshape(-1, 3) if name == "pairs" else array


def statistics_from_state(items: Any) -> list[dict]:
    """`statistics_state`'s inverse; raises ValueError for anything else (a damaged checkpoint)."""
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"damaged validation statistics (a {type(items).__name__}, not a list of cases)")
    try:
        stats = [{**{k: [float(v) for v in item[k]] for k in ("dice", "dice_cleaned", "et", "et_cleaned")},
                  "components": [{"table": LesionTable(*(_array(row[f], f) for f in _TABLE_FIELDS)),
                                  "parent": _array(row["parent"], "parent")} for row in item["components"]]}
                 for item in items]
        consistent = all(_consistent(s) for s in stats)
    except Exception as exc:  # noqa: BLE001 - whatever a hand-edited file holds: one reason, not a traceback
        raise ValueError(f"damaged validation statistics ({type(exc).__name__})") from None
    if not consistent:
        raise ValueError("damaged validation statistics (sizes, indices or values)")
    return stats


def _consistent(stats: dict) -> bool:
    """Shapes and indices as `case_statistics` makes them: what `_kept` and `LesionTable.dice` index with."""
    rows = stats["components"]
    numbers = [stats[k] for k in ("dice", "dice_cleaned", "et", "et_cleaned")]
    if len(rows) != len(REGIONS) or any(len(v) != 3 or not np.isfinite(v).all() for v in numbers):
        return False
    outer = None
    for row in rows:
        table, parent = row["table"], row["parent"]
        if any(a.ndim != 1 for a in (table.sizes, table.lesion_voxels, table.scored, parent)):
            return False
        lesion, comp = table.pairs[:, 0], table.pairs[:, 1]
        if (table.scored.shape != table.lesion_voxels.shape or parent.shape != table.sizes.shape
                or not (0 <= lesion).all() or not (lesion < table.lesion_voxels.size).all()
                or not (0 <= comp).all() or not (comp < table.sizes.size).all()
                or (outer is not None and parent.size and not (0 <= parent.min() and parent.max() < outer))):
            return False
        outer = table.sizes.size
    return True


def tune_postprocessing(
    pred_label_list: Sequence[np.ndarray],
    gt_label_list: Sequence[np.ndarray],
    et_candidates: Iterable[int],
    component_candidates: Iterable[int] = (),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    challenge: str = "GLI",
) -> dict:
    """Choose the steps on validation cases (`choose_postprocessing`'s dict).

    Keeping only the largest tumour is chosen unless it lowers the mean Dice of any region
    (WT, TC or ET; a tie keeps it: its gain is in HD95, which Dice does not see). The ET
    threshold is then tuned on the predictions as they will be after that step, by BraTS 2020
    Dice; the component sizes last, among `component_candidates`, by the `challenge`'s
    lesion-wise Dice (none given: that step stays off).
    """
    if len(pred_label_list) != len(gt_label_list):
        raise ValueError(f"{len(pred_label_list)} predictions but {len(gt_label_list)} ground truths")
    stats = [case_statistics(p, g, spacing, challenge) for p, g in zip(pred_label_list, gt_label_list)]
    return choose_postprocessing(stats, et_candidates, component_candidates)


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
