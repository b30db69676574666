"""Every dataset layout through every command, on synthetic and on real cases converted on the fly."""

import csv
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from tumorseg.errors import TumorsegError
from tumorseg.evaluation import evaluate
from tumorseg.inference import Predictor, predict
from tumorseg.cli import main
from tumorseg.labels import (CONVENTIONS, MODALITIES, canonical_modality, convention, convention_from_names,
                             convention_from_header, convention_from_regions, convention_from_tag)
from tumorseg.layouts import LAYOUTS, discover_cases, layout_labels, load_images, write_dataset_json
from tumorseg.prepare import PrepareConfig, prepare
from tumorseg.synth import synthesize
from tumorseg.training import TrainConfig, train

from factory import AFFINE, convert_case, write_case

SHAPE = (48, 48, 40)
SMALL = dict(crop_size=(32, 32, 32), min_tumour=0.0, val_fraction=0.34, channels=MODALITIES)
EXPECTED_LABELS = {"brats2020": "brats2020", "brats2021": "brats2020", "brats2023": "brats2023", "msd": "msd", "nnunet": "msd",
                   "plain": "brats2020", "bids": "brats2020"}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same 3 synthetic cases written in every layout."""
    root = tmp_path_factory.mktemp("layouts")
    for layout in LAYOUTS:
        synthesize(root / layout, 3, shape=SHAPE, seed=0, layout=layout, progress=False)
    (root / "msd/imagesTr/._BRATS_001.nii.gz").write_bytes(b"\x00\x05macOS resource fork")  # the archive carries these
    return root


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_detected_with_modalities_and_labels(layouts, layout):
    cases = discover_cases(layouts / layout)
    assert len(cases) == 3 and {c.layout for c in cases} == {layout}
    assert cases[0].labels == CONVENTIONS[EXPECTED_LABELS[layout]] and all(c.seg is not None for c in cases)
    assert all(set(c.images) == set(MODALITIES) for c in cases)
    if layout == "msd":  # one 4D file, channel order from dataset.json: FLAIR, T1w, t1gd, T2w
        assert cases[0].channel_index == {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
    reference = discover_cases(layouts / "brats2020")[0]
    for vol, ref in zip(load_images(cases[0], MODALITIES), load_images(reference, MODALITIES)):
        assert np.array_equal(vol.data, ref.data)  # each modality found by meaning
    seg = np.asarray(nib.load(cases[0].seg).dataobj)
    ref_seg = np.asarray(nib.load(reference.seg).dataobj)
    assert np.array_equal(cases[0].labels.regions(seg), CONVENTIONS["brats2020"].regions(ref_seg))


@pytest.mark.parametrize("layout", ["brats2023", "msd", "nnunet"])
def test_show_draws_any_layout_with_its_labels(layouts, layout, tmp_path):
    from tumorseg.plots.case_images import load_case
    from tumorseg.plots.slices import save_case_plot

    case = discover_cases(layouts / layout)[1]
    data = load_case(case.image("t2"))  # one file of the case, even inside imagesTr/
    assert data.case_id == case.case_id and data.names == MODALITIES and data.labels == case.labels
    reference = load_case(discover_cases(layouts / "brats2020")[1])
    assert np.array_equal(data.truth, reference.truth) and np.array_equal(data.images, reference.images)
    out = save_case_plot(case, pred=case.seg, out=tmp_path / "case.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_dataset_folders_found_from_any_level(layouts):
    assert len(discover_cases(layouts / "msd/imagesTr")) == 3  # pointed at the image folder itself
    with pytest.raises(TumorsegError, match="mixes dataset layouts"):
        discover_cases(layouts)  # five datasets under one folder


def test_mixed_and_unreadable_folders_are_one_line(tmp_path, layouts):
    write_case(tmp_path / "mix", "Brats18_A_1")
    convert_dir = tmp_path / "mix" / "BraTS-GLI-00001-000"
    convert_dir.mkdir()
    for name in ("t1n", "t1c", "t2w", "t2f"):
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.int16), AFFINE), convert_dir / f"BraTS-GLI-00001-000-{name}.nii.gz")
    with pytest.raises(TumorsegError, match=r"mixes dataset layouts \(1 brats2020, 1 brats2023 cases\)"):
        discover_cases(tmp_path / "mix")
    bad = tmp_path / "bad"
    (bad / "imagesTr").mkdir(parents=True)
    (bad / "dataset.json").write_text("{not json")
    with pytest.raises(TumorsegError, match="unreadable dataset.json"):
        discover_cases(bad)
    (bad / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}}))
    with pytest.raises(TumorsegError, match="channel 0 'CT' is not an MRI modality"):
        discover_cases(bad)
    (bad / "dataset.json").write_text(json.dumps({"channel_names": {"T1": "T1"}, "labels": {"background": 0}}))
    with pytest.raises(TumorsegError, match="channel key 'T1' is not a channel number"):
        discover_cases(bad)
    (bad / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"edema": "one"}}))
    with pytest.raises(TumorsegError, match="must map names to integer values"):
        discover_cases(bad)
    _touch(tmp_path / "prep" / "images", "case_1.npy")
    (tmp_path / "prep" / "manifest.json").write_text("{}")
    with pytest.raises(TumorsegError, match=r"prep: a prepared folder \(arrays for training\); give the scans"):
        discover_cases(tmp_path / "prep")
    with pytest.raises(TumorsegError, match=r"no cases found \(expected .*a BIDS dataset, or a cases.csv\)"):
        discover_cases(tmp_path / "prep" / "images")


def test_aliases_and_dataset_json_label_forms():
    assert [canonical_modality(n) for n in ("T1w", "t1n", "t1gd", "T1c", "T2w", "t2f", "FLAIR", "CT")] == [
        "t1", "t1", "t1ce", "t1ce", "t2", "flair", "flair", None]
    names = ("T1-CE", "T1-C", "T1-post", "t1_ce", "T1 CE", "T1-w", "T1-native", "T2-w", "T2-FLAIR", "T1-Gd")
    assert [canonical_modality(n) for n in names] == ["t1ce"] * 5 + ["t1", "t1", "t2", "flair", "t1ce"]
    msd = convention_from_names({"edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}, "x")
    regions = convention_from_regions({"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}, "x")
    assert msd == regions == CONVENTIONS["msd"]
    custom = convention_from_names({"necrosis": 1, "edema": 2, "enhancing": 3, "resection cavity": 4}, "mine")
    assert custom == CONVENTIONS["brats2023"]
    seg = np.array([0, 1, 2, 3])  # MSD: oedema 1, non-enhancing 2, enhancing 3
    assert np.array_equal(CONVENTIONS["msd"].regions(seg), [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    assert np.array_equal(CONVENTIONS["msd"].to_training(seg), [0, 2, 1, 3])


def test_brats_peds_2024_labels_and_their_dataset_json_forms():
    """BraTS-PEDs 2024: 1 ET, 2 non-enhancing tumour, 3 cystic component, 4 oedema; NET and the cyst
    are one core class (TC = 1 + 2 + 3), written back as NET; nnU-Net's dataset.json forms name it."""
    peds = CONVENTIONS["peds2024"]
    seg = np.array([0, 1, 2, 3, 4])
    assert np.array_equal(peds.to_training(seg), [0, 3, 1, 1, 2]) and peds.invalid(seg) == []
    assert np.array_equal(peds.regions(seg), [[0, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 1, 0, 0, 0]])
    assert np.array_equal(peds.from_training(np.arange(4)), [0, 2, 4, 1])
    assert convention_from_tag(peds.tag()) is peds and convention(peds.to_dict()) == peds
    assert convention(CONVENTIONS["msd"].to_dict() | {"core_extra": None}) == CONVENTIONS["msd"]  # older checkpoints
    named = convention_from_names({"background": 0, "ET": 1, "NonEnh": 2, "Cystic": 3, "Edema": 4}, "nnunet")
    regions = convention_from_regions({"whole_tumor": [1, 2, 3, 4], "tumor_core": [1, 2, 3], "enhancing_tumor": [1]},
                                      "nnunet")
    assert named == regions == peds
    with pytest.raises(TumorsegError, match="one oedema label"):
        convention_from_regions({"whole": [1, 2, 3, 4], "core": [1, 2], "enhancing": [1]}, "x")


