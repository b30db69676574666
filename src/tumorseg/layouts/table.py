"""A `cases.csv` / `.tsv` naming each case's files, for scans no layout names."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..errors import TumorsegError
from ..labels import MODALITIES, canonical_modality
from .brats import PLAIN_SEG_STEMS
from .case import Case


CASE_LIST_SUFFIXES: tuple[str, ...] = (".csv", ".tsv")
CASE_ID_COLUMNS: tuple[str, ...] = ("case", "case_id", "caseid", "id", "subject", "subject_id", "patient", "patient_id")


def is_case_list(path: str | os.PathLike) -> bool:
    """Whether `path` is a table of cases (`list_cases`) rather than a folder or a scan."""
    return Path(path).suffix.lower() in CASE_LIST_SUFFIXES and Path(path).is_file()


def list_cases(table: str | os.PathLike) -> list[Case]:
    """The cases a CSV/TSV table names row by row, for files whose names no layout knows.

    Columns: the case id (`case`, `case_id`, `id`, `subject`, `patient`), one per modality (any
    alias: `t1`, `T1Gd`, `FLAIR`, ...) and optionally the segmentation (`seg`, `label`); other
    columns (age, survival) are ignored, an empty cell is a file the case lacks. Paths are
    relative to the table's folder. A named file that is missing fails its case alone when read.
    """
    table = Path(table)
    try:
        # Excel writes a byte-order mark; names that are not UTF-8 (`tumorseg cases` of an old zip's
        # folders) stand for their bytes, as the files' own names do
        text = table.read_text(encoding="utf-8-sig", errors="surrogateescape")
    except OSError as exc:
        raise TumorsegError(f"{table}: cannot read the case list ({exc})") from None
    rows = [row for row in csv.reader(io.StringIO(text), delimiter=_delimiter(table, text)) if any(c.strip() for c in row)]
    if len(rows) < 2:
        raise TumorsegError(f"{table}: no cases listed (a header row, then one row per case)")
    roles: dict[int, str] = {}
    for i, name in enumerate(rows[0]):
        key = name.strip().lower().replace(" ", "_")
        role = "case" if key in CASE_ID_COLUMNS else "seg" if key in PLAIN_SEG_STEMS else canonical_modality(key)
        if role is None:
            continue
        if role in roles.values():
            twice = [rows[0][j].strip() for j, r in roles.items() if r == role] + [name.strip()]
            raise TumorsegError(f"{table}: columns {' and '.join(twice)} both name the {role}")
        roles[i] = role
    if "case" not in roles.values():
        raise TumorsegError(f"{table}: no case id column (one of {', '.join(CASE_ID_COLUMNS)})")
    if set(roles.values()) == {"case"}:
        raise TumorsegError(f"{table}: no modality or segmentation column (t1, t1ce, t2, flair by any alias; seg)")
    unread = [name.strip() for i, name in enumerate(rows[0]) if i not in roles and name.strip()]
    cases = []
    for line, row in enumerate(rows[1:], start=2):
        cells = {role: row[i].strip() if i < len(row) else "" for i, role in roles.items()}
        case_id, seg = cells.pop("case"), cells.pop("seg", "")
        if not case_id or case_id in (".", "..") or any(c in case_id for c in '/\\'):
            raise TumorsegError(f"{table}: line {line}: {case_id!r} cannot name a case's output files")
        images = {m: _listed_file(table, v) for m, v in cells.items() if v}
        # A modality without a column: say which columns were not read (`3_AX_FLAIR` names no modality).
        absent = {m: f"{case_id}: no {m} column in {table} (columns not read: {', '.join(unread)}; name it by a "
                     f"modality: t1, t1ce, t2, flair or an alias)" for m in MODALITIES if unread and m not in roles.values()}
        cases.append(Case(case_id, table, images, _listed_file(table, seg) if seg else None, layout="list",
                          conflicts=absent))
    return cases


def _delimiter(table: Path, text: str) -> str:
    if table.suffix.lower() == ".tsv":
        return "\t"
    header = text.splitlines()[0] if text else ""
    return max(",;\t", key=header.count)  # Excel in many locales writes ';'


def _listed_file(table: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else table.parent / path
