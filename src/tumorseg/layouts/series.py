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
from ..labels import BRATS2020, MODALITIES, canonical_modality
from .brats import PLAIN_SEG_STEMS
from .case import Case
from .discover import MAX_DEPTH, named_cases, walk

# Series that are no structural scan of the four: localizers, diffusion, perfusion, phase images
# (dcm2niix's `_ph`, `_real`), ROIs, masks, derived maps (and any `...map`), subtractions, reformats and duplicates
# (Siemens' `_ND`, GE's `Reformatted`, dcm2niix's `_Eq_1`), MP2RAGE's images, echoes of a dual echo.
NOT_STRUCTURAL = frozenset((
    "localizer", "localiser", "loc", "scout", "aahscout", "survey", "calibration", "cal", "pilot", "locator",
    "planning", "plan", "ref", "dwi", "dti", "diff", "diffusion", "adc", "trace", "tracew", "swi", "swan", "mag", "pha",
    "phase", "ph", "real", "imaginary", "perf", "perfusion", "pwi", "dsc", "dce", "asl", "pcasl", "mra", "tof", "angio",
    "fa", "colfa", "tensor", "b0", "b1000", "mip", "minip", "sbref", "mosaic", "fmri", "bold", "rest", "spectro", "csi",
    "svs", "t2star", "star", "roi", "roi1", "roi2", "mask", "map", "sub", "subt", "subtraction", "subtract",
    "subtracted", "cbv", "relcbv", "rcbv", "cbf", "mtt", "ttp", "uni", "inv1", "inv2", "r2star", "mpr",
    "reformat", "reformatted", "nd", "eq", "mp2rage", "e1", "e2", "pd", "stir",
))
# T2 gradient echoes are T2*-weighted; dcm2niix drops the `*` of `T2*` (its issue 425)
T2_STAR = frozenset(("gre", "ffe", "fe", "fl2d", "fl3d", "hemo", "medic", "me2d", "merge", "t2s", "epi", "grass", "flash",
                     "swi3d1r"))
# After contrast: the words, `+C`, `C+`, `postgd`, and the agents' names (`gadovist`, `gado`, `dotarem`, ...)
CONTRAST = frozenset(("post", "postcontrast", "postcon", "gd", "km", "mdc", "contrast", "contraste", "contrasto",
                      "kontrast", "con", "ce", "enhanced",
                      "gad", "gado", "gadolinium", "gadovist", "gadavist", "dotarem", "multihance", "magnevist",
                      "prohance", "clariscan", "omniscan", "elucirem", "vueway", "injection", "inj"))
# Before contrast, said outright: `pre`, `nativ`, BraTS's `t1n`, GE's `C-` (read as `pre`)
BEFORE = frozenset(("pre", "precontrast", "precon", "nativ", "native", "plain", "t1n", "unenhanced", "basale"))
# Words that deny the contrast word after them: `NON_CONTRAST`, `w/o gad`, `sans gado`, `ohne KM`, `vor KM`
NEGATIONS = frozenset(("no", "non", "without", "wo", "sans", "sin", "senza", "ohne", "sem", "zonder", "voor", "vor",
                       "avant", "antes", "uten", "utan", "bez"))
FILLERS = frozenset(("iv", "i", "v", "mezzo", "di", "de", "del", "of", "medio", "agent"))  # `NO IV CONTRAST`
NOT_CONTRAST = frozenset(("op", "operative", "surgery", "surgical", "resection", "tx", "treatment", "rt", "fossa",
                          "sat", "scan", "biopsy"))  # after `post` or `pre`: no contrast meant (post-op, posterior fossa)
T1_SEQUENCES = ("mprage", "bravo", "spgr", "fspgr", "tfe", "fl3d", "vibe")  # T1-weighted by name
FLAIR_WORDS = ("flair", "darkfluid", "spcir")  # Siemens' `dark-fluid` and `da-fl` are two words each
DATE_RE = re.compile(r"^(19|20)\d{6}(\d{4,6})?$")  # dcm2niix's `%t`: a study's date and time
# (modality, contrast): contrast "after", "before" or None (the name does not say) for a T1
Guess = tuple[str, str | None]


