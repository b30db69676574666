"""Slices of one case with segmentation overlays: the seed's "predict and plot" figure.

Rows are views (axial, coronal, sagittal); columns are the modalities, then the ground
truth over FLAIR (or the last channel) when there is one, then the prediction over the same
channel when one is given. Overlays use the usual BraTS colours: necrotic / non-enhancing
core (label 1) red, oedema (label 2) green, enhancing tumour (label 4; 3 in training
labels) yellow, at alpha 0.45.

Volumes are turned to the BraTS voxel orientation (LPS: i towards the patient's left, j
posterior, k superior) before slicing, which changes nothing for BraTS data, and every
panel is displayed upright: axial with anterior at the top, coronal and sagittal with
superior at the top, in radiological convention (the patient's right on the image's left),
with the patient's sides lettered at each panel's edges. Slice numbers are the stored file's
voxel indices, as a viewer (ITK-SNAP, FSLeyes) shows them (a prepared .npy's own: its crop's),
with the file's voxel axis named where it is not the usual one for the view (i sagittal, j
coronal, k axial).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import TumorsegError
from ..labels import CLASS_NAMES, LabelConvention, convention
from ..layouts import Case
from ..log import say
from .canvas import drawable, figure_grid, save_png
from .case_images import CaseImages, load_case, load_prediction

VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
VIEW_AXIS: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}  # voxel axis in LPS order

# Training label -> (RGB, short name); the legend gives each label's value in the case's convention.
LABEL_STYLE: dict[int, tuple[tuple[float, float, float], str]] = {
    1: ((1.0, 0.0, 0.0), "NCR"),
    2: ((0.0, 0.8, 0.0), "ED"),
    3: ((1.0, 1.0, 0.0), "ET"),
    4: ((0.2, 0.5, 1.0), "RC"),
}
OVERLAY_ALPHA = 0.45
PANEL_INCHES = 3.0  # each panel is PANEL_INCHES square
MARGIN_INCHES = 1.0  # extra figure height for the title and the legend
DPI = 100
LPS = ("L", "P", "S")
UNTURNED = np.array([[0, 1], [1, 1], [2, 1]])  # nibabel's orientation transform that changes nothing
# The patient's side at each edge of a displayed view: top, bottom, left, right (radiological)
SIDES: dict[str, tuple[str, str, str, str]] = {
    "axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}


def save_case_plot(
    case: str | os.PathLike | Case,
    pred: str | os.PathLike | np.ndarray | Any | None = None,
    out: str | os.PathLike | None = None,
    slice_index: int | None = None,
    views: str | Sequence[str] = VIEWS,
    case_id: str | None = None,
    pred_labels: str | LabelConvention | None = None,
) -> Path:
    """Write a PNG of a case's slices with ground truth and prediction overlays.

    Args:
        case: a raw BraTS case folder (or `layouts.Case`, or one of its NIfTI files), or a
            prepared case `<prepared>/images/<case>.npy` (mask from `<prepared>/masks/`,
            channel names from `<prepared>/manifest.json`).
        pred: prediction on the case's grid: a NIfTI file, a `.npy` or an array of training
            labels 0..3 (of labels in `pred_labels` where given), or `predict_case`'s result (its
            labels in its convention). For a prepared case a full-size prediction is cropped
            with the manifest's crop box. Optional.
        out: PNG path, written atomically; default `<case_id>.png` in the current folder.
        slice_index: the slice shown in every view; default the slice with the most tumour
            (ground truth, else prediction, else the middle of the brain).
        views: "all", one view name, or a sequence of "axial", "coronal", "sagittal".
        case_id: the case to draw where `case` holds several (a dataset folder, a cases.csv);
            default the one `pred`'s file is named for.
        pred_labels: the prediction's label convention (a name of `labels.CONVENTIONS`); default
            for a NIfTI file the tag `predict` writes, else the case's own (said in a note).

    Returns:
        The path of the PNG written. Figure: rows = views, columns = channels (+ truth,
        + prediction), each panel `PANEL_INCHES` square, plus `MARGIN_INCHES` of height,
        at `DPI` dots per inch.
    """
    views = _check_views(views)
    data = load_case(case, case_id, Path(pred) if isinstance(pred, (str, os.PathLike)) else None)
    if data.truth_note:
        kind = "warning" if data.truth is None else "note"
        say(f"{kind}: {data.case_id}: {data.truth_note}")
    if data.unread:
        say(f"warning: {data.unread}")  # its lines name the case
    labels = None if pred is None else load_prediction(pred, data, convention(pred_labels) if pred_labels else None)
    images, truth, labels, spacing = to_lps(data, labels)
    brain = np.any(images != 0, axis=0)
    if slice_index is None:
        reference = truth if truth is not None and truth.any() else labels
        slices = choose_slices(reference, brain, views)
    else:
        slices = {v: _check_slice(slice_index, v, data) for v in views}
    out = Path(out) if out is not None else Path.cwd() / f"{data.case_id}.png"
    draw_views(data, images, truth, labels, spacing, slices, out)
    return out


def choose_slices(
    labels: np.ndarray | None, brain: np.ndarray | None = None, views: Sequence[str] = VIEWS
) -> dict[str, int]:
    """The slice with the most labelled (non-zero) voxels in each view (ties: the middle one).

    Args:
        labels: label volume (X, Y, Z) in LPS voxel order, or None.
        brain: boolean brain mask (X, Y, Z); its bounding-box middle is used when `labels`
            is None or empty, and the middle of the volume when it is empty too.
        views: view names; the result has one entry per view.
    """
    if labels is None and brain is None:
        raise ValueError("choose_slices needs a label volume or a brain mask")
    shape = labels.shape if labels is not None else brain.shape
    out = {}
    for view in views:
        axis = VIEW_AXIS[view]
        others = tuple(a for a in range(3) if a != axis)
        if labels is not None and labels.any():
            counts = np.count_nonzero(labels, axis=others)
            best = np.flatnonzero(counts == counts.max())
            out[view] = int(best[len(best) // 2])  # the middle one of tied slices
        elif brain is not None and brain.any():
            idx = np.flatnonzero(brain.any(axis=others))
            out[view] = int((idx[0] + idx[-1]) // 2)
        else:
            out[view] = shape[axis] // 2
    return out


def display_slice(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """One slice of an LPS-ordered volume (X, Y, Z), turned upright for `imshow`.

    Axial (X, Y) -> rows anterior to posterior, columns right to left (transpose); coronal
    (X, Z) and sagittal (Y, Z) -> rows superior to inferior (`np.rot90`).
    """
    plane = np.take(volume, index, axis=VIEW_AXIS[view])
    return plane.T if view == "axial" else np.rot90(plane)


def lps_transform(affine: np.ndarray | None) -> np.ndarray:
    """Stored voxel axes -> LPS voxel order: (new axis, flip) per stored axis, as nibabel's
    `ornt_transform` gives it (no affine: the voxels are taken as LPS already)."""
    if affine is None:
        return UNTURNED
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, ornt_transform

    return ornt_transform(nib.io_orientation(affine), axcodes2ornt(LPS))


def stored_slice(transform: np.ndarray, shape: Sequence[int], view: str, index: int) -> tuple[int, int]:
    """The stored voxel axis that `view` slices, and the index on it of LPS slice `index`; the
    map is its own inverse, so it also gives the LPS slice of a stored index. `shape`: stored."""
    axis = next(a for a, (target, _) in enumerate(transform) if int(target) == VIEW_AXIS[view])
    return axis, int(shape[axis] - 1 - index if transform[axis][1] < 0 else index)


def slice_title(transform: np.ndarray, shape: Sequence[int], view: str, index: int) -> str:
    """"axial slice 61": the view and the stored file's index of LPS slice `index`, naming the
    file's voxel axis where it is not the view's usual one (a scan stored sagittally)."""
    axis, stored = stored_slice(transform, shape, view, index)
    return f"{view} slice {stored}" + ("" if axis == VIEW_AXIS[view] else f" (voxel axis {'ijk'[axis]})")


def mark_sides(ax, view: str) -> None:
    """The patient's side at each edge of a panel (A/P, S/I, R/L), as radiology viewers letter them."""
    top, bottom, left, right = SIDES[view]
    style = dict(transform=ax.transAxes, color="white", fontsize=9, fontweight="bold", alpha=0.9)
    for text, x, y, ha, va in ((top, 0.5, 0.98, "center", "top"), (bottom, 0.5, 0.02, "center", "bottom"),
                               (left, 0.02, 0.5, "left", "center"), (right, 0.98, 0.5, "right", "center")):
        ax.text(x, y, text, ha=ha, va=va, **style)


