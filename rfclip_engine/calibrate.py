"""Calibration of the distraction dimensions of a backbone without a preset.

The unmodified model runs on a set of images; each patch token's min-shifted, sum-normalized
channel distribution is averaged over tokens, blocks and images; the distraction dimensions are
the channels whose mean stands above `factor` times the median channel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .config import RFCLIPConfig
from .imageio import ImageSource, load_rgb
from .model import RFCLIPModel
from .presets import DistractionPreset


@dataclass(frozen=True)
class Calibration:
    mean_weights: torch.Tensor  # (C,) mean normalized embedding weight per channel
    images: int
    factor: float

    @property
    def ratios(self) -> torch.Tensor:
        """Each channel's mean weight over the median channel's."""
        return self.mean_weights / self.mean_weights.median()

    @property
    def dims(self) -> Tuple[int, ...]:
        return tuple(int(d) for d in torch.nonzero(self.ratios > self.factor).flatten())

    def preset(self, attention_test: bool = False) -> DistractionPreset:
        return DistractionPreset(self.dims, attention_test)


def _model_input(model: RFCLIPModel, rgb: np.ndarray) -> torch.Tensor:
    """The model's native square input: the image's centre square, resized to the model size.
    Cropped before it is resized: resized whole, a 1x100,000 stripe would be 224 x 22.4 million
    floats a channel, and a 100-megapixel photo all of its pixels as floats."""
    size = model.visual.image_size[0]
    side = min(rgb.shape[:2])
    top, left = (rgb.shape[0] - side) // 2, (rgb.shape[1] - side) // 2
    square = torch.from_numpy(np.ascontiguousarray(rgb[top:top + side, left:left + side]))
    pixels = square.permute(2, 0, 1).float().div(255)[None]
    if side != size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(model.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.image_std).view(1, 3, 1, 1)
    return ((pixels - mean) / std).to(model.device)


def calibrate(
    model: RFCLIPModel, images: Iterable[ImageSource], factor: float = 5.0, max_pixels: Optional[int] = None
) -> Calibration:
    """Mean normalized embedding weights over all patch tokens and blocks of `images`."""
    total = torch.zeros(model.width, dtype=torch.float64)
    counted = 0
    n_images = 0

    def observe(_: int, x: torch.Tensor) -> None:
        nonlocal total, counted
        tokens = x[:, 1:].double()
        shifted = tokens - tokens.amin(dim=-1, keepdim=True)
        p = shifted / shifted.sum(dim=-1, keepdim=True).clamp_min(1e-300)
        total += p.sum(dim=(0, 1)).cpu()
        counted += p.shape[0] * p.shape[1]

    for image in images:
        model.encode_dense(_model_input(model, load_rgb(image, max_pixels)), RFCLIPConfig(mode="clip"), observe)
        n_images += 1
    if n_images == 0:
        raise ValueError("calibration needs at least one readable image")
    return Calibration((total / counted).float(), n_images, factor)
