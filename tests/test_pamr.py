"""PAMR against a naive float64 loop over pixels."""
import numpy as np
import pytest
import torch

from rfclip_engine.pamr import refine


def naive_pamr(image, logits, iterations, dilations):
    """Straight from the definition, one pixel at a time, float64."""
    _, _, h, w = image.shape
    img = image[0].double().numpy()
    mask = torch.nn.functional.interpolate(logits.double(), size=(h, w), mode="bilinear", align_corners=True)[0].numpy()

    def at(a, y, x):
        return a[:, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    window = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    neighbours = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    aff = np.zeros((len(neighbours), h, w))
    for y in range(h):
        for x in range(w):
            std = np.std(np.stack([at(img, y + dy, x + dx) for dy, dx in window]), axis=0, ddof=1)
            for k, (dy, dx) in enumerate(neighbours):
                diff = np.abs(img[:, y, x] - at(img, y + dy, x + dx))
                aff[k, y, x] = np.mean(-diff / (1e-8 + 0.1 * std))
    aff = np.exp(aff - aff.max(axis=0))
    aff /= aff.sum(axis=0)
    for _ in range(iterations):
        new = np.zeros_like(mask)
        for y in range(h):
            for x in range(w):
                for k, (dy, dx) in enumerate(neighbours):
                    new[:, y, x] += aff[k, y, x] * at(mask, y + dy, x + dx)
        mask = new
    return mask


@pytest.mark.parametrize("dilations", [(1,), (2, 3)])
def test_pamr_matches_naive_reference(dilations):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 9, 11, generator=g)
    image[:, :, :, 6:] += 1.5  # an edge the refinement should respect
    logits = torch.randn(1, 4, 5, 6, generator=g)
    ours = refine(image, logits, iterations=3, dilations=dilations)
    expected = naive_pamr(image, logits, 3, dilations)
    assert ours.shape == (1, 4, 9, 11)
    np.testing.assert_allclose(ours[0].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_pamr_preserves_constant_logits_and_batch():
    image = torch.rand(2, 3, 12, 12)
    logits = torch.full((2, 3, 6, 6), 0.7)
    out = refine(image, logits, iterations=5, dilations=(2, 4))
    torch.testing.assert_close(out, torch.full((2, 3, 12, 12), 0.7))
    with pytest.raises(ValueError):
        refine(image[:1], logits)
