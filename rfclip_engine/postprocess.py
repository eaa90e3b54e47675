"""From working-resolution logits to labels at the image's full size, in row tiles, so a large
photo with many classes never holds a float C x H x W tensor at full size."""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

TILE_ELEMENTS = 1 << 23  # floats per class-logit tile (32 MB)


def resize_rows(logits: torch.Tensor, size: Tuple[int, int], start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of `F.interpolate(logits[None], size, mode="bilinear",
    align_corners=False)[0]`, computed alone. logits (C, h, w) -> (C, stop - start, W)."""
    height, width = size
    if (height, width) == tuple(logits.shape[-2:]):
        return logits[:, start:stop]
    if (start, stop) == (0, height):  # interpolate's own kernel is faster, but cannot start mid-image
        return F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    device = logits.device
    # normalized sample positions of the output pixel centres; border padding clamps like interpolate
    ys = (torch.arange(start, stop, device=device, dtype=torch.float32) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]  # (1, rows, W, 2) as (x, y)
    return F.grid_sample(logits[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def tile_rows(n_classes: int, width: int, tile_elements: int = TILE_ELEMENTS) -> int:
    return max(1, tile_elements // max(1, n_classes * width))


class Labels(NamedTuple):
    """A label map (H, W) int32 and, per class (C,) in float64: its labeled pixels, the sum of
    their top probability, and the sum of their margin (top minus second probability)."""

    label_map: torch.Tensor
    counts: torch.Tensor
    top_sums: torch.Tensor
    margin_sums: torch.Tensor


def label_map_tiled(
    logits: torch.Tensor, size: Tuple[int, int], logit_scale: float, prob_threshold: float,
    unlabeled: int, tile_elements: int = TILE_ELEMENTS,
) -> Labels:
    """Labels at `size` from (C, h, w) logits: the argmax of softmax(logit_scale * logits), or
    `unlabeled` where the top probability is below the threshold; with each class's pixel
    statistics. One class alone has a margin of 1."""
    n_classes = logits.shape[0]
    height, width = size
    labels = torch.empty((height, width), dtype=torch.int32, device=logits.device)
    counts = torch.zeros(n_classes, dtype=torch.float64, device=logits.device)
    sums = torch.zeros(n_classes, dtype=torch.float64, device=logits.device)
    margins = torch.zeros(n_classes, dtype=torch.float64, device=logits.device)
    step = tile_rows(n_classes, width, tile_elements)
    for start in range(0, height, step):
        stop = min(start + step, height)
        top, index, margin = top_two(resize_rows(logits, size, start, stop) * logit_scale)
        if prob_threshold > 0:  # probabilities are never below 0: no mask needed then
            keep = top >= prob_threshold
            labels[start:stop] = torch.where(keep, index, torch.full_like(index, unlabeled))
            top, index, margin = top[keep], index[keep], margin[keep]
        else:
            labels[start:stop] = index
        index = index.flatten()
        counts += torch.bincount(index, minlength=n_classes).to(torch.float64)
        sums += torch.bincount(index, weights=top.flatten().double(), minlength=n_classes)
        margins += torch.bincount(index, weights=margin.flatten().double(), minlength=n_classes)
    return Labels(labels, counts, sums, margins)


def top_two(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top probability, its class, top minus second probability) of softmax(scores) over dim 0,
    worked out in place in `scores`. A max, an exp and a sum: softmax then topk costs half as much
    again, topk sorting along the class dim. One class alone has a margin of 1."""
    best, index = scores.max(dim=0)
    exp = scores.sub_(best).exp_()  # the top class's is 1
    top = exp.sum(dim=0).reciprocal_()
    second = exp.scatter_(0, index[None], 0.0).amax(dim=0)
    return top, index, (1.0 - second).mul_(top)


def probabilities(logits: torch.Tensor, size: Tuple[int, int], logit_scale: float) -> torch.Tensor:
    """All class probabilities (C, H, W) at `size` (memory: C x H x W floats)."""
    return torch.softmax(logit_scale * resize_rows(logits, size, 0, size[0]), dim=0)
