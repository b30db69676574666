"""Synthetic BraTS-2020-format cases: brain-like volumes with a nested tumour and its labels.

Each case is written like the real training set, `BraTS20_Training_NNN/
BraTS20_Training_NNN_{t1,t1ce,t2,flair,seg}.nii.gz`, with the real scans' geometry (1 mm,
affine diag(-1, -1, 1), origin (0, shape[1] - 1, 0), qform/sform code 1), int16 images whose
skull-stripped background is exactly 0, and a uint8 segmentation with labels 0, 1, 2, 4.

Content: an irregular ellipsoidal brain with smooth white/grey matter and ventricles, a
multiplicative bias field and noise; a tumour of one to three deformed lobes whose necrotic
core (1) sits inside an enhancing rim (4) inside oedema (2), with the real contrasts (rim
bright and core dark on T1CE, oedema bright on T2/FLAIR, tumour dark on T1). About one case
in five has no enhancing tumour and one in six a small tumour (< 1 % of the 128^3 crop), as
in real data. A case depends only on (seed, case number), so files are byte-identical
across runs and independent of how many cases are made at once.

Speed comes from building smooth fields on a grid 4x coarser than the output and
interpolating up only inside the brain's bounding box; the tumour lives in its own small box.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .errors import TumorsegError
from .io import save_nifti
from .labels import MODALITIES

REF_SHAPE: tuple[int, int, int] = (240, 240, 155)
CROP_LO: tuple[int, int, int] = (56, 56, 13)  # the training crop of the real data
CROP_HI: tuple[int, int, int] = (184, 184, 141)
COARSE_STEP = 4  # voxels between coarse-grid nodes
DTYPES = ("int16", "float32")
NO_ET_EVERY = 5  # one case in each block of 5 case numbers has no enhancing tumour
SMALL_EVERY = 6  # one case in each block of 6 has a tumour below 1 % of the crop
SMALL_LIMIT = 0.009  # small tumours stay safely under the 1 % rule
LARGE_LIMIT = 0.012  # the others stay safely over it

# Tissue levels (white matter, grey matter, CSF) like CBICA scans before the per-case scale.
TISSUE: dict[str, tuple[float, float, float]] = {
    "t1": (420.0, 320.0, 130.0),
    "t1ce": (430.0, 350.0, 160.0),
    "t2": (110.0, 165.0, 650.0),
    "flair": (150.0, 190.0, 70.0),
}
# Tumour levels per raw label: 1 necrotic core, 4 enhancing rim, 2 oedema.
TUMOUR: dict[str, dict[int, float]] = {
    "t1": {1: 190.0, 4: 270.0, 2: 235.0},
    "t1ce": {1: 210.0, 4: 950.0, 2: 330.0},
    "t2": {1: 550.0, 4: 330.0, 2: 340.0},
    "flair": {1: 300.0, 4: 330.0, 2: 350.0},
}
NOISE_FRACTION = 0.025  # noise sigma relative to the white-matter level


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


def synthesize(
    out_dir: str | os.PathLike,
    cases: int,
    shape: tuple[int, int, int] = REF_SHAPE,
    seed: int = 0,
    start_index: int = 1,
    dtype: str = "int16",
    progress: bool = True,
) -> list[Path]:
    """Write `cases` synthetic BraTS-2020-format case folders under `out_dir`.

    Args:
        out_dir: folder to hold the case folders (created if missing).
        cases: number of cases, numbered from `start_index` (`BraTS20_Training_001`, ...).
        shape: volume shape (X, Y, Z); the real data's is (240, 240, 155).
        seed: random seed; a case depends only on (seed, its number).
        start_index: number of the first case (>= 1).
        dtype: image dtype on disk, "int16" like the real scans or "float32".
        progress: show a progress bar.

    Returns:
        The case folders written, in order.
    """
    shape = _validate(cases, shape, seed, start_index, dtype)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TumorsegError(f"{out}: exists and is not a folder")
    from tqdm import tqdm

    folders = []
    numbers = range(start_index, start_index + cases)
    for index in tqdm(numbers, desc="synth", unit="case", disable=not progress):
        images, seg = make_case(shape, seed, index)
        folders.append(_write_case(out, index, images, seg, dtype))
    return folders


def _validate(cases, shape, seed, start_index, dtype) -> tuple[int, int, int]:
    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(cases) or cases < 1:
        raise TumorsegError(f"cases must be an integer >= 1, got {cases!r}")
    try:
        ok = len(shape) == 3 and all(is_int(n) and n >= 16 for n in shape)
    except TypeError:
        ok = False
    if not ok:
        raise TumorsegError(f"shape must be 3 integers each >= 16, got {shape!r}")
    if not is_int(seed) or seed < 0:
        raise TumorsegError(f"seed must be an integer >= 0, got {seed!r}")
    if not is_int(start_index) or start_index < 1:
        raise TumorsegError(f"start_index must be an integer >= 1, got {start_index!r}")
    if dtype not in DTYPES:
        raise TumorsegError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return tuple(int(n) for n in shape)


def case_id(index: int) -> str:
    """Case folder name for a case number, as in the BraTS 2020 training set."""
    return f"BraTS20_Training_{index:03d}"


def brats_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """The real scans' voxel-to-world affine: diag(-1, -1, 1), origin (0, shape[1] - 1, 0)."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = shape[1] - 1
    return affine


