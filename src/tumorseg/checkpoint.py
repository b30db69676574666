"""Self-describing checkpoints: weights plus everything prediction needs, safe to share.

The format sits below training, inference and export, which all read or write it.

Only tensors and plain Python types go in, and loading uses `weights_only=True`, so a
downloaded checkpoint cannot run code. Writes are atomic: a crash leaves the old file.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from .errors import TumorsegError
from .io import atomic_path

FORMAT = "tumorseg-checkpoint-v1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write `state` (tensors and plain types only) with the format tag.

    Written through a Python file so a full disk is an OSError (ENOSPC), which `atomic_path`
    reports in one line; given a path, torch's zip writer reports it as an opaque RuntimeError.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        try:
            torch.save({"format": FORMAT, **state}, fh)
        except RuntimeError as exc:  # the zip writer hides a failed write (EFBIG) behind its own error
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from None
            raise


def checkpoint_file(path: str | Path) -> Path:
    """The file a checkpoint argument names: itself, or a run folder's `best.pt`."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / "best.pt").is_file():
        folds = _fold_folders(path)
        raise TumorsegError(f"{path}: a folder of {len(folds)} cross-validation folds; give one fold's folder "
                            f"({folds[0]})" if folds else
                            f"{path}: a folder without best.pt; give a checkpoint file (a run's best.pt or last.pt)")
    return path / "best.pt"


def checkpoint_files(path: str | Path) -> list[Path]:
    """The checkpoints a model argument names: `checkpoint_file`'s one, or each fold's `best.pt` for a
    folder of cross-validation folds (`train --fold K` writes `fold_K`), in fold order."""
    path = Path(path)
    folds = _fold_folders(path) if path.is_dir() and not (path / "best.pt").is_file() else []
    if not folds:
        return [checkpoint_file(path)]
    unfinished = [f.name for f in folds if not (f / "best.pt").is_file()]
    if unfinished:  # an ensemble short of folds would pass for the whole cross-validation
        raise TumorsegError(f"{path}: {', '.join(unfinished)} of its {len(folds)} folds have no best.pt yet; "
                            "finish them, or give the folds' folders to ensemble (RUN/fold_0 RUN/fold_1 ...)")
    return [f / "best.pt" for f in folds]


def _fold_folders(path: Path) -> list[Path]:
    folds = [p for p in path.glob("fold_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(folds, key=lambda p: int(p.name[5:]))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a tumorseg checkpoint safely (a run folder: its `best.pt`); a clear error for anything else."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], str]:
    """`load_checkpoint`'s state and the SHA-256 of the very bytes it came from: read once, so a
    `best.pt` that training replaces meanwhile cannot give one file's weights another's fingerprint."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise TumorsegError(f"{path}: checkpoint not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TumorsegError(f"{path}: cannot read the checkpoint ({exc.strerror or type(exc).__name__})") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or one holding arbitrary objects
        raise TumorsegError(f"{path}: not a readable tumorseg checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TumorsegError(f"{path}: not a tumorseg checkpoint")
    return state, hashlib.sha256(data).hexdigest()
