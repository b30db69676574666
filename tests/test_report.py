"""`tumorseg report`: measurements with known answers, warnings, the HTML and CSV, real cases."""

from __future__ import annotations

import csv
import html
import os
import shutil
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import nibabel as nib
import numpy as np
import pytest
from factory import AFFINE, write_case
from nibabel.affines import apply_affine

from tumorseg.cli import main
from tumorseg.errors import TumorsegError
from tumorseg.labels import BRATS2020, CONVENTIONS
from tumorseg.plots.slices import display_slice
from tumorseg.report import bidimensional, measure, report
from tumorseg.report.checks import case_warnings
from tumorseg.report.figures import display_xy
from tumorseg.report.measure import TUMOUR_CLASSES, uncertainty_score
from tumorseg.report.measure import Diameters, axial_axis, centroid_world, lesion_sizes, widest_pair

SQRT2 = np.sqrt(2.0)


def rotation_z(degrees: float, spacing=(1.0, 1.0, 2.0), shift=(10.0, -20.0, 30.0)) -> np.ndarray:
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = shift
    return affine


def box(shape, *slices) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[slices] = True
    return mask


# ----------------------------------------------------------------------------- measurements


def test_volumes_per_label_and_region_with_anisotropic_voxels():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[0:2, 0:5, 0:1] = 1  # 10 voxels necrotic core
    labels[5:9, 5:9, 5:7] = 2  # 32 oedema
    labels[0:3, 7:10, 7:9] = 3  # 18 enhancing
    m = measure(labels, np.diag([1.0, 1.0, 2.0, 1.0]), BRATS2020)  # 2 mm^3 voxels
    assert m.volumes_cm3 == pytest.approx({"necrotic core": 0.020, "oedema": 0.064, "enhancing tumour": 0.036,
                                           "TC": 0.056, "WT": 0.120})
    assert measure(labels, rotation_z(30), BRATS2020).volumes_cm3 == pytest.approx(m.volumes_cm3)


def test_resection_cavity_has_its_own_volume_and_stays_out_of_the_regions():
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[:2] = 4
    labels[4:, :1, :1] = 2
    m = measure(labels, np.eye(4), CONVENTIONS["brats2023"])
    assert m.volumes_cm3["resection cavity"] == pytest.approx(0.072) and m.volumes_cm3["WT"] == pytest.approx(0.002)
    assert "resection cavity" not in measure(labels % 4, np.eye(4), BRATS2020).volumes_cm3


def test_square_diameters_are_its_diagonals():
    d = bidimensional(box((20, 20, 5), slice(2, 13), slice(3, 14), slice(2, 3)), np.eye(4))  # 11 x 11 voxels
    assert d.longest == pytest.approx(10 * SQRT2) and d.perpendicular == pytest.approx(10 * SQRT2)
    assert d.product == pytest.approx(200.0) and (d.axis, d.slice_index) == (2, 2)
    ends = np.array(d.longest_ends)
    assert np.linalg.norm(ends[0] - ends[1]) == pytest.approx(10 * SQRT2)


def test_rectangle_diagonal_and_its_perpendicular():
    """21 x 3 voxels: the diagonal sqrt(20^2 + 2^2); perpendicular to it the rectangle measures
    H * d / W = 2.01 mm (continuous), and by our one-voxel-tolerance definition 2.09 mm."""
    d = bidimensional(box((30, 10, 5), slice(2, 23), slice(3, 6), slice(1, 2)), np.eye(4))
    diagonal = np.hypot(20, 2)
    assert d.longest == pytest.approx(diagonal)
    assert d.perpendicular == pytest.approx(42 / diagonal)  # the pair (x, 0) -> (x - 1, 2)


def test_anisotropic_voxels_measure_in_plane_only():
    """1 x 1 x 2 mm: axial is z, the slice thickness does not enter; 0.5 x 1 mm in-plane is honoured."""
    mask = box((30, 30, 12), slice(0, 11), slice(0, 11), slice(2, 9))
    d = bidimensional(mask, np.diag([1.0, 1.0, 2.0, 1.0]))
    assert d.longest == pytest.approx(10 * SQRT2) and d.perpendicular == pytest.approx(10 * SQRT2)
    d = bidimensional(box((30, 30, 12), slice(0, 21), slice(0, 11), slice(2, 9)), np.diag([0.5, 1.0, 2.0, 1.0]))
    assert d.longest == pytest.approx(10 * SQRT2) and d.perpendicular == pytest.approx(10 * SQRT2)


def test_oblique_affine_changes_no_distance():
    mask = box((30, 30, 8), slice(2, 23), slice(3, 6), slice(1, 3))
    straight = measure(mask.astype(np.uint8) * 2, np.diag([1.0, 1.0, 2.0, 1.0]), BRATS2020)
    for degrees in (30, -45):
        oblique = measure(mask.astype(np.uint8) * 2, rotation_z(degrees), BRATS2020)
        assert oblique.whole.longest == pytest.approx(straight.whole.longest)
        assert oblique.whole.perpendicular == pytest.approx(straight.whole.perpendicular)
        assert oblique.volumes_cm3 == pytest.approx(straight.volumes_cm3)


