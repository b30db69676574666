"""Lesion-wise BraTS 2023+ metrics on hand-made volumes whose answers follow from the definitions."""

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tumorseg.errors import TumorsegError
from tumorseg.evaluation.lesionwise import (
    lesion_table,
    _CODE_TRIANGLES,
    _TRIANGLES,
    CHALLENGES,
    LESION_HD95_MISS,
    LesionScores,
    _directed_percentile,
    challenge_parameters,
    lesion_scores,
    lesionwise_metrics,
    robust_hausdorff,
)
from tumorseg.evaluation.metrics import hd95 as pooled_hd95

GLI = CHALLENGES["GLI"]  # (dilation 3, threshold 50 mm^3)
ISO = (1.0, 1.0, 1.0)


def box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_parameters_are_the_challenges():
    assert CHALLENGES == {
        "GLI": (3, 50), "PED": (3, 50), "SSA": (3, 50), "MEN": (1, 50), "MET": (1, 2), "GoAT": (3, 50)
    }
    assert challenge_parameters("BraTS-MET") == (1, 2) and challenge_parameters("goat") == (3, 50)
    assert LESION_HD95_MISS == 374.0


def test_found_missed_and_false_positive():
    shape = (40, 40, 40)
    found, missed = box(shape, (5, 5, 5), (10, 10, 10)), box(shape, (25, 5, 5), (30, 10, 10))  # 125 voxels
    far = box(shape, (25, 28, 28), (30, 33, 33))  # 18 voxels from `missed`, beyond any dilation
    s = lesion_scores(found | far, found | missed, ISO, *GLI)
    assert s == LesionScores(
        dice=(1 + 0 + 0) / 3, hd95=(0 + 374 + 374) / 3, gt_lesions=2, detected=1, false_positives=1
    )


def test_small_lesions_are_ignored_and_predictions_on_them_forgiven():
    shape = (40, 40, 40)
    big = box(shape, (5, 5, 5), (10, 10, 10))
    small = box(shape, (25, 25, 25), (30, 30, 27))  # 50 voxels: at the threshold, so not scored
    on_small = box(shape, (27, 27, 26), (28, 28, 27))
    ring = box(shape, (31, 25, 25), (32, 26, 26))  # touches only small's dilation, not small itself
    assert lesion_scores(big | on_small, big | small, ISO, *GLI) == LesionScores(1.0, 0.0, 1, 1, 0)
    assert lesion_scores(big | ring, big | small, ISO, *GLI) == LesionScores(1.0, 0.0, 1, 1, 0)
    assert lesion_scores(big, big | small, ISO, *GLI) == LesionScores(1.0, 0.0, 1, 1, 0)  # not a miss either
    # The threshold is in mm^3: 50 voxels of 2 mm^3 are scored (missed here).
    s = lesion_scores(big, big | small, (1.0, 1.0, 2.0), *GLI)
    assert (s.gt_lesions, s.detected, s.dice, s.hd95) == (2, 1, 0.5, 187.0)
    # One voxel more (51) is above the threshold at 1 mm.
    bigger = small | box(shape, (25, 25, 27), (26, 26, 28))
    assert lesion_scores(big | bigger, big | bigger, ISO, *GLI) == LesionScores(1.0, 0.0, 2, 2, 0)


def test_predicted_components_are_not_size_filtered():
    shape = (30, 30, 30)
    gt = box(shape, (5, 5, 5), (10, 10, 10))
    speck = box(shape, (20, 20, 20), (21, 21, 21))  # one voxel far away is a whole false positive
    assert lesion_scores(gt | speck, gt, ISO, *GLI) == LesionScores(0.5, 187.0, 1, 1, 1)


def test_dilation_merges_nearby_blobs():
    shape = (40, 30, 30)
    a, b = box(shape, (5, 5, 5), (10, 10, 10)), box(shape, (14, 5, 5), (19, 10, 10))  # 4 empty voxels between
    # Dilating d times grows each blob by d voxels along x: gaps <= 2d merge. d=3 -> one lesion of 250 voxels
    # whose prediction is `a` alone; d=1 -> two lesions, one found and one missed.
    merged = lesion_scores(a, a | b, ISO, 3, 50)
    assert (merged.dice, merged.gt_lesions, merged.detected) == (2 * 125 / 375, 1, 1)
    assert lesion_scores(a, a | b, ISO, 1, 50) == LesionScores(0.5, 187.0, 2, 1, 0)
    # A prediction 3 voxels beyond b (inside b dilated 3 times, outside b dilated twice) matches it.
    near = box(shape, (21, 5, 5), (22, 6, 6))
    assert lesion_scores(near, b, ISO, 3, 50).false_positives == 0
    assert lesion_scores(near, b, ISO, 2, 50).false_positives == 1


