import numpy as np
import pytest

from tumorseg.inference.postprocess import (
    keep_largest_tumour,
    postprocess,
    suppress_small_et,
    tune_et_threshold,
    tune_postprocessing,
)
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


def _two_lesions(big: int = 6, small: int = 2, gap: int = 2) -> np.ndarray:
    """A big cubic lesion (oedema around an ET core) and a small oedema island `gap` voxels away."""
    out = np.zeros((20, 20, 20), np.uint8)
    out[2 : 2 + big, 2 : 2 + big, 2 : 2 + big] = 2
    out[3 : 1 + big, 3 : 1 + big, 3 : 1 + big] = 3
    start = 2 + big + gap
    out[start : start + small, 2 : 2 + small, 2 : 2 + small] = 2
    return out


def test_keep_largest_tumour_removes_islands_only():
    labels = _two_lesions()
    out = keep_largest_tumour(labels)
    assert np.count_nonzero(out) == 6**3 and np.array_equal(out[:8], labels[:8])  # the lesion keeps its labels
    assert np.count_nonzero(labels) == 6**3 + 2**3  # the input is not modified
    corner = _two_lesions(gap=0)
    corner[8:10, 2:4, 2:4] = 0
    corner[8, 8, 8] = 2  # touches the lesion's corner voxel (7, 7, 7) only: one 26-connected component
    assert keep_largest_tumour(corner) is corner
    empty = np.zeros((4, 4, 4), np.uint8)
    assert keep_largest_tumour(empty) is empty


def test_postprocess_applies_both_steps_in_order():
    labels = _two_lesions()
    out = postprocess(labels, largest_tumour=True, et_threshold=4**3 + 1)  # the 64 ET voxels are too few
    assert np.count_nonzero(out) == 6**3 and np.count_nonzero(out == 3) == 0 and np.count_nonzero(out == 1) == 4**3
    assert postprocess(labels) is labels
    et_island = _two_lesions()
    et_island[et_island == 3] = 2
    et_island[10:12, 2:4, 2:4] = 3  # 8 ET voxels, all in the island
    assert np.count_nonzero(postprocess(et_island, largest_tumour=True, et_threshold=10) == 1) == 0  # removed first
    assert np.count_nonzero(postprocess(et_island, et_threshold=10) == 1) == 8


def test_tune_postprocessing_keeps_largest_unless_it_costs_dice():
    gt = _two_lesions(small=0)  # one lesion
    with_island = _two_lesions()  # a false-positive island: removing it raises WT Dice
    assert tune_postprocessing([with_island], [gt], [10]) == {"largest_tumour": True, "et_threshold": None}
    assert tune_postprocessing([gt], [gt], [10])["largest_tumour"]  # a tie keeps it (HD95 gains)
    two_true = _two_lesions(small=4)  # a real second focus: removing it lowers WT Dice
    assert not tune_postprocessing([two_true], [two_true], [10])["largest_tumour"]
    # A second focus with true ET in false oedema: WT Dice rises without it, ET Dice falls.
    et_gt = _two_lesions(small=0)
    et_gt[10:12, 2:4, 2:4] = 3
    et_pred = _two_lesions(small=6)
    et_pred[10:12, 2:4, 2:4] = 3
    assert not tune_postprocessing([et_pred], [et_gt], [10])["largest_tumour"]
    # The ET threshold is tuned on the cleaned predictions: ET only in a false island needs none.
    et_island = _two_lesions()
    et_island[et_island == 3] = 2
    et_island[10:12, 2:4, 2:4] = 3
    no_et = _two_lesions(small=0)
    no_et[no_et == 3] = 2
    assert tune_postprocessing([et_island], [no_et], [10]) == {"largest_tumour": True, "et_threshold": None}
    assert tune_postprocessing([], [], [10]) == {"largest_tumour": False, "et_threshold": None}
    with pytest.raises(ValueError, match="1 predictions but 0"):
        tune_postprocessing([gt], [], [10])
