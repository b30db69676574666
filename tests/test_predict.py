import hashlib
import os
import re
import sys
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from tumorseg.cli import build_parser
from tumorseg.errors import TumorsegError
from tumorseg.inference import Predictor, predict, predict_case
from tumorseg.inference.case import inference_box, network_input
from tumorseg.inference.window import check_window
from tumorseg.layouts import discover_cases
from tumorseg.labels import to_raw_labels
from tumorseg.networks import build_network, network_spec
from tumorseg.prepare import PrepareConfig, prepare, uncrop
from tumorseg.prepare.case import load_channels
from tumorseg.checkpoint import save_checkpoint

from factory import AFFINE, CHANNELS, write_case
from factory import checkpoint_state as _state

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    write_case(root, "c0")
    write_case(root, "v1", shape=(36, 44, 30), seg=None, seed=1)  # a validation case: no segmentation
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, _state())
    return path


def _assert_same_geometry(out_path, in_path):
    out, ref = nib.load(out_path), nib.load(in_path)
    assert out.shape == ref.shape and out.get_data_dtype() == np.uint8
    assert np.array_equal(out.affine, ref.affine)
    assert np.array_equal(out.header.get_qform(), ref.header.get_qform())
    assert np.array_equal(out.header.get_sform(), ref.header.get_sform())
    assert int(out.header["qform_code"]) == int(ref.header["qform_code"])
    assert int(out.header["sform_code"]) == int(ref.header["sform_code"])
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(ref.affine)
    assert out.header.get_zooms() == ref.header.get_zooms()
    data = np.asarray(out.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data).tolist()) <= {0, 1, 2, 4}
    return data


@pytest.mark.parametrize(
    "bbox, shape, patch, divisor",
    [
        (((6, 58), (5, 50), (4, 36)), (64, 56, 40), (16, 16, 16), 8),
        (((0, 3), (2, 9), (0, 40)), (10, 12, 40), (16, 8, 16), 4),
    ],
)
def test_inference_box_holds_brain_fits_network(bbox, shape, patch, divisor):
    brain = np.zeros(shape, bool)
    brain[tuple(slice(a, b) for a, b in bbox)] = True
    box = inference_box(brain, patch, divisor)
    for (a, b), (lo, hi), p in zip(box, bbox, patch):
        assert a <= lo and hi <= b and b - a >= p and (b - a) % divisor == 0 and b - a - (hi - lo) < max(p, divisor)
    if shape == (10, 12, 40):  # an empty brain: the whole image, grown about its centre
        assert inference_box(np.zeros(shape, bool), patch, 1) == ((-3, 13), (0, 12), (0, 40))


def test_network_input_scales_as_prepare(raw, tmp_path):
    cfg = PrepareConfig(channels=("flair", "t1"), norm="zscore", crop_size=(24, 24, 16))
    res = prepare(raw / "c0", tmp_path / "prep", cfg, workers=1, progress=False)
    prepared = np.load(tmp_path / "prep/images/c0.npy")
    case = discover_cases(raw / "c0")[0]
    predictor = Predictor(nn.Identity(), CPU, ("flair", "t1"), "zscore", (16, 16, 16), divisor=4)
    image, box = network_input([v.data for v in load_channels(case, predictor.channels)], predictor)
    shape = (40, 40, 32)
    a = uncrop(prepared, [tuple(b) for b in res.manifest["cases"][0]["crop_box"]], shape)
    b = uncrop(image, box, shape)
    assert image.dtype == np.float32 and np.allclose(a[:, 8:32, 8:32, 8:24], b[:, 8:32, 8:32, 8:24])


def test_prepared_mask_uncrops_to_segmentation(raw, tmp_path):
    res = prepare(raw / "c0", tmp_path / "prep", PrepareConfig(crop_size=(16, 48, 16)), workers=1, progress=False)
    box = [tuple(b) for b in res.manifest["cases"][0]["crop_box"]]
    assert box == [(12, 28), (-4, 44), (8, 24)]  # reaches outside the 40-voxel y axis
    seg = np.asarray(nib.load(raw / "c0/c0_seg.nii.gz").dataobj)
    back = to_raw_labels(uncrop(np.load(tmp_path / "prep/masks/c0.npy"), box, seg.shape))
    inner = (slice(12, 28), slice(0, 40), slice(8, 24))
    assert np.array_equal(back[inner], seg[inner]) and set(np.unique(seg[inner])) == {0, 1, 2, 4}
    assert not back[:12].any() and not back[28:].any()


def test_outputs_have_input_geometry_and_validation_case(raw, ckpt, tmp_path):
    res = predict(ckpt, raw, tmp_path / "pred", device="cpu", progress=False)
    assert res.failed == {} and res.skipped == []
    assert res.written == [tmp_path / "pred/c0.nii.gz", tmp_path / "pred/v1.nii.gz"]
    for case_id in ("c0", "v1"):
        _assert_same_geometry(tmp_path / f"pred/{case_id}.nii.gz", raw / case_id / f"{case_id}_t2.nii.gz")


class ThresholdNet(nn.Module):
    """Pointwise 'perfect' model: class `label` where channel 0 > 0.5, else background."""

    def __init__(self, label: int = 2):
        super().__init__()
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = (x[:, :1] > 0.5).to(x.dtype)
        logits = [1 - fg] + [fg if k == self.label else torch.zeros_like(fg) for k in (1, 2, 3)]
        return 10.0 * torch.cat(logits, dim=1)


