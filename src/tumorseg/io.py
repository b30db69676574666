"""NIfTI reading and writing, and atomic writes: the lowest layer, below every stage.

Case discovery (which files make a case, in which dataset layout) is `layouts`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import TumorsegError

NIFTI_RE = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$", re.IGNORECASE)


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
    (vol,) = load_nifti_channels(path, case_id, None)
    return vol


def load_nifti_channels(path: str | os.PathLike, case_id: str | None, indices: list[int] | None) -> list[Volume]:
    """Read a NIfTI file once: the 3D volume (`indices` None) or the given channels of a 4D one.

    MSD Task01 stores all four modalities of a case in one 4D file; reading it once per case
    instead of once per modality saves three decompressions.
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
    if indices is None:
        if data.ndim == 4 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise TumorsegError(f"{where}{path}: expected a 3D volume, got shape {data.shape}")
        return [Volume(data=data, affine=img.affine, header=img.header, path=path)]
    if data.ndim != 4 or max(indices) >= data.shape[-1]:
        raise TumorsegError(f"{where}{path}: expected a 4D volume with {max(indices) + 1}+ channels, got shape {data.shape}")
    return [Volume(data=data[..., i], affine=img.affine, header=img.header, path=path) for i in indices]


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


def save_nifti(
    path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, header=None, description: str | None = None
) -> None:
    """Atomically write a NIfTI file with the geometry (affine, header) of a reference scan.

    `description` goes into the header's `descrip` field (80 bytes): predictions record their
    label convention there.
    """
    import nibabel as nib

    header = header.copy() if header is not None else None
    img = nib.Nifti1Image(array, affine, header)
    img.set_data_dtype(array.dtype)
    if header is not None:
        img.header.set_slope_inter(1.0, 0.0)
    if description is not None:
        img.header["descrip"] = description.encode()[:79]
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file (JSON manifests, CSV tables, configs)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
