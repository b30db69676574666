"""Slice figures: real PNGs of the expected size, slice choice, inputs checked."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from factory import AFFINE, write_case

from tumorseg.cli import main
from tumorseg.errors import TumorsegError
from tumorseg.plots import save_case_plot
from tumorseg.labels import to_raw_labels
from tumorseg.layouts import write_dataset_json
import tumorseg.plots.slices as slices_module
from tumorseg.plots.case_images import load_case, load_prediction
from tumorseg.plots.slices import DPI, MARGIN_INCHES, PANEL_INCHES, choose_slices, display_slice
from tumorseg.prepare import PrepareConfig, prepare

SHAPE = (40, 40, 32)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def expected_size(nrows: int, ncols: int) -> tuple[int, int]:
    return round(PANEL_INCHES * ncols * DPI), round((PANEL_INCHES * nrows + MARGIN_INCHES) * DPI)


@pytest.fixture(scope="module")
def raw_case(tmp_path_factory) -> Path:
    return write_case(tmp_path_factory.mktemp("raw"), "case_a", SHAPE)


def test_raw_case_without_prediction(raw_case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = save_case_plot(raw_case)
    assert out == tmp_path / "case_a.png"
    assert png_size(out) == expected_size(3, 4 + 1)  # 4 modalities + ground truth
    assert not list(tmp_path.glob(".tmp-*"))


def test_raw_case_with_nifti_prediction(raw_case, tmp_path, capsys):
    seg = nib.load(raw_case / "case_a_seg.nii.gz")
    pred = tmp_path / "case_a_pred.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj)[::-1].copy(), AFFINE), pred)
    out = save_case_plot(raw_case, pred, tmp_path / "figs" / "a.png")
    assert png_size(out) == expected_size(3, 4 + 2) and "not named for this case" not in capsys.readouterr().err
    other = tmp_path / "case_b.nii.gz"  # another case's prediction on a grid of the same shape
    other.write_bytes(pred.read_bytes())
    save_case_plot(raw_case, other, tmp_path / "figs" / "b.png")
    assert ("note: case_a: the prediction case_b.nii.gz is not named for this case (predict writes case_a.nii.gz)"
            in capsys.readouterr().err)
    longer = tmp_path / "case_ab.nii.gz"  # a name that merely begins with the case's
    longer.write_bytes(pred.read_bytes())
    save_case_plot(raw_case, longer, tmp_path / "figs" / "c.png")
    assert "case_ab.nii.gz is not named for this case" in capsys.readouterr().err


def test_single_view_and_slice(raw_case, tmp_path):
    out = save_case_plot(raw_case, out=tmp_path / "a.png", slice_index=3, views="coronal")
    assert png_size(out) == expected_size(1, 5)
    with pytest.raises(TumorsegError, match="slice 32 is outside the axial range 0..31"):
        save_case_plot(raw_case, out=tmp_path / "b.png", slice_index=32, views="all")
    with pytest.raises(TumorsegError, match="unknown view 'top'"):
        save_case_plot(raw_case, out=tmp_path / "b.png", views=("axial", "top"))


def test_case_without_segmentation(tmp_path):
    folder = write_case(tmp_path, "case_b", SHAPE, seg=None)
    out = save_case_plot(folder, out=tmp_path / "b.png")
    assert png_size(out) == expected_size(3, 4)


def test_prepared_case(tmp_path):
    write_case(tmp_path / "raw", "case_p1", SHAPE, seed=1)
    write_case(tmp_path / "raw", "case_p2", SHAPE, seed=2)
    prepare(tmp_path / "raw", tmp_path / "prep", PrepareConfig(crop_size=(32, 32, 24)), workers=1, progress=False)
    image = tmp_path / "prep" / "images" / "case_p1.npy"
    mask = np.load(tmp_path / "prep" / "masks" / "case_p1.npy")
    pred = tmp_path / "pred.npy"
    np.save(pred, mask)
    assert 3 in mask and np.array_equal(load_case(image).truth, mask)  # training labels: ET stays 3
    assert np.array_equal(load_prediction(pred, load_case(image)), mask)
    np.save(tmp_path / "brats.npy", to_raw_labels(mask))  # BraTS numbers (ET 4) are converted
    assert np.array_equal(load_prediction(tmp_path / "brats.npy", load_case(image)), mask)
    kept = np.where(mask == 3, 4, mask)  # a prepared mask with the cavity kept (4) and no ET: as it is
    np.save(tmp_path / "prep" / "masks" / "case_p1.npy", kept)
    assert np.array_equal(load_case(image).truth, kept)
    out = save_case_plot(image, pred, tmp_path / "p.png")
    assert png_size(out) == expected_size(3, 3 + 2)  # T2, T1CE, FLAIR + truth + prediction
    # a full-size NIfTI prediction is cropped with the manifest's crop box
    full = tmp_path / "raw" / "case_p1" / "case_p1_seg.nii.gz"
    assert png_size(save_case_plot(image, full, tmp_path / "q.png")) == expected_size(3, 5)
    finished = load_case(image)
    (tmp_path / "prep" / "manifest.json").unlink()  # a prepare under way or cut short: the case's own record
    during = load_case(image)
    assert during.names == finished.names == ("t2", "t1ce", "flair") and during.crop_box == finished.crop_box
    assert np.array_equal(during.affine, finished.affine)


def test_prediction_shape_mismatch(raw_case, tmp_path):
    pred = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 30), np.uint8), AFFINE), pred)
    message = (r"bad\.nii\.gz \(shape \(40, 40, 30\)\) and the images \(shape \(40, 40, 32\)\) have the same voxel "
               r"size but not the same field of view")
    with pytest.raises(TumorsegError, match=message):
        save_case_plot(raw_case, pred, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_a_prediction_stored_in_another_orientation_is_drawn_in_place(raw_case, tmp_path):
    from tumorseg.plots.case_images import load_case, load_prediction

    seg = nib.load(raw_case / "case_a_seg.nii.gz")
    flip = np.array([[-1, 0, 0, SHAPE[0] - 1], [0, -1, 0, SHAPE[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj)[::-1, ::-1].copy(), seg.affine @ flip), tmp_path / "ras.nii.gz")
    data = load_case(raw_case)
    assert np.array_equal(load_prediction(tmp_path / "ras.nii.gz", data), data.truth)


def test_a_truth_that_cannot_be_placed_is_left_out_and_said(raw_case, tmp_path, capsys):
    import shutil

    from tumorseg.plots.case_images import load_case

    case = tmp_path / "case_a"
    shutil.copytree(raw_case, case)
    seg = nib.load(case / "case_a_seg.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj)[:, :, :-2].copy(), seg.affine), case / "case_a_seg.nii.gz")
    data = load_case(case)
    assert data.truth is None and data.truth_note.startswith("ground truth not drawn: case_a_seg.nii.gz (shape ")
    save_case_plot(case, out=tmp_path / "x.png")  # the scans are still drawn, and the reason said
    assert (tmp_path / "x.png").exists() and "warning: case_a: ground truth not drawn" in capsys.readouterr().err


def test_one_case_of_a_dataset_or_case_list_by_id_or_by_its_prediction(tmp_path, capsys):
    """A folder or cases.csv of several cases: the case `--case` names, else the one the prediction is named for."""
    for name in ("case_a", "case_b"):
        write_case(tmp_path / "data", name, SHAPE)
    rows = ["case,t1,t1ce,t2,flair,seg"] + [",".join([c, *(f"data/{c}/{c}_{m}.nii.gz" for m in
                                                           ("t1", "t1ce", "t2", "flair", "seg"))]) for c in ("case_a", "case_b")]
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    pred = tmp_path / "preds" / "case_b.nii.gz"
    pred.parent.mkdir()
    pred.write_bytes((tmp_path / "data/case_b/case_b_seg.nii.gz").read_bytes())
    for given in (tmp_path / "data", tmp_path / "cases.csv"):
        assert load_case(given, "case_b").case_id == "case_b"
        out = save_case_plot(given, pred, tmp_path / "b.png")
        assert png_size(out) == expected_size(3, 4 + 2) and "not named" not in capsys.readouterr().err
        with pytest.raises(TumorsegError, match=r"holds 2 cases; .* or name the case \(--case ID\)"):
            save_case_plot(given, out=tmp_path / "x.png")
        with pytest.raises(TumorsegError, match="no case case_z among its 2"):
            save_case_plot(given, pred, tmp_path / "x.png", case_id="case_z")
    with pytest.raises(TumorsegError, match="no case case_b among its 1"):  # one case there, but not that one
        save_case_plot(tmp_path / "data/case_a", out=tmp_path / "x.png", case_id="case_b")
    assert main(["show", str(tmp_path / "cases.csv"), "--case", "case_a", "--out", str(tmp_path / "a.png")]) == 0
    assert png_size(tmp_path / "a.png") == expected_size(3, 4 + 1)


def test_missing_files(raw_case, tmp_path):
    with pytest.raises(TumorsegError, match="nope.nii.gz: file not found"):
        save_case_plot(raw_case, tmp_path / "nope.nii.gz", tmp_path / "x.png")
    with pytest.raises(TumorsegError, match="nope.npy: file not found"):
        save_case_plot(tmp_path / "images" / "nope.npy", out=tmp_path / "x.png")
    with pytest.raises(TumorsegError, match="no such"):
        save_case_plot(tmp_path / "no_case", out=tmp_path / "x.png")


def test_bad_prediction_labels(raw_case, tmp_path):
    pred = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.full(SHAPE, 3, np.uint8), AFFINE), pred)
    with pytest.raises(TumorsegError, match=r"bad\.nii\.gz has labels 3 outside the brats2020 labels 0, 1, 2, 4 \(label 3: "):
        save_case_plot(raw_case, pred, tmp_path / "x.png")


def test_choose_slices_picks_most_tumour():
    mask = np.zeros((20, 30, 10), np.uint8)
    mask[5, 2:8, 2:4] = 1  # 12 voxels: sagittal 5, coronal 2..7 (2 each), axial 2, 3 (6 each)
    mask[7:10, 20, 6] = 2  # 3 voxels: coronal 20
    mask[12, 10:25, 6] = 3  # 15 voxels: sagittal 12 (most), coronal 10..24 (1 each), axial 6
    assert choose_slices(mask) == {"axial": 6, "coronal": 20, "sagittal": 12}
    tied = np.zeros((8, 8, 9), np.uint8)
    tied[2:4, 2:4, 3:8] = 2  # axial slices 3..7 tie: the middle one, 5
    assert choose_slices(tied, views=("axial",)) == {"axial": 5}
    brain = np.zeros(mask.shape, bool)
    brain[2:11, 4:9, 0:5] = True
    assert choose_slices(np.zeros_like(mask), brain) == {"axial": 2, "coronal": 6, "sagittal": 6}
    assert choose_slices(None, np.zeros_like(brain), ("axial",)) == {"axial": 5}


def test_display_is_upright():
    vol = np.zeros((4, 5, 6))
    vol[0, 0, 5] = 1  # patient right, anterior, superior (LPS voxel order)
    axial = display_slice(vol, "axial", 5)
    assert axial.shape == (5, 4) and axial[0, 0] == 1  # anterior at top, right on the left
    coronal = display_slice(vol, "coronal", 0)
    assert coronal.shape == (6, 4) and coronal[0, 0] == 1  # superior at top
    sagittal = display_slice(vol, "sagittal", 0)
    assert sagittal.shape == (6, 5) and sagittal[0, 0] == 1  # superior at top, anterior on the left


def test_reoriented_case_matches(tmp_path):
    """A case stored in RAS order gives the same picture as the BraTS (LPS) original."""
    lps = write_case(tmp_path / "lps", "case_o", SHAPE, seg=True)
    ras = tmp_path / "ras" / "case_o"
    ras.mkdir(parents=True)
    for path in lps.iterdir():
        img = nib.load(path)
        data = np.asarray(img.dataobj)[::-1, ::-1]
        affine = img.affine @ np.array([[-1, 0, 0, SHAPE[0] - 1], [0, -1, 0, SHAPE[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
        nib.save(nib.Nifti1Image(data, affine), ras / path.name)
    ras_affine = nib.load(next(ras.iterdir())).affine
    assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
    with pytest.MonkeyPatch.context() as mp:  # the pixels alike; the titles name each file's own slices
        mp.setattr(slices_module, "slice_title", lambda transform, shape, view, index: view)
        a = save_case_plot(lps, out=tmp_path / "a.png")
        b = save_case_plot(ras, out=tmp_path / "b.png")
        assert a.read_bytes() == b.read_bytes()
        k = SHAPE[0] - 1 - 3  # --slice is the file's slice: the RAS file's 3 is the LPS file's k
        a = save_case_plot(lps, out=tmp_path / "a.png", slice_index=k, views="sagittal")
        b = save_case_plot(ras, out=tmp_path / "b.png", slice_index=3, views="sagittal")
        assert a.read_bytes() == b.read_bytes()
    turned = slices_module.lps_transform(ras_affine)
    assert slices_module.slice_title(turned, SHAPE, "sagittal", k) == "sagittal slice 3"
    assert slices_module.slice_title(turned, SHAPE, "axial", 5) == "axial slice 5"  # k runs superior in both
    sagittal_stored = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]])  # i superior, k left
    assert slices_module.slice_title(slices_module.lps_transform(sagittal_stored), SHAPE, "axial", 2) == \
        "axial slice 2 (voxel axis i)"


def test_each_panels_letters_sit_at_the_edges_they_name():
    """`mark_sides` puts SIDES' top, bottom, left and right letters at those edges of the panel."""
    from tumorseg.plots.canvas import figure_grid

    for view, letters in slices_module.SIDES.items():
        _, axes = figure_grid(1, 1, (3, 3))
        slices_module.mark_sides(axes[0, 0], view)
        placed = {t.get_text(): t.get_position() for t in axes[0, 0].texts}
        (top, bottom, left, right) = letters
        assert placed[top][1] > 0.9 and placed[bottom][1] < 0.1, view
        assert placed[left][0] < 0.1 and placed[right][0] > 0.9, view