@pytest.fixture(scope="module")
def edge_case(tmp_path_factory):
    """A (64, 56, 40) case whose brain touches the x border; tumour blobs at two brain edges."""
    root = tmp_path_factory.mktemp("edge")
    shape, folder = (64, 56, 40), root / "edge"
    folder.mkdir()
    brain = np.zeros(shape, bool)
    brain[6:64, 5:50, 4:36] = True
    tumour = np.zeros(shape, bool)
    tumour[6:10, 20:26, 10:16] = True  # far outside a centred 24^3 training crop (x 20:44)
    tumour[60:64, 30:34, 20:24] = True  # on the image border: the inference box reaches outside
    t2 = np.where(tumour, 300, np.where(brain, 100, 0)).astype(np.int16)
    for m in CHANNELS:
        data = t2 if m == "t2" else (brain * 50).astype(np.int16)
        nib.save(nib.Nifti1Image(data, AFFINE), folder / f"edge_{m}.nii.gz")
    return folder, np.where(tumour, 2, 0).astype(np.uint8)


def test_known_model_finds_tumour_at_brain_edge(edge_case, tmp_path):
    folder, expected = edge_case
    predictor = Predictor(ThresholdNet(), CPU, CHANNELS, "minmax", (16, 16, 16), divisor=8)
    for tta in (False, True):
        res = predict(predictor, folder, tmp_path / f"tta{tta}", tta=tta, overlap=0.25, progress=False)
        assert res.failed == {}
        labels = _assert_same_geometry(res.written[0], folder / "edge_t2.nii.gz")
        assert np.array_equal(labels, expected)


def test_small_et_becomes_necrosis(edge_case):
    folder, expected = edge_case
    case = discover_cases(folder)[0]
    n = int(np.count_nonzero(expected))  # 208 voxels
    for threshold, label in ((None, 4), (n, 4), (n + 1, 1)):
        predictor = Predictor(ThresholdNet(3), CPU, CHANNELS, "minmax", (32, 32, 32), divisor=8, et_threshold=threshold)
        pred = predict_case(predictor, case)
        assert np.array_equal(pred.labels, np.where(expected > 0, label, 0)) and pred.probabilities is None
    assert Predictor.from_checkpoint(_state(postprocess_et_threshold=50, tta=True), device="cpu").et_threshold == 50


def test_largest_tumour_only(edge_case, tmp_path):
    folder, expected = edge_case
    predictor = Predictor(ThresholdNet(), CPU, CHANNELS, "minmax", (32, 32, 32), divisor=8, largest_tumour=True)
    pred = predict_case(predictor, discover_cases(folder)[0])
    big = expected.copy()
    big[40:] = 0  # the 4x6x6 blob at the x = 6 edge beats the 4x4x4 one at the far border
    assert np.array_equal(pred.labels, big) and np.count_nonzero(big) == 144
    raw = predict(predictor, folder, tmp_path, postprocess=False, progress=False)  # the user's opt-out
    assert np.array_equal(np.asarray(nib.load(raw.written[0]).dataobj), expected)
    assert Predictor.from_checkpoint(_state(postprocess_largest_tumour=True), device="cpu").largest_tumour
    assert not Predictor.from_checkpoint(_state(), device="cpu").largest_tumour  # older checkpoints: off


def test_small_components_removed_in_this_scans_voxels(edge_case, tmp_path, capsys):
    folder, expected = edge_case
    case = discover_cases(folder)[0]
    for minimum, kept in (((64, 0, 0), 144 + 64), ((65, 0, 0), 144), ((145, 0, 0), 144)):  # the largest stays
        predictor = Predictor(ThresholdNet(), CPU, CHANNELS, "minmax", (32, 32, 32), divisor=8, min_component=minimum)
        assert np.count_nonzero(predict_case(predictor, case).labels) == kept, minimum
    # Sizes are tuned in training voxels: at 2 mm, 9 of them are 72 of this scan's 1 mm voxels
    at_2mm = Predictor(ThresholdNet(), CPU, CHANNELS, "minmax", (16, 16, 16), divisor=8, spacing=(2.0, 2.0, 2.0))
    parts, _ = ndimage.label(predict_case(at_2mm, case).labels > 0, np.ones((3, 3, 3)))
    small, big = sorted(np.bincount(parts.ravel())[1:])  # the blobs as resampled back: 56 and 136 voxels
    assert small < 9 * 8 <= big < 19 * 8
    for minimum, kept in (((9, 0, 0), big), ((19, 0, 0), big)):
        assert np.count_nonzero(predict_case(replace(at_2mm, min_component=minimum), case).labels) == kept, minimum
    on = Predictor.from_checkpoint(_state(postprocess_min_component=[0, 20, 5]), device="cpu")
    assert on.min_component == (0, 20, 5) and Predictor.from_checkpoint(_state(), device="cpu").min_component == (0, 0, 0)
    digest = replace(on, model_digest="d" * 64)
    assert digest.made_by() != replace(digest, min_component=(0, 0, 0)).made_by()
    older = replace(digest, min_component=(0, 0, 0))  # the fingerprint of files written before this step: unchanged
    settings = ("d" * 64, older.tta, older.overlap, None, older.largest_tumour, older.et_threshold)
    assert older.made_by() == hashlib.sha256(repr(settings).encode()).hexdigest()[:len(older.made_by())]
    predictor = Predictor(ThresholdNet(), CPU, CHANNELS, "minmax", (32, 32, 32), divisor=8, min_component=(145, 0, 0))
    assert predictor.settings_line() == ("no TTA; post-processing: components under WT 145 voxels "
                                          "removed but each region's largest")
    both = replace(predictor, tta=True, largest_tumour=True, et_threshold=50, min_component=(0, 200, 500), spacing=(1.0,) * 3)
    assert both.settings_line() == ("8-flip TTA; post-processing: largest tumour only; ET under 50 voxels as necrosis; "
                                    "components under TC 200 / ET 500 voxels removed but each region's largest "
                                    "(training voxels, 1x1x1 mm)")
    raw = predict(predictor, folder, tmp_path, postprocess=False, progress=True)
    assert "predict: no TTA; post-processing: none" in capsys.readouterr().err
    assert np.array_equal(np.asarray(nib.load(raw.written[0]).dataobj), expected)  # the user's opt-out


