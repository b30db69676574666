"""Tests for tumorseg.synth: layout, NIfTI conventions of the real data, labels, anatomy, determinism."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from tumorseg.errors import TumorsegError
from tumorseg.labels import MODALITIES, RAW_LABELS
from tumorseg.synth import CROP_HI, CROP_LO, REF_SHAPE, brats_affine, synthesize

SHAPE = (48, 48, 40)
FILES = (*MODALITIES, "seg")


def _path(root: Path, index: int, kind: str) -> Path:
    cid = f"BraTS20_Training_{index:03d}"
    return root / cid / f"{cid}_{kind}.nii.gz"


def _load_case(root: Path, index: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    images = {m: np.asarray(nib.load(_path(root, index, m)).dataobj) for m in MODALITIES}
    return images, np.asarray(nib.load(_path(root, index, "seg")).dataobj)


@pytest.fixture(scope="module")
def synth_cases(synth_dir):
    """The 6 shared synthetic cases loaded: list of (images, seg)."""
    return [_load_case(synth_dir, i) for i in range(1, 7)]


@pytest.fixture(scope="module")
def twelve_cases(tmp_path_factory):
    """12 small cases from another seed, loaded as (images, seg)."""
    root = tmp_path_factory.mktemp("synth12")
    synthesize(root, 12, shape=SHAPE, seed=7, progress=False)
    return [_load_case(root, i) for i in range(1, 13)]


def _crop_fraction(seg: np.ndarray) -> float:
    """Tumour voxels as a fraction of the training crop scaled to this shape."""
    scale = np.array(seg.shape) / np.array(REF_SHAPE)
    return float((seg > 0).sum() / np.prod((np.array(CROP_HI) - CROP_LO) * scale))


def test_layout_and_names(synth_dir):
    folders = sorted(p.name for p in synth_dir.iterdir())
    assert folders == [f"BraTS20_Training_{i:03d}" for i in range(1, 7)]
    for i in range(1, 7):
        names = sorted(p.name for p in (synth_dir / folders[i - 1]).iterdir())
        assert names == sorted(_path(synth_dir, i, k).name for k in FILES)


def test_returns_case_folders(tmp_path):
    out = synthesize(tmp_path / "new", 2, shape=(16, 16, 16), start_index=41, progress=False)
    assert out == [tmp_path / "new" / "BraTS20_Training_041", tmp_path / "new" / "BraTS20_Training_042"]
    assert all(p.is_dir() for p in out)


def test_shapes_dtypes_and_geometry(synth_dir):
    for i in range(1, 7):
        for kind in FILES:
            img = nib.load(_path(synth_dir, i, kind))
            assert img.shape == SHAPE
            assert img.get_data_dtype() == (np.uint8 if kind == "seg" else np.int16)
            np.testing.assert_array_equal(img.affine, brats_affine(SHAPE))
            assert img.header.get_zooms() == (1.0, 1.0, 1.0)


def test_headers_match_real_data(synth_dir, real_data_dir):
    real_case = next(
        d for d in sorted(real_data_dir.iterdir())
        if nib.load(d / f"{d.name}_seg.nii.gz").get_data_dtype() == np.uint8
    )
    for kind in ("t1", "seg"):
        real = nib.load(real_case / f"{real_case.name}_{kind}.nii.gz")
        ours = nib.load(_path(synth_dir, 1, kind))
        np.testing.assert_array_equal(brats_affine(real.shape), real.affine)
        expected = real.affine.copy()
        expected[1, 3] = SHAPE[1] - 1  # the origin is the only shape-dependent part
        np.testing.assert_array_equal(ours.affine, expected)
        np.testing.assert_array_equal(ours.header.get_qform(), expected)
        np.testing.assert_array_equal(ours.header.get_sform(), expected)
        for key in ("qform_code", "sform_code", "xyzt_units", "pixdim", "regular", "intent_code", "datatype"):
            np.testing.assert_array_equal(ours.header[key], real.header[key], err_msg=key)
        assert ours.header.get_xyzt_units() == real.header.get_xyzt_units()


def test_float32_option(tmp_path, synth_dir):
    synthesize(tmp_path, 1, shape=SHAPE, seed=0, dtype="float32", progress=False)
    ints, seg = _load_case(synth_dir, 1)
    floats, seg_f = _load_case(tmp_path, 1)
    np.testing.assert_array_equal(seg_f, seg)
    assert nib.load(_path(tmp_path, 1, "seg")).get_data_dtype() == np.uint8
    for m in MODALITIES:
        assert nib.load(_path(tmp_path, 1, m)).get_data_dtype() == np.float32
        assert np.abs(floats[m] - ints[m]).max() <= 0.5 + 1e-3


def test_labels_and_background(synth_cases):
    for images, seg in synth_cases:
        assert set(np.unique(seg)) <= set(RAW_LABELS)
        brain = images["t1"] > 0
        assert 0.08 < brain.mean() < 0.3
        for m in MODALITIES:
            # Skull-stripped: the same brain in every modality, exact zeros elsewhere.
            np.testing.assert_array_equal(images[m] > 0, brain)
            assert images[m].min() == 0
            assert 100 < np.median(images[m][brain]) < 5000
        assert not seg[~brain].any()


def test_tumour_inside_brain_and_mostly_central(synth_cases):
    inside = total = 0
    for images, seg in synth_cases:
        tumour = seg > 0
        assert tumour.any()
        assert (images["t1"][tumour] > 0).all()
        scale = np.array(seg.shape) / np.array(REF_SHAPE)
        lo = np.round(np.array(CROP_LO) * scale).astype(int)
        hi = np.round(np.array(CROP_HI) * scale).astype(int)
        inside += tumour[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].sum()
        total += tumour.sum()
    assert inside / total > 0.8


def test_nesting(synth_cases):
    for _, seg in synth_cases:
        core = np.isin(seg, (1, 4))
        # Oedema wraps the tumour core.
        assert (seg[ndi.binary_dilation(core) & ~core] == 2).all()
        if (seg == 4).any():
            necrosis = seg == 1
            # The enhancing rim wraps the necrotic core.
            assert (seg[ndi.binary_dilation(necrosis) & ~necrosis] == 4).all()


def test_contrasts(synth_cases):
    pooled = {"necrosis_t1ce": [], "healthy_t1ce": []}
    for images, seg in synth_cases:
        healthy = (images["t1"] > 0) & (seg == 0)

        def mean(m, mask):
            return float(images[m][mask].mean())

        if (seg == 4).any():
            assert mean("t1ce", seg == 4) > 1.3 * mean("t1ce", healthy)
            if (seg == 1).any():
                pooled["necrosis_t1ce"].append(mean("t1ce", seg == 1) / mean("t1ce", healthy))
        assert mean("flair", seg == 2) > 1.3 * mean("flair", healthy)
        assert mean("t2", seg == 2) > 1.1 * mean("t2", healthy)
        assert mean("t1", seg > 0) < mean("t1", healthy)
    assert np.mean(pooled["necrosis_t1ce"]) < 1.0


def test_some_cases_without_enhancing_tumour_and_some_small(twelve_cases):
    no_et = sum(not (seg == 4).any() for _, seg in twelve_cases)
    fractions = [_crop_fraction(seg) for _, seg in twelve_cases]
    small = sum(f < 0.01 for f in fractions)
    assert 1 <= no_et <= 6
    assert 1 <= small <= 6
    assert all(f > 0 for f in fractions)


def test_deterministic(tmp_path, synth_dir):
    synthesize(tmp_path / "a", 2, shape=SHAPE, seed=0, progress=False)
    # A case depends on (seed, number) only, not on the run it was made in.
    synthesize(tmp_path / "b", 1, shape=SHAPE, seed=0, start_index=5, progress=False)
    for i in (1, 2):
        for kind in FILES:
            assert _path(tmp_path / "a", i, kind).read_bytes() == _path(synth_dir, i, kind).read_bytes()
    for kind in FILES:
        assert _path(tmp_path / "b", 5, kind).read_bytes() == _path(synth_dir, 5, kind).read_bytes()


def test_different_seed_differs(tmp_path, synth_dir):
    synthesize(tmp_path, 1, shape=SHAPE, seed=1, progress=False)
    ours, seg = _load_case(tmp_path, 1)
    theirs, seg0 = _load_case(synth_dir, 1)
    assert not np.array_equal(seg, seg0)
    assert not np.array_equal(ours["flair"], theirs["flair"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cases": 0},
        {"cases": -2},
        {"cases": 1.5},
        {"shape": (48, 48)},
        {"shape": (48, 48, 8)},
        {"shape": (48.0, 48, 40)},
        {"shape": "48x48x40"},
        {"seed": -1},
        {"start_index": 0},
        {"dtype": "int8"},
    ],
)
def test_bad_arguments(tmp_path, kwargs):
    args = {"cases": 1, "shape": SHAPE, "progress": False, **kwargs}
    with pytest.raises(TumorsegError) as info:
        synthesize(tmp_path, **args)
    assert "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())


def test_out_dir_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(TumorsegError, match="not a folder"):
        synthesize(target, 1, shape=SHAPE, progress=False)