def test_axial_is_the_voxel_axis_closest_to_world_superior():
    """A scan stored with j running superior (sagittal-like storage) is measured on j slices."""
    permuted = np.array([[0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])  # i->y, j->z, k->x
    assert axial_axis(permuted) == 1 and axial_axis(rotation_z(30)) == 2
    mask = box((25, 6, 9), slice(1, 22), slice(2, 3), slice(0, 3))  # in-plane (i, k): 21 x 3
    d = bidimensional(mask, permuted)
    reference = bidimensional(box((30, 10, 5), slice(2, 23), slice(3, 6), slice(1, 2)), np.eye(4))
    assert (d.axis, d.slice_index) == (1, 2)
    assert (d.longest, d.perpendicular) == pytest.approx((reference.longest, reference.perpendicular))


def test_largest_axial_slice_and_tiny_or_collinear_lesions():
    mask = box((20, 20, 10), slice(2, 5), slice(2, 5), slice(1, 8))
    mask[2:12, 2:5, 4] = True  # slice 4 is the largest
    d = bidimensional(mask, np.eye(4))
    assert d.slice_index == 4 and d.longest == pytest.approx(np.hypot(9, 2))
    one = bidimensional(box((5, 5, 5), 2, 2, 2), np.eye(4))
    assert (one.longest, one.perpendicular) == (0.0, 0.0)
    line = bidimensional(box((12, 5, 5), slice(1, 8), 2, 2), np.diag([1.5, 1.0, 1.0, 1.0]))
    assert (line.longest, line.perpendicular) == (pytest.approx(9.0), 0.0)
    assert bidimensional(np.zeros((4, 4, 4), bool), np.eye(4)) is None


def test_widest_pair_matches_its_definition():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        s, t, tol = rng.normal(size=n) * 3, rng.normal(size=n) * 3, float(rng.uniform(0.2, 2.0))
        p, q, width = widest_pair(s, t, tol)
        brute = max(abs(t[i] - t[j]) for i in range(n) for j in range(n) if abs(s[i] - s[j]) <= tol)
        assert width == pytest.approx(brute) and abs(s[p] - s[q]) <= tol + 1e-6
        assert abs(t[p] - t[q]) == pytest.approx(width)


def test_largest_enhancing_lesion_and_lesion_count():
    labels = np.zeros((30, 30, 6), np.uint8)
    labels[1:4, 1:4, 2] = 3  # small ET lesion
    labels[10:20, 10:14, 2] = 3  # large ET lesion: 10 x 4
    labels[25, 25, 3] = labels[26, 26, 4] = 2  # touching by a corner: one lesion under 26-connectivity
    m = measure(labels, np.eye(4), BRATS2020)
    assert (m.lesions, m.specks) == (1, 2) and sorted(m.component_sizes) == [2, 9, 40]  # lesions: 10 voxels or more
    assert m.enhancing.longest == pytest.approx(np.hypot(9, 3))
    assert m.whole.longest == pytest.approx(np.hypot(9, 3))  # the largest lesion's, not across lesions to (25, 25)
    assert lesion_sizes(box((5, 5, 5), slice(0, 1), slice(0, 1), slice(0, 5)) | box((5, 5, 5), 3, 3, 0))[1] == (5, 1)


def test_centroid_in_world_coordinates():
    mask = box((20, 20, 10), slice(2, 7), slice(4, 7), slice(2, 4))  # centre (4, 5, 2.5) in voxels
    affine = rotation_z(30)
    assert centroid_world(mask, affine) == pytest.approx(tuple(apply_affine(affine, (4, 5, 2.5))))
    assert measure(mask.astype(np.uint8), AFFINE, BRATS2020).centroid == pytest.approx((-4.0, 234.0, 2.5))
    assert centroid_world(np.zeros((3, 3, 3), bool), affine) is None


def test_warnings_in_plain_words():
    empty = measure(np.zeros((10, 10, 10), np.uint8), np.eye(4), BRATS2020)
    assert case_warnings(np.zeros((10, 10, 10), bool), empty) == ["empty prediction: no tumour was labelled"]
    wt = np.zeros((30, 30, 30), bool)
    for i in range(4):
        wt[2 + 7 * i : 5 + 7 * i, 10:14, 10] = True  # 4 lesions of 12 voxels
    wt[20, 20, 20] = True  # a speck does not count
    brain = box(wt.shape, slice(1, 29), slice(1, 29), slice(1, 29))
    text = case_warnings(wt, measure(wt.astype(np.uint8), np.eye(4), BRATS2020), brain)
    assert len(text) == 1 and "4 separate whole-tumour lesions" in text[0]
    wt[:3] = False
    wt[0, 5, 5] = True  # on the scan's face, outside the brain
    text = case_warnings(wt, measure(wt.astype(np.uint8), np.eye(4), BRATS2020), brain)
    assert any("edge of the scan (1 voxels" in w for w in text)
    assert not any("outside the brain" in w for w in text)  # one voxel: as in expert segmentations
    wt[0, 5:25, 5] = True  # 20 on the background
    text = case_warnings(wt, measure(wt.astype(np.uint8), np.eye(4), BRATS2020), brain)
    assert any(w.startswith("tumour outside the brain: 20 voxels where the images are background") for w in text)


def test_measurement_lines_land_on_their_voxels():
    shape = (7, 9, 5)
    for view, index in (("axial", 3), ("coronal", 4), ("sagittal", 2)):
        vol = np.zeros(shape)
        point = {"axial": (2, 6, 3), "coronal": (5, 4, 1), "sagittal": (2, 7, 4)}[view]
        vol[point] = 1
        col, row = display_xy(np.array(point), view, shape)
        assert display_slice(vol, view, index)[int(row), int(col)] == 1


# ----------------------------------------------------------------------------- the report


class PageParser(HTMLParser):
    """Links, images and the cases table's rows (cell data-sort values) of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.links, self.images, self.header, self.rows = [], [], [], []
        self._table = self._body = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a":
            self.links.append(attrs["href"])
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table":
            self._table = attrs.get("id") == "cases"
        elif self._table and tag == "tbody":
            self._body = True
        elif self._body and tag == "tr":
            self.rows.append([])
        elif self._body and tag == "td":
            self.rows[-1].append(attrs["data-sort"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = self._body = False

    def handle_data(self, data):
        if self._table and self.lasttag == "th":
            self.header.append(data)


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text())
    return parser


def copy_predictions(cases: dict[str, Path], pred_dir: Path) -> None:
    pred_dir.mkdir(parents=True, exist_ok=True)
    for cid, folder in cases.items():
        shutil.copy(next(folder.glob("*_seg.nii*")), pred_dir / f"{cid}.nii.gz")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Three factory cases with their truth as predictions, an uncertainty map, a broken and an
    escaped-name prediction; the report with --images and --gt."""
    root = tmp_path_factory.mktemp("report")
    cases = {f"case_{i}": write_case(root / "data", f"case_{i}", seed=i) for i in range(3)}
    preds = root / "preds"
    copy_predictions(cases, preds)
    seg = nib.load(preds / "case_0.nii.gz")
    uncertainty = np.where(np.asarray(seg.dataobj) > 0, 0.25, 0.9).astype(np.float32)
    nib.save(nib.Nifti1Image(uncertainty, seg.affine), preds / "case_0_uncertainty.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), seg.affine), preds / "case_2.nii.gz")  # wrong shape
    (preds / "garbage.nii.gz").write_bytes(b"not a nifti")
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj), seg.affine), preds / "odd <&> name.nii.gz")
    result = report(preds, images=root / "data", gt=root / "data", out=root / "out", progress=False)
    return root, result


