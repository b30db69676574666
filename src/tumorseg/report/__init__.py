"""`tumorseg report`: what people read from a folder of predictions, as a browsable report.

Volumes per label and region, lesion count, RANO diameters, centroid, warnings and, with
ground truth, the BraTS metrics: `volumes.csv`, `index.html` and one page per case.
"""

from .build import ReportResult, report
from .case import CaseReport
from .measure import Diameters, Measures, bidimensional, measure

__all__ = ["CaseReport", "Diameters", "Measures", "ReportResult", "bidimensional", "measure", "report"]
