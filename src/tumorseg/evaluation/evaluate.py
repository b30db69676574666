"""Score a folder of predictions against BraTS ground truth, as the BraTS leaderboards do.

Pairing: `PRED_DIR/<case_id>.nii.gz` (or `.nii`) is scored against the segmentation of case
`<case_id>` that `layouts.discover_cases(GT_DIR, need_images=False)` finds: any dataset
layout, case folders holding only a segmentation, or a flat folder of `<case>.nii.gz` label
files. Label conventions: the truth's comes from its layout (a flat folder: BraTS 2023+ ids
name `brats2023`; for other names label 3 present means `brats2023`, else `brats2020`; `labels`
forces one), the prediction's from the tag
`predict` writes in its header, else the truth's; regions are compared by meaning.

Metrics per case and region: the BraTS 2020 ones of `evaluation.metrics` (CaPTk / medpy
definitions, see `shared/BRATS_METRICS.md`) and the BraTS 2023+ lesion-wise Dice and HD95 of
`evaluation.lesionwise` (the challenge from the case id, `BraTS-MEN-...` -> MEN, else GLI, or
`challenge`); the voxel spacing comes from the ground truth's header.

Every ground-truth case is accounted for, never silently skipped:
- status "ok": scored.
- status "missing": no prediction file; scored as failed (`metrics.FAILED_CASE`: Dice 0,
  HD95 373.13 as BraTS says, and sensitivity 0, specificity 0, the worst value of each).
- status "error": the prediction could not be scored (unreadable file, shape or affine
  different from the ground truth, labels outside 0/1/2/4, both `.nii` and `.nii.gz`);
  one line says why, and the case is scored as failed like a missing one.
- status "truth_error": the ground truth itself is unusable (unreadable, labels outside its
  convention); one line says why, and the case is kept out of the summary whether or not it has
  a prediction: a broken truth file is not the model's failure. `evaluate` still exits non-zero.
Ground-truth cases without a segmentation are skipped with a note; predictions without a
ground-truth case are listed as extra.

Summary (over the cases above but truth errors, failed ones included, as BraTS leaderboards): per region and
metric the mean, standard deviation (numpy, ddof=0), median and the 25th / 75th percentiles
(numpy default, linear).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Collection

import numpy as np

from ..bars import progress_bar
from ..errors import TumorsegError
from ..geometry import SUBVOXEL, Grid, labels_onto
from ..io import NIFTI_RE, Volume, check_writable, load_labels, nifti_files, write_text
from ..labels import (BRATS2020, CONVENTIONS, REGIONS, LabelConvention, convention, convention_from_header,
                      NOT_LABELS, model_from_header, read_as)
from ..layouts import BESIDE, UNNAMED_CONVENTION, Case, discover_cases, folder_labels
from ..lock import live_holder
from ..log import say
from ..pool import worker_pool
from .lesionwise import case_challenge, challenge_name, lesionwise_metrics
from .metrics import FAILED_CASE, check_labels, region_metrics
from .results import (STATUS_ERROR, STATUS_MISSING, STATUS_OK, STATUS_TRUTH, CaseResult, EvaluationResult,
                      failed_metrics, rows_to_csv, summarize)

PREDICT_EXTRAS: tuple[str, ...] = ("_probabilities", "_uncertainty")


def detect_labels(seg: np.ndarray) -> LabelConvention:
    """A guess for a segmentation that names no convention (a flat folder of label files):
    label 3 means BraTS 2023 (ET = 3), anything else BraTS 2020 (whose regions for 0, 1, 2
    are the same). MSD-numbered files need `labels="msd"` (or a tagged prediction, see
    `case_conventions`)."""
    return CONVENTIONS["brats2023"] if (np.asarray(seg) == 3).any() else BRATS2020


def case_conventions(
    pred: Volume, gt: Volume, gt_labels: LabelConvention | None, pred_labels: LabelConvention | None
) -> tuple[LabelConvention, LabelConvention, str]:
    """(prediction's, truth's) conventions and a note when one was guessed.

    The prediction's: `pred_labels`, else its header tag, else the truth's. The truth's:
    `gt_labels` (its layout or `--labels`), else the prediction's when the truth's values fit
    it, else a guess from its values (`detect_labels`). An untagged prediction whose 4 could
    mean BraTS 2020's enhancing tumour or BraTS 2024's resection cavity is an error: guessing
    wrong would silently score its enhancing tumour as absent.
    """
    pred_conv = pred_labels or convention_from_header(pred.header)
    note = ""
    gt_conv = gt_labels
    if gt_conv is None:
        if pred_conv is not None and not pred_conv.invalid(np.asarray(gt.data)):
            gt_conv, why = pred_conv, "as the prediction's header says"
        else:
            gt_conv, why = detect_labels(gt.data), "guessed from its values"
        note = f"ground truth read as {gt_conv.name} labels ({why}; --labels to set)"
    if pred_conv is None:
        values = np.asarray(pred.data)
        if gt_conv.cavity == 4 and (values == 4).any() and not (values == 3).any():
            raise TumorsegError(
                f"{pred.path}: untagged prediction holds label 4 but no 3: BraTS 2020 enhancing tumour or a "
                f"{gt_conv.name} resection cavity? say which with --pred-labels"
            )
        try:
            check_labels(values, "untagged prediction", gt_conv)
        except ValueError as exc:
            advice = "" if NOT_LABELS in str(exc) else (f", read as its ground truth's; say its convention with "
                                                        f"--pred-labels ({', '.join(CONVENTIONS)})")
            raise TumorsegError(f"{pred.path}: {exc}{advice}") from None
        pred_conv = gt_conv
        untagged = read_as(gt_conv, "its ground truth's")
        note = f"{note}; {untagged}" if note else untagged
    return pred_conv, gt_conv, note


def find_predictions(pred_dir: str | os.PathLike) -> tuple[dict[str, Path], dict[str, str]]:
    """Prediction files `<case_id>.nii[.gz]` in `pred_dir` -> ({case id: path}, {case id: conflict})."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise TumorsegError(f"{pred_dir}: no such folder (expected predictions <case_id>.nii.gz)")
    found: dict[str, list[Path]] = {}
    for path in nifti_files(pred_dir):
        stem = NIFTI_RE.match(path.name)["stem"]
        if not stem.endswith(PREDICT_EXTRAS):  # `<case>_probabilities` / `_uncertainty`: `predict` extras, not labels
            found.setdefault(stem, []).append(path)
    if not found:
        raise TumorsegError(f"{pred_dir}: no predictions found (expected <case_id>.nii.gz files)")
    preds = {cid: paths[0] for cid, paths in found.items() if len(paths) == 1}
    conflicts = {
        cid: f"{cid}: more than one prediction ({', '.join(p.name for p in paths)}); keep one"
        for cid, paths in found.items()
        if len(paths) > 1
    }
    return preds, conflicts