def _peds_dataset(layouts, root, numbering: str, oedema: bool = True) -> Path:
    """The synthetic BraTS 2023 cases as BraTS-PED cases: in 2024's numbers (half of the core a cyst) or 2023's."""
    for i, case in enumerate(discover_cases(layouts / "brats2023"), start=1):
        cid = f"BraTS-PED-{i:05d}-000"
        (root / cid).mkdir(parents=True)
        for modality, path in case.images.items():
            (root / cid / f"{cid}-{path.name.split('-')[-1]}").symlink_to(path)
        seg = nib.load(case.seg)
        classes = CONVENTIONS["brats2023"].to_training(np.asarray(seg.dataobj))
        if not oedema:
            classes[classes == 2] = 0
        raw = CONVENTIONS[numbering].from_training(classes)
        if numbering == "peds2024":
            core = np.flatnonzero(raw == 2)
            raw.flat[core[: len(core) // 2]] = 3  # the cystic component
        nib.save(nib.Nifti1Image(raw, seg.affine), root / cid / f"{cid}-seg.nii.gz")
    return root


def test_brats_peds_2024_told_from_2023_by_the_release_folder_or_label_4(layouts, tmp_path):
    """The same file names carry two numberings: 2024's where a folder names the release or a
    segmentation holds 4 (oedema; PED has no cavity), else 2023's, noted either way."""
    by_value = _peds_dataset(layouts, tmp_path / "peds", "peds2024")
    by_name = _peds_dataset(layouts, tmp_path / "BraTS2024-PED-Challenge-TrainingData", "peds2024", oedema=False)
    old = _peds_dataset(layouts, tmp_path / "ASNR-MICCAI-BraTS2023-PED-Challenge-TrainingData", "brats2023")
    for root, name, why in ((by_value, "peds2024", "holds label 4"), (by_name, "peds2024", "names a BraTS-PEDs release"),
                            (old, "brats2023", "if they are, name the release in a folder above them")):
        cases = discover_cases(root, need_images=False)
        assert {c.labels.name for c in cases} == {name} and all(why in c.seg_note for c in cases), root
    assert {c.labels.name for c in discover_cases(layouts / "brats2023")} == {"brats2023"}  # GLI: 4 is a cavity
    import tumorseg.layouts.peds as layouts_module

    reads = layouts_module._holds_version.cache_info().misses
    discover_cases(by_value, need_images=False)  # a second search (predict, then its report): no file read again
    assert layouts_module._holds_version.cache_info().misses == reads
    dated = _peds_dataset(layouts, tmp_path / "BraTS2023-PED_downloaded_2024-03", "brats2023")  # a date, no release
    assert {c.labels.name for c in discover_cases(dated)} == {"brats2023"}
    mixed = tmp_path / "mixed"  # GLI and PED cases side by side: each read in its own numbers
    for case in discover_cases(layouts / "brats2023")[:1]:
        (mixed / case.case_id).mkdir(parents=True)
        for path in (*case.images.values(), case.seg):
            (mixed / case.case_id / path.name).symlink_to(path)
    for case in discover_cases(by_value):
        (mixed / case.case_id).symlink_to(case.folder)
    read = {c.case_id: c.labels.name for c in discover_cases(mixed)}
    assert read == {"BraTS-GLI-00001-000": "brats2023", **{f"BraTS-PED-0000{i}-000": "peds2024" for i in (1, 2, 3)}}

    prepared = prepare(by_value, tmp_path / "prep", PrepareConfig(crop_size=(32, 32, 32), min_tumour=0.0),
                       workers=1, progress=False)
    assert prepared.manifest["labels"]["name"] == "peds2024" and len(prepared.kept) == 3
    for case in discover_cases(layouts / "brats2023"):  # the cyst is core: the same classes as the GLI original
        cid = case.case_id.replace("GLI", "PED")
        gli = prepare(case.folder, tmp_path / f"prep-{cid}", PrepareConfig(crop_size=(32, 32, 32), min_tumour=0.0),
                      workers=1, progress=False)
        assert np.array_equal(np.load(tmp_path / "prep/masks" / f"{cid}.npy"),
                              np.load(tmp_path / f"prep-{cid}/masks/{gli.kept[0]}.npy"))

    preds = tmp_path / "preds"  # another tool's, in 2023's numbers: scored by meaning with --pred-labels
    preds.mkdir()
    for case in discover_cases(old):
        (preds / f"{case.case_id}.nii.gz").symlink_to(case.seg)
    scores = evaluate(preds, by_value, progress=False, pred_labels="brats2023")
    assert not scores.failed and all(r.metrics[reg]["dice"] == 1.0 for r in scores.rows for reg in ("WT", "TC", "ET"))
    assert any("read as BraTS-PEDs 2024 labels" in n for n in scores.notes)
    # the option names the new convention: 2023's truth forced into 2024's reading moves every ET
    assert main(["evaluate", str(preds), str(old), "--labels", "peds2024", "--pred-labels", "brats2023",
                 "--out", str(tmp_path / "m.csv")]) == 0
    with open(tmp_path / "m.csv") as fh:
        assert all(float(row["ET_dice"]) < 1 for row in csv.DictReader(fh))


def test_prepared_arrays_identical_in_every_layout(layouts, tmp_path):
    arrays = {}
    for layout in LAYOUTS:
        res = prepare(layouts / layout, tmp_path / layout, PrepareConfig(**SMALL), workers=1, progress=False)
        assert res.manifest["layout"] == layout and res.manifest["labels"]["name"] == EXPECTED_LABELS[layout]
        ids = [c["case_id"] for c in res.manifest["cases"]]
        arrays[layout] = [(np.load(tmp_path / layout / "images" / f"{i}.npy"), np.load(tmp_path / layout / "masks" / f"{i}.npy"))
                          for i in ids]
    for layout in LAYOUTS:
        for (img, mask), (ref_img, ref_mask) in zip(arrays[layout], arrays["brats2020"]):
            assert np.array_equal(img, ref_img) and np.array_equal(mask, ref_mask)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prepare_train_predict_evaluate_on_each_layout(layouts, layout, tmp_path):
    prepare(layouts / layout, tmp_path / "prep", PrepareConfig(**SMALL), workers=1, progress=False)
    train(tmp_path / "prep", tmp_path / "run", TrainConfig(epochs=1, filters=[4, 8, 16], batch_size=2, seed=0), progress=False)
    state = torch.load(tmp_path / "run/best.pt", weights_only=True)
    assert state["layout"] == layout and state["labels"]["name"] == EXPECTED_LABELS[layout]
    res = predict(tmp_path / "run/best.pt", layouts / layout, tmp_path / "pred", device="cpu", progress=False)
    assert not res.failed and len(res.written) == 3
    conv = layout_labels(layout)
    for path in res.written:
        img = nib.load(path)
        assert set(np.unique(np.asarray(img.dataobj)).tolist()) <= set(conv.values)
        assert f"labels={conv.name}:" in bytes(img.header["descrip"]).decode()
    scores = evaluate(tmp_path / "pred", layouts / layout, progress=False)
    assert scores.failed == [] and len(scores.rows) == 3


def test_predict_writes_any_convention_and_evaluate_reads_it(layouts, tmp_path):
    """A brats2023-layout prediction written as MSD labels still scores perfectly against its truth."""
    truth = layouts / "brats2023"
    for case in discover_cases(truth):
        seg = np.asarray(nib.load(case.seg).dataobj)
        for name in ("msd", "brats2020"):
            out = CONVENTIONS[name].from_training(CONVENTIONS["brats2023"].to_training(seg))
            img = nib.Nifti1Image(out, nib.load(case.seg).affine)
            img.header["descrip"] = CONVENTIONS[name].tag().encode()
            (tmp_path / name).mkdir(exist_ok=True)
            nib.save(img, tmp_path / name / f"{case.case_id}.nii.gz")
    for name in ("msd", "brats2020"):
        scores = evaluate(tmp_path / name, truth, progress=False)
        assert scores.failed == [] and all(r.metrics[reg]["dice"] == 1.0 for r in scores.rows for reg in ("WT", "TC", "ET"))
    assert "lesion_dice" in scores.rows[0].metrics["ET"] and "lesion-wise" in scores.table()


def test_evaluate_ground_truth_without_images(layouts, tmp_path):
    src = discover_cases(layouts / "brats2023")
    for case in src:  # segmentation-only case folders, then a flat labelsTr-style folder
        (tmp_path / "segonly" / case.case_id).mkdir(parents=True)
        (tmp_path / "segonly" / case.case_id / case.seg.name).write_bytes(case.seg.read_bytes())
        (tmp_path / "flat").mkdir(exist_ok=True)
        (tmp_path / "flat" / f"{case.case_id}.nii.gz").write_bytes(case.seg.read_bytes())
    for gt in ("segonly", "flat"):
        scores = evaluate(tmp_path / "flat", tmp_path / gt, progress=False)
        assert scores.failed == [] and all(r.metrics["ET"]["dice"] == 1.0 for r in scores.rows)
    msd = layouts / "msd" / "labelsTr"  # MSD numbers need the convention named, or dataset.json beside
    assert evaluate(msd, msd, progress=False).failed == []
    flat_msd = tmp_path / "flat_msd"
    flat_msd.mkdir()
    for f in msd.glob("*.nii.gz"):
        (flat_msd / f.name).write_bytes(f.read_bytes())
    assert evaluate(flat_msd, flat_msd, labels="msd", progress=False).failed == []


def test_resection_cavity_is_kept_or_dropped_never_merged(tmp_path):
    folder = tmp_path / "raw" / "BraTS-GLI-00007-100"
    folder.mkdir(parents=True)
    brain = np.zeros((40, 40, 32), np.int16)
    brain[4:-4, 4:-4, 3:-3] = 500
    for name in ("t1n", "t1c", "t2w", "t2f"):
        nib.save(nib.Nifti1Image(brain, AFFINE), folder / f"{folder.name}-{name}.nii.gz")
    seg = np.zeros(brain.shape, np.uint8)
    seg[10:20, 10:20, 10:20] = 2
    seg[12:16, 12:16, 12:16] = 3
    seg[24:30, 24:30, 10:16] = 4  # resection cavity (BraTS 2024 post-treatment)
    nib.save(nib.Nifti1Image(seg, AFFINE), folder / f"{folder.name}-seg.nii.gz")
    cfg = dict(crop_size=(32, 32, 32), min_tumour=0.0, val_fraction=0.0)
    res = prepare(tmp_path / "raw", tmp_path / "none", PrepareConfig(**cfg), workers=1, progress=False)
    assert "resection cavity (label 4) present" in res.failed[folder.name] and "--cavity keep|drop" in res.failed[folder.name]
    for mode, cavity_class in (("keep", 4), ("drop", 0)):
        res = prepare(tmp_path / "raw", tmp_path / mode, PrepareConfig(cavity=mode, **cfg), workers=1, progress=False)
        mask = np.load(tmp_path / mode / "masks" / f"{folder.name}.npy")
        box = [tuple(b) for b in res.manifest["cases"][0]["crop_box"]]
        cavity = (slice(24 - box[0][0], 30 - box[0][0]), slice(24 - box[1][0], 30 - box[1][0]), slice(10 - box[2][0], 16 - box[2][0]))
        assert np.all(mask[cavity] == cavity_class) and np.count_nonzero(mask == 3) == 64
        assert res.manifest["cases"][0]["tumour_fraction"] == 1000 / 32**3  # the cavity is not tumour
    # Kept, it is a fifth softmax class through training and prediction, written back as label 4.
    config = dict(epochs=1, filters=[4, 8, 16], batch_size=1, seed=0, postprocess=True)
    with pytest.raises(TumorsegError, match="no BraTS region"):
        train(tmp_path / "keep", tmp_path / "bad", TrainConfig(target="regions", **config), progress=False)
    train(tmp_path / "keep", tmp_path / "run", TrainConfig(**config), progress=False)
    state = torch.load(tmp_path / "run/best.pt", weights_only=True)
    assert state["network"]["out_channels"] == 5 and state["prepare"]["cavity"] == "keep"
    predictor = Predictor.from_checkpoint(state, device="cpu")
    cavity_net = Predictor(CavityNet(), torch.device("cpu"), predictor.channels, predictor.norm, predictor.patch, divisor=8)
    (path,) = predict(cavity_net, tmp_path / "raw", tmp_path / "pred", progress=False).written
    assert set(np.unique(np.asarray(nib.load(path).dataobj)).tolist()) == {0, 4}  # brats2023's cavity value


class CavityNet(nn.Module):
    """Class 4 (resection cavity) wherever there is brain."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        brain = (x[:, :1] != 0).to(x.dtype)
        return 10.0 * torch.cat([1 - brain, *(torch.zeros_like(brain),) * 3, brain], dim=1)


class FlairNet(nn.Module):
    """A fixed, smooth 'network': whole tumour where FLAIR (channel 3) is bright, ET where T1CE is too.

    Averaging over 5^3 voxels first gives it a receptive field and smooth outputs, like a trained
    network's, rather than a voxel-wise threshold of the noise (one axis at a time: the same mean,
    several times faster).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, [1, 3]]  # T1CE, FLAIR
        for size in ((5, 1, 1), (1, 5, 1), (1, 1, 5)):
            x = nn.functional.avg_pool3d(x, size, stride=1, padding=[s // 2 for s in size], count_include_pad=False)
        wt = torch.sigmoid(8 * (x[:, 1:2] - 1.5))
        et = wt * torch.sigmoid(8 * (x[:, 0:1] - 1.5))
        return torch.log(torch.cat([1 - wt, 0.2 * wt, 0.8 * wt - 0.5 * et, et], dim=1).clamp_min(1e-6))


def _flair_predictor() -> Predictor:
    """FlairNet behind the real pipeline, in one window over the brain's box (no window seams):
    fast enough for the real-case tests."""
    return Predictor(FlairNet(), torch.device("cpu"), MODALITIES, "zscore", (64, 64, 64), divisor=16,
                     spacing=(1.0, 1.0, 1.0), window="box")


def _wt_dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


ODD_NAMES = {"t1": "3_AX_T1_SE.nii.gz", "t1ce": "7_T1_MPRAGE_POST.nii.gz", "t2": "4_AX_T2.nii.gz",
             "flair": "5_AX_FLAIR.nii.gz", "seg": "ROI.nii.gz"}


def _case_list(cases: dict, folder, delimiter=","):
    """Cases' files copied under names no layout knows, and the table naming them."""
    import shutil

    lines = [delimiter.join(["Subject", "Age", "T1w", "T1 Gd", "T2", "FLAIR", "label"])]
    for case_id, files in cases.items():
        (folder / "scans" / case_id).mkdir(parents=True)
        for kind, path in files.items():
            shutil.copy(path, folder / "scans" / case_id / ODD_NAMES[kind])
        cells = [f"scans/{case_id}/{ODD_NAMES[k]}" if k in files else "" for k in ("t1", "t1ce", "t2", "flair", "seg")]
        lines.append(delimiter.join([case_id, "61", *cells]))
    table = folder / ("cases.tsv" if delimiter == "\t" else "cases.csv")
    table.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    return table


def _files(case) -> dict:
    return {**case.images, **({"seg": case.seg} if case.seg else {})}


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_a_case_list_names_each_cases_files(layouts, tmp_path, delimiter):
    originals = {c.case_id: c for c in discover_cases(layouts / "brats2020")}
    table = _case_list({cid: _files(c) for cid, c in originals.items()}, tmp_path, delimiter)
    cases = discover_cases(table)
    assert [c.case_id for c in cases] == sorted(originals) and {c.layout for c in cases} == {"list"}
    for case in cases:
        assert case.images == {m: tmp_path / "scans" / case.case_id / ODD_NAMES[m] for m in MODALITIES}
        assert case.seg == tmp_path / "scans" / case.case_id / "ROI.nii.gz"
    out = predict(_flair_predictor(), table, tmp_path / "pred", progress=False)
    ref = predict(_flair_predictor(), layouts / "brats2020", tmp_path / "ref", progress=False)
    for a, b in zip(out.written, ref.written):
        assert a.name == b.name and np.array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())
    ev = evaluate(tmp_path / "pred", table)
    assert [(r.case_id, r.status) for r in ev.rows] == [(cid, "ok") for cid in sorted(originals)]
    prep = prepare(table, tmp_path / "prep", PrepareConfig(**SMALL), workers=1, progress=False)
    assert prep.manifest["layout"] == "list" and len(prep.kept) == 3


def test_case_list_paths_gaps_and_mistakes(layouts, tmp_path, capsys):
    (case, other, _) = discover_cases(layouts / "brats2020")
    table = _case_list({"p1": _files(case), "p2": {m: p for m, p in _files(other).items() if m != "t1ce"}}, tmp_path)
    absolute = tmp_path / "abs.csv"  # absolute paths, a case without its truth, extra columns ignored
    absolute.write_text("id,flair,t1,t2,t1ce,notes\n" + f"p3,{','.join(str(other.images[m]) for m in ('flair', 't1', 't2', 't1ce'))},x\n")
    (p3,) = discover_cases(absolute)
    assert p3.images == other.images and p3.seg is None
    unnamed = tmp_path / "unnamed.csv"  # a column named for its file, not its modality: said when it is needed
    unnamed.write_text("id,t1,t1ce,t2,5_AX_FLAIR,age\n" + f"p4,{','.join(str(other.images[m]) for m in MODALITIES)},61\n")
    (p4,) = discover_cases(unnamed)
    with pytest.raises(TumorsegError, match=r"p4: no flair column in .*unnamed.csv \(columns not read: 5_AX_FLAIR, age; "
                                            r"name it by a modality"):
        p4.image("flair")
    assert p4.image("t2") == other.images["t2"]
    res = predict(_flair_predictor(), table, tmp_path / "pred", progress=False)
    assert list(res.failed) == ["p2"] and "p2: missing modality 't1ce' in " + str(table) in res.failed["p2"]
    (tmp_path / "scans/p1/4_AX_T2.nii.gz").unlink()
    res = predict(_flair_predictor(), table, tmp_path / "pred2", progress=False)
    assert "p1: " + str(tmp_path / "scans/p1/4_AX_T2.nii.gz") + ": file not found" in res.failed["p1"]
    assert [c.case_id for c in discover_cases(tmp_path)] == ["p1", "p2"]  # the folder given for the table in it
    for text, message in [
        ("t1,t2\n", "no cases listed"),
        ("t1,t2\na.nii,b.nii\n", "no case id column"),
        ("case,age\np1,50\n", "no modality or segmentation column"),
        ("case,FLAIR,t2f\np1,a,b\n", "columns FLAIR and t2f both name the flair"),
        ("case,t1\n../x,a.nii\n", "line 2: '../x' cannot name a case's output files"),
        ("case,t1\np1,a.nii\np1,b.nii\n", "case ids found more than once: p1"),
    ]:
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(TumorsegError, match=f"bad.csv: {message}"):
            discover_cases(tmp_path / "bad.csv")


def test_one_scan_given_as_two_modalities_is_refused(layouts, tmp_path):
    """A table naming one 3-D scan for t1 and t1ce (as a relative and an absolute path, too): one
    line, not a KeyError, and never one scan read as two modalities."""
    (case, *_) = discover_cases(layouts / "brats2020")
    (tmp_path / "scans").mkdir()
    shutil.copy(case.images["t1ce"], tmp_path / "scans/gad.nii.gz")
    rest = f"{case.images['t2']},{case.images['flair']}\n"
    table, spelled = tmp_path / "same.csv", tmp_path / "spelled.csv"
    table.write_text(f"case,t1,t1ce,t2,flair\ndup,scans/gad.nii.gz,scans/gad.nii.gz,{rest}")
    spelled.write_text(f"case,t1,t1ce,t2,flair\ndup,{tmp_path / 'scans/gad.nii.gz'},./scans/gad.nii.gz,{rest}")
    for data in (table, spelled):
        (dup,) = discover_cases(data)
        with pytest.raises(TumorsegError, match=r"dup: .* is given as both t1 and t1ce; each modality needs its own scan"):
            load_images(dup, MODALITIES)
        res = predict(_flair_predictor(), data, tmp_path / f"pred-{data.stem}", progress=False)
        assert "is given as both t1 and t1ce" in res.failed["dup"]
        with pytest.raises(TumorsegError, match=r"dup: .* is given as both t1ce and t1; each modality needs"):
            load_images(dup, ("t2", "t1ce", "flair"))  # the seed's channels: T1 not read, yet given as T1CE too


def test_a_folder_of_scans_named_for_no_modality_is_said_not_skipped(layouts, tmp_path, capsys):
    """dcm2niix's series names beside recognised cases: a note names the folder (a patient is never
    skipped without a word); alone, the error lists its files and how to name them."""
    shutil.copytree(layouts / "brats2020", tmp_path / "data")
    (case, *_) = discover_cases(tmp_path / "data")
    patient = tmp_path / "data" / "Patient C"
    patient.mkdir()
    for m, name in zip(MODALITIES, ("3_t1_mprage_sag", "7_T1_POST_GAD_AX", "5_t2_tse_tra", "6_FLAIR_AX")):
        shutil.copy(case.images[m], patient / f"{name}.nii.gz")
    capsys.readouterr()
    cases = discover_cases(tmp_path / "data")
    assert "Patient C" not in {c.case_id for c in cases} and len(cases) == 3
    assert capsys.readouterr().err == (f"note: {tmp_path / 'data'}: 1 folder(s) with NIfTI files named for no modality "
                                       f"not read: Patient C (name each case's files t1, t1ce, t2, flair (or <case>_t1 "
                                       "...), or list them in a cases.csv with columns case,t1,t1ce,t2,flair: "
                                       "`tumorseg cases DIR cases.csv` proposes one from series names)\n")
    discover_cases(tmp_path / "data", need_images=False)  # ground truth: images are not looked for
    assert capsys.readouterr().err == ""
    with pytest.raises(TumorsegError, match=r"Patient C: no cases found \(expected .*\); 3_t1_mprage_sag.nii.gz, "
                                            r"5_t2_tse_tra.nii.gz, 6_FLAIR_AX.nii.gz, 7_T1_POST_GAD_AX.nii.gz in .* name no "
                                            r"modality: name each case's files t1, t1ce, t2, flair"):
        discover_cases(patient)
    shutil.rmtree(patient)
    for folder, name in (("images_DTI/" + case.case_id, f"{case.case_id}_DTI_FA"), ("preds", case.case_id)):
        (tmp_path / "data" / folder).mkdir(parents=True)  # a case's other series (UPENN-GBM), predictions: no note
        shutil.copy(case.seg, tmp_path / "data" / folder / f"{name}.nii.gz")
    assert len(discover_cases(tmp_path / "data")) == 3 and capsys.readouterr().err == ""
    visit = case.folder / "Verlauf 2025"  # a later visit inside the patient's folder
    shutil.copytree(case.folder, visit)
    (case.folder / "DeepBraTumIA-segmentation").mkdir()  # a tool's output there (LUMIERE's): no case, no note
    shutil.copy(case.seg, case.folder / "DeepBraTumIA-segmentation" / "seg_mask.nii.gz")
    assert len(discover_cases(tmp_path / "data")) == 3
    assert capsys.readouterr().err == (f"note: {tmp_path / 'data'}: 1 folder(s) of NIfTI files inside case folders not "
                                       f"read: {case.case_id}/Verlauf 2025 (a case folder's sub-folders are not "
                                       "searched: give each visit a folder of its own)\n")
    assert len(discover_cases(tmp_path / "data")) == 3 and capsys.readouterr().err == ""  # said once a process


@pytest.mark.real
def test_real_case_in_every_layout_prepares_and_predicts_identically(real_data_dir, tmp_path):
    source = real_data_dir / "Brats18_CBICA_AQT_1"
    preds, images = {}, {}
    (real,) = discover_cases(source)
    _case_list({"AQT": _files(real)}, tmp_path / "list")
    for layout in (*LAYOUTS, "list"):
        if layout != "list":
            convert_case(source, tmp_path / layout, layout)
        data = tmp_path / layout / "cases.csv" if layout == "list" else tmp_path / layout
        res = prepare(data, tmp_path / f"prep-{layout}", PrepareConfig(channels=MODALITIES), workers=1, progress=False)
        (record,) = res.manifest["cases"]
        images[layout] = (np.load(tmp_path / f"prep-{layout}/images/{record['case_id']}.npy"),
                          np.load(tmp_path / f"prep-{layout}/masks/{record['case_id']}.npy"))
        out = predict(_flair_predictor(), data, tmp_path / f"pred-{layout}", progress=False)
        (path,) = out.written
        preds[layout] = layout_labels(layout).to_training(np.asarray(nib.load(path).dataobj))
    for layout in (*LAYOUTS, "list"):
        assert all(np.array_equal(a, b) for a, b in zip(images[layout], images["brats2020"]))
        assert np.array_equal(preds[layout], preds["brats2020"])
    assert np.count_nonzero(preds["brats2020"]) > 10_000  # the stand-in network does find the tumour


@pytest.mark.real
def test_real_case_in_brats_peds_2024_labels(real_data_dir, tmp_path):
    """A real case in BraTS-PEDs 2024's numbers (half its core a cyst): read so from its label 4,
    predicted back in those numbers (the core as non-enhancing tumour), scored as the original."""
    source = real_data_dir / "Brats18_CBICA_AQT_1"
    folder = convert_case(source, tmp_path / "peds", "brats2023", case_id="BraTS-PED-00007-000")
    seg_path = folder / "BraTS-PED-00007-000-seg.nii.gz"
    seg = nib.load(seg_path)
    raw = CONVENTIONS["peds2024"].from_training(CONVENTIONS["brats2023"].to_training(np.asarray(seg.dataobj)))
    raw.flat[np.flatnonzero(raw == 2)[::2]] = 3
    nib.save(nib.Nifti1Image(raw, seg.affine, seg.header), seg_path)
    (case,) = discover_cases(tmp_path / "peds")
    assert case.labels.name == "peds2024" and "holds label 4" in case.seg_note

    original = predict(_flair_predictor(), source, tmp_path / "pred-orig", progress=False).written[0]
    (path,) = predict(_flair_predictor(), tmp_path / "peds", tmp_path / "pred-peds", progress=False).written
    written = np.asarray(nib.load(path).dataobj)
    assert 4 in written and set(np.unique(written).tolist()) <= {0, 1, 2, 4}  # never 3: the cyst is not predicted
    assert convention_from_header(nib.load(path).header) is CONVENTIONS["peds2024"]
    assert np.array_equal(CONVENTIONS["peds2024"].to_training(written),
                          CONVENTIONS["brats2020"].to_training(np.asarray(nib.load(original).dataobj)))
    ours = evaluate(tmp_path / "pred-peds", tmp_path / "peds", progress=False)
    assert ours.summary["metrics"] == evaluate(tmp_path / "pred-orig", source, progress=False).summary["metrics"]
    assert ours.rows[0].metrics["WT"]["dice"] > 0.5


def _write_resampled(source, folder, target_affine, target_shape, order=1):
    from tumorseg.geometry import Grid, resample

    folder.mkdir(parents=True)
    (case,) = discover_cases(source)
    vols = load_images(case, MODALITIES)
    src = Grid(vols[0].data.shape, vols[0].affine)
    dst = Grid(target_shape, target_affine)
    for m, vol in zip(MODALITIES, vols):
        data = resample(vol.data.astype(np.float32), src, dst, order=order)
        nib.save(nib.Nifti1Image(data.astype(np.float32), target_affine), folder / f"{folder.name}_{m}.nii.gz")
    return src


@pytest.mark.real
def test_real_truth_and_scans_on_different_grids(real_data_dir, tmp_path):
    """A truth saved in RAS beside LPS scans, a T1 at 0.9 mm beside 1 mm scans and truth, a T1
    cropped to the brain: each case is prepared, drawn and scored with its own truth."""
    import shutil

    from tumorseg.geometry import Grid, network_grid, resample
    from tumorseg.plots.case_images import load_case

    source = real_data_dir / "Brats18_CBICA_AQT_1"
    (case,) = discover_cases(source)
    seg = nib.load(case.seg)
    src = Grid(seg.shape, seg.affine)
    ras = Grid(src.shape, src.affine @ np.array([[-1, 0, 0, 239], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]]))
    fine = network_grid(src, (0.9, 0.9, 0.9))
    t1 = nib.load(case.image("t1"))
    variants = {
        "seg_ras": ("seg", ras, np.asarray(seg.dataobj), 0),
        "t1_fine": ("t1", fine, np.asarray(t1.dataobj).astype(np.float32), 1),
        "t1_cropped": ("t1", Grid((200, 210, 150), src.affine @ _shift(20, 15, 2)),
                       np.asarray(t1.dataobj), 0),
    }
    prep = prepare(source, tmp_path / "prep-orig", PrepareConfig(channels=MODALITIES), workers=1, progress=False)
    mask = np.load(tmp_path / f"prep-orig/masks/{prep.kept[0]}.npy")
    base = evaluate(predict(_flair_predictor(), source, tmp_path / "pred-orig", progress=False).out_dir, source,
                    progress=False).rows[0]
    for name, (kind, grid, data, order) in variants.items():
        folder = tmp_path / name / case.case_id
        shutil.copytree(source, folder)
        path = case.seg if kind == "seg" else case.image(kind)
        nib.save(nib.Nifti1Image(resample(data, src, grid, order=order), grid.affine), folder / path.name)
        res = prepare(folder, tmp_path / f"prep-{name}", PrepareConfig(channels=MODALITIES), workers=1, progress=False)
        assert res.kept == prep.kept, name
        if name == "seg_ras":  # an exact reorientation: the very same training labels
            assert np.array_equal(np.load(tmp_path / f"prep-{name}/masks/{prep.kept[0]}.npy"), mask)
        drawn = load_case(folder)
        assert drawn.truth is not None and (drawn.truth_note is None) == (name != "t1_fine"), name
        out = predict(_flair_predictor(), folder, tmp_path / f"pred-{name}", progress=False)
        written = nib.load(out.written[0])
        assert written.shape == (fine.shape if name == "t1_fine" else src.shape), name  # the finest, widest scan
        (row,) = evaluate(out.out_dir, folder, progress=False).rows
        assert row.status == "ok", (name, row.message)
        assert ("resampled onto its ground truth's grid" in row.message) == (name == "t1_fine"), name
        assert abs(row.metrics["WT"]["dice"] - base.metrics["WT"]["dice"]) < (0.05 if name == "t1_fine" else 1e-9), name


