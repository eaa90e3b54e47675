"""Visual prototypes: exact mask pooling against a brute-force feature map, the combination rule,
and a planted case where one example corrects a wrong text embedding."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rfclip_engine import RFCLIPConfig, SegmenterConfig
from rfclip_engine.predictor import Segmenter
from rfclip_engine.prototypes import (Example, Prototypes, affinity, combine, examples_from_sums, pool_masks,
                                      upsample_matrix)
from rfclip_engine.sliding import sliding_window_many, whole_image


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def dense_map(seg: Segmenter, image: torch.Tensor) -> torch.Tensor:
    """(D, H, W) F at the working resolution, built the slow way the class logits are."""

    def encode(crops):
        features = seg._crop_features(crops).permute(0, 3, 1, 2)
        return F.interpolate(features, size=crops.shape[-2:], mode="bilinear", align_corners=False)

    cfg = seg.config
    if cfg.window is None:
        return whole_image(image, encode, seg.model.patch_size)
    return sliding_window_many([image], encode, cfg.window, cfg.stride, cfg.batch_size)[0]


@pytest.mark.parametrize("size", [(9, 14), (20, 7)])
def test_upsample_matrix_is_bilinear_interpolation(size):
    z = torch.randn(1, 1, *size)
    expected = F.interpolate(z, size=(48, 64), mode="bilinear", align_corners=False)[0, 0]
    got = upsample_matrix(size[0], 48) @ z[0, 0] @ upsample_matrix(size[1], 64).T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [64, None])
@pytest.mark.parametrize("shape", [(80, 123), (80, 80), (40, 50)])
def test_examples_equal_the_mean_of_the_brute_force_feature_map(tiny_model, window, shape):
    seg = Segmenter(tiny_model, SegmenterConfig(short_side=None, window=window, stride=32, batch_size=3,
                                                encoder=RFCLIPConfig(sigma=1.5)))
    image = rgb(*shape, seed=4)
    rng = np.random.default_rng(1)
    masks = np.zeros((3, *shape), bool)
    masks[0, 5:30, 10:60] = True
    masks[1] = rng.random(shape) < 0.3
    masks[2, :, :3] = True
    feature_map = dense_map(seg, seg.prepare(image)).double()  # (D, H, W)
    examples = seg.examples(image, masks)
    for mask, example in zip(masks, examples):
        inside = feature_map[:, torch.from_numpy(mask)]
        outside = feature_map[:, ~torch.from_numpy(mask)]
        mean = inside.mean(dim=1)
        torch.testing.assert_close(example.vector.double(), F.normalize(mean, dim=0), rtol=1e-4, atol=1e-5)
        vector = example.vector.double()
        assert example.inside == pytest.approx(float((vector @ inside).mean()), rel=1e-4)
        assert example.outside == pytest.approx(float((vector @ outside).mean()), rel=1e-4, abs=1e-6)
        assert example.pixels == int(mask.sum())


def test_an_empty_mask_gives_no_example_and_masks_are_resized_to_the_working_size(tiny_model):
    seg = Segmenter(tiny_model, SegmenterConfig(short_side=40, window=32, stride=16, encoder=RFCLIPConfig(sigma=1.5)))
    image = rgb(80, 120, seed=2)
    masks = np.zeros((2, 80, 120), bool)
    masks[1, 20:60, 30:90] = True
    empty, found = seg.examples(image, masks)
    assert empty is None
    assert found.pixels == 20 * 30  # the box at half size
    assert 0 < found.outside < found.inside <= 1.0 + 1e-6


def test_masks_are_resized_one_at_a_time_as_all_at_once(tiny_model, monkeypatch):
    from rfclip_engine import predictor

    seg = Segmenter(tiny_model, SegmenterConfig(short_side=40, window=32, stride=16, encoder=RFCLIPConfig(sigma=1.5)))
    image = rgb(90, 130, seed=3)
    masks = np.random.default_rng(4).random((4, 90, 130)) < np.linspace(0.1, 0.9, 4)[:, None, None]
    resized, interpolate = [], predictor.F.interpolate

    def spy(tensor, **kwargs):
        resized.append(tuple(tensor.shape))
        return interpolate(tensor, **kwargs)

    monkeypatch.setattr(predictor.F, "interpolate", spy)
    found = seg.examples(image, masks)
    # the image's 3 channels and the 4 masks, one at a time: never all the masks as floats at once
    assert resized.count((1, 1, 90, 130)) == 7 and (1, 4, 90, 130) not in resized
    monkeypatch.setattr(predictor.F, "interpolate", interpolate)
    # the reference: all the masks resized at once, then the same pooling
    weights = interpolate(torch.from_numpy(masks.astype(np.float32))[None], size=(40, 58), mode="bilinear",
                          align_corners=False, antialias=True)[0].clamp(0.0, 1.0)
    sums, total = pool_masks(seg.prepare(image), weights, seg._crop_features, 32, 16, seg.config.batch_size,
                             tiny_model.patch_size)
    pixels = weights.sum(dim=(1, 2))
    for got, want, count in zip(found, examples_from_sums(sums, total, pixels, 40 * 58), pixels.tolist()):
        assert count >= 1.0
        torch.testing.assert_close(got.vector, want.vector, rtol=0, atol=1e-6)
        assert got.pixels == want.pixels and abs(got.inside - want.inside) < 1e-6


def example(vector, inside=0.9, outside=0.3):
    return Example(F.normalize(torch.tensor(vector, dtype=torch.float32), dim=0), inside, outside, 10)


def test_build_weighs_each_class_by_its_examples_and_keeps_the_newest():
    per_class = [[], [example([1, 0])] * 3 + [example([0, 1], 0.8, 0.2)], [example([1, 1])]]
    protos = Prototypes.build(per_class, k=1.0, cap=0.7, keep=2)
    assert protos.classes == (1, 2)
    torch.testing.assert_close(protos.weight, torch.tensor([0.7, 0.5]))  # 4/5 capped at 0.7; 1/2
    assert protos.owner.tolist() == [0, 0, 1]
    torch.testing.assert_close(protos.vectors[1], torch.tensor([0.0, 1.0]))  # the newest of class 1
    torch.testing.assert_close(protos.inside, torch.tensor([0.85, 0.9]))
    assert Prototypes.build([[], []], k=1.0, cap=0.7, keep=2) is None


def test_affinity_maps_outside_to_zero_and_inside_to_one():
    cos = torch.tensor([0.1, 0.3, 0.6, 0.9, 1.0]).view(1, 1, 5)
    got = affinity(cos, torch.tensor([0.9]), torch.tensor([0.3]))
    torch.testing.assert_close(got.flatten(), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_combine_leaves_classes_without_examples_alone():
    text = torch.rand(3, 4, 5) * 0.2 + 0.1
    protos = Prototypes.build([[], [example([1, 0])], []], k=1.0, cap=0.9, keep=8)
    cos = torch.full((1, 4, 5), 0.9)
    out = combine(text, cos, protos)
    torch.testing.assert_close(out[[0, 2]], text[[0, 2]])
    lo, hi = text.min(), text.max()
    torch.testing.assert_close(out[1], 0.5 * text[1] + 0.5 * hi.expand(4, 5))
    out = combine(text, torch.full((1, 4, 5), 0.1), protos)
    torch.testing.assert_close(out[1], 0.5 * text[1] + 0.5 * lo.expand(4, 5))


class Planted(Segmenter):
    """Dense features that are a known direction per colour: red patches e0, blue patches e1."""

    def _crop_features(self, crops):
        patch = self.model.patch_size
        red = F.avg_pool2d(crops[:, :1], patch)[:, 0] > F.avg_pool2d(crops[:, 2:3], patch)[:, 0]
        features = torch.zeros(*red.shape, 4)
        features[..., 0] = red.float()
        features[..., 1] = (~red).float()
        return features


def test_one_example_recovers_the_label_the_text_gets_wrong(tiny_model):
    seg = Planted(tiny_model, SegmenterConfig(short_side=None, window=32, stride=16, encoder=RFCLIPConfig(sigma=1.5)))
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, :48] = (255, 0, 0)
    image[:, 48:] = (0, 0, 255)
    # the text is wrong: "red" points to the blue direction, "blue" to the red one
    text = F.normalize(torch.tensor([[0.3, 0.7, 0.4, 0.0], [0.7, 0.3, 0.4, 0.0]]), dim=-1)
    truth = np.zeros((64, 96), np.int64)
    truth[:, 48:] = 1
    (logits,) = seg.class_logits([image], text, (0, 1), 2)
    before = seg.decide(logits, ("red", "blue")).label_map.numpy()
    assert (before == truth).mean() < 0.3

    other = np.zeros((64, 64, 3), np.uint8)  # another image: red top, blue bottom
    other[:32] = (255, 0, 0)
    other[32:] = (0, 0, 255)
    masks = np.zeros((2, 64, 64), bool)
    masks[0, :32], masks[1, 32:] = True, True
    red, blue = seg.examples(other, masks)
    assert red.vector[0] > 0.9 and blue.vector[1] > 0.9
    # one example outweighs the text (w = 1 / (1 + 0.5)): here the text is as wrong as it can be
    protos = Prototypes.build([[red], [blue]], k=0.5, cap=0.9, keep=8)
    (logits,) = seg.class_logits([image], text, (0, 1), 2, prototypes=protos)
    after = seg.decide(logits, ("red", "blue")).label_map.numpy()
    assert (after == truth).mean() > 0.95
    # the wrong label's example makes it worse, not better: the test can fail
    swapped = Prototypes.build([[blue], [red]], k=0.5, cap=0.9, keep=8)
    (logits,) = seg.class_logits([image], text, (0, 1), 2, prototypes=swapped)
    assert (seg.decide(logits, ("red", "blue")).label_map.numpy() == truth).mean() < 0.05