def test_dilation_structure_is_18_connected():
    # Two voxels offset by (3, 3, 3): one dilation with the full 3x3x3 cube would make their
    # dilations touch at the corners (6,6,6)-(7,7,7); scipy's generate_binary_structure(3, 2),
    # which their code uses, has no corners, so they stay two lesions.
    gt = np.zeros((14, 14, 14), bool)
    gt[5, 5, 5] = gt[8, 8, 8] = True
    assert lesion_scores(np.zeros_like(gt), gt, ISO, 1, 0).gt_lesions == 2
    assert lesion_scores(np.zeros_like(gt), gt, ISO, 2, 0).gt_lesions == 1


def test_empty_cases():
    shape = (20, 20, 20)
    empty, lesion = np.zeros(shape, bool), box(shape, (5, 5, 5), (10, 10, 10))
    tiny = box(shape, (2, 2, 2), (3, 3, 3))
    assert lesion_scores(empty, empty, ISO, *GLI) == LesionScores(1.0, 0.0, 0, 0, 0)
    assert lesion_scores(lesion, empty, ISO, *GLI) == LesionScores(0.0, 374.0, 0, 0, 1)
    assert lesion_scores(lesion | box(shape, (15, 15, 15), (16, 16, 16)), empty, ISO, *GLI).hd95 == 374.0
    assert lesion_scores(empty, lesion, ISO, *GLI) == LesionScores(0.0, 374.0, 1, 0, 0)
    assert lesion_scores(empty, tiny, ISO, *GLI) == LesionScores(1.0, 0.0, 0, 0, 0)  # only an ignored lesion


def test_anisotropic_spacing_shifted_cube():
    # A 10-voxel cube shifted by one voxel: no surface corner is farther than one step along the
    # shift from the other surface, and the two faces across the shift (10-20% of the area here,
    # over 5%) are exactly one step away, so HD95 = the spacing along the shift axis.
    gt = box((30, 30, 30), (5, 5, 5), (15, 15, 15))
    spacing = (2.0, 1.0, 1.0)
    along_x = lesion_scores(np.roll(gt, 1, 0), gt, spacing, *GLI)
    along_y = lesion_scores(np.roll(gt, 1, 1), gt, spacing, *GLI)
    assert (along_x.dice, along_x.hd95) == (0.9, 2.0)
    assert (along_y.dice, along_y.hd95) == (0.9, 1.0)


def test_percentile_rule_is_area_weighted_without_interpolation():
    # Cumulative area fractions 0.5, 0.8, 0.95, 1.0: the first to reach 0.95 is the third.
    assert _directed_percentile(np.array([4.0, 2.0, 3.0, 1.0]), np.array([1.0, 6.0, 3.0, 10.0]), 95) == 3.0
    d = np.arange(20.0)  # equal areas: first cumulative fraction >= 0.95 is 19/20 -> 18 (numpy: 18.05)
    assert _directed_percentile(d, np.ones(20), 95) == 18.0 != np.percentile(d, 95)


def test_hd95_is_the_larger_directed_value_not_pooled():
    # Prediction = the truth cube plus a 7x7 one-voxel plate 2 voxels beyond its x face. Truth -> prediction:
    # all 0 (the cube's surface is unchanged). Prediction -> truth: 0 on the cube, 2 on the plate's near
    # face, 3 on its far face, which holds 8% of the prediction's surface area (> 5%): directed 95th = 3.
    # medpy's pooled HD95 sees 49 plate voxels at 3 among 1025 surface voxels (< 5%) and gives 0.
    gt = box((40, 40, 40), (5, 5, 5), (15, 15, 15))
    pred = gt | box((40, 40, 40), (17, 6, 6), (18, 13, 13))
    assert robust_hausdorff(gt, pred, ISO) == robust_hausdorff(pred, gt, ISO) == 3.0
    assert lesion_scores(pred, gt, ISO, *GLI).hd95 == 3.0
    assert pooled_hd95(pred, gt, ISO) == 0.0
    assert robust_hausdorff(gt, np.zeros_like(gt), ISO) == float("inf")


def test_results_do_not_depend_on_the_surrounding_volume():
    # Work happens in boxes around the lesions; embedding the case in a bigger image changes nothing.
    rng = np.random.default_rng(0)
    gt = box((24, 24, 24), (4, 4, 4), (12, 12, 10)) | box((24, 24, 24), (15, 14, 12), (20, 20, 20))
    pred = np.roll(gt, 1, 2) ^ (rng.random(gt.shape) < 0.01)
    small = lesion_scores(pred, gt, (1.0, 1.2, 2.0), 1, 50)
    big_p, big_g = np.zeros((60, 50, 40), bool), np.zeros((60, 50, 40), bool)
    big_p[20:44, 10:34, 8:32], big_g[20:44, 10:34, 8:32] = pred, gt
    assert lesion_scores(big_p, big_g, (1.0, 1.2, 2.0), 1, 50) == small
    assert small.gt_lesions == 2 and small.false_positives > 0


