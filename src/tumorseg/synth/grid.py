"""The voxel grid of a synthetic case and the smooth fields drawn on it.

Geometry is drawn in template mm (the real 240x240x155 1 mm volume); smooth fields live on
a coarse grid and are interpolated up to output voxels only inside a box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

REF_SHAPE: tuple[int, int, int] = (240, 240, 155)
CROP_LO: tuple[int, int, int] = (56, 56, 13)  # the training crop of the real data
CROP_HI: tuple[int, int, int] = (184, 184, 141)
COARSE_STEP = 4  # voxels between coarse-grid nodes


@dataclass(frozen=True)
class _Grid:
    """A voxel grid, its scale (voxels per template mm) and the coarse grid over it.

    The template is the real 240x240x155 1 mm volume: geometry is drawn in template mm
    so small test shapes hold the same, shrunken anatomy.
    """

    shape: tuple[int, int, int]
    scale: tuple[float, float, float]

    @classmethod
    def for_shape(cls, shape: tuple[int, int, int]) -> "_Grid":
        return cls(shape, tuple(n / r for n, r in zip(shape, REF_SHAPE)))

    @property
    def coarse_shape(self) -> tuple[int, ...]:
        return tuple(max(4, math.ceil((n - 1) / COARSE_STEP) + 1) for n in self.shape)

    def coarse_coords(self) -> list[np.ndarray]:
        """Template-mm coordinates of the coarse nodes, one open-grid array per axis."""
        return [
            _axis(np.linspace(0.0, n - 1, nc) / s, ax)
            for ax, (n, nc, s) in enumerate(zip(self.shape, self.coarse_shape, self.scale))
        ]

    def coords(self, box: tuple[slice, ...]) -> list[np.ndarray]:
        """Template-mm coordinates of the voxels in `box`, one open-grid array per axis."""
        return [_axis(np.arange(b.start, b.stop) / s, ax) for ax, (b, s) in enumerate(zip(box, self.scale))]

    def crop_volume(self) -> float:
        """Voxels in the training crop scaled to this shape (the 1 % rule's denominator)."""
        return float(np.prod((np.array(CROP_HI) - CROP_LO) * np.array(self.scale)))


def _axis(values: np.ndarray, ax: int) -> np.ndarray:
    return values.reshape([-1 if a == ax else 1 for a in range(3)]).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, grid: _Grid, sigma_mm: float, n: int = 0) -> np.ndarray:
    """Unit-variance smooth noise on `grid`'s coarse grid; `n` > 0 stacks n fields (n, ...)."""
    coarse = np.array(grid.coarse_shape)
    sigma = sigma_mm * np.array(grid.scale) * (coarse - 1) / (np.array(grid.shape) - 1)
    shape = tuple(coarse) if n == 0 else (n, *coarse)
    sigma = tuple(sigma) if n == 0 else (0.0, *sigma)
    field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    axes = None if n == 0 else (1, 2, 3)
    field -= field.mean(axis=axes, keepdims=True)
    field /= field.std(axis=axes, keepdims=True) + 1e-6
    return field


def _ellipsoid_distance(coords: list[np.ndarray], centre, radii) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) on an open grid, float32."""
    total = sum(((c - np.float32(m)) / np.float32(r)) ** 2 for c, m, r in zip(coords, centre, radii))
    return np.sqrt(total).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))).astype(np.float32)


def _upsample(coarse: np.ndarray, grid: _Grid, box: tuple[slice, ...]) -> np.ndarray:
    """Trilinear interpolation of coarse fields (C, *coarse) onto `grid`'s voxels in `box`.

    Separable, one axis at a time, so the cost is a few passes over the output only.
    """
    out = coarse
    for ax, (sl, n) in enumerate(zip(box, grid.shape)):
        nc = coarse.shape[ax + 1]
        pos = np.arange(sl.start, sl.stop) * ((nc - 1) / (n - 1))
        i0 = np.minimum(np.floor(pos).astype(int), nc - 2)
        w = (pos - i0).astype(np.float32).reshape([-1 if a == ax + 1 else 1 for a in range(4)])
        lo = np.take(out, i0, axis=ax + 1)
        out = lo + (np.take(out, i0 + 1, axis=ax + 1) - lo) * w
    return out


def _box_noise(rng, grid: _Grid, box: tuple[slice, ...], sigma_mm: float, n: int) -> np.ndarray:
    """n unit-variance smooth noise fields (n, *box) over the voxels of `box`."""
    sub = _Grid(tuple(max(2, s.stop - s.start) for s in box), grid.scale)
    whole = tuple(slice(0, s.stop - s.start) for s in box)
    return _upsample(_smooth_noise(rng, sub, sigma_mm, n), sub, whole)


def _sub(box: tuple[slice, ...], outer: tuple[slice, ...]) -> tuple[slice, ...]:
    """`box` (output voxels) relative to the start of `outer`."""
    return tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer))
