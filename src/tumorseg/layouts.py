"""Dataset layouts: which files make a case, and what their modalities and labels mean.

Detected automatically (a folder, its sub-folders to a few levels, or one case folder):

| layout      | files                                                                  | labels      |
|-------------|------------------------------------------------------------------------|-------------|
| `brats2020` | `<case>/<case>_{t1,t1ce,t2,flair,seg}.nii[.gz]` (2018-2020, Kaggle)     | `brats2020` |
| `brats2021` | `BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz`         | `brats2020` |
| `brats2023` | `BraTS-GLI-NNNNN-NNN/BraTS-GLI-NNNNN-NNN-{t1n,t1c,t2w,t2f,seg}.nii.gz`  | `brats2023` |
| `msd`       | `imagesTr/BRATS_NNN.nii.gz` (4D), `labelsTr/`, `imagesTs/`, `dataset.json` | `msd`   |
| `nnunet`    | `imagesTr/<case>_0000.nii.gz` ..., `labelsTr/<case>.nii.gz`, `dataset.json` | from `dataset.json` |
| `bids`      | `sub-X/[ses-Y/]anat/sub-X[_ses-Y]_{T1w,ce-<agent>_T1w,T2w,FLAIR}.nii.gz`, `derivatives/*/.../*_desc-tumor_dseg.nii.gz` | `brats2020` |
| `plain`     | `<case>/{t1,t1ce,t2,flair}.nii[.gz]` by any alias (`T1.nii.gz`, `CT1`, `T1Gd`, `FLAIR`, `fla`), `seg` / `segmentation` / `label` | `brats2020` |

Modalities are found by meaning through `labels.MODALITY_ALIASES` (t1n = T1w = t1, ...), so
a network trained on one layout predicts cases of any other. BraTS 2020 case 355's
segmentation (`W39_1998.09.19_Segm.nii`) is found as the single other NIfTI in its folder whose
name holds "seg".
A folder of several BraTS-named cases' files side by side is one case per name.
`plain` is how scans leave a clinic or a preprocessing tool (HD-GLIO, BraTS Toolkit): one folder
per case, files named by modality alone; other files there (brain masks, ADC) are ignored. UCSF-PDGM's
`<case>_tumor_segmentation` is its segmentation (beside `_brain_segmentation`, which is not);
UPENN-GBM's cases take theirs from `images_segm/<case>_segm` beside their folders.
A table (`cases.csv` / `.tsv`, given in place of a folder) names each case's files itself, for
scans no layout names (`3_AX_FLAIR.nii.gz`): a case id column and one column per modality (any
alias above) and optionally `seg`, paths relative to the table (`list_cases`).
`write_case` writes every layout (for `tumorseg synth --layout` and for tests).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Collection

import numpy as np

from .errors import TumorsegError
from .io import NIFTI_RE, Volume, load_labels, load_nifti_channels, nifti_files, prepared_folder, save_nifti, write_text
from .labels import (
    BRATS2020,
    CONVENTIONS,
    MODALITIES,
    LabelConvention,
    canonical_modality,
    convention_from_names,
    convention_from_regions,
)

LAYOUTS: tuple[str, ...] = ("brats2020", "brats2021", "brats2023", "msd", "nnunet", "plain", "bids")
DATASET_JSON = "dataset.json"
IMAGE_DIRS: tuple[str, ...] = ("imagesTr", "imagesTs")
LABEL_DIRS: dict[str, str] = {"imagesTr": "labelsTr", "imagesTs": "labelsTs"}
MAX_DEPTH = 4
# File names of each layout's modalities and the separator before them.
BRATS2023_NAMES: dict[str, str] = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
MSD_CHANNELS: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")  # Task01's "FLAIR", "T1w", "t1gd", "T2w"
NNUNET_CHANNELS: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")  # nnU-Net's BraTS conversions
EXPECTED = ("BraTS case folders (<case>_{t1,t1ce,t2,flair}.nii[.gz] or <case>-{t1n,t1c,t2w,t2f}.nii.gz), "
            "case folders of files named by modality ({t1,t1ce,t2,flair}.nii[.gz]), "
            "an MSD / nnU-Net dataset (dataset.json with imagesTr/), a BIDS dataset, or a cases.csv")
NAMING_HINT = ("name each case's files t1, t1ce, t2, flair (or <case>_t1 ...), or list them in a cases.csv with "
               "columns case,t1,t1ce,t2,flair")
_BRATS_SUFFIX_RE = re.compile(r"[_-](?P<key>[A-Za-z0-9]+)$")
PLAIN_SEG_STEMS: tuple[str, ...] = ("seg", "segmentation", "label", "labels")
FOLDER_WRAPPERS: tuple[str, ...] = ("_nifti",)  # `<case>_nifti/` (UCSF-PDGM) names the case `<case>`
TUMOUR_SEG_SUFFIXES: tuple[str, ...] = ("_tumor_segmentation", "_tumour_segmentation")  # UCSF-PDGM
_SEG_FILE_SUFFIX_RE = re.compile(rf"([_-]segm?|{'|'.join(TUMOUR_SEG_SUFFIXES)})$", re.IGNORECASE)  # after a case id
# BIDS: sub-<label>[_<entity>-<label>...]_<suffix>; T1w with a `ce-` entity is the contrast-enhanced T1.
_BIDS_RE = re.compile(r"^(?P<sub>sub-[A-Za-z0-9]+)(?P<entities>(?:_[A-Za-z]+-[A-Za-z0-9]+)*)_(?P<suffix>[A-Za-z0-9]+)$")
BIDS_DESCRIPTION = "dataset_description.json"
BIDS_SEG_SUFFIX = "dseg"
# BIDS's anatomical suffixes (case as the standard writes them): BraTS names of a case `sub-001`
# (`sub-001_t1`, `sub-001_seg`) have the shape of BIDS names but none of these
BIDS_ANAT_SUFFIXES = frozenset({"T1w", "T2w", "FLAIR", "T2starw", "PDw", "T1map", "T2map", "UNIT1", "angio",
                                "inplaneT1", "inplaneT2", "PD", "T2star", BIDS_SEG_SUFFIX, "mask"})
BIDS_SKIPPED: tuple[str, ...] = ("derivatives", "sourcedata")  # below a BIDS root: not the raw scans
# UPENN-GBM keeps its expert segmentations (`<case>_segm.nii.gz`) apart from the case folders of
# `images_structural/`, in a folder beside them (`automated_segm/` beside it is not expert truth).
SEGMENTATION_FOLDERS: tuple[str, ...] = ("images_segm",)
# BraTS-PEDs renumbered its labels in 2024 under the 2023 file names (`labels.CONVENTIONS["peds2024"]`).
_PED_CASE_RE = re.compile(r"^BraTS-PED-\d", re.IGNORECASE)
_BRATS2023_CASE_RE = re.compile(r"^BraTS-[A-Za-z]+-\d+-\d+$", re.IGNORECASE)  # BraTS 2023+ ids: BraTS-GLI-00000-000
# A release year beside "BraTS" or "PED(s)" in a folder's name (`BraTS2024-PED-...`, `PEDs_2024`), not a
# date elsewhere in it (`..._downloaded_2024-03`).
_RELEASE_RE = re.compile(r"(?:brats|peds?)[-_ ]?(20\d\d)(?!\d)|(?<!\d)(20\d\d)[-_ ]?(?:brats|peds?)", re.IGNORECASE)
PEDS2024_VALUE = 4  # oedema in BraTS-PEDs 2024; no 2023 PED label and no cavity (PED is pre-treatment)
CASE_LIST_SUFFIXES: tuple[str, ...] = (".csv", ".tsv")
CASE_ID_COLUMNS: tuple[str, ...] = ("case", "case_id", "caseid", "id", "subject", "subject_id", "patient", "patient_id")
# Layouts whose names say nothing of the label convention: `evaluate` tells it from the values.
UNNAMED_CONVENTION: tuple[str, ...] = ("labels", "plain", "bids", "list")
_NNUNET_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One case: where each modality (by canonical name) and the segmentation are.

    `images` may lack modalities (a broken download); `image` turns that into an error
    naming the case and the modality, as it does a modality found in several files or named by no
    column of a case list (`conflicts`: modality -> why), so one odd case fails alone. `channel_index` gives a modality's index inside
    a 4D file (MSD). `seg_note` says when the segmentation was found under a non-standard name, or
    why none was taken.
    """

    case_id: str
    folder: Path
    images: dict[str, Path] = field(default_factory=dict)
    seg: Path | None = None
    seg_note: str | None = None
    layout: str = "brats2020"
    labels: LabelConvention = BRATS2020
    channel_index: dict[str, int] = field(default_factory=dict)
    conflicts: dict[str, str] = field(default_factory=dict)

    def image(self, modality: str) -> Path:
        if modality in self.conflicts:
            raise TumorsegError(self.conflicts[modality])
        if modality not in self.images:
            have = ", ".join(m for m in MODALITIES if m in self.images) or "none"
            raise TumorsegError(f"{self.case_id}: missing modality '{modality}' in {self.folder} (found: {have})")
        return self.images[modality]