def test_bad_inputs_are_one_line_each_and_the_rest_is_reported(built):
    root, result = built
    assert sorted(c.case_id for c in result.cases) == ["case_0", "case_1", "case_2", "odd <&> name"]
    assert set(result.failed) == {"garbage"}
    case_2 = next(c for c in result.cases if c.case_id == "case_2")  # measured, drawn without its images
    assert any(w.startswith("not drawn over its images: prediction ") and "case_2.nii.gz (shape (8, 8, 8)) and the "
               "images of case case_2 (shape (40, 40, 32)) have the same voxel size but not the same" in w for w in case_2.warnings)
    assert "garbage.nii.gz: cannot read NIfTI" in result.failed["garbage"]
    assert all("\n" not in m for m in result.failed.values())
    odd = next(c for c in result.cases if c.case_id == "odd <&> name")
    assert any("no images for this case" in w for w in odd.warnings)
    assert any("no ground truth" in w for w in odd.warnings) and odd.metrics is None
    assert not list((root / "out").rglob(".tmp-*"))


def test_index_links_every_case_and_every_image_exists(built):
    root, result = built
    index = parse(result.index)
    pages = {unquote(h) for h in index.links}
    assert pages == {f"cases/{c.case_id}.html" for c in result.cases}
    for page in [result.index, *result.pages]:
        parsed = parse(page)
        assert parsed.images, page
        for src in parsed.images:
            assert (page.parent / unquote(src)).is_file(), (page, src)
        for href in parsed.links:
            assert (page.parent / unquote(href)).is_file(), (page, href)
        text = page.read_text()  # self-contained: nothing fetched from elsewhere, on every page
        assert "http://" not in text and "https://" not in text and "<script src" not in text, page
    text = result.index.read_text()
    assert "odd &lt;&amp;&gt; name" in text and "odd <&> name" not in text


