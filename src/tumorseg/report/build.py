"""`report`: a folder of predictions -> `volumes.csv`, `index.html` and a page per case.

Output (`out`, default `PRED_DIR/report`):
    index.html                 the cohort: summary statistics, sortable table, thumbnails, links
    volumes.csv                one row per case (columns: `table.columns`)
    cases/<case>.html          one page per case
    cases/<case>_{views,diameters,uncertainty,thumb}.png

Predictions are `PRED_DIR/<case>.nii.gz` (as `tumorseg predict` writes them, any label
convention its header tag names); `<case>_uncertainty.nii.gz` beside one adds the uncertainty
view and score. A case that cannot be read is one line naming the file; the others are still
reported. Each prediction is read once: measured, drawn and (with `gt`, else the images'
segmentations) scored from that read.

A case reported is recorded (`cases/<case>.json`, `record`): a re-run, after a kill or over the
same folder, redoes only the cases whose files or settings changed.
Re-running into the same folder replaces the report: once the new index is in place, the pages
and figures the report wrote for cases not in this run are removed, so the index never links to a
missing page. A `cases/<case>.html` is the report's only when it begins as the report writes it,
and `cases/<case>_<kind>.png` only beside such a page, or drawn by this run for a case that then
failed (so unlinked); every other file stays.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..bars import progress_bar
from ..errors import TumorsegError
from ..evaluation.evaluate import find_predictions
from ..io import load_labels, sweep_stale_temps, write_text
from ..labels import convention
from ..layouts import discover_cases, folder_labels
from ..lock import folder_lock, live_holder
from ..log import say
from .case import CaseReport, prediction_labels, report_case
from .figures import figure_paths
from .html import case_page, case_page_name, index_page, page_case_id
from .record import load_record, record_key, record_path, save_record
from .table import columns, csv_text, summary
from .truth import score, truth_cases

UNCERTAINTY_SUFFIX = "_uncertainty"
CASES_DIR = "cases"


@dataclass
class ReportResult:
    """What `report` wrote: the cases reported, those that failed (case id -> why), the files."""

    cases: list[CaseReport]
    failed: dict[str, str]
    index: Path
    csv: Path
    pages: list[Path] = field(default_factory=list)


def report(
    pred_dir: str | os.PathLike,
    images: str | os.PathLike | None = None,
    gt: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    pred_labels: str | None = None,
) -> ReportResult:
    """Measure, check and draw every prediction in `pred_dir`, and write the report.

    Args:
        pred_dir: folder of `<case>.nii.gz` label maps (and optional `<case>_uncertainty.nii.gz`).
        images: the cases' dataset (any layout `layouts.discover_cases` finds): the views show
            the modalities, the brain-mask edge is checked, and untagged predictions take its
            label convention. None: labels on black.
        gt: ground truth for the BraTS metrics per case (as `tumorseg evaluate` takes it). None:
            the segmentations of `images`, where it holds any (the views draw them as the truth).
        out: report folder; default `pred_dir/report`.
        progress: show a progress bar over the cases.
        pred_labels: the predictions' label convention (a name of `labels.CONVENTIONS`: "brats2020",
            "brats2023", "msd", "peds2024"); None: each
            prediction's header tag, else its images' or its truth's dataset's, else a guess from its
            values, the last three said in the case's notes (`case.prediction_labels`).

    Raises:
        TumorsegError: a folder is missing or holds no predictions (a bad case only fails itself).
    """
    pred_dir = Path(pred_dir)
    preds, conflicts = find_predictions(pred_dir)  # label maps only: `predict`'s extras are left out
    uncertainty = {cid: pred_dir / f"{cid}{UNCERTAINTY_SUFFIX}.nii.gz" for cid in preds
                   if (pred_dir / f"{cid}{UNCERTAINTY_SUFFIX}.nii.gz").is_file()}
    if not preds:
        raise TumorsegError(f"{pred_dir}: no predictions found (expected <case_id>.nii.gz files)")
    if (writer := live_holder(pred_dir)) is not None:
        say(f"warning: {pred_dir} is being written by {writer}: the cases it has not finished are not in this report")
    out = Path(out) if out is not None else pred_dir / "report"
    image_cases = {c.case_id: c for c in discover_cases(images)} if images is not None else {}
    truths = truth_cases(gt) if gt is not None else None
    truth_source = str(gt) if gt is not None else "not given"
    from_images = truths is None and any(c.seg is not None for c in image_cases.values())
    if from_images:
        gt = images  # the views draw the images' segmentations as the ground truth: they are scored too
        truths = {cid: c for cid, c in image_cases.items() if c.seg is not None}
        truth_source = f"{images} (the images' segmentations)"
    forced = convention(pred_labels) if pred_labels else None
    beside = None if forced else folder_labels(pred_dir)  # nnU-Net's output folder names its numbers
    started = time.time() - 1.0  # file times come from a coarser clock
    with folder_lock(out, "report"):
        for folder in (out, out / CASES_DIR):
            sweep_stale_temps(folder)  # what a killed run left
        failed = dict(conflicts)
        reported: list[CaseReport] = []
        settings = {"images": images, "gt": gt, "pred_labels": pred_labels,
                    **({"dataset.json labels": beside.tag()} if beside else {})}  # earlier reports' records hold
        for cid, path in progress_bar(sorted(preds.items()), desc="report", unit="case", disable=not progress):
            truth = truths.get(cid) if truths is not None else None
            scans = image_cases.get(cid)
            read = [c for c in (scans, truth) if c is not None]  # their files and how their labels are read
            key = record_key([path, uncertainty.get(cid), *(scans.images.values() if scans else ()),
                              *(c.seg for c in read)], {**settings, "read as": [(c.layout, c.labels.tag()) for c in read]})
            kept = load_record(record_path(out / CASES_DIR, cid), key)
            if kept is not None:  # reported before from these very files: a re-run after a kill goes on
                reported.append(kept)
                continue
            try:
                prediction = load_labels(path, cid)  # the one read of this file
                labels = prediction_labels(prediction, image_cases.get(cid), truth, forced, beside)
                case = report_case(cid, prediction, image_cases.get(cid), labels, uncertainty.get(cid), out / CASES_DIR)
                if images is not None and cid not in image_cases:
                    case.warnings.append(f"no images for this case in {images}: labels shown on black, "
                                         "brain edge not checked")
                if truths is not None and (truth is not None or not from_images):  # unlabelled images: none asked
                    case.metrics, warnings, notes = score(prediction, truth, gt, case.labels)
                    case.warnings += warnings
                    case.notes += notes
            except TumorsegError as exc:
                failed[cid] = str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a bug on one odd case: still one line, the others go on
                failed[cid] = f"{cid}: {type(exc).__name__}: {exc}"
                continue
            reported.append(case)
            with contextlib.suppress(TumorsegError):  # without its record the case is only done again next time
                save_record(record_path(out / CASES_DIR, cid), case, key)
        sources = {"predictions": pred_dir, "images": images or "not given", "ground truth": truth_source}
        result = _write(reported, failed, truths is not None, out, {k: str(v) for k, v in sources.items()})
        _remove_stale(out / CASES_DIR, result, started)
        return result


def _write(cases: list[CaseReport], failed: dict[str, str], with_metrics: bool, out: Path,
           sources: dict[str, str]) -> ReportResult:
    cols = columns(cases, with_metrics)
    result = ReportResult(cases, failed, out / "index.html", out / "volumes.csv")
    write_text(result.csv, csv_text(cases, cols, failed))
    for case in cases:
        path = out / CASES_DIR / case_page_name(case.case_id)
        write_text(path, case_page(case, cols, result.index))
        result.pages.append(path)
    write_text(result.index, index_page(cases, cols, summary(cases, cols), failed, sources, out))
    return result


def _remove_stale(folder: Path, result: ReportResult, started: float) -> None:
    """Remove the pages the report wrote in `folder` (`html.page_case_id`) that this run did not
    write and those pages' cases' figures this run did not link, and the figures this run drew
    (modified since `started`) for cases that then failed; nothing else. Called once the new index,
    linking only to this run's pages, is in place."""
    written = ({p.name for p in result.pages} | {p.name for c in result.cases for p in c.figures.values()}
               | {record_path(folder, c.case_id).name for c in result.cases})
    owners = ({page_case_id(p) for p in folder.iterdir()} - {None}) if folder.is_dir() else set()
    for cid in owners | set(result.failed):
        for path in (folder / case_page_name(cid), record_path(folder, cid), *figure_paths(folder, cid).values()):
            if path.name not in written and (cid in owners or _modified_since(path, started)):
                path.unlink(missing_ok=True)


def _modified_since(path: Path, started: float) -> bool:
    try:
        return path.stat().st_mtime >= started
    except OSError:
        return False