def load_images(case: Case, modalities: tuple[str, ...] | list[str]) -> list[Volume]:
    """The case's volumes for `modalities`, in that order; each file is read once."""
    by_file: dict[Path, list[str]] = {}
    for m in modalities:
        by_file.setdefault(case.image(m).resolve(), []).append(m)  # one file however its paths spell it
    loaded: dict[str, Volume] = {}
    for path, names in by_file.items():
        indices = [case.channel_index[m] for m in names] if names[0] in case.channel_index else None
        if indices is None and len(names) > 1:  # a table naming one 3-D scan twice: never one scan as two
            raise TumorsegError(f"{case.case_id}: {case.image(names[0])} is given as both {names[0]} and {names[1]}; "
                                "each modality needs its own scan")
        for m, vol in zip(names, load_nifti_channels(case.image(names[0]), case.case_id, indices)):
            loaded[m] = vol
    return [loaded[m] for m in modalities]


def _stem(path: Path) -> str:
    return NIFTI_RE.match(path.name)["stem"]


def _case_key(stem: str) -> tuple[str, str] | None:
    """(case prefix, modality or "seg") of a `<case>_<key>` / `<case>-<key>` file stem, or None."""
    lower = stem.lower()
    for suffix in TUMOUR_SEG_SUFFIXES:
        if lower.endswith(suffix):
            return stem[: -len(suffix)], "seg"
    m = _BRATS_SUFFIX_RE.search(stem)
    if m is None:
        return None
    kind = "seg" if m["key"].lower() == "seg" else canonical_modality(m["key"])
    return (stem[: m.start()], kind) if kind is not None else None


