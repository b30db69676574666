"""The report's BraTS metrics (`--gt`): a prediction the report has already read, scored against
its ground truth as `tumorseg evaluate` pairs and scores it (the 2020 region metrics and the
2023+ lesion-wise ones)."""

from __future__ import annotations

import os

from ..errors import TumorsegError
from ..evaluation.evaluate import labelled, score_case, truth_labels
from ..io import Volume, load_labels
from ..labels import LabelConvention
from ..layouts import Case, discover_cases


def truth_cases(gt: str | os.PathLike) -> dict[str, Case]:
    """Case id -> its ground-truth case, for the cases of `gt` with a segmentation.

    Raises:
        TumorsegError: `gt` is missing or holds no segmentation.
    """
    return {c.case_id: c for c in labelled(discover_cases(gt, need_images=False), gt)}


def score(
    prediction: Volume, truth: Case | None, gt: str | os.PathLike, labels: LabelConvention
) -> tuple[dict[str, dict[str, float]] | None, list[str], list[str]]:
    """({region: {metric: value}}, [], [notes]) of `prediction`, in `labels`, against `truth`, or
    (None, [why not], []). Notes: how the truth's convention was read, a prediction resampled."""
    if truth is None:
        return None, [f"no ground truth for this case in {gt}: no metrics"], []
    try:
        seg = load_labels(truth.seg, truth.case_id)
        metrics, notes = score_case(truth.case_id, prediction, seg, truth_labels(truth), labels)
        return metrics, [], notes
    except TumorsegError as exc:
        return None, [f"not scored against the ground truth: {exc}"], []
