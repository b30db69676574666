import numpy as np
import nibabel as nib

from tumorseg.demo import DemoSettings, run_demo

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
    assert "[5/5] evaluating" in out.err and "demo finished" in out.out and "WT" in out.out
    again = run_demo(tmp_path, settings=TINY)  # everything done: skips, same numbers
    assert [r.metrics for r in again.rows] == [r.metrics for r in result.rows]
