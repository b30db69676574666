"""Prepare one case: load, scale, stack, relabel, crop, decide, save.

Runs in a worker process; returns a plain-dict record for the manifest. Arrays are saved
before the record, both atomically, so a record on disk means the case is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import TumorsegError
from ..io import Case, Volume, load_nifti, save_npy, write_text
from ..labels import invalid_raw_labels, to_training_labels
from .config import PrepareConfig
from .crop import Box, brain_mask, crop, crop_box, inside
from .scaling import scale


def load_channels(case: Case, channels: tuple[str, ...]) -> list[Volume]:
    """Load the requested modalities of a case, checking they share one grid."""
    vols = [load_nifti(case.image(m), case.case_id) for m in channels]
    first = vols[0]
    for v in vols[1:]:
        if v.data.shape != first.data.shape:
            raise TumorsegError(
                f"{case.case_id}: {v.path.name} has shape {v.data.shape}, "
                f"but {first.path.name} has {first.data.shape}"
            )
    return vols


def load_segmentation(case: Case, shape: tuple[int, ...]) -> np.ndarray:
    """Load and validate a raw segmentation (labels 0,1,2,4), returned as training labels."""
    seg = load_nifti(case.seg, case.case_id)
    if seg.data.shape != shape:
        raise TumorsegError(f"{case.case_id}: {case.seg.name} has shape {seg.data.shape}, images have {shape}")
    bad = invalid_raw_labels(seg.data) if _maybe_invalid(seg.data) else []
    if bad:
        raise TumorsegError(
            f"{case.case_id}: {case.seg} contains label(s) {bad}; BraTS segmentations use 0, 1, 2, 4"
        )
    return to_training_labels(seg.data)


def _maybe_invalid(seg: np.ndarray) -> bool:
    """False when an integer segmentation surely holds only 0, 1, 2, 4 (three fast passes).

    Lets clean cases skip `invalid_raw_labels`, whose full-volume sort costs ~40 ms a case.
    """
    if seg.dtype.kind not in "ui" or seg.size == 0:
        return True
    return bool(seg.min() < 0 or seg.max() > 4 or (seg == 3).any())


def scaled_window(data: list[np.ndarray], norm: str, brain: np.ndarray, box: Box) -> np.ndarray:
    """Channels scaled with their full volumes' statistics, stacked and cut to `box` (zero-padded
    where it leaves the image): `(C, *box size)` float32. Training and prediction both use this.
    """
    src, _ = inside(box, data[0].shape)
    image = np.stack([scale(d, norm, brain, src) for d in data])
    shifted = tuple((a - s.start, b - s.start) for (a, b), s in zip(box, src))  # crop() only pads now
    return crop(image, shifted)


def preprocess(vols: list[Volume], config: PrepareConfig) -> tuple[np.ndarray, Box, np.ndarray]:
    """Scaled, stacked, cropped image (C, *crop_size) float32, its crop box, and the brain mask."""
    data = [v.data for v in vols]
    brain = brain_mask(data)
    box = crop_box(data[0].shape, config.crop_size, config.crop_mode, brain)
    return scaled_window(data, config.norm, brain, box), box, brain


def prepare_case(case: Case, config: PrepareConfig, out_dir: Path) -> dict:
    """Process one case and write its arrays and record; returns the record."""
    vols = load_channels(case, config.channels)
    shape = vols[0].data.shape
    image, box, _ = preprocess(vols, config)
    record = {
        "case_id": case.case_id,
        "sources": {m: str(case.images[m]) for m in config.channels},
        "segmentation": str(case.seg) if case.seg else None,
        "note": case.seg_note,
        "shape": list(shape),
        "affine": np.round(vols[0].affine, 6).tolist(),
        "spacing": list(vols[0].spacing),
        "crop_box": [list(b) for b in box],
        "settings": config.case_settings(),
    }
    if case.seg is None:
        record.update(status="unlabelled", reason="no segmentation: prepared for prediction only")
    else:
        labels = load_segmentation(case, shape)
        mask = crop(labels, box)
        tumour_total = int(np.count_nonzero(labels))
        tumour_crop = int(np.count_nonzero(mask))
        fraction = tumour_crop / mask.size
        record.update(
            tumour_fraction=fraction,
            tumour_inside_crop=round(tumour_crop / tumour_total, 6) if tumour_total else None,
            label_voxels={str(k): int(np.count_nonzero(mask == k)) for k in (1, 2, 3)},
        )
        if fraction < config.min_tumour:
            record.update(status="dropped", reason=f"tumour fraction {fraction:.3g} in the crop is below {config.min_tumour}")
        else:
            record.update(status="kept", reason=None)
            # A contiguous copy (2 MB) first: np.save of a strided view iterates in small buffers.
            save_npy(out_dir / "masks" / f"{case.case_id}.npy", np.ascontiguousarray(mask))
    if record["status"] == "dropped":
        for kind in ("images", "masks"):  # left over from a run with other settings
            (out_dir / kind / f"{case.case_id}.npy").unlink(missing_ok=True)
    else:
        save_npy(out_dir / "images" / f"{case.case_id}.npy", np.ascontiguousarray(image))
    write_text(record_path(out_dir, case.case_id), json.dumps(record, indent=1))
    return record


def record_path(out_dir: Path, case_id: str) -> Path:
    return out_dir / "records" / f"{case_id}.json"
