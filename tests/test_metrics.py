import numpy as np
import pytest
from medpy.metric import binary as medpy
from scipy import ndimage

from tumorseg.evaluation.metrics import (
    HD95_ONE_EMPTY,
    crop_to_union,
    dice,
    hd95,
    region_dice_from_labels,
    region_metrics,
    sensitivity,
    specificity,
    surface,
    surface_distances,
)
from tumorseg.labels import to_raw_labels


def cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def blob(shape, seed, threshold=0.6, sigma=2.0):
    """Random smooth blobs; large ones touch the volume's border."""
    noise = np.random.default_rng(seed).random(shape)
    return ndimage.gaussian_filter(noise, sigma) > np.quantile(ndimage.gaussian_filter(noise, sigma), threshold)


def test_identical_masks():
    m = cube((20, 20, 20), (3, 4, 5), (12, 15, 11))
    assert dice(m, m) == 1.0 and hd95(m, m) == 0.0
    assert sensitivity(m, m) == 1.0 and specificity(m, m) == 1.0


def test_disjoint_points_give_their_distance():
    p, g = np.zeros((12, 12, 12), bool), np.zeros((12, 12, 12), bool)
    p[5, 5, 5], g[5, 5, 9] = True, True
    assert dice(p, g) == 0.0 and sensitivity(p, g) == 0.0
    assert hd95(p, g) == 4.0
    assert hd95(p, g, spacing=(1, 1, 3)) == 12.0


def test_shifted_cubes_analytic_dice_sensitivity_specificity():
    shape = (20, 20, 20)
    g = cube(shape, (2, 2, 2), (12, 12, 12))  # 1000 voxels
    p = cube(shape, (4, 2, 2), (14, 12, 12))  # shifted by 2: overlap 800
    assert dice(p, g) == pytest.approx(0.8)
    assert sensitivity(p, g) == pytest.approx(0.8)
    assert specificity(p, g) == pytest.approx(6800 / 7000)  # 8000 - 1000 negatives, 200 false positives


@pytest.mark.parametrize(
    "axis, spacing, expected",
    [(0, (1, 1, 1), 3.0), (0, (2, 1, 1), 6.0), (0, (1, 1, 3), 3.0), (2, (1, 1, 3), 9.0), (2, (1, 1, 1), 3.0)],
)
def test_shifted_plane_hd95_follows_spacing(axis, spacing, expected):
    g, p = np.zeros((16, 16, 16), bool), np.zeros((16, 16, 16), bool)
    index = [slice(None)] * 3
    index[axis] = 5
    g[tuple(index)] = True
    index[axis] = 8
    p[tuple(index)] = True
    assert hd95(p, g, spacing) == expected
    assert hd95(p, g, spacing) == pytest.approx(medpy.hd95(p, g, voxelspacing=spacing))


def test_grown_cube_hd95_is_sqrt2():
    # inner 10^3 cube: 488 surface voxels at distance 1; outer 12^3: 600 face voxels at 1,
    # 120 edge voxels at sqrt 2, 8 corners at sqrt 3 -> pooled 95th percentile sqrt 2.
    g = cube((20, 20, 20), (5, 5, 5), (15, 15, 15))
    p = cube((20, 20, 20), (4, 4, 4), (16, 16, 16))
    assert hd95(p, g) == pytest.approx(np.sqrt(2))
    p_to_g, g_to_p = surface_distances(p, g)
    assert len(g_to_p) == 488 and np.all(g_to_p == 1)
    assert np.sort(p_to_g)[-8:] == pytest.approx([np.sqrt(3)] * 8)


def test_empty_region_rules():
    empty, m = np.zeros((10, 10, 10), bool), cube((10, 10, 10), (2, 2, 2), (5, 5, 5))
    def all4(p, g):
        return dice(p, g), hd95(p, g), sensitivity(p, g), specificity(p, g)

    assert all4(empty, empty) == (1, 0, 1, 1)
    assert all4(empty, m) == (0, HD95_ONE_EMPTY, 0, 1)  # prediction empty, ground truth not
    # ground truth empty, prediction not: specificity as defined
    assert (dice(m, empty), hd95(m, empty), sensitivity(m, empty)) == (0, HD95_ONE_EMPTY, 0)
    assert specificity(m, empty) == pytest.approx(1 - 27 / 1000)
    assert HD95_ONE_EMPTY == pytest.approx(np.sqrt(240**2 + 240**2 + 155**2), abs=0.01)


def nested_case(shape=(24, 24, 24)):
    gt = np.zeros(shape, np.uint8)
    gt[cube(shape, (4, 4, 4), (20, 20, 20))] = 2  # oedema shell
    gt[cube(shape, (8, 8, 8), (16, 16, 16))] = 1  # necrotic core
    gt[cube(shape, (10, 10, 10), (14, 14, 14))] = 4  # enhancing inside the core
    return gt


def test_nested_labels_to_regions():
    gt = nested_case()
    m = region_metrics(gt, gt)
    assert all(m[r]["dice"] == 1.0 and m[r]["hd95"] == 0.0 for r in ("WT", "TC", "ET"))
    # all tumour called oedema: WT perfect, TC and ET missed entirely
    m = region_metrics(np.where(gt > 0, 2, 0), gt)
    assert m["WT"]["dice"] == 1.0 and m["WT"]["hd95"] == 0.0
    assert m["TC"] == {"dice": 0.0, "hd95": HD95_ONE_EMPTY, "sensitivity": 0.0, "specificity": 1.0}
    assert m["ET"]["dice"] == 0.0
    # labels 1 and 4 swapped: TC still perfect, ET = the 4^3 cube vs the 8^3 - 4^3 shell
    swapped = gt.copy()
    swapped[gt == 1], swapped[gt == 4] = 4, 1
    m = region_metrics(swapped, gt)
    assert m["TC"]["dice"] == 1.0 and m["ET"]["dice"] == 0.0 and m["ET"]["sensitivity"] == 0.0


