"""One training epoch and one validation pass; no files, no logging of their own."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..bars import leave_in_log, progress_bar
from ..data import PreparedDataset
from ..devices import autocast, window_batch
from ..errors import TumorsegError
from ..evaluation.metrics import region_dice_from_labels
from ..evaluation.lesionwise import case_challenge
from ..inference.postprocess import case_statistics
from ..inference.window import probabilities, to_labels
from ..labels import REGIONS
from .distributed import DistContext, all_reduce_sum


def _batches(loader, epoch: int, steps: int) -> Iterator[dict]:
    """`steps` batches (0: one pass), re-shuffling with a derived epoch when the loader runs out."""
    passes = 0
    while True:
        loader.sampler.set_epoch(epoch * 1000 + passes)
        for step, batch in enumerate(loader, start=passes * len(loader)):
            if steps and step >= steps:
                return
            yield batch
        passes += 1
        if not steps:
            return


@dataclass
class LossGuard:
    """Skips optimizer steps whose loss is NaN or infinite on any rank, so none reaches the weights.

    A NaN loss on one rank reaches every rank's gradients through DDP's averaging, so the ranks
    decide together. `skipped` counts this epoch's skipped steps (the training loop resets it);
    `limit` skipped in a row (across epochs) stop training: the run is diverging, not unlucky.
    """

    limit: int = 5
    skipped: int = 0
    in_a_row: int = 0

    def allows(self, loss: float, ctx: DistContext, epoch: int) -> bool:
        """False (skip the step) when this step's loss is NaN or infinite on any rank."""
        bad = not math.isfinite(loss)
        if ctx.distributed:  # the ranks decide together
            bad = bool(all_reduce_sum(torch.tensor([float(bad)]), ctx)[0] > 0)
        if not bad:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise TumorsegError(f"the training loss was NaN or infinite in {self.limit} steps in a row (epoch {epoch + 1}); "
                                "lower the learning rate (--lr) or check the prepared data")
        return False


def forward_backward(model: nn.Module, image: torch.Tensor, label: torch.Tensor, loss_fn: nn.Module,
                     optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     amp_dtype: torch.dtype | None) -> torch.Tensor:
    """A training step up to its gradients: the forward under autocast, the loss in float32, the
    backward scaled (fp16); the loss is returned, and the optimizer's step left to the caller."""
    with autocast(image.device, amp_dtype):
        logits = model(image)
    loss = loss_fn(logits.float(), label)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    return loss


def train_epoch(
    model: nn.Module,
    loader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ctx: DistContext,
    epoch: int,
    steps: int = 0,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    guard: LossGuard | None = None,
) -> float:
    """Train one epoch; returns the mean training loss over all ranks (of the steps taken).

    Steps with a NaN or infinite loss are skipped and counted in `guard` (a fresh one if None).
    """
    guard = guard or LossGuard()
    model.train()
    total = torch.zeros(2, dtype=torch.float64)
    n = steps or len(loader)
    bar = progress_bar(_batches(loader, epoch, steps), total=n, desc=f"epoch {epoch + 1}", leave=leave_in_log(), disable=not progress)
    for batch in bar:
        image = batch["image"].to(ctx.device, non_blocking=True)
        label = batch["label"].to(ctx.device, non_blocking=True)
        # the backward on every rank, skipped or not: DDP's gradient averaging waits for all
        loss = forward_backward(model, image, label, loss_fn, optimizer, scaler, amp_dtype)
        value = loss.item()  # one host sync per step, shared by the guard and the running mean
        if not guard.allows(value, ctx, epoch):
            optimizer.zero_grad(set_to_none=True)
            if scaler.is_enabled():  # fp16 overflow also shows as a NaN loss: back off as the scaler would
                scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            continue
        scaler.step(optimizer)
        scaler.update()
        total += torch.tensor([value, 1.0], dtype=torch.float64)
        bar.set_postfix(loss=f"{total[0] / total[1]:.4f}", refresh=False)  # shown at the bar's own pace
    total = all_reduce_sum(total, ctx)
    return float(total[0] / total[1]) if total[1] else float("nan")  # nan: every step was skipped


def validate(
    model: nn.Module,
    dataset: PreparedDataset,
    loss_fn: nn.Module,
    ctx: DistContext,
    roi: Sequence[int],
    target: str,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    collect: list | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[float, dict[str, float]]:
    """Validation loss and mean region Dice (WT, TC, ET) over this rank's cases, summed over ranks.

    If `collect` is a list, each case's `postprocess.case_statistics` (a few numbers, not the
    volumes: they are gathered over ranks) is appended to it, for tuning post-processing: its
    lesion-wise part at the prepared `spacing` (mm), with the challenge its case id names.
    """
    model.eval()
    sums = torch.zeros(2 + len(REGIONS), dtype=torch.float64)  # loss, dice per region, count
    for index in progress_bar(range(len(dataset)), desc="validate", leave=leave_in_log(), disable=not progress):
        sample = dataset.load(index)
        image = sample["image"][None].to(ctx.device)
        label = sample["label"][None].to(ctx.device)
        probs = probabilities(model, image, roi, target, amp_dtype=amp_dtype, sw_batch_size=window_batch(ctx.device, roi))
        loss = loss_fn(_logits_from(probs, target), label)  # exact: the loss re-applies the activation
        pred = to_labels(probs[0], target)
        gt = sample["label"][0].numpy()
        if collect is not None:  # the statistics hold this Dice already
            collect.append(case_statistics(pred, gt, spacing, case_challenge(dataset.case_ids[index])))
            dice = dict(zip(REGIONS, collect[-1]["dice"]))
        else:
            dice = region_dice_from_labels(pred, gt)
        sums += torch.tensor([loss.item(), *[dice[r] for r in REGIONS], 1.0], dtype=torch.float64)
    sums = all_reduce_sum(sums, ctx)
    count = max(float(sums[-1]), 1.0)
    return float(sums[0] / count), {r: float(sums[1 + i] / count) for i, r in enumerate(REGIONS)}


def _logits_from(probs: torch.Tensor, target: str) -> torch.Tensor:
    """Logits that reproduce `probs` under the loss's own activation (sigmoid or softmax)."""
    p = probs.clamp(1e-6, 1 - 1e-6)
    return torch.logit(p) if target == "regions" else torch.log(p)


def mean_dice(dice: dict[str, float]) -> float:
    return float(np.mean([dice[r] for r in REGIONS]))