def _header(shape: tuple[int, int, int], dtype: np.dtype):
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    affine = brats_affine(shape)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units(xyz="mm")
    header["regular"] = b"r"
    # The real files leave the unused pixdim entries (time and beyond) at 0.
    pixdim = header["pixdim"]
    pixdim[4:] = 0.0
    header["pixdim"] = pixdim
    return header


def _write_case(out: Path, index: int, images: dict[str, np.ndarray], seg: np.ndarray, dtype: str) -> Path:
    cid = case_id(index)
    folder = out / cid
    folder.mkdir(parents=True, exist_ok=True)
    affine = brats_affine(seg.shape)
    for modality in MODALITIES:
        data = images[modality]
        if dtype == "int16":
            data = np.clip(np.rint(data), 0, np.iinfo(np.int16).max).astype(np.int16)
        save_nifti(folder / f"{cid}_{modality}.nii.gz", data, affine, _header(seg.shape, data.dtype))
    save_nifti(folder / f"{cid}_seg.nii.gz", seg, affine, _header(seg.shape, seg.dtype))
    return folder


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


def make_case(shape: tuple[int, int, int], seed: int, index: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One synthetic case in memory: float32 images by modality (X, Y, Z) and a uint8 seg.

    Images are 0 outside the brain and >= 1 inside it; seg holds labels 0, 1, 2, 4.
    """
    grid = _Grid.for_shape(tuple(int(n) for n in shape))
    rng = np.random.default_rng([seed, index])
    small, has_et = case_flags(seed, index)
    brain_c, geometry = _brain_field(rng, grid)
    scales = _modality_scales(rng)
    bias_c = np.exp(0.12 * _smooth_noise(rng, grid, 60.0, n=len(MODALITIES))).astype(np.float32)
    tissue_c = _tissue_images(rng, grid, brain_c, geometry, scales, bias_c)
    bbox = _brain_box(grid, brain_c)
    fields = _upsample(np.concatenate([brain_c[None], tissue_c]), grid, bbox)
    brain_field, images = fields[0], fields[1:]
    seg = np.zeros(brain_field.shape, dtype=np.uint8)
    tbox = _add_tumour(rng, grid, bbox, brain_field, seg, small, has_et, geometry)
    if tbox is not None:
        _paint_tumour(rng, grid, bbox, tbox, images, seg, scales, bias_c)
    return _finish(rng, grid, bbox, brain_field < 1.0, images, seg, scales)


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
