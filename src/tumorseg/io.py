"""NIfTI reading and writing, and atomic writes: the lowest layer, below every stage.

Case discovery (which files make a case, in which dataset layout) is `layouts`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import TumorsegError
from .lock import pid_alive
from .write_failure import write_failure

NIFTI_RE = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?\Z", re.IGNORECASE | re.DOTALL)  # any byte a name may hold


@dataclass(frozen=True)
class Volume:
    """A NIfTI volume as stored on disk (no scaling applied beyond the header's)."""

    data: np.ndarray
    affine: np.ndarray
    header: "object"  # nibabel.Nifti1Header; typed loosely so nibabel imports stay local
    path: Path

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel sizes (mm) from the affine, which places the voxels: a header's pixdim may disagree."""
        from nibabel.affines import voxel_sizes

        return tuple(float(z) for z in voxel_sizes(self.affine))


def load_nifti(path: str | os.PathLike, case_id: str | None = None) -> Volume:
    """Read a 3D NIfTI file; any failure becomes one line naming the file.

    Integer data without header scaling is returned in its stored dtype (int16, uint8)
    so callers avoid a float64 copy of every volume.
    """
    (vol,) = load_nifti_channels(path, case_id, None)
    return vol


MANIFEST = "manifest.json"  # what `tumorseg prepare` writes last, over its arrays


def prepared_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a `tumorseg prepare` output, finished or not (`unfinished_prepare`)."""
    return (Path(folder) / MANIFEST).is_file() or unfinished_prepare(folder)


def unfinished_prepare(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a `tumorseg prepare` output whose run has not (yet) written its
    manifest: one cut short, or one changing its arrays now."""
    folder = Path(folder)
    return not (folder / MANIFEST).is_file() and (folder / "records").is_dir() and (folder / "images").is_dir()


def nifti_files(folder: Path) -> list[Path]:
    """NIfTI files of a folder, sorted, without hidden ones (the `._*` files macOS archives carry).
    A link to nothing (an unfetched DataLad / git-annex file) stays where no readable file has its
    name's stem: reading it then says so, where dropping it would report the file as missing."""
    try:
        entries = [p for p in folder.iterdir() if NIFTI_RE.match(p.name) and not p.name.startswith(".")]
    except OSError:
        return []
    readable = [p for p in entries if p.is_file()]
    stems = {NIFTI_RE.match(p.name)["stem"] for p in readable}
    dangling = [p for p in entries if p.is_symlink() and not p.exists() and NIFTI_RE.match(p.name)["stem"] not in stems]
    return sorted(readable + dangling)


NO_ORIENTATION = ("gives no orientation (qform and sform codes 0): placed as nibabel places such files, from "
                  "pixdim alone, which may mirror left and right")
TWO_ORIENTATIONS = ("holds a qform and an sform that disagree: the sform is used, as nibabel and FSL do (other "
                    "tools may take the qform)")


def orientation_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with where a NIfTI header places its voxels (`NO_ORIENTATION`,
    `TWO_ORIENTATIONS`), or None; reads the header alone (None if it cannot: reading the data says why)."""
    import nibabel as nib

    try:
        header = nib.load(str(path)).header
        qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    except Exception:  # not NIfTI, unreadable: the data's own read names the file
        return None
    if qcode == 0 and scode == 0:
        return NO_ORIENTATION
    try:
        differ = bool(qcode and scode and not np.allclose(header.get_qform(), header.get_sform(), rtol=0, atol=1e-3))
    except Exception:  # a quaternion nibabel cannot turn into a matrix: it places the voxels by the sform
        differ = True
    return TWO_ORIENTATIONS if differ else None


def load_labels(path: str | os.PathLike, case_id: str | None = None) -> Volume:
    """A label map (`load_nifti`): float values within 1e-3 of whole numbers, the rounding noise
    resampling and float pipelines leave (0.9999999, 4.0000005), become those numbers; other
    fractions stay, for the caller's label check to name."""
    vol = load_nifti(path, case_id)
    if vol.data.dtype.kind != "f":
        return vol
    whole = np.rint(vol.data)
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, no warning on stderr
        fractions = np.abs(vol.data - whole)
    if not np.all(fractions <= 1e-3):  # NaN and infinities fail too: left for the check
        return vol
    if whole.size and (whole.min() < np.iinfo(np.int32).min or whole.max() > np.iinfo(np.int32).max):
        return vol  # no label map holds such values: left as they are for the check to name
    small = whole.size == 0 or (whole.min() >= 0 and whole.max() <= 255)
    return replace(vol, data=whole.astype(np.uint8 if small else np.int32))


def _link_loop(path: Path) -> bool:
    """Whether `path` is a link that leads back to itself (nibabel calls it a file not found)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


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
        if _link_loop(path):
            raise TumorsegError(f"{where}{path}: a link that leads back to itself (a symlink loop); link it to "
                                "the scan") from None
        if path.is_symlink():  # DataLad / git-annex keep unfetched files as links to content not there
            raise TumorsegError(f"{where}{path}: a link to {os.readlink(path)}, which is not there (a DataLad or "
                                "git-annex dataset whose content is not fetched? `datalad get` it)") from None
        raise TumorsegError(f"{where}{path}: file not found") from None
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise TumorsegError(f"{where}{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from None
    if data.dtype.kind not in "biuf":  # RGB (structured) or complex voxels: no intensity or label to read
        kind = "complex" if data.dtype.kind == "c" else "RGB" if data.dtype.names else str(data.dtype)
        raise TumorsegError(f"{where}{path}: {kind} voxels; give a scalar image (a magnitude, a label map)")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise TumorsegError(f"{where}{path}: its header places no voxels (an affine that is singular, zero voxel "
                            f"sizes, or not finite; check its sform and qform)")
    while data.ndim > (3 if indices is None else 4) and data.shape[-1] == 1:
        data = data[..., 0]  # (X, Y, Z, 1, 1): singleton time and vector axes some tools write
    if indices is None:
        if data.ndim != 3:
            raise TumorsegError(f"{where}{path}: expected a 3D volume, got shape {data.shape}")
        return [Volume(data=data, affine=img.affine, header=img.header, path=path)]
    if data.ndim != 4 or max(indices) >= data.shape[-1]:
        raise TumorsegError(f"{where}{path}: expected a 4D volume with {max(indices) + 1}+ channels, got shape {data.shape}")
    return [Volume(data=data[..., i], affine=img.affine, header=img.header, path=path) for i in indices]


def nifti_whole(path: str | os.PathLike) -> bool:
    """Whether a NIfTI file is whole: its header reads and it holds the bytes the header announces.
    A `.nii.gz` is checked by the uncompressed size its gzip trailer records (nibabel writes one
    member), without reading its data; where that does not match (several members, bgzip,
    padding, or a file cut short) it is decompressed through to its end."""
    import gzip

    import nibabel as nib

    try:
        image = nib.load(str(path))
        header = image.header  # the proxy's offset: the header's vox_offset may read 0
        need = int(image.dataobj.offset) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
        with open(path, "rb") as fh:
            if not str(path).endswith(".gz"):
                return os.fstat(fh.fileno()).st_size >= need
            fh.seek(-4, os.SEEK_END)
            if int.from_bytes(fh.read(4), "little") == need % 2**32:
                return True
        size = 0
        with gzip.open(path, "rb") as stream:
            while block := stream.read(1 << 24):
                size += len(block)
        return size >= need
    except Exception:  # noqa: BLE001 - nibabel and gzip raise many types for damaged files
        return False


TEMP_RE = re.compile(r"^\.tmp-(?P<pid>\d+)-(?P<name>.+)\Z", re.DOTALL)
STALE_AFTER_S = 24 * 3600  # a temporary this old is stale whoever wrote it (another host, a reused pid)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it into place.

    A crash or a full disk leaves either the old file or none, never a half-written one; a
    SIGKILL leaves the temporary, which the next run's `sweep_stale_temps` removes. The
    temporary name keeps the extension so writers that look at it (nibabel) still work.
    `size` (bytes), where the caller knows it, is what a full disk's message says was needed.
    """
    path = Path(path)
    tmp = path.parent / f".tmp-{os.getpid()}-{path.name}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        # The writer's finished frames (nibabel's) hold its open file: unlinked, the temporary
        # would keep its space for as long as anyone holds this exception, and a full disk would
        # fail every later write of the run. Clearing their locals closes it.
        traceback.clear_frames(exc.__traceback__)
        written = 0
        with contextlib.suppress(OSError):  # none written (a name too long, a folder it may not enter)
            written = tmp.stat().st_size
        _remove(tmp)
        file_above = next((p for p in path.parents if _is_file(p)), None)  # mkdir says only "File exists"
        reason = f"{file_above} is a file, not a folder" if file_above else write_failure(exc, path, written, size)
        raise TumorsegError(f"{path}: cannot write ({reason})") from None
    except BaseException:
        _remove(tmp)
        raise


def _is_file(path: Path) -> bool:
    """`path.is_file()`, False where it cannot be looked at (Python 3.11 raises on a name too long
    or a folder without search permission)."""
    try:
        return path.is_file()
    except OSError:
        return False


def check_writable(folder: str | os.PathLike, hint: str = "") -> None:
    """One line before the work, not after it, when `folder` cannot take output files (`hint`:
    what to do instead, appended)."""
    import tempfile

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-"):
            pass
    except OSError as exc:
        raise TumorsegError(f"{folder}: cannot write there ({exc.strerror or exc}){'; ' + hint if hint else ''}") from None


def _remove(tmp: Path) -> None:
    """Remove a failed write's temporary; on a read-only disk there is none, and unlink fails too."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def sweep_stale_temps(folder: str | os.PathLike, targets: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporaries (`.tmp-<pid>-<name>`) killed runs left in `folder`; returns them.

    A temporary is stale when its process is gone from this host or it is over a day old
    (written from another host, or its pid reused). Finished outputs never match the name.
    `targets` limits the sweep to temporaries of these file names (torchrun ranks sharing a
    folder each sweep their own cases'). A missing folder has none.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if targets is None else set(targets)
    removed = []
    for path in folder.iterdir():
        match = TEMP_RE.match(path.name)
        if match is None or (wanted is not None and match["name"] not in wanted):
            continue
        pid = int(match["pid"])
        with contextlib.suppress(FileNotFoundError):  # another run may sweep it at the same time
            old = time.time() - path.stat().st_mtime > STALE_AFTER_S
            if path.is_file() and (old or (pid != os.getpid() and not pid_alive(pid))):
                path.unlink()
                removed.append(path)
    return removed


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Atomically write one array as `.npy`."""
    with atomic_path(path, array.nbytes + 128) as tmp, open(tmp, "wb") as fh:  # + the .npy header
        np.save(fh, array)


def read_npy(path: str | os.PathLike, hint: str = "") -> np.ndarray:
    """An `.npy` array, memory-mapped (read-only); a missing, empty, truncated or foreign file is
    one line naming it (`hint`: what to do, appended)."""
    hint = f"; {hint}" if hint else ""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise TumorsegError(f"{path}: file not found{hint}") from None
    except (OSError, ValueError, EOFError) as exc:  # an empty file is EOFError
        raise TumorsegError(f"{path}: cannot read .npy ({str(exc) or type(exc).__name__}){hint}") from None


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, hex."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_sample_digest(path: str | os.PathLike, ends: int = 64 * 1024, blocks: int = 64, block: int = 4096) -> str:
    """SHA-256 of a file's size, its first and last `ends` bytes and `blocks` blocks spread between:
    a scan's identity without reading all of it (an uncompressed .nii begins and ends in header
    and background, so the spread blocks are what cross the brain; a .nii.gz ends with the CRC-32
    of its whole content), alike for a copy anywhere, since it holds no path or time."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        digest.update(str(size).encode())
        spread = ((size * (k + 1) // (blocks + 1), block) for k in range(blocks))
        for start, length in ((0, ends), *spread, (max(size - ends, 0), ends)):
            fh.seek(start)
            digest.update(fh.read(length))
    return digest.hexdigest()


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
    if header is not None:  # the reference scan's scaling and display window do not fit the new data
        img.header.set_slope_inter(1.0, 0.0)
        img.header["cal_min"], img.header["cal_max"] = 0.0, 0.0  # a label map in a 0..2000 window is black
    if description is not None:
        img.header["descrip"] = description.encode()[:79]
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a UTF-8 text file (JSON manifests, CSV tables, configs, pages). A file name
    that is no UTF-8 (an old zip's `patient_\xe9`) is written back as the bytes it was read from."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
