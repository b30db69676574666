"""BraTS 2023+ lesion-wise Dice and HD95, the ranking metrics of the 2023 and later challenges.

Definitions follow the organisers' public evaluation code (Saluja et al., GitHub
`rachitsaluja/BraTS-2023-Metrics`: `eval.py`, `get_LesionWiseScores` and
`get_LesionWiseResults`; the same logic as `brats_2023_metrics/surface_distance/brats_metrics.py`),
checked against it. Per region (WT, TC, ET) with the challenge's dilation d and threshold t:

- Lesions: the truth is dilated d times with scipy's `generate_binary_structure(3, 2)` (the
  18-neighbour 3x3x3 cross without its 8 corners, not the full cube), voxels outside the image
  staying background. The dilated mask's 26-connected components each make one lesion: the truth
  voxels inside it. Blobs whose dilations touch are one lesion; the truth itself is unchanged.
- Predicted components: the prediction's 26-connected components, all kept (no size filter). A
  component matches a lesion when it has a voxel in the lesion's dilated component (= the lesion
  dilated d times); one component may match several lesions.
- A lesion is scored when its volume, voxel count x voxel volume in mm^3, is > t (`<= t` is
  ignored; t voxels at BraTS's 1 mm isotropic). Its Dice and HD95 compare it with every voxel of
  its matched components, also those beyond the dilation. A lesion with no match: Dice 0, HD95 374.
- False positives: components matching no lesion, scored or not (a prediction on an ignored
  small lesion is neither rewarded nor punished).
- Lesion-wise Dice = sum of scored lesions' Dice / (scored lesions + FP); HD95 = (sum of their
  HD95 + 374 FP) / (scored lesions + FP). With no scored lesion and no FP (both empty, or only
  ignored lesions): Dice 1, HD95 0. Truth empty, prediction not: Dice 0, HD95 374.
- Per-lesion HD95 is DeepMind's `surface-distance` (`compute_robust_hausdorff(.., 95)`), not
  `metrics.hd95`: surface elements are the voxel-grid corners whose 2x2x2 neighbourhood is mixed,
  each weighted by its marching-cubes surface area at the spacing; Euclidean distances run from
  one mask's corners to the other's nearest corner. Per direction, sorted by (distance, area),
  the value is the first distance whose cumulative area fraction reaches 0.95 (no interpolation).
  HD95 is the larger of the two directed values (medpy pools both directions, unweighted).
- Parameters (d, t): GLI, SSA, PED (3, 50); MEN (1, 50); MET (1, 2). The spacing is the
  prediction's header zooms in their code; ours is the caller's.

Speed: everything runs inside the box of prediction or truth grown by d voxels and clipped to
the image. The dilated truth cannot leave it, and clipping keeps the image border where theirs
is. Each lesion's distances run inside the bounding box of the lesion and its matched
components, which is the crop `surface-distance` itself makes. Every surface corner of both masks
lies in it, and distances do not depend on where the box sits, so the numbers are identical.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..errors import TumorsegError
from ..labels import REGIONS
from .metrics import _spacing, bounding_box, dice

# (dilation iterations, volume threshold in mm^3) per challenge, from their code. GoAT 2024 scored
# each case with its source cohort's parameters (the organisers' script maps every GoAT case to
# GLI/MEN/MET/PED/SSA); without that map we use GLI's.
CHALLENGES: dict[str, tuple[int, int]] = {
    "GLI": (3, 50), "PED": (3, 50), "SSA": (3, 50), "MEN": (1, 50), "MET": (1, 2), "GoAT": (3, 50),
}
_CHALLENGE_RE = re.compile(r"^BraTS-(?P<challenge>[A-Za-z]+)-\d+")
LESION_HD95_MISS = 374.0  # mm, their score for a missed lesion or a false-positive component

_DILATION = ndimage.generate_binary_structure(3, 2)  # 18-neighbour, as theirs
_CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connected components, as cc3d's connectivity=26

# Marching-cubes surface elements per 2x2x2 neighbour code: the triangles' area vectors (normals
# scaled to area) as |components| x 8, in the order of surface-distance's lookup table (DeepMind,
# Apache-2.0; signs dropped, they do not change areas). Codes c and 255 - c hold the same
# triangles, so codes 0..127 are listed; '-' is none. A test checks this against MONAI's copy.
_TRIANGLES = {
    "a": (1, 1, 1), "b": (2, 2, 2), "c": (3, 3, 3),
    "x": (0, 2, 2), "y": (2, 0, 2), "z": (2, 2, 0),
    "X": (4, 0, 0), "Y": (0, 4, 0), "Z": (0, 0, 4),
}
_CODE_TRIANGLES = (
    "- a a zz a yy aa Xba a aa yy Xba zz Xba Xba XX "
    "a xx aa Yba aa Zba aaa abba aa xxa yya acxy azz cxaz Xaba Xab "
    "a aa xx Yab aa ayy xxa cxay aa aaa Zba bbaa azz Xbaa xcaz Xba "
    "zz Yba Yab YY zza cyaz aYba Yba azz Ybaa czay Yba zzzz zza azz zz "
    "a aa aa azz xx Zba xxa cxaz aa aaa ayy Xbaa Yba bbaa ycxa Xba "
    "yy Zba ayy ycza Zba ZZ aabZ abZ yya Zbaa yyyy ayy ycza Zba ayy yy "
    "aa aaa axx Yaba xxa Zbaa xxxx xxa aaa aaaa Zbaa aaa Ybaa aaa xxa aa "
    "Xba baba cxay Yba czxa abZ axx xx Xbaa aaa yya aa zza aa aa a"
).split()


@dataclass(frozen=True)
class LesionScores:
    """Lesion-wise scores of one region of one case."""

    dice: float  # lesion-wise Dice of the region
    hd95: float  # lesion-wise HD95 in mm
    gt_lesions: int  # ground-truth lesions scored (above the threshold)
    detected: int  # of those, with any matching prediction (true positives)
    false_positives: int  # predicted components matching no ground-truth lesion


@lru_cache(maxsize=16)
def _area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    """Surface area in mm^2 of each neighbour code, summed as surface-distance does (same bits)."""
    sx, sy, sz = spacing
    table = np.zeros(256)
    for code in range(256):
        area = 0.0
        for name in _CODE_TRIANGLES[min(code, 255 - code)].strip("-"):
            nx, ny, nz = (v / 8 for v in _TRIANGLES[name])
            area += np.linalg.norm(np.array([nx * sy * sz, ny * sx * sz, nz * sx * sy]))
        table[code] = area
    return table


def _corner_codes(mask: np.ndarray) -> np.ndarray:
    """2x2x2 neighbour code of every voxel-grid corner, shape + 1 per axis (outside = background)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    n0, n1, n2 = (s + 1 for s in mask.shape)
    codes = np.zeros((n0, n1, n2), np.uint8)
    for a, b, c in itertools.product((0, 1), repeat=3):  # voxel (i-1+a, j-1+b, k-1+c) of corner (i, j, k)
        bit = np.uint8(7 - 4 * a - 2 * b - c)  # their kernel: 128 for (0, 0, 0) ... 1 for (1, 1, 1)
        codes += padded[a : a + n0, b : b + n1, c : c + n2] << bit
    return codes


