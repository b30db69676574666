"""What a run folder holds and how `--resume` reads it back: the checkpoint's state (network,
optimizer, RNGs, history, the data it trained on, the inference settings), best.pt / last.pt /
metrics.csv written in an order a kill cannot leave inconsistent, and the checks that a resume goes
on with the run as it trained."""

from __future__ import annotations

import csv
import hashlib
import io as _io
import json
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import TumorsegError
from ..io import write_text
from ..labels import BRATS2020, NUM_CLASSES, RAW_LABELS, REGIONS
from ..log import say
from ..plots import plot_curves
from .config import TrainConfig
from .rng import rng_state

MIN_COLUMNS = tuple(f"min_{r.lower()}" for r in REGIONS)  # post-processing's smallest component kept, per region
COLUMNS = ["epoch", "train_loss", "skipped_steps", "val_loss", *(f"dice_{r}" for r in REGIONS), "dice_mean",
           "largest_tumour", "et_threshold", *MIN_COLUMNS, "lesion_dice", "lr", "seconds", "best"]
# Held by last.pt's optimizer and scheduler state, or by its network's output layers
RESUME_FIXED = ("optimizer", "lr", "weight_decay", "schedule", "target", "dropout", "deep_supervision")
PREPARE_KEYS = ("channels", "norm", "crop_size", "crop_mode", "spacing", "cavity")


def fold_dir(run_dir: Path, fold: int | None) -> Path:
    """Where fold `fold` of a cross-validation in `run_dir` trains: `run_dir/fold_K`, or `run_dir`
    itself when that is fold K's folder; another fold's folder is refused in one line."""
    run_dir = Path(run_dir)
    if fold is None or run_dir.name == f"fold_{fold}":
        return run_dir
    if run_dir.name.startswith("fold_") and run_dir.name[5:].isdigit():
        raise TumorsegError(f"{run_dir}: the folder of fold {run_dir.name[5:]}, not of fold {fold}: give the "
                            f"cross-validation's folder ({run_dir.parent}) with --fold {fold}")
    return run_dir / f"fold_{fold}"


def cases_digest(case_ids: list[str], split_seed: int) -> str:
    """SHA-256 of all the cases a run drew from and the seed that dealt them: a cross-validation's
    folds share it (the same cases dealt alike), so folds of other deals never make one."""
    return hashlib.sha256(json.dumps({"cases": sorted(case_ids), "seed": split_seed}).encode()).hexdigest()


def split_digest(train_ids: list[str], val_ids: list[str]) -> str:
    """SHA-256 of the run's train/val case ids: a checkpoint shared with others names no case."""
    split = {"train": sorted(train_ids), "val": sorted(val_ids)}
    return hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()


def run_state(model, optimizer, scheduler, scaler, epoch, history, best, best_epoch, spec, config, manifest, patch, ids,
           statistics) -> dict:
    settings = manifest["settings"]
    tuned = next((row for row in reversed(history) if "dice_mean" in row), {})  # the latest validated epoch
    return {
        "network": spec,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "history": history,
        "best_metric": best,
        "best_epoch": best_epoch,
        "config": config.to_dict(),
        "prepare": {k: settings.get(k) for k in PREPARE_KEYS},
        "data_split": split_digest(*ids),  # what --resume checks it goes on with (ids themselves not shared)
        "data_cases": cases_digest(ids[0] + ids[1], int(settings.get("seed", 0))),  # what a cross-validation's folds share
        "layout": manifest.get("layout", "brats2020"),
        "labels": manifest.get("labels", BRATS2020.to_dict()),  # the training data's convention
        "patch": list(patch),
        "target": config.target,
        "label_map": {i: RAW_LABELS[i] for i in range(NUM_CLASSES)},  # training label -> BraTS label
        "regions": list(REGIONS),
        "inference": {
            "tta": config.tta,
            "postprocess_largest_tumour": bool(tuned.get("largest_tumour", False)),
            "postprocess_et_threshold": tuned.get("et_threshold"),
            "postprocess_min_component": [int(tuned.get(c) or 0) for c in MIN_COLUMNS],  # WT, TC, ET voxels; 0: off
            "postprocess_statistics": statistics,  # what they were chosen on: an ensemble of runs chooses on all
        },
        "rng": rng_state(),
        "torch_version": str(torch.__version__),
    }


