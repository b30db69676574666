"""The report's HTML: `index.html` (the cohort) and one page per case.

Self-contained: inline CSS and script, system fonts, PNGs referenced by relative paths, so the
pages open from the file system with no server or network. Every text is escaped. The inline
script sorts a table by the column whose header is clicked, and after loading checks that every
image loaded and no script failed: it marks the result in `<html data-check="...">` ("ok", or
the problems) and shows any problem at the top of the page.
"""

from __future__ import annotations

import os
from collections import Counter
from html import escape
from pathlib import Path
from urllib.parse import quote

from ..labels import REGIONS
from .case import CaseReport
from .figures import THUMB_PIXELS
from .measure import LESION_MIN_VOXELS, label_names
from .table import METRIC_UNITS, REPORT_METRICS, SUMMARY_STATS, Column, cells, volume_key

PAGE_SUFFIX = ".html"
VIEWPORT = '<meta name="viewport" content="width=device-width, initial-scale=1">\n'  # a phone's width, not 980 px

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f0f0f0; }
td.text, th.text { text-align: left; }
table.sortable th { cursor: pointer; }
th[data-dir="asc"]::after { content: " \\25B2"; } th[data-dir="desc"]::after { content: " \\25BC"; }
.warn { color: #a40000; } .note { color: #555; } img { max-width: 100%; } img.thumb { max-width: none; } dt { font-weight: bold; }
.scroll { overflow-x: auto; } h1 { overflow-wrap: anywhere; }
"""

SCRIPT = """
var problems = [];
window.addEventListener("error", function (e) {
  var source = e.target && e.target.getAttribute ? e.target.getAttribute("src") : "?";
  problems.push(e.message || "could not load " + source);
}, true);
function sortBy(th) {
  var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
  var dir = th.getAttribute("data-dir") === "asc" ? -1 : 1;
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("data-dir"); });
  th.setAttribute("data-dir", dir === 1 ? "asc" : "desc");
  var rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = a.cells[col].getAttribute("data-sort"), y = b.cells[col].getAttribute("data-sort");
    var nx = parseFloat(x), ny = parseFloat(y);
    if (isNaN(nx) !== isNaN(ny) && (x === "" || y === "")) { return x === "" ? 1 : -1; }
    if (!isNaN(nx) && !isNaN(ny)) { return dir * (nx - ny); }
    return dir * x.localeCompare(y);
  });
  rows.forEach(function (r) { body.appendChild(r); });
}
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("table.sortable th").forEach(function (th) {
    th.addEventListener("click", function () { sortBy(th); });
  });
});
window.addEventListener("load", function () {
  Array.prototype.forEach.call(document.images, function (img) {
    if (!img.complete || img.naturalWidth === 0) { problems.push("broken image " + img.getAttribute("src")); }
  });
  document.documentElement.setAttribute("data-check", problems.length ? problems.join("; ") : "ok");
  if (problems.length) {
    var p = document.createElement("p");
    p.className = "warn";
    p.textContent = "This page has problems: " + problems.join("; ");
    document.body.insertBefore(p, document.body.firstChild);
  }
});
"""

DEFINITIONS = (
    ("Volumes", "voxel count times the voxel volume from the prediction's header affine (|det|), in cm^3; "
                "TC = necrotic core + enhancing tumour, WT = TC + oedema."),
    ("Diameters", "on the axial slice (the voxel axis closest to the scanner's S axis) where the lesion's area "
                  "is largest: the longest distance between two voxel centres (convex hull), and the largest extent "
                  "perpendicular to it between voxel centres whose positions along the longest diameter differ by at "
                  "most one voxel; in mm through the affine, so anisotropic and oblique voxels are right. "
                  "ET: the largest 26-connected enhancing lesion (as RANO measures); WT: the whole tumour."),
    ("Centroid", "the whole tumour's centre of mass in scanner coordinates (NIfTI world, RAS+), mm."),
    ("Uncertainty", "the mean of the voxel-wise uncertainty map (<case>_uncertainty.nii.gz beside the prediction) "
                    "inside the predicted whole tumour; higher means less certain."),
    ("Metrics", "against the ground truth, as tumorseg evaluate computes them: the BraTS 2020 region metrics "
                "(Dice, HD95 in mm, sensitivity, specificity) and the BraTS 2023+ lesion-wise Dice and HD95 (each "
                "predicted component touching no true lesion, dilated as the challenge does, is a false positive "
                "scored as a missed lesion is: Dice 0, HD95 374 mm), with the number of such components."),
)


def _head(title: str) -> str:
    return f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'


def page(title: str, body: str) -> str:
    return _head(title) + VIEWPORT + f"<style>{STYLE}</style>\n<script>{SCRIPT}</script>\n</head>\n<body>\n{body}\n</body>\n</html>\n"


def link(target: Path, start: Path) -> str:
    """A relative URL from the folder `start` to `target`, escaped for an attribute; the file name's
    own bytes percent-encoded (a name that is no UTF-8 still links to its file)."""
    return escape(quote(os.fsencode(Path(os.path.relpath(target, start)).as_posix())))


def case_page_name(case_id: str) -> str:
    return f"{case_id}{PAGE_SUFFIX}"


def case_page_title(case_id: str) -> str:
    return f"{case_id}: tumour report"


def page_case_id(path: Path) -> str | None:
    """The case whose page `path` is, if it is one the report wrote (`<case>.html` beginning as
    `case_page` begins it); else None: other files, a user's pages included, are no case's."""
    if not path.name.endswith(PAGE_SUFFIX) or not path.is_file():
        return None
    case_id = path.name[: -len(PAGE_SUFFIX)]
    head = _head(case_page_title(case_id))
    try:
        with open(path, errors="replace") as fh:
            return case_id if fh.read(len(head)) == head else None
    except OSError:
        return None


def table(head: list[str], rows: list[list[str]]) -> str:
    """A plain table of texts (escaped here); the first column is left-aligned as a label."""
    def row(cells: list[str], tag: str) -> str:
        first, *rest = cells
        return (f'<tr><{tag} class="text">{escape(first)}</{tag}>'
                + "".join(f"<{tag}>{escape(c)}</{tag}>" for c in rest) + "</tr>")

    body = "".join(row(r, "td") for r in rows)
    return f"<div class=\"scroll\"><table><thead>{row(head, 'th')}</thead><tbody>{body}</tbody></table></div>"


def index_page(cases: list[CaseReport], cols: list[Column], stats: dict[str, dict[str, str]],
               failed: dict[str, str], sources: dict[str, str], out: Path) -> str:
    """The cohort: sources, failed cases, summary statistics, the sortable table, definitions."""
    parts = ["<h1>Tumour segmentation report</h1>", "<ul>"]
    parts += [f"<li>{escape(k)}: {escape(v)}</li>" for k, v in sources.items()]
    models = Counter(c.model for c in cases if c.model)
    if len(models) == 1:
        parts.append("<li>model (fingerprint of the checkpoint and settings predict recorded): "
                     f"{escape(next(iter(models)))}</li>")
    could_not = f", {len(failed)} could not be read" if failed else ""
    parts += ["</ul>", f"<p>{len(cases)} case(s) reported{could_not}. Click a column header to sort.</p>"]
    if len(models) > 1:  # a cohort's numbers from different models would be compared as one
        parts += ['<h2 class="warn">Predictions of several models</h2>',
                  f'<p class="warn">These predictions come from {len(models)} models or settings (the fingerprint '
                  "predict records in each file): "
                  + escape(", ".join(f"{m} ({n} cases)" for m, n in models.most_common())) + ".</p>"]
    if failed:
        parts += ['<h2 class="warn">Not reported</h2>', '<ul class="warn">']
        parts += [f"<li>{escape(msg)}</li>" for msg in failed.values()]
        parts.append("</ul>")
    if stats:
        parts += ["<h2>Summary</h2>",
                  table(["measure", *SUMMARY_STATS], [[k, *(v[s] for s in SUMMARY_STATS)] for k, v in stats.items()])]
    parts += ["<h2>Cases</h2>", _cases_table(cases, cols, out), "<h2>Definitions</h2>", "<dl>"]
    parts += [f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in DEFINITIONS]
    parts += [f"<dt>{escape(c.key)}</dt><dd>{escape(c.description)}</dd>" for c in cols]
    parts.append("</dl>")
    return page("Tumour segmentation report", "\n".join(parts))


def _cases_table(cases: list[CaseReport], cols: list[Column], out: Path) -> str:
    """One row per case: thumbnail and name linking to its page, then every column; each cell
    carries its value in `data-sort` for the script."""
    head = "".join(f'<th title="{escape(c.description)}">{escape(c.key)}</th>' for c in cols)
    rows = []
    for case in cases:
        href = link(case.figures["thumbnail"].parent / case_page_name(case.case_id), out)
        name = escape(case.case_id)
        thumb = (f'<img src="{link(case.figures["thumbnail"], out)}" alt="{name}" class="thumb" '
                 f'width="{THUMB_PIXELS}" height="{THUMB_PIXELS}">')
        values = "".join(f'<td data-sort="{escape(v)}">{escape(v)}</td>' for v in cells(case, cols).values())
        rows.append(f'<tr><td class="text" data-sort="{name}"><a href="{href}">{thumb}</a></td>'
                    f'<td class="text" data-sort="{name}"><a href="{href}">{name}</a></td>{values}</tr>')
    return (f'<div class="scroll"><table class="sortable" id="cases"><thead><tr><th class="text">view</th>'
            f'<th class="text">case</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def case_page(case: CaseReport, cols: list[Column], index: Path) -> str:
    """One case: warnings, the three views, volumes, diameters drawn on their slice, uncertainty, metrics."""
    here = case.figures["views"].parent
    text = cells(case, cols)
    parts = [f'<p><a href="{link(index, here)}">&larr; all cases</a></p>', f"<h1>{escape(case.case_id)}</h1>",
             f"<p>prediction {escape(str(case.prediction))} (label convention {escape(case.labels.name)}"
             + (f", model {escape(case.model)}" if case.model else "") + ")</p>",
             "<h2>Warnings</h2>"]
    if case.warnings:
        parts += ['<ul class="warn">', *(f"<li>{escape(w)}</li>" for w in case.warnings), "</ul>"]
    else:
        parts.append("<p>none</p>")
    if case.notes:
        parts += ["<h2>Notes</h2>", '<ul class="note">', *(f"<li>{escape(n)}</li>" for n in case.notes), "</ul>"]
    parts += ["<h2>Views through the tumour</h2>", _img(case, "views", here, "three orthogonal views"),
              "<h2>Volumes</h2>", _volumes(case, text), "<h2>Diameters (RANO)</h2>",
              table(["lesion", "longest (mm)", "perpendicular (mm)", "product (mm2)"],
                    [[name, *(text[f"{prefix}_{k}"] for k in ("longest_mm", "perpendicular_mm", "product_mm2"))]
                     for prefix, name in (("ET", "largest enhancing lesion"), ("WT", "largest whole-tumour lesion"))]),
              "<p>Cyan: the longest diameter; magenta: the longest diameter perpendicular to it.</p>",
              _img(case, "diameters", here, "diameters drawn on their slice")]
    if "uncertainty" in case.figures:
        parts += ["<h2>Uncertainty</h2>", f"<p>score {escape(text['uncertainty'] + ' bits' if text['uncertainty'] else 'none')}: the mean voxel "
                  "uncertainty inside the predicted whole tumour (outlined in cyan).</p>",
                  _img(case, "uncertainty", here, "uncertainty map")]
    if case.metrics is not None:
        parts += ["<h2>Against the ground truth</h2>",
                  table(["region", *(f"{m} ({METRIC_UNITS[m]})" if m in METRIC_UNITS else m for m in REPORT_METRICS)],
                        [[r, *(text[f"{r}_{m}"] for m in REPORT_METRICS)] for r in REGIONS])]
    return page(case_page_title(case.case_id), "\n".join(parts))


def _volumes(case: CaseReport, text: dict[str, str]) -> str:
    """Each label of the case's convention with its raw value, the regions, lesions and centroid."""
    raw = dict(enumerate(case.labels.from_training(range(5)).tolist()))
    rows = [[name, str(raw[cls]), text[volume_key(name)]]
            for cls, name in label_names(case.labels).items()]
    rows += [[f"{r} region", "", text[f"{r}_cm3"]] for r in ("TC", "WT")]
    centroid = ", ".join(text[f"centroid_{a}_mm"] for a in "xyz") if case.measures.centroid else "none"
    specks = f" and {case.measures.specks} speck(s) under {LESION_MIN_VOXELS} voxels" if case.measures.specks else ""
    return (table(["part", "label", "cm^3"], rows) + f"<p>{case.measures.lesions} whole-tumour lesion(s){specks}; "
            f"centroid (scanner RAS+, mm): {escape(centroid)}</p>")


def _img(case: CaseReport, kind: str, here: Path, alt: str) -> str:
    return f'<p><img src="{link(case.figures[kind], here)}" alt="{escape(alt)}"></p>'
