"""A tiny run on real scans through train -> predict -> evaluate (skipped without the samples)."""

import nibabel as nib
import numpy as np

from tumorseg.evaluation import evaluate
from tumorseg.inference import predict
from tumorseg.prepare import PrepareConfig, prepare
from tumorseg.training import TrainConfig, load_checkpoint, train


def test_real_cases_train_predict_evaluate(real_data_dir, tmp_path):
    cases = ["Brats18_2013_2_1", "Brats18_CBICA_ABM_1"]
    for case in cases:
        (tmp_path / "raw").mkdir(exist_ok=True)
        (tmp_path / "raw" / case).symlink_to(real_data_dir / case, target_is_directory=True)
    cfg = PrepareConfig(channels=("t1", "t1ce", "t2", "flair"), norm="zscore", crop_mode="brain", crop_size=(128, 128, 128), val_fraction=0.5)
    prepare(tmp_path / "raw", tmp_path / "prep", cfg, workers=2, progress=False)
    config = TrainConfig(model="unet", filters=[4, 8, 16], target="regions", patch=[64, 64, 64], fg_ratio=1.0,
                         epochs=2, steps_per_epoch=2, batch_size=1, lr=1e-3, postprocess=True)
    result = train(tmp_path / "prep", tmp_path / "run", config, progress=False)
    assert len(result.history) == 2 and np.isfinite(result.history[-1]["train_loss"])
    assert load_checkpoint(tmp_path / "run/best.pt")["prepare"]["norm"] == "zscore"
    out = predict(tmp_path / "run/best.pt", tmp_path / "raw" / cases[0], tmp_path / "pred", tta=False, progress=False)
    assert not out.failed
    pred = nib.load(tmp_path / "pred" / f"{cases[0]}.nii.gz")
    src = nib.load(real_data_dir / cases[0] / f"{cases[0]}_t1.nii.gz")
    assert pred.shape == (240, 240, 155) and np.allclose(pred.affine, src.affine) and pred.get_data_dtype() == np.uint8
    scores = evaluate(tmp_path / "pred", tmp_path / "raw", progress=False)
    assert scores.missing == [cases[1]] and [r.case_id for r in scores.rows if r.status == "ok"] == [cases[0]]
    assert 0.0 <= scores.rows[0].metrics["WT"]["dice"] <= 1.0
