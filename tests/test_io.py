import errno
import os
import re
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest

from tumorseg.errors import TumorsegError
from tumorseg.io import atomic_path, check_writable, load_nifti, save_npy, sweep_stale_temps
from tumorseg.layouts import discover_cases

from factory import kaggle_copy, write_case


def test_folder_of_case_folders(tmp_path):
    for i in (2, 1):
        write_case(tmp_path, f"BraTS20_Training_00{i}")
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert set(cases[0].images) == {"t1", "t1ce", "t2", "flair"}
    assert cases[0].seg.name == "BraTS20_Training_001_seg.nii.gz"


def test_single_case_folder_and_uncompressed(tmp_path):
    folder = write_case(tmp_path, "BraTS20_Training_007", ext=".nii")
    (case,) = discover_cases(folder)
    assert case.case_id == "BraTS20_Training_007" and case.seg.suffix == ".nii"


def test_validation_case_without_segmentation(tmp_path):
    write_case(tmp_path, "BraTS20_Validation_001", seg=None)
    (case,) = discover_cases(tmp_path)
    assert case.seg is None and len(case.images) == 4


def test_case_355_segmentation_name(tmp_path):
    folder = write_case(tmp_path, "BraTS20_Training_355", seg=None, ext=".nii")
    write_case(tmp_path / "x", "y", ext=".nii")  # a donor segmentation file
    (tmp_path / "x" / "y" / "y_seg.nii").rename(folder / "W39_1998.09.19_Segm.nii")
    case = discover_cases(tmp_path / "BraTS20_Training_355")[0]
    assert case.seg.name == "W39_1998.09.19_Segm.nii"
    assert "W39_1998.09.19_Segm.nii" in case.seg_note


def test_missing_modality_is_reported_by_name(tmp_path):
    write_case(tmp_path, "case_a", modalities=("t1", "t2", "flair"))
    (case,) = discover_cases(tmp_path)
    with pytest.raises(TumorsegError, match="case_a: missing modality 't1ce'"):
        case.image("t1ce")


def test_empty_and_missing_folder(tmp_path):
    with pytest.raises(TumorsegError, match=r"no cases found \(expected [^;]*\)$"):
        discover_cases(tmp_path)
    for name in ("case_1/t1.hdr", "case_1/t1.img"):  # Analyze pairs: said, not just "no cases"
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(TumorsegError, match=r"no cases found .*; t1.hdr and the like are .hdr/.img pairs: convert them"):
        discover_cases(tmp_path)
    with pytest.raises(TumorsegError, match="no such folder"):
        discover_cases(tmp_path / "nope")


