"""One case of the report: read its prediction (and images, uncertainty), measure, check, draw."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import TumorsegError
from ..evaluation.evaluate import AFFINE_ATOL_MM
from ..io import load_nifti
from ..labels import LabelConvention, convention_from_header
from ..layouts import Case
from ..plots.slices import raw_to_labels, load_case
from .checks import case_warnings
from .figures import blank_case, make_scene, save_figures
from .measure import TUMOUR_CLASSES, Measures, measure, uncertainty_score


@dataclass
class CaseReport:
    """Everything the report shows of one case.

    labels: the prediction's label convention (its header tag, else the default).
    figures: kind ("views", "diameters", "uncertainty", "thumbnail") -> PNG path.
    uncertainty: mean uncertainty inside the predicted whole tumour, when a map exists.
    metrics: {region: {metric: value}} against the ground truth, with --gt.
    """

    case_id: str
    prediction: Path
    labels: LabelConvention
    measures: Measures
    warnings: list[str]
    figures: dict[str, Path]
    uncertainty: float | None = None
    metrics: dict[str, dict[str, float]] | None = None


def report_case(
    case_id: str,
    prediction: Path,
    images: Case | None,
    default_labels: LabelConvention,
    uncertainty: Path | None,
    figure_dir: Path,
) -> CaseReport:
    """Measure and draw one prediction; a bad file raises `TumorsegError` naming it."""
    vol = load_nifti(prediction, case_id)
    conv = convention_from_header(vol.header) or (images.labels if images is not None else default_labels)
    labels = raw_to_labels(vol.data, prediction, conv)
    notes = []
    if images is not None:
        data = replace(load_case(images), labels=conv)
        if data.shape != labels.shape:
            raise TumorsegError(f"{prediction}: prediction has shape {labels.shape}, "
                                f"but the images of case {case_id} have {data.shape}")
        if not np.allclose(data.affine, vol.affine, rtol=0, atol=AFFINE_ATOL_MM):
            notes.append(f"the prediction's affine differs from its images' ({prediction.name}): "
                         "measurements use the prediction's header")
        brain = np.any(data.images != 0, axis=0)
    else:
        data, brain = blank_case(case_id, prediction, labels, vol.affine, conv), None
    measures = measure(labels, vol.affine, conv)
    wt = np.isin(labels, TUMOUR_CLASSES["WT"])
    warnings = case_warnings(wt, measures, brain) + notes
    unc_map, score = None, None
    if uncertainty is not None:
        try:
            unc_map = _load_uncertainty(uncertainty, case_id, labels.shape)
            score = uncertainty_score(unc_map, wt)
        except TumorsegError as exc:
            warnings.append(f"{exc}; uncertainty not shown")
    figures = save_figures(make_scene(data, labels), measures, unc_map, figure_dir, case_id)
    return CaseReport(case_id, prediction, conv, measures, warnings, figures, score)


def _load_uncertainty(path: Path, case_id: str, shape: tuple[int, ...]) -> np.ndarray:
    vol = load_nifti(path, case_id)
    if vol.data.shape != shape:
        raise TumorsegError(f"{path}: uncertainty map has shape {vol.data.shape}, the prediction {shape}")
    data = np.asarray(vol.data, dtype=np.float32)
    if not np.isfinite(data).all():
        raise TumorsegError(f"{path}: uncertainty map holds NaN or infinite values")
    return data