def _tokens(stem: str) -> list[str]:
    stem = re.sub(r"t2\s*\*", " t2star ", stem.lower())  # `AX_T2*_GRE`
    stem = re.sub(r"(?<![a-z0-9])(c|km|mdc|gd|gad|gado)\s*-(?![a-z0-9])", " pre ", stem)  # GE's `C-`, `KM-`
    stem = re.sub(r"\+\s*c(?![a-z0-9])|(?<![a-z0-9])(c|km|mdc|gd|gad|gado)\s*\+", " post ", stem)  # `T1+C`, `C+`, `mdc+`
    stem = stem.replace("+", " ")  # `T1W+FS`: with fat saturation, no contrast
    stem = re.sub(r"(?<![a-z0-9])w[^a-z0-9]*o(?![a-z0-9])", " without ", stem)  # `W_O_GAD`, `w/o`
    stem = re.sub(r"(?<![a-z])(pre|post|non|no|wo)(gad|gado|gd|con|contrast|t1)", r"\1 \2", stem)  # `PREGAD`, `postT1`
    stem = re.sub(r"(?<![a-z0-9])(t1w?)(pre|post)", r"\1 \2", stem)  # `T1pre`, `T1post`
    return [t for t in re.split(r"[^a-z0-9]+", stem) if t]


def _contrast(tokens: list[str]) -> str | None:
    """What a T1's name says of contrast: "before", "after", or None where it says neither, or
    both (`t1_mprage_KM-nativ`: a subtraction)."""
    said, negated = set(), set()
    for i, t in enumerate(tokens):
        reach = tokens[i + 1:]
        gap = next((k for k, w in enumerate(reach) if w not in FILLERS), len(reach))  # `SENZA MEZZO DI CONTRASTO`
        denied = [i + 1 + gap] if gap < len(reach) and _contrast_word(reach[gap]) else []
        if (t in NEGATIONS or t == "pre") and denied:
            said.add("before")  # `pre gad`, `non contrast`, `no IV contrast`
            negated.update(denied)
        elif t in ("pre", "post") and reach[:1] and reach[0] in NOT_CONTRAST:
            continue  # pre-operative, posterior fossa, pre-saturation
        elif t in BEFORE:
            said.add("before")
        elif i not in negated and (_contrast_word(t) or canonical_modality(t) == "t1ce"
                                   or (t.startswith("t1") and t.endswith("gd"))):  # `T1Gd`, `T1WGd`
            said.add("after")
    return said.pop() if len(said) == 1 else None


def _contrast_word(word: str) -> bool:
    return word in CONTRAST or word.startswith("gad")  # `gadovist`, `gado`


def guess_series(name: str, skip: int = 0) -> Guess | None:
    """The modality a series name suggests (`t1`, `t2`, `flair`; `seg` for a segmentation) with, for
    a T1, what the name says of contrast; None for a localizer, diffusion, perfusion, phase, T2*,
    a derived map or subtraction, or a name that says nothing. `skip`: leading words that are no
    series' (dcm2niix's `%f`, the folder's name, shared by every file of the folder)."""
    named = NIFTI_RE.match(name)
    stem = named["stem"] if named else name
    all_tokens = _tokens(stem)
    whole = canonical_modality(stem) if all(len(t) > 1 and not t.isdigit() for t in all_tokens) else None
    if whole is not None and skip == 0:  # `T1Gd`, `T2-FLAIR`: a modality's own name (not `CT_1`, `T1_C`)
        return ("t1", "after") if whole == "t1ce" else (whole, "before" if stem.lower() == "t1n" else None)
    tokens = all_tokens[skip:]
    if any(t in NOT_STRUCTURAL or (t.endswith("map") and len(t) > 3) for t in tokens):
        return None
    kinds = {canonical_modality(t) for t in tokens if t not in BEFORE}  # `native` is contrast, not a T1 here
    sequences = any(any(s in t for s in T1_SEQUENCES) for t in tokens)
    if any(t in PLAIN_SEG_STEMS for t in tokens):  # a segmentation of a T1 (MorphoBox's) is no tumour's
        return ("seg", None) if not (kinds - {None} or sequences) else None
    if "t1" in kinds or "t1ce" in kinds or any(t.startswith("t1") for t in tokens):  # GE's `AX T1 FLAIR`: T1-weighted
        return "t1", _contrast(tokens)
    words = set(tokens)
    if "flair" in kinds or any(w in t for t in tokens for w in FLAIR_WORDS) or {"dark", "fluid"} <= words or {
            "da", "fl"} <= words:
        return "flair", None
    if "t2" in kinds or any(t.startswith("t2") for t in tokens):
        return None if words & T2_STAR or "tirm" in words else ("t2", None)  # `t2_tirm_cor`: a STIR
    if sequences:
        return "t1", _contrast(tokens)
    return None


@dataclass
class ProposedCase:
    """One row of the proposed case list: the files by modality (and segmentation), where they came
    from ("layout": read as discovery reads them; "series names": guessed), and what to fill in."""

    case_id: str
    files: dict[str, Path] = field(default_factory=dict)
    source: str = "layout"
    notes: list[str] = field(default_factory=list)