def test_skip_existing_and_force(raw, ckpt, tmp_path):
    out = tmp_path / "pred"
    predict(ckpt, raw, out, device="cpu", progress=False)
    os.utime(out / "c0.nii.gz", (1, 1))
    again = predict(ckpt, raw, out, device="cpu", progress=False)
    assert again.skipped == ["c0", "v1"] and again.written == [] and (out / "c0.nii.gz").stat().st_mtime == 1
    forced = predict(ckpt, raw / "c0", out, device="cpu", force=True, progress=False)
    assert forced.written == [out / "c0.nii.gz"] and (out / "c0.nii.gz").stat().st_mtime > 1
    more = predict(ckpt, raw / "c0", out, device="cpu", probabilities=True, progress=False)  # a new output: not skipped
    assert more.skipped == [] and more.written[1] == out / "c0_probabilities.nii.gz"
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_a_case_predicted_again_keeps_no_earlier_predictions_extras(raw, ckpt, tmp_path):
    """Probabilities, uncertainty and plot record no model: a case written again without them must
    not keep the earlier ones beside its new labels, to be skipped as done or read by the report."""
    out = tmp_path / "pred"
    first = predict(ckpt, raw / "c0", out, device="cpu", tta=True, probabilities=True, uncertainty=True, plots=True,
                    progress=False)
    assert [p.name for p in first.written] == ["c0.nii.gz", "c0_probabilities.nii.gz", "c0_uncertainty.nii.gz", "c0.png"]
    predict(ckpt, raw / "c0", out, device="cpu", tta=True, force=True, progress=False)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["c0.nii.gz"]
    again = predict(ckpt, raw / "c0", out, device="cpu", tta=True, uncertainty=True, progress=False)
    assert again.skipped == [] and (out / "c0_uncertainty.nii.gz").is_file()


def test_damaged_prediction_files_are_not_already_done(raw, ckpt, tmp_path, capsys):
    """A label file emptied, cut short or overwritten since (a full disk, a broken copy) is predicted
    again, not skipped as done; whole files are still skipped."""
    from tumorseg.io import nifti_whole

    out = tmp_path / "pred"
    first = predict(ckpt, raw, out, device="cpu", probabilities=True, progress=False)
    whole = {p.name: p.read_bytes() for p in first.written}
    assert all(nifti_whole(p) for p in first.written) and nifti_whole(raw / "c0" / "c0_t1.nii.gz")
    (out / "c0_probabilities.nii.gz").write_bytes(whole["c0_probabilities.nii.gz"][:-100])  # cut short
    (out / "v1.nii.gz").write_bytes(b"")
    assert not nifti_whole(out / "c0_probabilities.nii.gz") and not nifti_whole(out / "v1.nii.gz")
    again = predict(ckpt, raw, out, device="cpu", probabilities=True, progress=False)
    assert again.predicted == ["c0", "v1"] and again.skipped == []
    assert "2 case(s) with a damaged prediction file, predicted again: c0, v1" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in again.written} == whole
    (out / "v1.nii.gz").write_bytes(b"not a NIfTI file at all")
    assert predict(ckpt, raw, out, device="cpu", probabilities=True, progress=False).skipped == ["c0"]


def test_a_folder_keeps_to_one_model(raw, ckpt, tmp_path, capsys):
    """Skip-existing would keep one model's files beside another's: a run of another checkpoint, or
    of other label-deciding settings (TTA), is refused in one line; --force redoes the run's cases
    (not others'); files without a fingerprint (other tools) are not judged."""
    out = tmp_path / "pred"
    predict(ckpt, raw, out, device="cpu", progress=False)
    made_by = Predictor.from_checkpoint(ckpt, device="cpu").made_by()
    assert f"model={made_by}" in bytes(nib.load(out / "c0.nii.gz").header["descrip"]).decode()
    other = tmp_path / "other.pt"
    save_checkpoint(other, _state(filters=(4, 8, 12)))
    for model, settings in ((other, {}), (ckpt, {"tta": True}), (ckpt, {"overlap": 0.25})):
        with pytest.raises(TumorsegError, match=r"pred: 2 prediction\(s\) there come from another model or other "
                                                r"settings \(c0, v1\); --force redoes them with this one"):
            predict(model, raw, out, device="cpu", progress=False, **settings)
    with pytest.raises(TumorsegError, match=r"\(v1\); predict into another folder$"):  # v1 is not this run's
        predict(other, raw, out, device="cpu", progress=False, force=True, cases=["c0"])
    assert predict(ckpt, raw, out, device="cpu", progress=False).skipped == ["c0", "v1"]  # its own files: skipped
    redone = predict(ckpt, raw, out, device="cpu", progress=False, tta=True, redo_others=True)
    assert redone.predicted == ["c0", "v1"] and redone.skipped == []  # another's files redone (the demo's folder)
    with pytest.raises(TumorsegError, match=r"\(c0, v1\); predict into another folder$"):  # v1 outside the run
        predict(ckpt, raw, out, device="cpu", progress=False, redo_others=True, cases=["c0"])
    predict(ckpt, raw, out, device="cpu", progress=False, force=True)  # all of it the plain run's again
    assert len(predict(other, raw, out, device="cpu", progress=False, force=True).written) == 2
    foreign = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), AFFINE)
    foreign.header["descrip"] = b"nnunet model=3d_fullres"  # another tool's file: not judged
    nib.save(foreign, out / "v1.nii.gz")
    assert predict(other, raw, out, device="cpu", progress=False).skipped == ["c0", "v1"]
    foreign.header["descrip"] = b"tumorseg labels=brats2020:1,2,4"  # tumorseg's before it recorded the model
    nib.save(foreign, out / "v1.nii.gz")
    assert predict(other, raw, out, device="cpu", progress=False).skipped == ["c0", "v1"]
    assert "1 prediction(s) there record no model" in capsys.readouterr().err
    window = Predictor.from_checkpoint(ckpt, device="cpu", window=(32, 32, 32))  # the training patch, given
    assert window.made_by() == made_by
    hand_built = replace(Predictor.from_checkpoint(ckpt, device="cpu"), model_digest=None)
    assert hand_built.made_by() is None and predict(hand_built, raw, out, progress=False).skipped == ["c0", "v1"]


