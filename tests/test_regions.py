"""Brush RLE byte-identical to the SDK's mask2rle, and polygons."""
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from backend.regions import mask_polygons, mask_to_rle

from .backend_support import rasterize_polygon


def masks():
    rng = np.random.default_rng(0)
    yield np.zeros((5, 7), bool)
    yield np.ones((5, 7), bool)
    yield np.ones((1, 1), bool)
    yield np.zeros((1, 2), bool)
    yield np.indices((9, 11)).sum(0) % 2 == 0  # checkerboard: every run one pixel
    yield rng.random((37, 53)) < 0.5
    yield rng.random((64, 64)) < 0.02
    big = np.zeros((300, 400), bool)
    big[50:250, 100:300] = True  # runs of zeros longer than 2^16 bytes
    yield big
    yield np.ones((260, 260), bool)  # one run of 270400 bytes, cut into pieces
    for n in (2, 4, 6, 16, 17, 64, 65, 16384, 16385):  # run-size class boundaries (x4 bytes)
        m = np.zeros(n + 3, bool)
        m[1:1 + n] = True
        yield m.reshape(1, -1)


@pytest.mark.parametrize("index,mask", list(enumerate(masks())))
def test_rle_is_byte_identical_to_the_sdk(index, mask):
    expected = mask2rle(mask.astype(np.uint8) * 255)
    got = mask_to_rle(mask)
    assert got == expected
    decoded = np.reshape(decode_rle(got), (*mask.shape, 4))[:, :, 3]
    assert np.array_equal(decoded == 255, mask)


def test_polygons_of_two_blobs_and_a_speck():
    mask = np.zeros((100, 120), bool)
    mask[10:40, 10:50] = True
    yy, xx = np.mgrid[:100, :120]
    mask |= (yy - 70) ** 2 + (xx - 80) ** 2 < 15 ** 2
    mask[95, 5] = True  # a speck, dropped
    polygons = mask_polygons(mask)
    assert len(polygons) == 2
    drawn = np.zeros_like(mask)
    for polygon in polygons:
        percent = (polygon + 0.5) / np.array([120, 100]) * 100
        drawn |= rasterize_polygon(percent, 120, 100)
    truth = mask.copy()
    truth[95, 5] = False
    assert (drawn & truth).sum() / (drawn | truth).sum() > 0.95