def _brats_cases(folder: Path, files: list[Path], need_images: bool) -> list[Case] | None:
    """The case `folder` is, or, when its files name several cases (`<case>_t1.nii.gz` of many cases
    side by side), one case per name; None if it holds none."""
    groups: dict[str, list[Path]] = {}
    with_images: set[str] = set()
    for path in files:
        stem = _stem(path)
        key = _case_key(stem) if canonical_modality(stem) is None else None
        if key is not None:
            groups.setdefault(key[0], []).append(path)
            if key[1] != "seg":
                with_images.add(key[0])
    if len(with_images) > 1:  # segmentation-only names alone stay `_label_files`' flat folder
        found = [_brats_case(folder, group, need_images, case_id) for case_id, group in groups.items()]
        return [case for case in found if case is not None]
    # One case: named as its files are where the folder only wraps them (UCSF-PDGM's `<case>_nifti/`);
    # `P001_pre/` and `P001_post/` holding `P001_t1` ... stay two cases.
    prefix = next(iter(with_images or groups), "") if len(with_images or groups) == 1 else ""
    case_id = prefix if prefix and folder.name in (f"{prefix}{w}" for w in FOLDER_WRAPPERS) else None
    case = _brats_case(folder, files, need_images, case_id)
    return [case] if case is not None else None


def _brats_case(folder: Path, files: list[Path], need_images: bool, case_id: str | None = None) -> Case | None:
    """A BraTS case folder (2018-2020, 2021 or 2023+ names) or a `plain` one, or None if `folder`
    is neither; `case_id` (default the folder's name) for one case of a folder holding several."""
    case_id = case_id or folder.name
    images: dict[str, Path] = {}
    conflicts: dict[str, str] = {}
    segs: list[Path] = []
    others: list[Path] = []
    dashed = bare = 0
    for path in files:
        stem = _stem(path)
        whole = canonical_modality(stem)  # `plain`: the stem is the modality (`T1`, `T2-FLAIR`)
        key = _case_key(stem) if whole is None else None
        if stem.lower() in PLAIN_SEG_STEMS or (key is not None and key[1] == "seg"):
            segs.append(path)
        elif whole is not None or key is not None:  # a second copy (`.nii` beside `.nii.gz`) is no segmentation
            modality = whole or key[1]
            if modality not in images:
                images[modality] = path
                bare += whole is not None
                dashed += whole is None and stem[len(key[0])] == "-"
            elif (why := _several_scans(folder, case_id, modality, [images[modality], path])) is not None:
                conflicts[modality] = why
        else:
            others.append(path)
    if images and len({_stem(s) for s in segs}) == 1:
        segs = segs[:1]  # one segmentation twice (`.nii` beside `.nii.gz`): the first, as for the images
    if len(segs) > 1 or (not images and (need_images or not segs)):
        return None  # several cases' segmentations in one folder: `_label_files` pairs them
    seg = segs[0] if segs else None
    plain = bare == len(images) > 0 or (not images and _stem(seg).lower() in PLAIN_SEG_STEMS)
    if not images and not plain and (_case_key(_stem(seg)) or ("",))[0] != case_id:
        return None  # a lone `<case>_seg` file of a flat folder, not a segmentation-only case folder
    note = None
    if seg is None and len(others) == 1 and images and not plain and "seg" in _stem(others[0]).lower():
        # BraTS 2020 case 355 ships its segmentation as 'W39_1998.09.19_Segm.nii' (a lone `brainmask` is none).
        seg = others[0]
        note = f"{case_id}: using '{seg.name}' as the segmentation (non-standard name)"
    if dashed or (seg is not None and not images and _stem(seg).endswith("-seg")):
        layout = "brats2023"
    elif plain:
        layout = "plain"
    else:
        layout = "brats2021" if case_id.startswith("BraTS2021_") else "brats2020"
    labels = CONVENTIONS["brats2023"] if layout == "brats2023" else BRATS2020
    return Case(case_id, folder, images, seg, note, layout, labels, conflicts=conflicts)


def _read_dataset_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TumorsegError(f"{path}: unreadable dataset.json ({exc})") from None


def dataset_labels(meta: dict, layout: str, path: Path) -> LabelConvention:
    """The label convention a dataset.json describes (MSD value -> name, nnU-Net name -> value or regions)."""
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise TumorsegError(f"{path}: no 'labels' in dataset.json")
    try:
        if any(isinstance(v, list) for v in labels.values()):  # region form; a one-label region may be a number
            regions = {k: v if isinstance(v, list) else [v] for k, v in labels.items()
                       if k.lower() not in ("background", "ignore") and v != 0}
            return convention_from_regions(regions, layout)
        if all(str(k).isdigit() for k in labels):  # MSD and nnU-Net v1: {"1": "edema", ...}
            return convention_from_names({str(v): int(k) for k, v in labels.items()}, layout)
        return convention_from_names({k: int(v) for k, v in labels.items()}, layout)
    except TumorsegError as exc:
        raise TumorsegError(f"{path}: {exc}") from None
    except (TypeError, ValueError):  # a label value that is no integer
        raise TumorsegError(f"{path}: 'labels' must map names to integer values (or lists of them)") from None


