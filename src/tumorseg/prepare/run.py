"""`tumorseg prepare`: every case in parallel, resumable, then the manifest and split."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..bars import progress_bar
from ..errors import TumorsegError
from ..io import MANIFEST, read_npy, sweep_stale_temps, unfinished_prepare, write_text
from ..geometry import grid_of, network_grid
from ..layouts import Case, dataset_layout, discover_cases
from ..lock import folder_lock
from ..log import say
from ..notes import grouped
from ..pool import worker_pool
from ..settings import settings_object
from .case import case_files_digest, prepare_case, record_path, remove_arrays
from .config import PrepareConfig, default_workers
from .split import split_cases

RECORDED = ("kept", "dropped", "unlabelled")  # the statuses a case's record is saved with (a failed case has none)


@dataclass
class PrepareResult:
    """What a prepare run did: `manifest` is what it wrote to manifest.json, `failed` the cases that
    could not be prepared (case id -> why), `skipped` how many were already prepared."""

    out_dir: Path
    manifest: dict
    failed: dict[str, str] = field(default_factory=dict)
    skipped: int = 0

    @property
    def kept(self) -> list[str]:
        return [c["case_id"] for c in self.manifest["cases"] if c["status"] == "kept"]


def _run_one(case: Case, config: PrepareConfig, out_dir: Path) -> dict:
    """Worker entry point: a record, or an error record naming the case (never raises)."""
    try:
        return prepare_case(case, config, out_dir)
    except TumorsegError as exc:
        reason = str(exc)
    except (MemoryError, Exception) as exc:  # a bug or resource problem: still name the case
        reason = f"{case.case_id}: {type(exc).__name__}: {exc}"
    with contextlib.suppress(OSError):  # nothing of an earlier run left vouching for the case
        remove_arrays(out_dir, case.case_id)
        record_path(out_dir, case.case_id).unlink(missing_ok=True)
    return {"case_id": case.case_id, "status": "failed", "reason": reason}


def _finished(case: Case, config: PrepareConfig, out_dir: Path) -> dict | None:
    """The saved record of a case already prepared with the same settings from the same files, else None."""
    path = record_path(out_dir, case.case_id)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not _well_formed(record, case.case_id) or record.get("settings") != config.case_settings():
        return None
    if "files_digest" in record:  # records from before it was kept: taken as they are
        try:
            if record["files_digest"] != case_files_digest(case, config):
                return None  # a scan or segmentation replaced since (a corrected label map): prepared again
        except (TumorsegError, OSError):
            return None  # the case's own error says why
    needed = [] if record["status"] == "dropped" else ["images"] + (["masks"] if record["status"] == "kept" else [])
    size = tuple(stop - start for start, stop in record.get("crop_box", ()))
    shapes = {"images": (len(config.channels), *size), "masks": size}
    for kind in needed:  # an array emptied, cut short or replaced since is done again
        try:
            if read_npy(out_dir / kind / f"{case.case_id}.npy").shape != shapes[kind]:
                return None
        except TumorsegError:
            return None
    return record


def _well_formed(record: object, case_id: str) -> bool:
    """Whether `record` is one `prepare_case` writes for this case: a damaged or hand-edited one
    is prepared again rather than trusted (a status it never writes had dropped the case)."""
    if not isinstance(record, dict) or record.get("case_id") != case_id or record.get("status") not in RECORDED:
        return False
    box = record.get("crop_box")
    return isinstance(box, list) and len(box) == 3 and all(
        isinstance(b, list) and len(b) == 2 and all(type(v) is int for v in b) and b[0] < b[1] for b in box)


def prepare(
    data_dir: str | Path,
    out_dir: str | Path,
    config: PrepareConfig | dict | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Prepare every case under `data_dir` into `out_dir` (images/, masks/, records/, manifest.json).

    Args:
        data_dir: a dataset in any layout `layouts.discover_cases` finds, or a cases.csv.
        out_dir: the prepared folder (created); cases already prepared there with the same
            settings are skipped unless `force`.
        config: the settings (`PrepareConfig`, or a dict of its fields, e.g. a recipe's
            `recipes.load_recipe("brats-gpu")["prepare"]`; None: the seed's defaults).
        workers: processes (None or 0: one per core, at most the cases to prepare).
        progress: a progress bar on stderr.

    A failing case is reported in one line and recorded (`PrepareResult.failed`); the others are
    still processed.
    """
    config = settings_object(config, PrepareConfig, "prepare")
    out_dir = Path(out_dir)
    cases = training_cases(discover_cases(data_dir))
    if config.spacing is None:
        config = replace(config, spacing=median_spacing(cases, config.channels))
    with folder_lock(out_dir, "prepare"):  # creates out_dir
        for folder in (out_dir, *(out_dir / sub for sub in ("images", "masks", "records"))):
            sweep_stale_temps(folder)  # what a killed run left
        records: dict[str, dict] = {}
        todo = []
        for case in cases:
            done = None if force else _finished(case, config, out_dir)
            if done is not None:
                records[case.case_id] = done
            else:
                todo.append(case)
        for note in grouped([c.seg_note for c in cases if c.seg_note]):
            say(f"note: {note}")
        skipped = len(records)
        if todo:  # arrays are about to change: a run cut short must not leave the old manifest vouching for them
            (out_dir / MANIFEST).unlink(missing_ok=True)
        workers = max(1, min(workers or default_workers(), len(todo) or 1))
        bar = progress_bar(total=len(todo), desc="prepare", unit="case", disable=not progress)
        if workers == 1:
            for case in todo:
                records[case.case_id] = _report(_run_one(case, config, out_dir), bar)
        else:
            with worker_pool(workers) as pool:
                for _, record in pool.as_done(_run_one, ((case, config, out_dir) for case in todo)):
                    records[record["case_id"]] = _report(record, bar)
        bar.close()
        manifest = _manifest(data_dir, config, [records[c.case_id] for c in cases], cases)
        write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1))
        failed = {r["case_id"]: r["reason"] for r in manifest["cases"] if r["status"] == "failed"}
        return PrepareResult(out_dir=out_dir, manifest=manifest, failed=failed, skipped=skipped)


