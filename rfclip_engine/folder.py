"""Many image files through the segmenter, as `rfclip segment` runs a folder: each group of images
shares the encoder's batches, while threads read the next group and write the last one's pictures.

Reading and writing are host work the model does not need to wait on: for a 1024x768 photo, some
25 ms of decoding and pictures against some 4 ms of an H200's time for its segmentation (0.4 s of
host work before the threads, the JPEG overlay and the cheaper blend; benchmarks/RESULTS.md).
Pillow and zlib release the GIL, so the threads run beside the model. At most three groups of
images are in memory: the one being segmented, the next one read and the last one being written.

A run records its settings beside its pictures, and the record and every picture are written whole,
so an interrupted run can be resumed (`start_run`, `Pictures.written_since`): a million images
need not start again from the first.
"""
from __future__ import annotations

import json
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Deque, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .batches import reason, run_isolated
from .files import write_whole
from .imageio import ImageError, load_rgb
from .predictor import Segmenter
from .prototypes import Prototypes
from .text import Vocabulary
from .visualize import colorize, overlay

# PNGs at zlib's fastest level with its run-length strategy: colour and class maps are flat
# regions, which it stores a third as large as the default strategy, as fast (1024x768).
PNG_OPTIONS = {"compress_level": 1, "compress_type": zlib.Z_RLE}
# The overlay is a photo to look at: as a PNG its grain made it 1.3 MB and 73 ms to write for a
# 1024x768 image, as a JPEG 0.19 MB and 3 ms. libjpeg stops at 65500 pixels a side: a wider panorama's
# overlay is scaled down to that.
OVERLAY_QUALITY = 90
JPEG_MAX_SIDE = 65500  # libjpeg's JPEG_MAX_DIMENSION


# what a run was asked for, beside its pictures: `start_run` checks it before a run resumes
RUN_RECORD = "run.json"


@dataclass(frozen=True)
class Pictures:
    """What is written per image into `folder`: STEM_labels.png (colours), STEM_overlay.jpg (the
    image with the colours blended in and a legend) and, with `raw`, STEM_labelmap.png (class
    indices, the dtype's maximum where unlabeled). Each file appears whole or not at all."""

    folder: Path
    names: Tuple[str, ...]
    colors: np.ndarray
    raw: bool = False

    def paths(self, stem: str) -> List[Path]:
        suffixes = ["_labels.png", "_overlay.jpg"] + (["_labelmap.png"] if self.raw else [])
        return [self.folder / f"{stem}{suffix}" for suffix in suffixes]

    def written_since(self, stem: str, since_ns: int) -> bool:
        """Whether every picture of `stem` was written at or after `since_ns` (a file time)."""
        try:
            return all(path.stat().st_mtime_ns >= since_ns for path in self.paths(stem))
        except FileNotFoundError:
            return False

    def write(self, stem: str, rgb: np.ndarray, label_map: np.ndarray) -> None:
        labels, overlay_path, *raw = self.paths(stem)
        labels.parent.mkdir(parents=True, exist_ok=True)  # a stem may name a subfolder (--recursive)
        colored = colorize(label_map, self.colors)
        _save(colored, labels, "PNG", **PNG_OPTIONS)
        picture = overlay(rgb, label_map, colored, self.names, self.colors)
        picture.thumbnail((JPEG_MAX_SIDE, JPEG_MAX_SIDE))  # only ever makes it smaller
        _save(picture, overlay_path, "JPEG", quality=OVERLAY_QUALITY)
        if raw:
            save_label_map(raw[0], label_map, len(self.names))


def save_label_map(path: Path, label_map: np.ndarray, n_classes: int) -> None:
    """Class indices as a grayscale PNG; unlabeled pixels hold the dtype's maximum."""
    dtype = np.uint8 if n_classes < 255 else np.uint16
    raw = np.where(label_map < 0, np.iinfo(dtype).max, label_map).astype(dtype)
    _save(Image.fromarray(raw), path, "PNG", **PNG_OPTIONS)


