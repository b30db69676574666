import numpy as np

from tumorseg.prepare.crop import bounding_box, crop, crop_box, uncrop


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
