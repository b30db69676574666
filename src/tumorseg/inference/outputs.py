"""What `predict` leaves in its output folder, and how a re-run reads it back.

Per case: the labels (their header records the label convention, the model's fingerprint and the
scans' fingerprint), then the probabilities, uncertainty map and plot where asked for. A folder
holds one model's predictions, and a finished case is skipped only while its scans are the ones
its labels came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import TumorsegError
from ..io import save_nifti
from ..labels import SCANS_DIGITS, model_from_header, prediction_description, scans_from_header, tumorseg_prediction
from ..layouts import Case, files_digest

if TYPE_CHECKING:
    from .case import CasePrediction


def output_paths(
    out_dir: Path, case_id: str, probabilities: bool = False, plots: bool = False, uncertainty: bool = False
) -> list[Path]:
    """The files `predict` writes for one case: labels, then probabilities, uncertainty, plot if asked."""
    paths = [out_dir / f"{case_id}.nii.gz"]
    if probabilities:
        paths.append(out_dir / f"{case_id}_probabilities.nii.gz")
    if uncertainty:
        paths.append(out_dir / f"{case_id}_uncertainty.nii.gz")
    if plots:
        paths.append(out_dir / f"{case_id}.png")
    return paths


def scans_digest(case: Case, channels: Sequence[str]) -> str | None:
    """A fingerprint of the scans a case's labels come from (`io.file_sample_digest` of each channel's
    file, in order), recorded in the label file: a re-run skips a finished case only while its
    scans are the same files (a corrected case list, a scan exported again: predicted again).
    None where a scan cannot be read (the case's own error says why)."""
    try:
        return files_digest(case, channels)[:SCANS_DIGITS]
    except (TumorsegError, OSError):
        return None


def write_outputs(pred: CasePrediction, case: Case, paths: list[Path], probabilities: bool, plots: bool,
                  made_by: str | None, scans: str | None = None) -> list[Path]:
    """Write one case's outputs (in a writer thread while the network works on the next case).

    An earlier prediction's probabilities, uncertainty and plot go first: they record no model, so
    left beside new labels (a `--force` run, another model, a run killed before its extras) they
    would pass for this prediction's.
    """
    for extra in output_paths(paths[0].parent, case.case_id, True, True, True)[1:]:
        extra.unlink(missing_ok=True)
    description = prediction_description(pred.convention, made_by, scans)
    save_nifti(paths[0], pred.labels, pred.affine, pred.header, description=description)
    if probabilities:
        probs = np.ascontiguousarray(np.moveaxis(pred.probabilities, 0, -1), dtype=np.float32)  # (X, Y, Z, K)
        save_nifti(paths[1], probs, pred.affine, pred.header,
                   description=f"tumorseg probabilities: {','.join(pred.channels)}")
    if pred.uncertainty is not None:
        save_nifti(paths[1 + probabilities], pred.uncertainty, pred.affine, pred.header,
                   description="tumorseg flip mutual information (bits)")
    if plots:
        from ..plots.slices import save_case_plot  # matplotlib only when asked for

        save_case_plot(case, paths[0], paths[-1])
    return paths


def made_by_others(out_dir: Path, made_by: str | None,
                    redone: set[str]) -> tuple[list[str], list[str], dict[str, str]]:
    """Cases (not `redone`) whose label file in `out_dir` records another `Predictor.made_by`
    (another model or other settings), those tumorseg wrote before it recorded one (unknown), and
    the scans' fingerprint (`scans_digest`) each of this model's files records. Other tools' files
    are not judged."""
    if made_by is None or not out_dir.is_dir():
        return [], [], {}
    import nibabel as nib

    from ..evaluation.evaluate import find_predictions  # `<case>.nii[.gz]` label maps, as evaluate reads them

    try:
        files = find_predictions(out_dir)[0]
    except TumorsegError:  # none there yet
        return [], [], {}
    other, unknown, scans = [], [], {}
    for case_id, path in sorted(files.items()):
        if case_id in redone:
            continue
        try:
            header = nib.load(path).header
        except Exception:  # noqa: BLE001 - not readable as NIfTI: not judged here (evaluate names it)
            continue
        model = model_from_header(header)
        if model is not None and model != made_by:
            other.append(case_id)
        elif model is None and tumorseg_prediction(header):
            unknown.append(case_id)
        elif model is not None and (recorded := scans_from_header(header)) is not None:
            scans[case_id] = recorded
    return other, unknown, scans


def check_one_model(out_dir: Path, other: list[str], run_ids: set[str], redo_others: bool) -> None:
    """A folder of predictions is one model's: another's files that this run would keep (skipped,
    or of cases outside it) refuse it in one line."""
    outside = set(other) - run_ids
    if outside or (other and not redo_others):
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        fix = ("predict into another folder" if outside else
               "--force redoes them with this one, or predict into another folder")
        raise TumorsegError(f"{out_dir}: {len(other)} prediction(s) there come from another model or other settings "
                            f"({shown}); {fix}")
