"""The pictures `rfclip segment` writes: the colour map and the overlay with its legend."""
import numpy as np
import pytest

from rfclip_engine.visualize import UNLABELED_COLOR, colorize, overlay, palette


def label_map(shape, classes: int, unlabeled: bool, seed: int = 0) -> np.ndarray:
    """Blocks of classes in unequal amounts (class c on about c + 1 parts), some unlabeled (-1)."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, classes + 1, dtype=float)
    labels = rng.choice(classes, size=(shape[0] // 4, shape[1] // 4), p=weights / weights.sum())
    if unlabeled:
        labels[rng.random(labels.shape) < 0.2] = -1
    return np.repeat(np.repeat(labels, 4, axis=0), 4, axis=1).astype(np.int64)


@pytest.mark.parametrize("classes", [3, 300])  # 300: more classes than a byte holds
def test_colorize_paints_each_class_its_colour_and_unlabeled_black(classes):
    labels = label_map((40, 64), classes, unlabeled=True)
    colors = palette(classes)
    picture = np.asarray(colorize(labels, colors))
    assert picture.shape == (40, 64, 3) and picture.dtype == np.uint8
    for (y, x), c in np.ndenumerate(labels):
        assert tuple(picture[y, x]) == (UNLABELED_COLOR if c < 0 else tuple(colors[c]))


@pytest.mark.parametrize("unlabeled", [False, True])
def test_the_overlay_blends_labeled_pixels_and_lists_present_classes_largest_first(unlabeled):
    names = ["sky", "tree", "road", "car"]
    colors = palette(len(names))
    labels = label_map((120, 160), 3, unlabeled)  # "car" is absent
    rgb = np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    before = rgb.copy()
    picture = overlay(rgb, labels, colorize(labels, colors), names, colors, alpha=0.5)
    assert np.array_equal(rgb, before)  # the caller's image is not painted on
    canvas = np.asarray(picture).astype(int)
    assert canvas.shape[0] == 120 and canvas.shape[1] > 160
    image = canvas[:, :160]
    expected = np.where((labels >= 0)[..., None], 0.5 * rgb + 0.5 * colors[np.maximum(labels, 0)], rgb)
    assert np.abs(image - expected).max() <= 1  # Pillow blends in integers
    assert np.array_equal(image[labels < 0], rgb[labels < 0])
    assert np.abs(image[labels >= 0] - rgb[labels >= 0]).max() > 20  # the colours did go in

    counts = np.bincount(labels[labels >= 0], minlength=len(names))
    assert counts[2] > counts[1] > counts[0] > 0 and counts[3] == 0
    font_size, row = 12, 20  # a 120-pixel-high image takes the smallest font
    swatches = [tuple(canvas[4 + i * row + 2 + font_size // 2, 160 + 6 + font_size // 2]) for i in range(4)]
    assert swatches == [tuple(colors[2]), tuple(colors[1]), tuple(colors[0]), (255, 255, 255)]
