"""PAMR, pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), in the form the
training-free segmentation codebases use: local affinities from the guide image over dilated
3x3 neighbourhoods, then iterated affinity-weighted averaging of the logits."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
_NEIGHBOURS = [o for o in _OFFSETS if o != (0, 0)]


def _shifts(x: torch.Tensor, offsets: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
    """x read at each offset (dy, dx), borders clamped (replicate padding, padded once)."""
    h, w = x.shape[-2:]
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return [padded[..., pad + dy: pad + dy + h, pad + dx: pad + dx + w] for dy, dx in offsets]


def _neighbour_offsets(dilations: Sequence[int]) -> List[Tuple[int, int]]:
    return [(dy * d, dx * d) for d in dilations for dy, dx in _NEIGHBOURS]


def affinities(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """Softmax-normalized affinities (B, 8 * len(dilations), H, W) of each pixel to its
    neighbours, in the order of `_neighbour_offsets`."""
    image = image.float()
    # One unbiased std per pixel and channel over all dilations' 3x3 windows, centre included,
    # accumulated in two passes over views (no stacked copies).
    window = _shifts(image, [(dy * d, dx * d) for d in dilations for dy, dx in _OFFSETS])
    mean = torch.zeros_like(image)
    for sample in window:
        mean.add_(sample)
    mean.div_(len(window))
    squares = torch.zeros_like(image)
    for sample in window:
        deviation = sample - mean
        squares.addcmul_(deviation, deviation)
    inv_scale = (squares.div_(len(window) - 1).sqrt_().mul_(0.1).add_(1e-8)).reciprocal_()
    logits = torch.stack([
        (image - neighbour).abs_().mul_(inv_scale).mean(dim=1)
        for neighbour in _shifts(image, _neighbour_offsets(dilations))
    ], dim=1)
    return torch.softmax(logits.neg_(), dim=1)


def refine(
    image: torch.Tensor, logits: torch.Tensor, iterations: int = 10, dilations: Sequence[int] = (8, 16)
) -> torch.Tensor:
    """Refine logits (B, C, h, w) with the guide image (B, 3, H, W); returns (B, C, H, W).

    The logits are first resized to the image size (bilinear, align_corners=True).
    """
    if image.shape[0] != logits.shape[0]:
        raise ValueError(f"batch sizes differ: image {image.shape[0]}, logits {logits.shape[0]}")
    if not dilations:
        raise ValueError("PAMR needs at least one dilation")
    size = image.shape[-2:]
    mask = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=True)
    weights = affinities(image, dilations)
    offsets = _neighbour_offsets(dilations)
    for _ in range(iterations):
        refined = torch.zeros_like(mask)
        for i, neighbour in enumerate(_shifts(mask, offsets)):
            refined.addcmul_(weights[:, i: i + 1], neighbour)
        mask = refined
    return mask