def guess_case(case_id: str, files: list[Path], series: dict[Path, str] | None = None) -> ProposedCase:
    """A folder's series as one case: each modality (and the segmentation) taken where exactly one
    file suggests it; where none or several do, left empty with a note naming the candidates.
    `series`: the name each file's series goes by where it is not the file's own (a folder per
    series: `3_t1_mprage_sag/image.nii.gz`).

    The T1s are told apart only by what their names say: T1CE is the one T1 named after contrast;
    T1 the one named before it, or else, beside a T1CE so named, the one other T1 of the same
    protocol (`_same_protocol`). A T1 whose name says nothing is never taken alone: an MPRAGE
    acquired only after gadolinium is common."""
    proposed = ProposedCase(case_id, source="series names")
    stems = {path: NIFTI_RE.match((series or {}).get(path, path.name))["stem"] for path in files}
    dates = sorted({t[:8] for stem in stems.values() for t in _tokens(stem) if DATE_RE.match(t)})
    if len(dates) > 1:  # dcm2niix's `%t`: series of several studies, which one row would mix
        proposed.notes.append(f"series of {len(dates)} studies ({', '.join(dates)}) in one folder: give each study "
                              "a folder of its own, or fill the row in")
        return proposed
    shared = _shared_words(list(stems.values()))
    skips = {path: len(shared) if _tokens(stem)[:len(shared)] == shared else 0 for path, stem in stems.items()}
    found: dict[str, list[Path]] = {}
    t1s: dict[str | None, list[Path]] = {}
    for path in files:
        if (guess := guess_series(stems[path], skips[path])) is None:
            continue
        if guess[0] == "t1":
            t1s.setdefault(guess[1], []).append(path)
        else:
            found.setdefault(guess[0], []).append(path)
    after, before, unsaid = (sorted(t1s.get(k, [])) for k in ("after", "before", None))
    found["t1ce"] = after
    found["t1"] = before or [p for p in unsaid if len(after) == 1 and _same_protocol(p, after[0], stems, skips)]
    for kind in (*MODALITIES, "seg"):
        candidates = sorted(found.get(kind, []))
        if len(candidates) == 1:
            proposed.files[kind] = candidates[0]
        elif candidates:
            names = ", ".join(stems[p] for p in candidates)
            proposed.notes.append(f"{kind}: {len(candidates)} candidates ({names}); fill in the one to use")
        elif kind in ("t1", "t1ce") and unsaid:
            names = ", ".join(stems[p] for p in unsaid)
            proposed.notes.append(f"{kind}: T1 series whose names do not say before or after contrast ({names}); "
                                  "fill it in from the scanner's protocol")
        elif kind != "seg":
            proposed.notes.append(f"{kind}: no series name suggests it; fill it in, or leave it empty")
    return proposed


def _same_protocol(plain: Path, contrast: Path, stems: dict[Path, str], skips: dict[Path, int]) -> bool:
    """Whether a T1 whose name says nothing is the protocol a T1CE's name repeats with contrast words
    (`t1_mprage_sag_3`, `t1_mprage_sag_POST_GAD_9`): then it is the one before. Another protocol
    (an MPRAGE beside `t1_se_tra_KM`) may have been acquired after contrast too."""
    def words(path: Path) -> set[str]:
        return {t for t in _tokens(stems[path])[skips[path]:] if not t.isdigit()}
    return words(plain) <= words(contrast)


def _shared_words(stems: list[str]) -> list[str]:
    """The leading words every series name of a folder shares before any word naming a scan
    (dcm2niix's `%f`, the folder's or the study's name, `MRI_BRAIN_W_WO_CONTRAST_...`): words of no
    one series, which would decide every T1's contrast alike; each name keeps one word at least."""
    words = [w for w in map(_tokens, stems) if len(w) > 1]  # a user's `seg` beside the series shares nothing
    if len(words) < 2:
        return []
    shared = 0
    while (all(len(w) > shared + 1 for w in words) and len({w[shared] for w in words}) == 1
           and not _names_a_scan(words[0][shared])):  # `t1_mprage_sag_3`, `t1_mprage_sag_POST_9`: the series'
        shared += 1
    return words[0][:shared]


def _names_a_scan(word: str) -> bool:
    return (canonical_modality(word) is not None or word.startswith(("t1", "t2"))
            or any(w in word for w in (*T1_SEQUENCES, *FLAIR_WORDS)))