def _directed_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """First distance whose cumulative area fraction reaches `percent`; inf when empty."""
    if distances.size == 0:
        return math.inf
    order = np.lexsort((areas, distances))  # their sorted(zip(distances, areas))
    distances, areas = distances[order], areas[order]
    cumulative = np.cumsum(areas) / np.sum(areas)
    idx = int(np.searchsorted(cumulative, percent / 100.0))
    return float(distances[min(idx, distances.size - 1)])


def robust_hausdorff(
    gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], percent: float = 95.0
) -> float:
    """surface-distance's `compute_robust_hausdorff` in mm: the larger directed area-weighted
    percentile (module docstring); inf when either mask is empty, as theirs."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    sampling = _spacing(spacing, 3)
    box = bounding_box(gt | pred)
    if box is None or not gt.any() or not pred.any():
        return math.inf
    areas = _area_table(sampling)
    codes_g, codes_p = _corner_codes(gt[box]), _corner_codes(pred[box])
    edge_g, edge_p = (codes_g != 0) & (codes_g != 255), (codes_p != 0) & (codes_p != 255)
    g_to_p = ndimage.distance_transform_edt(~edge_p, sampling=sampling)[edge_g]
    p_to_g = ndimage.distance_transform_edt(~edge_g, sampling=sampling)[edge_p]
    return max(
        _directed_percentile(g_to_p, areas[codes_g[edge_g]], percent),
        _directed_percentile(p_to_g, areas[codes_p[edge_p]], percent),
    )


def _grow(box: tuple[slice, ...] | None, margin: int, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
    """`box` grown by `margin` voxels per side, clipped to the array."""
    if box is None:
        return None
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _union_box(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(b[i].start for b in boxes), max(b[i].stop for b in boxes)) for i in range(3))


def _dilated_lesions(gt: np.ndarray, dilation: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(dilated lesions labelled, truth voxels labelled by their lesion, lesion count); dilation
    runs only in the truth's box grown by `dilation` (the caller's array is already cropped)."""
    regions = np.zeros(gt.shape, np.int32)
    n_lesions = 0
    gbox = _grow(bounding_box(gt), dilation, gt.shape)
    if gbox is not None:
        grown = ndimage.binary_dilation(gt[gbox], _DILATION, iterations=dilation) if dilation else gt[gbox]
        regions[gbox], n_lesions = ndimage.label(grown, _CONNECTIVITY)
    return regions, np.where(gt, regions, 0), n_lesions