def test_the_lettered_sides_are_the_patients():
    """Each view's letters name the edge where a voxel at that side of the patient is drawn."""
    vol = np.zeros((4, 5, 6))
    toward = {"R": (0, 0), "L": (0, 3), "A": (1, 0), "P": (1, 4), "I": (2, 0), "S": (2, 5)}  # LPS axis, index
    for view, (top, bottom, left, right) in slices_module.SIDES.items():
        for letter, (row, col) in ((top, (0, None)), (bottom, (-1, None)), (left, (None, 0)), (right, (None, -1))):
            axis, index = toward[letter]
            vol[:] = 0
            vol[(slice(None),) * axis + (index,)] = 1  # the patient's whole side `letter`
            middle = vol.shape[slices_module.VIEW_AXIS[view]] // 2
            shown = display_slice(vol, view, middle)
            edge = shown[row] if row is not None else shown[:, col]
            assert edge.all() and shown.sum() == edge.size, (view, letter)


@pytest.mark.real
def test_real_case_with_its_segmentation(real_data_dir, tmp_path):
    folder = real_data_dir / "Brats18_2013_2_1"
    out = save_case_plot(folder, folder / "Brats18_2013_2_1_seg.nii.gz", tmp_path / "real.png")
    assert png_size(out) == expected_size(3, 6)
    import matplotlib.image

    pixels = matplotlib.image.imread(out)
    assert pixels.shape[:2] == expected_size(3, 6)[::-1]


