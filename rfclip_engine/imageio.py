"""Reading images of any kind into 8-bit RGB, oriented as a viewer shows them.

Accepts paths, bytes, file objects, PIL images and numpy arrays: grayscale, RGB, RGBA / LA /
palette with transparency (composited on white, as viewers show it), 16-bit and float data
(scaled to 8 bit), with EXIF orientation applied.
"""
from __future__ import annotations

import io
import os
from typing import BinaryIO, Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes, BinaryIO, Image.Image, np.ndarray]


class ImageError(ValueError):
    """The input cannot be read as an image, or is too large."""


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        finite = np.nan_to_num(array.astype(np.float64))
        scale = 255.0 if finite.size == 0 or finite.max() <= 1.0 else 255.0 / max(finite.max(), 1e-12)
        return np.clip(finite * scale, 0, 255).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        top = int(array.max()) if array.size else 0
        full = 255 if top <= 255 else 65535 if top <= 65535 else top
        return np.clip(array.astype(np.float64) * (255.0 / full), 0, 255).round().astype(np.uint8)
    raise ImageError(f"unsupported pixel type {array.dtype}")


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return np.repeat(_to_uint8(array)[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (2, 3, 4):
        raise ImageError(f"expected an (H, W), (H, W, 3) or (H, W, 4) array, got shape {array.shape}")
    array = _to_uint8(array)
    if array.shape[-1] == 3:
        return array
    color = array[..., :1].repeat(3, axis=-1) if array.shape[-1] == 2 else array[..., :3]
    alpha = array[..., -1:].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
        image = image.convert("RGB")
    elif image.mode == "PA":
        image = image.convert("RGBA")
    return _array_to_rgb(np.array(image))


def load_rgb(source: ImageSource, max_pixels: Optional[int] = None) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array. Raises `ImageError` for unreadable or too large input;
    the pixel bound is checked from the header, before decoding."""
    if isinstance(source, np.ndarray):
        _check_size(source.shape[1] if source.ndim > 1 else 0, source.shape[0], max_pixels)
        return np.require(_array_to_rgb(source), requirements=["C", "W"])
    if isinstance(source, Image.Image):
        _check_size(*source.size, max_pixels)
        return _pil_to_rgb(source)
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with Image.open(stream) as image:
            _check_size(*image.size, max_pixels)
            image.load()
            return _pil_to_rgb(image)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        name = source if isinstance(source, (str, os.PathLike)) else "input"
        raise ImageError(f"cannot read {name} as an image: {err}") from err


def _check_size(width: int, height: int, max_pixels: Optional[int]) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}")