def test_a_case_whose_scans_changed_is_predicted_again(raw, ckpt, tmp_path, capsys):
    """Skip-existing keeps a case's labels only while its scans are the same files: a corrected
    case list (T1 and T1CE swapped back) or a scan exported again is predicted again; the same
    scans copied elsewhere (other paths and times) are not."""
    import shutil

    data, out = tmp_path / "data", tmp_path / "pred"
    shutil.copytree(raw, data)
    first = predict(ckpt, data, out, device="cpu", progress=False)
    recorded = bytes(nib.load(out / "c0.nii.gz").header["descrip"]).decode().rstrip("\x00")
    assert re.fullmatch(r"tumorseg labels=brats2020:1,2,4 model=[0-9a-f]{12} scans=[0-9a-f]{8}", recorded)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved, copy_function=shutil.copy)  # new paths and file times, the same scans
    assert predict(ckpt, moved, out, device="cpu", progress=False).skipped == ["c0", "v1"]
    t1, t1ce = (data / "c0" / f"c0_{m}.nii.gz" for m in ("t1", "t1ce"))
    t1.rename(tmp_path / "t1"), t1ce.rename(t1), (tmp_path / "t1").rename(t1ce)  # the two scans exchanged
    capsys.readouterr()
    again = predict(ckpt, data, out, device="cpu", progress=False)
    assert again.predicted == ["c0"] and again.skipped == ["v1"]
    assert f"note: {out}: 1 case(s) whose scans changed since they were predicted, predicted again: c0" in \
        capsys.readouterr().err
    assert predict(ckpt, data, out, device="cpu", progress=False).skipped == ["c0", "v1"]
    assert first.written[0].name == "c0.nii.gz"


def test_a_checkpoint_is_read_once_for_its_weights_and_fingerprint_and_unreadable_is_one_line(ckpt, monkeypatch):
    """The fingerprint is the SHA-256 of the very bytes the weights came from: a second read could
    see a best.pt that training replaced meanwhile."""
    import hashlib
    from pathlib import Path

    module = sys.modules["tumorseg.inference.predictor"]
    monkeypatch.setattr(module, "file_digest", lambda path: pytest.fail("the checkpoint was read a second time"))
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    assert predictor.model_digest == hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(TumorsegError, match=r"tiny.pt: cannot read the checkpoint \(Permission denied\)$"):
        Predictor.from_checkpoint(ckpt, device="cpu")


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "bad: missing modality 't1ce'"),
        ("corrupt", "bad_t2.nii.gz: cannot read NIfTI"),
        ("disjoint", "bad_flair.nii.gz and bad_t2.nii.gz do not overlap in world space"),
    ],
)
def test_broken_case_reported_others_written(ckpt, tmp_path, capsys, breakage, message):
    write_case(tmp_path / "raw", "good", seg=None)
    folder = write_case(tmp_path / "raw", "bad", seg=None)
    if breakage == "missing":
        (folder / "bad_t1ce.nii.gz").unlink()
    elif breakage == "corrupt":
        (folder / "bad_t2.nii.gz").write_bytes(b"\x1f\x8b garbage")
    else:
        nib.save(nib.Nifti1Image(np.ones((40, 40, 30), np.int16), np.eye(4)), folder / "bad_flair.nii.gz")
    res = predict(ckpt, tmp_path / "raw", tmp_path / "pred", device="cpu", progress=False)
    assert list(res.failed) == ["bad"] and message in res.failed["bad"] and res.predicted == ["good"]
    assert res.written == [tmp_path / "pred/good.nii.gz"] and not (tmp_path / "pred/bad.nii.gz").exists()
    err = capsys.readouterr().err
    assert f"error: {res.failed['bad']}" in err and len(err.strip().splitlines()) == 1


