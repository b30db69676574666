"""The cohort table: which columns a report has, their values as text, `volumes.csv`, summaries.

Values are formatted once here; the CSV and the HTML show the same strings, so they agree.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..evaluation.metrics import METRICS
from ..labels import CLASS_NAMES, REGIONS
from .case import CaseReport
from .measure import LESION_MIN_VOXELS, Diameters

_RANO = {"ET": ("enhancing", "the largest enhancing lesion"), "WT": ("whole", "the largest whole-tumour lesion")}
_DIAMETER = {"longest": ("longest", "longest axial diameter", "mm"),
             "perpendicular": ("perpendicular", "longest diameter perpendicular to it, same slice", "mm"),
             "product": ("product", "product of the two (RANO bidimensional)", "mm2")}
_METRIC_DIGITS = {"hd95": 2, "lesion_hd95": 2, "lesion_fp": 0}
METRIC_UNITS = {"hd95": "mm", "lesion_hd95": "mm"}
# what the report shows against a ground truth: BraTS 2020's metrics, then the 2023+ lesion-wise
# Dice and HD95 and the false-positive components that cost them (`evaluation.lesionwise`)
_METRIC_NAMES = {**{m: f"BraTS {m}" for m in METRICS}, "lesion_dice": "BraTS 2023+ lesion-wise Dice",
                 "lesion_hd95": "BraTS 2023+ lesion-wise HD95", "lesion_fp": "false-positive components (lesion-wise)"}
REPORT_METRICS = {m: name + (f" ({METRIC_UNITS[m]})" if m in METRIC_UNITS else "") for m, name in _METRIC_NAMES.items()}


@dataclass(frozen=True)
class Column:
    """One column: CSV header `key`, what it means, digits shown, and how to read it from a case.

    `summary` marks the columns whose cohort statistics the index shows.
    """

    key: str
    description: str
    digits: int
    value: Callable[[CaseReport], float | int | None]
    summary: bool = False


def fmt(value: float | int | None, digits: int) -> str:
    """The text of a value everywhere (CSV and HTML): blank for none, fixed decimals for floats."""
    if value is None:
        return ""
    return str(value) if isinstance(value, (int, np.integer)) else f"{value:.{digits}f}"


def volume_key(name: str) -> str:
    """The column of a label's volume: "necrotic core" -> "necrotic_core_cm3"."""
    return f"{name.replace(' ', '_')}_cm3"


def columns(cases: list[CaseReport], with_metrics: bool) -> list[Column]:
    """The report's columns for these cases: the resection cavity and the uncertainty only when a
    case has them, the BraTS metrics only `with_metrics`."""
    names = [CLASS_NAMES[c] for c in (1, 2, 3)]
    if any(c.labels.cavity is not None for c in cases):
        names.append(CLASS_NAMES[4])
    out = [Column(volume_key(n), f"volume of the {n} (cm^3)", 3,
                  lambda c, n=n: c.measures.volumes_cm3.get(n), summary=True) for n in names]
    out += [Column(f"{r}_cm3", f"volume of the {r} region (cm^3)", 3,
                   lambda c, r=r: c.measures.volumes_cm3[r], summary=True) for r in ("TC", "WT")]
    out.append(Column("lesions", f"number of whole-tumour lesions (26-connected components of {LESION_MIN_VOXELS} "
                      "voxels or more)", 0, lambda c: c.measures.lesions, summary=True))
    out.append(Column("specks", f"whole-tumour components under {LESION_MIN_VOXELS} voxels", 0,
                      lambda c: c.measures.specks, summary=True))
    for prefix, (attr, what) in _RANO.items():
        for part, (prop, text, unit) in _DIAMETER.items():
            out.append(Column(f"{prefix}_{part}_{unit}", f"{what}: {text} ({unit})", 2,
                              lambda c, a=attr, p=prop: _diameter(getattr(c.measures, a), p)))
    out += [Column(f"centroid_{axis}_mm", f"whole-tumour centroid, world {axis} (scanner RAS+, mm)", 2,
                   lambda c, i=i: None if c.measures.centroid is None else c.measures.centroid[i])
            for i, axis in enumerate("xyz")]
    if any(c.uncertainty is not None for c in cases):
        out.append(Column("uncertainty", "mean voxel uncertainty inside the predicted whole tumour (bits)", 4,
                          lambda c: c.uncertainty, summary=True))
    if with_metrics:
        out += [Column(f"{r}_{m}", f"{REPORT_METRICS[m]} of the {r} region against the ground truth",
                       _METRIC_DIGITS.get(m, 4), lambda c, r=r, m=m: None if c.metrics is None else c.metrics[r][m],
                       summary=True)
                for m in REPORT_METRICS for r in REGIONS]
    out.append(Column("warnings", "number of warnings (listed on the case's page)", 0,
                      lambda c: len(c.warnings)))
    return out


def _diameter(d: Diameters | None, part: str) -> float:
    """A measurement of nothing (no enhancing tumour) is 0 mm."""
    return 0.0 if d is None else float(getattr(d, part))


def cells(case: CaseReport, cols: list[Column]) -> dict[str, str]:
    """Column key -> the case's value as text."""
    return {col.key: fmt(col.value(case), col.digits) for col in cols}


def csv_text(cases: list[CaseReport], cols: list[Column], failed: dict[str, str] | None = None) -> str:
    """`volumes.csv`: one row per case, the columns above, then the warnings and the notes in words
    (" | " between) and the model fingerprint `predict` recorded; a case that could not be reported
    (`failed`: case id -> why) has a row of blanks whose warning says why, so that no reader of the
    table alone loses it."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", *(c.key for c in cols), "warning_text", "notes", "model"])
    rows = [[case.case_id, *cells(case, cols).values(), " | ".join(case.warnings), " | ".join(case.notes),
             case.model or ""] for case in cases]
    rows += [[cid, *([""] * len(cols)), f"not reported: {why}", "", ""] for cid, why in (failed or {}).items()]
    writer.writerows(sorted(rows, key=lambda row: row[0]))
    return buf.getvalue()


SUMMARY_STATS: tuple[str, ...] = ("n", "mean", "median", "min", "max")


def summary(cases: list[CaseReport], cols: list[Column]) -> dict[str, dict[str, str]]:
    """Column key -> {n, mean, median, min, max} as text, over the cases with a value."""
    out = {}
    for col in cols:
        if not col.summary:
            continue
        values = np.array([v for v in (col.value(c) for c in cases) if v is not None], dtype=np.float64)
        if values.size == 0:
            continue
        averaged = col.digits or 2  # a mean count of 0.25 is not "0.2"; its min and max stay counts
        stats = ((values.mean(), averaged), (np.median(values), averaged), (values.min(), col.digits),
                 (values.max(), col.digits))
        out[col.key] = {"n": str(values.size), **{k: fmt(float(v), d) for k, (v, d) in zip(SUMMARY_STATS[1:], stats)}}
    return out
