"""A tiny run on real scans through train -> predict -> evaluate (skipped without the samples)."""

import nibabel as nib
import numpy as np

from tumorseg.evaluation import evaluate
from tumorseg.inference import predict
from tumorseg.prepare import PrepareConfig, prepare
from tumorseg.training import TrainConfig, load_checkpoint, train


CASES = ["Brats18_2013_2_1", "Brats18_CBICA_ABM_1"]
SMALL = dict(model="unet", filters=[4, 8, 16], target="regions", patch=[64, 64, 64], fg_ratio=1.0, batch_size=1, lr=1e-3,
             postprocess=True)


def _prepared(real_data_dir, tmp_path):
    for case in CASES:
        (tmp_path / "raw").mkdir(exist_ok=True)
        (tmp_path / "raw" / case).symlink_to(real_data_dir / case, target_is_directory=True)
    cfg = PrepareConfig(channels=("t1", "t1ce", "t2", "flair"), norm="zscore", crop_mode="brain", crop_size=(128, 128, 128), val_fraction=0.5)
    prepare(tmp_path / "raw", tmp_path / "prep", cfg, workers=2, progress=False)
    return tmp_path / "prep"


def test_real_cases_train_predict_evaluate(real_data_dir, tmp_path):
    _prepared(real_data_dir, tmp_path)
    config = TrainConfig(epochs=2, steps_per_epoch=2, **SMALL)
    result = train(tmp_path / "prep", tmp_path / "run", config, progress=False)
    assert len(result.history) == 2 and np.isfinite(result.history[-1]["train_loss"])
    assert load_checkpoint(tmp_path / "run/best.pt")["prepare"]["norm"] == "zscore"
    out = predict(tmp_path / "run/best.pt", tmp_path / "raw" / CASES[0], tmp_path / "pred", tta=False, progress=False)
    assert not out.failed
    pred = nib.load(tmp_path / "pred" / f"{CASES[0]}.nii.gz")
    src = nib.load(real_data_dir / CASES[0] / f"{CASES[0]}_t1.nii.gz")
    assert pred.shape == (240, 240, 155) and np.allclose(pred.affine, src.affine) and pred.get_data_dtype() == np.uint8
    scores = evaluate(tmp_path / "pred", tmp_path / "raw", progress=False)
    assert scores.missing == [CASES[1]] and [r.case_id for r in scores.rows if r.status == "ok"] == [CASES[0]]
    assert 0.0 <= scores.rows[0].metrics["WT"]["dice"] <= 1.0


def test_real_cases_cross_validation_ensemble(real_data_dir, tmp_path):
    """Two folds over the two cases, each validated once, predicting a real scan as their ensemble."""
    prep = _prepared(real_data_dir, tmp_path)
    for fold in range(2):
        train(prep, tmp_path / "cv", TrainConfig(epochs=1, steps_per_epoch=1, fold=fold, folds=2, **SMALL), progress=False)
    out = predict(tmp_path / "cv", tmp_path / "raw" / CASES[1], tmp_path / "pred", tta=False, progress=False)
    assert out.predicted == [CASES[1]] and not out.failed
    pred = nib.load(tmp_path / "pred" / f"{CASES[1]}.nii.gz")
    src = nib.load(real_data_dir / CASES[1] / f"{CASES[1]}_flair.nii.gz")
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    stats = [len(load_checkpoint(tmp_path / f"cv/fold_{k}/best.pt")["inference"]["postprocess_statistics"]) for k in range(2)]
    assert stats == [1, 1]  # each case validated by the fold that did not train on it
    scores = evaluate(tmp_path / "pred", tmp_path / "raw", progress=False, only_predicted=True)
    assert [r.status for r in scores.rows] == ["ok"] and 0.0 <= scores.rows[0].metrics["WT"]["dice"] <= 1.0