def _shift(*voxels: int) -> np.ndarray:
    out = np.eye(4)
    out[:3, 3] = voxels
    return out


@pytest.mark.real
def test_real_case_on_other_grids_agrees_with_its_original_grid(real_data_dir, tmp_path):
    from tumorseg.geometry import Grid, network_grid, resample

    source = real_data_dir / "Brats18_CBICA_AQT_1"
    original = predict(_flair_predictor(), source, tmp_path / "orig", progress=False).written[0]
    reference = np.asarray(nib.load(original).dataobj) > 0
    (case,) = discover_cases(source)
    src = Grid((240, 240, 155), nib.load(case.image("t1")).affine)
    ras = src.affine @ np.array([[-1, 0, 0, 239], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])  # LPS storage -> RAS
    aniso = network_grid(src, (0.9, 0.9, 3.0))
    for name, grid in (("ras", Grid(src.shape, ras)), ("aniso", aniso)):
        _write_resampled(source, tmp_path / "cases" / name, grid.affine, grid.shape)
        (path,) = predict(_flair_predictor(), tmp_path / "cases" / name, tmp_path / f"pred-{name}", progress=False).written
        img = nib.load(path)
        assert img.shape == grid.shape and np.allclose(img.affine, grid.affine)  # the input's own grid
        back = resample(np.asarray(img.dataobj), grid, src, order=0) > 0
        dice = _wt_dice(back, reference)
        assert dice >= (0.999 if name == "ras" else 0.9), (name, dice)


