"""Voxel grids: exact reorientation, spacing resampling, field-of-view overlap (synthetic data)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine

from tumorseg.errors import TumorsegError
from tumorseg.geometry import (
    same_voxels,
    CANONICAL_AXCODES,
    Grid,
    grid_of,
    labels_onto,
    network_grid,
    overlap_fraction,
    resample,
    resample_box,
)

SHAPE = (20, 24, 16)


def lps_grid(shape=SHAPE, spacing=(1.0, 1.0, 1.0)) -> Grid:
    """BraTS-like storage: affine diag(-sx, -sy, sz), origin at (0, (ny - 1) * sy, 0)."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[1, 3] = (shape[1] - 1) * spacing[1]
    return Grid(shape, affine)


def volume(shape=SHAPE, dtype=np.float32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, size=shape).astype(dtype)


def sphere(grid: Grid, centre_mm, radius_mm: float) -> np.ndarray:
    ijk = np.indices(grid.shape).reshape(3, -1).T
    xyz = apply_affine(grid.affine, ijk)
    inside = np.linalg.norm(xyz - np.asarray(centre_mm), axis=1) <= radius_mm
    return inside.reshape(grid.shape).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.astype(bool).sum() + b.astype(bool).sum())


def rotation_z(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot


def test_grid_basics():
    grid = lps_grid(spacing=(0.9, 0.8, 3.0))
    assert grid.spacing == pytest.approx((0.9, 0.8, 3.0))
    assert nib.aff2axcodes(grid.affine) == CANONICAL_AXCODES
    assert grid == Grid(SHAPE, grid.affine + 1e-5) and len({grid, Grid(SHAPE, grid.affine)}) == 1
    assert not grid.same_as(Grid((20, 24, 17), grid.affine))
    assert grid_of(nib.Nifti1Image(np.zeros((*SHAPE, 2), np.float32), grid.affine)) == grid
    with pytest.raises(TumorsegError):
        Grid(SHAPE, np.zeros((4, 4)))


@pytest.mark.parametrize("spacing", [None, (1, 1, 1), (1.0005, 1, 0.9995)])
def test_lps_1mm_is_untouched(spacing):
    grid = lps_grid()
    net = network_grid(grid, spacing)
    assert net.same_as(grid)
    data = volume()
    assert resample(data, grid, net, order=1) is data


def _stored(lps: Grid, data: np.ndarray, flips: tuple[int, ...], perm: tuple[int, ...]):
    """The same voxels stored with axes flipped then permuted, affine adjusted to match."""
    out = np.flip(data, flips) if flips else data
    vox = np.eye(4)  # stored voxel -> LPS voxel
    for axis in flips:
        vox[axis, axis] = -1
        vox[axis, 3] = lps.shape[axis] - 1
    vox = vox[:, list(perm) + [3]]
    out = np.ascontiguousarray(np.transpose(out, perm))
    return Grid(out.shape, lps.affine @ vox), out


@pytest.mark.parametrize(
    "flips, perm, axcodes",
    [
        ((0, 1), (0, 1, 2), ("R", "A", "S")),
        ((), (2, 0, 1), ("S", "L", "P")),
        ((2,), (1, 2, 0), ("P", "I", "L")),
    ],
)
def test_reorientation_is_exact(flips, perm, axcodes):
    lps = lps_grid()
    data = volume(dtype=np.int16)
    grid, stored = _stored(lps, data, flips, perm)
    assert nib.aff2axcodes(grid.affine) == axcodes
    net = network_grid(grid)
    assert net.same_as(lps)
    back = resample(stored, grid, net, order=1)
    assert back.dtype == np.int16 and np.array_equal(back, data)
    again = resample(back, net, grid, order=0)
    assert again.dtype == np.int16 and np.array_equal(again, stored)
    # leading channel axis
    multi = np.stack([stored, stored * 2])
    assert np.array_equal(resample(multi, grid, net, order=1), np.stack([data, data * 2]))


def test_stored_copy_keeps_world_positions():
    lps = lps_grid()
    grid, _ = _stored(lps, volume(), (0, 1), (2, 0, 1))
    ijk = np.array([[0, 0, 0], [3, 5, 7], [15, 19, 23]])  # stored (S, L, P) indices
    lps_ijk = np.stack([SHAPE[0] - 1 - ijk[:, 1], SHAPE[1] - 1 - ijk[:, 2], ijk[:, 0]], axis=1)
    assert np.allclose(apply_affine(grid.affine, ijk), apply_affine(lps.affine, lps_ijk))


def test_anisotropic_to_1mm():
    grid = lps_grid(shape=(30, 26, 8), spacing=(0.9, 0.9, 3.0))
    net = network_grid(grid, (1, 1, 1))
    assert net.shape == (27, 23, 24)  # round(30*0.9)=27, round(26*0.9)=23.4->23, 8*3=24
    assert net.spacing == pytest.approx((1, 1, 1))
    # centre of the field of view preserved
    centre = lambda g: apply_affine(g.affine, (np.asarray(g.shape) - 1) / 2)  # noqa: E731
    assert np.allclose(centre(net), centre(grid))
    ramp = lambda xyz: 2.0 * xyz[..., 0] + 0.5 * xyz[..., 2] - 3  # noqa: E731
    data = ramp(apply_affine(grid.affine, np.indices(grid.shape).transpose(1, 2, 3, 0)))
    out = resample(data.astype(np.float32), grid, net, order=1)
    assert out.dtype == np.float32 and out.shape == net.shape
    expected = ramp(apply_affine(net.affine, np.indices(net.shape).transpose(1, 2, 3, 0)))
    inner = (slice(1, -1), slice(1, -1), slice(2, -2))  # outside src voxel centres: cval
    assert np.allclose(out[inner], expected[inner], atol=1e-3)


def test_label_round_trip_nearest():
    fine = lps_grid(shape=(40, 40, 36))
    coarse = Grid(*_coarse(fine))
    labels = sphere(fine, apply_affine(fine.affine, (19.5, 19.5, 17.5)), 10.0)
    down = resample(labels, fine, coarse, order=0)
    assert down.dtype == np.uint8 and down.shape == coarse.shape
    up = resample(down, coarse, fine, order=0)
    assert up.dtype == np.uint8 and set(np.unique(up)) <= {0, 1}
    assert dice(up, labels) >= 0.9


def _coarse(fine: Grid):
    """network_grid at 0.9 x 0.9 x 3 (mm) of a 1 mm grid: the shape and affine of the result."""
    g = network_grid(fine, (0.9, 0.9, 3.0))
    assert g.shape == (44, 44, 12) and g.spacing == pytest.approx((0.9, 0.9, 3.0))
    return g.shape, g.affine


def test_oblique_stays_oblique_and_exact():
    lps = lps_grid()
    rot = rotation_z(10)
    oblique = Grid(SHAPE, rot @ lps.affine)
    data = volume()
    # stored as R, A, S (flipped x and y), rotated by 10 degrees
    grid, stored = _stored(oblique, data, (0, 1), (0, 1, 2))
    net = network_grid(grid)
    assert net.same_as(oblique)  # axes reordered only, rotation kept
    assert not np.allclose(np.abs(net.affine[:3, :3]), np.eye(3))
    assert np.array_equal(resample(stored, grid, net, order=1), data)
    # a spacing change on an oblique grid keeps the rotation
    net2 = network_grid(grid, (2, 2, 2))
    cols = net2.affine[:3, :3] / np.asarray(net2.spacing)
    assert np.allclose(cols, oblique.affine[:3, :3])


def rotation_x(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot


def test_thick_slices_of_an_oblique_scan_resample_as_an_aligned_ones():
    """NIfTI stores the affine in float32: an angled 1x1x3 mm series' in-plane centres, which
    coincide with the 1 mm grid's, come out a few 1e-6 voxel apart. They still take their values
    exactly, as the axis-aligned twin's do (a real case had bled 1e-6-scaled values into 19k
    background voxels, growing the brain mask and changing 5 % of its tumour labels)."""
    shape = (16, 240, 52)
    aligned = np.diag([-1.0, -1.0, 3.0, 1.0])
    aligned[:3, 3] = (0.0, 239.0, 1.0)  # BraTS's origin: coordinates of 100 mm and more
    data = np.zeros(shape, np.float32)
    data[2:14, 20:220, 5:45] = volume((12, 200, 40), seed=3) + 1  # a brain on a zero background
    outputs = []
    for affine in (aligned, rotation_x(12) @ aligned):
        grid = Grid(shape, affine.astype(np.float32).astype(np.float64))  # as nibabel reads it back
        outputs.append(resample(data, grid, network_grid(grid, (1, 1, 1)), order=1))
    straight, oblique = outputs
    assert np.array_equal(oblique > 0, straight > 0)  # no bleed into the background
    assert np.allclose(oblique, straight, rtol=1e-5, atol=0)  # thirds of a slice are float32's thirds


def test_interpolation_matches_general_path():
    """The diagonal fast path (1-D matrix for scipy) agrees with a rotated grid of no rotation."""
    grid = lps_grid(spacing=(0.9, 0.9, 3.0))
    data = volume(seed=1)
    net = network_grid(grid, (1, 1, 1))
    fast = resample(data, grid, net, order=1)
    tiny = Grid(net.shape, rotation_z(1e-7) @ net.affine)  # forces the general 3x3 path
    assert np.allclose(fast, resample(data, grid, tiny, order=1), atol=1e-3)


def test_overlap_fraction():
    a = lps_grid()
    assert overlap_fraction(a, a) == pytest.approx(1.0)
    shift = np.eye(4)
    shift[0, 3] = 10  # half of a's 20 voxels along x
    shifted = Grid(SHAPE, a.affine @ shift)
    assert overlap_fraction(a, shifted) == pytest.approx(0.5, abs=0.06)
    shift[0, 3] = 100
    far = Grid(SHAPE, a.affine @ shift)
    assert overlap_fraction(a, far) == 0.0
    # orientation does not matter, only world positions
    ras, _ = _stored(a, volume(), (0, 1), (2, 0, 1))
    assert overlap_fraction(a, ras) == pytest.approx(1.0)
    assert overlap_fraction(a, Grid((1, 24, 16), a.affine)) == 0.0  # one slice covers almost none


def _turned(grid: Grid, degrees: float) -> Grid:
    """`grid` turned about z around its centre (world space)."""
    centre = apply_affine(grid.affine, (np.asarray(grid.shape) - 1) / 2)
    to, back = np.eye(4), np.eye(4)
    to[:3, 3], back[:3, 3] = centre, -centre
    return Grid(grid.shape, to @ rotation_z(degrees) @ back @ grid.affine)


def test_overlap_fraction_of_grids_turned_to_each_other_is_exact():
    """A square and itself turned 45 degrees share a regular octagon, 2 (sqrt 2 - 1) of it; a grid
    turned by one degree shares over 99 % (its bounding box in the other grid would say 97 %)."""
    cube = Grid((50, 50, 50), np.eye(4))
    assert overlap_fraction(_turned(cube, 45), cube, edges=True) == pytest.approx(2 * (np.sqrt(2) - 1), rel=1e-9)
    brats = Grid((240, 240, 155), np.diag([-1.0, -1.0, 1.0, 1.0]) + np.array([[0, 0, 0, 0], [0, 0, 0, 239.0]] + [[0] * 4] * 2))
    points = np.random.default_rng(0).uniform(-0.5, 239.5, size=(200_000, 3)) * [1, 1, 155 / 240]
    for degrees in (0.5, 1.0, 5.0):
        turned = _turned(brats, degrees)
        inside = apply_affine(np.linalg.solve(brats.affine, turned.affine), points)
        sampled = np.mean(np.all((inside >= -0.5) & (inside <= np.asarray(brats.shape) - 0.5), axis=1))
        assert overlap_fraction(turned, brats, edges=True) == pytest.approx(sampled, abs=0.002)
    assert overlap_fraction(_turned(brats, 1.0), brats, edges=True) > 0.99
    far = Grid(cube.shape, _turned(cube, 30).affine + np.array([[0, 0, 0, 60.0]] + [[0] * 4] * 3))
    assert overlap_fraction(far, cube, edges=True) == 0.0


def test_labels_onto_a_grid_turned_by_a_degree():
    """A truth drawn on a slightly oblique grid beside the scans: resampled with a note, not refused."""
    lps = lps_grid((40, 48, 32))
    turned = _turned(lps, 1.0)
    labels = sphere(turned, (-20, 24, 16), 6) * 2
    moved, note = labels_onto(labels, turned, lps, "seg", "the images")
    assert note == "seg resampled onto the grid of the images (nearest neighbour)"
    assert dice(moved, sphere(lps, (-20, 24, 16), 6) * 2) > 0.95
    with pytest.raises(TumorsegError, match=r"do not cover the same field of view \(9\d\.\d% shared, 99% needed"):
        labels_onto(labels, _turned(lps, 10.0), lps, "seg", "the images")


def test_dtypes_and_channels():
    grid = lps_grid()
    net = network_grid(grid, (2.0, 2.0, 2.0))
    labels = volume(dtype=np.uint8) % 4
    out = resample(labels, grid, net, order=0)
    assert out.dtype == np.uint8 and out.shape == net.shape and set(np.unique(out)) <= {0, 1, 2, 3}
    assert resample(labels.astype(bool), grid, net, order=0).dtype == bool
    assert resample(labels, grid, net, order=1).dtype == np.float32
    images = np.stack([volume(seed=s) for s in range(3)])
    multi = resample(images, grid, net, order=1)
    assert multi.dtype == np.float32 and multi.shape == (3, *net.shape)
    for c in range(3):
        assert np.array_equal(multi[c], resample(images[c], grid, net, order=1))
    with pytest.raises(ValueError):
        resample(images[:, :-1], grid, net, order=1)
    with pytest.raises(TumorsegError):
        network_grid(grid, (1, 0, 1))


@pytest.mark.parametrize("dst", ["zoom", "oblique", "permuted zoom", "crop"])
def test_linear_interpolation_is_scipys(dst):
    """Linear resampling (one axis at a time in PyTorch) gives scipy's values, `cval` beyond the outer
    voxel centres, and a voxel's own value exactly where a centre falls on one."""
    from scipy.ndimage import affine_transform

    src = lps_grid()
    centre, turn = np.eye(4), rotation_z(20)
    centre[:3, 3] = apply_affine(src.affine, (np.array(SHAPE) - 1) / 2)
    turned = Grid(SHAPE, centre @ turn @ np.linalg.inv(centre) @ src.affine)  # about the field of view's centre
    shift = np.eye(4)
    shift[:3, 3] = (3, -2, 1)
    target = {"zoom": network_grid(src, (0.7, 1.3, 0.6)), "oblique": turned, "crop": Grid((15, 20, 10), src.affine @ shift),
              "permuted zoom": _stored(network_grid(src, (0.8, 1.5, 1.0)), volume(), (1,), (2, 0, 1))[0]}[dst]
    data = np.stack([volume(seed=s) for s in range(2)])
    vox = np.linalg.solve(src.affine, target.affine)
    expected = [affine_transform(d, vox[:3, :3], vox[:3, 3], output_shape=target.shape, order=1, cval=-7.0) for d in data]
    got = resample(data, src, target, order=1, cval=-7.0)
    assert got.dtype == np.float32 and np.allclose(got, np.stack(expected), rtol=0, atol=1e-3)  # values 0-200
    assert np.count_nonzero(got == -7.0) > 0 and np.count_nonzero(got != -7.0) > 0.3 * got.size
    if dst == "crop":  # the same lattice: values copied, none mixed with a neighbour's
        assert np.array_equal(got[:, :, 2:], data[:, 3:18, :18, 1:11])


def test_a_nan_voxel_spreads_only_to_its_neighbours_as_in_scipy():
    from scipy.ndimage import affine_transform

    src = lps_grid()
    target = network_grid(src, (0.8, 1.2, 0.7))
    data = volume()
    data[10, 12, 8] = np.nan
    vox = np.linalg.solve(src.affine, target.affine)
    expected = affine_transform(data, vox[:3, :3], vox[:3, 3], output_shape=target.shape, order=1)
    assert np.array_equal(np.isnan(resample(data, src, target, order=1)), np.isnan(expected))


OBLIQUE = Grid((22, 26, 12), rotation_z(20) @ np.diag([-0.8, -0.9, 1.4, 1.0]))


@pytest.mark.parametrize("dst", ["finer", "oblique", "reoriented", "same"])
@pytest.mark.parametrize("box", [((4, 14), (3, 19), (2, 12)), ((-3, 9), (10, 30), (5, 16)), ((30, 40), (0, 5), (0, 5))])
def test_resample_box_equals_resampling_the_whole_array(dst, box):
    """Inside the box the values, outside it a fill per channel (beyond the grid's edges too):
    the same as resampling the whole array with that fill as `cval`, interpolating only near the box."""
    src = lps_grid()
    target = {"finer": network_grid(src, (0.7, 0.8, 0.6)), "oblique": OBLIQUE, "same": src,
              "reoriented": _stored(src, volume(), (0, 1), (2, 0, 1))[0]}[dst]
    fill = [1.0, 0.0, 0.25]
    whole = np.stack([np.full(SHAPE, f, np.float32) for f in fill])
    cropped = np.stack([volume(shape=tuple(b - a for a, b in box), seed=s) / 200 for s in range(3)])
    inside = tuple(slice(max(a, 0), min(b, n)) for (a, b), n in zip(box, SHAPE))
    whole[(slice(None), *inside)] = cropped[(slice(None), *(slice(i.start - a, i.stop - a) for i, (a, _) in zip(inside, box)))]
    expected = np.stack([resample(w, src, target, order=1, cval=f) for w, f in zip(whole, fill)])
    got = resample_box(cropped, box, src, target, fill)
    assert got.dtype == np.float32 and got.shape == (3, *target.shape)
    at = apply_affine(np.linalg.solve(src.affine, target.affine), np.indices(target.shape).reshape(3, -1).T)
    at = at.reshape(*target.shape, 3)
    within = np.all((at > -1e-6) & (at < np.array(SHAPE) - 1 + 1e-6), axis=-1)  # resample gives cval beyond
    assert np.allclose(got[:, within], expected[:, within], rtol=0, atol=1e-5)  # float32 coordinates
    beyond = np.any((at < -1) | (at > np.array(SHAPE)), axis=-1)  # no voxel of src within reach: the fill
    assert np.all(got[:, beyond] == np.reshape(fill, (3, 1)))
    if dst == "finer" and box[0][0] >= 0:  # much of the finer grid never sees the box: left as the fill
        assert np.all(got[:, :2] == np.reshape(fill, (3, 1, 1, 1)))


def test_labels_onto_another_grid():
    lps = lps_grid()
    labels = sphere(lps, (-10, 12, 8), 5) * 2
    assert labels_onto(labels, lps, lps, "seg", "the images") == (labels, None)
    ras = Grid(SHAPE, lps.affine @ np.array([[-1, 0, 0, 19], [0, -1, 0, 23], [0, 0, 1, 0], [0, 0, 0, 1]]))
    flipped, note = labels_onto(labels[::-1, ::-1], ras, lps, "seg", "the images")  # the same voxels stored in RAS
    assert note is None and np.array_equal(flipped, labels)
    fine = network_grid(lps, (0.5, 0.5, 0.5))  # the same field of view on other voxels
    moved, note = labels_onto(labels, lps, fine, "seg", "the images")
    assert note == "seg resampled onto the grid of the images (nearest neighbour)" and moved.shape == fine.shape
    assert set(np.unique(moved)) == {0, 2} and dice(moved, sphere(fine, (-10, 12, 8), 5)) > 0.9
    for shape in ((20, 24, 12), (20, 24, 15), (20, 24, 17)):  # the same voxels cropped or padded, one slice too
        with pytest.raises(TumorsegError, match=rf"^seg \(shape \({shape[0]}, 24, {shape[2]}\)\) and the images \(shape "
                                                r"\(20, 24, 16\)\) have the same voxel size but not the same field of view"):
            labels_onto(np.zeros(shape, np.uint8), Grid(shape, lps.affine), lps, "seg", "the images")
    shifted = Grid(SHAPE, lps.affine @ np.diag([1.0, 1.0, 1.0, 1.0]) + np.array([[0, 0, 0, 1.0]] * 3 + [[0] * 4]))
    with pytest.raises(TumorsegError, match="have the same voxel size but not the same field of view"):
        labels_onto(labels, shifted, lps, "seg", "the images")
    for mm, kept in ((0.002, True), (0.01, True), (0.04, True), (0.06, False), (0.5, False)):  # lps voxels are 1 mm in x
        for grid, stored in ((lps, labels), (ras, labels[::-1, ::-1])):  # the same voxels, in LPS or RAS order
            nudged = grid.affine.copy()
            nudged[0, 3] += mm
            if kept:  # origins rounded apart by another tool: the same voxels, said in a note
                out, note = labels_onto(stored, Grid(SHAPE, nudged), lps, "seg", "the images")
                assert np.array_equal(out, labels) and note == (f"seg taken as on the voxels of the images (voxel centres "
                                                                f"{mm:.3g} mm apart, under 0.05 voxel)")
                assert same_voxels(Grid(SHAPE, nudged), lps)[1] == pytest.approx(mm)
            else:
                assert same_voxels(Grid(SHAPE, nudged), lps) is None
                with pytest.raises(TumorsegError, match="not the same field of view"):
                    labels_onto(stored, Grid(SHAPE, nudged), lps, "seg", "the images")
    half = Grid((40, 48, 24), fine.affine)  # other voxels over three quarters of the view
    with pytest.raises(TumorsegError, match=r"do not cover the same field of view \(75.0% shared, 99% needed"):
        labels_onto(np.zeros(half.shape, np.uint8), half, lps, "seg", "the images")


def test_labels_onto_keeps_the_edges_and_copies_nothing_further():
    coarse = lps_grid((10, 12, 8), (2.0, 2.0, 2.0))
    fine = network_grid(coarse, (1.0, 1.0, 1.0))  # its outer half voxels lie beyond the coarse centres
    moved, _ = labels_onto(np.ones((10, 12, 8), np.uint8), coarse, fine, "seg", "the images")
    assert moved.shape == fine.shape and moved.all()
    coarse = lps_grid((10, 12, 60), (2.0, 2.0, 2.0))
    fine = network_grid(coarse, (1.0, 1.0, 1.0))
    wider = Grid((20, 24, 121), fine.affine)  # one fine slice beyond the coarse view (99.2 % shared)
    moved, _ = labels_onto(np.ones((10, 12, 60), np.uint8), coarse, wider, "seg", "the images")
    assert moved[..., :120].all() and not moved[..., 120].any()  # beyond the map's view: background, not its edge


def test_box_overlap_exact_for_aligned_and_turned_boxes():
    from tumorseg.box_overlap import box_overlap, corners, polytope_overlap

    lo, hi = np.zeros(3), np.full(3, 10.0)
    assert box_overlap(corners(lo + [5, 0, 0], hi + [5, 0, 0]), lo, hi) == pytest.approx(0.5)  # half along x
    assert box_overlap(corners(lo + [0, 0, 20], hi + [0, 0, 20]), lo, hi) == 0.0
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    turned = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])  # a 2-voxel cube turned 45 degrees about z, at the centre
    assert polytope_overlap(turned, np.array([5.0, 5.0, 5.0]), lo, lo + 2, lo, hi) == pytest.approx(1.0)
    # a unit cube turned 45 degrees about z with its centre on the face x = 0: half of it inside
    assert polytope_overlap(turned, np.array([0.0, 5.0, 5.0]), np.full(3, -0.5), np.full(3, 0.5), lo, hi) == pytest.approx(0.5)
    assert polytope_overlap(turned, np.array([-5.0, 5.0, 5.0]), lo, lo + 1, lo, hi) == 0.0  # outside
