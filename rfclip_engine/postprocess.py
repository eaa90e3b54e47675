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
        probs = torch.softmax(logit_scale * resize_rows(logits, size, start, stop), dim=0)
        best = probs.topk(min(2, n_classes), dim=0)
        top, index = best.values[0], best.indices[0]
        margin = top - best.values[1] if n_classes > 1 else top
        keep = top >= prob_threshold
        labels[start:stop] = torch.where(keep, index, torch.full_like(index, unlabeled)).to(torch.int32)
        counts += torch.bincount(index[keep], minlength=n_classes).to(torch.float64)
        sums += torch.bincount(index[keep], weights=top[keep].double(), minlength=n_classes)
        margins += torch.bincount(index[keep], weights=margin[keep].double(), minlength=n_classes)
    return Labels(labels, counts, sums, margins)


def probabilities(logits: torch.Tensor, size: Tuple[int, int], logit_scale: float) -> torch.Tensor:
    """All class probabilities (C, H, W) at `size` (memory: C x H x W floats)."""
    return torch.softmax(logit_scale * resize_rows(logits, size, 0, size[0]), dim=0)
