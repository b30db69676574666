import json

import nibabel as nib
import numpy as np
import pytest

from tumorseg.cli import main
from tumorseg.errors import TumorsegError
from tumorseg.io import load_nifti
from tumorseg.labels import to_training_labels
from tumorseg.prepare import PrepareConfig, prepare, uncrop
from tumorseg.prepare.scaling import scale
from tumorseg.prepare.split import split_cases

from factory import AFFINE, write_case

SMALL = dict(crop_size=(32, 32, 24))


def _nii(folder, case_id, kind):
    return folder / case_id / f"{case_id}_{kind}.nii.gz"


def test_minmax_and_zscore_scaling():
    v = np.array([[[0, 10], [20, 40]]], dtype=np.int16)
    brain = v != 0
    assert np.allclose(scale(v, "minmax", brain), v / 40)
    z = scale(v, "zscore", brain)
    vals = np.array([10, 20, 40.0])
    assert z[0, 0, 0] == 0 and np.allclose(z[brain], (vals - vals.mean()) / vals.std())
    assert scale(v, "minmax", brain, (slice(None), slice(1, 2), slice(None))).shape == (1, 1, 2)


def test_channels_relabel_and_crop_box_round_trip(tmp_path):
    write_case(tmp_path / "raw", "c1")
    cfg = PrepareConfig(channels=("flair", "t1"), **SMALL)
    res = prepare(tmp_path / "raw", tmp_path / "out", cfg, workers=1, progress=False)
    image = np.load(tmp_path / "out/images/c1.npy")
    mask = np.load(tmp_path / "out/masks/c1.npy")
    assert image.shape == (2, 32, 32, 24) and image.dtype == np.float32
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1, 2, 3}
    raw_flair = load_nifti(_nii(tmp_path / "raw", "c1", "flair")).data
    rec = res.manifest["cases"][0]
    box = [tuple(b) for b in rec["crop_box"]]
    assert box == [(4, 36), (4, 36), (4, 28)]
    back = uncrop(image[0], box, (40, 40, 32))
    expected = (raw_flair - raw_flair.min()) / (raw_flair.max() - raw_flair.min())
    assert np.allclose(back[4:36, 4:36, 4:28], expected[4:36, 4:36, 4:28])
    seg = load_nifti(_nii(tmp_path / "raw", "c1", "seg")).data
    assert np.array_equal(uncrop(mask, box, seg.shape)[4:36, 4:36, 4:28], to_training_labels(seg)[4:36, 4:36, 4:28])
    assert rec["status"] == "kept" and rec["affine"][1][3] == 239 and rec["shape"] == [40, 40, 32]


def test_drop_rule_and_manifest(tmp_path):
    small = np.zeros((40, 40, 32), np.uint8)
    small[20, 20, 16] = 2  # one voxel: far below 1 %
    write_case(tmp_path / "raw", "big")
    write_case(tmp_path / "raw", "tiny", seg=small)
    write_case(tmp_path / "raw", "val_only", seg=None)
    res = prepare(tmp_path / "raw", tmp_path / "out", PrepareConfig(**SMALL), workers=1, progress=False)
    status = {c["case_id"]: c["status"] for c in res.manifest["cases"]}
    assert status == {"big": "kept", "tiny": "dropped", "val_only": "unlabelled"}
    tiny = next(c for c in res.manifest["cases"] if c["case_id"] == "tiny")
    assert "tumour fraction" in tiny["reason"] and tiny["tumour_fraction"] == pytest.approx(1 / (32 * 32 * 24), rel=1e-3)
    assert not (tmp_path / "out/images/tiny.npy").exists()
    assert (tmp_path / "out/images/val_only.npy").exists() and not (tmp_path / "out/masks/val_only.npy").exists()
    on_disk = json.loads((tmp_path / "out/manifest.json").read_text())
    assert on_disk["counts"] == {"kept": 1, "dropped": 1, "unlabelled": 1, "failed": 0}
    res = prepare(tmp_path / "raw", tmp_path / "out2", {"min_tumour": 0.0, **SMALL}, workers=1, progress=False)  # a dict
    assert res.kept == ["big", "tiny"]
    with pytest.raises(TumorsegError, match=r"^prepare: config must be a PrepareConfig or a dict, not str$"):
        prepare(tmp_path / "raw", tmp_path / "out3", "seed", workers=1, progress=False)