@pytest.mark.real
def test_real_case_with_its_background_off_zero_predicts_as_the_original(real_data_dir, tmp_path, capfd):
    """An intensity offset or interpolation ringing outside the brain: the brain mask (and with it
    the z-score and the inference box) still finds the brain, and a warning names each file."""
    cid = "Brats18_CBICA_AQN_1"
    reference = np.asarray(nib.load(predict(_flair_predictor(), real_data_dir / cid, tmp_path / "orig",
                                            progress=False).written[0]).dataobj)
    rng = np.random.default_rng(0)
    changes = {"offset": lambda a: a + 5.0,
               "ringing": lambda a: np.where(a != 0, a, rng.uniform(-0.5, 0.5, a.shape))}
    for name, change in changes.items():
        folder = tmp_path / name / cid
        folder.mkdir(parents=True)
        for m in MODALITIES:
            img = nib.load(real_data_dir / cid / f"{cid}_{m}.nii.gz")
            data = change(np.asarray(img.dataobj).astype(np.float32)).astype(np.float32)
            nib.save(nib.Nifti1Image(data, img.affine), folder / f"{cid}_{m}.nii.gz")
        capfd.readouterr()
        (path,) = predict(_flair_predictor(), folder, tmp_path / f"pred-{name}", progress=False).written
        err = capfd.readouterr().err
        assert all(f"{cid}_{m}.nii.gz ({m}): the background is not 0" in err for m in MODALITIES), err
        brain = "not at that level" if name == "offset" else "more than 0.49"
        assert f"the brain is taken as the voxels {brain}" in err, err
        labels = np.asarray(nib.load(path).dataobj)
        if name == "offset":  # z-scores ignore a shift: the very same network input
            assert np.array_equal(labels, reference)
        else:
            assert _wt_dice(labels > 0, reference > 0) >= 0.99


