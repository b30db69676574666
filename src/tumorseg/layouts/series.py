"""A case list proposed for scans named by their series, as they leave a scanner through dcm2niix
(`3_t1_mprage_sag.nii.gz`, `AX_T2_FLAIR_5.nii.gz`, `T1_MPRAGE_POST_GAD_9.nii.gz`).

Discovery never reads such names: a guess could take the T1 before contrast for the one after,
and the labels would be wrong without a word. `propose_case_list` writes the guesses into a
`cases.csv` for a person to check (`tumorseg cases`); cases a layout names are listed as they are
read. A modality with no candidate or several is left empty, with a note naming the candidates.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TumorsegError
from ..io import NIFTI_RE, write_text
from ..labels import MODALITIES, canonical_modality
from .case import Case, file_stem
from .discover import walk

# Series that are no structural scan of the four (dcm2niix adds `_ph` to phase images, `_ROI1` to ROIs).
NOT_STRUCTURAL = frozenset((
    "localizer", "localiser", "loc", "scout", "aahscout", "survey", "calibration", "cal", "dwi", "dti", "diff",
    "diffusion", "adc", "trace", "tracew", "swi", "swan", "mag", "pha", "phase", "ph", "perf", "perfusion", "pwi",
    "dsc", "dce", "asl", "pcasl", "mra", "tof", "angio", "fa", "colfa", "tensor", "b0", "b1000", "mip", "minip", "sbref",
    "mosaic", "fmri", "bold", "rest", "spectro", "csi", "svs", "t2star", "star", "roi1", "roi2", "map",
))
CONTRAST = frozenset(("post", "postcontrast", "gd", "gad", "gado", "gadolinium", "contrast", "ce", "c", "km", "mdc",
                      "plus", "enhanced", "postgd", "postgad"))
T1_SEQUENCES = ("mprage", "mp2rage", "bravo", "spgr", "fspgr", "tfe", "fl3d", "vibe")  # T1-weighted by name
SEGMENTATION = frozenset(("seg", "segmentation", "tumor", "tumour", "label", "labels"))


def _tokens(stem: str) -> list[str]:
    stem = re.sub(r"t2\s*\*", " t2star ", stem.lower())  # `AX_T2*_GRE`
    stem = re.sub(r"\+\s*c\b|\bc\s*\+|\+", " post ", stem)  # `T1+C`, `BRAVO_C+`: after contrast
    return [t for t in re.split(r"[^a-z0-9]+", stem) if t]


def guess_modality(name: str) -> str | None:
    """The modality a series name suggests (`t1`, `t1ce`, `t2`, `flair`), `seg` for a segmentation,
    or None (a localizer, diffusion, perfusion, phase image, or a name that says nothing)."""
    named = NIFTI_RE.match(name)
    stem = named["stem"] if named else name
    if canonical_modality(stem):  # `T1Gd`, `flair`: a modality's own name
        return canonical_modality(stem)
    tokens = _tokens(stem)
    if any(t in NOT_STRUCTURAL for t in tokens):
        return None
    if any(t in SEGMENTATION for t in tokens):
        return "seg"
    after = any(t in CONTRAST or canonical_modality(t) == "t1ce" for t in tokens) and "pre" not in tokens
    if any(t.startswith("t1") for t in tokens):  # GE's `AX T1 FLAIR` is T1-weighted
        return "t1ce" if after else "t1"
    if any("flair" in t or "tirm" in t for t in tokens) or {"dark", "fluid"} <= set(tokens):
        return "flair"
    if any(t.startswith("t2") for t in tokens):
        return None if "gre" in tokens else "t2"  # a T2 gradient echo is T2*-weighted
    if any(any(s in t for s in T1_SEQUENCES) for t in tokens):
        return "t1ce" if after else "t1"
    return None


@dataclass
class ProposedCase:
    """One row of the proposed case list: the files by modality (and segmentation), where they came
    from ("layout": read as discovery reads them; "series names": guessed), and what to fill in."""

    case_id: str
    files: dict[str, Path] = field(default_factory=dict)
    source: str = "layout"
    notes: list[str] = field(default_factory=list)


def guess_case(case_id: str, files: list[Path]) -> ProposedCase:
    """A folder's series as one case: each modality (and the segmentation) taken where exactly one
    file suggests it; where none or several do, left empty with a note naming the candidates."""
    found: dict[str, list[Path]] = {}
    for path in files:
        if (kind := guess_modality(path.name)) is not None:
            found.setdefault(kind, []).append(path)
    proposed = ProposedCase(case_id, source="series names")
    for kind in (*MODALITIES, "seg"):
        candidates = sorted(found.get(kind, []))
        if len(candidates) == 1:
            proposed.files[kind] = candidates[0]
        elif candidates:
            names = ", ".join(file_stem(p) for p in candidates)
            proposed.notes.append(f"{kind}: {len(candidates)} candidates ({names}); fill in the one to use")
        elif kind != "seg":
            proposed.notes.append(f"{kind}: no series name suggests it; fill it in, or leave it empty")
    return proposed


def propose_case_list(root: str | os.PathLike) -> list[ProposedCase]:
    """Every case under `root`: those a layout names as discovery reads them, and each folder of
    series-named scans as one case guessed by `guess_case` (named by its folder, or by the folders
    above it where names repeat). MSD's 4-D files cannot be listed by path: one line says so."""
    root = Path(root)
    if not root.is_dir():
        raise TumorsegError(f"{root}: not a folder (give the folder of the patients' scans)")
    unread: dict[Path, list[Path]] = {}
    cases, _ = walk(root, True, unread, [])
    four_d = [c.case_id for c in cases if c.channel_index]
    if four_d:
        raise TumorsegError(f"{root}: {four_d[0]} and the like are 4-D files (MSD): tumorseg reads them as they are, "
                            "without a case list")
    rows = [_as_listed(c) for c in cases]
    names = _folder_names(root, list(unread))
    rows += [guess_case(names[folder], files) for folder, files in unread.items()]
    if not rows:
        raise TumorsegError(f"{root}: no NIfTI scans found (convert DICOM series with dcm2niix first)")
    ids = [r.case_id for r in rows]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise TumorsegError(f"{root}: case id {twice[0]} found twice; give one dataset's folder")
    return sorted(rows, key=lambda r: r.case_id)