@pytest.mark.parametrize("validated", [False, True])
def test_training_curves_png(tmp_path, validated, recwarn):
    from tumorseg.plots import plot_curves

    history = [{"epoch": e, "train_loss": 1.0 / e} for e in (1, 2, 3)]
    if validated:
        history[-1].update(val_loss=0.4, dice_WT=0.8, dice_TC=0.6, dice_ET=0.5, dice_mean=0.63)
    plot_curves(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not [w for w in recwarn if "legend" in str(w.message)]  # no empty legend before validation


def test_another_tools_prediction_is_read_in_the_convention_named(raw_case, tmp_path, capsys):
    """nnU-Net's files hold MSD numbers (3 enhancing): --pred-labels names them; untagged, a note
    says how they were read; a probability map is refused in a line, not its million values."""
    from tumorseg.labels import CONVENTIONS

    seg = nib.load(raw_case / "case_a_seg.nii.gz")
    data = load_case(raw_case)
    msd = CONVENTIONS["msd"].from_training(data.truth)
    nib.save(nib.Nifti1Image(msd, seg.affine), tmp_path / "case_a.nii.gz")
    capsys.readouterr()
    assert np.array_equal(load_prediction(tmp_path / "case_a.nii.gz", data, CONVENTIONS["msd"]), data.truth)
    assert "untagged" not in capsys.readouterr().err
    assert main(["show", str(raw_case), "--pred", str(tmp_path / "case_a.nii.gz"), "--pred-labels", "msd",
                 "--out", str(tmp_path / "a.png")]) == 0
    with pytest.raises(TumorsegError, match=r"case_a\.nii\.gz has labels 3 outside the brats2020 labels 0, 1, 2, 4 "
                                            r"\(label 3: enhancing tumour in BraTS 2023\+, MSD and nnU-Net numbers"):
        load_prediction(tmp_path / "case_a.nii.gz", data)
    assert "note: case_a: untagged prediction read as brats2020 labels (the case's; --pred-labels to set)" in \
        capsys.readouterr().err
    write_dataset_json(tmp_path, "nnunet")  # nnU-Net's output folder: its dataset.json names the numbers
    assert np.array_equal(load_prediction(tmp_path / "case_a.nii.gz", data), data.truth)
    assert "untagged prediction read as msd labels (the dataset.json beside it; --pred-labels to set)" in \
        capsys.readouterr().err
    (tmp_path / "dataset.json").unlink()
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random(SHAPE, dtype=np.float32), seg.affine), tmp_path / "case_a.nii.gz")
    assert main(["show", str(raw_case), "--pred", str(tmp_path / "case_a.nii.gz"), "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert re.search(r"case_a\.nii\.gz has \d{5} non-integer values \([\d.e-]+ to 0\.\d+\): a probability or "
                     r"intensity map, not labels$", err) and len(err) < 300, err


def test_arrays_in_a_convention_and_predict_cases_result(raw_case, tmp_path):
    """An array of MSD numbers is read in the convention named; `predict_case`'s result in its own
    (a notebook drawing `predict_case(...)` of an MSD case would otherwise swap oedema and core)."""
    from tumorseg.inference import CasePrediction
    from tumorseg.labels import CONVENTIONS

    data = load_case(raw_case)
    msd = CONVENTIONS["msd"].from_training(data.truth)
    assert not np.array_equal(load_prediction(msd, data), data.truth)  # read as training labels, as documented
    assert np.array_equal(load_prediction(msd, data, CONVENTIONS["msd"]), data.truth)
    result = CasePrediction(msd, None, AFFINE, None, CONVENTIONS["msd"])
    assert np.array_equal(load_prediction(result, data), data.truth)
    np.save(tmp_path / "case_a.npy", msd)  # a .npy file too
    assert np.array_equal(load_prediction(tmp_path / "case_a.npy", data, CONVENTIONS["msd"]), data.truth)


def test_drawing_leaves_the_callers_matplotlib_as_it_was(raw_case, tmp_path):
    """No backend switched (a notebook's inline one) and no figure left open in pyplot."""
    import matplotlib
    import matplotlib.pyplot as plt

    from tumorseg.plots import plot_curves

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        save_case_plot(raw_case, out=tmp_path / "a.png")
        plot_curves([{"epoch": 1, "train_loss": 1.0}], tmp_path / "curves.png")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
    finally:
        matplotlib.use(before)
    assert png_size(tmp_path / "a.png") == expected_size(3, 4 + 1)
