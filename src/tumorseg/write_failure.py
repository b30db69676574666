"""Why a write failed, in words: a full disk (what the write needed, what is free), a file-size
limit (`ulimit -f`, a scheduler's), or the system's reason. Below `io` and `lock`, which both
write and both name the file."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

try:
    import resource  # Unix: the process's file-size limit
except ImportError:  # Windows has none to name
    resource = None


def write_failure(exc: OSError, path: Path, written: int = 0, size: int | None = None) -> str:
    """The reason `exc` stopped writing `path`, after `written` bytes of a file of `size` (None:
    not known); the failed file already removed, so the space free is what is left."""
    if _disk_full(exc, path):
        return _no_space(path, written, size)
    limit = _file_size_limit()
    if exc.errno == errno.EFBIG or (exc.errno is None and limit is not None and written >= limit):
        return "larger than the file-size limit" + (f" ({_mb(limit)}, `ulimit -f`)" if limit is not None else "")
    return exc.strerror or str(exc)


def _disk_full(exc: OSError, path: Path) -> bool:
    """ENOSPC, or a short write without an errno (numpy's `tofile`) on a disk with under 1 MB free."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return exc.errno is None and shutil.disk_usage(path.parent).free < 2**20
    except OSError:
        return False


def _file_size_limit() -> int | None:
    """The process's file-size limit in bytes (`ulimit -f`), None where it has none (EFBIG is then
    the file system's own limit)."""
    if resource is None:
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def _no_space(path: Path, written: int, size: int | None) -> str:
    """The reason for ENOSPC with what the write needed: `size`, else more than it had `written`;
    both amounts to as many decimals as tell them apart (not "2.0 MB needed; 2.0 MB free")."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    need = size or written
    digits = next((d for d in (1, 2, 3) if free is None or not need or _mb(need, d) != _mb(free, d)), 3)
    parts = ["out of disk space"]
    if need:
        parts.append(f"{'' if size else 'more than '}{_mb(need, digits)} needed")
    if free is not None:
        parts.append(f"{_mb(free, digits)} free")
    return "; ".join(parts)


def _mb(size: int, digits: int = 1) -> str:
    return f"{size / 2**20:.{digits}f} MB" if size >= 2**20 else f"{-(-size // 1024)} KB"
