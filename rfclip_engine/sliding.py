"""Sliding-window inference: overlapping crops, encoded in batches, averaged where they overlap."""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

CropEncoder = Callable[[torch.Tensor], torch.Tensor]  # (N, 3, h, w) -> (N, C, h, w)


def window_starts(length: int, window: int, stride: int) -> List[int]:
    """Offsets of the windows along one axis: every `stride`, the last one flush with the end,
    so every position is covered (the MMSegmentation rule)."""
    if length <= window:
        return [0]
    count = -(-(length - window) // stride) + 1
    return [min(i * stride, length - window) for i in range(count)]


def crop_boxes(height: int, width: int, window: int, stride: int) -> List[Tuple[int, int]]:
    """Top-left corners of all windows over a (height, width) image."""
    return [(y, x) for y in window_starts(height, window, stride) for x in window_starts(width, window, stride)]


def sliding_window(
    image: torch.Tensor, encode: CropEncoder, window: int, stride: int, batch_size: int
) -> torch.Tensor:
    """Per-pixel outputs (C, H, W) of `encode` over window x window crops of image (3, H, W).

    An image smaller than the window is zero-padded (the mean colour, after normalization) and
    the padding cut from the result.
    """
    _, height, width = image.shape
    padded = F.pad(image, (0, max(width, window) - width, 0, max(height, window) - height))
    boxes = crop_boxes(padded.shape[-2], padded.shape[-1], window, stride)
    total = None
    count = torch.zeros(padded.shape[-2:], device=image.device)
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start:start + batch_size]
        crops = torch.stack([padded[:, y:y + window, x:x + window] for y, x in chunk])
        outputs = encode(crops).float()
        if total is None:
            total = outputs.new_zeros((outputs.shape[1], *padded.shape[-2:]))
        for (y, x), out in zip(chunk, outputs):
            total[:, y:y + window, x:x + window] += out
            count[y:y + window, x:x + window] += 1
    return (total / count)[:, :height, :width]


def whole_image(image: torch.Tensor, encode: CropEncoder, multiple: int) -> torch.Tensor:
    """Per-pixel outputs (C, H, W) of `encode` on the whole image, zero-padded to a multiple of
    the patch size (positional embeddings are interpolated by the encoder)."""
    _, height, width = image.shape
    pad_h, pad_w = -height % multiple, -width % multiple
    padded = F.pad(image, (0, pad_w, 0, pad_h))
    return encode(padded.unsqueeze(0))[0].float()[:, :height, :width]