BESIDE = "the dataset.json beside it"  # why a prediction was read in `folder_labels`' convention


def folder_labels(folder: str | os.PathLike) -> LabelConvention | None:
    """The label convention a dataset.json in a folder of predictions names, or None: nnU-Net's
    predict copies its dataset.json beside the files it writes (MSD numbers, or the region form),
    and other tools' files carry no tag of their own."""
    path = Path(folder) / DATASET_JSON
    try:
        return dataset_labels(_read_dataset_json(path), "nnunet", path) if path.is_file() else None
    except TumorsegError:  # another tool's dataset.json (a MONAI datalist, another task's labels): names none
        return None


def dataset_channels(meta: dict, path: Path) -> dict[int, str]:
    """Channel index -> canonical modality from dataset.json ("channel_names" or MSD's "modality")."""
    names = meta.get("channel_names") or meta.get("modality")
    if not isinstance(names, dict) or not names:
        raise TumorsegError(f"{path}: no 'channel_names' or 'modality' in dataset.json")
    out = {}
    for index, name in names.items():
        modality = canonical_modality(str(name))
        if modality is None:
            raise TumorsegError(f"{path}: channel {index} '{name}' is not an MRI modality tumorseg knows ({', '.join(MODALITIES)})")
        if not str(index).isdigit():
            raise TumorsegError(f"{path}: channel key '{index}' is not a channel number")
        out[int(index)] = modality
    return out


def _dataset_cases(root: Path, subdirs: tuple[str, ...]) -> list[Case]:
    """Cases of an MSD or nnU-Net dataset in `root` (holding dataset.json) from `subdirs`."""
    meta_path = root / DATASET_JSON
    meta = _read_dataset_json(meta_path)
    channels = dataset_channels(meta, meta_path)
    cases: list[Case] = []
    for sub in subdirs:
        folder = root / sub
        files = nifti_files(folder)
        label_dir = root / LABEL_DIRS.get(sub, "")
        if sub.startswith("labels"):  # ground truth only (evaluate)
            layout = "nnunet" if "channel_names" in meta else "msd"
            conv = dataset_labels(meta, layout, meta_path)
            cases += [Case(_stem(f), folder, seg=f, layout=layout, labels=conv) for f in files]
            continue
        split = [_NNUNET_RE.match(_stem(f)) for f in files]
        # nnU-Net v2 says so ("channel_names"); v1 shares MSD's keys but splits channels into files.
        layout = "nnunet" if "channel_names" in meta or (files and all(split)) else "msd"
        conv = dataset_labels(meta, layout, meta_path)
        if layout == "nnunet":
            grouped: dict[str, dict[str, Path]] = {}
            for f, m in zip(files, split):
                if m is None:
                    raise TumorsegError(f"{f}: not an nnU-Net image name <case>_<4-digit channel>.nii.gz")
                channel = int(m["channel"])
                if channel not in channels:
                    raise TumorsegError(f"{f}: channel {channel} is not in {meta_path}'s channel names")
                grouped.setdefault(m["case"], {})[channels[channel]] = f
            found = [(cid, imgs, {}) for cid, imgs in grouped.items()]
        else:
            order = [channels[i] for i in sorted(channels)]
            found = [(_stem(f), {m: f for m in order}, {m: i for i, m in enumerate(order)}) for f in files]
        segs = {_stem(p): p for p in nifti_files(label_dir)} if label_dir.is_dir() else {}
        cases += [Case(cid, folder, imgs, segs.get(cid), None, layout, conv, index) for cid, imgs, index in found]
    return cases


def _folder_cases(folder: Path, need_images: bool) -> list[Case] | None:
    """The cases `folder` itself holds (a dataset, one of its image folders, a case folder), or None."""
    if (folder / DATASET_JSON).is_file():
        subs = tuple(s for s in IMAGE_DIRS if (folder / s).is_dir())
        if not subs and not need_images and (folder / "labelsTr").is_dir():
            subs = ("labelsTr",)
        if subs:
            return _dataset_cases(folder, subs)
    if folder.name in (*IMAGE_DIRS, *LABEL_DIRS.values()) and (folder.parent / DATASET_JSON).is_file():
        return _dataset_cases(folder.parent, (folder.name,))
    files = nifti_files(folder)
    bids = _bids_cases(folder, files)
    if bids is not None:
        return [c for c in bids if c.images or (not need_images and c.seg is not None)] or None
    return _brats_cases(folder, files, need_images)