def on_truth_grid(case_id: str, pred: Volume, gt: Volume) -> tuple[Volume, str | None]:
    """The prediction on the truth's grid (`geometry.labels_onto`: exactly reoriented, or resampled
    with a note when it covers the truth's field of view on other voxels, as a 0.9 mm T1's grid
    that predict wrote on; otherwise refused, naming both files)."""
    src, dst = Grid(pred.data.shape[:3], pred.affine), Grid(gt.data.shape[:3], gt.affine)
    try:
        data, moved = labels_onto(pred.data, src, dst, f"prediction {pred.path}", f"the ground truth {gt.path.name}")
    except TumorsegError as exc:  # predict writes on its scans' grid: this truth is on another
        raise TumorsegError(f"{case_id}: {exc}; is the ground truth on its scans' grid?") from None
    # one wording per kind for all cases: a folder of such predictions makes one note (`notes.grouped`)
    note = moved and ("prediction resampled onto its ground truth's grid (nearest neighbour)" if "resampled" in moved
                      else f"prediction taken as on its ground truth's voxels (centres under {SUBVOXEL} voxel apart)")
    return replace(pred, data=data, affine=gt.affine), note


def score_regions(
    case_id: str, pred: Volume, gt: Volume, gt_labels: LabelConvention | None, pred_labels: LabelConvention | None,
) -> tuple[dict[str, dict[str, float]], LabelConvention, LabelConvention, str | None]:
    """The BraTS 2020 region metrics of a read prediction against its read truth, the two
    conventions and any note on a guessed one (`case_conventions`).

    The prediction is on the truth's grid (`on_truth_grid`); distances use the truth's voxel sizes.

    Raises:
        TumorsegError: labels lie outside their convention (naming both files).
    """
    try:
        pred_conv, gt_conv, note = case_conventions(pred, gt, gt_labels, pred_labels)
        metrics = region_metrics(pred.data, gt.data, gt.spacing, pred_conv, gt_conv)
    except ValueError as exc:
        raise TumorsegError(f"{case_id}: {exc} (prediction {pred.path}, ground truth {gt.path.name})") from None
    return metrics, pred_conv, gt_conv, note


