import numpy as np
import pytest

from tumorseg.inference.postprocess import suppress_small_et, tune_et_threshold
from tumorseg.labels import regions_from_labels


def _labels(n_et: int, shape=(10, 10, 10), oedema: bool = True) -> np.ndarray:
    """Oedema in the top half, then `n_et` ET voxels (label 3) at the start of the flat array."""
    out = np.zeros(shape, np.uint8)
    if oedema:
        out[:5] = 2
    out.reshape(-1)[:n_et] = 3
    return out


@pytest.mark.parametrize(
    "n_et, threshold, relabelled",
    [(5, 6, True), (5, 5, False), (5, 100, True), (5, None, False), (5, 0, False), (0, 10, False)],
)
def test_suppress_small_et(n_et, threshold, relabelled):
    labels = _labels(n_et)
    out = suppress_small_et(labels, threshold)
    assert out.dtype == labels.dtype and out.shape == labels.shape
    assert np.count_nonzero(out == 3) == (0 if relabelled else n_et)
    assert np.count_nonzero(out == 1) == (n_et if relabelled else 0)
    # WT and TC do not change: the ET voxels stay in the tumour core.
    assert np.array_equal(regions_from_labels(out)[:2], regions_from_labels(labels)[:2])
    assert np.count_nonzero(labels == 3) == n_et  # the input is not modified


def test_tune_picks_threshold_that_removes_false_et():
    no_et_gt = _labels(0)
    noisy = _labels(4)  # 4 false ET voxels in a case without ET: ET Dice 0 unless removed
    et_gt = _labels(50)
    good = _labels(40)  # 40 true ET voxels: ET Dice 0.89, 0 if removed
    preds, gts = [noisy, good], [no_et_gt, et_gt]
    assert tune_et_threshold(preds, gts, [1, 3, 10, 41, 100]) == 10  # 3 does not catch 4 voxels, 41 kills good
    assert tune_et_threshold(preds, gts, [5, 10, 20]) == 5  # ties: the smallest
    assert tune_et_threshold([good], [et_gt], [10, 100]) is None  # removing only hurts
    assert tune_et_threshold([good], [et_gt], [10, 20]) is None  # no change: no postprocessing
    assert tune_et_threshold([], [], [10]) is None
    with pytest.raises(ValueError, match="1 predictions but 2"):
        tune_et_threshold([good], [et_gt, et_gt], [10])