def test_dataset_json_variants_and_odd_folders(layouts, tmp_path):
    from tumorseg.layouts import dataset_labels

    meta = {"labels": {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3}}
    assert dataset_labels(meta, "nnunet", tmp_path / "dataset.json") == CONVENTIONS["msd"]  # a number, not [3]
    meta = {"labels": {"background": 0, "ED": 2, "NCR": 1, "ET": 3, "ignore": 4}}
    assert dataset_labels(meta, "nnunet", tmp_path / "dataset.json").tumour_values == (1, 2, 3)
    stray = tmp_path / "nn"
    (stray / "imagesTr").mkdir(parents=True)
    (stray / "dataset.json").write_text((layouts / "nnunet/dataset.json").read_text())
    for f in (layouts / "nnunet/imagesTr").glob("BraTS2021_00001_*"):
        (stray / "imagesTr" / f.name).write_bytes(f.read_bytes())
    (stray / "imagesTr/notes.nii.gz").write_bytes(b"")
    with pytest.raises(TumorsegError, match=r"notes.nii.gz: not an nnU-Net image name"):
        discover_cases(stray)
    for text in ("null", "[1, 2]"):  # valid JSON, but no object
        (stray / "dataset.json").write_text(text)
        with pytest.raises(TumorsegError, match=rf"dataset.json: dataset.json holds {re.escape(text)}, not an object"):
            discover_cases(stray)
    case = write_case(tmp_path / "dup", "v1", seg=None)  # an unlabelled case with FLAIR twice
    (case / "v1_flair.nii").write_bytes(nib.load(case / "v1_flair.nii.gz").to_bytes())
    assert discover_cases(case)[0].seg is None