def evaluate_case(
    case_id: str,
    pred_path: Path | None,
    seg_path: Path,
    gt_labels: LabelConvention | None = BRATS2020,
    challenge: str | None = None,
    pred_labels: LabelConvention | None = None,
    unscored: tuple[str, str] | None = None,
    folder: LabelConvention | None = None,
) -> CaseResult:
    """Score one prediction file against one ground-truth file; errors become a status.

    Conventions as `case_conventions` decides them; a guessed one is noted in the message. An
    untagged prediction takes `folder`, the convention a dataset.json beside it names, where given.
    `unscored` (status, message) is a case without a prediction to read (missing, or `.nii`
    beside `.nii.gz`): failed, once its truth is found usable, since an unusable truth is no
    model's failure.
    """
    try:
        gt = load_labels(seg_path, case_id)
        if gt_labels is not None:
            check_labels(gt.data, f"ground truth {seg_path}", gt_labels)
        elif all(conv.invalid(gt.data) for conv in CONVENTIONS.values()):  # a label map of no convention
            check_labels(gt.data, f"ground truth {seg_path}", detect_labels(gt.data))
    except (TumorsegError, ValueError) as exc:
        message = str(exc) if str(exc).startswith(f"{case_id}: ") else f"{case_id}: {exc}"
        return CaseResult(case_id, STATUS_TRUTH, {r: {} for r in REGIONS}, message)
    if unscored is not None:
        return CaseResult(case_id, unscored[0], failed_metrics(), unscored[1])
    try:
        pred = load_labels(pred_path, case_id)
        by_folder = folder is not None and pred_labels is None and convention_from_header(pred.header) is None
        metrics, notes = score_case(case_id, pred, gt, gt_labels, folder if by_folder else pred_labels, challenge)
        if by_folder:
            notes.append(read_as(folder, BESIDE))
    except TumorsegError as exc:
        return CaseResult(case_id, STATUS_ERROR, failed_metrics(), str(exc))
    note = "; ".join(notes)
    return CaseResult(case_id, STATUS_OK, metrics, note and f"{case_id}: {note}", model_from_header(pred.header) or "")


