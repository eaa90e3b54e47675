"""Sliding-window inference: overlapping crops of one or several images, encoded together in
batches, averaged where they overlap."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

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


@dataclass
class _Canvas:
    """One image's windows and the running sum of their outputs."""

    padded: torch.Tensor  # (3, Hp, Wp): zero-padded (the mean colour, after normalization) to >= window
    size: Tuple[int, int]
    boxes: List[Tuple[int, int]]
    total: torch.Tensor = None  # type: ignore[assignment]
    count: torch.Tensor = None  # type: ignore[assignment]

    def add(self, box: Tuple[int, int], output: torch.Tensor, window: int) -> None:
        if self.total is None:
            self.total = output.new_zeros((output.shape[0], *self.padded.shape[-2:]))
            self.count = output.new_zeros(self.padded.shape[-2:])
        y, x = box
        self.total[:, y:y + window, x:x + window] += output
        self.count[y:y + window, x:x + window] += 1

    def result(self) -> torch.Tensor:
        height, width = self.size
        return (self.total / self.count)[:, :height, :width]


def sliding_window_many(
    images: Sequence[torch.Tensor], encode: CropEncoder, window: int, stride: int, batch_size: int
) -> List[torch.Tensor]:
    """Per-pixel outputs (C, H, W) of `encode` over window x window crops of each image (3, H, W).

    Crops of all images share the batches, so several small images cost one forward. An image
    smaller than the window is zero-padded and the padding cut from its result.
    """
    canvases = []
    for image in images:
        height, width = image.shape[-2:]
        padded = F.pad(image, (0, max(width, window) - width, 0, max(height, window) - height))
        canvases.append(_Canvas(padded, (height, width), crop_boxes(*padded.shape[-2:], window, stride)))
    jobs = [(canvas, box) for canvas in canvases for box in canvas.boxes]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        crops = torch.stack([canvas.padded[:, y:y + window, x:x + window] for canvas, (y, x) in chunk])
        for (canvas, box), output in zip(chunk, encode(crops).float()):
            canvas.add(box, output, window)
    return [canvas.result() for canvas in canvases]


def sliding_window(
    image: torch.Tensor, encode: CropEncoder, window: int, stride: int, batch_size: int
) -> torch.Tensor:
    """`sliding_window_many` for one image."""
    return sliding_window_many([image], encode, window, stride, batch_size)[0]


def whole_image(image: torch.Tensor, encode: CropEncoder, multiple: int) -> torch.Tensor:
    """Per-pixel outputs (C, H, W) of `encode` on the whole image, zero-padded to a multiple of
    the patch size (positional embeddings are interpolated by the encoder)."""
    _, height, width = image.shape
    pad_h, pad_w = -height % multiple, -width % multiple
    padded = F.pad(image, (0, pad_w, 0, pad_h))
    return encode(padded.unsqueeze(0))[0].float()[:, :height, :width]
