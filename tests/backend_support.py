"""Building a backend app on the tiny random model for tests."""
from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from backend.app import create_app
from backend.settings import Settings
from rfclip_engine import RFCLIPConfig, Segmenter, SegmenterConfig

# Recorded from a live Label Studio 1.23.2 (a copy of shared/design/ls_protocol_samples.json).
SAMPLES = json.loads((Path(__file__).parent / "data" / "ls_protocol_samples.json").read_text())
TEST_CONFIG = SegmenterConfig(short_side=80, window=64, stride=32, encoder=RFCLIPConfig(sigma=1.5))
BRUSH_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                '<Label value="cat" background="#ff0000"/><Label value="dog" background="#0000ff"/>'
                '</BrushLabels></View>')


def png(height: int, width: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def rasterize_polygon(points_percent, width: int, height: int) -> np.ndarray:
    """(H, W) bool mask of a polygon region's points in percent: the inverse of
    `backend.regions.polygon_regions`, whose points are pixel centres."""
    pixels = np.asarray(points_percent, dtype=np.float64) / 100.0 * np.array([width, height]) - 0.5
    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [np.round(pixels).astype(np.int32)], 1)
    return canvas.astype(bool)


def make_app(tiny_model, tmp_path, **overrides):
    """An app whose model is the tiny test model, with fast pre-processing. The test servers
    listen on loopback, so private addresses are allowed unless a test says otherwise."""
    settings = Settings(**{"cache_dir": tmp_path / "cache", "allow_private_urls": True, **overrides})

    def loader(settings, text_cache):
        config = replace(TEST_CONFIG, batch_size=settings.batch_size) if settings.batch_size else TEST_CONFIG
        return Segmenter(tiny_model, config, text_cache=text_cache, max_pixels=settings.max_image_pixels)

    return create_app(settings, segmenter_loader=loader)


def task(task_id: int, image: str, key: str = "image") -> dict:
    return {"id": task_id, "data": {key: image}, "annotations": [], "predictions": []}