def propose_case_list(root: str | os.PathLike) -> list[ProposedCase]:
    """Every case under `root`: those a layout names as discovery reads them, and each folder of
    series-named scans as one case guessed by `guess_case` (named by its folder, or by the folders
    above it where names repeat). MSD's 4-D files cannot be listed by path: one line says so."""
    root = Path(root)
    if not root.is_dir():
        raise TumorsegError(f"{root}: not a folder (give the folder of the patients' scans)")
    unread: dict[Path, list[Path]] = {}
    cases = named_cases(root, *walk(root, True, unread, []))
    four_d = [c.case_id for c in cases if c.channel_index]
    if four_d:
        raise TumorsegError(f"{root}: {four_d[0]} and the like are 4-D files (MSD): tumorseg reads them as they are, "
                            "without a case list")
    other = [c for c in cases if c.labels != BRATS2020]  # a list's labels are read as BraTS 2020's
    if other:
        raise TumorsegError(f"{root}: {other[0].case_id} and the like are {other[0].layout} cases with {other[0].labels.name} "
                            "labels, which a case list cannot carry: tumorseg reads them as they are, without one")
    rows = [_as_listed(c) for c in cases]
    patients = _series_folders(unread)
    unread = {f: files for f, files in unread.items() if not any(f in folders for folders in patients.values())}
    names = _folder_names(root, [*unread, *patients])
    rows += [guess_case(names[folder], files) for folder, files in unread.items()]
    for patient, folders in patients.items():  # the folder's name is its series'; the file's may be any
        rows.append(guess_case(names[patient], [f for files in folders.values() for f in files],
                               {f: f"{folder.name}_{f.name}" for folder, files in folders.items() if folder != patient
                                for f in files}))
    if not rows:
        raise TumorsegError(f"{root}: no NIfTI scans found within {MAX_DEPTH} folder levels (convert DICOM series "
                            "with dcm2niix first)")
    ids = [r.case_id for r in rows]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise TumorsegError(f"{root}: case id {twice[0]} found twice; give one dataset's folder")
    return sorted(rows, key=lambda r: r.case_id)


def _series_folders(unread: dict[Path, list[Path]]) -> dict[Path, dict[Path, list[Path]]]:
    """Patients whose scans dcm2niix wrote into a folder per series (`P1/3_t1_mprage_sag/*.nii.gz`):
    each patient's folder -> its series' folders and their files, where two or more of its folders
    are named as series are (a scan's words, or a localizer's, a diffusion's), hold a few files each
    and begin with no two patients' ids; the patient's folder itself (with a file or two of its own,
    a segmentation) is one of them."""
    by_patient: dict[Path, dict[Path, list[Path]]] = {}
    for folder, files in unread.items():
        if len(files) <= 4 and any(_names_a_scan(t) or t in NOT_STRUCTURAL for t in _tokens(folder.name)):
            by_patient.setdefault(folder.parent, {})[folder] = files  # a series' echoes, phase, `a` copies
    return {p: {**({p: unread[p]} if p in unread else {}), **folders} for p, folders in by_patient.items()
            if len(folders) > 1 and len(unread.get(p, ())) <= 2 and len({_patient_words(f.name) for f in folders}) == 1}


def _patient_words(name: str) -> tuple[str, ...]:
    """The words a series folder's name begins with before any naming a scan, series numbers left out:
    a patient's id where dcm2niix wrote `P001_t1_mprage_sag_3/` (two ids: two patients, not one)."""
    words = []
    for t in _tokens(name):
        if _names_a_scan(t) or t in NOT_STRUCTURAL:
            break
        if not t.isdigit():
            words.append(t)
    return tuple(words)


def _as_listed(case: Case) -> ProposedCase:
    files = {m: case.images[m] for m in MODALITIES if m in case.images}
    return ProposedCase(case.case_id, {**files, **({"seg": case.seg} if case.seg else {})})


def _folder_names(root: Path, folders: list[Path]) -> dict[Path, str]:
    """Each folder's name, or its path below `root` joined by `_` where names repeat (a patient's
    `visit_1` beside another's)."""
    parts = {f: (f.relative_to(root).parts or (root.resolve().name,)) for f in folders}  # `.`: its own name
    for k in range(1, max((len(p) for p in parts.values()), default=1) + 1):
        names = {f: "_".join(p[-k:]) for f, p in parts.items()}
        if len(set(names.values())) == len(names):
            return names
    return {f: "_".join(p) for f, p in parts.items()}


def write_case_list(rows: list[ProposedCase], out: str | os.PathLike) -> Path:
    """`rows` as a `cases.csv` (a `.tsv` tab-separated; `layouts.list_cases` reads both): case, t1,
    t1ce, t2, flair, seg, with paths relative to its folder (where the folder is a link, to the
    folder it links to, as the list's reader resolves them); written atomically."""
    out = Path(out)
    folder = os.path.realpath(out.parent)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t" if out.suffix.lower() == ".tsv" else ",", lineterminator="\n")
    writer.writerow(["case", *MODALITIES, "seg"])
    for row in rows:
        writer.writerow([row.case_id, *(os.path.relpath(os.path.abspath(row.files[k]), folder)
                                        if k in row.files else "" for k in (*MODALITIES, "seg"))])
    write_text(out, buffer.getvalue())
    return out
