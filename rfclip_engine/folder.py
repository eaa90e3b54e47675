"""Many image files through the segmenter, as `rfclip segment` runs a folder: each group of images
shares the encoder's batches, while threads read the next group and write the last one's pictures.

Reading and writing are host work the model does not need to wait on: for a 1024x768 photo, some
25 ms of decoding and pictures against some 4 ms of an H200's time for its segmentation (0.4 s of
host work before the threads, the JPEG overlay and the cheaper blend; benchmarks/RESULTS.md).
Pillow and zlib release the GIL, so the threads run beside the model. At most three groups of images are in memory: the one being segmented, the next one read
and the last one being written.
"""
from __future__ import annotations

import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Deque, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .imageio import ImageError, load_rgb
from .predictor import Segmenter
from .prototypes import Prototypes
from .text import Vocabulary
from .visualize import colorize, overlay

# PNGs at zlib's fastest level with its run-length strategy: colour and class maps are flat
# regions, which it stores a third as large as the default strategy, as fast (1024x768).
PNG_OPTIONS = {"compress_level": 1, "compress_type": zlib.Z_RLE}
# The overlay is a photo to look at: as a PNG its grain made it 1.3 MB and 73 ms to write for a
# 1024x768 image, as a JPEG 0.19 MB and 3 ms.
OVERLAY_QUALITY = 90


@dataclass(frozen=True)
class Pictures:
    """What is written per image into `folder`: STEM_labels.png (colours), STEM_overlay.jpg (the
    image with the colours blended in and a legend) and, with `raw`, STEM_labelmap.png (class
    indices, the dtype's maximum where unlabeled)."""

    folder: Path
    names: Tuple[str, ...]
    colors: np.ndarray
    raw: bool = False

    def write(self, stem: str, rgb: np.ndarray, label_map: np.ndarray) -> None:
        colored = colorize(label_map, self.colors)
        colored.save(self.folder / f"{stem}_labels.png", **PNG_OPTIONS)
        overlay(rgb, label_map, colored, self.names, self.colors).save(self.folder / f"{stem}_overlay.jpg",
                                                                       quality=OVERLAY_QUALITY)
        if self.raw:
            save_label_map(self.folder / f"{stem}_labelmap.png", label_map, len(self.names))


def save_label_map(path: Path, label_map: np.ndarray, n_classes: int) -> None:
    """Class indices as a grayscale PNG; unlabeled pixels hold the dtype's maximum."""
    dtype = np.uint8 if n_classes < 255 else np.uint16
    raw = np.where(label_map < 0, np.iinfo(dtype).max, label_map).astype(dtype)
    Image.fromarray(raw).save(path, **PNG_OPTIONS)


def segment_files(
    segmenter: Segmenter, files: Sequence[Tuple[Path, str]], vocabulary: Vocabulary, pictures: Pictures,
    images_per_group: int, max_pixels: Optional[int] = None, prototypes: Optional[Prototypes] = None,
    threads: int = 2,
) -> Iterator[Tuple[Path, Optional[str]]]:
    """Segments each (path, output stem) and writes its pictures; yields (path, None) once they are
    written, or (path, why) for a file that cannot be read, whose group goes on without it. Files
    are read and written in `threads` threads. A picture that cannot be written (a full disk)
    raises here."""
    groups = [files[start:start + images_per_group] for start in range(0, len(files), images_per_group)]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rfclip-io") as pool:
        def read(group: Sequence[Tuple[Path, str]]) -> List[Future]:
            return [pool.submit(load_rgb, path, max_pixels) for path, _ in group]

        writing: Deque[Tuple[Path, Future]] = deque()
        reads = read(groups[0]) if groups else []
        for n, group in enumerate(groups):
            ahead = read(groups[n + 1]) if n + 1 < len(groups) else []
            readable = []
            for (path, stem), future in zip(group, reads):
                try:
                    readable.append((path, stem, future.result()))
                except (ImageError, OSError) as err:
                    yield path, str(err)
            logits = segmenter.logits_many([rgb for *_, rgb in readable], vocabulary, prototypes=prototypes) \
                if readable else []
            labeled = [(path, stem, rgb, segmenter.decide(lg, vocabulary.names, rgb.shape[:2]).label_map.numpy())
                       for (path, stem, rgb), lg in zip(readable, logits)]
            yield from _written(writing)  # the last group's: one group is written at a time
            writing.extend((path, pool.submit(pictures.write, stem, rgb, label_map))
                           for path, stem, rgb, label_map in labeled)
            reads = ahead
        yield from _written(writing)


def _written(writing: Deque[Tuple[Path, Future]]) -> Iterator[Tuple[Path, Optional[str]]]:
    while writing:
        path, future = writing.popleft()
        future.result()  # a write's error is raised here
        yield path, None
