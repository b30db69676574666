import numpy as np
import pytest

from tumorseg.evaluation.lesionwise import lesion_scores
from tumorseg.inference.postprocess import (
    case_statistics,
    choose_postprocessing,
    keep_largest_tumour,
    postprocess,
    remove_small_components,
    suppress_small_et,
    tune_et_threshold,
    tune_postprocessing,
)
from tumorseg.inference.postprocess import _kept
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


def _first_steps(tuned: dict) -> dict:
    return {k: tuned[k] for k in ("largest_tumour", "et_threshold")}


def test_tune_postprocessing_keeps_largest_unless_it_costs_dice():
    gt = _two_lesions(small=0)  # one lesion
    with_island = _two_lesions()  # a false-positive island: removing it raises WT Dice
    assert _first_steps(tune_postprocessing([with_island], [gt], [10])) == {"largest_tumour": True, "et_threshold": None}
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
    assert _first_steps(tune_postprocessing([et_island], [no_et], [10])) == {"largest_tumour": True, "et_threshold": None}
    assert tune_postprocessing([], [], [10]) == {"largest_tumour": False, "et_threshold": None, "min_component": [0, 0, 0]}
    with pytest.raises(ValueError, match="1 predictions but 0"):
        tune_postprocessing([gt], [], [10])


def _speckled(seed: int, shape=(24, 24, 24)) -> tuple[np.ndarray, np.ndarray]:
    """A truth of one nested lesion (plus a small second focus) and a prediction with specks of every label."""
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, np.uint8)
    gt[4:14, 4:14, 4:14] = 2
    gt[6:12, 6:12, 6:12] = 1
    gt[7:11, 7:11, 7:11] = 3
    gt[18:21, 18:21, 18:21] = 2  # 27 voxels: a lesion the GLI metric does not score
    pred = np.roll(gt, int(rng.integers(-1, 2)), axis=0)
    for label in (1, 2, 3):
        pred[tuple(rng.integers(0, 24, (3, int(rng.integers(3, 15)))))] = label
    pred[1:3, 18:21, 2:4] = 3  # a 12-voxel ET blob with no tumour around it
    return pred, gt


@pytest.mark.parametrize("seed", range(6))
def test_tuning_scores_what_postprocess_writes(seed):
    """The tuning's component bookkeeping gives the lesion-wise Dice of `postprocess`'s own output."""
    pred, gt = _speckled(seed)
    stats = case_statistics(pred, gt, (1.0, 1.2, 0.9), "MET" if seed % 2 else "GLI")
    settings = [(False, None, (0, 0, 0)), (True, None, (0, 0, 0)), (False, 13, (2, 0, 5)), (True, 200, (0, 3, 2)),
                (False, None, (30, 10, 3)), (True, 5, (1000, 2, 2))]
    for largest, et_threshold, minimum in settings:
        out = postprocess(pred, largest, et_threshold, minimum)
        kept = _kept(stats["components"], largest, et_threshold, minimum)
        for i, (p, g, row) in enumerate(zip(regions_from_labels(out), regions_from_labels(gt), stats["components"])):
            dilation, threshold = (1, 2) if seed % 2 else (3, 50)
            expected = lesion_scores(p, g, (1.0, 1.2, 0.9), dilation, threshold).dice
            assert row["table"].dice(kept[i]) == pytest.approx(expected, abs=1e-12), (largest, et_threshold, minimum, i)