def test_split_is_deterministic_and_seeded():
    ids = [f"c{i:02d}" for i in range(20)]
    a = split_cases(ids, 0.25, 42)
    assert a == split_cases(list(reversed(ids)), 0.25, 42)
    assert len(a["val"]) == 5 and sorted(a["train"] + a["val"]) == ids
    assert split_cases(ids, 0.25, 1) != a
    assert split_cases(["a", "b"], 0.25, 0)["val"] and split_cases(["a"], 0.25, 0)["val"] == []


def test_resumable_and_force(tmp_path):
    for i in range(3):
        write_case(tmp_path / "raw", f"c{i}", seed=i)
    cfg = PrepareConfig(**SMALL)
    first = prepare(tmp_path / "raw", tmp_path / "out", cfg, workers=2, progress=False)
    assert first.skipped == 0 and len(first.kept) == 3
    stamp = (tmp_path / "out/images/c1.npy").stat().st_mtime_ns
    (tmp_path / "out/images/c2.npy").unlink()  # as if killed while writing c2
    again = prepare(tmp_path / "raw", tmp_path / "out", cfg, workers=1, progress=False)
    assert again.skipped == 2 and (tmp_path / "out/images/c2.npy").exists()
    assert (tmp_path / "out/images/c1.npy").stat().st_mtime_ns == stamp
    assert again.manifest["split"] == first.manifest["split"]
    damaged = ("images/c0.npy", "masks/c1.npy")
    arrays = {name: np.load(tmp_path / "out" / name) for name in damaged}
    for name, damage in zip(damaged, (b"", (tmp_path / "out/masks/c1.npy").read_bytes()[:300])):
        (tmp_path / "out" / name).write_bytes(damage)  # emptied or cut short since: not "already done"
    redone = prepare(tmp_path / "raw", tmp_path / "out", cfg, workers=1, progress=False)
    assert redone.skipped == 1 and len(redone.kept) == 3
    assert all(np.array_equal(np.load(tmp_path / "out" / name), arrays[name]) for name in damaged)
    forced = prepare(tmp_path / "raw", tmp_path / "out", cfg, workers=1, force=True, progress=False)
    assert forced.skipped == 0
    other = prepare(tmp_path / "raw", tmp_path / "out", PrepareConfig(norm="zscore", **SMALL), workers=1, progress=False)
    assert other.skipped == 0  # changed settings redo the cases


@pytest.mark.parametrize("damage", ["null", "[]", "no status", "status weird", "crop_box 5", "crop_box short",
                                    "another case"])
def test_a_damaged_record_is_prepared_again(tmp_path, damage):
    """A record is only trusted as `prepare` writes it: a hand-edited or damaged one had crashed
    the re-run with a traceback, or (a status it never writes) dropped the case from the manifest."""
    for i in range(2):
        write_case(tmp_path / "raw", f"c{i}", seed=i)
    cfg = PrepareConfig(**SMALL)
    first = prepare(tmp_path / "raw", tmp_path / "out", cfg, workers=1, progress=False)
    path = tmp_path / "out/records/c1.json"
    record = json.loads(path.read_text())
    text = {"null": "null", "[]": "[]"}.get(damage)
    if text is None:
        if damage == "no status":
            del record["status"]
        elif damage == "status weird":
            record["status"] = "weird"
        elif damage == "crop_box 5":
            record["crop_box"] = 5
        elif damage == "crop_box short":
            record["crop_box"] = record["crop_box"][:2]
        else:
            record["case_id"] = "c0"
        text = json.dumps(record)
    path.write_text(text)
    again = prepare(tmp_path / "raw", tmp_path / "out", cfg, workers=1, progress=False)
    assert again.skipped == 1 and again.kept == first.kept == ["c0", "c1"]
    assert json.loads(path.read_text())["status"] == "kept"


