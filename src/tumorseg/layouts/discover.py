"""Finding the cases under a folder: the layouts tried at each level, the notes on folders left
out, and the checks that one folder is one dataset."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Collection

from ..errors import TumorsegError
from ..io import nifti_files, prepared_folder
from ..labels import LabelConvention
from ..log import say
from .bids import BIDS_DESCRIPTION, BIDS_RE, BIDS_SKIPPED, bids_cases
from .brats import brats_cases, label_files
from .case import Case, file_stem
from .dataset_json import DATASET_JSON, IMAGE_DIRS, LABEL_DIRS, dataset_cases
from .peds import pediatric_labels
from .table import CASE_LIST_SUFFIXES, is_case_list, list_cases


MAX_DEPTH = 4
EXPECTED = ("BraTS case folders (<case>_{t1,t1ce,t2,flair}.nii[.gz] or <case>-{t1n,t1c,t2w,t2f}.nii.gz), "
            "case folders of files named by modality ({t1,t1ce,t2,flair}.nii[.gz]), "
            "an MSD / nnU-Net dataset (dataset.json with imagesTr/), a BIDS dataset, or a cases.csv")
NAMING_HINT = ("name each case's files t1, t1ce, t2, flair (or <case>_t1 ...), or list them in a cases.csv with "
               "columns case,t1,t1ce,t2,flair: `tumorseg cases DIR cases.csv` proposes one from series names")
# UPENN-GBM keeps its expert segmentations (`<case>_segm.nii.gz`) apart from the case folders of
# `images_structural/`, in a folder beside them (`automated_segm/` beside it is not expert truth).
SEGMENTATION_FOLDERS: tuple[str, ...] = ("images_segm",)


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
                                    if not all(_names_a_case(file_stem(n), ids) for n in files)],
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
        say(note)


def _names_a_case(stem: str, ids: set[str]) -> bool:
    """Whether a file's name is a case id or begins with one (`<case>_DTI_AD`, `<case>.nii.gz`)."""
    return stem in ids or any(stem[:i] in ids for i, c in enumerate(stem) if c in "_-.")


def _unread(folder: Path) -> list[Path]:
    """The NIfTI files of a folder that made no case where they are scans named for no modality
    (dcm2niix's series names); none for BIDS files (another datatype's folder: dwi/, func/)."""
    files = nifti_files(folder)
    return [] if all(BIDS_RE.match(file_stem(f)) for f in files) else files


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
    cases, seg_folders = walk(root, need_images, unread, nested)
    flat = not cases and not need_images
    if flat:
        cases = label_files(root)
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
    return named_cases(root, cases, seg_folders)


def walk(root: Path, need_images: bool, unread: dict[Path, list[Path]], nested: list[Path]) -> tuple[list[Case], list[Path]]:
    """The cases of every layout in `root`'s folders (to `MAX_DEPTH` levels), and the folders beside
    them that hold segmentations (UPENN-GBM's); the folders of NIfTI files that made no case are
    added to `unread` (with their files), and a case folder's sub-folders holding a case (a later
    visit inside a patient's) to `nested`."""
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
    return cases, seg_folders


def named_cases(root: Path, cases: list[Case], seg_folders: list[Path]) -> list[Case]:
    """`walk`'s cases as discovery gives them: with the segmentations kept beside them, the
    pediatric label numbers of their year, and names told apart where folders repeat them."""
    return _named_apart(root, pediatric_labels(root, _with_segmentations_beside(cases, seg_folders)))


def _folder_cases(folder: Path, need_images: bool) -> list[Case] | None:
    """The cases `folder` itself holds (a dataset, one of its image folders, a case folder), or None."""
    if (folder / DATASET_JSON).is_file():
        subs = tuple(s for s in IMAGE_DIRS if (folder / s).is_dir())
        if not subs and not need_images and (folder / "labelsTr").is_dir():
            subs = ("labelsTr",)
        if subs:
            return dataset_cases(folder, subs)
    if folder.name in (*IMAGE_DIRS, *LABEL_DIRS.values()) and (folder.parent / DATASET_JSON).is_file():
        return dataset_cases(folder.parent, (folder.name,))
    files = nifti_files(folder)
    bids = bids_cases(folder, files)
    if bids is not None:
        return [c for c in bids if c.images or (not need_images and c.seg is not None)] or None
    return brats_cases(folder, files, need_images)


def _with_segmentations_beside(cases: list[Case], seg_folders: list[Path]) -> list[Case]:
    """Cases given the segmentation a folder beside theirs holds for their id (UPENN-GBM's
    `images_segm/<case>_segm.nii.gz`), where their own folder holds none."""
    segs = {c.case_id: c.seg for folder in seg_folders if folder.is_dir() for c in label_files(folder)}
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