def _scored(voxels: int | np.ndarray, sampling: Sequence[float], threshold: float) -> bool | np.ndarray:
    """Whether lesions of this many voxels are scored: volume in mm^3 above the threshold, as
    their code multiplies it (one expression for both users, so they agree at the threshold)."""
    sx, sy, sz = sampling
    return voxels * sx * sy * sz > threshold


def _check_masks(pred: np.ndarray, gt: np.ndarray, dilation: int) -> None:
    if pred.shape != gt.shape or gt.ndim != 3:
        raise ValueError(f"need two 3-D masks of one shape, got {pred.shape} and {gt.shape}")
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0, got {dilation}")


def lesion_scores(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], dilation: int, threshold: float
) -> LesionScores:
    """Lesion-wise Dice and HD95 of one region, as the BraTS 2023+ evaluation computes them.

    Args:
        pred, gt: boolean masks of ONE region, shape (X, Y, Z).
        spacing: voxel size in mm per axis; it sets distances and lesion volumes.
        dilation: iterations of the 18-neighbour dilation that groups truth blobs into lesions
            and decides which predicted components match a lesion.
        threshold: lesions of volume <= threshold mm^3 are not scored.
    """
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    _check_masks(pred, gt, dilation)
    sampling = _spacing(spacing, 3)
    box = _grow(bounding_box(pred | gt), dilation, gt.shape)
    if box is None:
        return LesionScores(1.0, 0.0, 0, 0, 0)
    pred, gt = pred[box], gt[box]

    regions, lesions, n_lesions = _dilated_lesions(gt, dilation)
    pred_labels, n_pred = ndimage.label(pred, _CONNECTIVITY)
    voxels = np.bincount(lesions.ravel(), minlength=n_lesions + 1)
    region_boxes, lesion_boxes = ndimage.find_objects(regions), ndimage.find_objects(lesions)
    pred_boxes = ndimage.find_objects(pred_labels)

    matched = np.zeros(n_pred + 1, bool)
    dices: list[float] = []
    hds: list[float] = []
    detected = 0
    for k in range(1, n_lesions + 1):
        rbox = region_boxes[k - 1]
        hits = np.unique(pred_labels[rbox][regions[rbox] == k])
        hits = hits[hits != 0]
        matched[hits] = True  # matched components are never false positives, scored or not
        if not _scored(int(voxels[k]), sampling, threshold):
            continue
        if hits.size == 0:
            dices.append(0.0)
            hds.append(LESION_HD95_MISS)
            continue
        detected += 1
        lbox = _union_box([lesion_boxes[k - 1]] + [pred_boxes[h - 1] for h in hits])
        g, p = lesions[lbox] == k, np.isin(pred_labels[lbox], hits)
        dices.append(dice(p, g))
        hds.append(robust_hausdorff(g, p, sampling))

    false_positives = n_pred - int(np.count_nonzero(matched[1:]))
    n = len(dices) + false_positives
    if n == 0:
        return LesionScores(1.0, 0.0, 0, 0, 0)
    return LesionScores(
        dice=float(np.sum(dices)) / n,
        hd95=(float(np.sum(hds)) + false_positives * LESION_HD95_MISS) / n,
        gt_lesions=len(dices),
        detected=detected,
        false_positives=false_positives,
    )