def test_prepare_skips_a_datasets_unlabelled_test_cases(layouts, tmp_path):
    root = tmp_path / "msd"
    synthesize(root, 2, shape=SHAPE, seed=0, layout="msd", progress=False)
    for f in (root / "imagesTr").glob("*.nii.gz"):
        (root / "imagesTs").mkdir(exist_ok=True)
        (root / "imagesTs" / f.name.replace("BRATS_0", "BRATS_4")).write_bytes(f.read_bytes())
    res = prepare(root, tmp_path / "prep", PrepareConfig(**SMALL), workers=1, progress=False)
    assert [c["case_id"] for c in res.manifest["cases"]] == ["BRATS_001", "BRATS_002"]
    res = prepare(root / "imagesTs", tmp_path / "test", PrepareConfig(**SMALL), workers=1, progress=False)
    assert res.manifest["counts"]["unlabelled"] == 2


def _write_tagged(folder, case_id, labels, affine, tag):
    img = nib.Nifti1Image(labels.astype(np.uint8), affine)
    if tag is not None:
        img.header["descrip"] = tag.tag().encode()
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(img, folder / f"{case_id}.nii.gz")


def test_evaluate_never_guesses_conventions_silently(tmp_path):
    shape = (24, 24, 20)
    truth = np.zeros(shape, np.uint8)  # training labels: oedema, core, enhancing, and a cavity
    truth[4:14, 4:14, 4:14], truth[6:12, 6:12, 6:12], truth[8:10, 8:10, 8:10] = 2, 1, 3
    b23, b20, msd = CONVENTIONS["brats2023"], CONVENTIONS["brats2020"], CONVENTIONS["msd"]
    for name, conv in (("gt23", b23), ("gtmsd", msd)):  # flat folders: no layout names their numbers
        _write_tagged(tmp_path / name, "case_seg", conv.from_training(truth), AFFINE, None)
    _write_tagged(tmp_path / "p20", "case", b20.from_training(truth), AFFINE, None)
    scores = evaluate(tmp_path / "p20", tmp_path / "gt23", progress=False)  # untagged 1/2/4 against 2023 numbers
    assert scores.failed == ["case"] and "--pred-labels" in scores.errors["case"]
    scores = evaluate(tmp_path / "p20", tmp_path / "gt23", pred_labels="brats2020", progress=False)
    assert all(scores.rows[0].metrics[r]["dice"] == 1.0 for r in ("WT", "TC", "ET"))
    _write_tagged(tmp_path / "pmsd", "case", msd.from_training(truth), AFFINE, msd)
    scores = evaluate(tmp_path / "pmsd", tmp_path / "gtmsd", progress=False)  # the tag reads the truth too, and says so
    assert all(scores.rows[0].metrics[r]["dice"] == 1.0 for r in ("WT", "TC", "ET"))
    assert scores.notes == ["case: ground truth read as msd labels (as the prediction's header says; --labels to set)"]
    post = truth.copy()
    post[post == 3] = 1
    post[16:20, 16:20, 14:18] = 4  # BraTS 2024: a cavity, no enhancing tumour
    _write_tagged(tmp_path / "gt24", "case", b23.from_training(post), AFFINE, None)
    _write_tagged(tmp_path / "p24", "case", b23.from_training(post), AFFINE, b23)
    scores = evaluate(tmp_path / "p24", tmp_path / "gt24", progress=False)
    assert all(scores.rows[0].metrics[r]["dice"] == 1.0 for r in ("WT", "TC", "ET"))
    _write_tagged(tmp_path / "p24u", "case", b23.from_training(post), AFFINE, None)
    scores = evaluate(tmp_path / "p24u", tmp_path / "gt24", labels="brats2023", progress=False)
    assert scores.failed == ["case"] and "resection cavity?" in scores.errors["case"]  # 4 without 3: ambiguous
    scores = evaluate(tmp_path / "p24u", tmp_path / "gt24", labels="brats2023", pred_labels="brats2023", progress=False)
    assert scores.failed == [] and not scores.notes
    _write_tagged(tmp_path / "p23u", "case", b23.from_training(truth), AFFINE, None)
    scores = evaluate(tmp_path / "p23u", tmp_path / "gt23", progress=False)  # untagged, flat: a guess, said aloud
    assert "guessed from its values" in scores.notes[0]
    assert scores.notes[0].endswith("untagged prediction read as brats2023 labels (its ground truth's; "
                                     "--pred-labels to set)")
    # nnU-Net's MSD numbers, untagged, are valid BraTS 2023 values: scored as such, and said so
    _write_tagged(tmp_path / "pmsdu", "case", msd.from_training(truth), AFFINE, None)
    layout_gt = tmp_path / "gt23layout"
    (layout_gt / "BraTS-GLI-00000-000").mkdir(parents=True)
    (tmp_path / "gt23/case_seg.nii.gz").rename(layout_gt / "BraTS-GLI-00000-000/BraTS-GLI-00000-000-seg.nii.gz")
    (tmp_path / "pmsdu/case.nii.gz").rename(tmp_path / "pmsdu/BraTS-GLI-00000-000.nii.gz")
    scores = evaluate(tmp_path / "pmsdu", layout_gt, progress=False)
    assert scores.rows[0].metrics["TC"]["dice"] < 1.0
    assert scores.notes == ["BraTS-GLI-00000-000: untagged prediction read as brats2023 labels (its ground truth's; "
                            "--pred-labels to set)"]
    scores = evaluate(tmp_path / "pmsdu", layout_gt, pred_labels="msd", progress=False)
    assert all(scores.rows[0].metrics[r]["dice"] == 1.0 for r in ("WT", "TC", "ET")) and not scores.notes
    # ... unless nnU-Net's dataset.json is beside them (its predict copies it there): read in its numbers
    write_dataset_json(tmp_path / "pmsdu", "nnunet")
    scores = evaluate(tmp_path / "pmsdu", layout_gt, progress=False)
    assert all(scores.rows[0].metrics[r]["dice"] == 1.0 for r in ("WT", "TC", "ET"))
    assert scores.notes == ["BraTS-GLI-00000-000: untagged prediction read as msd labels (the dataset.json beside it; "
                            "--pred-labels to set)"]
    from tumorseg.report import report

    result = report(tmp_path / "pmsdu", gt=layout_gt, out=tmp_path / "rep", progress=False)
    assert not result.failed, result.failed
    assert result.cases[0].metrics["TC"]["dice"] == 1.0
    assert result.cases[0].notes == ["untagged prediction read as msd labels (the dataset.json beside it; "
                                     "--pred-labels to set)"]
    _write_tagged(tmp_path / "pmsdu", "BraTS-GLI-00000-000", b23.from_training(truth), AFFINE, b23)  # a tag wins
    scores = evaluate(tmp_path / "pmsdu", layout_gt, progress=False)
    assert all(scores.rows[0].metrics[r]["dice"] == 1.0 for r in ("WT", "TC", "ET")) and not scores.notes
    (tmp_path / "pmsdu/dataset.json").write_text('{"training": []}')  # another tool's (a MONAI datalist): no labels
    scores = evaluate(tmp_path / "pmsdu", layout_gt, progress=False)
    assert all(scores.rows[0].metrics[r]["dice"] == 1.0 for r in ("WT", "TC", "ET")) and not scores.notes
    assert report(tmp_path / "pmsdu", gt=layout_gt, out=tmp_path / "rep2", progress=False).failed == {}


def test_a_flat_truth_folder_of_brats2023_ids_is_read_in_their_convention(tmp_path):
    """BraTS 2024 post-treatment truth (a cavity, no enhancing tumour) as `BraTS-GLI-...-seg.nii.gz`
    label files side by side: the ids name the convention, as their case folders would; the cavity
    is in no region. Other names keep the guess from the values, said aloud."""
    shape = (24, 24, 20)
    post = np.zeros(shape, np.uint8)
    post[4:14, 4:14, 4:14], post[6:12, 6:12, 6:12], post[16:20, 16:20, 14:18] = 2, 1, 4
    b23 = CONVENTIONS["brats2023"]
    case = "BraTS-GLI-02073-100"
    _write_tagged(tmp_path / "gt", f"{case}-seg", b23.from_training(post), AFFINE, None)
    (tmp_path / "pred").mkdir()
    empty_cavity = post.copy()
    empty_cavity[empty_cavity == 4] = 0  # a network that draws no cavity: every region still perfect
    _write_tagged(tmp_path / "pred", case, b23.from_training(empty_cavity), AFFINE, b23)
    (found,) = discover_cases(tmp_path / "gt", need_images=False)
    assert found.case_id == case and found.labels is b23
    scores = evaluate(tmp_path / "pred", tmp_path / "gt", progress=False)
    assert all(scores.rows[0].metrics[r]["dice"] == 1.0 for r in ("WT", "TC", "ET")) and not scores.notes
    _write_tagged(tmp_path / "gt", f"{case}_seg_corrected", b23.from_training(post), AFFINE, None)  # an odd name beside
    scores = evaluate(tmp_path / "pred", tmp_path / "gt", progress=False)  # each file in its own reading, not refused
    assert {r.case_id: r.status for r in scores.rows} == {case: "ok", f"{case}_seg_corrected": "missing"}
    (tmp_path / "gt" / f"{case}_seg_corrected.nii.gz").unlink()
    (tmp_path / "gt" / f"{case}-seg.nii.gz").rename(tmp_path / "gt" / "case_seg.nii.gz")
    (tmp_path / "pred" / f"{case}.nii.gz").rename(tmp_path / "pred" / "case.nii.gz")
    scores = evaluate(tmp_path / "pred", tmp_path / "gt", progress=False)
    assert scores.notes[0] == "case: ground truth read as brats2023 labels (as the prediction's header says; --labels to set)"


