"""Network outputs for whole volumes: MONAI sliding-window inference, flip TTA, labels.

Shared by validation during training and by `tumorseg predict`, so both see the same
numbers for the same weights.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from ..devices import autocast
from ..errors import TumorsegError
from ..labels import labels_from_regions

BOX_SIDE = 4096  # a window side beyond any brain's box: `roi` clips it to the box, one window over it


def check_window(window: str | int | Sequence[int] | None, divisor: int) -> tuple[int, int, int] | None:
    """`window` (one size for all three axes, or three, or "box": one window over the brain's
    whole box) as three ints, or one line saying why it cannot be a sliding window for this network."""
    if window is None:
        return None
    if isinstance(window, str):
        if window != "box":
            raise TumorsegError(f"window must be three positive multiples of {divisor} or 'box', got '{window}'")
        return (BOX_SIDE,) * 3
    window = (window,) * 3 if np.ndim(window) == 0 else tuple(window)
    if len(window) != 3 or any(int(w) < 1 or (int(w) % divisor and int(w) != BOX_SIDE) for w in window):
        raise TumorsegError(f"window must be three positive multiples of {divisor} (the network's downsampling), "
                            f"got {tuple(window)}")
    return tuple(int(w) for w in window)


def flip_dims(tta: bool) -> list[tuple[int, ...]]:
    """No flip, then (with TTA) the 7 combinations of flips along the three spatial axes."""
    return [()] + ([c for n in (1, 2, 3) for c in itertools.combinations((2, 3, 4), n)] if tta else [])


FLIP_GROUP = 2  # flips per sliding-window pass: each holds K x box floats, so 8 at once passed 2 GiB


def passes(flips: int) -> int:
    """Sliding-window passes over a case for that many flips."""
    return -(-flips // FLIP_GROUP)


def tta_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    roi: Sequence[int],
    target: str,
    overlap: float = 0.5,
    tta: bool = False,
    amp_dtype: torch.dtype | None = None,
    sw_batch_size: int = 1,
    uncertainty: bool = False,
    after_pass: Callable[[float, int], nn.Module | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class (softmax) or region (sigmoid) probabilities `(B, K, X, Y, Z)` for `image` `(B, C, X, Y, Z)`,
    averaged over the 8 combinations of flips along the three axes with `tta`, and, if asked, the
    flips' disagreement `flip_uncertainty` `(B, X, Y, Z)`.

    Flips go through the sliding window `FLIP_GROUP` at a time as one batch, so the network sees
    `sw_batch_size` windows per call whichever flip they come from, and memory holds only a
    group's outputs (the averages are running sums). Windows are Gaussian-weighted, as nnU-Net
    blends them. `after_pass(seconds, passes_left)`, if given, hears how long each pass took; a
    network it returns runs the passes left (`predict` compiling the network where that pays).
    """
    flips = flip_dims(tta)
    total, entropy = None, None
    for i in range(0, len(flips), FLIP_GROUP):
        group, start = flips[i : i + FLIP_GROUP], time.perf_counter()
        batch = torch.cat([torch.flip(image, dims) if dims else image for dims in group])
        with torch.no_grad(), autocast(image.device, amp_dtype):
            logits = sliding_window_inference(
                batch, roi_size=tuple(roi), sw_batch_size=sw_batch_size, predictor=model, overlap=overlap,
                mode="gaussian",
            ).float()
        probs = torch.sigmoid(logits) if target == "regions" else torch.softmax(logits, dim=1)
        for part, dims in zip(probs.split(image.shape[0]), group):
            part = torch.flip(part, dims) if dims else part
            total = part if total is None else total + part
            if uncertainty:
                h = _entropy(part, target)
                entropy = h if entropy is None else entropy + h
        if after_pass is not None:
            model = after_pass(time.perf_counter() - start, passes(len(flips)) - i // FLIP_GROUP - 1) or model
    mean = total / len(flips)
    return mean, (_mutual_information(mean, entropy / len(flips), target) if uncertainty else None)


def probabilities(*args, **kwargs) -> torch.Tensor:
    """`tta_probabilities` without the uncertainty: the probabilities `(B, K, X, Y, Z)` alone."""
    return tta_probabilities(*args, **kwargs)[0]


def _entropy(p: torch.Tensor, target: str) -> torch.Tensor:
    """Entropy in bits over axis -4 (classes, or independent regions summed)."""
    p = p.clamp(1e-7, 1 - 1e-7)
    h = -p * torch.log2(p)
    if target == "regions":
        h = h - (1 - p) * torch.log2(1 - p)
    return h.sum(dim=-4)


def _mutual_information(mean: torch.Tensor, mean_entropy: torch.Tensor, target: str) -> torch.Tensor:
    return (_entropy(mean, target) - mean_entropy).clamp_min(0.0)


def flip_uncertainty(flip_probs: torch.Tensor, target: str) -> torch.Tensor:
    """Mutual information between the prediction and the flip (BALD), in bits: `(B, X, Y, Z)`
    from stacked flips `(F, B, K, X, Y, Z)`.

    The entropy of the flip-averaged probabilities minus the mean entropy of each flip's: zero
    where all flips agree (however unsure they agree to be), largest where confident flips
    disagree; so it measures what TTA reveals, not the network's calibrated doubt.
    """
    return _mutual_information(flip_probs.mean(dim=0), _entropy(flip_probs, target).mean(dim=0), target)


def to_labels(probs: torch.Tensor | np.ndarray, target: str) -> np.ndarray:
    """Probabilities `(K, X, Y, Z)` of one case -> training labels (0..3) `(X, Y, Z)` uint8."""
    probs = torch.as_tensor(probs)
    if target == "regions":
        return labels_from_regions((probs > 0.5).cpu().numpy())
    return first_argmax(probs).cpu().numpy()


def first_argmax(probs: torch.Tensor) -> torch.Tensor:
    """`probs.argmax(dim=0)` as uint8 (the first of equal maxima), class by class: on the CPU,
    PyTorch's argmax over the outer axis of a volume took 8x longer (0.49 s for 4 x 144x176x144)."""
    best, labels = probs[0], torch.zeros(probs.shape[1:], dtype=torch.uint8, device=probs.device)
    for k in range(1, probs.shape[0]):
        higher = probs[k] > best
        best = torch.where(higher, probs[k], best)
        labels.masked_fill_(higher, k)
    return labels
