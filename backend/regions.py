"""Label Studio result regions from masks: brush RLE (the SDK's `mask2rle`) and polygons."""
from __future__ import annotations

import uuid
from typing import List, Sequence

import cv2
import numpy as np
from label_studio_sdk.converter.brush import mask2rle


def _region_id() -> str:
    return uuid.uuid4().hex[:10]


def _base(from_name: str, to_name: str, region_type: str, width: int, height: int, score: float) -> dict:
    return {
        "id": _region_id(),
        "from_name": from_name,
        "to_name": to_name,
        "type": region_type,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "score": round(float(score), 4),
    }


def brush_region(mask: np.ndarray, label: str, from_name: str, to_name: str, score: float) -> dict:
    """One `brushlabels` region: the mask (H, W) bool as LS's RGBA RLE, alpha 255 inside."""
    height, width = mask.shape
    region = _base(from_name, to_name, "brushlabels", width, height, score)
    region["value"] = {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]}
    return region


def mask_polygons(mask: np.ndarray, min_area_fraction: float = 1e-4, tolerance_px: float = 1.5) -> List[np.ndarray]:
    """Outer contours (N, 2) in pixel x, y of the mask's components, simplified to within
    `tolerance_px`, dropping specks smaller than `min_area_fraction` of the image."""
    height, width = mask.shape
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    min_area = max(4.0, min_area_fraction * height * width)
    polygons = []
    for contour in contours:
        if cv2.contourArea(contour) < min_area:
            continue
        simplified = cv2.approxPolyDP(contour, tolerance_px, closed=True).reshape(-1, 2)
        if len(simplified) >= 3:
            polygons.append(simplified)
    return polygons


def polygon_regions(mask: np.ndarray, label: str, from_name: str, to_name: str, score: float) -> List[dict]:
    """`polygonlabels` regions, one per component (a LS polygon holds one outline), points in
    percent of the image size at pixel corners' centres."""
    height, width = mask.shape
    regions = []
    for polygon in mask_polygons(mask):
        region = _base(from_name, to_name, "polygonlabels", width, height, score)
        points = (polygon + 0.5) / np.array([width, height]) * 100.0
        region["value"] = {"points": np.round(points, 3).tolist(), "closed": True, "polygonlabels": [label]}
        regions.append(region)
    return regions


def rasterize_polygon(points_percent: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """(H, W) bool mask of a polygon given in percent (the inverse of `polygon_regions`)."""
    pixels = np.asarray(points_percent, dtype=np.float64) / 100.0 * np.array([width, height]) - 0.5
    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [np.round(pixels).astype(np.int32)], 1)
    return canvas.astype(bool)