def score_case(
    case_id: str, pred: Volume, gt: Volume, gt_labels: LabelConvention | None, pred_labels: LabelConvention | None,
    challenge: str | None = None,
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Every metric of a read prediction against its read truth, per region (the BraTS 2020 ones
    and the lesion-wise ones with their counts), and the notes (a prediction moved onto the
    truth's grid, a convention guessed). Raises TumorsegError where the two cannot be compared."""
    pred, moved = on_truth_grid(case_id, pred, gt)  # once, for the region and the lesion-wise metrics
    metrics, pred_conv, gt_conv, note = score_regions(case_id, pred, gt, gt_labels, pred_labels)
    lesions = lesionwise_metrics(pred_conv.regions(pred.data), gt_conv.regions(gt.data), gt.spacing,
                                 case_challenge(case_id, challenge))
    return {r: {**metrics[r], **lesions[r]} for r in REGIONS}, [n for n in (moved, note) if n]


def _run_jobs(jobs: list[tuple], workers: int, progress: bool) -> list[CaseResult]:
    bar = dict(total=len(jobs), desc="evaluate", unit="case", disable=not progress)
    if workers <= 1 or len(jobs) <= 1:
        return [evaluate_case(*job) for job in progress_bar(jobs, **bar)]
    with worker_pool(min(workers, len(jobs))) as pool:  # in the order they end: `evaluate` sorts them
        return [result for _, result in progress_bar(pool.as_done(evaluate_case, jobs), **bar)]


def labelled(cases: list[Case], gt_dir: str | os.PathLike) -> list[Case]:
    """The ground-truth cases (of `gt_dir`) that hold a segmentation; TumorsegError if none does."""
    with_seg = [c for c in cases if c.seg is not None]
    if not with_seg:
        raise TumorsegError(f"{gt_dir}: no ground-truth segmentations found")
    return with_seg


def truth_labels(case: Case) -> LabelConvention | None:
    """The convention a ground-truth case's layout names; None for a flat folder of label files,
    `plain` and `bids` case folders and case lists, whose names say nothing of it (`case_conventions`
    then tells it from the labels)."""
    return None if case.layout in UNNAMED_CONVENTION else case.labels


def _pair_cases(
    gt_dir: str | os.PathLike, pred_dir: str | os.PathLike, labels: str | None, challenge: str | None,
    pred_labels: str | None = None, only: Collection[str] | None = None, only_predicted: bool = False,
) -> tuple[list[tuple], dict[str, list[str]]]:
    """Jobs to score (every segmented case: a missing or conflicting prediction's truth is
    checked too) and the lists to report."""
    cases = discover_cases(gt_dir, need_images=False, only=only)
    preds, conflicts = find_predictions(pred_dir)
    if only is not None:  # the other predictions in the folder are not asked about
        asked = {c.case_id for c in cases}
        preds, conflicts = ({k: v for k, v in d.items() if k in asked} for d in (preds, conflicts))
    with_seg = labelled(cases, gt_dir)
    predicted = [c for c in with_seg if c.case_id in preds or c.case_id in conflicts]
    if not predicted and (preds or conflicts):  # predictions of other cases: the wrong truth folder
        ids = sorted({**preds, **conflicts})
        some = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        raise TumorsegError(f"{pred_dir}: none of its predictions ({some}) is a case of {gt_dir} "
                            f"({len(with_seg)} segmented cases); give the ground truth of these cases")
    if only_predicted:
        with_seg = predicted
    forced = convention(labels) if labels else None
    pred_conv = convention(pred_labels) if pred_labels else None
    folder = None if pred_conv else folder_labels(pred_dir)  # nnU-Net's output folder names its numbers
    jobs = []
    for case in with_seg:
        cid = case.case_id
        unscored = ((STATUS_ERROR, conflicts[cid]) if cid in conflicts else None if cid in preds
                    else (STATUS_MISSING, f"{cid}: no prediction {cid}.nii.gz in {pred_dir}"))
        jobs.append((cid, preds.get(cid), case.seg, forced or truth_labels(case), challenge, pred_conv, unscored, folder))
    gt_ids = {c.case_id for c in with_seg}
    lists = {
        "extra": sorted((set(preds) | set(conflicts)) - gt_ids),
        "skipped": [f"{c.case_id}: no segmentation in {c.folder}" for c in cases if c.seg is None],
        "notes": [c.seg_note for c in with_seg if c.seg_note],
    }
    return jobs, lists


def evaluate(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    out_csv: str | os.PathLike | None = None,
    out_json: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int = 1,
    labels: str | None = None,
    challenge: str | None = None,
    pred_labels: str | None = None,
    cases: Collection[str] | None = None,
    only_predicted: bool = False,
) -> EvaluationResult:
    """Score every prediction in `pred_dir` against the BraTS cases in `gt_dir`.

    Args:
        pred_dir: folder of `<case_id>.nii.gz` (or `.nii`) label maps, in any label convention
            (see `pred_labels`).
        gt_dir: the ground truth: a dataset in any layout `layouts.discover_cases` finds, case
            folders holding only a segmentation, or a flat folder of `<case>.nii.gz` label files.
        out_csv: per-case CSV to write (atomically); None writes none.
        out_json: summary JSON; default `<csv stem>_summary.json` beside `out_csv`.
        progress: show a tqdm bar over the cases.
        workers: processes scoring cases in parallel (1: in this process).
        labels: the ground truth's label convention (a name of `labels.CONVENTIONS`: "brats2020",
            "brats2023", "msd", "peds2024");
            None detects it from the layout.
        challenge: lesion-wise parameters (GLI, PED, SSA, MEN, MET); None: from each case id.
        pred_labels: the predictions' convention; None reads the tag `predict` writes in
            each file's header, else takes the ground truth's.
        cases: only the ground-truth cases of these ids (None: all in `gt_dir`).
        only_predicted: only the ground-truth cases with a prediction (the cases a `predict
            --cases` run chose); otherwise a case without one is scored as failed, as BraTS does.

    Raises:
        TumorsegError: a folder is missing, holds no predictions or no segmentations.
    """
    challenge = challenge_name(challenge) if challenge is not None else None
    if (writer := live_holder(pred_dir)) is not None:
        say(f"warning: {pred_dir} is being written by {writer}: the cases it has not finished are scored as missing")
    jobs, lists = _pair_cases(gt_dir, pred_dir, labels, challenge, pred_labels, cases, only_predicted)
    for out in (out_csv, out_json):
        if out is not None:  # the inputs are checked; now, before the scoring a failed write would lose
            if Path(out).is_dir():
                raise TumorsegError(f"{out}: a folder; give the file to write (--out FOLDER/metrics.csv)")
            check_writable(Path(out).parent, "write the metrics elsewhere (--out)")
    every = sorted(_run_jobs(jobs, workers, progress), key=lambda r: r.case_id)
    truth_errors = {r.case_id: r.message for r in every if r.status == STATUS_TRUTH}
    rows = [r for r in every if r.status != STATUS_TRUTH]
    if not rows:
        raise TumorsegError(f"{gt_dir}: no ground truth could be used ({len(truth_errors)} unusable; the first: "
                            f"{next(iter(truth_errors.values()))})")
    lists["notes"] += [r.message for r in rows if r.status == STATUS_OK and r.message]
    missing = [r.case_id for r in rows if r.status == STATUS_MISSING]
    errors = {r.case_id: r.message for r in rows if r.status == STATUS_ERROR}
    summary = {
        "cases": len(rows),
        "evaluated": sum(r.status == STATUS_OK for r in rows),
        "failed": len(rows) - sum(r.status == STATUS_OK for r in rows),
        "failed_case_values": dict(FAILED_CASE),
        "metrics": summarize(rows),
        "lesions": {r: {k: sum(int(row.metrics[r][f"lesion_{k}"]) for row in rows if row.status == STATUS_OK)
                        for k in ("tp", "fn", "fp")} for r in REGIONS},
        "missing": missing,
        "errors": errors,
        "truth_errors": truth_errors,
        **lists,
        "challenges": ", ".join(sorted({case_challenge(r.case_id, challenge) for r in rows})),
        "models": dict(Counter(r.model for r in rows if r.model).most_common()),
        "definitions": (
            "dice, hd95, sensitivity, specificity: BraTS 2020 (CaPTk/medpy), pooled HD95 in mm; "
            "lesion_dice, lesion_hd95: BraTS 2023+ lesion-wise (BraTS-2023-Metrics), per challenge's "
            "dilation and volume threshold, 374 mm per missed or false-positive lesion; "
            "lesions: their Num_TP, Num_FN, Num_FP summed over the evaluated cases; "
            "std ddof=0; quantiles numpy linear"
        ),
    }
    result = EvaluationResult(every, summary, missing, lists["extra"], errors, truth_errors, lists["skipped"],
                              lists["notes"])
    _write_outputs(result, out_csv, out_json)
    return result


def _write_outputs(result: EvaluationResult, out_csv: Any, out_json: Any) -> None:
    if out_csv is not None:
        result.csv_path = Path(out_csv)
        write_text(result.csv_path, rows_to_csv(result.rows))
        if out_json is None:
            out_json = result.csv_path.with_name(f"{result.csv_path.stem}_summary.json")
    if out_json is not None:
        result.json_path = Path(out_json)
        write_text(result.json_path, json.dumps(result.summary, indent=2) + "\n")
