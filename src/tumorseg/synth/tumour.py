"""The tumour of a synthetic case: which kind, its shape, nested labels and contrasts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..labels import MODALITIES
from .grid import CROP_HI, CROP_LO, _box_noise, _ellipsoid_distance, _Grid, _sub, _upsample

NO_ET_EVERY = 5  # one case in each block of 5 case numbers has no enhancing tumour
SMALL_EVERY = 6  # one case in each block of 6 has a tumour below 1 % of the crop
SMALL_LIMIT = 0.009  # small tumours stay safely under the 1 % rule
LARGE_LIMIT = 0.012  # the others stay safely over it

# Tumour levels per raw label: 1 necrotic core, 4 enhancing rim, 2 oedema.
TUMOUR: dict[str, dict[int, float]] = {
    "t1": {1: 190.0, 4: 270.0, 2: 235.0},
    "t1ce": {1: 210.0, 4: 950.0, 2: 330.0},
    "t2": {1: 550.0, 4: 330.0, 2: 340.0},
    "flair": {1: 300.0, 4: 330.0, 2: 350.0},
}


def case_flags(seed: int, index: int) -> tuple[bool, bool]:
    """(small tumour, has enhancing tumour) for a case number.

    Drawn per block of case numbers rather than per case so any run of 5 (6) consecutive
    aligned cases holds exactly one case without enhancing tumour (with a small tumour).
    """
    block, pos = divmod(index - 1, NO_ET_EVERY)
    no_et = pos == np.random.default_rng([seed, block, 1]).integers(NO_ET_EVERY)
    block, pos = divmod(index - 1, SMALL_EVERY)
    small = pos == np.random.default_rng([seed, block, 2]).integers(SMALL_EVERY)
    return bool(small), not bool(no_et)


@dataclass(frozen=True)
class _TumourShape:
    """A tumour's shape in units of its radius: lobes and the core's nesting."""

    lobes: list[tuple[np.ndarray, np.ndarray]]  # (offset, radii) per lobe; lobe 0 is the main one
    core_offset: np.ndarray
    core_size: float  # core radius / main-lobe radius
    necrosis_size: float  # necrosis radius / core radius
    rim_mm: float  # least enhancing-rim thickness


def _tumour_shape(rng: np.random.Generator) -> _TumourShape:
    aspect = rng.uniform(0.75, 1.25, 3)
    lobes = [(np.zeros(3), aspect / np.prod(aspect) ** (1 / 3))]
    for _ in range(rng.integers(0, 3)):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction) + 1e-9
        lobes.append((direction * rng.uniform(0.35, 0.6), rng.uniform(0.45, 0.7) * rng.uniform(0.8, 1.2, 3)))
    return _TumourShape(
        lobes=lobes,
        core_offset=rng.normal(0.0, 0.1, 3),
        core_size=rng.uniform(0.5, 0.8),
        necrosis_size=rng.uniform(0.4, 0.8),
        rim_mm=rng.uniform(2.0, 4.0),
    )


def _tumour_centre(rng: np.random.Generator, geometry: dict, radius: float) -> np.ndarray:
    """A centre (template mm) in the training crop and deep enough inside the brain."""
    lo = np.array(CROP_LO) + 0.5 * radius
    hi = np.maximum(np.array(CROP_HI) - 0.5 * radius, lo)
    centre, radii = geometry["centre"], geometry["radii"]
    depth = 0.72 - 0.7 * radius / radii.min()
    for _ in range(200):
        c = rng.uniform(lo, hi)
        if np.linalg.norm((c - centre) / radii) <= depth:
            return c
    return centre.copy()


def _tumour_box(grid: _Grid, bbox: tuple[slice, ...], centre: np.ndarray, radius: float):
    """Output voxels that can hold the tumour (lobes and noise reach < 2.1 radii), in bbox."""
    scale = np.array(grid.scale)
    half = 2.1 * radius * scale + 2
    lo = np.floor(centre * scale - half).astype(int)
    hi = np.ceil(centre * scale + half).astype(int) + 1
    return tuple(slice(max(b.start, a), min(b.stop, z)) for a, z, b in zip(lo, hi, bbox))


def _tumour_masks(
    rng, grid: _Grid, box, brain_field, shape: _TumourShape, centre, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nested boolean masks (whole tumour, tumour core, necrosis) over `box`.

    Erosions guarantee at least one voxel of oedema around the core and of rim around
    the necrosis, so the nesting holds even where noise would break it.
    """
    coords = grid.coords(box)
    d = np.minimum.reduce(
        [_ellipsoid_distance(coords, centre + off * radius, rad * radius) for off, rad in shape.lobes]
    )
    noise = 0.25 * np.clip(_box_noise(rng, grid, box, 0.3 * radius, 3), -2.0, 2.0)
    wt = (d + noise[0] < 1.0) & (brain_field < 0.95)  # stay clear of the brain surface
    core_radii = shape.lobes[0][1] * radius * shape.core_size
    d0 = _ellipsoid_distance(coords, centre + shape.core_offset * radius, core_radii)
    voxel_mm = float(np.mean(grid.scale))
    tc = (d0 + noise[1] < 1.0) & ndi.binary_erosion(wt, iterations=max(1, round(2.0 * voxel_mm)))
    rim = max(1, round(shape.rim_mm * voxel_mm))
    ncr = (d0 + noise[2] < shape.necrosis_size) & ndi.binary_erosion(tc, iterations=rim)
    return wt, tc, ncr


