"""BraTS region metrics per case: Dice, HD95 (mm), sensitivity, specificity.

Definitions follow the BraTS 2020 scoring (CaPTk "BraTS Similarity Metrics", whose HD95 is
medpy's `medpy.metric.binary.hd95`), written down in `shared/BRATS_METRICS.md`:

- Regions from raw labels: WT = {1, 2, 4}, TC = {1, 4}, ET = {4} in BraTS 2020 labels, and the
  same tumour parts in any other convention (`tumorseg.labels`: 2023 ET = 3, MSD TC = 2 + 3).
- Dice = 2|P and G| / (|P| + |G|); sensitivity = |P and G| / |G|;
  specificity = |not P and not G| / |not G| over the whole image.
- HD95 is the **pooled** 95th percentile (numpy default, linear interpolation) of the
  surface distances in both directions, concatenated: P's surface voxels to G's surface
  and G's surface voxels to P's surface. Surface = mask XOR its erosion with the
  face-connected (6-neighbour) structuring element, voxels outside the image counting as
  background; distances by a Euclidean distance transform with the voxel spacing.
- Empty regions: both empty -> Dice 1, HD95 0, sensitivity 1, specificity 1; exactly one
  empty -> Dice 0, HD95 373.13 (the diagonal of a 240x240x155 image), sensitivity 0 when G
  is empty and P is not, specificity as defined.

Where MONAI differs: `monai.metrics.compute_hausdorff_distance(percentile=95)` takes the
larger of the two *directed* 95th percentiles (usually a little higher than the pooled
value) and returns NaN when both masks are empty; `get_surface_distance` returns float32.
The surfaces here are the ones `monai.metrics.utils.get_mask_edges` computes (crop to the
union's bounding box with a 1-voxel margin, scipy erosion, XOR; the tests check this), done
directly with scipy because that is about five times faster on BraTS volumes and keeps the
distances in float64, bit-for-bit as medpy's.

Speed: distance transforms run inside the bounding box of P or G plus a 1-voxel zero margin,
which gives exactly the full-image numbers. Every voxel outside the box is background, so
the erosion there behaves as on the full image (the margin plays the role of the image's
outside, or of the background around the box), and the nearest surface voxel of either mask
always lies inside the box.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from ..labels import BRATS2020, REGION_LABELS, REGIONS, LabelConvention

HD95_ONE_EMPTY = 373.13  # mm: sqrt(240^2 + 240^2 + 155^2), the BraTS value when one mask is empty
METRICS: tuple[str, ...] = ("dice", "hd95", "sensitivity", "specificity")
# A case with no (usable) prediction: the worst value of every metric, so it never looks
# better than a real prediction (BraTS: Dice 0, HD95 373.13; we add sensitivity 0,
# specificity 0 for the same reason).
FAILED_CASE: dict[str, float] = {"dice": 0.0, "hd95": HD95_ONE_EMPTY, "sensitivity": 0.0, "specificity": 0.0}


def _check_pair(p: np.ndarray, g: np.ndarray) -> None:
    if p.shape != g.shape:
        raise ValueError(f"prediction and ground truth differ in shape: {p.shape} vs {g.shape}")


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    out = tuple(float(s) for s in spacing)
    if len(out) != ndim or not all(np.isfinite(s) and s > 0 for s in out):
        raise ValueError(f"spacing must be {ndim} positive numbers, got {tuple(spacing)}")
    return out


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest box (one slice per axis) holding every nonzero voxel; None if all zero."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def crop_to_union(p: np.ndarray, g: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Crop two masks to the bounding box of `p | g` and pad `margin` background voxels.

    Surfaces and surface distances of the result equal those of the full masks (see the
    module docstring). Both-empty masks come back unchanged.
    """
    box = bounding_box(p | g)
    if box is None:
        return p, g
    return np.pad(p[box], margin), np.pad(g[box], margin)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: `mask` XOR its erosion with the face-connected structuring element.

    Voxels outside the array count as background (scipy's default `border_value=0`, as in
    medpy), so foreground on the image border is surface.
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distances(
    p: np.ndarray, g: np.ndarray, spacing: Sequence[float] | None = None, crop: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (P surface -> G surface, G surface -> P surface).

    Both masks must be non-empty. `crop=False` runs on the full arrays (slow; for tests).
    """
    p, g = np.asarray(p, dtype=bool), np.asarray(g, dtype=bool)
    _check_pair(p, g)
    sampling = _spacing(spacing, p.ndim)
    if not p.any() or not g.any():
        raise ValueError("surface distances need two non-empty masks")
    if crop:
        p, g = crop_to_union(p, g)
    sp, sg = surface(p), surface(g)
    p_to_g = ndimage.distance_transform_edt(~sg, sampling=sampling)[sp]
    g_to_p = ndimage.distance_transform_edt(~sp, sampling=sampling)[sg]
    return p_to_g, g_to_p


def hd95(p: np.ndarray, g: np.ndarray, spacing: Sequence[float] | None = None, crop: bool = True) -> float:
    """Pooled 95th-percentile Hausdorff distance in mm, BraTS/medpy definition.

    Args:
        p, g: boolean masks of the same shape (prediction, ground truth).
        spacing: voxel size per axis in mm (the NIfTI header's zooms); default 1.
        crop: compute inside the union's bounding box (same result, much faster).

    Returns 0.0 when both masks are empty and 373.13 when exactly one is.
    """
    p, g = np.asarray(p, dtype=bool), np.asarray(g, dtype=bool)
    _check_pair(p, g)
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 0.0
    if has_p != has_g:
        return HD95_ONE_EMPTY
    p_to_g, g_to_p = surface_distances(p, g, spacing, crop=crop)
    return float(np.percentile(np.concatenate([p_to_g, g_to_p]), 95))


def scores_from_counts(n_p: int, n_g: int, n_pg: int, n_total: int) -> dict[str, float]:
    """Dice, sensitivity, specificity from |P|, |G|, |P and G| and the image size.

    Empty rules as BraTS: both empty -> 1, 1, 1. Exactly one empty -> Dice 0 and
    sensitivity 0 (the BraTS rule when only P has voxels, the definition when only G has).
    Specificity is 1.0 when G fills the whole image (no negatives to score).
    """
    n_p, n_g, n_pg = int(n_p), int(n_g), int(n_pg)
    dice_ = 1.0 if n_p + n_g == 0 else 2.0 * n_pg / (n_p + n_g)
    sens = (1.0 if n_p == 0 else 0.0) if n_g == 0 else n_pg / n_g
    negatives = n_total - n_g
    true_neg = n_total - (n_p + n_g - n_pg)
    spec = 1.0 if negatives == 0 else true_neg / negatives
    return {"dice": dice_, "sensitivity": sens, "specificity": spec}


def _counts(p: np.ndarray, g: np.ndarray) -> tuple[int, int, int]:
    return int(np.count_nonzero(p)), int(np.count_nonzero(g)), int(np.count_nonzero(p & g))


def dice(p: np.ndarray, g: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    p, g = np.asarray(p, dtype=bool), np.asarray(g, dtype=bool)
    _check_pair(p, g)
    return scores_from_counts(*_counts(p, g), p.size)["dice"]


def sensitivity(p: np.ndarray, g: np.ndarray) -> float:
    """|P and G| / |G|; 1.0 when both are empty, 0.0 when only P has voxels."""
    p, g = np.asarray(p, dtype=bool), np.asarray(g, dtype=bool)
    _check_pair(p, g)
    return scores_from_counts(*_counts(p, g), p.size)["sensitivity"]


def specificity(p: np.ndarray, g: np.ndarray) -> float:
    """|not P and not G| / |not G| over the whole array; 1.0 when G fills it."""
    p, g = np.asarray(p, dtype=bool), np.asarray(g, dtype=bool)
    _check_pair(p, g)
    return scores_from_counts(*_counts(p, g), p.size)["specificity"]


def binary_metrics(
    p: np.ndarray, g: np.ndarray, spacing: Sequence[float] | None = None, n_total: int | None = None
) -> dict[str, float]:
    """All four metrics of one region; `n_total` is the full image size when p, g are crops."""
    p, g = np.asarray(p, dtype=bool), np.asarray(g, dtype=bool)
    _check_pair(p, g)
    scores = scores_from_counts(*_counts(p, g), p.size if n_total is None else n_total)
    return {
        "dice": scores["dice"],
        "hd95": hd95(p, g, spacing),
        "sensitivity": scores["sensitivity"],
        "specificity": scores["specificity"],
    }


def check_labels(seg: np.ndarray, name: str = "segmentation", labels: LabelConvention = BRATS2020) -> None:
    """ValueError naming the values when `seg` holds labels its convention does not allow."""
    problem = labels.problem(np.asarray(seg))
    if problem:
        raise ValueError(f"{name} {problem}")


def region_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = (1.0, 1.0, 1.0),
    pred_labels: LabelConvention = BRATS2020,
    gt_labels: LabelConvention = BRATS2020,
) -> dict[str, dict[str, float]]:
    """BraTS metrics of one case from raw label volumes, each in its own label convention.

    Args:
        pred, gt: label volumes (D, H, W) of the same shape.
        spacing: voxel size in mm from the ground truth's header.
        pred_labels, gt_labels: their label conventions (default BraTS 2020: 0, 1, 2, 4), so a
            prediction written in one convention is scored against truth in another.

    Returns:
        {"WT": {"dice", "hd95", "sensitivity", "specificity"}, "TC": {...}, "ET": {...}}.

    Raises:
        ValueError: shapes differ, bad spacing, or labels outside the conventions.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    _check_pair(pred, gt)
    spacing = _spacing(spacing, pred.ndim)
    box = bounding_box((pred != 0) | (gt != 0))  # all work happens inside the tumours' box
    if box is None:
        both_empty = {**scores_from_counts(0, 0, 0, pred.size), "hd95": 0.0}
        return {r: {m: both_empty[m] for m in METRICS} for r in REGIONS}
    pred_c, gt_c = pred[box], gt[box]
    check_labels(pred_c, "prediction", pred_labels)
    check_labels(gt_c, "ground truth", gt_labels)
    p_regions, g_regions = pred_labels.regions(pred_c), gt_labels.regions(gt_c)
    return {
        region: binary_metrics(p_regions[i], g_regions[i], spacing, n_total=pred.size)
        for i, region in enumerate(REGIONS)
    }


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def region_dice_from_labels(pred_labels: Any, gt_labels: Any) -> dict[str, float]:
    """Dice of WT, TC, ET for one case in training labels 0..3 (fast; for validation).

    Args:
        pred_labels, gt_labels: integer label maps (any shape, same shape), numpy arrays or
            torch tensors (moved to the CPU), values 0..3 (4, a kept resection cavity, is in
            no region).

    Returns:
        {"WT": dice, "TC": dice, "ET": dice}, with Dice 1 when both regions are empty.
    """
    p, g = _as_numpy(pred_labels), _as_numpy(gt_labels)
    _check_pair(p, g)
    if p.size and (p.min() < 0 or p.max() > 4 or g.min() < 0 or g.max() > 4):
        raise ValueError("training labels must lie in 0..4")
    joint = np.bincount((p.astype(np.uint8) * 5 + g.astype(np.uint8)).ravel(), minlength=25)
    conf = joint.reshape(5, 5)  # conf[pred label, gt label]
    out = {}
    for region in REGIONS:
        idx = list(REGION_LABELS[region])
        n_p, n_g = conf[idx, :].sum(), conf[:, idx].sum()
        n_pg = conf[np.ix_(idx, idx)].sum()
        out[region] = scores_from_counts(n_p, n_g, n_pg, p.size)["dice"]
    return out
