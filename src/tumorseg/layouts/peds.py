"""BraTS-PEDs: 2023's or 2024's label numbers, under the same file names."""

from __future__ import annotations

import re
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from ..errors import TumorsegError
from ..io import load_labels
from ..labels import CONVENTIONS
from .case import Case


# BraTS-PEDs renumbered its labels in 2024 under the 2023 file names (`labels.CONVENTIONS["peds2024"]`).
_PED_CASE_RE = re.compile(r"^BraTS-PED-\d", re.IGNORECASE)
# A release year beside "BraTS" or "PED(s)" in a folder's name (`BraTS2024-PED-...`, `PEDs_2024`), not a
# date elsewhere in it (`..._downloaded_2024-03`).
_RELEASE_RE = re.compile(r"(?:brats|peds?)[-_ ]?(20\d\d)(?!\d)|(?<!\d)(20\d\d)[-_ ]?(?:brats|peds?)", re.IGNORECASE)
PEDS2024_VALUE = 4  # oedema in BraTS-PEDs 2024; no 2023 PED label and no cavity (PED is pre-treatment)


def pediatric_labels(root: Path, cases: list[Case]) -> list[Case]:
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
