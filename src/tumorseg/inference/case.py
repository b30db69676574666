"""One case through the network: its scans preprocessed exactly as `prepare` did for training (the
checkpoint records the channels, normalisation and spacing), the brain's box through sliding-window
inference (with flip TTA where asked for), probabilities back into the scan's own grid, labels
post-processed in the case's label convention (`predict_case`). `predict` runs it over many cases.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ..devices import autocast
from ..errors import TumorsegError
from ..geometry import Grid, resample_box
from ..labels import CLASS_ABBREVIATIONS, REGIONS, LabelConvention
from ..layouts import Case, discover_cases
from ..log import say
from ..prepare.case import (check_brain_size, check_headers, check_intensities, load_channels, scaled_window,
                            to_network_grid)
from ..prepare.crop import Box, bounding_box, brain_mask, uncrop
from .postprocess import postprocess
from .predictor import Predictor
from .window import to_labels, tta_probabilities


class CasePrediction(NamedTuple):
    """One case predicted in its original grid.

    labels: raw labels of `convention`, uint8 (X, Y, Z).
    probabilities: float32 (K, X, Y, Z) network probabilities (before postprocessing), or None.
    affine, header: those of the case's reference scan (the grid of every output).
    convention: the label convention of `labels`.
    uncertainty: float32 (X, Y, Z) flip disagreement in bits (`window.flip_uncertainty`), or None.
    channels: what each of the K probability channels is (`probability_channels`).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    affine: np.ndarray
    header: Any
    convention: LabelConvention
    uncertainty: np.ndarray | None = None
    channels: tuple[str, ...] = ()


def probability_channels(target: str, k: int) -> tuple[str, ...]:
    """The meaning of each probability channel: the regions WT, TC, ET (sigmoid, overlapping) or
    the training classes BG, NCR, ED, ET (softmax; a fifth, RC the resection cavity, when a run keeps it)."""
    return REGIONS if target == "regions" else tuple(CLASS_ABBREVIATIONS[:k])