def _save(image: Image.Image, path: Path, image_format: str, **options) -> None:
    write_whole(path, lambda part: image.save(part, image_format, **options))


def start_run(folder: Path, settings: dict, resume: bool) -> Tuple[int, bool]:
    """The file time from which pictures in `folder` count as this run's, and whether it resumes
    an earlier run. A fresh run records `settings` and starts now. With `resume`, a run recorded
    there with the same settings goes on from when it started (pictures written since are done);
    one with other settings raises ValueError; none at all starts afresh."""
    record = folder / RUN_RECORD
    settings = json.loads(json.dumps(settings, default=str))  # as the record reads back
    if resume and record.is_file():
        try:
            recorded = json.loads(record.read_text())["settings"]
            if not isinstance(recorded, dict):
                raise TypeError(f"its settings are a {type(recorded).__name__}")
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"--resume: {record} cannot be read ({type(err).__name__}: {err}); segment into "
                             "another folder, or without --resume to start afresh") from None
        if recorded != settings:
            differing = sorted(key for key in settings.keys() | recorded.keys()
                               if settings.get(key) != recorded.get(key))
            raise ValueError(f"--resume: {folder} holds a run with other settings ({', '.join(differing)}); "
                             "resume it with the same ones, or start afresh without --resume")
        return record.stat().st_mtime_ns, True
    write_whole(record, lambda part: part.write_text(json.dumps({"settings": settings}, indent=2) + "\n"))
    # the record's own file time, not the clock's: the pictures' times come from the same
    # (coarser) file-system clock, so none written after it can read earlier
    return record.stat().st_mtime_ns, False


def segment_files(
    segmenter: Segmenter, files: Sequence[Tuple[Path, str]], vocabulary: Vocabulary, pictures: Pictures,
    images_per_group: int, max_pixels: Optional[int] = None, prototypes: Optional[Prototypes] = None,
    threads: int = 2,
) -> Iterator[Tuple[Path, Optional[str]]]:
    """Segments each (path, output stem) and writes its pictures; yields (path, None) once they are
    written, or (path, why) for a file that cannot be read or segmented, whose group goes on
    without it. Files are read and written in `threads` threads. A picture that cannot be written
    (a full disk) raises here."""
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
            labeled, failed = _labeled(segmenter, readable, vocabulary, prototypes)
            yield from failed
            yield from _written(writing)  # the last group's: one group is written at a time
            writing.extend((path, pool.submit(pictures.write, stem, rgb, label_map))
                           for path, stem, rgb, label_map in labeled)
            reads = ahead
        yield from _written(writing)


def _labeled(
    segmenter: Segmenter, readable: List[Tuple[Path, str, np.ndarray]], vocabulary: Vocabulary,
    prototypes: Optional[Prototypes],
) -> Tuple[List[Tuple[Path, str, np.ndarray, np.ndarray]], List[Tuple[Path, str]]]:
    """(path, stem, image, label map) for the images segmented, and (path, why) for those that
    could not be (each tried alone where the group's forwards fail)."""
    def label_maps(items: Sequence[Tuple[Path, str, np.ndarray]]) -> List[np.ndarray]:
        logits = segmenter.logits_many([rgb for *_, rgb in items], vocabulary, prototypes=prototypes)
        return [segmenter.decide(lg, vocabulary.names, rgb.shape[:2]).label_map.numpy()
                for (*_, rgb), lg in zip(items, logits)]

    labeled, failed = [], []
    for (path, stem, rgb), outcome in zip(readable, run_isolated(readable, label_maps)):
        if isinstance(outcome, BaseException):
            failed.append((path, f"cannot be segmented: {reason(outcome)}"))
        else:
            labeled.append((path, stem, rgb, outcome))
    return labeled, failed


def _written(writing: Deque[Tuple[Path, Future]]) -> Iterator[Tuple[Path, Optional[str]]]:
    while writing:
        path, future = writing.popleft()
        future.result()  # a write's error is raised here
        yield path, None
