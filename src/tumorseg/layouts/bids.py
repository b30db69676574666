"""BIDS datasets: subjects' and sessions' `anat` folders, tumour `_dseg` files, writing a BIDS case."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..io import nifti_files, save_nifti, write_text
from ..labels import BRATS2020, MODALITIES, canonical_modality
from .case import Case, file_stem, several_scans


# BIDS: sub-<label>[_<entity>-<label>...]_<suffix>; T1w with a `ce-` entity is the contrast-enhanced T1.
BIDS_RE = re.compile(r"^(?P<sub>sub-[A-Za-z0-9]+)(?P<entities>(?:_[A-Za-z]+-[A-Za-z0-9]+)*)_(?P<suffix>[A-Za-z0-9]+)$")
BIDS_DESCRIPTION = "dataset_description.json"
BIDS_SEG_SUFFIX = "dseg"
# BIDS's anatomical suffixes (case as the standard writes them): BraTS names of a case `sub-001`
# (`sub-001_t1`, `sub-001_seg`) have the shape of BIDS names but none of these
BIDS_ANAT_SUFFIXES = frozenset({"T1w", "T2w", "FLAIR", "T2starw", "PDw", "T1map", "T2map", "UNIT1", "angio",
                                "inplaneT1", "inplaneT2", "PD", "T2star", BIDS_SEG_SUFFIX, "mask"})
# below a BIDS root: not the raw scans (dcm2bids leaves its conversions' copies in `tmp_dcm2bids/`)
BIDS_SKIPPED: tuple[str, ...] = ("derivatives", "sourcedata", "tmp_dcm2bids")
BIDS_NAMES: dict[str, str] = {"t1": "T1w", "t1ce": "ce-gadolinium_T1w", "t2": "T2w", "flair": "FLAIR"}


def bids_cases(folder: Path, files: list[Path]) -> list[Case] | None:
    """The sessions of a BIDS `anat` folder, or of a folder whose every NIfTI file has a BIDS name,
    one case `sub-X[_ses-Y]` each, or None if it is none (the BraTS reading of
    `sub-01_ses-pre_ce-gadolinium_T1w` would make `ce-gadolinium` a case of its own).

    A subject's segmentation is its tumour `_dseg` file (`desc-tumor` or `label-tumor`) there or
    in the dataset's `derivatives/*/`; other `_dseg` files (fMRIPrep's tissue maps) are not.
    Several scans of one modality (runs, acquisitions) are that modality's error (`Case.conflicts`):
    choosing one silently could pick the wrong scan.
    """
    parsed = [(f, BIDS_RE.match(file_stem(f))) for f in files]
    if not any(m for _, m in parsed) or (folder.name != "anat" and not all(
            m and m["suffix"] in BIDS_ANAT_SUFFIXES for _, m in parsed)):
        return None  # BIDS names outside `anat/` (a subject's scans copied out): read as BIDS where all are
    found: dict[str, dict[str, list[Path]]] = {}
    for path, m in parsed:
        if m is None:
            continue
        entities = _bids_entities(m)
        cid = m["sub"] + (f"_ses-{entities['ses']}" if "ses" in entities else "")
        suffix = m["suffix"]
        kind = ("seg" if _bids_tumour_seg(m) else None) if suffix.lower() == BIDS_SEG_SUFFIX else canonical_modality(suffix)
        if kind == "t1" and "ce" in entities:
            kind = "t1ce"
        if kind is not None:
            found.setdefault(cid, {}).setdefault(kind, []).append(path)
    cases = []
    for cid, kinds in found.items():
        segs = kinds.pop("seg", []) + _bids_derivative_segs(folder, cid)
        picked = {kind: paths[0] for kind, paths in kinds.items()}
        conflicts = {kind: why for kind, paths in kinds.items()
                     if (why := several_scans(folder, cid, kind, paths)) is not None}
        # one file, or its `.nii` beside its `.nii.gz`; one name in two pipelines' folders is two
        seg = segs[0] if len({(p.parent, file_stem(p)) for p in segs}) == 1 else None
        note = None
        if seg is None and segs:
            note = f"{cid}: several tumour segmentations ({', '.join(map(str, segs))}): none taken; keep one"
        cases.append(Case(cid, folder, picked, seg, note, "bids", BRATS2020, conflicts=conflicts))
    return cases


def _bids_entities(m: re.Match) -> dict[str, str]:
    """A BIDS name's key-value entities (`ses`, `ce`, `desc`, ...)."""
    return dict(e.split("-", 1) for e in m["entities"].split("_") if e)


def _bids_tumour_seg(m: re.Match) -> bool:
    """A BIDS `_dseg` that says it is a tumour segmentation (`desc-tumor`, `label-tumour`, ...)."""
    entities = _bids_entities(m)
    return any(entities.get(k, "").lower() in ("tumor", "tumour") for k in ("desc", "label"))


def _bids_derivative_segs(anat: Path, case_id: str) -> list[Path]:
    """The tumour `_dseg` files of `case_id` in `derivatives/*/` of the BIDS dataset above `anat`."""
    session = anat.parent
    subject = session.parent if session.name.startswith("ses-") else session
    derivatives = subject.parent / "derivatives"
    if not derivatives.is_dir():
        return []
    relative = anat.relative_to(subject.parent)
    return sorted(p for pipeline in derivatives.iterdir() for p in nifti_files(pipeline / relative)
                  if (m := BIDS_RE.match(file_stem(p))) and m["suffix"].lower() == BIDS_SEG_SUFFIX
                  and _bids_tumour_seg(m) and file_stem(p).startswith(case_id + "_"))


def write_bids_case(root: Path, case_id: str, images: dict[str, np.ndarray], affine: np.ndarray,
                     seg: np.ndarray | None, header) -> Path:
    """`root/<sub>/anat/<sub>_<suffix>.nii.gz`, the segmentation as
    `derivatives/manual/<sub>/anat/<sub>_desc-tumor_dseg`."""
    for folder, kind in ((root, "raw"), (root / "derivatives" / "manual", "derivative")):
        if not (folder / BIDS_DESCRIPTION).is_file() and (kind == "raw" or seg is not None):
            write_text(folder / BIDS_DESCRIPTION, json.dumps({"Name": "tumorseg", "BIDSVersion": "1.9.0",
                                                               "DatasetType": kind}, indent=2) + "\n")
    anat = root / case_id / "anat"
    for m in MODALITIES:
        save_nifti(anat / f"{case_id}_{BIDS_NAMES[m]}.nii.gz", images[m], affine, header)
    if seg is not None:
        save_nifti(root / "derivatives" / "manual" / case_id / "anat" / f"{case_id}_desc-tumor_{BIDS_SEG_SUFFIX}.nii.gz",
                   seg, affine, header)
    return anat