def test_no_tumour_anywhere_and_bad_input():
    zeros = np.zeros((8, 8, 8), np.uint8)
    m = region_metrics(zeros, zeros)
    assert m["ET"] == {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0}
    with pytest.raises(ValueError, match="label 3"):
        region_metrics(np.where(nested_case() == 4, 3, nested_case()), nested_case())
    with pytest.raises(ValueError, match="shape"):
        region_metrics(zeros, np.zeros((8, 8, 9), np.uint8))
    with pytest.raises(ValueError, match="spacing"):
        region_metrics(zeros, zeros, spacing=(1, 0, 1))


CASES = [  # seed, shape, spacing, blob threshold (lower = bigger blobs, touching the border)
    (0, (32, 30, 28), (1.0, 1.0, 1.0), 0.7),
    (1, (32, 30, 28), (1.0, 1.0, 3.0), 0.7),
    (2, (30, 34, 26), (0.9, 1.2, 2.5), 0.5),
    (3, (24, 24, 24), (1.0, 1.0, 1.0), 0.2),
    (4, (40, 20, 16), (2.0, 1.0, 1.0), 0.85),
]


@pytest.mark.parametrize("seed, shape, spacing, threshold", CASES)
def test_matches_medpy_on_random_blobs(seed, shape, spacing, threshold):
    p = blob(shape, seed, threshold)
    g = blob(shape, seed + 100, threshold)
    ours = hd95(p, g, spacing)
    assert ours == pytest.approx(medpy.hd95(p, g, voxelspacing=spacing), rel=1e-12)
    assert ours == hd95(p, g, spacing, crop=False)
    assert dice(p, g) == pytest.approx(medpy.dc(p, g), rel=1e-12)
    assert sensitivity(p, g) == pytest.approx(medpy.sensitivity(p, g), rel=1e-12)
    assert specificity(p, g) == pytest.approx(medpy.specificity(p, g), rel=1e-12)


def test_crop_matches_full_image_at_borders_and_far_apart():
    shape = (40, 36, 30)
    full = np.ones(shape, bool)  # every voxel: the surface is the image's outer shell
    slab = cube(shape, (0, 0, 0), (3, 36, 30))  # touches five faces of the volume
    corner = cube(shape, (37, 33, 27), (40, 36, 30))
    small = cube(shape, (18, 16, 14), (21, 19, 17))
    for p, g in [(slab, full), (corner, slab), (small, corner), (slab, small), (full, small)]:
        for spacing in [(1.0, 1.0, 1.0), (1.0, 1.0, 3.0)]:
            cropped = surface_distances(p, g, spacing, crop=True)
            whole = surface_distances(p, g, spacing, crop=False)
            for a, b in zip(cropped, whole):
                np.testing.assert_array_equal(np.sort(a), np.sort(b))
            assert hd95(p, g, spacing) == pytest.approx(medpy.hd95(p, g, voxelspacing=spacing), rel=1e-12)


def test_crop_keeps_surfaces_of_masks_touching_the_box():
    p = blob((20, 20, 20), 7, 0.4)
    g = cube((20, 20, 20), (0, 0, 0), (20, 20, 5))
    pc, gc = crop_to_union(p, g)
    assert pc.sum() == p.sum() and surface(pc).sum() == surface(p).sum()
    assert not pc[0].any() and not pc[-1].any()  # the zero margin


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecated argument
def test_surfaces_match_monai_and_monai_hd95_is_the_directed_max():
    import torch
    from monai.metrics import compute_hausdorff_distance
    from monai.metrics.utils import get_mask_edges

    p, g = blob((30, 30, 24), 11, 0.6), blob((30, 30, 24), 12, 0.6)
    edges_p, edges_g = get_mask_edges(p, g, crop=True)
    pc, gc = crop_to_union(p, g)
    np.testing.assert_array_equal(surface(pc), edges_p)
    np.testing.assert_array_equal(surface(gc), edges_g)
    spacing = (1.0, 1.0, 2.0)
    d_pg, d_gp = surface_distances(p, g, spacing)
    as_tensor = lambda m: torch.from_numpy(m[None, None].astype(np.float32))  # noqa: E731
    monai = compute_hausdorff_distance(as_tensor(p), as_tensor(g), percentile=95, spacing=spacing).item()
    directed_max = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    assert monai == pytest.approx(directed_max, rel=1e-5)
    assert monai >= hd95(p, g, spacing) - 1e-5


def test_region_dice_from_training_labels_matches_region_metrics():
    import torch

    rng = np.random.default_rng(0)
    gt = nested_case()
    pred = np.where(rng.random(gt.shape) < 0.1, rng.integers(0, 4, gt.shape), np.where(gt == 4, 3, gt))
    pred = pred.astype(np.uint8)
    expected = region_metrics(to_raw_labels(pred), gt)
    got = region_dice_from_labels(torch.from_numpy(pred), torch.from_numpy(np.where(gt == 4, 3, gt)))
    assert got == pytest.approx({r: expected[r]["dice"] for r in ("WT", "TC", "ET")})
    zeros = np.zeros((4, 4, 4), np.uint8)
    assert region_dice_from_labels(zeros, zeros) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    necrotic_only = region_dice_from_labels(zeros + 1, zeros)
    assert necrotic_only == {"WT": 0.0, "TC": 0.0, "ET": 1.0}
    assert region_dice_from_labels(zeros + 4, zeros) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}  # a kept cavity: no region
    with pytest.raises(ValueError, match="0..4"):
        region_dice_from_labels(zeros + 5, zeros)