def to_lps(data: CaseImages, pred: np.ndarray | None):
    """Images (C, X, Y, Z), truth, prediction and spacing, reoriented to LPS voxel order."""
    images, truth, spacing = data.images, data.truth, data.spacing
    transform = lps_transform(data.affine)
    if np.array_equal(transform, UNTURNED):
        return images, truth, pred, spacing
    from nibabel.orientations import apply_orientation

    turn = lambda a: None if a is None else np.ascontiguousarray(apply_orientation(a, transform))  # noqa: E731
    new_spacing = [0.0] * 3
    for axis, (target, _) in enumerate(transform):
        new_spacing[int(target)] = spacing[axis]
    return np.stack([turn(c) for c in images]), turn(truth), turn(pred), tuple(new_spacing)


def _check_views(views: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(views, str):
        views = VIEWS if views == "all" else (views,)
    views = tuple(views)
    bad = [v for v in views if v not in VIEWS]
    if bad or not views:
        raise TumorsegError(f"unknown view {bad[0] if bad else '(none)'!r}: choose from {', '.join(VIEWS)}, all")
    return views


def _check_slice(index: int, view: str, data: CaseImages) -> int:
    """The LPS slice of the stored file's slice `index` in `view` (checked against the file's size)."""
    axis, lps = stored_slice(lps_transform(data.affine), data.shape, view, int(index))
    if not 0 <= int(index) < data.shape[axis]:
        raise TumorsegError(f"{data.case_id}: slice {index} is outside the {view} range 0..{data.shape[axis] - 1}")
    return lps


def display_window(channel: np.ndarray) -> tuple[float, float]:
    """1st and 99th percentile of the brain (non-zero) voxels of one channel."""
    values = channel[channel != 0]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, (1, 99)))
    return lo, hi if hi > lo else lo + 1.0


