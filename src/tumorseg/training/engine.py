"""One training epoch and one validation pass; no files, no logging of their own."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..data import PreparedDataset
from ..devices import window_batch
from ..evaluation.metrics import region_dice_from_labels
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
) -> float:
    """Train one epoch; returns the mean training loss over all ranks."""
    model.train()
    total = torch.zeros(2, dtype=torch.float64)
    n = steps or len(loader)
    bar = tqdm(_batches(loader, epoch, steps), total=n, desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
    for batch in bar:
        image = batch["image"].to(ctx.device, non_blocking=True)
        label = batch["label"].to(ctx.device, non_blocking=True)
        with torch.autocast(ctx.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(image)
        loss = loss_fn(logits.float(), label)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
        bar.set_postfix(loss=f"{total[0] / total[1]:.4f}")
    total = all_reduce_sum(total, ctx)
    return float(total[0] / max(total[1], 1))


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
) -> tuple[float, dict[str, float]]:
    """Validation loss and mean region Dice (WT, TC, ET) over this rank's cases, summed over ranks.

    If `collect` is a list, each case's `postprocess.case_statistics` (a few numbers, not the
    volumes: they are gathered over ranks) is appended to it, for tuning post-processing.
    """
    model.eval()
    sums = torch.zeros(2 + len(REGIONS), dtype=torch.float64)  # loss, dice per region, count
    for index in tqdm(range(len(dataset)), desc="validate", leave=False, disable=not progress):
        sample = dataset.load(index)
        image = sample["image"][None].to(ctx.device)
        label = sample["label"][None].to(ctx.device)
        probs = probabilities(model, image, roi, target, amp_dtype=amp_dtype, sw_batch_size=window_batch(ctx.device))
        loss = loss_fn(_logits_from(probs, target), label)  # exact: the loss re-applies the activation
        pred = to_labels(probs[0], target)
        dice = region_dice_from_labels(pred, sample["label"][0].numpy())
        if collect is not None:
            collect.append(case_statistics(pred, sample["label"][0].numpy()))
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