def _bids_cases(folder: Path, files: list[Path]) -> list[Case] | None:
    """The sessions of a BIDS `anat` folder, or of a folder whose every NIfTI file has a BIDS name,
    one case `sub-X[_ses-Y]` each, or None if it is none (the BraTS reading of
    `sub-01_ses-pre_ce-gadolinium_T1w` would make `ce-gadolinium` a case of its own).

    A subject's segmentation is its tumour `_dseg` file (`desc-tumor` or `label-tumor`) there or
    in the dataset's `derivatives/*/`; other `_dseg` files (fMRIPrep's tissue maps) are not.
    Several scans of one modality (runs, acquisitions) are that modality's error (`Case.conflicts`):
    choosing one silently could pick the wrong scan.
    """
    parsed = [(f, _BIDS_RE.match(_stem(f))) for f in files]
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
                     if (why := _several_scans(folder, cid, kind, paths)) is not None}
        seg = segs[0] if len({_stem(p) for p in segs}) == 1 else None
        note = None
        if seg is None and segs:
            note = f"{cid}: several tumour segmentations ({', '.join(map(str, segs))}): none taken; keep one"
        cases.append(Case(cid, folder, picked, seg, note, "bids", BRATS2020, conflicts=conflicts))
    return cases


def _several_scans(folder: Path, case_id: str, kind: str, paths: list[Path]) -> str | None:
    """Why several files of one modality (`T1` beside `T1w`, two runs) cannot be read, naming
    them, or None for one scan (`.nii` beside `.nii.gz` is one)."""
    stems = sorted({_stem(p) for p in paths})
    if len(stems) < 2:
        return None
    return f"{case_id}: several {kind} files in {folder} ({', '.join(stems)}); keep one per modality"


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
                  if (m := _BIDS_RE.match(_stem(p))) and m["suffix"].lower() == BIDS_SEG_SUFFIX
                  and _bids_tumour_seg(m) and _stem(p).startswith(case_id + "_"))


def _label_files(folder: Path) -> list[Case]:
    """A flat folder of `<case>.nii.gz` (or `<case>_seg`, `<case>-seg`, UPENN-GBM's `<case>_segm`,
    UCSF-PDGM's `<case>_tumor_segmentation`) segmentations, labelsTr style. BraTS 2023+ case ids
    (`BraTS-GLI-00000-000`) name their convention, as their case folders do: a 2024 truth holding a
    resection cavity (4) and no enhancing tumour is not read as BraTS 2020's enhancing tumour."""
    cases = []
    for f in nifti_files(folder):
        case_id = _SEG_FILE_SUFFIX_RE.sub("", _stem(f))
        named = _BRATS2023_CASE_RE.match(case_id) is not None
        cases.append(Case(case_id, folder, seg=f, layout="brats2023" if named else "labels",
                          labels=CONVENTIONS["brats2023"] if named else BRATS2020))
    return cases


def is_case_list(path: str | os.PathLike) -> bool:
    """Whether `path` is a table of cases (`list_cases`) rather than a folder or a scan."""
    return Path(path).suffix.lower() in CASE_LIST_SUFFIXES and Path(path).is_file()


def list_cases(table: str | os.PathLike) -> list[Case]:
    """The cases a CSV/TSV table names row by row, for files whose names no layout knows.

    Columns: the case id (`case`, `case_id`, `id`, `subject`, `patient`), one per modality (any
    alias: `t1`, `T1Gd`, `FLAIR`, ...) and optionally the segmentation (`seg`, `label`); other
    columns (age, survival) are ignored, an empty cell is a file the case lacks. Paths are
    relative to the table's folder. A named file that is missing fails its case alone when read.
    """
    table = Path(table)
    try:
        text = table.read_text(encoding="utf-8-sig")  # Excel writes a byte-order mark
    except (OSError, UnicodeDecodeError) as exc:
        raise TumorsegError(f"{table}: cannot read the case list ({exc})") from None
    rows = [row for row in csv.reader(io.StringIO(text), delimiter=_delimiter(table, text)) if any(c.strip() for c in row)]
    if len(rows) < 2:
        raise TumorsegError(f"{table}: no cases listed (a header row, then one row per case)")
    roles: dict[int, str] = {}
    for i, name in enumerate(rows[0]):
        key = name.strip().lower().replace(" ", "_")
        role = "case" if key in CASE_ID_COLUMNS else "seg" if key in PLAIN_SEG_STEMS else canonical_modality(key)
        if role is None:
            continue
        if role in roles.values():
            twice = [rows[0][j].strip() for j, r in roles.items() if r == role] + [name.strip()]
            raise TumorsegError(f"{table}: columns {' and '.join(twice)} both name the {role}")
        roles[i] = role
    if "case" not in roles.values():
        raise TumorsegError(f"{table}: no case id column (one of {', '.join(CASE_ID_COLUMNS)})")
    if set(roles.values()) == {"case"}:
        raise TumorsegError(f"{table}: no modality or segmentation column (t1, t1ce, t2, flair by any alias; seg)")
    unread = [name.strip() for i, name in enumerate(rows[0]) if i not in roles and name.strip()]
    cases = []
    for line, row in enumerate(rows[1:], start=2):
        cells = {role: row[i].strip() if i < len(row) else "" for i, role in roles.items()}
        case_id, seg = cells.pop("case"), cells.pop("seg", "")
        if not case_id or case_id in (".", "..") or any(c in case_id for c in '/\\'):
            raise TumorsegError(f"{table}: line {line}: {case_id!r} cannot name a case's output files")
        images = {m: _listed_file(table, v) for m, v in cells.items() if v}
        # A modality without a column: say which columns were not read (`3_AX_FLAIR` names no modality).
        absent = {m: f"{case_id}: no {m} column in {table} (columns not read: {', '.join(unread)}; name it by a "
                     f"modality: t1, t1ce, t2, flair or an alias)" for m in MODALITIES if unread and m not in roles.values()}
        cases.append(Case(case_id, table, images, _listed_file(table, seg) if seg else None, layout="list",
                          conflicts=absent))
    return cases