def label_overlay(labels2d: np.ndarray) -> np.ndarray:
    rgba = np.zeros(labels2d.shape + (4,), np.float32)
    for label, (colour, _) in LABEL_STYLE.items():
        rgba[labels2d == label] = (*colour, OVERLAY_ALPHA)
    return rgba


def draw_views(data, images, truth, pred, spacing, slices: dict[str, int], out: Path) -> None:
    from matplotlib.patches import Patch

    base = data.names.index("flair") if "flair" in data.names else len(data.names) - 1
    base_name = data.names[base].upper()
    columns = [(n.upper(), i, None) for i, n in enumerate(data.names)]
    columns += [(f"{base_name} + ground truth", base, truth)] if truth is not None else []
    columns += [(f"{base_name} + prediction", base, pred)] if pred is not None else []
    windows = [display_window(c) for c in images]
    transform = lps_transform(data.affine)
    nrows, ncols = len(slices), len(columns)
    fig, axes = figure_grid(nrows, ncols, (PANEL_INCHES * ncols, PANEL_INCHES * nrows + MARGIN_INCHES), "constrained")
    for row, (view, index) in enumerate(slices.items()):
        sx, sy, sz = spacing
        aspect = {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[view]
        for col, (title, channel, labels) in enumerate(columns):
            ax = axes[row, col]
            lo, hi = windows[channel]
            ax.imshow(display_slice(images[channel], view, index), cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
            if labels is not None:
                ax.imshow(label_overlay(display_slice(labels, view, index)), aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            mark_sides(ax, view)
            if row == 0:
                ax.set_title(title, fontsize=11)
            if col == 0:
                ax.set_ylabel(slice_title(transform, data.shape, view, index), fontsize=11)
    fig.suptitle(drawable(data.case_id), fontsize=13)
    if truth is not None or pred is not None:
        shown = set(np.unique(truth)) if truth is not None else set()
        shown |= set(np.unique(pred)) if pred is not None else set()
        raw = dict(enumerate(data.labels.from_training(np.arange(5))))
        handles = [
            Patch(facecolor=colour, alpha=OVERLAY_ALPHA, edgecolor="black",
                  label=f"{raw[label]} {CLASS_NAMES[label]} ({short})")
            for label, (colour, short) in LABEL_STYLE.items()
            if label < 4 or label in shown  # the resection cavity only where a case has one
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=10, frameon=False)
    save_png(fig, out, DPI)
