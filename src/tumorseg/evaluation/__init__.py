"""Evaluation: BraTS region metrics per case and leaderboard-style summaries over folders."""

from .evaluate import evaluate
from .metrics import (
    FAILED_CASE,
    HD95_ONE_EMPTY,
    METRICS,
    dice,
    hd95,
    region_dice_from_labels,
    region_metrics,
    sensitivity,
    specificity,
)
from .results import CaseResult, EvaluationResult, format_table

__all__ = [
    "CaseResult",
    "EvaluationResult",
    "FAILED_CASE",
    "HD95_ONE_EMPTY",
    "METRICS",
    "dice",
    "evaluate",
    "format_table",
    "hd95",
    "region_dice_from_labels",
    "region_metrics",
    "sensitivity",
    "specificity",
]
