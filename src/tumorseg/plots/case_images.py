"""A case's scans, ground truth and prediction read for drawing: a raw case of any layout or a
prepared array, the truth put on the images' grid, labels turned to training labels (0..3, 4 a
kept resection cavity) from the convention of each file."""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TumorsegError
from ..geometry import Grid, labels_onto
from ..io import MANIFEST, NIFTI_RE, load_labels, read_npy
from ..labels import (BRATS2020, MODALITIES, LabelConvention, convention_from_header, format_values, read_as,
                      to_training_labels)
from ..layouts import BESIDE, Case, discover_cases, folder_labels, is_case_list
from ..log import say


@dataclass(frozen=True)
class CaseImages:
    """A case ready to plot, still in its stored voxel orientation.

    Attributes:
        case_id: shown in the title and the default file name.
        names: one column name per channel, e.g. ("t1", "t1ce", "t2", "flair").
        images: intensities (C, X, Y, Z) float32.
        truth: ground truth in training labels (X, Y, Z) uint8, or None.
        source: the file or folder the case came from, for error messages.
        affine: voxel-to-world matrix (4, 4) used for orientation, or None (assume LPS).
        spacing: voxel size in mm along X, Y, Z.
        full_shape: for a prepared case, the shape of the scan before cropping.
        crop_box: for a prepared case, where the crop sits in the full scan.
        labels: label convention of the case's files (a prediction's own tag wins).
        truth_note: why the ground truth is not drawn (truth None), or how it was put on the
            images' grid (nearest neighbour), or None.
        unread: why a scan of the case is left out of `names` (it could not be read), or None.
    """

    case_id: str
    names: tuple[str, ...]
    images: np.ndarray
    truth: np.ndarray | None
    source: Path
    affine: np.ndarray | None = None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    full_shape: tuple[int, ...] | None = None
    crop_box: tuple[tuple[int, int], ...] | None = None
    labels: LabelConvention = BRATS2020
    truth_note: str | None = None
    unread: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])


def load_case(case: str | os.PathLike | Case, case_id: str | None = None,
              by_prediction: Path | None = None) -> CaseImages:
    """A raw case folder / `Case` / NIfTI file of a case, or a prepared `images/<case>.npy`; where
    the folder or cases.csv holds several cases, the one `case_id` names, or else the one a
    prediction file `by_prediction` (`<case>.nii.gz`) is named for."""
    if isinstance(case, Case):
        return _load_raw(case)
    path = Path(case)
    if path.suffix == ".npy":
        if case_id is not None and case_id != path.stem:
            raise TumorsegError(f"{path}: a prepared array of case {path.stem}, not {case_id}")
        return _load_prepared(path)
    if not path.exists():
        raise TumorsegError(f"{path}: no such case folder or file")
    if path.is_file() and not is_case_list(path):  # one file of a case: imagesTr/ (MSD, nnU-Net) holds many
        cases = [c for c in discover_cases(path.parent) if path in (*c.images.values(), c.seg)]
    else:
        cases = discover_cases(path)
    named = NIFTI_RE.match(by_prediction.name) if by_prediction is not None else None
    wanted = case_id or (named and named["stem"])
    if case_id is not None and case_id not in {c.case_id for c in cases}:
        raise TumorsegError(f"{path}: no case {case_id} among its {len(cases)}")
    if len(cases) > 1 and wanted is not None:
        cases = [c for c in cases if c.case_id == wanted] or cases
    if len(cases) != 1:
        raise TumorsegError(f"{path}: holds {len(cases)} cases; give one case folder or one of its files, "
                            "or name the case (--case ID)")
    return _load_raw(cases[0])


def _load_raw(case: Case) -> CaseImages:
    from ..prepare.case import grid, load_channels  # modalities on one grid, 4D files split

    names = tuple(m for m in MODALITIES if m in case.images)
    try:
        vols, unread = load_channels(case, names), None
    except TumorsegError:  # a damaged scan costs its own column: the others still show the labels
        drawable, why = [], []
        for m in names:
            try:
                load_channels(case, (m,))
                drawable.append(m)
            except TumorsegError as exc:
                why.append(str(exc))
        if not drawable or not why:
            raise  # none readable, or the scans fail together (apart in world space)
        names, unread = tuple(drawable), "not drawn: " + "; ".join(why)
        vols = load_channels(case, names)
    images = np.stack([v.data.astype(np.float32, copy=False) for v in vols])
    truth, note = None, None
    if case.seg is not None:  # a truth that cannot be drawn leaves the scans and the prediction drawable
        try:
            seg = load_labels(case.seg, case.case_id)
            on_images, note = labels_onto(seg.data, grid(seg), grid(vols[0]), case.seg.name, "the images")
            truth = raw_to_labels(on_images, case.seg, case.labels)
        except TumorsegError as exc:
            note = f"ground truth not drawn: {exc}"
    return CaseImages(case.case_id, names, images, truth, case.folder, vols[0].affine, vols[0].spacing,
                      labels=case.labels, truth_note=note, unread=unread)