def _add_tumour(rng, grid: _Grid, bbox, brain_field, seg, small: bool, has_et: bool, geometry: dict):
    """Draw a tumour into `seg` (brain-box sized); return its box (output voxels) or None."""
    if small:
        target = rng.uniform(0.0025, 0.0085)
    else:
        target = math.exp(rng.uniform(math.log(0.015), math.log(0.09)))
    radius = (3.0 * target * 128**3 / (4.0 * math.pi)) ** (1 / 3)  # template mm
    centre = _tumour_centre(rng, geometry, radius)
    shape = _tumour_shape(rng)
    crop = grid.crop_volume()
    for _ in range(12):
        box = _tumour_box(grid, bbox, centre, radius)
        wt, tc, ncr = _tumour_masks(rng, grid, box, brain_field[_sub(box, bbox)], shape, centre, radius)
        frac = wt.sum() / crop
        # Noise and the brain surface make the size uncertain: rescale until on the right side of 1 %.
        if frac == 0 or (not small and frac < LARGE_LIMIT):
            radius *= min(1.5, max(1.1, (target / max(frac, 1e-4)) ** (1 / 3)))
        elif frac >= (SMALL_LIMIT if small else 0.1):
            radius *= min(0.9, (target / frac) ** (1 / 3))
        else:
            break
    labels = np.where(wt, np.uint8(2), np.uint8(0))
    labels[tc] = 4 if has_et else 1
    if has_et:
        labels[ncr] = 1
    seg[_sub(box, bbox)] = labels
    return box if wt.any() else None


def _paint_tumour(rng, grid: _Grid, bbox, tbox, images, seg, scales, bias_c) -> None:
    """Blend tumour intensities into the brain-box images where `seg` has a tumour."""
    sub = _sub(tbox, bbox)
    where = np.argwhere(seg[sub])
    # Paint only around the tumour, two voxels wider for the partial-volume blur.
    start = np.array([s.start for s in tbox])
    lo, hi = where.min(0) + start - 2, where.max(0) + start + 3
    pbox = tuple(slice(max(b.start, a), min(b.stop, z)) for a, z, b in zip(lo, hi, bbox))
    psub = _sub(pbox, bbox)
    labels = seg[psub]
    # Oedema keeps a little of the tissue under it; the core replaces it.
    soft = {
        lab: strength * ndi.gaussian_filter((labels == lab).astype(np.float32), 0.4)
        for lab, strength in ((1, 1.0), (4, 1.0), (2, 0.8))
    }
    keep = 1.0 - sum(soft.values())
    bias = _upsample(bias_c, grid, pbox)
    texture = 1.0 + 0.06 * _box_noise(rng, grid, pbox, 4.0, 1)[0]
    jitter = rng.uniform(0.85, 1.15, (len(MODALITIES), 3))
    for i, m in enumerate(MODALITIES):
        tumour = sum(soft[lab] * (TUMOUR[m][lab] * jitter[i, j]) for j, lab in enumerate((1, 4, 2)))
        region = images[i][psub]
        region *= keep
        region += tumour * (scales[i] * bias[i] * texture)
