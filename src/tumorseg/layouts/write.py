"""Writing a case in any layout (`tumorseg synth --layout`, tests)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import TumorsegError
from ..io import save_nifti
from ..labels import BRATS2020, CONVENTIONS, MODALITIES, LabelConvention
from .bids import write_bids_case
from .brats import BRATS2023_NAMES
from .case import LAYOUTS
from .dataset_json import MSD_CHANNELS, NNUNET_CHANNELS


def layout_case_id(layout: str, number: int) -> str:
    """A case id as each dataset names its cases."""
    return {
        "brats2020": f"BraTS20_Training_{number:03d}",
        "brats2021": f"BraTS2021_{number:05d}",
        "brats2023": f"BraTS-GLI-{number:05d}-000",
        "msd": f"BRATS_{number:03d}",
        "nnunet": f"BraTS2021_{number:05d}",
        "plain": f"patient_{number:03d}",
        "bids": f"sub-{number:03d}",
    }[layout]


def layout_labels(layout: str) -> LabelConvention:
    """The label convention `write_case` uses for a layout."""
    return CONVENTIONS["brats2023"] if layout == "brats2023" else CONVENTIONS["msd"] if layout in ("msd", "nnunet") else BRATS2020


def write_case(
    root: str | os.PathLike,
    layout: str,
    case_id: str,
    images: dict[str, np.ndarray],
    affine: np.ndarray,
    training_labels: np.ndarray | None = None,
    header=None,
) -> Path:
    """Write one case in `layout` under `root`; returns the folder holding its images.

    Args:
        images: volume (X, Y, Z) by canonical modality (all four).
        affine, header: geometry of every file written.
        training_labels: segmentation in training labels (0..3), written in the layout's own
            convention; None writes an unlabelled case (MSD/nnU-Net: into imagesTs/).
    """
    if layout not in LAYOUTS:
        raise TumorsegError(f"unknown layout '{layout}' (choose from {', '.join(LAYOUTS)})")
    root = Path(root)
    seg = None if training_labels is None else layout_labels(layout).from_training(training_labels)
    if layout in ("msd", "nnunet"):
        folder = root / ("imagesTr" if seg is not None else "imagesTs")
        if layout == "msd":
            stacked = np.stack([images[m] for m in MSD_CHANNELS], axis=-1)
            save_nifti(folder / f"{case_id}.nii.gz", stacked, affine, _header_for(header, stacked))
        else:
            for i, m in enumerate(NNUNET_CHANNELS):
                save_nifti(folder / f"{case_id}_{i:04d}.nii.gz", images[m], affine, header)
        if seg is not None:
            save_nifti(root / "labelsTr" / f"{case_id}.nii.gz", seg, affine, header)
        return folder
    if layout == "bids":
        return write_bids_case(root, case_id, images, affine, seg, header)
    folder = root / case_id
    sep, names = ("-", BRATS2023_NAMES) if layout == "brats2023" else ("_", {m: m for m in MODALITIES})
    prefix = "" if layout == "plain" else f"{case_id}{sep}"
    for m in MODALITIES:
        save_nifti(folder / f"{prefix}{names[m]}.nii.gz", images[m], affine, header)
    if seg is not None:
        save_nifti(folder / f"{prefix}seg.nii.gz", seg, affine, header)
    return folder


def _header_for(header, data: np.ndarray):
    """A 3D header adapted to a 4D array (MSD), or None."""
    if header is None:
        return None
    out = header.copy()
    out.set_data_shape(data.shape)
    return out