def test_lesionwise_metrics_region_order_and_challenge():
    shape = (3, 30, 30, 30)
    gt, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    cube = box(shape[1:], (5, 5, 5), (12, 12, 12))
    gt[0] = pred[0] = cube  # WT: perfect
    gt[1] = cube  # TC: missed
    gt[2] = pred[2] = cube  # ET: found, plus one false positive
    pred[2, 25, 25, 25] = True
    out = lesionwise_metrics(pred, gt, ISO, challenge="MEN")
    assert list(out) == ["WT", "TC", "ET"]
    assert out["WT"] == {"lesion_dice": 1.0, "lesion_hd95": 0.0, "lesion_tp": 1, "lesion_fn": 0, "lesion_fp": 0}
    assert out["TC"] == {"lesion_dice": 0.0, "lesion_hd95": 374.0, "lesion_tp": 0, "lesion_fn": 1, "lesion_fp": 0}
    assert out["ET"] == {"lesion_dice": 0.5, "lesion_hd95": 187.0, "lesion_tp": 1, "lesion_fn": 0, "lesion_fp": 1}
    with pytest.raises(TumorsegError, match="GLI, PED, SSA, MEN, MET, GoAT"):
        lesionwise_metrics(pred, gt, ISO, challenge="LGG")
    with pytest.raises(ValueError):
        lesionwise_metrics(pred[:2], gt[:2], ISO)


class _Zeros(ast.NodeTransformer):
    """Replaces the name `zeros` in MONAI's table by its value, [0.0, 0.0, 0.0]."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.parse("[0.0, 0.0, 0.0]", mode="eval").body


def _monai_normals() -> list[list[tuple[float, ...]]] | None:
    """|normals| of MONAI's copy of surface-distance's table, read from its source (import is slow)."""
    spec = importlib.util.find_spec("monai")
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).parent / "metrics" / "utils.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == "_get_neighbour_code_to_normals_table":
            for stmt in node.body:
                value = getattr(stmt, "value", None)
                if isinstance(stmt, ast.Assign) and isinstance(value, ast.List) and len(value.elts) == 256:
                    table = ast.literal_eval(ast.fix_missing_locations(_Zeros().visit(stmt.value)))
                    return [[tuple(abs(v) for v in n) for n in code if any(n)] for code in table]
    return None


def test_surface_area_table_matches_surface_distance():
    table = _monai_normals()
    if table is None:
        pytest.skip("MONAI's normals table not found")
    ours = [
        [tuple(v / 8 for v in _TRIANGLES[t]) for t in _CODE_TRIANGLES[min(c, 255 - c)].strip("-")]
        for c in range(256)
    ]
    assert ours == table


@pytest.mark.parametrize("seed", range(4))
def test_lesion_table_gives_lesion_scores_dice_for_any_kept_components(seed):
    """The table post-processing tunes on is exact: Dice of any subset of the predicted components."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = (22, 20, 18)
    gt = ndimage.binary_dilation(rng.random(shape) > 0.996, iterations=2)
    pred = ndimage.binary_dilation(rng.random(shape) > 0.994, iterations=int(rng.integers(0, 2))) | (
        gt & (rng.random(shape) > 0.3))
    spacing = [(1.0, 1.0, 1.0), (1.2, 0.8, 2.0)][seed % 2]
    parts, n = ndimage.label(pred, np.ones((3, 3, 3)))
    for dilation, threshold in ((3, 50), (1, 2), (0, 5)):
        table = lesion_table(parts, gt, spacing, dilation, threshold)
        assert len(table.sizes) == n and table.dice() == pytest.approx(lesion_scores(pred, gt, spacing, dilation, threshold).dice)
        for _ in range(5):
            keep = rng.random(n) > 0.5
            kept = np.isin(parts, np.flatnonzero(keep) + 1)
            assert table.dice(keep) == pytest.approx(lesion_scores(kept, gt, spacing, dilation, threshold).dice, abs=1e-12)
    empty = np.zeros(shape, np.int32)
    assert lesion_table(empty, np.zeros(shape, bool), spacing, 3, 50).dice() == 1.0
    assert lesion_table(empty, gt, spacing, 3, 50).dice() == lesion_scores(empty > 0, gt, spacing, 3, 50).dice


def test_lesion_table_scores_the_lesions_lesion_scores_scores_at_the_threshold():
    """125 voxels of 0.8 x 0.8 x 0.625 mm are 50 mm^3 to within rounding: both must say the same."""
    from scipy import ndimage

    spacing = (0.8, 0.8, 0.625)
    gt = np.zeros((20, 20, 20), bool)
    gt[5:10, 5:10, 5:10] = True
    pred = np.roll(gt, 1, 0)
    parts, _ = ndimage.label(pred, np.ones((3, 3, 3)))
    assert lesion_table(parts, gt, spacing, 3, 50).dice() == lesion_scores(pred, gt, spacing, 3, 50).dice
