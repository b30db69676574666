"""What clinicians read from a segmentation: volumes, lesions, RANO diameters, centroid.

Everything is in millimetres from the header's affine, so anisotropic and oblique voxels are
measured right:

- Volume: voxel count x |det(A[:3, :3])| (the product of the affine's column norms for
  orthogonal axes), in cm^3.
- Lesions: 26-connected components of the whole tumour of `LESION_MIN_VOXELS` or more (smaller
  ones are specks: counted apart, never measured).
- Diameters: of the largest enhancing lesion (what RANO measures) and of the largest
  whole-tumour lesion (a diameter across two lesions, or to a false-positive speck, measures no
  lesion).
- Axial: the voxel axis closest to the world's S axis (nibabel's `io_orientation`). A voxel
  centre's position in an axial slice is mapped to millimetres in the slice's plane through the
  affine's two in-plane columns, so a rotated or sheared grid gives the same distances.
- Longest diameter: the longest distance between two voxel centres of the mask on the axial
  slice where its area is largest (ties: the slice with the longest diameter), found among the
  vertices of the centres' convex hull.
- Perpendicular diameter: on that slice, the largest extent along the direction perpendicular
  to the longest diameter between two voxel centres whose positions along the longest diameter
  differ by at most one voxel (the larger in-plane voxel size). Product = longest x
  perpendicular: RANO's bidimensional measurement.

Distances run between voxel centres: a lesion n voxels across measures n - 1 voxel sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from nibabel.affines import apply_affine, voxel_sizes
from nibabel.orientations import io_orientation
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from ..labels import CLASS_NAMES, REGION_LABELS, LabelConvention

CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
LESION_MIN_VOXELS = 10  # whole-tumour components smaller than this are specks, not lesions
TUMOUR_CLASSES = {r: REGION_LABELS[r] for r in ("TC", "WT")}  # training labels of the volumes' regions
_EPS_MM = 1e-6


@dataclass(frozen=True)
class Diameters:
    """RANO's bidimensional measurement on one axial slice.

    `longest_ends` and `perpendicular_ends` are the segments' end points as voxel indices
    (i, j, k) of the volume measured (of another grid's, off-voxel, after `onto`), for drawing
    them; `axis` is the axial voxel axis and `slice_index` the slice's index along it.
    """

    longest: float
    perpendicular: float
    axis: int
    slice_index: int
    longest_ends: tuple[tuple[float, float, float], tuple[float, float, float]]
    perpendicular_ends: tuple[tuple[float, float, float], tuple[float, float, float]]

    @property
    def product(self) -> float:
        return self.longest * self.perpendicular

    def onto(self, voxels_to_voxels: np.ndarray, axis: int) -> "Diameters":
        """The same segments at the voxel positions of another grid of the same world (`voxels_to_voxels`:
        this grid's voxel indices to that grid's, 4x4), to draw them over images stored otherwise on
        that grid's axial `axis` (`axial_axis`), the slice the nearest there."""
        move = lambda ends: tuple(tuple(float(v) for v in apply_affine(voxels_to_voxels, e)) for e in ends)  # noqa: E731
        longest, perpendicular = move(self.longest_ends), move(self.perpendicular_ends)
        return replace(self, axis=axis, slice_index=int(round(longest[0][axis])), longest_ends=longest,
                       perpendicular_ends=perpendicular)


@dataclass(frozen=True)
class Measures:
    """One case's measurements.

    volumes_cm3: by label name (CLASS_NAMES of the convention's labels) then "TC", "WT".
    lesions: 26-connected whole-tumour components of `LESION_MIN_VOXELS` or more, `specks` the
        smaller ones; `component_sizes` the voxel counts of all.
    enhancing: diameters of the largest enhancing lesion; whole: of the largest whole-tumour
        lesion (None: empty).
    centroid: the whole tumour's centre of mass in world (scanner, RAS+) mm, or None.
    """

    volumes_cm3: dict[str, float]
    component_sizes: tuple[int, ...]
    enhancing: Diameters | None
    whole: Diameters | None
    centroid: tuple[float, float, float] | None

    @property
    def lesions(self) -> int:
        return sum(n >= LESION_MIN_VOXELS for n in self.component_sizes)

    @property
    def specks(self) -> int:
        return len(self.component_sizes) - self.lesions


def label_names(conv: LabelConvention) -> dict[int, str]:
    """Training class -> name for the labels `conv` has (the resection cavity only if it has one)."""
    classes = (1, 2, 3, 4) if conv.cavity is not None else (1, 2, 3)
    return {c: CLASS_NAMES[c] for c in classes}


def voxel_volume_mm3(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3])))


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis whose direction is closest to the world's S (superior) axis."""
    return int(np.flatnonzero(io_orientation(affine)[:, 0] == 2)[0])


