"""Several trained networks predicting as one: cross-validation folds (`train --fold K`), seeds or
architectures, as nnU-Net and the BraTS winners ensemble them.

Each sliding window goes through every member and their probabilities (softmax or sigmoid) are
averaged, so flips, window blending and post-processing see one network. The post-processing
of an ensemble is chosen, as nnU-Net chooses it after a cross-validation, on the validation
cases of all its members together: for folds, every prepared case once, each predicted by the
model that did not train on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import TumorsegError
from .postprocess import NO_COMPONENT_STEP, choose_default, statistics_from_state

EPS = 1e-7  # probabilities clamped off 0 and 1 before their logarithm


class EnsembleNetwork(nn.Module):
    """`members` (each `(B, C, X, Y, Z)` -> logits `(B, K, X, Y, Z)`) as one network whose logits
    give, under the target's own activation, the members' mean probabilities: log-probabilities for
    softmax (`target` "labels"), logits of the mean for sigmoid ("regions").

    One member gives that member's labels: the sliding window's weighted blend of log-softmax
    outputs differs from that of logits by a per-voxel constant, which softmax cancels.
    """

    def __init__(self, members: Sequence[nn.Module], target: str) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for member in self.members:
            logits = member(x).float()
            probs = torch.sigmoid(logits) if self.target == "regions" else torch.softmax(logits, dim=1)
            total = probs if total is None else total + probs
        mean = (total / len(self.members)).clamp(EPS, 1.0 - EPS)
        return torch.logit(mean) if self.target == "regions" else torch.log(mean)


class EnsemblePostprocessing(NamedTuple):
    """An ensemble's post-processing and where it comes from (`source`, for the run's first lines)."""

    largest_tumour: bool
    et_threshold: int | None
    min_component: tuple[int, int, int]
    statistics: list | None  # the validation statistics it was chosen on, as checkpoints store them
    source: str


def ensemble_postprocessing(members: Sequence[Any], names: Sequence[str]) -> EnsemblePostprocessing:
    """Chosen on all the members' validation statistics (`Predictor.statistics`) where every member
    stores them; else the members' own where they agree; else none (`source` says why, naming the
    first member, of `names`, without usable statistics)."""
    lacking = None  # (name, why) of the first member whose statistics cannot be used
    stats: list[dict] = []
    for member, name in zip(members, names):
        if member.statistics is None:
            lacking = lacking or (name, "stores no validation statistics")
            continue
        try:
            stats += statistics_from_state(member.statistics)
        except ValueError as exc:
            lacking = lacking or (name, str(exc))
    if lacking is None and stats:
        tuned = choose_default(stats)
        return EnsemblePostprocessing(tuned["largest_tumour"], tuned["et_threshold"], tuple(tuned["min_component"]),
                                      [case for m in members for case in m.statistics],
                                      f"chosen on the members' {len(stats)} validation cases")
    name, why = lacking or (names[0], "no validation cases")
    hint = "; train with --postprocess to store them" if why.startswith("stores no") else ""
    own = {(m.largest_tumour, m.et_threshold, tuple(m.min_component)) for m in members}
    if len(own) == 1:
        return EnsemblePostprocessing(*own.pop(), None, f"the members' own: not chosen on their validation cases "
                                                        f"({name} {why})")
    return EnsemblePostprocessing(False, None, NO_COMPONENT_STEP, None,
                                  f"none: the members chose differently and it cannot be chosen on their validation "
                                  f"cases ({name} {why}{hint})")


def check_members(members: Sequence[Any], names: Sequence[str]) -> int | None:
    """The members' shared output channels (None: not known), after checking that they read the same
    input and predict the same output on one device; one line naming the member that differs."""
    first = members[0]
    runs = [m for m in members if m.engine != "onnx"] or members  # an exported model may fall back to the CPU
    for member, name in zip(members[1:], names[1:]):
        for what in ("channels", "norm", "spacing", "target"):
            if getattr(member, what) != getattr(first, what):
                raise TumorsegError(f"{name}: {what} {getattr(member, what)}, but {names[0]}: "
                                    f"{getattr(first, what)}; an ensemble's models share their input and output")
        if member.engine != "onnx" and member.device != runs[0].device:
            raise TumorsegError(f"{name}: on {member.device}, but {runs[0].device}: an ensemble runs on one device")
    known = [(m.out_channels, name) for m, name in zip(members, names) if m.out_channels is not None]
    for channels, name in known[1:]:  # None: not known (a network built in Python)
        if channels != known[0][0]:
            raise TumorsegError(f"{name}: out_channels {channels}, but {known[0][1]}: {known[0][0]}; an "
                                "ensemble's models share their input and output")
    return known[0][0] if known else None


def member_digests(members: Sequence[Any], names: Sequence[str]) -> list[str | None]:
    """Each network's model digest, nested ensembles flattened; one line where a model comes twice (a
    checkpoint and its export, or a copy: one model counted twice)."""
    seen: dict[str, str] = {}  # digest -> the member holding it
    digests: list[str | None] = []
    for member, name in zip(members, names):
        for d in member.member_digests or (member.model_digest,):
            if d in seen:
                raise TumorsegError(f"{name}: {'holds ' if member.members > 1 else ''}the same model as {seen[d]}; "
                                    "an ensemble takes each model once")
            if d is not None:
                seen[d] = name
            digests.append(d)
    return digests