def test_a_case_whose_files_changed_is_prepared_again(tmp_path):
    """A corrected segmentation or a scan exported again had been skipped as "already done", its old
    arrays trained on; a dataset moved elsewhere is still done (the digest holds no path)."""
    import shutil

    for i in range(3):
        write_case(tmp_path / "raw", f"c{i}", seed=i)
    cfg = PrepareConfig(**SMALL)
    assert prepare(tmp_path / "raw", tmp_path / "out", cfg, workers=1, progress=False).skipped == 0
    seg = _nii(tmp_path / "raw", "c1", "seg")
    vol = nib.load(seg)
    corrected = np.asarray(vol.dataobj).copy()
    corrected[corrected == 4] = 1  # the enhancing tumour relabelled as necrosis
    nib.save(nib.Nifti1Image(corrected, vol.affine, vol.header), seg)
    flair = _nii(tmp_path / "raw", "c2", "flair")
    vol = nib.load(flair)
    nib.save(nib.Nifti1Image(np.asarray(vol.dataobj) // 2, vol.affine, vol.header), flair)  # exported again
    again = prepare(tmp_path / "raw", tmp_path / "out", cfg, workers=1, progress=False)
    assert again.skipped == 1 and len(again.kept) == 3
    assert 3 not in np.load(tmp_path / "out/masks/c1.npy")  # the corrected labels, not the old ones
    shutil.move(tmp_path / "raw", tmp_path / "moved")
    assert prepare(tmp_path / "moved", tmp_path / "out", cfg, workers=1, progress=False).skipped == 3
    record = tmp_path / "out/records/c0.json"  # written before records kept a digest: taken as it is
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "files_digest"}))
    assert prepare(tmp_path / "moved", tmp_path / "out", cfg, workers=1, progress=False).skipped == 3
    _nii(tmp_path / "moved", "c2", "seg").unlink()  # a case given out without its labels: no stale mask left
    unlabelled = prepare(tmp_path / "moved", tmp_path / "out", cfg, workers=1, progress=False)
    assert unlabelled.skipped == 2 and unlabelled.manifest["counts"]["unlabelled"] == 1
    assert not (tmp_path / "out/masks/c2.npy").exists() and (tmp_path / "out/images/c2.npy").exists()


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "missing modality 't1ce'"),
        ("corrupt", "bad_t2.nii.gz: cannot read NIfTI"),
        ("shape", "bad_flair.nii.gz and bad_t2.nii.gz do not overlap in world space"),
        ("label3", "bad_seg.nii.gz has labels 3 outside the brats2020 labels 0, 1, 2, 4 (label 3: enhancing tumour in BraTS 2023+, MSD and nnU-Net numbers, or training labels"),
        ("nan", "bad_t2.nii.gz (t2) has 2 NaN or infinite voxel(s)"),
        ("inf", "bad_t2.nii.gz (t2) has 1 NaN or infinite voxel(s)"),
        ("2d", "bad_t1ce.nii.gz: expected a 3D volume, got shape (40, 40)"),
        ("4d", "bad_t1ce.nii.gz: expected a 3D volume, got shape (40, 40, 32, 2)"),
        ("seg_shape", "bad: bad_seg.nii.gz (shape (40, 40, 30)) and the images (shape (40, 40, 32)) have the same voxel size but not"),
    ],
)
def test_bad_case_reported_others_processed(tmp_path, breakage, message):
    write_case(tmp_path / "raw", "good")
    folder = write_case(tmp_path / "raw", "bad")
    if breakage == "missing":
        (folder / "bad_t1ce.nii.gz").unlink()
    elif breakage == "corrupt":
        (folder / "bad_t2.nii.gz").write_bytes(b"\x1f\x8b garbage")
    elif breakage == "shape":
        nib.save(nib.Nifti1Image(np.ones((40, 40, 30), np.int16), np.eye(4)), folder / "bad_flair.nii.gz")
    elif breakage in ("nan", "inf"):
        data = np.asarray(nib.load(folder / "bad_t2.nii.gz").dataobj).astype(np.float32)
        data[20, 20, 16:18 if breakage == "nan" else 17] = np.nan if breakage == "nan" else np.inf
        nib.save(nib.Nifti1Image(data, AFFINE), folder / "bad_t2.nii.gz")
    elif breakage in ("2d", "4d"):
        data = np.ones((40, 40) if breakage == "2d" else (40, 40, 32, 2), np.int16)
        nib.save(nib.Nifti1Image(data, AFFINE), folder / "bad_t1ce.nii.gz")
    elif breakage == "seg_shape":
        nib.save(nib.Nifti1Image(np.zeros((40, 40, 30), np.uint8), AFFINE), folder / "bad_seg.nii.gz")
    else:
        seg = np.zeros((40, 40, 32), np.uint8)
        seg[10:30, 10:30, 10:20] = 3
        nib.save(nib.Nifti1Image(seg, np.eye(4)), folder / "bad_seg.nii.gz")
    res = prepare(tmp_path / "raw", tmp_path / "out", PrepareConfig(**SMALL), workers=1, progress=False)
    assert list(res.failed) == ["bad"] and message in res.failed["bad"] and res.kept == ["good"]