def _delimiter(table: Path, text: str) -> str:
    if table.suffix.lower() == ".tsv":
        return "\t"
    header = text.splitlines()[0] if text else ""
    return max(",;\t", key=header.count)  # Excel in many locales writes ';'


def _listed_file(table: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else table.parent / path


def discover_cases(
    root: str | os.PathLike, need_images: bool = True, only: Collection[str] | None = None
) -> list[Case]:
    """All cases under `root` (or `root` itself if it is one; or those a table names,
    `list_cases`), sorted by case id; `only`: just the cases of these ids (each must exist).

    `need_images=False` (ground truth for `evaluate`) also accepts case folders holding only
    a segmentation, and a flat folder of `<case>.nii.gz` label files.
    """
    unread: dict[Path, list[Path]] = {}
    nested: list[Path] = []
    cases = _all_cases(Path(root), need_images, unread, nested)
    _check_unique(Path(root), cases)
    if need_images:  # a patient (or a visit) is never left out without a word
        ids = {c.case_id for c in cases}  # a case's other series (UPENN-GBM's DTI), predictions: no patient's
        _note_left_out(Path(root), [f for f, files in unread.items()
                                    if not all(_names_a_case(_stem(n), ids) for n in files)],
                       "with NIfTI files named for no modality", NAMING_HINT)
        _note_left_out(Path(root), nested, "of NIfTI files inside case folders",
                       "a case folder's sub-folders are not searched: give each visit a folder of its own")
    if only is not None:
        wanted = {only} if isinstance(only, str) else set(only)
        if not wanted:
            raise TumorsegError(f"{root}: an empty selection of cases (give case ids, or None for all)")
        absent = sorted(wanted - {c.case_id for c in cases})
        if absent:
            raise TumorsegError(f"{root}: no case(s) {', '.join(absent)} among its {len(cases)}")
        cases = [c for c in cases if c.case_id in wanted]
    return sorted(cases, key=lambda c: c.case_id)


_SAID: set[str] = set()  # the discovery notes this process has printed


def _note_left_out(root: Path, folders: list[Path], what: str, why: str) -> None:
    """One note naming a few of the `folders` discovery did not read, once a process (`predict
    --report` discovers its input twice)."""
    shown = ", ".join(str(f.relative_to(root)) if f != root else f.name for f in folders[:3])
    note = f"note: {root}: {len(folders)} folder(s) {what} not read: {shown}{', ...' if len(folders) > 3 else ''} ({why})"
    if folders and note not in _SAID:
        _SAID.add(note)
        print(note, file=sys.stderr)


def _names_a_case(stem: str, ids: set[str]) -> bool:
    """Whether a file's name is a case id or begins with one (`<case>_DTI_AD`, `<case>.nii.gz`)."""
    return stem in ids or any(stem[:i] in ids for i, c in enumerate(stem) if c in "_-.")


def _unread(folder: Path) -> list[Path]:
    """The NIfTI files of a folder that made no case where they are scans named for no modality
    (dcm2niix's series names); none for BIDS files (another datatype's folder: dwi/, func/)."""
    files = nifti_files(folder)
    return [] if all(_BIDS_RE.match(_stem(f)) for f in files) else files


def _all_cases(root: Path, need_images: bool, unread: dict[Path, list[Path]], nested: list[Path]) -> list[Case]:
    """Every case under `root`; the folders of NIfTI files that made none are added to `unread` (with
    their files), and a case folder's sub-folders holding a case (a later visit inside a patient's)
    to `nested`."""
    if not root.exists():
        raise TumorsegError(f"{root}: no such folder")
    if is_case_list(root):
        return list_cases(root)
    if not root.is_dir():
        raise TumorsegError(f"{root}: not a folder")
    table = next((root / f"cases{suffix}" for suffix in CASE_LIST_SUFFIXES if (root / f"cases{suffix}").is_file()), None)
    if table is not None:  # the folder given for the table in it: its scans' names may half match a layout
        return list_cases(table)
    cases: list[Case] = []
    seg_folders = [root.parent / name for name in SEGMENTATION_FOLDERS if root.name.startswith("images_structural")]
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        if folder.name in SEGMENTATION_FOLDERS and folder != root:
            seg_folders.append(folder)
            continue
        found = _folder_cases(folder, need_images)
        if found is not None:
            cases += found
            if any(c.folder == folder for c in found):  # a case folder, not a dataset's root: a visit inside?
                with contextlib.suppress(OSError):  # (a tool's output folders there, LUMIERE's, make no case)
                    nested += sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                                     and any(c.images for c in _folder_cases(p, True) or ()))
            continue
        if files := _unread(folder):
            unread[folder] = files
        if depth < MAX_DEPTH:
            skipped = BIDS_SKIPPED if (folder / BIDS_DESCRIPTION).is_file() else ()
            with contextlib.suppress(OSError):
                stack.extend((p, depth + 1) for p in folder.iterdir()
                             if p.is_dir() and not p.name.startswith(".") and p.name not in skipped)
    flat = not cases and not need_images
    if flat:
        cases = _label_files(root)
    if not cases and prepared_folder(root):  # `tumorseg prepare`'s output
        raise TumorsegError(f"{root}: a prepared folder (arrays for training); give the scans it was prepared from")
    if not cases:
        pairs = next((p for pattern in ("*.hdr", "*/*.hdr") for p in root.glob(pattern)), None)  # Analyze pairs
        hint = f"; {pairs.name} and the like are .hdr/.img pairs: convert them to .nii.gz" if pairs else ""
        if unread and not hint:
            folder, files = next(iter(unread.items()))
            hint = (f"; {', '.join(f.name for f in files[:4])}{', ...' if len(files) > 4 else ''} in "
                    f"{folder} name no modality: {NAMING_HINT}")
        raise TumorsegError(f"{root}: no cases found (expected {EXPECTED}){hint}")
    if not flat:  # flat label files (evaluate's truth) are each read in the convention their name gives
        _check_one_layout(root, cases)
    return _named_apart(root, _pediatric_labels(root, _with_segmentations_beside(cases, seg_folders)))