def test_corrupt_nifti_names_file(tmp_path):
    bad = tmp_path / "bad_t1.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    with pytest.raises(TumorsegError, match="bad_t1.nii.gz: cannot read NIfTI"):
        load_nifti(bad)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.npy"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    save_npy(target, np.arange(3))
    assert np.array_equal(np.load(target), np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_kaggle_layout_from_real_case(real_data_dir, tmp_path):
    src = real_data_dir / "Brats18_2013_2_1"
    kaggle_copy(src, tmp_path, 1)
    kaggle_copy(src, tmp_path, 355, seg_name="W39_1998.09.19_Segm.nii")
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS20_Training_001", "BraTS20_Training_355"]
    assert cases[1].seg.name == "W39_1998.09.19_Segm.nii" and cases[1].seg_note
    vol = load_nifti(cases[0].seg)
    assert vol.data.shape == (240, 240, 155) and vol.spacing == (1.0, 1.0, 1.0)


def test_sweep_removes_only_stale_temporaries(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".tmp-{dead.pid}-case.npy"
    live = tmp_path / f".tmp-{os.getppid()}-other.npy"  # the process that started pytest is alive
    old = tmp_path / f".tmp-{os.getppid()}-old.npy"
    for path in (stale, live, old, tmp_path / "case.npy", tmp_path / ".tmp-notapid-x.npy"):
        path.write_bytes(b"x")
    os.utime(old, (0, 0))
    assert sorted(p.name for p in sweep_stale_temps(tmp_path)) == sorted([stale.name, old.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "case.npy", ".tmp-notapid-x.npy"])
    assert sweep_stale_temps(tmp_path / "missing") == []


def test_sweep_of_named_targets_only(tmp_path):
    os.utime(_touch(tmp_path / ".tmp-1-a.nii.gz"), (0, 0))
    os.utime(_touch(tmp_path / ".tmp-1-b.nii.gz"), (0, 0))
    assert [p.name for p in sweep_stale_temps(tmp_path, ["a.nii.gz"])] == [".tmp-1-a.nii.gz"]


def _touch(path):
    path.write_bytes(b"")
    return path


def test_full_disk_is_one_line_with_the_size_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.npy"
    save_npy(target, np.zeros(3))

    def no_space(fh, array):
        fh.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", no_space)
    with pytest.raises(TumorsegError) as info:
        save_npy(target, np.zeros((256, 256, 16), np.float32))
    assert "\n" not in str(info.value)
    assert re.fullmatch(rf"{target}: cannot write \(out of disk space; 4\.0 MB needed; [\d.]+ [MK]B free\)", str(info.value))
    monkeypatch.undo()
    assert np.array_equal(np.load(target), np.zeros(3)) and [p.name for p in tmp_path.iterdir()] == ["a.npy"]
    with pytest.raises(TumorsegError, match=r"b.bin: cannot write \(out of disk space; more than 4 KB needed; "):
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"y" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_write_that_fails_with_its_file_open_does_not_keep_the_file(tmp_path):
    """nibabel on a full disk leaves its file open in its finished frames; held by the error (a
    prediction run keeps each case's), the unlinked temporary kept its space and every later write
    of the run failed. The error must not keep the file open."""
    import weakref

    def writer(path):
        fh = open(path, "wb")  # never closed, as nibabel's on a failed write
        fh.write(b"x" * 4096)
        files.append(weakref.ref(fh))
        raise OSError(errno.ENOSPC, "No space left on device")

    files: list = []
    with pytest.raises(TumorsegError, match="out of disk space") as info:
        with atomic_path(tmp_path / "a.bin") as tmp:
            writer(tmp)
    assert info.value is not None and (files[0]() is None or files[0]().closed)
    assert not list(tmp_path.iterdir())


def test_a_nifti_file_is_whole_however_it_was_compressed_and_not_when_cut_short(tmp_path):
    import gzip

    import nibabel as nib

    from tumorseg.io import nifti_whole

    nib.save(nib.Nifti1Image(np.arange(8000, dtype=np.uint8).reshape(20, 20, 20), np.eye(4)), tmp_path / "a.nii")
    raw = (tmp_path / "a.nii").read_bytes()
    files = {"one member.nii.gz": gzip.compress(raw), "bgzip-like.nii.gz": gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]),
             "padded.nii.gz": gzip.compress(raw) + bytes(512), "cut.nii.gz": gzip.compress(raw)[:-30],
             "cut.nii": raw[:-10], "empty.nii.gz": b"", "junk.nii.gz": b"not a NIfTI file"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert {name: nifti_whole(tmp_path / name) for name in ["a.nii", *files]} == {
        "a.nii": True, "one member.nii.gz": True, "bgzip-like.nii.gz": True, "padded.nii.gz": True,
        "cut.nii.gz": False, "cut.nii": False, "empty.nii.gz": False, "junk.nii.gz": False}


def test_a_short_write_on_a_full_disk_is_out_of_space(tmp_path, monkeypatch):
    """numpy's `tofile` reports a short write without an errno; a disk with no room left explains it."""
    import shutil

    def short(fh, array):
        raise OSError("98304 requested and 29664 written")

    monkeypatch.setattr(np, "save", short)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    with pytest.raises(TumorsegError, match=r"a.npy: cannot write \(out of disk space; 5 KB needed; 4 KB free\)"):
        save_npy(tmp_path / "a.npy", np.zeros(512))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**8, 10**9))
    with pytest.raises(TumorsegError, match=r"a.npy: cannot write \(98304 requested and 29664 written\)"):
        save_npy(tmp_path / "a.npy", np.zeros(512))  # room left: say what happened, nothing more


def test_a_file_where_a_folder_is_needed_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TumorsegError, match=rf"^{tmp_path}/afile/sub/x.npy: cannot write \({tmp_path}/afile is a file, "
                                            r"not a folder\)$"):
        save_npy(tmp_path / "afile" / "sub" / "x.npy", np.zeros(3))


def test_a_name_too_long_is_one_line(tmp_path):
    """The temporary's `.tmp-<pid>-` prefix makes a 245-character name too long; so is a 300-character folder."""
    for path in (tmp_path / ("c" * 245 + ".json"), tmp_path / ("d" * 300) / "x.json"):
        with pytest.raises(TumorsegError, match=r": cannot write \(File name too long\)$"):
            with atomic_path(path) as tmp:
                tmp.write_text("{}")