@dataclass(frozen=True, eq=False)
class LesionTable:
    """What lesion-wise Dice needs of one region of one case, for any subset of the predicted
    components: a few numbers per component and lesion instead of the volumes (post-processing
    tunes on these, gathered over ranks).

    Components are numbered 0.. in the order of the caller's labels (label 1 is component 0).
    """

    sizes: np.ndarray  # (components,) voxels per predicted component
    lesion_voxels: np.ndarray  # (lesions,) truth voxels per lesion
    scored: np.ndarray  # (lesions,) bool: volume above the challenge's threshold
    pairs: np.ndarray  # (n, 3) lesion, component, overlap voxels: the component touches the lesion's dilation

    def dice(self, keep: np.ndarray | None = None) -> float:
        """Lesion-wise Dice with only the components where `keep` is True (None: all), exactly
        as `lesion_scores` gives it for the prediction made of those components."""
        keep = np.ones(self.sizes.size, bool) if keep is None else np.asarray(keep, bool)
        lesion, comp, overlap = self.pairs.T
        n_lesions = self.lesion_voxels.size
        kept = keep[comp]
        hits = np.bincount(lesion[kept], minlength=n_lesions) > 0
        inter = np.bincount(lesion[kept], weights=overlap[kept], minlength=n_lesions)
        size = np.bincount(lesion[kept], weights=self.sizes[comp[kept]], minlength=n_lesions)
        dices = np.where(hits, 2.0 * inter / np.maximum(self.lesion_voxels + size, 1.0), 0.0)
        matched = np.zeros(self.sizes.size, bool)
        matched[comp] = True  # matching any lesion, scored or not (see `lesion_scores`)
        n = int(np.count_nonzero(self.scored)) + int(np.count_nonzero(keep & ~matched))
        return 1.0 if n == 0 else float(np.sum(dices[self.scored])) / n