def _as_listed(case: Case) -> ProposedCase:
    files = {m: case.images[m] for m in MODALITIES if m in case.images}
    return ProposedCase(case.case_id, {**files, **({"seg": case.seg} if case.seg else {})})


def _folder_names(root: Path, folders: list[Path]) -> dict[Path, str]:
    """Each folder's name, or its path below `root` joined by `_` where names repeat (a patient's
    `visit_1` beside another's)."""
    parts = {f: (f.relative_to(root).parts or (root.name,)) for f in folders}
    for k in range(1, max((len(p) for p in parts.values()), default=1) + 1):
        names = {f: "_".join(p[-k:]) for f, p in parts.items()}
        if len(set(names.values())) == len(names):
            return names
    return {f: "_".join(p) for f, p in parts.items()}


def write_case_list(rows: list[ProposedCase], out: str | os.PathLike) -> Path:
    """`rows` as a `cases.csv` (`layouts.list_cases` reads it): case, t1, t1ce, t2, flair, seg, with
    paths relative to its folder (links kept as links); written atomically."""
    out = Path(out)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", *MODALITIES, "seg"])
    for row in rows:
        writer.writerow([row.case_id, *(os.path.relpath(os.path.abspath(row.files[k]), os.path.abspath(out.parent))
                                        if k in row.files else "" for k in (*MODALITIES, "seg"))])
    write_text(out, buffer.getvalue())
    return out
