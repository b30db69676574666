"""One case of the report: read its prediction (and images, uncertainty), measure, check, draw."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import TumorsegError
from ..evaluation.evaluate import detect_labels, truth_labels
from ..geometry import Grid, labels_onto, resample
from ..io import Volume, load_nifti
from ..labels import NOT_LABELS, LabelConvention, convention_from_header, model_from_header, read_as
from ..layouts import BESIDE, Case
from ..plots.case_images import load_case, raw_to_labels
from ..prepare.crop import brain_mask
from .checks import case_warnings
from .figures import blank_case, make_scene, save_figures
from .measure import Measures, axial_axis, measure, uncertainty_score, whole_tumour


@dataclass
class CaseReport:
    """Everything the report shows of one case.

    labels: the prediction's label convention (its header tag, else the default).
    figures: kind ("views", "diameters", "uncertainty", "thumbnail") -> PNG path.
    uncertainty: mean uncertainty inside the predicted whole tumour, when a map exists.
    metrics: {region: {metric: value}} against the ground truth, with --gt.
    notes: how an untagged prediction's labels were read (shown, not counted as warnings).
    model: the fingerprint of the model and settings `predict` recorded (None: not recorded).
    """

    case_id: str
    prediction: Path
    labels: LabelConvention
    measures: Measures
    warnings: list[str]
    figures: dict[str, Path]
    uncertainty: float | None = None
    metrics: dict[str, dict[str, float]] | None = None
    notes: list[str] = field(default_factory=list)
    model: str | None = None


def prediction_labels(
    prediction: Volume, images: Case | None, truth: Case | None, forced: LabelConvention | None = None,
    folder: LabelConvention | None = None,
) -> tuple[LabelConvention, str | None]:
    """The prediction's label convention, and a note when nothing named it.

    `forced` (`--pred-labels`), else the tag `predict` writes in the header, else `folder` (what a
    dataset.json beside the predictions names, as nnU-Net's), else the convention its images' or its
    truth's dataset names (BraTS 2023 numbers, MSD's), else a guess from its values
    (`evaluate.detect_labels`): never silently, as nnU-Net's MSD numbers are valid BraTS 2023 values.
    """
    tagged = forced or convention_from_header(prediction.header)
    if tagged is not None:
        return tagged, None
    if folder is not None:
        return folder, read_as(folder, BESIDE)
    for source, why in ((images, "its images' dataset's"), (truth, "its ground truth's")):
        named = truth_labels(source) if source is not None else None
        if named is not None:
            return named, read_as(named, why)
    guess = detect_labels(prediction.data)
    return guess, read_as(guess, "guessed from its values")


def report_case(
    case_id: str,
    prediction: Volume,
    images: Case | None,
    reading: tuple[LabelConvention, str | None],
    uncertainty: Path | None,
    figure_dir: Path,
) -> CaseReport:
    """Measure and draw one prediction, read by the caller, in the convention `reading` names with its
    note (`prediction_labels`); a bad case raises `TumorsegError` naming it.

    The brain mask (`crop.brain_mask` of the images) and the whole-tumour mask are computed here once
    and handed to the measures, the checks and the figures.
    """
    path = prediction.path
    conv, note = reading
    try:
        labels = raw_to_labels(prediction.data, path, conv)
    except TumorsegError as exc:  # how untagged labels were read, where it matters: a float map has no reading
        said = f"; {note}" if note and NOT_LABELS not in str(exc) else ""
        raise TumorsegError(f"{case_id}: {exc}{said}") from None
    drawn, grids, note_moved, apart = labels, None, None, []  # drawn: the prediction on its images' grid
    data = replace(load_case(images), labels=conv) if images is not None else None
    if data is not None:
        grids = Grid(labels.shape, prediction.affine), Grid(data.shape, data.affine)
        try:  # another orientation is reoriented exactly; other voxels over the same view: nearest, noted
            drawn, note_moved = labels_onto(labels, *grids, f"prediction {path}", f"the images of case {case_id}")
        except TumorsegError as exc:  # its volumes and diameters need no images: drawn alone
            data, apart = None, [f"not drawn over its images: {exc}"]
    if data is None:
        data = blank_case(case_id, path, labels, prediction.affine, conv)
    brain = brain_mask(list(data.images))  # as prediction saw it, a background off 0 included
    wt = whole_tumour(labels)
    measures = measure(labels, prediction.affine, conv, wt)  # in the prediction's own grid
    wt_drawn = wt if drawn is labels else whole_tumour(drawn)
    warnings = case_warnings(wt_drawn, measures, brain if images is not None and not apart else None) + apart
    notes = [n for n in (note, note_moved) if n]
    if data.truth_note:  # the truth is only drawn here: a bad one costs its overlay, not the case
        (warnings if data.truth is None else notes).append(data.truth_note)
    warnings += [data.unread] if data.unread else []
    unc_map, score = None, None
    if uncertainty is not None:
        try:
            unc_map = _load_uncertainty(uncertainty, case_id, labels.shape)
            score = uncertainty_score(unc_map, wt)
            if drawn is not labels:
                unc_map = resample(unc_map, *grids, order=1, mode="nearest")
        except TumorsegError as exc:
            warnings.append(f"{exc}; uncertainty not shown")
    shown = measures  # the diameters drawn where the prediction lies over images stored otherwise
    if drawn is not labels:
        move = np.linalg.inv(grids[1].affine) @ grids[0].affine  # prediction voxels -> image voxels
        shown = replace(measures, **{k: d.onto(move, axial_axis(grids[1].affine)) for k in ("enhancing", "whole")
                                     if (d := getattr(measures, k)) is not None})
    figures = save_figures(make_scene(data, drawn, brain, wt_drawn), shown, unc_map, figure_dir, case_id)
    return CaseReport(case_id, path, conv, measures, warnings, figures, score, notes=notes,
                      model=model_from_header(prediction.header))


def _load_uncertainty(path: Path, case_id: str, shape: tuple[int, ...]) -> np.ndarray:
    vol = load_nifti(path, case_id)
    if vol.data.shape != shape:
        raise TumorsegError(f"{path}: uncertainty map has shape {vol.data.shape}, the prediction {shape}")
    data = np.asarray(vol.data, dtype=np.float32)
    if not np.isfinite(data).all():
        raise TumorsegError(f"{path}: uncertainty map holds NaN or infinite values")
    return data
