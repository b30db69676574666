"""Network outputs for whole volumes: MONAI sliding-window inference, flip TTA, labels.

Shared by validation during training and by `tumorseg predict`, so both see the same
numbers for the same weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from ..labels import labels_from_regions


def probabilities(
    model: nn.Module,
    image: torch.Tensor,
    roi: Sequence[int],
    target: str,
    overlap: float = 0.5,
    tta: bool = False,
    amp_dtype: torch.dtype | None = None,
    sw_batch_size: int = 1,
) -> torch.Tensor:
    """Class (softmax) or region (sigmoid) probabilities `(B, K, X, Y, Z)` for `image` `(B, C, X, Y, Z)`.

    With `tta`, the average over all 8 combinations of flips along the three axes.
    Windows are Gaussian-weighted, as nnU-Net blends them.
    """
    flips = [()] + ([c for n in (1, 2, 3) for c in itertools.combinations((2, 3, 4), n)] if tta else [])
    total = None
    with torch.no_grad(), torch.autocast(image.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for dims in flips:
            x = torch.flip(image, dims) if dims else image
            logits = sliding_window_inference(
                x, roi_size=tuple(roi), sw_batch_size=sw_batch_size, predictor=model, overlap=overlap, mode="gaussian"
            ).float()
            probs = torch.sigmoid(logits) if target == "regions" else torch.softmax(logits, dim=1)
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total + probs
    return total / len(flips)


def to_labels(probs: torch.Tensor | np.ndarray, target: str) -> np.ndarray:
    """Probabilities `(K, X, Y, Z)` of one case -> training labels (0..3) `(X, Y, Z)` uint8."""
    probs = torch.as_tensor(probs)
    if target == "regions":
        return labels_from_regions((probs > 0.5).cpu().numpy())
    return probs.argmax(dim=0).to(torch.uint8).cpu().numpy()
