"""Segmentation losses: the seed's Dice + focal over 4 classes, or Dice + BCE over 3 regions.

Every loss built here is called as `loss(logits, labels)` with integer label maps
`labels (B, 1, D, H, W)` (values 0..3, training labels) and either plain logits
`(B, C, D, H, W)` or deep-supervision logits `(B, S, C, D, H, W)` (S heads, full resolution
first), whose heads are weighted 1, 1/2, 1/4, ... (normalised to sum to 1) as in nnU-Net.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import nn

from ..labels import NUM_CLASSES, REGION_LABELS, REGIONS

TARGETS: tuple[str, ...] = ("labels", "regions")
SEED_CLASS_WEIGHTS: tuple[float, ...] = (0.25,) * NUM_CLASSES


def label_to_regions(labels: torch.Tensor) -> torch.Tensor:
    """Label map `(B, 1, D, H, W)` (0..3) -> float region masks `(B, 3, D, H, W)`: WT, TC, ET."""
    if labels.ndim < 3 or labels.shape[1] != 1:
        raise ValueError(f"labels must be (B, 1, D, H, W), got shape {tuple(labels.shape)}.")
    labels = labels.long()
    masks = [
        torch.isin(labels, torch.tensor(REGION_LABELS[r], device=labels.device)) for r in REGIONS
    ]
    return torch.cat(masks, dim=1).float()


def deep_supervision_weights(heads: int) -> torch.Tensor:
    """Weights 1, 1/2, 1/4, ... for `heads` outputs (full resolution first), summing to 1."""
    weights = torch.tensor([0.5**i for i in range(heads)])
    return weights / weights.sum()


class LabelLoss(nn.Module):
    """Dice + focal (gamma 2) over softmax classes, both weighted per class.

    With the seed's weights (0.25 each) this is the seed's `DiceLoss(class_weights) +
    CategoricalFocalLoss()` up to a constant: segmentation_models' Dice is
    `1 - mean(w * dice)`, MONAI's `mean(w * (1 - dice))`; same gradients. Dice sums over the
    batch before dividing (segmentation_models' default, and nnU-Net's batch Dice).
    """

    def __init__(self, class_weights: Sequence[float] = SEED_CLASS_WEIGHTS) -> None:
        super().__init__()
        weights = [float(w) for w in class_weights]
        self.dice = DiceLoss(softmax=True, to_onehot_y=True, batch=True, weight=weights)
        self.focal = FocalLoss(use_softmax=True, to_onehot_y=True, gamma=2.0, weight=weights)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`logits (B, C, D, H, W)`, `labels (B, 1, D, H, W)` -> scalar."""
        return self.dice(logits, labels) + self.focal(logits, labels)


class RegionLoss(nn.Module):
    """Dice + binary cross-entropy over sigmoid region outputs WT, TC, ET.

    Not MONAI's `DiceCELoss(sigmoid=True)`: with more than one channel it applies a softmax
    cross-entropy, which is wrong for overlapping regions.
    """

    def __init__(self, region_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        weights = None if region_weights is None else [float(w) for w in region_weights]
        self.dice = DiceLoss(sigmoid=True, batch=True, weight=weights)
        bce_weight = None if weights is None else torch.tensor(weights).view(1, -1, 1, 1, 1)
        self.register_buffer("bce_weight", bce_weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`logits (B, 3, D, H, W)`, `labels (B, 1, D, H, W)` -> scalar."""
        regions = label_to_regions(labels)
        bce = F.binary_cross_entropy_with_logits(logits, regions, weight=self.bce_weight)
        return self.dice(logits, regions) + bce


class SegmentationLoss(nn.Module):
    """Checks shapes, then applies `base` to plain or deep-supervision logits."""

    def __init__(self, base: nn.Module, channels: int) -> None:
        super().__init__()
        self.base = base
        self.channels = channels

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`logits (B, C, D, H, W)` or `(B, S, C, D, H, W)`, `labels (B, 1, D, H, W)` -> scalar."""
        spatial = logits.shape[-3:]
        if labels.ndim != 5 or labels.shape[1] != 1 or labels.shape[2:] != spatial:
            raise ValueError(
                f"labels must be (B, 1, D, H, W) matching logits {tuple(logits.shape)}, "
                f"got {tuple(labels.shape)}."
            )
        if logits.ndim not in (5, 6) or logits.shape[-4] != self.channels:
            raise ValueError(
                f"logits must be (B, {self.channels}, D, H, W) or "
                f"(B, S, {self.channels}, D, H, W), got {tuple(logits.shape)}."
            )
        if logits.ndim == 5:
            return self.base(logits, labels)
        weights = deep_supervision_weights(logits.shape[1])
        heads = logits.unbind(dim=1)
        return sum(w * self.base(head, labels) for w, head in zip(weights.tolist(), heads))


def build_loss(target: str = "labels", class_weights: Sequence[float] | None = None, classes: int = NUM_CLASSES) -> nn.Module:
    """The training loss, called as `loss(logits, labels)`.

    Args:
        target: "labels": Dice + focal over 4 softmax classes (the seed); "regions": Dice +
            BCE over 3 sigmoid outputs WT, TC, ET built from the label map.
        class_weights: per-channel weights: one per class for "labels" (None: equal, the
            seed's 0.25 each for 4 classes), 3 for "regions" (None: unweighted).
        classes: softmax classes for "labels": 4, or 5 when the resection cavity is kept.

    Raises:
        ValueError: unknown target, or the wrong number of weights.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown loss target {target!r}; expected one of {TARGETS}.")
    channels = classes if target == "labels" else len(REGIONS)
    if class_weights is not None:
        class_weights = tuple(float(w) for w in class_weights)
        if len(class_weights) != channels or min(class_weights) < 0:
            raise ValueError(
                f"class_weights for target {target!r} must be {channels} non-negative values, "
                f"got {class_weights!r}."
            )
    if target == "labels":
        base: nn.Module = LabelLoss(class_weights or (1.0 / classes,) * classes)
    else:
        base = RegionLoss(class_weights)
    return SegmentationLoss(base, channels)
