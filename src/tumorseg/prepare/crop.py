"""The crop window, and how to undo it.

A crop box is `((x0, x1), (y0, y1), (z0, z1))` in original voxel coordinates. It may reach
outside the image when the crop is larger than the scan; those voxels are zero-padded, so
every prepared case has exactly the crop size and the box alone puts it back.
"""

from __future__ import annotations

import numpy as np

from ..errors import TumorsegError

CROP_MODES: tuple[str, ...] = ("fixed", "brain")
Box = tuple[tuple[int, int], ...]


ZERO_BACKGROUND_SHARE = 0.1  # the real sample scans are 81-87 % exact 0, cut to their brain's box 50-59 %


def background(volume: np.ndarray) -> tuple[float, float] | None:
    """(level, tolerance) of a background that is not exact 0; None when it is (BraTS: scans
    skull-stripped to 0, which hold at least `ZERO_BACKGROUND_SHARE` of exact zeros).

    An intensity offset, interpolation ringing or a header's `scl_inter` moves the background off
    0. The level is the median of the volume's six faces and the tolerance the 99th percentile of
    their distance from it; exact zeros there are left out (resampling pads with them).
    """
    zeros = volume.size - np.count_nonzero(volume)  # no volume-sized temporary
    if volume.ndim != 3 or 0 in volume.shape or zeros >= ZERO_BACKGROUND_SHARE * volume.size:
        return None
    faces = np.concatenate([np.take(volume, [0, -1], axis=a).ravel() for a in range(3)])
    off = faces[faces != 0].astype(np.float64)
    level = float(np.median(off))
    return level, float(np.quantile(np.abs(off - level), 0.99))


def brain_mask(volumes: list[np.ndarray]) -> np.ndarray:
    """Voxels that differ from the background in any modality.

    BraTS scans are skull-stripped to exact 0: the mask is then the non-zero voxels, as it has
    always been. Where a modality's background is off 0 (`background`), its brain is the voxels
    farther from that level than the tolerance (the non-zero voxels if none are: a constant
    volume), and the mask keeps its largest connected part (the background voxels beyond the
    tolerance are scattered).
    """
    mask = np.zeros(volumes[0].shape, bool)
    shifted = False
    for v in volumes:
        level = background(v)
        brain = (v != 0) & (np.abs(v - level[0]) > level[1]) if level is not None else None
        if brain is None or not brain.any():
            mask |= v != 0
        else:
            mask |= brain
            shifted = True
    largest = largest_component(mask) if shifted else None
    return mask if largest is None else largest


def largest_component(mask: np.ndarray, connectivity: int = 1) -> np.ndarray | None:
    """The largest connected part of a 3-D `mask` (`connectivity` 1: through faces; 3: also edges and
    corners, 26-connected), or None when it has at most one part."""
    from scipy import ndimage

    parts, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, connectivity))
    if count <= 1:
        return None
    return parts == 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))


def bounding_box(mask: np.ndarray) -> Box | None:
    """Half-open bounding box of the True voxels, or None if there are none."""
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=others))
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def crop_box(shape: tuple[int, ...], size: tuple[int, ...], mode: str, brain: np.ndarray | None = None) -> Box:
    """The crop window of `size` for an image of `shape`.

    "fixed" centres the window in the image, which for 240x240x155 and 128^3 is the seed's
    x 56:184, y 56:184, z 13:141. "brain" centres it on the brain's bounding box, kept
    inside the image where it fits.
    """
    if mode not in CROP_MODES:
        raise TumorsegError(f"unknown crop mode '{mode}' (choose from {', '.join(CROP_MODES)})")
    bbox = bounding_box(brain) if mode == "brain" and brain is not None else None
    box = []
    for axis, (n, s) in enumerate(zip(shape, size)):
        if s >= n or bbox is None:
            start = (n - s) // 2
        else:
            centre = (bbox[axis][0] + bbox[axis][1]) // 2
            start = min(max(centre - s // 2, 0), n - s)
        box.append((start, start + s))
    return tuple(box)


def inside(box: Box, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices of the image covered by `box`, and where they sit inside the crop."""
    src, dst = [], []
    for (a, b), n in zip(box, shape):
        lo, hi = max(a, 0), min(b, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - a, hi - a))
    return tuple(src), tuple(dst)


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    """Cut `box` out of the last three axes of `array`, zero-padding outside the image."""
    spatial = array.shape[-3:]
    src, dst = inside(box, spatial)
    if all(s.start == 0 and s.stop == n for s, n in zip(dst, [b - a for a, b in box])):
        return array[(..., *src)]
    out = np.zeros(array.shape[:-3] + tuple(b - a for a, b in box), dtype=array.dtype)
    out[(..., *dst)] = array[(..., *src)]
    return out


def uncrop(cropped: np.ndarray, box: Box, shape: tuple[int, ...], fill: float = 0) -> np.ndarray:
    """Put a cropped array (last three axes) back into an image of `shape`; `fill` elsewhere."""
    expected = tuple(b - a for a, b in box)
    if tuple(cropped.shape[-3:]) != expected:
        raise TumorsegError(f"cropped array has shape {cropped.shape[-3:]}, crop box needs {expected}")
    out = np.full(cropped.shape[:-3] + tuple(shape), fill, dtype=cropped.dtype)
    src, dst = inside(box, shape)
    out[(..., *src)] = cropped[(..., *dst)]
    return out