def test_a_file_size_limit_is_named(tmp_path, monkeypatch):
    """`ulimit -f` (a scheduler's limit): numpy's short write has no errno, EFBIG has one."""
    import resource

    script = ("import resource, numpy as np; from tumorseg.io import save_npy; "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20)); "
              f"save_npy({str(tmp_path / 'a.npy')!r}, np.zeros(2**20, np.float32))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip().endswith(f"{tmp_path / 'a.npy'}: cannot write (larger than the file-size limit "
                                        "(1.0 MB, `ulimit -f`))"), proc.stderr
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    with pytest.raises(TumorsegError, match=r"b.bin: cannot write \(larger than the file-size limit\)$"):
        with atomic_path(tmp_path / "b.bin"):
            raise OSError(errno.EFBIG, "File too large")  # a file system's own limit
    import tumorseg.write_failure

    monkeypatch.setattr(tumorseg.write_failure, "resource", None)  # Windows: no `resource` module, no limit to name
    with pytest.raises(TumorsegError, match=r"b.bin: cannot write \(larger than the file-size limit\)$"):
        with atomic_path(tmp_path / "b.bin"):
            raise OSError(errno.EFBIG, "File too large")


def test_a_read_only_folder_is_one_line_before_and_during_a_write(tmp_path, monkeypatch):
    """On a read-only disk the failed write's temporary cannot be removed either (EROFS)."""
    import tempfile
    from pathlib import Path

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(TumorsegError, match=r"^.*m.csv: cannot write \(Read-only file system\)$"):
        with atomic_path(tmp_path / "m.csv") as tmp:
            read_only(tmp)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(TumorsegError, match=rf"^{tmp_path}: cannot write there \(Read-only file system\)$"):
        check_writable(tmp_path)


def test_a_lone_unrelated_file_beside_unlabelled_images_is_no_segmentation(tmp_path):
    folder = write_case(tmp_path, "BraTS20_Validation_001", seg=None)
    (folder / "brainmask.nii.gz").write_bytes((folder / "BraTS20_Validation_001_t1.nii.gz").read_bytes())
    (case,) = discover_cases(folder)
    assert case.seg is None and case.seg_note is None


def test_written_maps_drop_the_reference_scans_scaling_and_display_window(tmp_path):
    import nibabel as nib

    from tumorseg.io import save_nifti

    scan = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    scan.header["cal_min"], scan.header["cal_max"] = 0, 2000
    scan.header.set_slope_inter(2.0, 10.0)
    save_nifti(tmp_path / "labels.nii.gz", np.ones((4, 4, 4), np.uint8), np.eye(4), scan.header)
    out = nib.load(tmp_path / "labels.nii.gz")
    assert (out.header["cal_min"], out.header["cal_max"]) == (0, 0) and out.header.get_slope_inter() == (None, None)
    assert np.array_equal(np.asarray(out.dataobj), np.ones((4, 4, 4)))


def test_voxel_sizes_come_from_the_affine_not_pixdim():
    import nibabel as nib

    from tumorseg.io import Volume

    header = nib.Nifti1Header()
    header.set_data_shape((2, 2, 2))
    header.set_zooms((2.0, 2.0, 2.0))  # a pixdim that disagrees with the affine placing the voxels
    assert Volume(np.zeros((2, 2, 2)), np.diag([-1.0, 1.0, 1.5, 1.0]), header, None).spacing == (1.0, 1.0, 1.5)


def test_label_maps_lose_float_rounding_noise_only(tmp_path):
    import nibabel as nib

    from tumorseg.io import load_labels

    seg = np.zeros((6, 6, 6), np.float32)
    seg[1], seg[2], seg[3] = 0.9999999, 2.0000002, 4.0000005  # what resampling and float pipelines leave
    nib.save(nib.Nifti1Image(seg, np.eye(4)), tmp_path / "noisy.nii.gz")
    noisy = load_labels(tmp_path / "noisy.nii.gz")
    assert noisy.data.dtype == np.uint8 and sorted(np.unique(noisy.data)) == [0, 1, 2, 4]
    seg[4] = 1.5  # a real fraction: left for the label check to name
    nib.save(nib.Nifti1Image(seg, np.eye(4)), tmp_path / "fraction.nii.gz")
    assert 1.5 in load_labels(tmp_path / "fraction.nii.gz").data
    ints = np.zeros((6, 6, 6), np.int16)
    nib.save(nib.Nifti1Image(ints, np.eye(4)), tmp_path / "ints.nii.gz")
    assert load_labels(tmp_path / "ints.nii.gz").data.dtype == np.int16  # integers as stored
    seg[5] = np.inf  # left for the label check, without numpy's warning on the way
    nib.save(nib.Nifti1Image(seg, np.eye(4)), tmp_path / "inf.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isinf(load_labels(tmp_path / "inf.nii.gz").data).any()


def test_singleton_axes_beyond_three_are_dropped(tmp_path):
    import nibabel as nib

    data = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    for shape in ((4, 5, 3, 1), (4, 5, 3, 1, 1)):
        nib.save(nib.Nifti1Image(data.reshape(shape), np.eye(4)), tmp_path / "v.nii.gz")
        assert np.array_equal(load_nifti(tmp_path / "v.nii.gz").data, data)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 3, 2), np.int16), np.eye(4)), tmp_path / "two.nii.gz")
    with pytest.raises(TumorsegError, match=r"expected a 3D volume, got shape \(4, 5, 3, 2\)"):
        load_nifti(tmp_path / "two.nii.gz")