def test_constant_modality_is_a_recorded_warning(tmp_path, capsys):
    folder = write_case(tmp_path / "raw", "flat")
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 32), np.int16), AFFINE), folder / "flat_flair.nii.gz")
    res = prepare(tmp_path / "raw", tmp_path / "out", PrepareConfig(**SMALL), workers=1, progress=False)
    (record,) = res.manifest["cases"]
    assert record["status"] == "kept" and len(record["warnings"]) == 1
    assert "flat_flair.nii.gz (flair) holds the single value 0: a broken scan?" in record["warnings"][0]
    assert f"warning: {record['warnings'][0]}" in capsys.readouterr().err


def test_a_scan_that_covers_part_of_the_brain_is_a_recorded_warning(tmp_path, capsys):
    """A FLAIR slab over half the brain: the network would read the rest as empty brain."""
    folder = write_case(tmp_path / "raw", "slab")
    img = nib.load(folder / "slab_flair.nii.gz")
    data = np.asarray(img.dataobj).copy()
    data[:, :, 16:] = 0
    nib.save(nib.Nifti1Image(data, img.affine), folder / "slab_flair.nii.gz")
    res = prepare(tmp_path / "raw", tmp_path / "out", PrepareConfig(**SMALL), workers=1, progress=False)
    (record,) = res.manifest["cases"]
    assert len(record["warnings"]) == 1, record["warnings"]
    assert "slab_flair.nii.gz (flair) is 0 in " in record["warnings"][0]
    assert "of what the other scans show: it covers part of the brain" in capsys.readouterr().err


@pytest.mark.parametrize("change", ["none", "slab", "moved", "offset", "constant"])
def test_real_scans_that_miss_part_of_the_brain_are_named(real_data_dir, change):
    """Real cases' modalities agree on the brain (at most 3.5 % of it is 0 in one of them, in
    Brats18_2013_3_1); a FLAIR covering slices 60-150 only, or moved 20 mm off the others, is named;
    a T1 off 0 or constant is named for that alone, not the others as partial beside it."""
    from dataclasses import replace

    from tumorseg.layouts import discover_cases
    from tumorseg.prepare.case import check_intensities, load_channels

    case = discover_cases(real_data_dir, only=["Brats18_2013_3_1"])[0]
    channels = ("t1", "t1ce", "t2", "flair")
    vols = load_channels(case, channels)
    if change == "slab":
        vols[3].data[:, :, list(range(60)) + list(range(151, 155))] = 0
    elif change == "moved":
        vols[3].data[:] = np.roll(vols[3].data, 20, axis=1)
    elif change in ("offset", "constant"):  # the T1's own warning; the others are not partial for it
        vols[0] = replace(vols[0], data=vols[0].data + 10 if change == "offset" else np.ones_like(vols[0].data))
    warnings = check_intensities(case, channels, vols)
    assert (warnings == []) == (change == "none"), warnings
    if change in ("offset", "constant"):
        assert len(warnings) == 1 and "(t1)" in warnings[0], warnings
        return
    assert any("(flair) is 0 in " in w for w in warnings) == (change != "none")
    if change == "slab":  # the others show what the slab misses; moved, each misses some of the others'
        assert len(warnings) == 1


def test_a_whole_head_is_a_recorded_warning(tmp_path, capsys):
    """Scans that are not skull-stripped: their non-background region is larger than any brain."""
    folder = write_case(tmp_path / "raw", "head")
    for path in folder.glob("*.nii.gz"):  # the same 32x32x26-voxel "brain" in 5 mm voxels: 3.3 L
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), AFFINE @ np.diag([5.0, 5.0, 5.0, 1.0])), path)
    res = prepare(tmp_path / "raw", tmp_path / "out", PrepareConfig(**{**SMALL, "spacing": (5.0, 5.0, 5.0)}),
                  workers=1, progress=False)
    (record,) = res.manifest["cases"]
    assert len(record["warnings"]) == 1 and "non-background region is 3.3 L" in record["warnings"][0]
    assert "a whole head?" in capsys.readouterr().err
    write_case(tmp_path / "brain", "brain")  # 27 mL: no warning
    assert prepare(tmp_path / "brain", tmp_path / "out2", PrepareConfig(**SMALL), workers=1,
                   progress=False).manifest["cases"][0]["warnings"] == []