def test_a_whole_head_is_a_warning_and_still_predicted(ckpt, tmp_path, capsys):
    folder = write_case(tmp_path / "raw", "head", seg=None)
    for path in folder.glob("*.nii.gz"):  # a 32x32x26-voxel "brain" in 5 mm voxels: 3.3 L
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), AFFINE @ np.diag([5.0, 5.0, 5.0, 1.0])), path)
    res = predict(ckpt, tmp_path / "raw", tmp_path / "pred", device="cpu", progress=False)
    assert res.written == [tmp_path / "pred/head.nii.gz"]
    err = capsys.readouterr().err
    assert "warning: head: the scans' non-background region is 3.3 L" in err and "skull-stripped" in err


@pytest.mark.parametrize("target", ["labels", "regions"])
def test_probabilities_file(raw, tmp_path, target):
    predictor = Predictor.from_checkpoint(_state(target=target), device="cpu")
    res = predict(predictor, raw / "c0", tmp_path, tta=True, probabilities=True, progress=False)
    labels = np.asarray(nib.load(res.written[0]).dataobj)
    img = nib.load(res.written[1])
    probs = np.asarray(img.dataobj)
    assert img.shape == (40, 40, 32, 3 if target == "regions" else 4) and probs.dtype == np.float32
    assert np.array_equal(img.affine, AFFINE) and 0.0 <= probs.min() and probs.max() <= 1.0
    assert np.array_equal(probs[0, 0, 0], [0, 0, 0] if target == "regions" else [1, 0, 0, 0])  # outside the box
    channels = "WT,TC,ET" if target == "regions" else "BG,NCR,ED,ET"
    assert img.header["descrip"].tobytes().rstrip(b"\0").decode() == f"tumorseg probabilities: {channels}"
    if target == "labels":
        assert np.allclose(probs.sum(-1), 1.0, atol=1e-5)
        assert np.array_equal(labels, to_raw_labels(probs.argmax(-1)))


def test_switches_are_booleans(raw, ckpt, tmp_path):
    with pytest.raises(TumorsegError, match=r"^predict: tta='no', plots=1: give True or False$"):
        predict(ckpt, raw, tmp_path / "p", tta="no", plots=1, progress=False)
    assert not (tmp_path / "p").exists()


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(TumorsegError, match="lacks model, prepare, patch, target"):
        Predictor.from_checkpoint({"network": _state()["network"]})
    with pytest.raises(TumorsegError, match="label map"):
        Predictor.from_checkpoint({**_state(), "label_map": {0: 0, 1: 1, 2: 2, 3: 3}})
    with pytest.raises(TumorsegError, match="weights do not fit"):
        Predictor.from_checkpoint({**_state(), "model": _state(filters=(4, 8, 32))["model"]})
    with pytest.raises(TumorsegError, match="overlap must be in"):
        Predictor.from_checkpoint(_state(), device="cpu", overlap=1.0)
    state = _state()
    diverged = {k: v.clone() for k, v in state["model"].items()}
    first = next(k for k, v in diverged.items() if v.is_floating_point())
    diverged[first].view(-1)[0] = float("nan")  # a diverged run's weights: every case would be background
    with pytest.raises(TumorsegError, match=rf"^checkpoint: weights hold NaN or infinite values \({re.escape(first)}\); "):
        Predictor.from_checkpoint({**state, "model": diverged}, device="cpu")
    for damaged, name in (({"network": "garbage"}, "network"), ({"prepare": {}}, "prepare.channels, prepare.norm"),
                          ({"network": {**state["network"], "filters": "abc"}}, "network.filters"),
                          ({"patch": "x"}, "patch"), ({"target": 3}, "target"),
                          ({"prepare": {**state["prepare"], "spacing": "1mm"}}, "prepare.spacing"),
                          ({"inference": {"postprocess_min_component": [1, -2, 3]}}, "inference.postprocess_min_component"),
                          ({"inference": {"postprocess_min_component": [1, 2]}}, "inference.postprocess_min_component")):
        with pytest.raises(TumorsegError, match=rf"^checkpoint: damaged checkpoint settings \({name}\); not as tumorseg"):
            Predictor.from_checkpoint({**state, **damaged}, device="cpu")
    with pytest.raises(TumorsegError, match=r"^checkpoint: damaged checkpoint settings \(network: TypeError: "):
        Predictor.from_checkpoint({**state, "network": {**state["network"], "colour": "red"}}, device="cpu")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    write_case(tmp_path / "raw", "c0")
    with pytest.raises(TumorsegError, match="junk.pt: not a readable tumorseg checkpoint"):
        predict(tmp_path / "junk.pt", tmp_path / "raw", tmp_path / "out")