def lesion_table(
    components: np.ndarray, gt: np.ndarray, spacing: Sequence[float], dilation: int, threshold: float
) -> LesionTable:
    """The `LesionTable` of predicted components (labelled 1..n, 26-connected, 0 background)
    against one region's truth mask, with a challenge's dilation and threshold (`lesion_scores`)."""
    components, gt = np.asarray(components), np.asarray(gt, dtype=bool)
    _check_masks(components, gt, dilation)
    n_pred = int(components.max(initial=0))
    sizes = np.bincount(components.ravel(), minlength=n_pred + 1)[1:]
    box = _grow(bounding_box((components > 0) | gt), dilation, gt.shape)
    if box is None:
        return LesionTable(sizes.astype(np.int64), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros((0, 3), np.int64))
    components, gt = components[box], gt[box]
    regions, lesions, n_lesions = _dilated_lesions(gt, dilation)
    base = np.int64(n_pred + 1)
    touching = (regions > 0) & (components > 0)
    codes = np.unique(regions[touching].astype(np.int64) * base + components[touching])
    inside = (lesions > 0) & (components > 0)  # inside a lesion is inside its dilation: a subset of codes
    overlap_codes, overlaps = np.unique(lesions[inside].astype(np.int64) * base + components[inside], return_counts=True)
    overlap = np.zeros(codes.size, np.int64)
    overlap[np.searchsorted(codes, overlap_codes)] = overlaps
    voxels = np.bincount(lesions.ravel(), minlength=n_lesions + 1)[1:].astype(np.int64)
    return LesionTable(
        sizes=sizes.astype(np.int64),
        lesion_voxels=voxels,
        scored=_scored(voxels, _spacing(spacing, 3), threshold),
        pairs=np.stack([codes // base - 1, codes % base - 1, overlap], axis=1),
    )


def challenge_name(challenge: str) -> str:
    """A challenge's name in `CHALLENGES`: 'GLI', 'gli', 'BraTS-GLI' and 'goat' all work."""
    key = challenge.strip().upper().removeprefix("BRATS-")
    for name in CHALLENGES:
        if name.upper() == key:
            return name
    raise TumorsegError(f"unknown BraTS challenge {challenge!r}; choose one of {', '.join(CHALLENGES)}")


def case_challenge(case_id: str, challenge: str | None = None) -> str:
    """The lesion-wise parameters' challenge: as given, else from a BraTS 2023+ id, else GLI."""
    if challenge is not None:
        return challenge_name(challenge)
    m = _CHALLENGE_RE.match(case_id)
    try:
        return challenge_name(m["challenge"]) if m else "GLI"
    except TumorsegError:  # BraTS-XYZ- of a challenge without its own parameters
        return "GLI"


def challenge_parameters(challenge: str) -> tuple[int, int]:
    """(dilation, threshold) of a challenge (any spelling `challenge_name` takes)."""
    return CHALLENGES[challenge_name(challenge)]


def lesionwise_metrics(
    pred_regions: np.ndarray, gt_regions: np.ndarray, spacing: Sequence[float], challenge: str = "GLI"
) -> dict[str, dict[str, float]]:
    """Lesion-wise Dice and HD95 of WT, TC and ET for one case.

    Args:
        pred_regions, gt_regions: boolean (3, X, Y, Z) region masks in the order WT, TC, ET.
        spacing: voxel size in mm per spatial axis.
        challenge: which challenge's dilation and threshold to use (`CHALLENGES`).

    Returns:
        {"WT": {"lesion_dice": .., "lesion_hd95": .., "lesion_tp": .., "lesion_fn": .., "lesion_fp": ..},
        "TC": {...}, "ET": {...}}: the counts are the scored truth lesions found and missed, and the
        predicted components matching no lesion (their code's Num_TP, Num_FN, Num_FP).

    Raises:
        TumorsegError: unknown challenge. ValueError: bad shapes or spacing.
    """
    dilation, threshold = challenge_parameters(challenge)
    pred_regions, gt_regions = np.asarray(pred_regions, dtype=bool), np.asarray(gt_regions, dtype=bool)
    if pred_regions.shape != gt_regions.shape or pred_regions.shape[:1] != (len(REGIONS),):
        raise ValueError(f"need two (3, X, Y, Z) region stacks, got {pred_regions.shape}, {gt_regions.shape}")
    out = {}
    for i, region in enumerate(REGIONS):
        s = lesion_scores(pred_regions[i], gt_regions[i], spacing, dilation, threshold)
        out[region] = {"lesion_dice": s.dice, "lesion_hd95": s.hd95, "lesion_tp": s.detected,
                       "lesion_fn": s.gt_lesions - s.detected, "lesion_fp": s.false_positives}
    return out
