"""BraTS-named case folders (2018-2020, 2021, 2023+), `plain` folders of files named by modality,
and flat folders of label files (`<case>.nii.gz`, `<case>_seg`)."""

from __future__ import annotations

import re
from pathlib import Path

from ..io import nifti_files
from ..labels import BRATS2020, CONVENTIONS, canonical_modality
from .case import Case, file_stem, several_scans


_BRATS_SUFFIX_RE = re.compile(r"[_-](?P<key>[A-Za-z0-9]+)$")
_BRATS_TWO_WORDS_RE = re.compile(r"[_-](?P<key>[A-Za-z0-9]+[_-][A-Za-z0-9]+)$")
# File names of each layout's modalities and the separator before them.
BRATS2023_NAMES: dict[str, str] = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
PLAIN_SEG_STEMS: tuple[str, ...] = ("seg", "segmentation", "label", "labels")
FOLDER_WRAPPERS: tuple[str, ...] = ("_nifti",)  # `<case>_nifti/` (UCSF-PDGM) names the case `<case>`
TUMOUR_SEG_SUFFIXES: tuple[str, ...] = ("_tumor_segmentation", "_tumour_segmentation")  # UCSF-PDGM
_SEG_FILE_SUFFIX_RE = re.compile(rf"([_-]segm?|{'|'.join(TUMOUR_SEG_SUFFIXES)})$", re.IGNORECASE)  # after a case id
_BRATS2023_CASE_RE = re.compile(r"^BraTS-[A-Za-z]+-\d+-\d+$", re.IGNORECASE)  # BraTS 2023+ ids: BraTS-GLI-00000-000


def _case_key(stem: str, folder: str = "") -> tuple[str, str] | None:
    """(case prefix, modality or "seg") of a `<case>_<key>` / `<case>-<key>` file stem in `folder`
    (its name), or None."""
    lower = stem.lower()
    for suffix in TUMOUR_SEG_SUFFIXES:
        if lower.endswith(suffix):
            return stem[: -len(suffix)], "seg"
    one, two = _BRATS_SUFFIX_RE.search(stem), _BRATS_TWO_WORDS_RE.search(stem)
    m = one  # `<case>_T2_FLAIR`, `<case>-t1-post`: one modality in two words, unless the folder names
    if two is not None and canonical_modality(two["key"]) is not None and not (  # `P01_T2/P01_T2_flair`
            one is not None and folder and folder.lower().startswith(stem[: one.start()].lower())):
        m = two
    prefix = stem[: m.start()] if m is not None else ""
    if m is None or (_series_words(prefix) and not folder.lower().startswith(prefix.lower())):
        return None  # the folder's own name is a case's (`P01_T1/P01_T1_flair`: a timepoint T1)
    kind = "seg" if m["key"].lower() == "seg" else canonical_modality(m["key"])
    return (prefix, kind) if kind is not None else None


SCAN_PLANES = frozenset(("ax", "axial", "sag", "sagittal", "cor", "coronal", "tra", "transverse", "3d", "2d"))


def _series_words(prefix: str) -> bool:
    """Whether a name's prefix is a scanner's series words, not a case: it ends in a plane or a
    modality (`3_SAG_T1` of `3_SAG_T1_FLAIR`, `T2W` of `T2W_FLAIR`, `AX` of `AX_T2`, from dcm2niix),
    or is planes and series numbers alone (`3` of `3_T1`). Those scans are named for no case
    (`tumorseg cases` proposes a list), unless the prefix is their folder's name; a case id with such
    a word inside (`GBM-COR-012`) is still one."""
    words = [w for w in re.split(r"[^a-z0-9]+", prefix.lower()) if w]
    series = [w in SCAN_PLANES or canonical_modality(w) is not None for w in words]
    return bool(words) and (series[-1] or all(s or w.isdigit() for s, w in zip(series, words)))


def brats_cases(folder: Path, files: list[Path], need_images: bool) -> list[Case] | None:
    """The case `folder` is, or, when its files name several cases (`<case>_t1.nii.gz` of many cases
    side by side), one case per name; None if it holds none."""
    groups: dict[str, list[Path]] = {}
    with_images: set[str] = set()
    for path in files:
        stem = file_stem(path)
        key = _case_key(stem, folder.name) if canonical_modality(stem) is None else None
        if key is not None:
            groups.setdefault(key[0], []).append(path)
            if key[1] != "seg":
                with_images.add(key[0])
    if len(with_images) > 1:  # segmentation-only names alone stay `label_files`' flat folder
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
        stem = file_stem(path)
        whole = canonical_modality(stem)  # `plain`: the stem is the modality (`T1`, `T2-FLAIR`)
        key = _case_key(stem, folder.name) if whole is None else None
        if stem.lower() in PLAIN_SEG_STEMS or (key is not None and key[1] == "seg"):
            segs.append(path)
        elif whole is not None or key is not None:  # a second copy (`.nii` beside `.nii.gz`) is no segmentation
            modality = whole or key[1]
            if modality not in images:
                images[modality] = path
                bare += whole is not None
                dashed += whole is None and stem[len(key[0])] == "-"
            elif (why := several_scans(folder, case_id, modality, [images[modality], path])) is not None:
                conflicts[modality] = why
        else:
            others.append(path)
    if images and len({file_stem(s) for s in segs}) == 1:
        segs = segs[:1]  # one segmentation twice (`.nii` beside `.nii.gz`): the first, as for the images
    if len(segs) > 1 or (not images and (need_images or not segs)):
        return None  # several cases' segmentations in one folder: `label_files` pairs them
    seg = segs[0] if segs else None
    plain = bare == len(images) > 0 or (not images and file_stem(seg).lower() in PLAIN_SEG_STEMS)
    if not images and not plain and (_case_key(file_stem(seg)) or ("",))[0] != case_id:
        return None  # a lone `<case>_seg` file of a flat folder, not a segmentation-only case folder
    note = None
    if seg is None and len(others) == 1 and images and not plain and "seg" in file_stem(others[0]).lower():
        # BraTS 2020 case 355 ships its segmentation as 'W39_1998.09.19_Segm.nii' (a lone `brainmask` is none).
        seg = others[0]
        note = f"{case_id}: using '{seg.name}' as the segmentation (non-standard name)"
    if dashed or (seg is not None and not images and file_stem(seg).endswith("-seg")):
        layout = "brats2023"
    elif plain:
        layout = "plain"
    else:
        layout = "brats2021" if case_id.startswith("BraTS2021_") else "brats2020"
    labels = CONVENTIONS["brats2023"] if layout == "brats2023" else BRATS2020
    return Case(case_id, folder, images, seg, note, layout, labels, conflicts=conflicts)


def label_files(folder: Path) -> list[Case]:
    """A flat folder of `<case>.nii.gz` (or `<case>_seg`, `<case>-seg`, UPENN-GBM's `<case>_segm`,
    UCSF-PDGM's `<case>_tumor_segmentation`) segmentations, labelsTr style. BraTS 2023+ case ids
    (`BraTS-GLI-00000-000`) name their convention, as their case folders do: a 2024 truth holding a
    resection cavity (4) and no enhancing tumour is not read as BraTS 2020's enhancing tumour."""
    cases = []
    for f in nifti_files(folder):
        case_id = _SEG_FILE_SUFFIX_RE.sub("", file_stem(f))
        named = _BRATS2023_CASE_RE.match(case_id) is not None
        cases.append(Case(case_id, folder, seg=f, layout="brats2023" if named else "labels",
                          labels=CONVENTIONS["brats2023"] if named else BRATS2020))
    return cases