def test_a_segmentation_stored_twice_beside_the_images_is_one_case(tmp_path):
    """`x_seg.nii` beside `x_seg.nii.gz` (an unpacked archive) is the same file twice, as for images."""
    folder = write_case(tmp_path, "BraTS20_Training_001")
    gz = folder / "BraTS20_Training_001_seg.nii.gz"
    nib.save(nib.load(gz), folder / "BraTS20_Training_001_seg.nii")
    (case,) = discover_cases(tmp_path)
    assert case.case_id == "BraTS20_Training_001" and case.seg is not None and case.seg.name.startswith(case.case_id)


def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")  # discovery reads names only


def test_plain_case_folders_of_files_named_by_modality(tmp_path):
    """Scans as clinics and preprocessing tools leave them: any alias, no case prefix, extras ignored."""
    _touch(tmp_path / "ds/hd-glio", "T1.nii.gz", "CT1.nii.gz", "T2.nii.gz", "FLAIR.nii.gz", "brainmask.nii.gz")
    _touch(tmp_path / "ds/toolkit", "t1.nii.gz", "t1c.nii.gz", "t2.nii.gz", "fla.nii.gz", "segmentation.nii.gz")
    _touch(tmp_path / "ds/scanner", "T1w.nii", "T1Gd.nii", "T2w.nii", "T2-FLAIR.nii", "seg.nii")
    glio, scanner, toolkit = discover_cases(tmp_path / "ds")
    assert [c.case_id for c in (glio, scanner, toolkit)] == ["hd-glio", "scanner", "toolkit"]
    for case in (glio, scanner, toolkit):
        assert case.layout == "plain" and case.labels == CONVENTIONS["brats2020"]
        assert {m: p.name.split(".")[0].lower() for m, p in case.images.items()} == {
            "hd-glio": {"t1": "t1", "t1ce": "ct1", "t2": "t2", "flair": "flair"},
            "scanner": {"t1": "t1w", "t1ce": "t1gd", "t2": "t2w", "flair": "t2-flair"},
            "toolkit": {"t1": "t1", "t1ce": "t1c", "t2": "t2", "flair": "fla"}}[case.case_id]
    assert glio.seg is None  # a lone extra file of a plain folder is never taken for the segmentation
    assert (toolkit.seg.name, scanner.seg.name) == ("segmentation.nii.gz", "seg.nii")
    (one,) = discover_cases(tmp_path / "ds/toolkit")  # the case folder itself
    assert one.case_id == "toolkit"
    _touch(tmp_path / "ds/BraTS20_Training_001", *(f"BraTS20_Training_001_{m}.nii.gz" for m in MODALITIES))
    with pytest.raises(TumorsegError, match=r"mixes dataset layouts \(3 plain, 1 brats2020 cases\)"):
        discover_cases(tmp_path / "ds")
    _touch(tmp_path / "ds/toolkit", "T1w.nii.gz")
    (both,) = discover_cases(tmp_path / "ds/toolkit")
    with pytest.raises(TumorsegError, match=r"toolkit: several t1 files in .*toolkit \(T1w, t1\); keep one"):
        both.image("t1")


def test_ucsf_pdgm_tumour_segmentation_beside_its_brain_segmentation(tmp_path):
    cid = "UCSF-PDGM-0004"
    extras = ("brain_segmentation", "brain_parenchyma_segmentation", "T1c_bias", "FLAIR_bias", "ADC", "DWI")
    _touch(tmp_path / f"{cid}_nifti", *(f"{cid}_{k}.nii.gz" for k in ("T1", "T1c", "T2", "FLAIR", "tumor_segmentation", *extras)))
    (case,) = discover_cases(tmp_path)
    assert case.case_id == cid and case.folder.name == f"{cid}_nifti"  # its files' name, not the folder's
    assert case.layout == "brats2020" and case.seg.name == f"{cid}_tumor_segmentation.nii.gz" and case.seg_note is None
    assert {m: p.name for m, p in case.images.items()} == {m: f"{cid}_{k}.nii.gz" for m, k in
                                                          zip(MODALITIES, ("T1", "T1c", "T2", "FLAIR"))}


def test_plain_truth_in_either_numbering_and_upenn_segm_files(layouts, tmp_path):
    """A plain folder's name says nothing of its labels: evaluate reads them from the values (noted)."""
    preds = tmp_path / "preds"
    preds.mkdir()
    for case in discover_cases(layouts / "plain"):  # BraTS 2020 numbers (1, 2, 4)
        seg = nib.load(case.seg)
        nib.save(seg, preds / f"{case.case_id}.nii.gz")
        values = np.asarray(seg.dataobj)
        renumbered = np.where(values == 4, 3, values).astype(np.uint8)  # BraTS 2023 numbers (1, 2, 3)
        (tmp_path / "plain2023" / case.case_id).mkdir(parents=True)
        nib.save(nib.Nifti1Image(renumbered, seg.affine), tmp_path / "plain2023" / case.case_id / "seg.nii.gz")
        (tmp_path / "upenn").mkdir(exist_ok=True)
        nib.save(seg, tmp_path / "upenn" / f"{case.case_id}_segm.nii.gz")
    for gt, read_as in ((layouts / "plain", "brats2020"), (tmp_path / "plain2023", "brats2023"),
                        (tmp_path / "upenn", "brats2020")):
        scores = evaluate(preds, gt, progress=False, pred_labels="brats2020")
        assert len(scores.rows) == 3 and scores.failed == [], gt
        assert all(r.metrics[region]["dice"] == 1.0 for r in scores.rows for region in ("WT", "TC", "ET")), gt
        assert all(f"read as {read_as} labels" in r.message for r in scores.rows), gt


def test_upenn_gbm_expert_segmentations_beside_the_case_folders(layouts, tmp_path):
    """UPENN-GBM as TCIA ships it: `images_structural/<case>/` without segmentations, the expert ones in
    `images_segm/<case>_segm.nii.gz` beside it (and automated ones, not truth, in `automated_segm/`)."""
    root = tmp_path / "NIfTI-files"
    for case in discover_cases(layouts / "brats2020"):
        folder = root / "images_structural" / case.case_id
        folder.mkdir(parents=True)
        for modality, name in zip(MODALITIES, ("T1", "T1GD", "T2", "FLAIR")):
            (folder / f"{case.case_id}_{name}.nii.gz").symlink_to(case.image(modality))
        for sub, suffix in (("images_segm", "_segm"), ("automated_segm", "_automated_approx_segm")):
            (root / sub).mkdir(exist_ok=True)
            (root / sub / f"{case.case_id}{suffix}.nii.gz").symlink_to(case.seg)
    (root / "images_segm" / "UPENN-GBM-09999_11_segm.nii.gz").symlink_to(case.seg)  # a case without scans here
    for given in (root, root / "images_structural"):
        for need_images in (True, False):
            cases = discover_cases(given, need_images=need_images)
            assert [c.case_id for c in cases] == [c.case_id for c in discover_cases(layouts / "brats2020")]
            assert all(c.seg == root / "images_segm" / f"{c.case_id}_segm.nii.gz" and c.layout == "brats2020"
                       for c in cases), given
    preds = tmp_path / "preds"
    preds.mkdir()
    for case in cases:
        (preds / f"{case.case_id}.nii.gz").symlink_to(case.seg)
    scores = evaluate(preds, root, progress=False)
    assert len(scores.rows) == 3 and not scores.failed and scores.rows[0].metrics["ET"]["dice"] == 1.0
    assert len(prepare(root, tmp_path / "prep", PrepareConfig(crop_size=(16, 16, 16), min_tumour=0.0),
                       workers=1, progress=False).kept) == 3


@pytest.mark.parametrize("layout", ["brats2020", "brats2023"])
def test_a_flat_folder_of_several_cases_files_is_one_case_each(layouts, layout, tmp_path):
    """`<case>_t1.nii.gz` of many cases side by side: never one case of the first files found."""
    nested = discover_cases(layouts / layout)
    for case in nested:
        for path in (*case.images.values(), case.seg):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "notes.nii.gz").write_bytes(b"")  # a stray file names no case
    flat = discover_cases(tmp_path)
    assert [c.case_id for c in flat] == [c.case_id for c in nested] and {c.layout for c in flat} == {layout}
    for got, want in zip(flat, nested):
        assert {m: p.name for m, p in got.images.items()} == {m: p.name for m, p in want.images.items()}
        assert got.seg.name == want.seg.name and got.labels == want.labels and got.folder == tmp_path
    (tmp_path / flat[0].seg.name).unlink()  # one case without its segmentation is still a case
    assert [c.seg is None for c in discover_cases(tmp_path)] == [True, False, False]


