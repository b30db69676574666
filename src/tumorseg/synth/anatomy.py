"""Healthy anatomy of a synthetic case: brain shape, tissues, ventricles, bias field and noise."""

from __future__ import annotations

import math

import numpy as np

from ..labels import MODALITIES
from .grid import _ellipsoid_distance, _Grid, _sigmoid, _smooth_noise

# Tissue levels (white matter, grey matter, CSF) like CBICA scans before the per-case scale.
TISSUE: dict[str, tuple[float, float, float]] = {
    "t1": (420.0, 320.0, 130.0),
    "t1ce": (430.0, 350.0, 160.0),
    "t2": (110.0, 165.0, 650.0),
    "flair": (150.0, 190.0, 70.0),
}
NOISE_FRACTION = 0.025  # noise sigma relative to the white-matter level


def _brain_field(rng: np.random.Generator, grid: _Grid) -> tuple[np.ndarray, dict]:
    """Coarse field that is < 1 inside an irregular ellipsoidal brain, plus its geometry."""
    # Centre and half-axes fitted to the real scans' brain bounding boxes (template mm).
    centre = np.array([119.5, 129.0, 71.0]) + rng.uniform(-3, 3, 3)
    radii = np.array([65.0, 81.0, 66.0]) * rng.uniform(0.94, 1.04, 3)
    field = _ellipsoid_distance(grid.coarse_coords(), centre, radii)
    field += 0.04 * _smooth_noise(rng, grid, 14.0) + 0.01 * _smooth_noise(rng, grid, 5.0)
    return field, {"centre": centre, "radii": radii}


def _modality_scales(rng: np.random.Generator) -> np.ndarray:
    """Per-modality intensity scale (MODALITIES order): scanners differ up to ~3x."""
    overall = math.exp(rng.uniform(math.log(0.8), math.log(2.8)))
    return overall * rng.uniform(0.9, 1.1, len(MODALITIES))


def _tissue_images(rng, grid: _Grid, brain_c, geometry: dict, scales, bias_c) -> np.ndarray:
    """Coarse healthy images (4, ...): white/grey matter and CSF mixed, times scale and bias."""
    # Deeper tissue is mostly white matter; a noisy interface gives gyri-like texture.
    wm = _sigmoid((0.74 - brain_c + 0.08 * _smooth_noise(rng, grid, 6.0)) / 0.04)
    coords = grid.coarse_coords()
    c, r = geometry["centre"], geometry["radii"]
    spread = rng.uniform(0.09, 0.14)
    horn_radii = np.array([0.07, 0.32, 0.13]) * r
    horns = [
        _ellipsoid_distance(coords, c + np.array([side * spread, 0.05, 0.12]) * r, horn_radii) for side in (-1, 1)
    ]
    # Lateral ventricles plus a thin CSF layer just inside the brain surface.
    csf = np.maximum(_sigmoid((1.0 - np.minimum(*horns)) / 0.15), 0.6 * _sigmoid((brain_c - 0.96) / 0.02))
    texture = 1.0 + 0.04 * _smooth_noise(rng, grid, 3.0)
    out = np.empty((len(MODALITIES), *brain_c.shape), dtype=np.float32)
    for i, m in enumerate(MODALITIES):
        lw, lg, lc = TISSUE[m]
        mix = (1.0 - csf) * (wm * lw + (1.0 - wm) * lg) + csf * lc
        out[i] = mix * texture * bias_c[i] * scales[i]
    return out


def _brain_box(grid: _Grid, brain_c: np.ndarray) -> tuple[slice, ...]:
    """Output-voxel box that holds every voxel where the interpolated field is < 1."""
    inside = np.argwhere(brain_c < 1.0)
    if len(inside) == 0:
        return tuple(slice(0, n) for n in grid.shape)
    step = (np.array(grid.shape) - 1) / (np.array(grid.coarse_shape) - 1)
    # Interpolation reaches up to one coarse step beyond the last node inside.
    lo = np.floor((inside.min(0) - 1) * step).astype(int)
    hi = np.ceil((inside.max(0) + 1) * step).astype(int) + 1
    return tuple(slice(max(0, a), min(n, b)) for a, b, n in zip(lo, hi, grid.shape))


def _finish(rng, grid: _Grid, bbox, brain, images, seg, scales) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Add noise, zero the background exactly, and paste the brain box into full volumes."""
    out = {}
    for i, m in enumerate(MODALITIES):
        img = images[i]
        img += (NOISE_FRACTION * TISSUE[m][0] * scales[i]) * rng.standard_normal(img.shape, dtype=np.float32)
        # Brain voxels stay >= 1 so "nonzero" is the brain mask in every modality, as in real scans.
        np.maximum(img, 1.0, out=img)
        img[~brain] = 0.0
        full = np.zeros(grid.shape, dtype=np.float32)
        full[bbox] = img
        out[m] = full
    full_seg = np.zeros(grid.shape, dtype=np.uint8)
    full_seg[bbox] = np.where(brain, seg, 0)
    return out, full_seg
