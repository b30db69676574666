"""Case discovery in the layouts users have, NIfTI reading and writing, atomic writes.

Layouts found (any depth up to a few folders): the Kaggle download
`BraTS2020_TrainingData/MICCAI_BraTS2020_TrainingData/BraTS20_Training_NNN/...` with `.nii`
files, the same with `.nii.gz`, a plain folder of case folders, a single case folder, and
validation cases without a segmentation. A case folder is one holding files named
`<anything>_<modality>.nii[.gz]`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import TumorsegError
from .labels import MODALITIES

NIFTI_RE = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$", re.IGNORECASE)
_SUFFIX_RE = re.compile(r"_(t1|t1ce|t2|flair|seg)$", re.IGNORECASE)
MAX_DEPTH = 4


@dataclass(frozen=True)
class Case:
    """One BraTS case folder: where each modality and the segmentation are.

    `images` may lack modalities (a broken download); `require` turns that into an error
    naming the missing file. `seg_note` says when the segmentation was found under a
    non-standard name (case 355 in the BraTS 2020 download).
    """

    case_id: str
    folder: Path
    images: dict[str, Path] = field(default_factory=dict)
    seg: Path | None = None
    seg_note: str | None = None

    def image(self, modality: str) -> Path:
        if modality not in self.images:
            raise TumorsegError(
                f"{self.case_id}: missing modality '{modality}' "
                f"(expected {self.folder / f'{self.case_id}_{modality}.nii[.gz]'})"
            )
        return self.images[modality]


def _nifti_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and NIFTI_RE.match(p.name))
    except OSError:
        return []


def _case_from_folder(folder: Path, files: list[Path]) -> Case | None:
    images: dict[str, Path] = {}
    seg: Path | None = None
    others: list[Path] = []
    for path in files:
        stem = NIFTI_RE.match(path.name)["stem"]
        m = _SUFFIX_RE.search(stem)
        key = m.group(1).lower() if m else None
        if key == "seg":
            seg = path
        elif key in MODALITIES:
            images[key] = path
        else:
            others.append(path)
    if not images:
        return None
    note = None
    if seg is None and len(others) == 1:
        # BraTS 2020 case 355 ships its segmentation as 'W39_1998.09.19_Segm.nii'.
        seg = others[0]
        note = f"{folder.name}: using '{seg.name}' as the segmentation (non-standard name)"
    return Case(case_id=folder.name, folder=folder, images=images, seg=seg, seg_note=note)


def discover_cases(root: str | os.PathLike) -> list[Case]:
    """All case folders under `root` (or `root` itself if it is one), sorted by case id."""
    root = Path(root)
    if not root.exists():
        raise TumorsegError(f"{root}: no such folder")
    if not root.is_dir():
        raise TumorsegError(f"{root}: not a folder")
    cases: list[Case] = []
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        case = _case_from_folder(folder, _nifti_files(folder))
        if case is not None:
            cases.append(case)
            continue
        if depth < MAX_DEPTH:
            with contextlib.suppress(OSError):
                stack.extend(
                    (p, depth + 1) for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                )
    if not cases:
        raise TumorsegError(
            f"{root}: no BraTS cases found (expected case folders with "
            "<case>_{t1,t1ce,t2,flair}.nii[.gz] files)"
        )
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise TumorsegError(f"{root}: case ids found more than once: {', '.join(dupes)}")
    return sorted(cases, key=lambda c: c.case_id)


@dataclass(frozen=True)
class Volume:
    """A NIfTI volume as stored on disk (no scaling applied beyond the header's)."""

    data: np.ndarray
    affine: np.ndarray
    header: "object"  # nibabel.Nifti1Header; typed loosely so nibabel imports stay local
    path: Path

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(z) for z in self.header.get_zooms()[:3])


def load_nifti(path: str | os.PathLike, case_id: str | None = None) -> Volume:
    """Read a 3D NIfTI file; any failure becomes one line naming the file.

    Integer data without header scaling is returned in its stored dtype (int16, uint8)
    so callers avoid a float64 copy of every volume.
    """
    import nibabel as nib

    path = Path(path)
    where = f"{case_id}: " if case_id else ""
    try:
        img = nib.load(str(path))
        proxy = img.dataobj
        if getattr(proxy, "is_proxy", False) and img.header.get_slope_inter() in ((None, None), (1.0, 0.0)):
            data = np.asarray(proxy)
        else:
            data = img.get_fdata(dtype=np.float32)
    except FileNotFoundError:
        raise TumorsegError(f"{where}{path}: file not found") from None
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise TumorsegError(f"{where}{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise TumorsegError(f"{where}{path}: expected a 3D volume, got shape {data.shape}")
    return Volume(data=data, affine=img.affine, header=img.header, path=path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it into place.

    A crash or a full disk leaves either the old file or none, never a half-written one.
    The temporary name keeps the extension so writers that look at it (nibabel) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{os.getpid()}-{path.name}"
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        reason = "out of disk space" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise TumorsegError(f"{path}: cannot write ({reason})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Atomically write one array as `.npy`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, header=None) -> None:
    """Atomically write a NIfTI file with the geometry (affine, header) of a reference scan."""
    import nibabel as nib

    header = header.copy() if header is not None else None
    img = nib.Nifti1Image(array, affine, header)
    img.set_data_dtype(array.dtype)
    if header is not None:
        img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file (JSON manifests, CSV tables, configs)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
