"""Self-describing checkpoints: weights plus everything prediction needs, safe to share.

The format sits below training, inference and export, which all read or write it.

Only tensors and plain Python types go in, and loading uses `weights_only=True`, so a
downloaded checkpoint cannot run code. Writes are atomic: a crash leaves the old file.
"""

from __future__ import annotations

import hashlib
import io
import warnings
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
    files = [f / "best.pt" for f in folds]
    _check_one_cross_validation(path, files)
    return files


def _check_one_cross_validation(path: Path, files: list[Path]) -> None:
    """One line where the folders `fold_K` are not every fold of one cross-validation: a fold trained
    as another (or another count of folds), on other cases, or a recorded fold missing. Folds
    without the record (older checkpoints, runs put there by hand) are taken as they are."""
    recorded = [(f, _fold_record(f)) for f in files]
    recorded = [(f, r) for f, r in recorded if r is not None]
    if not recorded:
        return
    first, (_, folds, _) = recorded[0]
    cases: dict[str, Path] = {}  # digest of a fold's cases -> the first fold recording it
    for file, (fold, its_folds, its_cases) in recorded:
        if fold != int(file.parent.name[5:]):
            raise TumorsegError(f"{file}: trained as fold {fold}, not {file.parent.name}; a cross-validation's folders "
                                "are named for their folds")
        if its_folds != folds:
            raise TumorsegError(f"{file}: trained as one of {its_folds} folds, {first} of {folds}; an ensemble of "
                                "folds takes one cross-validation's")
        if its_cases is not None:  # folds trained before the digest was recorded: not compared
            cases.setdefault(its_cases, file)
            if len(cases) > 1:
                raise TumorsegError(f"{file}: trained on other cases than {next(iter(cases.values()))}; an ensemble "
                                    "of folds takes one cross-validation's")
    numbers = {int(f.parent.name[5:]) for f in files}
    if numbers != set(range(folds)):
        missing = sorted(set(range(folds)) - numbers)
        hint = f" (fold_{missing[0]} missing: train --fold {missing[0]} --folds {folds})" if missing else ""
        raise TumorsegError(f"{path}: its folds were trained as {folds} folds, {len(files)} found{hint}")


def _fold_record(file: Path) -> tuple[int, int, str | None] | None:
    """(fold, folds, digest of all its cases) a checkpoint records it was trained as; None where it
    records none or cannot be read (loading it says why). Memory-mapped: the weights are not read."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        config = state.get("config") or {}
        fold, folds = config.get("fold"), config.get("folds")
    except Exception:  # noqa: BLE001 - damaged or not a checkpoint: `read_checkpoint` reports it in one line
        return None
    if not (isinstance(fold, int) and isinstance(folds, int)):
        return None
    cases = state.get("data_cases")
    return fold, folds, cases if isinstance(cases, str) else None


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
        with warnings.catch_warnings():  # torch's warning on an old pickle protocol would precede the line below
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or one holding arbitrary objects
        raise TumorsegError(f"{path}: not a readable tumorseg checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TumorsegError(f"{path}: not a tumorseg checkpoint")
    return state, hashlib.sha256(data).hexdigest()
