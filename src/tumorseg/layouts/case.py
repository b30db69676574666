"""One case's files (`Case`) and reading its scans; the layouts' names."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TumorsegError
from ..io import NIFTI_RE, Volume, file_digest, file_sample_digest, load_nifti_channels
from ..labels import BRATS2020, MODALITIES, LabelConvention


LAYOUTS: tuple[str, ...] = ("brats2020", "brats2021", "brats2023", "msd", "nnunet", "plain", "bids")
# Layouts whose names say nothing of the label convention: `evaluate` tells it from the values.
UNNAMED_CONVENTION: tuple[str, ...] = ("labels", "plain", "bids", "list")


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
        by_file.setdefault(_real(case.image(m)), []).append(m)  # one file however its paths spell it
    for m in MODALITIES:  # the same 3-D scan under a modality not read here: T1 given as T1CE too
        if m not in modalities and m in case.images and m not in case.channel_index:
            twin = by_file.get(_real(case.images[m]))
            if twin is not None and twin[0] not in case.channel_index:
                twin.append(m)
    loaded: dict[str, Volume] = {}
    for path, names in by_file.items():
        indices = [case.channel_index[m] for m in names] if names[0] in case.channel_index else None
        if indices is None and len(names) > 1:  # a table naming one 3-D scan twice: never one scan as two
            raise TumorsegError(f"{case.case_id}: {case.image(names[0])} is given as both {names[0]} and {names[1]}; "
                                "each modality needs its own scan")
        for m, vol in zip(names, load_nifti_channels(case.image(names[0]), case.case_id, indices)):
            loaded[m] = vol
    return [loaded[m] for m in modalities]


def _real(path: Path) -> Path:
    """`path` with its links followed; a link loop as it is (reading it then says so: `Path.resolve`
    raised RuntimeError)."""
    return Path(os.path.realpath(path))


def files_digest(case: Case, channels: Sequence[str], seg: bool = False) -> str:
    """SHA-256 (hex) of the files a case's outputs come from, alike for a copy anywhere: each
    channel's scan by `io.file_sample_digest`, in order, and with `seg` the segmentation's whole
    content (a corrected label map may differ in a few voxels of a `.nii`). Raises TumorsegError or
    OSError where a file cannot be read."""
    digest = hashlib.sha256()
    for m in channels:
        digest.update(f"{m}:{case.channel_index.get(m)}:{file_sample_digest(case.image(m))};".encode())
    if seg and case.seg is not None:
        digest.update(f"seg:{file_digest(case.seg)};".encode())
    return digest.hexdigest()


def file_stem(path: Path) -> str:
    return NIFTI_RE.match(path.name)["stem"]


def several_scans(folder: Path, case_id: str, kind: str, paths: list[Path]) -> str | None:
    """Why several files of one modality (`T1` beside `T1w`, two runs) cannot be read, naming
    them, or None for one scan (`.nii` beside `.nii.gz` is one)."""
    stems = sorted({file_stem(p) for p in paths})
    if len(stems) < 2:
        return None
    return f"{case_id}: several {kind} files in {folder} ({', '.join(stems)}); keep one per modality"