def _pediatric_labels(root: Path, cases: list[Case]) -> list[Case]:
    """The dataset's `BraTS-PED-` cases in BraTS 2024's labels (1 ET, 2 NET, 3 CC, 4 ED) where a
    folder from `root` down to them names a release from 2024 on (`BraTS2024-PED-...`; the folders
    above `root` are the user's) or one of their segmentations holds label 4; in 2023's (BraTS
    2023's) where a folder names 2023 or none holds a 4. Noted on each, as the file names are the same."""
    ped = [c for c in cases if c.layout == "brats2023" and _PED_CASE_RE.match(c.case_id)]
    if not ped:
        return cases
    names = {part for c in ped for part in (root.name, *c.folder.relative_to(root).parts) if "ped" in part.lower()}
    years = {name: [int(m[1] or m[2]) for m in _RELEASE_RE.finditer(name)] for name in sorted(names)}
    why = next((f"the folder {name} names a BraTS-PEDs release from 2024 on"
                for name, found in years.items() if any(y >= 2024 for y in found)), None)
    if why is None and not any(years.values()):  # nothing names the release: the labels tell
        why = next((f"{c.seg.name} holds label {PEDS2024_VALUE} (oedema from 2024 on)"
                    for c in ped if c.seg is not None and _holds(c.seg, PEDS2024_VALUE)), None)
    if why is None:
        note = ("read as BraTS-PEDs 2023 labels (1 NCR, 2 ED, 3 ET); BraTS-PEDs 2024 and later number them 1 ET, "
                "2 NET, 3 CC, 4 ED: if they are, name the release in a folder above them (BraTS2024-PED-...); "
                "evaluate takes --labels peds2024")
        read = {c.case_id: replace(c, seg_note=c.seg_note or f"{c.case_id}: {note}") for c in ped}
    else:
        note = f"read as BraTS-PEDs 2024 labels (1 ET, 2 NET, 3 CC, 4 ED): {why}"
        read = {c.case_id: replace(c, labels=CONVENTIONS["peds2024"], seg_note=c.seg_note or f"{c.case_id}: {note}")
                for c in ped}
    return [read.get(c.case_id, c) for c in cases]


def _holds(seg: Path, value: int) -> bool:
    """Whether a segmentation file holds `value` (False if it cannot be read: its case says why);
    remembered per file version, as every case search of a command (predict, then its report) asks."""
    try:
        st = seg.stat()
    except OSError:
        return False
    return _holds_version(str(seg), st.st_size, st.st_mtime_ns, value)


@lru_cache(maxsize=4096)
def _holds_version(seg: str, size: int, mtime_ns: int, value: int) -> bool:
    try:
        return bool((load_labels(seg).data == value).any())
    except TumorsegError:
        return False


def _with_segmentations_beside(cases: list[Case], seg_folders: list[Path]) -> list[Case]:
    """Cases given the segmentation a folder beside theirs holds for their id (UPENN-GBM's
    `images_segm/<case>_segm.nii.gz`), where their own folder holds none."""
    segs = {c.case_id: c.seg for folder in seg_folders if folder.is_dir() for c in _label_files(folder)}
    return [replace(c, seg=segs[c.case_id]) if c.seg is None and c.case_id in segs else c for c in cases]


def _named_apart(root: Path, cases: list[Case]) -> list[Case]:
    """Where ids clash between folders (longitudinal data: `Patient-001/week-000`,
    `Patient-002/week-000`), every case is named by as many of the folders above it as tell them
    all apart (`Patient-001_week-000`), one rule for the whole dataset, so no id stays ambiguous."""
    counts = Counter(c.case_id for c in cases)
    clashing = [c for c in cases if counts[c.case_id] > 1]
    if not clashing or len({(c.case_id, c.folder) for c in clashing}) < len(clashing):
        return cases  # no clash, or one within a folder: `_check_unique` says so
    above = [[p for p in c.folder.relative_to(root).parts if p != c.case_id] for c in cases]
    for k in range(1, max(map(len, above)) + 1):
        ids = ["_".join([*parts[-k:], c.case_id]) for c, parts in zip(cases, above)]
        if len(set(ids)) == len(ids):
            return [replace(c, case_id=new_id) for c, new_id in zip(cases, ids)]
    return cases