@pytest.mark.real
def test_real_cases_flattened_into_one_folder_predict_as_in_their_own(real_data_dir, tmp_path):
    ids = ("Brats18_2013_2_1", "Brats18_2013_3_1")
    for cid in ids:
        for path in (real_data_dir / cid).glob("*.nii.gz"):
            (tmp_path / "flat").mkdir(exist_ok=True)
            (tmp_path / "flat" / path.name).symlink_to(path)
    flat = predict(_flair_predictor(), tmp_path / "flat", tmp_path / "pred-flat", progress=False)
    nested = predict(_flair_predictor(), real_data_dir / ids[0], tmp_path / "pred-nested", progress=False)
    assert sorted(p.name for p in flat.written) == [f"{cid}.nii.gz" for cid in ids]
    (reference,) = nested.written
    assert np.array_equal(np.asarray(nib.load(tmp_path / "pred-flat" / reference.name).dataobj),
                          np.asarray(nib.load(reference).dataobj))


def test_bids_sessions_contrast_entity_derivatives_and_ambiguous_runs(layouts, tmp_path):
    root = tmp_path / "bids"
    (root).mkdir()
    (root / "dataset_description.json").write_text('{"Name": "gliomas", "BIDSVersion": "1.9.0"}')
    for ses in ("ses-pre", "ses-post"):
        _touch(root / "sub-01" / ses / "anat", *(f"sub-01_{ses}_{s}.nii.gz" for s in
                                                   ("T1w", "ce-Gd_T1w", "T2w", "FLAIR", "T2starw", "scans")))
        _touch(root / "derivatives/manual/sub-01" / ses / "anat", f"sub-01_{ses}_desc-tumor_dseg.nii.gz")
        # fMRIPrep's tissue maps are segmentations too, not of the tumour
        _touch(root / "derivatives/fmriprep/sub-01" / ses / "anat", f"sub-01_{ses}_dseg.nii.gz",
               f"sub-01_{ses}_desc-aseg_dseg.nii.gz")
    # preprocessed copies in derivatives are another dataset: never mixed into the raw one's cases
    _touch(root / "derivatives/preproc/sub-01/ses-pre/anat", "sub-01_ses-pre_desc-brain_T1w.nii.gz")
    _touch(root / "tmp_dcm2bids/sub-01_ses-pre", "sub-01_ses-pre_T1w.nii.gz")  # dcm2bids' copies, not a second case
    cases = {c.case_id: c for c in discover_cases(root)}
    assert set(cases) == {"sub-01_ses-pre", "sub-01_ses-post"}
    case = cases["sub-01_ses-pre"]
    assert case.layout == "bids" and case.labels == CONVENTIONS["brats2020"]
    assert {m: p.name for m, p in case.images.items()} == {
        "t1": "sub-01_ses-pre_T1w.nii.gz", "t1ce": "sub-01_ses-pre_ce-Gd_T1w.nii.gz",
        "t2": "sub-01_ses-pre_T2w.nii.gz", "flair": "sub-01_ses-pre_FLAIR.nii.gz"}
    assert case.seg == root / "derivatives/manual/sub-01/ses-pre/anat/sub-01_ses-pre_desc-tumor_dseg.nii.gz"
    truths = discover_cases(root / "derivatives/manual", need_images=False)  # evaluate's ground truth
    assert sorted(c.case_id for c in truths) == ["sub-01_ses-post", "sub-01_ses-pre"] and all(c.seg for c in truths)
    (preproc,) = discover_cases(root / "derivatives/preproc")
    assert preproc.case_id == "sub-01_ses-pre" and set(preproc.images) == {"t1"}
    _touch(root / "sub-01/ses-pre/anat", "sub-01_ses-pre_run-2_T2w.nii.gz")
    _touch(root / "derivatives/rater2/sub-01/ses-pre/anat", "sub-01_ses-pre_label-tumour_dseg.nii.gz")
    cases = {c.case_id: c for c in discover_cases(root)}  # one odd session fails alone, when read
    pre, post = cases["sub-01_ses-pre"], cases["sub-01_ses-post"]
    assert post.image("t2").name == "sub-01_ses-post_T2w.nii.gz" and pre.image("t1").name == "sub-01_ses-pre_T1w.nii.gz"
    with pytest.raises(TumorsegError, match=r"sub-01_ses-pre: several t2 files in .* \(sub-01_ses-pre_T2w, "
                                            r"sub-01_ses-pre_run-2_T2w\); keep one"):
        pre.image("t2")
    assert pre.seg is None and "several tumour segmentations" in pre.seg_note and "rater2" in pre.seg_note
    _touch(root / "derivatives/other/sub-01/ses-post/anat", "sub-01_ses-post_desc-tumor_dseg.nii.gz")
    post = {c.case_id: c for c in discover_cases(root)}["sub-01_ses-post"]  # one name in two pipelines: two files
    assert post.seg is None and "several tumour segmentations" in post.seg_note and "other" in post.seg_note


def test_bids_names_outside_anat_are_read_as_bids(tmp_path):
    """A subject's scans copied out of `anat/`: the contrast entity still makes T1CE, not a case
    `sub-01_ses-pre_ce-gadolinium` whose "T1" is the gadolinium scan."""
    names = ("T1w", "ce-gadolinium_T1w", "T2w", "FLAIR")
    _touch(tmp_path / "flat", *(f"sub-01_ses-pre_{n}.nii.gz" for n in names))
    (case,) = discover_cases(tmp_path / "flat")
    assert case.case_id == "sub-01_ses-pre" and case.layout == "bids"
    assert {m: p.name for m, p in case.images.items()} == {
        "t1": "sub-01_ses-pre_T1w.nii.gz", "t1ce": "sub-01_ses-pre_ce-gadolinium_T1w.nii.gz",
        "t2": "sub-01_ses-pre_T2w.nii.gz", "flair": "sub-01_ses-pre_FLAIR.nii.gz"}
    _touch(tmp_path / "brats", *(f"sub-001_{m}.nii.gz" for m in (*MODALITIES, "seg")))  # BraTS names of a `sub-` id
    (brats,) = discover_cases(tmp_path / "brats")
    assert brats.layout == "brats2020" and brats.seg.name == "sub-001_seg.nii.gz" and len(brats.images) == 4
    _touch(tmp_path / "mixed", "sub-01_T1w.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz")  # not all BIDS: as before
    assert [c.layout for c in discover_cases(tmp_path / "mixed")] == ["brats2020"]


def test_visits_of_one_patient_in_folders_of_their_own_stay_apart(tmp_path):
    for visit in ("P001_pre", "P001_post"):
        _touch(tmp_path / visit, *(f"P001_{m}.nii.gz" for m in MODALITIES))
    assert [c.case_id for c in discover_cases(tmp_path)] == ["P001_post", "P001_pre"]


def test_visits_named_alike_in_each_patients_folder_are_named_by_their_patient(tmp_path):
    """Longitudinal data (LUMIERE's `Patient-001/week-000`): the visit folder alone names no case."""
    for patient, visits in {"Patient-001": ("week-000", "week-044"), "Patient-002": ("week-000",)}.items():
        for visit in visits:
            _touch(tmp_path / "site" / patient / visit, "T1.nii.gz", "CT1.nii.gz", "T2.nii.gz", "FLAIR.nii.gz")
    _touch(tmp_path / "site/Patient-003/scans/week-000", "T1.nii.gz", "CT1.nii.gz", "T2.nii.gz", "FLAIR.nii.gz")
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["Patient-001_week-000", "Patient-001_week-044", "Patient-002_week-000",
                                          "scans_week-000"]  # every case by the same rule, one folder up
    assert cases[0].folder == tmp_path / "site/Patient-001/week-000"
    assert [c.case_id for c in discover_cases(tmp_path / "site/Patient-001")] == ["week-000", "week-044"]
    assert [c.case_id for c in discover_cases(tmp_path, only=["Patient-002_week-000"])] == ["Patient-002_week-000"]


def test_ucsf_pdgm_truth_alone_in_case_folders_or_one_flat_folder(tmp_path):
    cids = ("UCSF-PDGM-0004", "UCSF-PDGM-0005")
    for cid in cids:
        _touch(tmp_path / "folders" / f"{cid}_nifti", f"{cid}_tumor_segmentation.nii.gz")
        _touch(tmp_path / "flat", f"{cid}_tumor_segmentation.nii.gz")
    for gt in ("folders", "flat"):
        truths = discover_cases(tmp_path / gt, need_images=False)
        assert [c.case_id for c in truths] == list(cids) and all(c.seg is not None for c in truths), gt