def lesion_sizes(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """26-connected components: the label array and each component's voxel count (label 1 first)."""
    labelled, n = ndimage.label(mask, structure=CONNECTIVITY_26)
    return labelled, tuple(int(c) for c in np.bincount(labelled.ravel(), minlength=n + 1)[1:])


def largest_lesion(mask: np.ndarray, lesions: tuple[np.ndarray, tuple[int, ...]] | None = None) -> np.ndarray:
    """The largest 26-connected component of `mask` (empty if `mask` is); `lesions`: its
    `lesion_sizes` where the caller has them."""
    labelled, sizes = lesions or lesion_sizes(mask)
    return labelled == 1 + int(np.argmax(sizes)) if sizes else np.zeros_like(mask, dtype=bool)


def centroid_world(mask: np.ndarray, affine: np.ndarray) -> tuple[float, float, float] | None:
    """Centre of mass of `mask` in world mm (the affine is linear, so the voxels' mean maps exactly)."""
    if not mask.any():
        return None
    return tuple(float(v) for v in apply_affine(affine, ndimage.center_of_mass(mask)))


def whole_tumour(labels: np.ndarray) -> np.ndarray:
    """The whole-tumour mask of training labels (X, Y, Z)."""
    return np.isin(labels, TUMOUR_CLASSES["WT"])


def uncertainty_score(uncertainty: np.ndarray, wt: np.ndarray) -> float | None:
    """Mean voxel-wise uncertainty inside the predicted whole tumour `wt` (a mask; None: no tumour)."""
    return float(np.mean(uncertainty[wt], dtype=np.float64)) if wt.any() else None


def measure(labels: np.ndarray, affine: np.ndarray, conv: LabelConvention, wt: np.ndarray | None = None) -> Measures:
    """Measure a segmentation in training labels (X, Y, Z) (0 bg, 1 NCR, 2 ED, 3 ET, 4 RC);
    `wt`: its `whole_tumour` mask where the caller has it (None: computed here)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel(), minlength=5)  # uint8 labels: no int64 copy of the volume
    cm3 = voxel_volume_mm3(affine) / 1000.0
    volumes = {name: float(counts[c] * cm3) for c, name in label_names(conv).items()}
    volumes.update({r: float(counts[list(c)].sum() * cm3) for r, c in TUMOUR_CLASSES.items()})
    wt = whole_tumour(labels) if wt is None else wt
    lesions = lesion_sizes(wt)
    return Measures(
        volumes_cm3=volumes,
        component_sizes=lesions[1],
        enhancing=bidimensional(largest_lesion(labels == 3), affine),
        whole=bidimensional(largest_lesion(wt, lesions), affine),
        centroid=centroid_world(wt, affine),
    )


def bidimensional(mask: np.ndarray, affine: np.ndarray) -> Diameters | None:
    """The longest axial diameter of `mask` and its perpendicular (module docstring); None if empty."""
    if not mask.any():
        return None
    axis = axial_axis(affine)
    plane = [a for a in range(3) if a != axis]
    _, to_mm = np.linalg.qr(np.asarray(affine, dtype=float)[:3, plane])  # in-plane mm = to_mm @ (i, j)
    tolerance = float(voxel_sizes(affine)[plane].max())
    area = np.count_nonzero(mask, axis=tuple(plane))
    best = [_slice_diameters(mask, axis, int(k), to_mm, tolerance) for k in np.flatnonzero(area == area.max())]
    return max(best, key=lambda d: d.longest)


def _slice_diameters(mask: np.ndarray, axis: int, k: int, to_mm: np.ndarray, tolerance: float) -> Diameters:
    ij = np.argwhere(np.take(mask, k, axis=axis))
    points = ij @ to_mm.T
    a, b = farthest_pair(points)
    longest = float(np.linalg.norm(points[b] - points[a]))
    if longest == 0.0:
        p, q, perpendicular = a, a, 0.0
    else:
        along = (points[b] - points[a]) / longest
        p, q, perpendicular = widest_pair(points @ along, points @ np.array([-along[1], along[0]]), tolerance)

    def voxel(n: int) -> tuple[int, int, int]:
        return tuple(int(v) for v in np.insert(ij[n], axis, k))

    return Diameters(longest, perpendicular, axis, k, (voxel(a), voxel(b)), (voxel(p), voxel(q)))


def farthest_pair(points: np.ndarray) -> tuple[int, int]:
    """Indices of the two points (n, 2) farthest apart: among the convex hull's vertices, or for
    fewer than 3 points or collinear ones the two ends of the line."""
    try:
        candidates = ConvexHull(points).vertices
    except (QhullError, ValueError):
        a = int(np.argmax(np.linalg.norm(points - points[0], axis=1)))  # on a line: one end
        return a, int(np.argmax(np.linalg.norm(points - points[a], axis=1)))
    hull = points[candidates]
    dist = np.linalg.norm(hull[:, None] - hull[None], axis=-1)
    i, j = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(candidates[i]), int(candidates[j])


def widest_pair(s: np.ndarray, t: np.ndarray, tolerance: float) -> tuple[int, int, float]:
    """The pair (p, q) with |s_p - s_q| <= tolerance and the largest |t_p - t_q|, and that value.

    Sorted by s, each point's partners with smaller s form a window; the window's extremes of t
    come from sparse tables of arg-max / arg-min, so this is O(n log n), not O(n^2).
    """
    order = np.argsort(s, kind="stable")
    s, t = s[order], t[order]
    end = np.arange(len(s))
    start = np.searchsorted(s, s - tolerance - _EPS_MM, side="left")
    hi = _range_arg(t, start, end, np.greater_equal)
    lo = _range_arg(t, start, end, np.less_equal)
    up, down = t[hi] - t, t - t[lo]
    if up.max() >= down.max():
        n = int(np.argmax(up))
        return int(order[n]), int(order[hi[n]]), float(up[n])
    n = int(np.argmax(down))
    return int(order[lo[n]]), int(order[n]), float(down[n])


def _range_arg(values: np.ndarray, start: np.ndarray, end: np.ndarray, better) -> np.ndarray:
    """Per query, the index in values[start:end + 1] of the extreme value (`better(a, b)`: a wins)."""
    table = [np.arange(len(values))]
    while 2 ** len(table) <= len(values):
        prev, half = table[-1], 2 ** (len(table) - 1)
        left, right = prev[:-half], prev[half:]
        table.append(np.where(better(values[left], values[right]), left, right))
    level = np.floor(np.log2(end - start + 1)).astype(int)
    result = np.empty_like(start)
    for k in np.unique(level):
        m = level == k
        left, right = table[k][start[m]], table[k][end[m] - 2**k + 1]
        result[m] = np.where(better(values[left], values[right]), left, right)
    return result
