"""An annotation's regions -> one mask per (control, label), per image: brush RLE decoded with the
SDK, polygons rasterized. Only the controls the backend predicts count; every size and count that
the annotation states is checked before anything is allocated for it."""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image, ImageDraw

from ..label_config import ControlTarget

log = logging.getLogger("rfclip.backend.learning")
LabelKey = Tuple[str, str]  # (control name, label): two controls may share a label name
MAX_POLYGON_POINTS = 100_000
# An annotation's regions read at most, per type: what one annotation may cost the background
# learner is bounded by these, not by the webhook's body. A brush region is decoded at the image's
# full size (0.07 s at 12 MP); a polygon filled over a whole 12 MP image takes 0.7 ms.
MAX_REGIONS = {"brushlabels": 256, "polygonlabels": 20_000}


class AnnotationError(ValueError):
    """A region the backend cannot read (said per region, the others still count)."""


def label_masks(result: object, targets: Sequence[ControlTarget], max_pixels: int) -> Dict[str, Dict[LabelKey, np.ndarray]]:
    """{image data key: {(control, label): (H, W) bool mask at the annotation's image size}};
    a label drawn as several regions gets their union. Regions of other controls, of labels the
    backend does not predict, or that cannot be read are left out (the last with a warning)."""
    if not isinstance(result, list):
        raise AnnotationError("the annotation's result is not a list")
    by_control = {(t.from_name, t.to_name): t for t in targets}
    unions: Dict[Tuple[str, LabelKey], _Union] = {}
    read = {region_type: 0 for region_type in MAX_REGIONS}
    for region in result:
        if not isinstance(region, dict):
            continue
        target = by_control.get((region.get("from_name"), region.get("to_name")))
        if target is None or region.get("type") != target.region_type:
            continue
        value = region.get("value") if isinstance(region.get("value"), dict) else {}
        labels = [label for label in value.get(target.region_type) or () if label in target.labels]
        if not labels:
            continue
        read[target.region_type] += 1
        if read[target.region_type] > MAX_REGIONS[target.region_type]:
            continue
        try:
            size = _stated_size(region, max_pixels)
            shape = brush_mask(value.get("rle"), *size) if target.region_type == "brushlabels" \
                else polygon_points(value.get("points"), *size)
        except AnnotationError as err:
            log.warning('a %s region of control "%s" is left out: %s', target.region_type, target.from_name, err)
            continue
        for label in labels:
            union = unions.setdefault((target.data_key, (target.from_name, label)), _Union(size))
            if union.size != size:
                log.warning('control "%s": regions of one image state different sizes; the later is left out',
                            target.from_name)
                continue
            union.add(shape)
    for region_type, count in read.items():
        if count > MAX_REGIONS[region_type]:
            log.warning("%d %s regions after the first %d are left out", count - MAX_REGIONS[region_type],
                        region_type, MAX_REGIONS[region_type])
    out: Dict[str, Dict[LabelKey, np.ndarray]] = {}
    for (data_key, key), union in unions.items():
        out.setdefault(data_key, {})[key] = union.mask()
    return out


class _Union:
    """One label's regions on one image: its polygons filled into one canvas (a mask each, 2000
    cells on a 12-megapixel image took 7 s), or its brush masks or-ed together (a control has
    one region type)."""

    def __init__(self, size: Tuple[int, int]) -> None:
        self.size = size  # (width, height)
        self._canvas: Optional[Image.Image] = None
        self._mask: Optional[np.ndarray] = None

    def add(self, shape: Union[np.ndarray, List[Tuple[float, float]]]) -> None:
        if isinstance(shape, np.ndarray):  # a region's mask may be another label's too: not or-ed in place
            self._mask = shape if self._mask is None else self._mask | shape
            return
        if self._canvas is None:
            self._canvas = Image.new("1", self.size, 0)
        ImageDraw.Draw(self._canvas).polygon(shape, fill=1)

    def mask(self) -> np.ndarray:
        return self._mask if self._canvas is None else np.asarray(self._canvas, dtype=bool)


def _stated_size(region: dict, max_pixels: int) -> Tuple[int, int]:
    """(width, height) of the image the region was drawn on, checked."""
    width, height = region.get("original_width"), region.get("original_height")
    if type(width) is not int or type(height) is not int or width < 1 or height < 1:
        raise AnnotationError("it states no original_width and original_height")
    if width * height > max_pixels:
        raise AnnotationError(f"its image of {width}x{height} is over the limit of {max_pixels} pixels")
    if region.get("image_rotation") not in (None, 0):
        raise AnnotationError("the image is rotated in the editor")
    return width, height


def brush_mask(rle: object, width: int, height: int) -> np.ndarray:
    """Label Studio's brush RLE (RGBA bytes, the mask in the alpha channel) -> (H, W) bool."""
    if not isinstance(rle, list) or len(rle) < 4 or not all(type(b) is int and 0 <= b <= 255 for b in rle):
        raise AnnotationError("its rle is not a list of bytes")
    # the first 32 bits say how many bytes the SDK will allocate: they must be this image's
    stated = int.from_bytes(bytes(rle[:4]), "big")
    if stated != width * height * 4:
        raise AnnotationError(f"its rle holds {stated} bytes, not the {width * height * 4} of a {width}x{height} image")
    try:
        rgba = decode_rle(rle)
    except Exception as err:
        raise AnnotationError(f"its rle cannot be decoded ({type(err).__name__})") from None
    return rgba.reshape(height, width, 4)[..., 3] > 0


def polygon_points(points: object, width: int, height: int) -> List[Tuple[float, float]]:
    """Points in percent of the image -> pixel coordinates, checked."""
    if not isinstance(points, list) or not 3 <= len(points) <= MAX_POLYGON_POINTS:
        raise AnnotationError(f"its points are not a list of 3 to {MAX_POLYGON_POINTS} points")
    scaled: List[Tuple[float, float]] = []
    for point in points:
        if not isinstance(point, (list, tuple)) or len(point) != 2 or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point):
            raise AnnotationError("a point is not [x, y]")
        scaled.append((float(point[0]) * width / 100.0, float(point[1]) * height / 100.0))
    return scaled


def fit(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """A mask at another (H, W): the fetched image can be stored smaller or larger than the one
    the annotator drew on."""
    if mask.shape == tuple(size):
        return mask
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((size[1], size[0]), Image.NEAREST)
    return np.asarray(resized) > 127