def test_remove_small_components_moves_voxels_one_region_out():
    labels, _ = _speckled(0)
    out = remove_small_components(labels, (0, 0, 20))  # ET only: ET specks become necrosis, TC and WT unchanged
    assert np.array_equal(regions_from_labels(out)[:2], regions_from_labels(labels)[:2])
    assert np.count_nonzero(out == 3) == 4**3 and out[1, 18, 2] == 1
    out = remove_small_components(labels, (0, 20, 0))  # TC: its small components become oedema, WT unchanged
    assert np.array_equal(regions_from_labels(out)[0], regions_from_labels(labels)[0])
    assert out[1, 18, 2] == 2 and np.count_nonzero(out == 3) == 4**3  # ET inside a removed TC goes with it
    out = remove_small_components(labels, (100, 0, 0))  # WT: small components become background
    assert np.count_nonzero(out) == 10**3 and np.array_equal(out[4:14, 4:14, 4:14], labels[4:14, 4:14, 4:14])
    assert remove_small_components(labels, (0, 0, 0)) is labels and remove_small_components(labels, (1, 1, 1)) is labels
    assert np.count_nonzero(labels[1:3, 18:21, 2:4] == 3) == 12  # the input is not modified
    cavity = np.zeros((6, 6, 6), np.uint8)
    cavity[0, 0, 0], cavity[0:3, 5, 0:2], cavity[3:5, 3:5, 3:5] = 2, 2, 4
    expected = cavity.copy()  # the speck goes; a kept resection cavity (4) is in no region: never removed
    expected[0, 0, 0] = 0
    assert np.array_equal(remove_small_components(cavity, (5, 5, 5)), expected)


def test_a_region_predicted_only_in_small_parts_keeps_its_largest():
    """Removing every component would wipe a true small region (ET Dice 0, HD95 374): its largest stays."""
    labels = np.zeros((24, 24, 24), np.uint8)
    labels[4:14, 4:14, 4:14] = 2
    labels[5:8, 5:8, 5:8] = 3  # 27 voxels of ET
    labels[10:12, 10:12, 10:12] = 3  # 8 voxels
    out = remove_small_components(labels, (0, 0, 500))
    assert np.count_nonzero(out == 3) == 27 and np.all(out[10:12, 10:12, 10:12] == 1)
    gt = np.where(out == 3, 3, np.where(labels > 0, 2, 0)).astype(np.uint8)
    stats = case_statistics(labels, gt)
    kept = _kept(stats["components"], False, None, (0, 0, 500))
    assert kept[2].tolist() == [True, False]  # the tuning models it: the largest ET component stays
    assert remove_small_components(np.zeros((4, 4, 4), np.uint8), (5, 5, 5)).max() == 0


def test_component_sizes_are_tuned_on_lesionwise_dice():
    gt = np.zeros((32, 32, 32), np.uint8)
    gt[4:14, 4:14, 4:14] = 2
    gt[7:11, 7:11, 7:11] = 3
    gt[24:29, 24:29, 2:7] = 2  # a second focus of 125 voxels: keeping only the largest tumour would cost it
    pred = gt.copy()
    pred[20, 20, 20] = pred[20, 2, 20] = 2  # two 1-voxel WT specks: false-positive lesions
    pred[2, 20, 2:4] = 3  # a 2-voxel ET speck, no tumour around it
    before = choose_postprocessing([case_statistics(pred, gt)], (), ())
    assert not before["largest_tumour"] and before["min_component"] == [0, 0, 0]
    assert before["lesion_dice"] == pytest.approx((2 / 5 + 1 / 2 + 1 / 2) / 3)  # 3 WT false positives, 1 in TC, ET
    tuned = choose_postprocessing([case_statistics(pred, gt)], (), (2, 3, 500, 2000))
    assert tuned["min_component"] == [3, 0, 0]  # WT specks gone, and the ET speck with them; 500 would cost the focus
    assert tuned["lesion_dice"] == pytest.approx(1.0)
    assert np.array_equal(postprocess(pred, tuned["largest_tumour"], tuned["et_threshold"], tuned["min_component"]), gt)
    # MET scores lesions above 2 mm^3: a true 4-voxel metastasis is kept
    met_gt = gt.copy()
    met_gt[20, 20, 18:22] = 2
    met_pred = met_gt.copy()
    met_pred[2, 2, 20] = 2
    met = tune_postprocessing([met_pred], [met_gt], (), (2, 5, 50), challenge="MET")
    assert met["min_component"][0] == 2 and met["lesion_dice"] == pytest.approx(1.0)
