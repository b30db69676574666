import numpy as np

from tumorseg.prepare.crop import background, bounding_box, brain_mask, crop, crop_box, uncrop


def test_fixed_box_is_the_seeds_window():
    assert crop_box((240, 240, 155), (128, 128, 128), "fixed") == ((56, 184), (56, 184), (13, 141))


def test_brain_box_centres_on_brain_and_stays_inside():
    brain = np.zeros((240, 240, 155), bool)
    brain[10:110, 100:200, 20:150] = True
    box = crop_box(brain.shape, (64, 64, 128), "brain", brain)
    assert box == ((28, 92), (118, 182), (21, 149))
    brain[:] = False
    brain[0:10, 0:10, 0:10] = True
    assert crop_box(brain.shape, (128, 128, 128), "brain", brain) == ((0, 128), (0, 128), (0, 128))


def test_crop_uncrop_round_trip_with_padding():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 5, (2, 20, 18, 10))
    box = crop_box(image.shape[1:], (16, 16, 16), "fixed")  # z is padded: 16 > 10
    cut = crop(image, box)
    assert cut.shape == (2, 16, 16, 16)
    assert np.array_equal(uncrop(cut, box, (20, 18, 10))[:, 2:18, 1:17, :], image[:, 2:18, 1:17, :])
    assert cut[:, :, :, :3].sum() == 0  # padding rows


def test_bounding_box():
    m = np.zeros((5, 6, 7), bool)
    assert bounding_box(m) is None
    m[1:3, 2, 4:7] = True
    assert bounding_box(m) == ((1, 3), (2, 3), (4, 7))


def _head(shape=(40, 44, 36), seed=0) -> tuple[list[np.ndarray], np.ndarray]:
    """Two modalities of a ball-shaped brain (values 1..100) on an exact-0 background, and the ball."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape)
    ball = sum(((g - n / 2) / (n / 3)) ** 2 for g, n in zip(grid, shape)) < 1
    return [np.where(ball, rng.uniform(1, 100, shape), 0).astype(np.float32) for _ in range(2)], ball


def test_brain_mask_of_a_zero_background_is_the_nonzero_voxels():
    vols, ball = _head()
    vols[1][3, 3, 3] = 7.0  # a stray non-zero voxel stays in: the rule BraTS data was always read with
    expected = ball.copy()
    expected[3, 3, 3] = True
    assert background(vols[0]) is None and background(vols[1]) is None
    assert np.array_equal(brain_mask(vols), expected)


def test_brain_mask_survives_an_offset_ringing_and_padding_around_the_brain():
    vols, ball = _head()
    rng = np.random.default_rng(1)
    offset = [v + 5.0 for v in vols]
    assert background(offset[0]) == (5.0, 0.0)
    assert np.array_equal(brain_mask(offset), ball)
    ringing = [np.where(ball, v, rng.uniform(-0.5, 0.5, v.shape)).astype(np.float32) for v in vols]
    level, tolerance = background(ringing[0])
    assert abs(level) < 0.05 and 0.45 < tolerance <= 0.5
    mask = brain_mask(ringing)  # what passes the tolerance is scattered: dropped, but where it touches the brain
    assert mask[ball].all() and np.count_nonzero(mask & ~ball) < 0.01 * np.count_nonzero(ball)
    padded = [np.pad(v[1:-1], ((1, 1), (0, 0), (0, 0))) for v in offset]  # resampling pads a thin shell with 0
    assert background(padded[0]) == (5.0, 0.0) and np.array_equal(brain_mask(padded), ball)


def test_a_tight_crop_a_constant_volume_and_odd_shapes_keep_the_nonzero_rule():
    vols, ball = _head()
    tight = [v[10:-10, 10:-10, 8:-8] for v in vols]  # brain on most of every face, exact-0 corners
    assert background(tight[0]) is None and np.array_equal(brain_mask(tight), ball[10:-10, 10:-10, 8:-8])
    constant = np.full(ball.shape, 3.0, np.float32)
    assert brain_mask([constant]).all()  # scaled to zeros later, and warned about in prepare
    assert background(np.ones((0, 4, 4))) is None and background(np.ones((4, 4, 4, 2))) is None