def test_trained_checkpoint_with_plots(tmp_path):
    from tumorseg.training import TrainConfig, train

    for i in range(3):
        write_case(tmp_path / "raw", f"c{i}", seed=i)
    prepare(tmp_path / "raw", tmp_path / "prep", PrepareConfig(crop_size=(32, 32, 32)), workers=1, progress=False)
    config = TrainConfig(filters=[4, 8, 16], epochs=1, batch_size=2, device="cpu")
    train(tmp_path / "prep", tmp_path / "run", config, progress=False)
    res = predict(tmp_path / "run/best.pt", tmp_path / "raw/c1", tmp_path / "pred", plots=True, progress=False)
    assert res.failed == {} and res.written == [tmp_path / "pred/c1.nii.gz", tmp_path / "pred/c1.png"]
    assert (tmp_path / "pred/c1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _assert_same_geometry(res.written[0], tmp_path / "raw/c1/c1_t2.nii.gz")


@pytest.mark.real
def test_real_case_geometry(real_data_dir, tmp_path):
    # MONAI's UNet: a few times faster than ours on 2 CPU cores; 96^3 windows without
    # overlap keep a whole 240x240x155 case to about 8 windows.
    save_checkpoint(tmp_path / "tiny.pt", _state(name="unet", patch=(96, 96, 96)))
    case = real_data_dir / "Brats18_2013_2_1"
    res = predict(tmp_path / "tiny.pt", case, tmp_path / "pred", device="cpu", overlap=0.0, progress=False)
    assert res.failed == {}
    labels = _assert_same_geometry(res.written[0], case / "Brats18_2013_2_1_t2.nii.gz")
    assert labels.shape == (240, 240, 155)


def test_batched_flip_tta_equals_one_flip_at_a_time():
    from monai.inferers import sliding_window_inference

    from tumorseg.inference.window import flip_dims, probabilities

    torch.manual_seed(0)
    model = build_network(**network_spec("unet", 3, 3, [4, 8, 16])).eval()
    image = torch.randn(1, 3, 40, 36, 32)
    batched = probabilities(model, image, (16, 16, 16), "regions", 0.5, tta=True, sw_batch_size=4)
    one_by_one = torch.zeros_like(batched)
    with torch.no_grad():
        for dims in flip_dims(True):
            x = torch.flip(image, dims) if dims else image
            probs = torch.sigmoid(sliding_window_inference(x, (16, 16, 16), 1, model, overlap=0.5, mode="gaussian"))
            one_by_one += (torch.flip(probs, dims) if dims else probs) / 8
    assert torch.allclose(batched, one_by_one, atol=1e-5)


def test_a_network_returned_between_passes_runs_the_passes_left():
    """`after_pass` hears each pass's seconds and the passes left; a network it returns (here the
    same weights, counted) runs the rest, and the probabilities stay the same."""
    from tumorseg.inference.window import probabilities

    torch.manual_seed(0)
    model = build_network(**network_spec("unet", 3, 4, [4, 8, 16])).eval()
    image = torch.randn(1, 3, 24, 20, 16)
    calls, heard = [], []

    class Counted(nn.Module):
        def forward(self, x):
            calls.append(len(x))
            return model(x)

    def after_pass(seconds, left):
        heard.append((seconds > 0, left))
        return Counted() if left == 2 else None  # from the third of the 4 passes on

    swapped = probabilities(model, image, (16, 16, 16), "labels", tta=True, sw_batch_size=4, after_pass=after_pass)
    assert heard == [(True, 3), (True, 2), (True, 1), (True, 0)]
    assert sum(calls) == 2 * 2 * 4  # 2 passes x 2 flips x 4 windows
    assert torch.allclose(swapped, probabilities(model, image, (16, 16, 16), "labels", tta=True, sw_batch_size=4),
                          atol=1e-6)


@pytest.mark.parametrize("classes", [2, 4, 5])
def test_labels_are_the_first_class_of_highest_probability(classes):
    from tumorseg.inference.window import first_argmax

    probs = torch.randint(0, 3, (classes, 9, 7, 5)).float()  # many ties: the first of them wins, as argmax's
    assert torch.equal(first_argmax(probs), probs.argmax(dim=0).to(torch.uint8))
    assert first_argmax(probs).dtype == torch.uint8


def test_torchrun_splits_the_cases_over_ranks(raw, ckpt, tmp_path):
    import subprocess
    import sys

    single = predict(ckpt, raw, tmp_path / "single", device="cpu", progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tumorseg.cli", "predict", str(ckpt), str(raw), str(tmp_path / "ddp"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("predicted 1 case(s)") == 2  # each rank one case: each case exactly once
    for path in single.written:
        assert np.array_equal(nib.load(path).get_fdata(), nib.load(tmp_path / "ddp" / path.name).get_fdata())
    again = subprocess.run([*cmd, "--report"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("predicted 0 case(s) into") == 2  # a re-run skips
    assert again.stdout.count(f"; report: open {tmp_path / 'ddp/report/index.html'}") == 1  # rank 0 wrote it
    # the report waits for every rank and is written once, by rank 0, over all the cases
    rows = (tmp_path / "ddp/report/volumes.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == sorted(p.name.split(".")[0] for p in single.written)
    assert not [p for p in (tmp_path / "ddp").iterdir() if p.name.startswith(".tmp")]


def test_torchrun_rank_with_a_failed_case_waits_for_the_others_report(raw, ckpt, tmp_path):
    """Rank 1's only case is broken: it exits 1, but only once rank 0 has predicted and reported
    (torchrun stops every rank when one exits non-zero)."""
    import shutil
    import subprocess
    import sys

    data = tmp_path / "data"
    shutil.copytree(raw, data)
    broken = write_case(data, "d1")  # sorted c0, d1, v1: rank 0 gets c0 and v1, rank 1 d1
    (broken / "d1_t2.nii.gz").write_bytes(b"not a scan")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tumorseg.cli", "predict", str(ckpt), str(data), str(tmp_path / "out"), "--device", "cpu", "--report"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "d1_t2.nii.gz" in proc.stderr
    assert "rank 0: predicted 2 case(s)" in proc.stdout and "rank 1: predicted 0 case(s)" in proc.stdout, proc.stdout
    rows = (tmp_path / "out/report/volumes.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["c0", "v1"]


def test_flip_uncertainty_zero_where_flips_agree_highest_where_they_disagree():
    from tumorseg.inference.window import flip_uncertainty

    flips = torch.zeros(8, 1, 3, 3, 1, 1)  # (flips, batch, regions, X, Y, Z)
    flips[:, 0, :, 0] = 0.3  # voxel 0: every flip equally unsure -> no disagreement
    flips[:, 0, :, 1] = torch.tensor([1.0, 0.0] * 4).view(8, 1, 1, 1)  # voxel 1: confident flips, half each way
    flips[:, 0, :, 2] = torch.tensor([0.9] * 6 + [0.1] * 2).view(8, 1, 1, 1)  # voxel 2: mostly agreeing
    u = flip_uncertainty(flips, "regions")[0, :, 0, 0]
    assert u[0] == pytest.approx(0.0, abs=1e-5) and u[1] == pytest.approx(3.0, abs=1e-4)  # 1 bit per region
    assert 0.0 < u[2] < u[1]
    softmax = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 4).view(8, 1, 2, 1, 1, 1)
    assert flip_uncertainty(softmax, "labels").item() == pytest.approx(1.0, abs=1e-4)


def test_predict_writes_uncertainty_on_the_scans_grid(raw, ckpt, tmp_path):
    with pytest.raises(TumorsegError, match="--tta"):
        predict(ckpt, raw, tmp_path / "no", device="cpu", uncertainty=True, progress=False)
    res = predict(ckpt, raw / "c0", tmp_path / "pred", device="cpu", tta=True, uncertainty=True, progress=False)
    assert res.written == [tmp_path / "pred/c0.nii.gz", tmp_path / "pred/c0_uncertainty.nii.gz"]
    img, ref = nib.load(res.written[1]), nib.load(raw / "c0/c0_t2.nii.gz")
    assert img.shape == ref.shape and np.array_equal(img.affine, ref.affine) and img.get_data_dtype() == np.float32
    u = np.asarray(img.dataobj)
    assert u.min() >= 0 and u.max() <= 2.0 + 1e-6 and not u[0, 0, 0]  # softmax of 4 classes: at most 2 bits


def test_predict_report_reads_the_uncertainty(raw, ckpt, tmp_path):
    res = predict(ckpt, raw / "c0", tmp_path / "pred", device="cpu", tta=True, uncertainty=True, report=True,
                  progress=False)
    assert res.report == tmp_path / "pred/report/index.html" and res.report.is_file()
    rows = (tmp_path / "pred/report/volumes.csv").read_text().splitlines()
    assert len(rows) == 2 and "uncertainty" in rows[0]


def test_window_validated_and_clipped_to_the_box():
    predictor = Predictor(nn.Identity(), CPU, CHANNELS, "minmax", (32, 32, 32), divisor=8, window=(64, 48, 256))
    assert predictor.roi((48, 56, 40)) == (48, 48, 40)  # larger than the box: the box
    assert Predictor(nn.Identity(), CPU, CHANNELS, "minmax", (32, 32, 32), divisor=8).roi((48, 56, 40)) == (32, 32, 32)
    for bad in ((60, 64, 64), (0, 64, 64), (64, 64), 60):
        with pytest.raises(TumorsegError, match="multiples of 8"):
            Predictor(nn.Identity(), CPU, CHANNELS, "minmax", (32, 32, 32), divisor=8, window=bad)
    assert check_window(48, 8) == check_window(np.int64(48), 8) == (48, 48, 48)  # one size for all axes
    whole = Predictor(nn.Identity(), CPU, CHANNELS, "minmax", (32, 32, 32), divisor=8, window="box")
    assert whole.roi((48, 56, 40)) == (48, 56, 40) and whole.roi((512, 512, 512)) == (512, 512, 512)
    assert replace(whole, divisor=3).roi((48, 57, 39)) == (48, 57, 39)  # any network's divisor
    with pytest.raises(TumorsegError, match="multiples of 8 or 'box', got 'brain'"):
        check_window("brain", 8)


def test_window_sets_the_network_calls(raw, tmp_path, monkeypatch):
    """A window as large as the brain's box is one forward per flip; the training patch many."""
    state = _state(tta=True)
    case = discover_cases(raw)[0]
    calls = {}
    for window in (None, (32, 32, 32), (16, 16, 16), (256, 256, 256), "box"):
        predictor = Predictor.from_checkpoint(state, device="cpu", engine="torch", window=window)
        predictor = replace(predictor, sw_batch_size=1)
        count = []
        handle = predictor.model.register_forward_pre_hook(lambda *_: count.append(1))
        pred = predict_case(predictor, case)
        handle.remove()
        calls[window] = (len(count), pred.labels)
    assert calls[(256, 256, 256)][0] == calls["box"][0] == 8  # one window per flip
    assert np.array_equal(calls[(256, 256, 256)][1], calls["box"][1])
    assert calls[(16, 16, 16)][0] > calls[None][0] == calls[(32, 32, 32)][0] >= 8
    assert np.array_equal(calls[None][1], calls[(32, 32, 32)][1])
    for bad in ((0, 16, 16), (10, 16, 16)):  # checked before any export or batch arithmetic
        with pytest.raises(TumorsegError, match="window must be"):
            Predictor.from_checkpoint(state, device="cpu", window=bad)
    small = Predictor.from_checkpoint(state, device="cpu", engine="torch")
    assert small.sw_batch_size > 1

    def batch_seen(predictor, *args, **kwargs):
        raise TumorsegError(f"batch {predictor.sw_batch_size}")  # stop each case: only the settings matter

    monkeypatch.setattr(sys.modules["tumorseg.inference.predict"], "predict_case", batch_seen)
    result = predict(small, raw, tmp_path / "big", window=(128, 128, 128), progress=False)
    assert result.failed and all("batch 1" in m for m in result.failed.values())  # a new window, a new batch size
    args = build_parser().parse_args(["predict", "x.pt", "in", "out", "--window", "64", "--engine", "torch"])
    assert args.window == (64, 64, 64) and args.engine == "torch"
    assert build_parser().parse_args(["predict", "x.pt", "in", "out", "--window", "Box"]).window == "box"


def test_each_torchrun_rank_predicts_on_its_local_gpu(monkeypatch):
    """Under torchrun rank r of a node asks for its LOCAL_RANK device (cuda:r), not cuda:0 for all."""
    module = sys.modules["tumorseg.inference.predictor"]
    asked = []

    def record(preference, local_rank=0):
        asked.append((preference, local_rank))
        return CPU  # no GPU here: the request is what matters

    monkeypatch.setattr(module, "resolve_device", record)
    monkeypatch.setenv("LOCAL_RANK", "3")
    Predictor.from_checkpoint(_state(), device="cuda", engine="torch")
    assert asked == [("cuda", 3)]


def test_a_torchrun_rank_stops_waiting_when_its_launcher_is_gone(monkeypatch):
    """SIGKILL of torchrun's launcher leaves its ranks running: one that has written its cases must
    not wait the day its store allows for ranks that will never come, and none waits past its timeout."""
    from datetime import timedelta

    import torch.distributed as dist

    from tumorseg.inference import ranks as module
    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=30), wait_for_workers=False)  # torchrun's
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                        "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(module, "MEETING_POLL", 0.05)
    with pytest.raises(TumorsegError, match="not every rank reached 'predicted' within"):
        module.meet("predicted", os.getppid(), timeout=timedelta(seconds=0.3))
    launcher = os.getppid()
    looks = iter([launcher, launcher])  # alive when the rank arrives, then reaped: its parent is another process
    monkeypatch.setattr(os, "getppid", lambda: next(looks, launcher + 1))
    with pytest.raises(TumorsegError, match=rf"the torchrun launcher \(pid {launcher}\) is gone; this rank stopped "
                                            r"after 'predicted': its cases are written, run the same command again"):
        module.meet("predicted", launcher, timeout=timedelta(seconds=30))
    store.set(f"tumorseg/predict/0/{next(module._MEETINGS) + 1}/reported/all", "1")  # every rank already there
    monkeypatch.setattr(os, "getppid", lambda: launcher)
    module.meet("reported", launcher, timeout=timedelta(seconds=30))
    module._check_launcher(None, "predicted")  # ranks started without torchrun: no launcher to lose
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert module.launcher_pid() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")
    assert module.launcher_pid() == launcher


def test_ranks_meet_on_rank_0s_store_whichever_arrives_last():
    """Where torchrun shares no store (its etcd rendezvous, RANK and WORLD_SIZE set by hand), rank 0
    hosts it: arriving last, it must not take the store away before the others have seen the meeting."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import os, time\nfrom tumorseg.inference.ranks import meet\n"
            "time.sleep(2.0 if os.environ['RANK'] == '0' else 0)\n"  # rank 0 still busy with its own cases
            "meet('predicted', os.getppid())\nmeet('reported', os.getppid())\nprint('met', flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "False"})
             for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all(out == "met\n" for out, _ in outs), outs


def test_a_predictors_own_overlap_is_kept_unless_given(edge_case, tmp_path):
    folder, _ = edge_case
    own = Predictor(ThresholdNet(), CPU, CHANNELS, "minmax", (32, 32, 32), divisor=8, overlap=0.25,
                    model_digest="d" * 64)
    for given, used in ((None, 0.25), (0.5, 0.5)):
        out = predict(own, folder, tmp_path / str(given), overlap=given, progress=False).written[0]
        made_by = bytes(nib.load(out).header["descrip"]).decode().rstrip("\x00")
        assert f"model={replace(own, overlap=used).made_by()}" in made_by.split(), (given, made_by)


def test_a_script_predicting_on_one_rank_alone(raw, ckpt, tmp_path, monkeypatch, capsys):
    """A script of its own torchrun job predicting on rank 0 alone: `distributed=False` predicts every
    case, and a rank whose others never come says why it waits."""
    from datetime import timedelta

    import torch.distributed as dist

    from tumorseg.inference import ranks as module

    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=30), wait_for_workers=False)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                        "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(name, value)
    result = predict(ckpt, raw, tmp_path / "alone", device="cpu", progress=False, distributed=False)
    assert sorted(p.name for p in result.written) == ["c0.nii.gz", "v1.nii.gz"] and module.rank_world() == (0, 2)
    monkeypatch.setattr(module, "WAIT_NOTE_S", 0.0)
    with pytest.raises(TumorsegError, match="not every rank reached 'predicted' within"):
        module.meet("predicted", None, timeout=timedelta(seconds=0.5))
    assert ("note: rank 0 waits for the other 1 rank(s) to reach 'predicted': every rank of the job predicts its "
            "share (a script predicting on one rank alone: predict(..., distributed=False))") in capsys.readouterr().err
    for wrong in ("no", 0):  # checked under torchrun's variables as without them
        with pytest.raises(TumorsegError, match=rf"distributed={wrong!r}: give True or False"):
            predict(ckpt, raw, tmp_path / "x", device="cpu", progress=False, distributed=wrong)


def test_predict_case_takes_a_case_folder(raw, ckpt):
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    case = discover_cases(raw / "c0")[0]
    assert np.array_equal(predict_case(predictor, raw / "c0").labels, predict_case(predictor, case).labels)
    with pytest.raises(TumorsegError, match=r"2 cases, not one: give one case's folder"):
        predict_case(predictor, str(raw))
