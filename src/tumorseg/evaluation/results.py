"""What `evaluate` gives back: each case's status and scores, the summary over them (mean, std,
median, quartiles per region and metric, as BraTS leaderboards report), and their text table and CSV."""

from __future__ import annotations

import csv
import io as _stdio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..labels import REGIONS
from ..notes import grouped
from .lesionwise import LESION_HD95_MISS
from .metrics import FAILED_CASE, METRICS

STATUS_OK, STATUS_MISSING, STATUS_ERROR = "ok", "missing", "error"
STATUS_TRUTH = "truth_error"  # the ground truth itself is unusable: not the model's failure, kept out of the scores
LESION_METRICS: tuple[str, ...] = ("lesion_dice", "lesion_hd95")
ALL_METRICS: tuple[str, ...] = (*METRICS, *LESION_METRICS)
LESION_COUNTS: tuple[str, ...] = ("lesion_tp", "lesion_fn", "lesion_fp")  # scored cases only: none for a failed one
FAILED_LESIONS: dict[str, float] = {"lesion_dice": 0.0, "lesion_hd95": LESION_HD95_MISS}
STATS: tuple[str, ...] = ("mean", "std", "median", "25quantile", "75quantile")
_METRIC_LABELS = {"dice": "Dice", "hd95": "HD95 (mm)", "sensitivity": "Sensitivity", "specificity": "Specificity",
                  "lesion_dice": "LesionDice", "lesion_hd95": "LesionHD95"}


@dataclass
class CaseResult:
    """One ground-truth case: its status, metrics per region (failed values unless ok)."""

    case_id: str
    status: str
    metrics: dict[str, dict[str, float]]
    message: str = ""
    model: str = ""  # the fingerprint `predict` recorded in the prediction's header ("" if none)


@dataclass
class EvaluationResult:
    """What `evaluate` found: per-case rows, the summary (also the JSON), and the lists."""

    rows: list[CaseResult]
    summary: dict[str, Any]
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    truth_errors: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    csv_path: Path | None = None
    json_path: Path | None = None

    @property
    def failed(self) -> list[str]:
        """Case ids scored as failed (missing or error; not those whose ground truth is unusable)."""
        return [r.case_id for r in self.rows if r.status in (STATUS_MISSING, STATUS_ERROR)]

    def table(self) -> str:
        return format_table(self.summary)

    def report(self) -> str:
        """The table plus every missing, extra, failed and skipped case, for printing."""
        lines = [self.table()]
        if self.missing:
            lines.append(f"missing predictions, scored as failed ({len(self.missing)}): {', '.join(self.missing)}")
            if len(self.missing) < self.summary["cases"]:  # cases scored: truth errors are not
                lines.append("(to score only the cases that have a prediction: --only-predicted)")
        if self.errors:
            lines.append(f"errors, scored as failed ({len(self.errors)}):")
            lines += [f"  {msg}" for msg in self.errors.values()]
        if self.truth_errors:
            lines.append(f"ground truth unusable, not scored ({len(self.truth_errors)}):")
            lines += [f"  {msg}" for msg in self.truth_errors.values()]
        if self.extra:
            lines.append(f"predictions without ground truth, ignored ({len(self.extra)}): {', '.join(self.extra)}")
        shown = self.skipped if len(self.skipped) <= 5 else [
            *self.skipped[:3], f"... and {len(self.skipped) - 3} more cases without a segmentation"]
        lines += [f"skipped: {s}" for s in shown] + [f"note: {n}" for n in grouped(self.notes)]
        models = self.summary.get("models", {})
        if len(models) == 1:
            lines.append(f"model: {next(iter(models))} (the fingerprint predict recorded of the checkpoint and settings)")
        if len(models) > 1:  # one table averaging several models' scores would be compared as one model's
            lines.append(f"warning: predictions of {len(models)} models or settings scored together (the fingerprint "
                         "predict records): " + ", ".join(f"{m} ({n} case{'s' * (n != 1)})" for m, n in models.items()))
        lines += [f"wrote {p}" for p in (self.csv_path, self.json_path) if p is not None]
        return "\n".join(lines)


def failed_metrics() -> dict[str, dict[str, float]]:
    return {region: {**FAILED_CASE, **FAILED_LESIONS} for region in REGIONS}


def summarize(rows: Iterable[CaseResult]) -> dict[str, dict[str, dict[str, float]]]:
    """{region: {metric: {mean, std, median, 25quantile, 75quantile}}} over all rows."""
    rows = list(rows)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for region in REGIONS:
        out[region] = {}
        for metric in ALL_METRICS:
            values = np.array([r.metrics[region][metric] for r in rows], dtype=np.float64)
            q25, median, q75 = np.percentile(values, [25, 50, 75])
            out[region][metric] = {
                "mean": float(values.mean()),
                "std": float(values.std()),
                "median": float(median),
                "25quantile": float(q25),
                "75quantile": float(q75),
            }
    return out


def format_table(summary: dict[str, Any]) -> str:
    """A leaderboard-style text table of the summary's metrics (one row per region/metric)."""
    head = f"{'region':<7}{'metric':<13}" + "".join(f"{s:>12}" for s in ("mean", "std", "median", "25%", "75%"))
    lines = [
        f"BraTS metrics over {summary['cases']} cases ({summary['evaluated']} evaluated, {summary['failed']} failed"
        + (f", each scored Dice 0, HD95 {FAILED_CASE['hd95']})" if summary["failed"] else ")"),
    ]
    sections = (("BraTS 2020 (pooled HD95, medpy)", METRICS),
                (f"BraTS 2023+ lesion-wise ({summary.get('challenges', 'GLI')}; HD95 {LESION_HD95_MISS} per miss)", LESION_METRICS))
    for title, metrics in sections:
        lines += [title, head, "-" * len(head)]
        for region in REGIONS:
            for i, metric in enumerate(metrics):
                stats = summary["metrics"][region][metric]
                fmt = "{:>12.2f}" if "hd95" in metric else "{:>12.4f}"
                cells = "".join(fmt.format(stats[s]) for s in STATS)
                lines.append(f"{region if i == 0 else '':<7}{_METRIC_LABELS[metric]:<13}{cells}")
    counts = summary.get("lesions")
    if counts:
        lines.append(f"lesions in the {summary['evaluated']} evaluated cases (truth lesions scored: found, missed; "
                     "predicted components touching none):")
        lines += [f"{region:<7}{c['tp']} found, {c['fn']} missed, {c['fp']} false positive{'s' * (c['fp'] != 1)}"
                  for region, c in counts.items()]
    return "\n".join(lines)


def rows_to_csv(rows: Iterable[CaseResult]) -> str:
    """Per-case CSV: case, status, <REGION>_<metric> for WT, TC, ET (2020 and lesion-wise, then the
    lesion counts, empty for a failed case), message, and the model fingerprint `predict` recorded
    in the prediction."""
    buf = _stdio.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = [(r, m) for r in REGIONS for m in (*ALL_METRICS, *LESION_COUNTS)]
    writer.writerow(["case", "status", *(f"{r}_{m}" for r, m in columns), "message", "model"])
    for row in rows:
        values = [row.metrics[r].get(m, "") for r, m in columns]  # a failed case has no lesion counts
        writer.writerow([row.case_id, row.status, *values, row.message, row.model])
    return buf.getvalue()