def _report(record: dict, bar: tqdm) -> dict:
    if record["status"] == "failed":
        say(f"error: {record['reason']}")
    for warning in record.get("warnings", ()):
        say(f"warning: {warning}")
    bar.update(1)
    return record


def training_cases(cases: list[Case]) -> list[Case]:
    """The cases to prepare: an MSD / nnU-Net dataset's `imagesTs` (unlabelled test cases, 266 in
    Task01) only when there is no `imagesTr`; give `imagesTs` itself to prepare those."""
    if any(c.folder.name == "imagesTr" for c in cases):
        return [c for c in cases if c.folder.name != "imagesTs"]
    return cases


def median_spacing(cases: list[Case], channels: tuple[str, ...]) -> tuple[float, float, float]:
    """The median voxel size (mm, canonical axis order) of the cases' finest modality, from headers only."""
    import nibabel as nib

    from .case import reference_index

    spacings = []
    for case in cases:
        grids = []
        for m in channels:
            try:
                grids.append(network_grid(grid_of(nib.load(str(case.image(m))))))
            except Exception:  # noqa: BLE001 - a bad file fails with one line when its case is prepared
                continue
        if grids:
            spacings.append(grids[reference_index(grids)].spacing)
    if not spacings:
        return (1.0, 1.0, 1.0)
    return tuple(round(float(s), 4) for s in np.median(np.asarray(spacings), axis=0))


def _manifest(data_dir, config: PrepareConfig, records: list[dict], cases: list[Case]) -> dict:
    kept = [r["case_id"] for r in records if r["status"] == "kept"]
    split = split_cases(kept, config.val_fraction, config.seed)
    for r in records:
        r["split"] = "train" if r["case_id"] in split["train"] else "val" if r["case_id"] in split["val"] else None
    counts = {s: sum(r["status"] == s for r in records) for s in ("kept", "dropped", "unlabelled", "failed")}
    layout, labels = dataset_layout(cases)
    return {
        "format": "tumorseg-prepared-v1",
        "source": str(Path(data_dir).resolve()),
        "layout": layout,
        "labels": labels.to_dict(),
        "settings": config.to_dict(),
        "counts": counts,
        "split": split,
        "cases": records,
    }


def load_manifest(prepared_dir: str | Path) -> dict:
    """Read a prepared folder's manifest, with a clear error if it is not one."""
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        if unfinished_prepare(prepared_dir):
            raise TumorsegError(f"{prepared_dir}: its 'tumorseg prepare' did not finish (no {MANIFEST}): run it again, "
                                "it goes on from the cases done")
        raise TumorsegError(f"{prepared_dir}: not a prepared folder (no {MANIFEST}; run 'tumorseg prepare' first)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise TumorsegError(f"{path}: corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "tumorseg-prepared-v1":
        raise TumorsegError(f"{path}: not a tumorseg manifest")
    try:  # hand-edited or damaged: one line now, not an error deep inside training
        PrepareConfig.from_dict(manifest["settings"])
        if not all(isinstance(manifest["split"][k], list) for k in ("train", "val")):
            raise TypeError("split train and val must be lists of case ids")
    except TumorsegError as exc:
        raise TumorsegError(f"{path}: damaged manifest ({exc})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TumorsegError(f"{path}: damaged manifest ({type(exc).__name__}: {exc})") from None
    return manifest
