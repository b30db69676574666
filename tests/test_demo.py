import re
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from tumorseg.checkpoint import load_checkpoint
from tumorseg.demo import DemoSettings, run_demo
from tumorseg.inference import Predictor
from tumorseg.prepare import load_manifest
from tumorseg.synth import synthesize

from factory import interrupt_training

TINY = DemoSettings(cases=5, test_cases=2, shape=(48, 48, 40), crop=(32, 32, 32), filters=(4, 8, 16), epochs=1)


def test_demo_runs_the_whole_pipeline_and_resumes(tmp_path, capsys):
    result = run_demo(tmp_path, settings=TINY)
    preds = tmp_path / "predictions"
    names = sorted(p.name for p in preds.glob("*.nii.gz"))
    assert names == ["BraTS20_Training_006.nii.gz", "BraTS20_Training_007.nii.gz"]  # the held-out cases
    img = nib.load(preds / names[0])
    src = nib.load(tmp_path / "data/test/BraTS20_Training_006/BraTS20_Training_006_flair.nii.gz")
    assert img.shape == (48, 48, 40) and np.allclose(img.affine, src.affine)
    assert set(np.unique(np.asarray(img.dataobj))) <= {0, 1, 2, 4}
    assert (preds / "BraTS20_Training_006.png").exists() and (preds / "metrics.csv").exists()
    assert len(result.rows) == 2 and not result.failed
    assert (tmp_path / "run/curves.png").exists()
    out = capsys.readouterr()
    assert "[5/6] evaluating" in out.err and "demo finished" in out.out and "WT" in out.out
    assert "[6/6] writing the report" in out.err and (tmp_path / "report/index.html").exists()
    assert f"the report in {tmp_path / 'report/index.html'}" in out.out
    assert re.search(r"  \d+ kept \(\d+ train, \d+ validation\), \d+ dropped \(under [\d.]+% tumour in the crop\)", out.err)
    assert re.search(r"  best.pt: epoch 1, validation mean Dice \d\.\d{3}", out.err)
    again = run_demo(tmp_path, settings=TINY)  # everything done: skips, same numbers
    assert [r.metrics for r in again.rows] == [r.metrics for r in result.rows]
    assert f"[1/6] using the 5 + 2 held-out BraTS-format cases at (48, 48, 40) in {tmp_path / 'data'}" in (
        capsys.readouterr().err)
    longer = run_demo(tmp_path, settings=replace(TINY, epochs=2))  # a new best.pt: its own predictions
    made_by = Predictor.from_checkpoint(tmp_path / "run/best.pt", device="cpu").made_by()
    descriptions = [bytes(nib.load(p).header["descrip"]).decode().rstrip("\x00") for p in sorted(preds.glob("*.nii.gz"))]
    assert not longer.failed and len(descriptions) == 2
    assert all(f"model={made_by}" in d.split() for d in descriptions)


@pytest.mark.parametrize("layout", ["msd", "bids"])
def test_demo_on_a_users_dataset_holds_out_its_validation_cases(tmp_path, layout):
    """--data of any layout: the validation cases are predicted and scored where they are (case
    folders could not be linked: MSD keeps every case in imagesTr/, BIDS a case in sub-X/anat/)."""
    synthesize(tmp_path / "data", 5, shape=(48, 48, 40), layout=layout, progress=False)
    settings = replace(TINY, real_crop=(32, 32, 32), real_patch=(32, 32, 32))
    result = run_demo(tmp_path / "work", data=tmp_path / "data", settings=settings)
    val = load_manifest(tmp_path / "work/prepared")["split"]["val"]
    assert [r.case_id for r in result.rows] == sorted(val) and val and not result.failed
    assert sorted(p.name for p in (tmp_path / "work/predictions").glob("*.nii.gz")) == [f"{c}.nii.gz" for c in sorted(val)]


def test_demo_interrupted_in_training_says_to_run_it_again_and_then_resumes(tmp_path, capsys, monkeypatch):
    interrupt_training(monkeypatch, 1)
    settings = replace(TINY, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path, settings=settings)
    err = capsys.readouterr().err
    assert f"holds epoch 1; continue with the same demo command again (its folder: {tmp_path})" in err
    assert "--resume" not in err  # the demo has no such option
    monkeypatch.undo()
    result = run_demo(tmp_path, settings=settings)  # trains epoch 2 only, from last.pt
    assert not result.failed and load_checkpoint(tmp_path / "run/last.pt")["epoch"] == 2
