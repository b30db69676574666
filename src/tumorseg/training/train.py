"""`tumorseg train`: the loop that ties data, network, loss and checkpoints together.

Resumable at epoch boundaries: every epoch re-seeds the RNGs from (seed, epoch), and
`last.pt` holds the optimizer, scheduler, history and RNG state, so `--resume` continues
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..bars import end_bars
from ..data import PreparedDataset, eval_transform, make_loader, shard, split_ids, train_transform, workers_note
from ..errors import Terminated, TumorsegError
from ..io import sweep_stale_temps, write_text
from ..lock import folder_lock
from ..devices import amp_dtype as resolve_amp
from ..devices import describe, deterministic
from ..inference.postprocess import choose_default, statistics_state
from ..labels import NUM_CLASSES, REGIONS
from ..log import say
from ..networks import build_network, deepest_voxels_needed, network_spec, required_divisor
from ..prepare import load_manifest
from ..prepare.split import fold_split
from ..settings import settings_object
from . import crossval, distributed
from .rng import callers_rng_kept, set_rng_state
from .config import TrainConfig, read_config_file, resolve_config, resumed_config
from .engine import LossGuard, mean_dice, train_epoch, validate
from .losses import build_loss
from .run_files import MIN_COLUMNS, fold_dir, last_kept, resumed_state, run_state, save_epoch

LOADER_WORKER_DIED = "DataLoader worker (pid"  # how torch's errors for a killed or crashed loader worker begin


@dataclass
class TrainResult:
    """What a run left in `run_dir` (with a fold: the fold's folder).

    Attributes:
        history: one dict per epoch with metrics.csv's columns (epoch, train_loss, val_loss, dice_WT,
            dice_TC, dice_ET, dice_mean, lesion_dice, the post-processing chosen, lr, seconds).
        best_metric: the best validated mean Dice (-1.0 where no epoch was validated).
        best_epoch: the epoch `best.pt` holds (None without validation: it holds the last epoch).
    """

    run_dir: Path
    history: list[dict]
    best_metric: float
    best_epoch: int | None

    @property
    def best_checkpoint(self) -> Path:
        """The checkpoint to predict with."""
        return self.run_dir / "best.pt"


def _check_patch(config: TrainConfig, crop: list[int]) -> list[int]:
    patch = list(config.patch or crop)
    divisor = required_divisor(config.model, config.filters)
    if any(p > c for p, c in zip(patch, crop)):
        raise TumorsegError(f"patch {patch} is larger than the prepared size {crop}")
    if any(p % divisor for p in patch):
        raise TumorsegError(f"patch {patch} must be divisible by {divisor} for {config.model} with these filters")
    if math.prod(p // divisor for p in patch) < deepest_voxels_needed(config.model):  # torch's traceback at step 1
        raise TumorsegError(f"patch {patch} leaves a single voxel at {config.model}'s deepest level: make one side "
                            f"at least {2 * divisor}")
    return patch


def build_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """The optimizer a run steps, from its settings (nnU-Net's SGD for `sgd`); the benchmarks build theirs here too."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.99, nesterov=True, weight_decay=config.weight_decay)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _scheduler(config: TrainConfig, optimizer, clock: dict[str, float]) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine or poly (nnU-Net: (1 - progress) ** 0.9) decay over the run.

    Progress is the share of epochs done or, under a wall-clock budget, the share of the
    budget spent if that is larger, so a budgeted run still ends with a decayed learning rate.
    `clock["spent"]` (seconds) is updated by the training loop before each scheduler step.
    """

    def progress(epoch: int) -> float:
        done = epoch / config.epochs
        if config.max_minutes:
            done = max(done, clock["spent"] / (60 * config.max_minutes))
        return min(done, 1.0)

    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * progress(e))))
    if config.schedule == "poly":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: (1 - progress(e)) ** 0.9)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)


def _seed_epoch(seed: int, epoch: int, rank: int, transform) -> None:
    s = seed + 1000 * epoch + 100_003 * rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    transform.set_random_state(seed=s % 2**32)


def _tune_postprocessing(stats: list) -> dict:
    """nnU-Net's BraTS post-processing (largest tumour only, smallest ET worth keeping) and the
    smallest component worth keeping per region (lesion-wise Dice), on validation: a metrics row."""
    tuned = choose_default(stats)
    return {**{k: v for k, v in tuned.items() if k != "min_component"}, **dict(zip(MIN_COLUMNS, tuned["min_component"]))}


def train(
    prepared_dir: str | Path,
    run_dir: str | Path,
    config: TrainConfig | dict | str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    resume_with: str = "resume=True",
) -> TrainResult:
    """Train a network on a prepared folder; checkpoints, metrics.csv and curves.png go to `run_dir`.

    Args:
        prepared_dir: a folder `tumorseg prepare` wrote.
        run_dir: where best.pt, last.pt, metrics.csv, curves.png and config.yaml go; with
            `config.fold`, the fold's folder inside it (`run_dir/fold_K`).
        config: the settings (`TrainConfig`, or a dict of its fields, or a YAML / TOML / JSON file
            of them; None: the defaults). A recipe's: `resolve_config(recipe="brats-cpu")`. With
            `resume`, a dict or file names only what changes (more epochs): the run's own
            config.yaml gives the rest; a `TrainConfig` is taken whole.
        resume: go on from `run_dir/last.pt` as the run would have gone on uninterrupted.
        progress: progress bars (the lines of the run go through the `tumorseg` logger).
        resume_with: how the line printed on an interruption says to continue (the CLI: `--resume`).

    Under torchrun this is data-parallel (DDP); only rank 0 writes. Ctrl-C leaves the `last.pt` of
    the last finished epoch. The caller's random generators are left as they were.
    """
    with callers_rng_kept():
        return _train(prepared_dir, run_dir, config, resume, progress, resume_with)


def _train(prepared_dir: str | Path, run_dir: str | Path, config: TrainConfig | dict | str | Path | None,
           resume: bool, progress: bool, resume_with: str) -> TrainResult:
    if resume and (config is None or isinstance(config, (dict, str, Path))):  # what changes, over the run's own
        given = read_config_file(config) if isinstance(config, (str, Path)) else dict(config or {})
        run_file = fold_dir(Path(run_dir), given.get("fold")) / "config.yaml"
        if run_file.is_file():
            config = resumed_config(run_file, config)
    config = settings_object(config, TrainConfig, "train", resolve_config)
    prepared_dir, run_dir = Path(prepared_dir), Path(run_dir)
    manifest = load_manifest(prepared_dir)
    train_ids, val_ids = split_ids(prepared_dir, "train"), split_ids(prepared_dir, "val")
    if config.fold is not None:  # all kept cases, dealt into folds by the prepared folder's split seed
        cases = train_ids + val_ids
        if len(cases) < config.folds:
            raise TumorsegError(f"{prepared_dir}: {len(cases)} kept case(s) cannot make {config.folds} folds (--folds)")
        folds = [fold_split(cases, config.folds, k, int(manifest["settings"].get("seed", 0))) for k in range(config.folds)]
        train_ids, val_ids = folds[config.fold]["train"], folds[config.fold]["val"]
        run_dir = fold_dir(run_dir, config.fold)
    if not train_ids:
        raise TumorsegError(f"{prepared_dir}: no training cases in the manifest's split")
    crop = list(manifest["settings"]["crop_size"])
    patch = _check_patch(config, crop)
    classes = _classes(manifest)
    if config.target == "regions" and classes > NUM_CLASSES:
        raise TumorsegError(f"{prepared_dir}: the resection cavity was kept as a class (--cavity keep); it is no "
                            "BraTS region, so train with --target labels (or prepare with --cavity drop)")
    out_channels = len(REGIONS) if config.target == "regions" else classes
    try:  # weights that do not fit the target (a recipe's 4 with --target regions): one line, before any work
        build_loss(config.target, config.class_weights, classes=out_channels)
    except ValueError as exc:
        raise TumorsegError(f"{str(exc).rstrip('.')}: set class_weights in a --config file (null: unweighted)") from None
    spec = network_spec(config.model, len(manifest["settings"]["channels"]), out_channels,
                        config.filters, config.dropout, config.deep_supervision)
    if resume and not (run_dir / "last.pt").is_file():  # before the lock, which would create the folder
        raise TumorsegError(f"{run_dir / 'last.pt'}: checkpoint not found")
    ctx = distributed.setup(config.device)
    try:
        with _claim(run_dir, ctx), deterministic(config.deterministic):
            # under rank 0's lock: another run into this folder could be rewriting last.pt
            if not resume and (run_dir / "last.pt").exists():
                raise TumorsegError(f"{run_dir}: already holds a run (last.pt); use --resume or another folder")
            if not resume and (run_dir / "best.pt").exists():  # last.pt deleted to save space: best.pt is the model
                raise TumorsegError(f"{run_dir}: already holds a trained model (best.pt; without its last.pt the run "
                                    "cannot be resumed): train into another folder")
            state = resumed_state(run_dir, spec, manifest, config, (train_ids, val_ids), ctx.is_main) if resume else None
            result = _run(prepared_dir, run_dir, config, manifest, train_ids, val_ids, patch, spec, state, ctx, progress,
                          resume_with)
        if config.fold is not None and ctx.is_main:  # the last fold to finish sums the cross-validation up
            line = crossval.report(run_dir.parent, [len(f["val"]) for f in folds])
            if line and progress:
                say(line)
        return result
    finally:
        distributed.cleanup()


def _classes(manifest: dict) -> int:
    """The training classes of a prepared folder: a kept resection cavity is a fifth."""
    return NUM_CLASSES + (manifest["settings"].get("cavity") == "keep")


@contextlib.contextmanager
def _claim(run_dir: Path, ctx: distributed.DistContext) -> Iterator[None]:
    """Rank 0, the only writer, locks the run folder and sweeps what a killed run left there;
    the other ranks of the same torchrun job must not take the lock their rank 0 holds."""
    if not ctx.is_main:
        yield
        return
    with folder_lock(run_dir, "train"):
        sweep_stale_temps(run_dir)
        yield


def _run(prepared_dir, run_dir, config, manifest, train_ids, val_ids, patch, spec, state, ctx, progress,
         resume_with) -> TrainResult:
    progress = progress and ctx.is_main
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = build_network(**spec).to(ctx.device)
    optimizer = build_optimizer(config, model.parameters())
    clock = {"spent": 0.0}
    scheduler = _scheduler(config, optimizer, clock)
    amp_dtype = resolve_amp(config.amp, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)
    history, best, best_epoch, start, end = [], -1.0, None, 0, config.epochs
    statistics = None  # the latest validated epoch's `case_statistics`, as checkpoints store them
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler.is_enabled() and state["scaler"]:  # a run saved in bf16, float32 or on the CPU has none
            scaler.load_state_dict(state["scaler"])
        history, best, best_epoch, start = state["history"], state["best_metric"], state["best_epoch"], state["epoch"]
        statistics = (state.get("inference") or {}).get("postprocess_statistics")
        clock["spent"] = sum(row["seconds"] for row in history)
        set_rng_state(state["rng"])
        if start > config.epochs:  # equal: a finished run, nothing left to do (a re-run demo)
            raise TumorsegError(f"{run_dir / 'last.pt'} already holds epoch {start}: give --epochs above {start} "
                                "to train on")

        if config.max_minutes and clock["spent"] > 60 * config.max_minutes:  # finished on its budget: nothing to do
            end = start
        # The rate of the next epoch on this run's curve: the saved one unless epochs, budget or
        # schedule changed (a longer run must not start from the old curve's last, decayed rate).
        for group, base, rate in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * rate(scheduler.last_epoch)
    net = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None) if ctx.distributed else model
    transform = train_transform(patch, manifest["settings"]["crop_size"], config.augment, config.fg_ratio)
    classes = _classes(manifest)
    train_set = PreparedDataset(prepared_dir, train_ids, transform, spec["in_channels"], classes)
    loader = make_loader(train_set, config.batch_size, True, config.seed, config.workers, ctx.rank, ctx.world_size,
                         pin_memory=ctx.device.type == "cuda")
    val_set = PreparedDataset(prepared_dir, shard(val_ids, ctx.rank, ctx.world_size), eval_transform(), spec["in_channels"],
                             classes)
    loss_fn = build_loss(config.target, config.class_weights, classes=spec["out_channels"]).to(ctx.device)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.yaml", _config_yaml(config, prepared_dir))
        fold = f"fold {config.fold} of {config.folds} ({run_dir}): " if config.fold is not None else ""
        say(f"{fold}training {spec['name']} on {len(train_ids)} cases, "
            + (f"validating on {len(val_ids)}" if val_ids else "no validation cases")
            + (f" every {config.val_every} epochs" if config.val_every > 1 and val_ids else "") + f", patch {patch}, "
            f"{describe(ctx.device, config.amp, amp_dtype)}{f' x{ctx.world_size}' if ctx.distributed else ''}, "
            + (f"epochs {start + 1}-{end}" if start < end else f"all {config.epochs} epochs already done"
               if start == config.epochs else f"its {config.max_minutes:g}-minute budget is already spent "
               f"({clock['spent'] / 60:.1f} minutes; give --max-minutes above that to train on)"))
        if note := workers_note(config.workers):
            say(note)
    guard, saved = LossGuard(), start  # saved: the epoch last.pt holds
    try:
        for epoch in range(start, end):
            t0 = time.perf_counter()
            _seed_epoch(config.seed, epoch, ctx.rank, transform)
            guard.skipped = 0
            train_loss = train_epoch(net, loader, loss_fn, optimizer, scaler, ctx, epoch, config.steps_per_epoch, amp_dtype,
                                     progress, guard)
            row = {"epoch": epoch + 1, "train_loss": train_loss, "skipped_steps": guard.skipped,
                   "lr": optimizer.param_groups[0]["lr"]}
            elapsed = clock["spent"] + time.perf_counter() - t0  # a resumed run's budget counts its earlier epochs
            out_of_time = bool(config.max_minutes) and elapsed > 60 * config.max_minutes
            out_of_time = bool(distributed.all_reduce_sum(torch.tensor([float(out_of_time)]), ctx)[0] > 0)  # ranks agree
            final = out_of_time or epoch + 1 == config.epochs
            if val_ids and ((epoch + 1) % config.val_every == 0 or final):
                outputs: list | None = [] if config.postprocess else None
                val_loss, dice = validate(model, val_set, loss_fn, ctx, patch, config.target, amp_dtype, progress, outputs,
                                          manifest["settings"].get("spacing") or (1.0, 1.0, 1.0))
                row.update(val_loss=val_loss, dice_mean=mean_dice(dice), **{f"dice_{r}": dice[r] for r in REGIONS})
                statistics = None  # this epoch's, or none: a resumed run may have turned --postprocess off
                if outputs is not None:
                    gathered = distributed.gather_lists(outputs, ctx)
                    row.update(_tune_postprocessing(gathered))
                    statistics = statistics_state(gathered)
            seconds = distributed.all_reduce_sum(torch.tensor([time.perf_counter() - t0], dtype=torch.float64), ctx)
            row["seconds"] = round(float(seconds[0]) / ctx.world_size, 2)  # identical on every rank, so is the LR
            clock["spent"] += row["seconds"]
            if "dice_mean" in row or not val_ids:  # validation spent the budget: no further epoch at a rate of 0
                out_of_time = out_of_time or bool(config.max_minutes) and clock["spent"] > 60 * config.max_minutes
            scheduler.step()
            history.append(row)
            improved = row.get("dice_mean", -1.0) > best
            if improved:
                best, best_epoch = row["dice_mean"], epoch + 1
            _check_finite(model, epoch)
            if ctx.is_main:
                state = run_state(model, optimizer, scheduler, scaler, epoch + 1, history, best, best_epoch, spec, config,
                               manifest, patch, (train_ids, val_ids), statistics)
                save_epoch(run_dir, state, history, best=improved or not val_ids)
            saved = epoch + 1  # before the line and the barrier: a Ctrl-C there still names this epoch
            if ctx.is_main:
                say(_format_row(row))
            distributed.barrier(ctx)
            if out_of_time:
                if ctx.is_main:
                    say(f"stopping: the {config.max_minutes:g}-minute budget is spent")
                break
    except KeyboardInterrupt as exc:
        end_bars()
        if ctx.is_main:
            last = run_dir / "last.pt"  # written last when an epoch is saved: an interrupt may fall before it
            word = "terminated" if isinstance(exc, Terminated) else "interrupted"
            say(f"{word}: {last} holds epoch {saved}; continue with {resume_with}" if saved else
                f"{word}: continue from {last} with {resume_with}" if last.is_file() else
                f"{word} before the first epoch was saved: nothing to resume; start the run again")
        raise
    except (TumorsegError, torch.cuda.OutOfMemoryError) as exc:  # a diverging run, a full disk, GPU memory
        reason = exc if isinstance(exc, TumorsegError) else (
            f"out of GPU memory in epoch {len(history) + 1} with batch {config.batch_size} and patch {patch}: "
            "lower --batch-size or --patch")
        raise TumorsegError(f"{reason}; {last_kept(run_dir, saved)}") from None
    except RuntimeError as exc:
        if not str(exc).startswith(LOADER_WORKER_DIED):  # torch's words for a loader worker killed (out of memory)
            raise
        raise TumorsegError(f"{str(exc).splitlines()[0].rstrip('. ')} (out of memory?): lower --workers; "
                            f"{last_kept(run_dir, saved)}") from None
    return TrainResult(run_dir, history, best, best_epoch)


def _check_finite(model: torch.nn.Module, epoch: int) -> None:
    """Refuse to save NaN or infinite weights (every rank checks: their weights are the same)."""
    if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()):
        raise TumorsegError(f"the weights became NaN or infinite in epoch {epoch + 1}; lower the learning rate (--lr)")


def _format_row(row: dict) -> str:
    parts = [f"epoch {row['epoch']}", f"train loss {row['train_loss']:.4f}"]
    if "val_loss" in row:
        parts += [f"val loss {row['val_loss']:.4f}"] + [f"{r} {row[f'dice_{r}']:.3f}" for r in REGIONS]
    if "lesion_dice" in row:
        parts.append(f"lesion-wise {row['lesion_dice']:.3f}")
    return " | ".join(parts + [f"{row['seconds']:.0f}s"])


def _config_yaml(config: TrainConfig, prepared_dir: Path) -> str:
    import yaml

    header = f"# effective settings of this run; prepared data: {prepared_dir.resolve()}\n"
    return header + yaml.safe_dump(config.to_dict(), sort_keys=False)


__all__ = ["TrainResult", "train"]