def _check_unique(root: Path, cases: list[Case]) -> None:
    counts = Counter(c.case_id for c in cases)
    dupes = sorted(i for i, n in counts.items() if n > 1)
    if dupes:
        raise TumorsegError(f"{root}: case ids found more than once: {', '.join(dupes)}")


def _check_one_layout(root: Path, cases: list[Case]) -> None:
    """One folder, one dataset: mixed layouts (or label conventions) would mix label meanings."""
    layouts = Counter(c.layout for c in cases)
    conventions = {c.labels for c in cases}
    if len(layouts) > 1 or len(conventions) > 1:
        found = ", ".join(f"{n} {name}" for name, n in sorted(layouts.items(), key=lambda kv: (-kv[1], kv[0])))
        raise TumorsegError(f"{root}: mixes dataset layouts ({found} cases); give one dataset per folder")


def dataset_layout(cases: list[Case]) -> tuple[str, LabelConvention]:
    """The layout and label convention of discovered cases (one per folder, checked on discovery)."""
    return cases[0].layout, cases[0].labels


# ----------------------------------------------------------------------------- writing


def layout_case_id(layout: str, number: int) -> str:
    """A case id as each dataset names its cases."""
    return {
        "brats2020": f"BraTS20_Training_{number:03d}",
        "brats2021": f"BraTS2021_{number:05d}",
        "brats2023": f"BraTS-GLI-{number:05d}-000",
        "msd": f"BRATS_{number:03d}",
        "nnunet": f"BraTS2021_{number:05d}",
        "plain": f"patient_{number:03d}",
        "bids": f"sub-{number:03d}",
    }[layout]


def layout_labels(layout: str) -> LabelConvention:
    """The label convention `write_case` uses for a layout."""
    return CONVENTIONS["brats2023"] if layout == "brats2023" else CONVENTIONS["msd"] if layout in ("msd", "nnunet") else BRATS2020


def write_dataset_json(root: Path, layout: str, num_training: int = 0) -> None:
    """The dataset.json MSD Task01 ships, or the one nnU-Net's BraTS conversion writes (region form)."""
    if layout == "msd":
        meta = {"name": "BRATS", "tensorImageSize": "4D",
                "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
                "numTraining": num_training}
    elif layout == "nnunet":
        meta = {"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"},
                "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
                "regions_class_order": [1, 2, 3], "numTraining": num_training, "file_ending": ".nii.gz"}
    else:
        raise TumorsegError(f"layout '{layout}' has no dataset.json")
    write_text(root / DATASET_JSON, json.dumps(meta, indent=2) + "\n")


def write_case(
    root: str | os.PathLike,
    layout: str,
    case_id: str,
    images: dict[str, np.ndarray],
    affine: np.ndarray,
    training_labels: np.ndarray | None = None,
    header=None,
) -> Path:
    """Write one case in `layout` under `root`; returns the folder holding its images.

    Args:
        images: volume (X, Y, Z) by canonical modality (all four).
        affine, header: geometry of every file written.
        training_labels: segmentation in training labels (0..3), written in the layout's own
            convention; None writes an unlabelled case (MSD/nnU-Net: into imagesTs/).
    """
    if layout not in LAYOUTS:
        raise TumorsegError(f"unknown layout '{layout}' (choose from {', '.join(LAYOUTS)})")
    root = Path(root)
    seg = None if training_labels is None else layout_labels(layout).from_training(training_labels)
    if layout in ("msd", "nnunet"):
        folder = root / ("imagesTr" if seg is not None else "imagesTs")
        if layout == "msd":
            stacked = np.stack([images[m] for m in MSD_CHANNELS], axis=-1)
            save_nifti(folder / f"{case_id}.nii.gz", stacked, affine, _header_for(header, stacked))
        else:
            for i, m in enumerate(NNUNET_CHANNELS):
                save_nifti(folder / f"{case_id}_{i:04d}.nii.gz", images[m], affine, header)
        if seg is not None:
            save_nifti(root / "labelsTr" / f"{case_id}.nii.gz", seg, affine, header)
        return folder
    if layout == "bids":
        return _write_bids_case(root, case_id, images, affine, seg, header)
    folder = root / case_id
    sep, names = ("-", BRATS2023_NAMES) if layout == "brats2023" else ("_", {m: m for m in MODALITIES})
    prefix = "" if layout == "plain" else f"{case_id}{sep}"
    for m in MODALITIES:
        save_nifti(folder / f"{prefix}{names[m]}.nii.gz", images[m], affine, header)
    if seg is not None:
        save_nifti(folder / f"{prefix}seg.nii.gz", seg, affine, header)
    return folder


BIDS_NAMES: dict[str, str] = {"t1": "T1w", "t1ce": "ce-gadolinium_T1w", "t2": "T2w", "flair": "FLAIR"}


def _write_bids_case(root: Path, case_id: str, images: dict[str, np.ndarray], affine: np.ndarray,
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


def _header_for(header, data: np.ndarray):
    """A 3D header adapted to a 4D array (MSD), or None."""
    if header is None:
        return None
    out = header.copy()
    out.set_data_shape(data.shape)
    return out
