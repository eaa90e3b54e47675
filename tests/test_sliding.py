"""Sliding window: coverage, overlap averaging, output sizes."""
import pytest
import torch

from rfclip_engine.sliding import crop_boxes, sliding_window, whole_image, window_starts


@pytest.mark.parametrize("length,window,stride", [(336, 224, 112), (337, 224, 112), (100, 224, 112),
                                                  (2001, 224, 112), (224, 224, 112), (225, 224, 224)])
def test_window_starts_cover_everything(length, window, stride):
    starts = window_starts(length, window, stride)
    covered = torch.zeros(max(length, window), dtype=torch.bool)
    for s in starts:
        covered[s:s + window] = True
    assert covered[:length].all()
    assert starts[0] == 0 and starts[-1] == max(length - window, 0)
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


def position_encoder(crops):
    """Each output pixel = its own input value (channel 0) plus the crop's mean: overlaps disagree."""
    return crops[:, :1] + crops.mean(dim=(1, 2, 3), keepdim=True)


@pytest.mark.parametrize("size", [(336, 448), (337, 451), (100, 150), (50, 2000), (224, 224)])
def test_sliding_window_averages_overlaps(size):
    h, w = size
    image = torch.rand(3, h, w)
    out = sliding_window(image, position_encoder, window=224, stride=112, batch_size=4)
    assert out.shape == (1, h, w)
    # reference: explicit accumulation over the padded image
    ph, pw = max(h, 224), max(w, 224)
    padded = torch.zeros(3, ph, pw)
    padded[:, :h, :w] = image
    total, count = torch.zeros(ph, pw), torch.zeros(ph, pw)
    for y, x in crop_boxes(ph, pw, 224, 112):
        crop = padded[:, y:y + 224, x:x + 224]
        total[y:y + 224, x:x + 224] += crop[0] + crop.mean()
        count[y:y + 224, x:x + 224] += 1
    assert (count[:h, :w] > 0).all()
    torch.testing.assert_close(out[0], (total / count)[:h, :w])


def test_sliding_window_batches_do_not_matter():
    image = torch.rand(3, 300, 500)
    a = sliding_window(image, position_encoder, 224, 112, batch_size=1)
    b = sliding_window(image, position_encoder, 224, 112, batch_size=100)
    torch.testing.assert_close(a, b)


def test_whole_image_pads_to_patch_multiple():
    image = torch.rand(3, 37, 50)
    seen = []

    def encode(x):
        seen.append(x.shape)
        return x[:, :2]

    out = whole_image(image, encode, multiple=16)
    assert seen == [(1, 3, 48, 64)]
    assert torch.equal(out, image[:2])