def test_table_equals_volumes_csv(built):
    root, result = built
    with open(result.csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    index = parse(result.index)
    keys = index.header[2:]
    assert keys == list(rows[0])[1:-3]  # every CSV column but the warnings', the notes' text and the model's
    failed = {r["case"]: r for r in rows if r["warning_text"].startswith("not reported: ")}
    assert list(failed) == list(result.failed) == ["garbage"]  # in the table too: no reader of it alone loses a case
    assert failed["garbage"]["warning_text"] == f"not reported: {result.failed['garbage']}"
    assert not any(failed["garbage"][k] for k in keys)
    rows = [r for r in rows if r["case"] not in failed]
    assert [r["case"] for r in rows] == [row[1] for row in index.rows]
    for row, cells in zip(rows, index.rows):
        for key, value in zip(keys, cells[2:]):
            assert value == row[key], (row["case"], key)
    case0 = next(r for r in rows if r["case"] == "case_0")
    # factory tumour: oedema box 12x12x10 around ET 6x6x6 around NCR 2x2x2, 1 mm voxels
    assert (case0["WT_cm3"], case0["enhancing_tumour_cm3"], case0["necrotic_core_cm3"]) == ("1.440", "0.208", "0.008")
    assert case0["lesions"] == "1" and case0["warnings"] == "0" and case0["warning_text"] == ""
    assert case0["notes"] == ("untagged prediction read as brats2020 labels (its images' dataset's; "
                              "--pred-labels to set)")  # said, not counted as a warning
    assert float(case0["WT_longest_mm"]) == pytest.approx(11 * SQRT2, abs=0.01)
    assert float(case0["ET_product_mm2"]) == pytest.approx(50.0, abs=0.01)
    assert float(case0["WT_dice"]) == 1.0 and case0["uncertainty"] == "0.2500"
    assert (case0["WT_lesion_dice"], case0["WT_lesion_hd95"], case0["WT_lesion_fp"]) == ("1.0000", "0.00", "0")
    assert rows[1]["uncertainty"] == ""


def test_case_page_shows_the_uncertainty_as_a_fourth_view(built):
    root, result = built
    case0 = next(c for c in result.cases if c.case_id == "case_0")
    assert set(case0.figures) == {"views", "diameters", "uncertainty", "thumbnail"}
    page = (root / "out/cases/case_0.html").read_text()
    assert "case_0_uncertainty.png" in page and "mean voxel uncertainty inside the predicted whole tumour" in page
    assert "case_1_uncertainty.png" not in (root / "out/cases/case_1.html").read_text()


def test_tagged_convention_cavity_and_odd_orientation_without_images(tmp_path):
    """A BraTS 2023 prediction (ET 3, cavity 4) stored with j superior: named volumes, measured on j."""
    labels = np.zeros((30, 24, 36), np.uint8)
    labels[5:20, 10:14, 8:30] = 2
    labels[8:14, 11:13, 10:20] = 3
    labels[15:18, 11:13, 22:26] = 4
    affine = np.array([[0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(labels, affine)
    img.header["descrip"] = b"tumorseg labels=brats2023:1,2,3,4"
    (tmp_path / "preds").mkdir()
    nib.save(img, tmp_path / "preds/p1.nii.gz")
    result = report(tmp_path / "preds", progress=False)
    (case,) = result.cases
    assert case.labels.name == "brats2023" and case.measures.enhancing.axis == 1
    assert case.measures.volumes_cm3 == pytest.approx({"necrotic core": 0.0, "oedema": 2.352, "enhancing tumour": 0.24,
                                                       "resection cavity": 0.048, "TC": 0.24, "WT": 2.592})
    assert case.measures.enhancing.longest == pytest.approx(np.hypot(5, 9))  # in-plane axes i and k, 1 mm
    row = next(csv.DictReader(result.csv.read_text().splitlines()))
    assert row["resection_cavity_cm3"] == "0.048" and row["enhancing_tumour_cm3"] == "0.240"
    assert all(p.is_file() for p in case.figures.values()) and "uncertainty" not in case.figures


def test_cli_report(built, tmp_path, capsys):
    root, _ = built
    preds = tmp_path / "preds"
    copy_predictions({"case_1": root / "data/case_1"}, preds)
    assert main(["report", str(preds)]) == 0
    assert "reported 1 case(s)" in capsys.readouterr().out and (preds / "report/index.html").is_file()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    (preds / "broken.nii.gz").write_bytes(b"x")
    assert main(["report", str(preds), "--out", str(tmp_path / "r")]) == 1
    assert "broken.nii.gz: cannot read NIfTI" in capsys.readouterr().err


def test_real_cases_truth_as_prediction(real_data_dir, tmp_path):
    cases = {p.name: p for p in sorted(p for p in real_data_dir.iterdir() if p.is_dir())[:2]}
    copy_predictions(cases, tmp_path / "preds")
    result = report(tmp_path / "preds", images=real_data_dir, gt=real_data_dir, out=tmp_path / "out", progress=False)
    assert not result.failed and len(result.cases) == 2
    with open(result.csv, newline="") as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh)}
    for cid in cases:
        img = nib.load(tmp_path / "preds" / f"{cid}.nii.gz")
        seg = np.asarray(img.dataobj)
        voxel = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
        expected = {"necrotic_core_cm3": seg == 1, "oedema_cm3": seg == 2, "enhancing_tumour_cm3": seg == 4,
                    "TC_cm3": np.isin(seg, (1, 4)), "WT_cm3": seg > 0}
        for key, mask in expected.items():
            assert float(rows[cid][key]) == pytest.approx(np.count_nonzero(mask) * voxel, abs=5e-4)
        assert all(float(rows[cid][f"{r}_dice"]) == 1.0 for r in ("WT", "TC", "ET"))
        assert all(float(rows[cid][f"{r}_lesion_dice"]) == 1.0 and rows[cid][f"{r}_lesion_fp"] == "0" for r in ("WT", "TC", "ET"))
        assert float(rows[cid]["WT_longest_mm"]) > float(rows[cid]["WT_perpendicular_mm"]) > 0


def test_uncertainty_score_is_the_mean_inside_the_whole_tumour():
    uncertainty = np.zeros((6, 6, 6), np.float32)
    uncertainty[0] = 5.0  # outside the tumour: not counted
    wt = np.zeros((6, 6, 6), bool)
    wt[2:4, 2:4, 2:4] = True
    uncertainty[2, 2:4, 2:4] = 0.5  # half the tumour's voxels
    assert uncertainty_score(uncertainty, wt) == pytest.approx(0.25)
    assert uncertainty_score(uncertainty, np.zeros_like(wt)) is None  # no tumour, no score


# ----------------------------------------------------------------------------- reads, masks, re-runs

SMALL = (24, 24, 20)


def small_cohort(root: Path, n: int) -> Path:
    """`n` small factory cases in `root/data`, their truth as predictions in `root/preds` (returned)."""
    cases = {f"case_{i}": write_case(root / "data", f"case_{i}", shape=SMALL, seed=i) for i in range(n)}
    copy_predictions(cases, root / "preds")
    return root / "preds"


def add_uncertainty(preds: Path, case_id: str) -> None:
    seg = nib.load(preds / f"{case_id}.nii.gz")
    nib.save(nib.Nifti1Image(np.full(seg.shape, 0.5, np.float32), seg.affine), preds / f"{case_id}_uncertainty.nii.gz")


def test_each_prediction_is_read_once_for_measures_figures_and_metrics(tmp_path, monkeypatch):
    preds = small_cohort(tmp_path, 2)
    moved = nib.load(preds / "case_1.nii.gz")  # 1 mm off its truth: reported, not scored
    affine = moved.affine.copy()
    affine[0, 3] += 1.0
    nib.save(nib.Nifti1Image(np.asarray(moved.dataobj), affine), preds / "case_1.nii.gz")
    reads: Counter[str] = Counter()
    load = nib.load

    def counting_load(filename, *args, **kwargs):
        reads[Path(filename).name] += 1
        return load(filename, *args, **kwargs)

    monkeypatch.setattr(nib, "load", counting_load)
    result = report(preds, images=tmp_path / "data", gt=tmp_path / "data", out=tmp_path / "out", progress=False)
    assert not result.failed and (reads["case_0.nii.gz"], reads["case_1.nii.gz"]) == (1, 1)
    case0, case1 = result.cases
    assert all(case0.metrics[r]["dice"] == 1.0 for r in ("WT", "TC", "ET")) and case0.warnings == []
    assert case1.metrics is None
    assert any(w.startswith("not scored against the ground truth") and "the same field of view" in w for w in case1.warnings)
    assert any(w.startswith("not drawn over its images") for w in case1.warnings)


def test_brain_and_whole_tumour_masks_are_computed_once_per_case(tmp_path, monkeypatch):
    """Measures, checks, uncertainty score and figures share one brain and one whole-tumour mask."""
    preds = small_cohort(tmp_path, 1)
    add_uncertainty(preds, "case_0")
    import tumorseg.report.case as report_case_module

    calls: Counter[str] = Counter()
    isin, brain_mask = np.isin, report_case_module.brain_mask

    def counting_isin(element, test_elements, *args, **kwargs):
        if np.shape(element) == SMALL and sorted(np.ravel(test_elements).tolist()) == sorted(TUMOUR_CLASSES["WT"]):
            calls["whole tumour"] += 1
        return isin(element, test_elements, *args, **kwargs)

    def counting_brain_mask(volumes):
        calls["brain"] += 1
        return brain_mask(volumes)

    monkeypatch.setattr(np, "isin", counting_isin)
    monkeypatch.setattr(report_case_module, "brain_mask", counting_brain_mask)
    (case,) = report(preds, images=tmp_path / "data", out=tmp_path / "out", progress=False).cases
    assert calls == {"whole tumour": 1, "brain": 1}
    assert case.uncertainty == pytest.approx(0.5) and case.warnings == []
    assert set(case.figures) == {"views", "diameters", "uncertainty", "thumbnail"}
    assert case.measures.volumes_cm3["WT"] == pytest.approx(1.44)


def test_rerun_removes_the_reports_stale_pages_and_figures_and_nothing_else(tmp_path, monkeypatch):
    preds = small_cohort(tmp_path, 3)
    add_uncertainty(preds, "case_0")
    out, cases = tmp_path / "out", tmp_path / "out" / "cases"
    report(preds, out=out, progress=False)
    assert {p.name for p in cases.glob("*.html")} == {"case_0.html", "case_1.html", "case_2.html"}
    user = {out / "notes.txt": "mine", cases / "notes.html": "mine", cases / "mine_views.png": "mine",
            cases / "case_9.html": "<!DOCTYPE html>\n<title>case_9: my own page</title>",
            cases / "case_2.txt": "mine"}
    for path, text in user.items():
        path.write_text(text)
    (preds / "case_2.nii.gz").unlink()  # gone from the run
    (preds / "case_1.nii.gz").write_bytes(b"broken")  # in the run but failed: its old page is stale too
    (preds / "case_0_uncertainty.nii.gz").unlink()  # case_0 no longer has an uncertainty view

    removed, unlink = [], Path.unlink

    def checked_unlink(self, *args, **kwargs):
        if self.parent == cases and self.exists():  # the index on disk never links to what goes
            index = parse(out / "index.html")
            assert f"cases/{self.name}" not in {unquote(u) for u in index.links + index.images}, self
            removed.append(self.name)
        return unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", checked_unlink)
    result = report(preds, out=out, progress=False)
    assert [c.case_id for c in result.cases] == ["case_0"] and set(result.failed) == {"case_1"}
    figures = [f"case_{i}_{k}.png" for i in (1, 2) for k in ("views", "diameters", "thumb")]
    assert sorted(removed) == sorted(["case_1.html", "case_2.html", "case_1.json", "case_2.json",
                                      "case_0_uncertainty.png", *figures])
    assert {p.name for p in cases.iterdir()} == {"case_0.html", "case_0.json", "case_0_views.png", "case_0_diameters.png",
                                                 "case_0_thumb.png", *(p.name for p in user if p.parent == cases)}
    assert all(path.read_text() == text for path, text in user.items())
    index = parse(result.index)
    assert {unquote(h) for h in index.links} == {"cases/case_0.html"}
    assert all((out / unquote(src)).is_file() for src in index.images)


def test_the_images_segmentations_are_scored_where_no_truth_is_given(tmp_path):
    """The views draw the images' segmentations as the ground truth: without `gt` they are scored
    too, and the index says where the truth came from; images without any give no metrics."""
    preds = small_cohort(tmp_path, 2)
    given = report(preds, images=tmp_path / "data", gt=tmp_path / "data", out=tmp_path / "given", progress=False)
    found = report(preds, images=tmp_path / "data", out=tmp_path / "found", progress=False)
    assert all(c.metrics for c in found.cases) and [c.metrics for c in found.cases] == [c.metrics for c in given.cases]
    assert found.csv.read_text() == given.csv.read_text()
    assert html.escape(f"ground truth: {tmp_path / 'data'} (the images' segmentations)") in found.index.read_text()
    (tmp_path / "data/case_1/case_1_seg.nii.gz").unlink()  # one case unlabelled: no truth asked for, no warning
    part = report(preds, images=tmp_path / "data", out=tmp_path / "part", progress=False)
    assert part.cases[0].metrics and not part.cases[1].metrics
    assert not any("ground truth" in w for w in part.cases[1].warnings), part.cases[1].warnings
    for seg in (tmp_path / "data").glob("*/*_seg.nii.gz"):
        seg.unlink()
    bare = report(preds, images=tmp_path / "data", out=tmp_path / "bare", progress=False)
    assert not any(c.metrics for c in bare.cases) and "dice" not in bare.csv.read_text().lower()
    assert "ground truth: not given" in bare.index.read_text()


def test_a_rerun_redoes_only_the_cases_whose_files_or_settings_changed(tmp_path, monkeypatch):
    """A report killed half-way, or run again, goes on from each case's record: the same pages and
    table, without reading or drawing again what did not change."""
    import tumorseg.report.build as build

    preds = small_cohort(tmp_path, 3)
    out = tmp_path / "out"
    first = report(preds, images=tmp_path / "data", gt=tmp_path / "data", out=out, progress=False)
    pages = {p.name: p.read_text() for p in (out / "cases").glob("*.html")}
    table = first.csv.read_text()
    done, real = [], build.report_case

    def counted(case_id, *args, **kwargs):
        done.append(case_id)
        return real(case_id, *args, **kwargs)

    monkeypatch.setattr(build, "report_case", counted)
    again = report(preds, images=tmp_path / "data", gt=tmp_path / "data", out=out, progress=False)
    assert done == [] and again.csv.read_text() == table
    assert {p.name: p.read_text() for p in (out / "cases").glob("*.html")} == pages
    assert [c.measures for c in again.cases] == [c.measures for c in first.cases]
    assert [c.metrics for c in again.cases] == [c.metrics for c in first.cases]

    os.utime(preds / "case_1.nii.gz", ns=(1, 1))  # a new prediction in place
    (out / "cases/case_2.json").write_text("{damaged")  # as a kill mid-write cannot leave, but a disk can
    (out / "cases/case_0_thumb.png").unlink()
    report(preds, images=tmp_path / "data", gt=tmp_path / "data", out=out, progress=False)
    assert done == ["case_0", "case_1", "case_2"]
    done.clear()
    report(preds, images=tmp_path / "data", out=out, progress=False)  # the images' segmentations: the same truth
    assert done == []
    report(preds, images=tmp_path / "data", out=out, progress=False, pred_labels="brats2020")  # another setting
    assert done == ["case_0", "case_1", "case_2"]
    done.clear()
    import tumorseg.report.record as record

    code = Path(record.__file__).parent.parent  # every module the digest names is there (a split module is not lost)
    for folder, names in (("report", record.CASE_CODE), ("evaluation", record.SCORING_CODE), ("plots", record.DRAWING_CODE)):
        assert all((code / folder / name).is_file() for name in names), (folder, names)
    monkeypatch.setattr(record, "_code_digest", lambda: "another version")  # measured or drawn anew
    report(preds, images=tmp_path / "data", out=out, progress=False)
    assert done == ["case_0", "case_1", "case_2"]
    done.clear()
    os.utime(tmp_path / "data/case_2/case_2_seg.nii.gz", ns=(1, 1))  # the images' segmentation is drawn too
    report(preds, images=tmp_path / "data", out=out, progress=False)
    assert done == ["case_2"]
    import shutil

    copy = shutil.copytree(out, tmp_path / "copy")  # a report copied elsewhere, run again there
    moved = report(preds, images=tmp_path / "data", out=copy, progress=False)
    assert done == ["case_2"] and all(p.parent == copy / "cases" for c in moved.cases for p in c.figures.values())
    assert "../out/" not in (copy / "cases/case_0.html").read_text()


def test_a_case_failing_after_its_figures_leaves_none_behind(tmp_path, monkeypatch):
    """A non-Tumorseg error while scoring (after the figures are drawn) fails that case alone,
    and its figures, which no page links, are removed."""
    import tumorseg.report.build as build

    preds = small_cohort(tmp_path, 2)
    score = build.score

    def failing_score(prediction, truth, gt, labels):
        if truth is not None and truth.case_id == "case_1":
            raise RuntimeError("scoring broke")
        return score(prediction, truth, gt, labels)

    monkeypatch.setattr(build, "score", failing_score)
    out = tmp_path / "out"
    result = report(preds, gt=tmp_path / "data", out=out, progress=False)
    assert [c.case_id for c in result.cases] == ["case_0"]
    assert result.failed == {"case_1": "case_1: RuntimeError: scoring broke"}
    assert sorted(p.name for p in (out / "cases").iterdir()) == [
        "case_0.html", "case_0.json", "case_0_diameters.png", "case_0_thumb.png", "case_0_views.png"]
    (out / "cases/case_5_views.png").write_bytes(b"mine, from before")  # not the report's: stays
    old = 1_000_000_000
    os.utime(out / "cases/case_5_views.png", (old, old))
    (preds / "case_5.nii.gz").write_bytes(b"broken")
    result = report(preds, gt=tmp_path / "data", out=out, progress=False)
    assert set(result.failed) == {"case_1", "case_5"} and (out / "cases/case_5_views.png").read_bytes() == b"mine, from before"


def test_untagged_predictions_are_read_in_a_named_convention_and_say_so(tmp_path):
    """Another tool's files carry no tag: the report reads them as the images' or the truth's dataset
    names, else guesses from the values, and notes which; `pred_labels` sets it."""
    training = np.zeros(SMALL, np.uint8)  # oedema around enhancing tumour around necrosis, 1 mm voxels
    training[4:16, 4:16, 4:14], training[7:13, 7:13, 6:12], training[9:11, 9:11, 8:10] = 2, 3, 1
    layout = tmp_path / "b23"
    (layout / "BraTS-GLI-00001-000").mkdir(parents=True)
    nib.save(nib.Nifti1Image(CONVENTIONS["brats2023"].from_training(training), AFFINE),
             layout / "BraTS-GLI-00001-000/BraTS-GLI-00001-000-seg.nii.gz")
    for name, conv in (("b23", "brats2023"), ("msd", "msd")):  # untagged files in either numbering
        (tmp_path / f"p{name}").mkdir()
        nib.save(nib.Nifti1Image(CONVENTIONS[conv].from_training(training), AFFINE),
                 tmp_path / f"p{name}/BraTS-GLI-00001-000.nii.gz")
    truth_volumes = {"necrotic core": 0.008, "oedema": 1.224, "enhancing tumour": 0.208, "TC": 0.216, "WT": 1.44}

    def one(pred: str, **kwargs):
        (case,) = report(tmp_path / pred, out=tmp_path / "out" / pred / str(len(kwargs)), progress=False,
                         **kwargs).cases
        return case

    case = one("pb23")  # no images, no truth: label 3 means BraTS 2023 numbers, a guess said aloud
    assert case.labels.name == "brats2023" and case.measures.volumes_cm3 == pytest.approx({**truth_volumes,
                                                                                          "resection cavity": 0.0})
    assert case.notes == ["untagged prediction read as brats2023 labels (guessed from its values; --pred-labels to set)"]
    assert case.warnings == []
    page = (tmp_path / "out/pb23/0/cases/BraTS-GLI-00001-000.html").read_text()
    assert "<h2>Warnings</h2>\n<p>none</p>" in page and "<h2>Notes</h2>" in page and "guessed from its values" in page
    case = one("pmsd", gt=layout)  # MSD numbers are valid BraTS 2023 values: read as the truth's, and said so
    assert case.labels.name == "brats2023" and "its ground truth's" in case.notes[0]
    assert case.metrics["TC"]["dice"] < 1.0
    case = one("pmsd", gt=layout, pred_labels="msd")
    assert case.notes == [] and case.measures.volumes_cm3 == pytest.approx(truth_volumes)
    assert all(case.metrics[r]["dice"] == 1.0 for r in ("WT", "TC", "ET"))


def _tag(path: Path, model: str) -> None:
    img = nib.load(path)
    img.header["descrip"] = f"tumorseg labels=brats2020:1,2,4 model={model}".encode()
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), path)


