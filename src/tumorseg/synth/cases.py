"""Synthetic cases in memory (`make_case`) and on disk (`synthesize`): ids, NIfTI headers, files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..bars import progress_bar
from ..errors import TumorsegError
from ..labels import MODALITIES, to_training_labels
from ..layouts import LAYOUTS, layout_case_id, write_case, write_dataset_json
from .anatomy import _brain_box, _brain_field, _finish, _modality_scales, _tissue_images
from .grid import REF_SHAPE, _Grid, _smooth_noise, _upsample
from .tumour import _add_tumour, _paint_tumour, case_flags

DTYPES = ("int16", "float32")


def synthesize(
    out_dir: str | os.PathLike,
    cases: int,
    shape: tuple[int, int, int] = REF_SHAPE,
    seed: int = 0,
    start_index: int = 1,
    dtype: str = "int16",
    progress: bool = True,
    layout: str = "brats2020",
) -> list[Path]:
    """Write `cases` synthetic cases under `out_dir` in a dataset layout (default BraTS 2020's).

    Args:
        out_dir: folder to hold the case folders (created if missing).
        cases: number of cases, numbered from `start_index` (`BraTS20_Training_001`, ...).
        shape: volume shape (X, Y, Z); the real data's is (240, 240, 155).
        seed: random seed; a case depends only on (seed, its number).
        start_index: number of the first case (>= 1).
        dtype: image dtype on disk, "int16" like the real scans or "float32".
        progress: show a progress bar.
        layout: one of `layouts.LAYOUTS` ("brats2020", "msd", "plain", "bids", ...): names,
            files and label convention of that dataset; the content is the same in every layout.

    Returns:
        The case folders written, in order (MSD / nnU-Net: `imagesTr` once per case).
    """
    shape = _validate(cases, shape, seed, start_index, dtype)
    if layout not in LAYOUTS:
        raise TumorsegError(f"unknown layout '{layout}' (choose from {', '.join(LAYOUTS)})")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TumorsegError(f"{out}: exists and is not a folder")
    folders = []
    numbers = range(start_index, start_index + cases)
    for index in progress_bar(numbers, desc="synth", unit="case", disable=not progress):
        images, seg = make_case(shape, seed, index)
        folders.append(_write_case(out, index, images, seg, dtype, layout))
    if layout in ("msd", "nnunet"):
        write_dataset_json(out, layout, num_training=len(list((out / "labelsTr").glob("*.nii.gz"))))
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
    return layout_case_id("brats2020", index)


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


def _write_case(out: Path, index: int, images: dict[str, np.ndarray], seg: np.ndarray, dtype: str, layout: str) -> Path:
    if dtype == "int16":
        images = {m: np.clip(np.rint(images[m]), 0, np.iinfo(np.int16).max).astype(np.int16) for m in MODALITIES}
    header = _header(seg.shape, images[MODALITIES[0]].dtype)
    return write_case(out, layout, layout_case_id(layout, index), images, brats_affine(seg.shape),
                      to_training_labels(seg), header)


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