def test_bad_settings_are_clear_errors():
    with pytest.raises(TumorsegError, match="bad channels"):
        PrepareConfig(channels=("t2", "dwi"))
    with pytest.raises(TumorsegError, match="min tumour"):
        PrepareConfig(min_tumour=2)


def test_cli_prepare(tmp_path, capsys):
    write_case(tmp_path / "raw", "c0")
    write_case(tmp_path / "raw", "c1", seed=1)
    rc = main(["prepare", str(tmp_path / "raw"), str(tmp_path / "out"), "--crop", "32,32,24", "--channels", "all", "--workers", "1"])
    assert rc == 0 and "2 kept" in capsys.readouterr().out
    assert np.load(tmp_path / "out/images/c0.npy").shape == (4, 32, 32, 24)
    (tmp_path / "raw/c1/c1_t2.nii.gz").write_bytes(b"junk")
    rc = main(["prepare", str(tmp_path / "raw"), str(tmp_path / "out2"), "--crop", "32", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "c1: " in err and "c1_t2.nii.gz" in err and "Traceback" not in err
    assert main(["prepare", str(tmp_path / "empty"), str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_real_cases_kaggle_layout(real_data_dir, tmp_path):
    from factory import kaggle_copy

    kaggle_copy(real_data_dir / "Brats18_CBICA_AQR_1", tmp_path / "dl", 10)  # 0.7 % tumour: dropped
    kaggle_copy(real_data_dir / "Brats18_2013_11_1", tmp_path / "dl", 355, seg_name="W39_1998.09.19_Segm.nii")
    res = prepare(tmp_path / "dl", tmp_path / "out", workers=2, progress=False)
    by_id = {c["case_id"]: c for c in res.manifest["cases"]}
    assert by_id["BraTS20_Training_010"]["status"] == "dropped"
    c355 = by_id["BraTS20_Training_355"]
    assert c355["status"] == "kept" and "W39_1998.09.19_Segm.nii" in c355["note"]
    assert c355["crop_box"] == [[56, 184], [56, 184], [13, 141]]
    assert c355["tumour_fraction"] == pytest.approx(0.0664, abs=1e-3)
    image = np.load(tmp_path / "out/images/BraTS20_Training_355.npy", mmap_mode="r")
    assert image.shape == (3, 128, 128, 128) and 0.0 <= image.min() and image.max() <= 1.0
    assert set(np.unique(np.load(tmp_path / "out/masks/BraTS20_Training_355.npy"))) <= {0, 1, 2, 3}


def _regrid(path, affine, data=None):
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) if data is None else data, affine), path)


def test_modalities_on_other_grids_are_resampled_onto_the_finest(tmp_path):
    """A 1 mm T1CE with a 1x1x4 mm FLAIR of the same head: the FLAIR joins the 1 mm grid."""
    from tumorseg.geometry import Grid, network_grid, resample

    for name in ("same", "coarse"):
        write_case(tmp_path / name, "c0", shape=(40, 40, 32))
    flair = _nii(tmp_path / "coarse", "c0", "flair")
    img = nib.load(flair)
    src = Grid(img.shape, img.affine)
    coarse = network_grid(src, (1.0, 1.0, 4.0))
    _regrid(flair, coarse.affine, resample(np.asarray(img.dataobj).astype(np.float32), src, coarse, order=1))
    cfg = PrepareConfig(channels=("t1ce", "flair"), crop_size=(32, 32, 24), min_tumour=0.0, val_fraction=0.0)
    arrays = {}
    for name in ("same", "coarse"):
        res = prepare(tmp_path / name, tmp_path / f"prep-{name}", cfg, workers=1, progress=False)
        assert res.manifest["cases"][0]["shape"] == [40, 40, 32] and res.manifest["settings"]["spacing"] == [1.0, 1.0, 1.0]
        arrays[name] = np.load(tmp_path / f"prep-{name}/images/c0.npy")
    assert np.array_equal(arrays["same"][0], arrays["coarse"][0])  # T1CE untouched
    inner = (slice(8, 24), slice(8, 24), slice(6, 18))  # away from the brain's edge, which 4 mm slices blur
    assert np.abs(arrays["same"][1][inner] - arrays["coarse"][1][inner]).mean() < 0.02


def test_spacing_defaults_to_the_datas_median_and_is_recorded(tmp_path):
    two_mm = np.diag([-2.0, -2.0, 2.0, 1.0])
    for i in range(3):
        folder = write_case(tmp_path / "raw", f"c{i}", shape=(24, 24, 20), seed=i)
        for path in folder.iterdir():
            _regrid(path, two_mm)
    cfg = dict(crop_size=(16, 16, 16), min_tumour=0.0)
    res = prepare(tmp_path / "raw", tmp_path / "native", PrepareConfig(**cfg), workers=1, progress=False)
    assert res.manifest["settings"]["spacing"] == [2.0, 2.0, 2.0]
    assert res.manifest["cases"][0]["network_shape"] == [24, 24, 20]
    res = prepare(tmp_path / "raw", tmp_path / "fine", PrepareConfig(spacing=(1.0, 1.0, 1.0), **cfg), workers=1, progress=False)
    record = res.manifest["cases"][0]
    assert record["network_shape"] == [48, 48, 40] and record["spacing"] == [2.0, 2.0, 2.0]
    mask = np.load(tmp_path / "fine/masks/c0.npy")
    assert set(np.unique(mask).tolist()) <= {0, 1, 2, 3} and 3 in mask  # nearest neighbour: labels never blended


def test_config_takes_channels_as_the_cli_writes_them():
    assert PrepareConfig(channels="all").channels == ("t1", "t1ce", "t2", "flair")
    assert PrepareConfig(channels="T2, flair").channels == ("t2", "flair")
    assert PrepareConfig(channels="T1-CE, t2f,T2w").channels == ("t1ce", "flair", "t2")  # by meaning, as files are
    assert PrepareConfig(channels=["T1Gd", "FLAIR"]).channels == ("t1ce", "flair")
    with pytest.raises(TumorsegError, match="bad channels t1ce,t1ce: choose distinct names"):
        PrepareConfig(channels="t1ce,t1c")
    assert PrepareConfig.from_dict({"channels": "all", "crop_size": [64] * 3}).channels == ("t1", "t1ce", "t2", "flair")
    with pytest.raises(TumorsegError, match="bad channels t2,pd"):
        PrepareConfig(channels="t2,pd")


def test_the_reference_grid_is_the_finest_then_the_widest():
    from tumorseg.geometry import Grid
    from tumorseg.prepare.case import reference_index

    one, fine, cropped = Grid((40, 40, 30), np.eye(4)), Grid((44, 44, 33), np.diag([0.9, 0.9, 0.9, 1])), Grid((30, 30, 20), np.eye(4))
    assert reference_index([one, fine]) == 1  # a 1 mm scan is never blurred onto coarser voxels
    assert reference_index([cropped, one, Grid((40, 40, 30), np.eye(4))]) == 1  # a cropped T1 would crop the labels


def test_a_modality_whose_origin_another_tool_rounded_is_not_interpolated(tmp_path):
    from tumorseg.layouts import discover_cases
    from tumorseg.prepare.case import load_channels

    folder = write_case(tmp_path, "BraTS20_Training_001")
    flair = folder / "BraTS20_Training_001_flair.nii.gz"
    img = nib.load(flair)
    stored = np.asarray(img.dataobj)
    for mm, interpolated in ((0.01, False), (0.3, True)):
        nudged = img.affine.copy()
        nudged[:3, 3] += mm
        nib.save(nib.Nifti1Image(stored, nudged), flair)
        (case,) = discover_cases(folder)
        t1, fl = load_channels(case, ("t1", "flair"))
        assert np.array_equal(fl.affine, t1.affine)  # one grid: the reference's
        assert np.array_equal(fl.data, stored) != interpolated


def test_headers_that_leave_the_orientation_open_are_warned_about(tmp_path):
    from tumorseg.layouts import discover_cases
    from tumorseg.prepare.case import check_headers

    folder = write_case(tmp_path, "BraTS20_Training_001")
    (case,) = discover_cases(folder)
    assert check_headers(case, ("t1", "t1ce", "t2", "flair")) == []
    img = nib.load(case.images["flair"])  # a qform mirrored against the sform
    img.set_qform(np.diag([-1.0, 1.0, 1.0, 1.0]) @ img.affine, code=1)
    nib.save(img, case.images["flair"])
    two = ("BraTS20_Training_001: the header of flair holds a qform and an sform that disagree: the sform is used, as "
           "nibabel and FSL do (other tools may take the qform)")
    prepare(folder, tmp_path / "prep", PrepareConfig(crop_size=(16, 16, 16), min_tumour=0.0, val_fraction=0.0))
    (record,) = json.loads((tmp_path / "prep" / "manifest.json").read_text())["cases"]
    assert record["status"] == "kept" and two in json.loads(
        (tmp_path / "prep" / "records" / "BraTS20_Training_001.json").read_text())["warnings"]
    for modality in ("t1", "t2"):  # no orientation at all
        img = nib.load(case.images[modality])
        img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
        img.set_sform(None, code=0)
        img.set_qform(None, code=0)
        nib.save(img, case.images[modality])
    assert check_headers(case, ("t1", "t1ce", "t2", "flair")) == [
        "BraTS20_Training_001: the header of t1, t2 gives no orientation (qform and sform codes 0): placed as nibabel "
        "places such files, from pixdim alone, which may mirror left and right", two]


def test_a_quaternion_nibabel_cannot_read_is_a_warning_not_a_failure(tmp_path):
    from tumorseg.layouts import discover_cases
    from tumorseg.prepare.case import check_headers

    folder = write_case(tmp_path, "BraTS20_Training_001")
    (case,) = discover_cases(folder)
    img = nib.load(case.images["flair"])
    img.header["qform_code"] = 1
    img.header["quatern_b"], img.header["quatern_c"] = 0.9, 0.6  # b^2 + c^2 > 1: no rotation; the sform places it
    nib.save(img, case.images["flair"])
    (warning,) = check_headers(case, ("t1", "flair"))
    assert "flair holds a qform and an sform that disagree: the sform is used" in warning


def test_a_changed_prepare_cut_short_leaves_no_manifest_vouching_for_mixed_arrays(tmp_path, monkeypatch):
    """Re-preparing with other settings replaces the arrays case by case: until the run ends, no
    manifest may say they were made with the old settings (train would take old and new together)."""
    import importlib

    from tumorseg.layouts import discover_cases
    from tumorseg.prepare import load_manifest

    run_module = importlib.import_module("tumorseg.prepare.run")
    for i in range(3):
        write_case(tmp_path / "raw", f"c{i}", seed=i)
    prepare(tmp_path / "raw", tmp_path / "out", PrepareConfig(**SMALL), workers=1, progress=False)
    real, calls = run_module.prepare_case, []

    def cut_short(case, config, out_dir):
        if calls:
            raise KeyboardInterrupt
        calls.append(case.case_id)
        return real(case, config, out_dir)

    monkeypatch.setattr(run_module, "prepare_case", cut_short)
    smaller = PrepareConfig(crop_size=(24, 24, 24))
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "raw", tmp_path / "out", smaller, workers=1, progress=False)
    assert np.load(tmp_path / "out/images" / f"{calls[0]}.npy").shape[1:] == (24, 24, 24)  # old and new arrays
    with pytest.raises(TumorsegError, match=r"out: its 'tumorseg prepare' did not finish \(no manifest.json\): run it again"):
        load_manifest(tmp_path / "out")
    assert main(["train", str(tmp_path / "out"), str(tmp_path / "run"), "--epochs", "1"]) == 2
    with pytest.raises(TumorsegError, match="a prepared folder"):  # still told apart from a folder of scans
        discover_cases(tmp_path / "out")
    monkeypatch.setattr(run_module, "prepare_case", real)
    again = prepare(tmp_path / "raw", tmp_path / "out", smaller, workers=1, progress=False)
    assert again.skipped == 1 and load_manifest(tmp_path / "out")["settings"]["crop_size"] == [24, 24, 24]
    assert prepare(tmp_path / "raw", tmp_path / "out", smaller, workers=1, progress=False).skipped == 3
    assert (tmp_path / "out/manifest.json").is_file()  # nothing to redo: the manifest is written again, never removed