def resumed_state(run_dir: Path, spec: dict, manifest: dict, config: TrainConfig, ids: tuple[list[str], list[str]],
            main: bool = True) -> dict:
    try:
        state = load_checkpoint(run_dir / "last.pt")
    except TumorsegError as exc:  # a damaged last.pt: deleting it must not look like the way on
        if (run_dir / "best.pt").is_file():
            raise TumorsegError(f"{exc}; the run cannot go on, but {run_dir / 'best.pt'} is untouched: predict with "
                                "it, or train into another folder") from None
        raise
    state = _went_on(run_dir, state, main)
    was = state.get("config", {})
    was_fold = (was.get("fold"), was.get("folds")) if was.get("fold") is not None else None
    if "fold" in was and was_fold != ((config.fold, config.folds) if config.fold is not None else None):
        # another fold trains and validates on other cases, under the same curves and best epoch
        trained = (f"trained as fold {was_fold[0]} of {was_fold[1]}; resume it with --fold {was_fold[0]} "
                   f"--folds {was_fold[1]}") if was_fold else "trained on the prepared split; resume it without --fold"
        raise TumorsegError(f"{run_dir / 'last.pt'}: {trained}")
    changed = [f"{k} {was[k]} -> {getattr(config, k)}" for k in RESUME_FIXED if k in was and was[k] != getattr(config, k)]
    if changed:  # the loaded optimizer state would keep the old values (or not fit another optimizer)
        raise TumorsegError(f"{run_dir / 'last.pt'}: --resume continues the run as it trained, not with "
                            f"{', '.join(changed)}: drop the change or start a new run")
    if state["prepare"]["channels"] != manifest["settings"]["channels"]:
        raise TumorsegError(f"{run_dir / 'last.pt'}: trained on channels {state['prepare']['channels']}, data has {manifest['settings']['channels']}")
    if state["network"] != spec:
        raise TumorsegError(
            f"{run_dir / 'last.pt'}: checkpoint of another network ({state['network']['name']} "
            f"{list(state['network']['filters'])}, this run: {spec['name']} {list(spec['filters'])}): to continue "
            f"it, give its --model {state['network']['name']} --filters "
            f"{','.join(str(f) for f in state['network']['filters'])} (a recipe may have changed its network)"
        )
    other = [k for k in PREPARE_KEYS[1:]  # the channels: said above
             if k in state["prepare"] and state["prepare"][k] != manifest["settings"].get(k)]
    if state.get("data_split") not in (None, split_digest(*ids)):  # older checkpoints record none
        other.append("its train/validation cases")
    if other:  # the run would go on with other data under the same curves and best epoch
        raise TumorsegError(f"{run_dir / 'last.pt'}: --resume goes on with the data the run trained on; this prepared "
                            f"folder differs in {', '.join(other)}: give that folder, or start a new run")
    return with_best_checkpoint(run_dir, state, main)


def _went_on(run_dir: Path, state: dict, main: bool) -> dict:
    """`state` (last.pt's), or best.pt's where a kill fell between the two writes of `save_epoch`
    (best.pt first): best.pt then holds the run's next epoch whole (weights, optimizer, generators,
    history), and the run goes on from it, its metrics.csv and last.pt written now as that epoch
    would have written them. Repeating the epoch instead had taken best.pt for damaged and marked a
    worse epoch best wherever the resume ran no epoch further."""
    try:
        best = load_checkpoint(run_dir / "best.pt")
    except TumorsegError:
        return state
    history = best.get("history") or []
    if not (best.get("epoch") == state["epoch"] + 1 and best.get("best_epoch") == best["epoch"]
            and history[:-1] == state["history"] and "optimizer" in best):
        return state
    if main:
        try:
            save_epoch(run_dir, best, history, best=False)
        except TumorsegError as exc:  # a full disk: last.pt is as it was
            raise TumorsegError(f"{exc}; {last_kept(run_dir, state['epoch'])}") from None
    return best


def with_best_checkpoint(run_dir: Path, state: dict, main: bool = True) -> dict:
    """`state` once `best.pt` holds its best epoch. Damaged or removed since, it is rewritten from
    last.pt: the best epoch's own weights where that is the last epoch saved; else those are lost,
    said so, and best.pt holds the last epoch saved until a later one validates better. So a
    resumed run that reports success always leaves a usable best.pt. Only the `main` rank writes."""
    best_epoch = state.get("best_epoch") or 0
    try:
        if not best_epoch or load_checkpoint(run_dir / "best.pt").get("epoch") == best_epoch:
            return state
    except TumorsegError:
        pass
    lost = state["epoch"] != best_epoch
    if lost:
        validated = [row["dice_mean"] for row in state["history"] if row.get("epoch") == state["epoch"] and "dice_mean" in row]
        state = {**state, "best_epoch": state["epoch"], "best_metric": validated[0] if validated else -1.0}
    if main and not lost:
        save_checkpoint(run_dir / "best.pt", state)
    elif main:  # a new best epoch: metrics.csv marks it and last.pt records it now (no epoch may follow)
        try:
            save_epoch(run_dir, state, state["history"], best=True)
        except TumorsegError as exc:  # a full disk: last.pt is as it was
            raise TumorsegError(f"{exc}; {last_kept(run_dir, state['epoch'])}") from None
        say(f"warning: {run_dir / 'best.pt'} did not hold epoch {best_epoch}, the best so far (damaged or "
            f"removed): its weights are lost; best.pt holds epoch {state['epoch']}, the last saved, until a "
            "later epoch validates better")
    return state


def save_epoch(run_dir: Path, state: dict, history: list[dict], best: bool) -> None:
    """best.pt, then metrics.csv and curves, then last.pt: a kill between them leaves last.pt at the
    previous epoch and best.pt at this one, whole, which a resumed run goes on from (`_went_on`), so
    best.pt always holds the epoch that metrics.csv shows best (last.pt first could leave a stale
    best.pt that no resume rewrites).
    The first epoch saved writes last.pt first: a kill after it leaves a run to resume (which writes
    its best.pt), never a best.pt alone, which `train` takes for a finished run's model."""
    first = not (run_dir / "last.pt").exists()
    if first:
        save_checkpoint(run_dir / "last.pt", state)
    if best:
        save_checkpoint(run_dir / "best.pt", state)
    write_history(run_dir, history, state["best_epoch"] or (state["epoch"] if best else None))  # no validation: the last
    if not first:
        save_checkpoint(run_dir / "last.pt", state)


def write_history(run_dir: Path, history: list[dict], best_epoch: int | None) -> None:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for row in history:  # "best": 1 on the epoch best.pt holds
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS} | {"best": int(row["epoch"] == best_epoch)})
    write_text(run_dir / "metrics.csv", buf.getvalue())
    plot_curves(history, run_dir / "curves.png")


def last_kept(run_dir: Path, saved: int) -> str:
    """What a failed save left: last.pt's epoch, which it still holds."""
    return f"{run_dir / 'last.pt'} keeps epoch {saved}, the last good one" if saved else "no epoch was saved"