def inference_box(brain: np.ndarray, patch: tuple[int, ...], divisor: int) -> Box:
    """The brain's bounding box grown (about its centre) to >= `patch` and a multiple of `divisor`.

    The box may reach outside the image; `crop` zero-pads there. An empty brain (all-zero
    scans) uses the whole image.
    """
    bbox = bounding_box(brain) or tuple((0, n) for n in brain.shape)
    box = []
    for (a, b), p in zip(bbox, patch):
        size = max(b - a, int(p))
        size = -(-size // divisor) * divisor
        start = a - (size - (b - a)) // 2
        box.append((start, start + size))
    return tuple(box)


def network_input(
    data: list[np.ndarray], predictor: Predictor, brain: np.ndarray | None = None
) -> tuple[np.ndarray, Box]:
    """Scaled, stacked channels `(C, *box size)` float32 over the inference box, and the box.

    `data` are the channels on the network's grid, `brain` their `crop.brain_mask` (None: computed
    here). Scaling uses each full volume's statistics, exactly as `prepare` does for training.
    """
    brain = brain_mask(data) if brain is None else brain
    box = inference_box(brain, predictor.patch, predictor.divisor)
    return scaled_window(data, predictor.norm, brain, box), box


def _outside_box(target: str, channels: int) -> list[float]:
    """Each probability channel's value outside the inference box: certain background."""
    return [1.0 if target == "labels" and k == 0 else 0.0 for k in range(channels)]


def _full_probabilities(probs: np.ndarray, box: Box, shape: tuple[int, ...], target: str) -> np.ndarray:
    """Box probabilities (K, ...) -> the image grid; background is certain outside the box."""
    return np.stack([uncrop(p, box, shape, fill=f) for p, f in zip(probs, _outside_box(target, len(probs)))])


class CaseInput(NamedTuple):
    """A case read and preprocessed, ready for the network (`load_input`)."""

    image: np.ndarray  # (C, *box size) float32 on the network's grid
    box: Box
    src: Grid  # the scan's grid: outputs are written on it
    net: Grid  # the network's grid
    affine: np.ndarray
    header: Any


def load_input(predictor: Predictor, case: Case) -> CaseInput:
    """Read a case's scans and preprocess them as training did (no network work: runs in a
    reader thread while the network works on the previous case)."""
    vols = load_channels(case, predictor.channels)
    warnings = check_intensities(case, predictor.channels, vols) + check_headers(case, predictor.channels)
    data, src, net = to_network_grid(vols, predictor.spacing)
    brain = brain_mask(data)
    for warning in warnings + check_brain_size(case, brain, net):
        say(f"warning: {warning}")
    image, box = network_input(data, predictor, brain)
    return CaseInput(image, box, src, net, vols[0].affine, vols[0].header)


class _StitchedOnCpu(nn.Module):
    """`model` on its device for windows cut from and stitched into a volume on the CPU: MONAI's
    `sw_device` / `device` split, for a case whose stitched outputs do not fit in GPU memory."""

    def __init__(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.device, self.amp_dtype = model, device, amp_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype):
            return self.model(x.to(self.device)).float().cpu()


def predict_case(
    predictor: Predictor, case: Case | str | os.PathLike, probabilities: bool = False, inp: CaseInput | None = None,
    uncertainty: bool = False, after_pass: Callable[[float, int], nn.Module | None] | None = None,
) -> CasePrediction:
    """Segment one case in its original grid (see `CasePrediction`); `inp` if already loaded.

    `case`: a `Case` (`layouts.discover_cases`) or one case's folder. `uncertainty` (needs the
    flips of TTA) adds the voxel-wise flip disagreement. `after_pass`: `window.tta_probabilities`'s
    hook between sliding-window passes.
    Raises TumorsegError naming the case and file for a missing, unreadable or mismatched scan.
    """
    if not isinstance(case, Case):
        found = discover_cases(case)
        if len(found) != 1:
            raise TumorsegError(f"{case}: {len(found)} cases, not one: give one case's folder (or predict the folder)")
        case = found[0]
    if uncertainty and not predictor.tta:
        raise TumorsegError("uncertainty comes from the TTA flips: predict with --tta")
    image, box, src, net, affine, header = inp or load_input(predictor, case)
    x, roi = torch.from_numpy(image)[None], predictor.roi(image.shape[1:])
    with torch.inference_mode():
        try:
            probs, disagreement = tta_probabilities(
                predictor.model, x.to(predictor.device), roi, predictor.target, predictor.overlap,
                predictor.tta, predictor.amp_dtype, predictor.sw_batch_size, uncertainty, after_pass,
            )
            out_of_memory = False
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True  # retried below: inside `except` the traceback keeps the failed pass's tensors
        if out_of_memory:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            say(f"note: {case.case_id}: out of GPU memory; retrying with the windows one at a time and stitched "
                "on the CPU (slower)")
            model = _StitchedOnCpu(predictor.eager(), predictor.device, predictor.amp_dtype)  # one window at a time: no padding
            probs, disagreement = tta_probabilities(model, x, roi, predictor.target, predictor.overlap,
                                                    predictor.tta, uncertainty=uncertainty)
    probs = probs[0]
    same = net.same_as(src)
    if disagreement is not None:  # (1, *box) on the network's grid -> the scan's grid
        flips = disagreement.cpu().numpy()
        disagreement = uncrop(flips[0], box, src.shape) if same else resample_box(flips, box, net, src, [0.0])[0]
    et_threshold, minimum = predictor.et_threshold, predictor.min_component
    if same:  # the scan's own grid (BraTS): labels in the box (on the device), then uncropped
        labels = uncrop(to_labels(probs, predictor.target), box, src.shape)
        full = _full_probabilities(probs.cpu().numpy(), box, src.shape, predictor.target) if probabilities else None
    else:  # probabilities, not labels, go back to the scan's grid (exact when only reoriented)
        full = resample_box(probs.cpu().numpy(), box, net, src, _outside_box(predictor.target, probs.shape[0]))
        labels = to_labels(full, predictor.target)
        full = full if probabilities else None
        ratio = np.prod(net.spacing) / np.prod(src.spacing)  # sizes tuned in training voxels: the same volumes here
        et_threshold, *minimum = (max(1, round(v * ratio)) if v else v for v in (et_threshold, *minimum))
    labels = postprocess(labels, predictor.largest_tumour, et_threshold, minimum)
    conv = predictor.labels or case.labels
    return CasePrediction(conv.from_training(labels), full, affine, header, conv, disagreement,
                          probability_channels(predictor.target, probs.shape[0]))