def test_the_model_that_made_each_prediction_and_a_warning_when_several_did(tmp_path):
    cases = {f"case_{i}": write_case(tmp_path / "data", f"case_{i}", seed=i) for i in range(3)}
    copy_predictions(cases, tmp_path / "preds")
    for cid in cases:
        _tag(tmp_path / "preds" / f"{cid}.nii.gz", "aaaaaaaaaaaa")
    one = report(tmp_path / "preds", out=tmp_path / "one", progress=False)
    assert [c.model for c in one.cases] == ["aaaaaaaaaaaa"] * 3
    index = one.index.read_text()
    assert "predict recorded): aaaaaaaaaaaa</li>" in index and "several models" not in index
    assert "model aaaaaaaaaaaa)" in one.pages[0].read_text()
    with open(one.csv, newline="") as fh:
        assert [row["model"] for row in csv.DictReader(fh)] == ["aaaaaaaaaaaa"] * 3
    _tag(tmp_path / "preds" / "case_2.nii.gz", "bbbbbbbbbbbb")
    mixed = report(tmp_path / "preds", out=tmp_path / "mixed", progress=False).index.read_text()
    assert "Predictions of several models" in mixed and "aaaaaaaaaaaa (2 cases), bbbbbbbbbbbb (1 cases)" in mixed


