"""Reading images of any kind into 8-bit RGB, oriented as a viewer shows them.

Accepts paths, bytes, file objects, PIL images and numpy arrays: grayscale, RGB, RGBA / LA /
palette with transparency (composited on white, as viewers show it), 16-bit and float data
(scaled to 8 bit), with EXIF orientation applied. Memory stays near the 8-bit image itself:
transparency is composited in integers, a band of rows at a time, and `read_rgb` can decode a
large JPEG reduced (by 1/2, 1/4 or 1/8 in the decoder) when only a small working size is needed.
"""
from __future__ import annotations

import io
import os
import warnings
from contextlib import contextmanager
from typing import BinaryIO, Iterator, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes, BinaryIO, Image.Image, np.ndarray]
_COMPOSITE_ROWS = 256  # rows composited at once: the uint16 temporaries stay a few MB
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


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
    return _composite_on_white(array)


def _composite_on_white(array: np.ndarray) -> np.ndarray:
    """round(color * a / 255 + 255 * (1 - a / 255)) per pixel, exactly, in uint16 (the sum is
    at most 255 * 255) and a band of rows at a time: a 49 MP RGBA image never exists in floats."""
    out = np.empty(array.shape[:2] + (3,), dtype=np.uint8)
    for top in range(0, array.shape[0], _COMPOSITE_ROWS):
        band = array[top:top + _COMPOSITE_ROWS]
        alpha = band[..., -1:].astype(np.uint16)
        color = band[..., :1] if band.shape[-1] == 2 else band[..., :3]
        mixed = color * alpha + 255 * (255 - alpha)
        # (x + 127) // 255 rounds x / 255 to nearest; x / 255 is never exactly halfway
        out[top:top + _COMPOSITE_ROWS] = (mixed + 127) // 255
    return out


def _pil_to_rgb(image: Image.Image, owned: bool = False) -> np.ndarray:
    """`owned`: the image is ours to change (without in_place Pillow copies even an upright image)."""
    if owned:
        ImageOps.exif_transpose(image, in_place=True)
    else:
        image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV", "1"):
        image = image.convert("RGB")
    elif image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        # straight from Pillow's buffer a band at a time: the image never exists as an array with alpha
        out = np.empty((image.height, image.width, 3), dtype=np.uint8)
        for top in range(0, image.height, _COMPOSITE_ROWS):
            band = np.asarray(image.crop((0, top, image.width, min(top + _COMPOSITE_ROWS, image.height))))
            out[top:top + band.shape[0]] = _composite_on_white(band)
        return out
    return _array_to_rgb(np.array(image))


def admit_pixels(max_pixels: int) -> None:
    """Makes `max_pixels` the limit, process-wide: called by an entry point with its operator's.
    Pillow refuses any image over twice its own `Image.MAX_IMAGE_PIXELS` (179 MP by default),
    however high the operator set theirs, and warns over it. `read_rgb` checks `max_pixels` from
    the header before decoding and says so itself, so Pillow's limit is raised to it (never
    lowered) and its warning, a line before that message, left out."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def load_rgb(source: ImageSource, max_pixels: Optional[int] = None) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array. Raises `ImageError` for unreadable or too large input;
    the pixel bound is checked from the header, before decoding."""
    return read_rgb(source, max_pixels)[0]


def read_rgb(source: ImageSource, max_pixels: Optional[int] = None,
             min_short_side: Optional[int] = None) -> Tuple[np.ndarray, Tuple[int, int]]:
    """The RGB array and the image's full (H, W) as a viewer shows it. With `min_short_side`, a
    JPEG whose short side is at least twice that is decoded reduced, its short side still at
    least `min_short_side`; the array is then smaller than the full size."""
    if isinstance(source, (np.ndarray, Image.Image)):
        if isinstance(source, np.ndarray):
            _check_size(source.shape[1] if source.ndim > 1 else 0, source.shape[0], max_pixels)
            rgb = np.require(_array_to_rgb(source), requirements=["C", "W"])
        else:
            _check_size(*source.size, max_pixels)
            rgb = _pil_to_rgb(source)
        return rgb, rgb.shape[:2]
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    name = source if isinstance(source, (str, os.PathLike)) else "input"
    with _said_as_image_errors(name, "an image"), Image.open(stream) as image:
        width, height = image.size
        _check_size(width, height, max_pixels)
        if image.getexif().get(0x0112) in _SWAPS_AXES:
            width, height = height, width
        if min_short_side and image.format == "JPEG" and min(width, height) >= 2 * min_short_side:
            scale = min(width, height) / min_short_side
            image.draft(image.mode, (int(image.size[0] / scale) + 1, int(image.size[1] / scale) + 1))
        image.load()
        return _pil_to_rgb(image, owned=True), (height, width)


def read_label_map(path: Union[str, os.PathLike], max_pixels: Optional[int] = None) -> np.ndarray:
    """A label map's values as stored (class indices; a palette image's indices), with no
    conversion and no orientation applied; its pixel bound checked from the header."""
    with _said_as_image_errors(path, "a label map"), Image.open(path) as image:
        _check_size(*image.size, max_pixels)
        return np.array(image)


@contextmanager
def _said_as_image_errors(name: object, what: str) -> Iterator[None]:
    """Pillow's ways of failing on a file (its decompression-bomb error is not an OSError) as
    one ImageError naming it."""
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"{name} has more pixels than Pillow's decompression-bomb limit: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot read {name} as {what}: {err}") from err


def _check_size(width: int, height: int, max_pixels: Optional[int]) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}")