def test_an_unfetched_annex_file_is_named_not_a_missing_modality(tmp_path):
    from tumorseg.layouts import load_images

    folder = write_case(tmp_path, "BraTS20_Training_001")
    t1 = folder / "BraTS20_Training_001_t1.nii.gz"
    t1.unlink()
    t1.symlink_to("../.git/annex/objects/Xx/SHA256E-s1--abc.nii.gz")  # DataLad before `datalad get`
    (case,) = discover_cases(tmp_path)
    assert case.images["t1"] == t1
    with pytest.raises(TumorsegError, match=r"_t1.nii.gz: a link to \.\./\.git/annex/.*not fetched\? `datalad get` it"):
        load_images(case, ("t1", "t1ce"))


def test_a_link_to_itself_is_named_as_a_loop(tmp_path):
    """A link loop had been `RuntimeError: Symlink loop` in prepare and an unfetched DataLad file in
    predict and evaluate."""
    from tumorseg.io import load_labels
    from tumorseg.layouts import load_images

    folder = write_case(tmp_path, "BraTS20_Training_001")
    t1 = folder / "BraTS20_Training_001_t1.nii.gz"
    t1.unlink()
    t1.symlink_to(t1.name)
    (case,) = discover_cases(tmp_path)
    loop = rf"{re.escape(str(t1))}: a link that leads back to itself \(a symlink loop\); link it to the scan$"
    with pytest.raises(TumorsegError, match=rf"^BraTS20_Training_001: {loop}"):
        load_images(case, ("t1", "t1ce"))
    with pytest.raises(TumorsegError, match=rf"^{loop}"):
        load_labels(t1)


def test_a_header_that_places_no_voxels_is_named(tmp_path):
    """An sform of zeros (and no qform): one line naming the file, not a bare 'singular affine'."""
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4))
    img.set_sform(np.zeros((4, 4)), code=1)
    img.set_qform(None, code=0)
    nib.save(img, tmp_path / "t2.nii.gz")
    with pytest.raises(TumorsegError, match=r"^case1: .*t2.nii.gz: its header places no voxels"):
        load_nifti(tmp_path / "t2.nii.gz", "case1")


@pytest.mark.parametrize("kind, dtype", [("complex", np.complex64), ("RGB", [("R", "u1"), ("G", "u1"), ("B", "u1")])])
def test_voxels_that_are_no_scalar_are_named(tmp_path, kind, dtype):
    """A complex scan (its imaginary part would be dropped with Python's warnings) or an RGB map given as labels."""
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), dtype), np.eye(4)), tmp_path / "t1.nii.gz")
    with pytest.raises(TumorsegError, match=rf"^case1: .*t1.nii.gz: {kind} voxels; give a scalar image"):
        load_nifti(tmp_path / "t1.nii.gz", "case1")


def test_a_scans_sample_digest_sees_the_brain_of_an_uncompressed_nifti(tmp_path):
    """An uncompressed .nii begins and ends in header and background: two scans that differ only
    inside the brain (T1 and T1CE) must not share a fingerprint; a copy elsewhere must."""
    import shutil

    from tumorseg.io import file_sample_digest

    rng = np.random.default_rng(0)
    volume = np.zeros((120, 120, 78), np.int16)
    volume[30:90, 30:90, 20:60] = rng.integers(1, 1000, (60, 60, 40))
    changed = volume.copy()
    changed[30:90, 30:90, 20:60] += 1  # the contrast-enhanced scan: the same outside the brain
    for name, data in (("t1.nii", volume), ("t1ce.nii", changed)):
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / name)
    assert file_sample_digest(tmp_path / "t1.nii") != file_sample_digest(tmp_path / "t1ce.nii")
    shutil.copy(tmp_path / "t1.nii", tmp_path / "copy.nii")
    assert file_sample_digest(tmp_path / "copy.nii") == file_sample_digest(tmp_path / "t1.nii")


def test_a_full_disk_tells_what_was_needed_from_what_was_free(tmp_path, monkeypatch):
    import shutil

    def no_space(fh, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", no_space)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 2**21 - 2**14))
    with pytest.raises(TumorsegError, match=r"cannot write \(out of disk space; 2\.00 MB needed; 1\.98 MB free\)"):
        save_npy(tmp_path / "a.npy", np.zeros(2**19, np.float32))