def test_pages_fit_a_phone_and_name_their_units(built):
    """A viewport and a scrolling box round every table (a phone's 390 px); millimetres and bits
    named; a mean count keeps two decimals (0.25 lesions is not "0.2")."""
    import re

    from tumorseg.report.table import Column, summary

    root, result = built
    for page in [result.index, *result.pages]:
        text = page.read_text()
        assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in text, page
        assert text.count("<table") == text.count('<div class="scroll"><table'), page
    case0 = (result.index.parent / "cases/case_0.html").read_text()
    assert "<th>hd95 (mm)</th>" in case0 and "<th>lesion_hd95 (mm)</th>" in case0
    assert re.search(r"<p>score 0\.2500 bits: the mean voxel uncertainty", case0)
    count = Column("lesion_fp", "false positives", 0, lambda n: n, summary=True)  # the cases stand for their counts
    assert summary([0, 0, 0, 1], [count])["lesion_fp"] == {"n": "4", "mean": "0.25", "median": "0.00", "min": "0",
                                                        "max": "1"}


def test_diameters_are_drawn_on_the_lesion_of_images_stored_otherwise(tmp_path):
    """A prediction stored RAS or sagittally over LPS images is measured on its own grid: its segments
    are moved onto the images' grid to be drawn (they were drawn with the images' axes, off the lesion)."""
    folder = write_case(tmp_path / "data", "case_0", seed=0)
    seg = nib.load(next(folder.glob("*_seg.nii.gz")))
    data = np.asarray(seg.dataobj)
    shape = data.shape
    ras = seg.affine @ np.array([[-1, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    sagittal = seg.affine[:, [2, 1, 0, 3]]  # stored k, j, i
    from scipy import ndimage

    half = [[0.5, 0, 0, -0.25], [0, 0.5, 0, -0.25], [0, 0, 0.5, -0.25], [0, 0, 0, 1]]
    fine = seg.affine @ np.array(half)  # the prediction at 0.5 mm over 1 mm images, the same field of view
    for name, array, affine in (("lps", data, seg.affine), ("ras", data[::-1, ::-1], ras),
                                ("sal", data.transpose(2, 1, 0), sagittal),
                                ("fine", ndimage.zoom(data, 2, order=0, grid_mode=True, mode="grid-constant"), fine)):
        (tmp_path / name).mkdir()
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), tmp_path / name / "case_0.nii.gz")
    drawn = []  # where the segments are drawn: on the images' voxels of the lesion
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Diameters, "onto", lambda self, move, axis, real=Diameters.onto: drawn.append(real(self, move, axis))
                   or drawn[-1])
        results = {name: report(tmp_path / name, images=tmp_path / "data", out=tmp_path / f"out-{name}", progress=False)
                   for name in ("lps", "ras", "sal", "fine")}
    assert not any(r.failed for r in results.values())
    pictures = {name: (tmp_path / f"out-{name}/cases/case_0_diameters.png").read_bytes() for name in ("lps", "ras", "sal")}
    assert pictures["ras"] == pictures["lps"] and pictures["sal"] == pictures["lps"]
    lesion = nib.load(tmp_path / "lps/case_0.nii.gz").get_fdata()
    assert drawn and results["fine"].cases[0].measures.whole is not None
    for d in drawn:
        for end in (*d.longest_ends, *d.perpendicular_ends):
            assert lesion[tuple(int(round(v)) for v in end)] > 0, (d, end)