def _load_prepared(path: Path) -> CaseImages:
    case_id = path.stem
    image = read_npy(path)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise TumorsegError(f"{path}: expected a prepared image (C, X, Y, Z), got shape {image.shape}")
    root = path.parent.parent
    names = tuple(f"channel {i}" for i in range(image.shape[0]))
    record: dict = {}
    if (root / MANIFEST).is_file():
        from ..prepare.run import load_manifest

        manifest = load_manifest(root)
        channels = tuple(manifest.get("settings", {}).get("channels", ()))
        record = next((c for c in manifest.get("cases", []) if c.get("case_id") == case_id), {})
    else:  # a prepare under way or cut short: the case's own record, where it wrote one
        with contextlib.suppress(OSError, ValueError):
            record = json.loads((root / "records" / f"{case_id}.json").read_text())
        channels = tuple(record.get("settings", {}).get("channels", ()))
    if len(channels) == image.shape[0]:
        names = channels
    truth = None
    mask_path = root / "masks" / path.name
    if mask_path.is_file():
        truth = _npy_to_labels(read_npy(mask_path), mask_path, prepared=True)
        if truth.shape != image.shape[1:]:
            raise TumorsegError(f"{mask_path}: shape {truth.shape} differs from the image's {image.shape[1:]}")
    return CaseImages(
        case_id,
        names,
        np.asarray(image, dtype=np.float32),
        truth,
        path,
        *_prepared_grid(record),
        tuple(tuple(b) for b in record["crop_box"]) if "crop_box" in record else None,
    )


def _prepared_grid(record: dict) -> tuple:
    """Affine, spacing and full shape of the grid a prepared case's arrays are on (the network's)."""
    affine = record.get("network_affine", record.get("affine"))
    if affine is None:
        return None, (1.0, 1.0, 1.0), None
    affine = np.asarray(affine, dtype=float)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    return affine, spacing, tuple(record.get("network_shape", record.get("shape")))


def load_prediction(pred: str | os.PathLike | np.ndarray | Any, data: CaseImages,
                    pred_labels: LabelConvention | None = None) -> np.ndarray:
    """A prediction as training labels (X, Y, Z) uint8 on `data`'s grid, checked; a NIfTI file's
    labels in `pred_labels`, else the convention its tag names, else the case's (with a note); an
    array's in `pred_labels`, else training labels; `predict_case`'s result in its own convention."""
    if hasattr(pred, "labels") and isinstance(getattr(pred, "convention", None), LabelConvention):
        pred, pred_labels = pred.labels, pred_labels or pred.convention  # `inference.CasePrediction`
    if isinstance(pred, np.ndarray):
        where = "prediction array"
        labels = raw_to_labels(pred, where, pred_labels) if pred_labels else _npy_to_labels(pred, where)
    else:
        where = Path(pred)
        # another case's file draws without error on a grid of the same shape (`_0012` is not `_001`'s)
        if not re.search(rf"(^|[^0-9A-Za-z]){re.escape(data.case_id)}($|[^0-9A-Za-z])", where.name):
            say(f"note: {data.case_id}: the prediction {where.name} is not named for this case (predict writes "
                f"{data.case_id}.nii.gz)")
        if where.suffix == ".npy":
            array = read_npy(where)
            labels = raw_to_labels(array, where, pred_labels) if pred_labels else _npy_to_labels(array, where)
        else:
            vol = load_labels(where, data.case_id)
            raw = vol.data
            if data.affine is not None and data.crop_box is None:  # stored in another orientation: reoriented
                from ..prepare.case import grid

                raw, note = labels_onto(raw, grid(vol), Grid(data.shape, data.affine), where.name, "the images")
                if note:
                    say(f"note: {data.case_id}: {note}")
            conv = pred_labels or convention_from_header(vol.header)
            if conv is None:  # another tool's file: its numbers are a guess, as evaluate and report say
                beside = folder_labels(where.parent)
                conv, why = (beside, BESIDE) if beside else (data.labels, "the case's")
                say(f"note: {data.case_id}: {read_as(conv, why)}")
            labels = raw_to_labels(raw, where, conv)
    if labels.shape == data.shape:
        return labels
    if data.crop_box is not None and labels.shape == data.full_shape:
        from ..prepare.crop import crop

        return crop(labels, data.crop_box)
    raise TumorsegError(f"{where}: prediction has shape {labels.shape}, but case {data.case_id} has {data.shape}")


def raw_to_labels(seg: np.ndarray, where, labels: LabelConvention = BRATS2020) -> np.ndarray:
    problem = labels.problem(np.asarray(seg))
    if problem:
        raise TumorsegError(f"{where} {problem}")
    return labels.to_training(seg, cavity="keep")


def _npy_to_labels(mask: np.ndarray, where, prepared: bool = False) -> np.ndarray:
    """Training labels as they are: a `prepared` mask (0..3, 4 the kept resection cavity), or an
    array without a 4; an array with a 4 but no 3 holds BraTS 2020 labels, converted."""
    values = set(np.unique(mask).tolist())
    if prepared and values <= {0, 1, 2, 3, 4}:
        return np.asarray(mask, dtype=np.uint8)
    if not values <= {0, 1, 2, 3, 4} or {3, 4} <= values:
        raise TumorsegError(
            f"{where}: labels {format_values(sorted(values))} are neither training (0..3) nor BraTS (0, 1, 2, 4) labels"
        )
    return to_training_labels(mask) if 4 in values else np.asarray(mask, dtype=np.uint8)
