"""Tiled post-processing equals the whole-image computation."""
import pytest
import torch
import torch.nn.functional as F

from rfclip_engine.postprocess import label_map_tiled, probabilities, resize_rows, top_two


@pytest.mark.parametrize("coarse,size", [((7, 9), (31, 40)), ((20, 30), (20, 30)), ((12, 5), (100, 17)),
                                         ((9, 9), (4, 5))])
def test_resize_rows_matches_interpolate(coarse, size):
    logits = torch.randn(3, *coarse, generator=torch.Generator().manual_seed(0))
    full = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    for start, stop in [(0, size[0]), (0, 1), (size[0] // 2, size[0]), (3, 4)]:
        if stop <= size[0] and start < stop:
            torch.testing.assert_close(resize_rows(logits, size, start, stop), full[:, start:stop], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_tiled_labels_equal_whole_image(threshold):
    logits = torch.randn(5, 13, 17, generator=torch.Generator().manual_seed(1)) * 0.05
    size = (61, 83)
    labels, counts, sums, margins = label_map_tiled(logits, size, 40.0, threshold, -1, tile_elements=5 * 83 * 7)
    probs = probabilities(logits, size, 40.0)
    top, index = probs.max(0)
    second = probs.sort(0, descending=True).values[1]
    expected = torch.where(top >= threshold, index, torch.full_like(index, -1))
    assert torch.equal(labels.long(), expected)
    for c in range(5):
        inside = expected == c
        assert counts[c] == inside.sum()
        torch.testing.assert_close(sums[c].float(), top[inside].sum(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(margins[c].float(), (top - second)[inside].sum(), rtol=1e-5, atol=1e-4)
    if threshold:
        assert (labels == -1).any()


@pytest.mark.parametrize("classes", [1, 2, 7])
def test_top_two_matches_softmax_in_float64(classes):
    scores = torch.randn(classes, 9, 11, generator=torch.Generator().manual_seed(classes)) * 4
    probs = torch.softmax(scores.double(), dim=0)
    ordered = probs.sort(dim=0, descending=True).values
    second = ordered[1] if classes > 1 else torch.zeros_like(ordered[0])
    top, index, margin = top_two(scores.clone())
    assert torch.equal(index, probs.argmax(dim=0))
    torch.testing.assert_close(top.double(), ordered[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(margin.double(), ordered[0] - second, rtol=1e-6, atol=1e-6)