def test_a_probability_map_given_as_labels_is_one_line_naming_the_case(tmp_path):
    """Its line had run on into how untagged labels are read, in nested brackets, and named no case."""
    for i in range(2):
        write_case(tmp_path / "data", f"c{i}", seed=i)
    seg = nib.load(tmp_path / "data/c1/c1_seg.nii.gz")
    (tmp_path / "preds").mkdir()
    shutil.copy(tmp_path / "data/c0/c0_seg.nii.gz", tmp_path / "preds/c0.nii.gz")
    probs = np.linspace(0, 1, np.prod(seg.shape), dtype=np.float32).reshape(seg.shape)
    nib.save(nib.Nifti1Image(probs, seg.affine), tmp_path / "preds/c1.nii.gz")
    result = report(tmp_path / "preds", images=tmp_path / "data", out=tmp_path / "out", progress=False)
    message = result.failed["c1"]
    assert message.startswith("c1: ") and message.endswith("a probability or intensity map, not labels"), message


def test_a_case_named_with_a_newline_is_scored_and_reported(tmp_path):
    """A name holding a newline (a file system takes any byte but / and NUL): evaluate had scored its
    prediction as missing (Dice 0) and report had left it out without a word."""
    from tumorseg.evaluation import evaluate

    cases = {cid: write_case(tmp_path / "data", cid, shape=SMALL, seed=i) for i, cid in enumerate(["plain", "two\nlines"])}
    copy_predictions(cases, tmp_path / "preds")
    scores = evaluate(tmp_path / "preds", tmp_path / "data", progress=False)
    assert sorted(c.case_id for c in scores.rows) == ["plain", "two\nlines"] and not scores.missing
    assert all(c.status == "ok" and c.metrics["WT"]["dice"] == 1.0 for c in scores.rows)
    reported = report(tmp_path / "preds", images=tmp_path / "data", out=tmp_path / "out", progress=False)
    assert sorted(c.case_id for c in reported.cases) == ["plain", "two\nlines"] and not reported.failed


