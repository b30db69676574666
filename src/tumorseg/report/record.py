"""A reported case kept between runs (`cases/<case>.json`), so a report killed half-way, or run
again over the same folder, redoes only the cases whose inputs changed.

A record holds the case as the report shows it and the key it was made under: the size and
modification time of every file it read (prediction, uncertainty map, scans, ground truth), the
settings that change what is shown, and a digest of the code that measures and draws a case (a
new version redoes every case). Its figures must still be there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..io import write_text
from ..labels import convention
from .case import CaseReport
from .measure import Diameters, Measures

# The modules whose code decides what a case's record holds (measures, checks, figures, metrics).
CASE_CODE: tuple[str, ...] = ("case.py", "checks.py", "figures.py", "measure.py", "truth.py", "record.py")
# plots/: the scans and labels read for the figures, and the panels, letters and overlays they draw with
DRAWING_CODE: tuple[str, ...] = ("case_images.py", "slices.py", "canvas.py")


def record_path(folder: Path, case_id: str) -> Path:
    return folder / f"{case_id}.json"


def record_key(files: list[Path | None], settings: dict[str, Any]) -> dict[str, Any]:
    """What a record is valid for: each file's (size, mtime in ns) or None where it is missing."""
    stamps: dict[str, list[int] | None] = {}
    for path in files:
        if path is not None:
            try:
                st = os.stat(path)
                stamps[str(path)] = [st.st_size, st.st_mtime_ns]
            except OSError:
                stamps[str(path)] = None
    return {"code": _code_digest(), "files": stamps, **{k: str(v) for k, v in settings.items()}}


SCORING_CODE: tuple[str, ...] = ("evaluate.py", "lesionwise.py", "metrics.py", "results.py")  # evaluation/: the metrics a record holds


@lru_cache(maxsize=1)
def _code_digest() -> str:
    here = Path(__file__).parent
    files = ([here / name for name in CASE_CODE] + [here.parent / "evaluation" / name for name in SCORING_CODE]
             + [here.parent / "plots" / name for name in DRAWING_CODE])
    return hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()[:16]


def save_record(path: Path, case: CaseReport, key: dict[str, Any]) -> None:
    """`case` and its `key` as `path`; its figures by name, beside the record (a report copied
    elsewhere and run again links its own)."""
    plain = dataclasses.asdict(case)
    plain["figures"] = {kind: p.name for kind, p in case.figures.items()}
    write_text(path, json.dumps({"key": key, "case": plain}, default=str))  # str: the prediction's Path


def load_record(path: Path, key: dict[str, Any]) -> CaseReport | None:
    """The case a record holds, if it was made under `key` and its figures are all there; else None."""
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None
        case = _case(data["case"], path.parent)
    except (OSError, ValueError, KeyError, TypeError):  # none, or damaged: the case is done again
        return None
    return case if all(p.is_file() for p in case.figures.values()) else None


def _case(d: dict[str, Any], folder: Path) -> CaseReport:
    m = d["measures"]
    measures = Measures({k: float(v) for k, v in m["volumes_cm3"].items()}, tuple(m["component_sizes"]),
                        _diameters(m["enhancing"]), _diameters(m["whole"]),
                        tuple(m["centroid"]) if m["centroid"] is not None else None)
    return CaseReport(d["case_id"], Path(d["prediction"]), convention(d["labels"]), measures, list(d["warnings"]),
                      {k: folder / v for k, v in d["figures"].items()}, d["uncertainty"], d["metrics"], list(d["notes"]),
                      d["model"])


def _diameters(d: dict[str, Any] | None) -> Diameters | None:
    if d is None:
        return None
    return Diameters(d["longest"], d["perpendicular"], d["axis"], d["slice_index"],
                     tuple(tuple(e) for e in d["longest_ends"]), tuple(tuple(e) for e in d["perpendicular_ends"]))