def test_a_damaged_scan_costs_its_own_view_not_the_case(tmp_path, capsys):
    """A T1 cut short (which a model reading T1CE, T2 and FLAIR never needed): the case is reported
    and drawn from the scans that can be read, with a warning naming the file (it had been a row of
    blanks, its volumes and diameters lost)."""
    from tumorseg.plots import save_case_plot

    preds = small_cohort(tmp_path, 2)
    t1 = tmp_path / "data/case_0/case_0_t1.nii.gz"
    t1.write_bytes(t1.read_bytes()[:400])
    result = report(preds, images=tmp_path / "data", out=tmp_path / "out", progress=False)
    assert not result.failed and [c.case_id for c in result.cases] == ["case_0", "case_1"]
    (damaged,) = [w for w in result.cases[0].warnings if w.startswith("not drawn: ")]
    assert str(t1) in damaged and not any("not drawn" in w for w in result.cases[1].warnings)
    assert html.escape(damaged) in (tmp_path / "out/cases/case_0.html").read_text()
    save_case_plot(tmp_path / "data/case_0", preds / "case_0.nii.gz", tmp_path / "case_0.png")
    assert f"warning: not drawn: case_0: {t1}: " in capsys.readouterr().err and (tmp_path / "case_0.png").is_file()
    for name in ("t1ce", "t2", "flair"):
        (tmp_path / f"data/case_0/case_0_{name}.nii.gz").write_bytes(b"")
    with pytest.raises(TumorsegError, match="case_0"):  # nothing to draw: the case's own line, as before
        save_case_plot(tmp_path / "data/case_0", preds / "case_0.nii.gz", tmp_path / "none.png")
