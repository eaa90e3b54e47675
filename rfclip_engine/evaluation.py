"""Evaluation on the standard segmentation benchmarks.

Datasets are read in their usual on-disk layouts (described, with per-dataset defaults, in
`data/datasets.json`; class names with synonyms in `data/classes/`). The metric is
MMSegmentation's IoUMetric: ignore index 255, per-class intersection and union accumulated over
the whole dataset, mIoU the mean over classes with a non-zero union, aAcc the pixel accuracy.
"""
from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from .batches import reason, run_isolated
from .imageio import ImageError, load_rgb, read_label_map
from .text import Vocabulary

IGNORE_INDEX = 255


def _data_file(*parts: str):
    return resources.files(__package__).joinpath("data", *parts)


def dataset_specs() -> Dict[str, dict]:
    specs = json.loads(_data_file("datasets.json").read_text())
    return {name: spec for name, spec in specs.items() if not name.startswith("_")}


@dataclass(frozen=True)
class SegmentationDataset:
    """Image / label pairs of one benchmark split, with its vocabulary and defaults."""

    name: str
    root: Path
    spec: dict
    pairs: Tuple[Tuple[Path, Path], ...]

    @classmethod
    def open(cls, name: str, root: Path) -> "SegmentationDataset":
        specs = dataset_specs()
        if name not in specs:
            raise ValueError(f"unknown dataset {name!r}; known: {', '.join(specs)}")
        spec, root = specs[name], Path(root)
        images, labels = root / spec["images"], root / spec["labels"]
        if not images.is_dir() or not labels.is_dir():
            raise FileNotFoundError(
                f"{name}: expected {spec['images']}/ and {spec['labels']}/ under {root} "
                f"(--root is the dataset folder, e.g. data/{spec['root_hint']})")
        if "split" in spec:
            split = root / spec["split"]
            if not split.is_file():
                raise FileNotFoundError(f"{name}: split file {split} not found")
            stems = [line.strip() for line in split.read_text().splitlines() if line.strip()]
            relative = [Path(stem) for stem in stems]
        else:
            suffix = spec["image_suffix"]
            relative = sorted(Path(str(p.relative_to(images))[: -len(suffix)]) for p in images.rglob(f"*{suffix}"))
        pairs = tuple((images / f"{r}{spec['image_suffix']}", labels / f"{r}{spec['label_suffix']}") for r in relative)
        missing = [str(label) for _, label in pairs if not label.is_file()]
        if missing:
            raise FileNotFoundError(f"{name}: {len(missing)} label files missing, e.g. {missing[0]}")
        if not pairs:
            raise FileNotFoundError(f"{name}: no images under {images}")
        return cls(name, root, spec, pairs)

    @property
    def vocabulary(self) -> Vocabulary:
        lines = _data_file("classes", self.spec["classes"]).read_text().splitlines()
        return Vocabulary.from_names([line for line in lines if line.strip()])

    @property
    def background_class(self) -> Optional[int]:
        return self.spec.get("background_class")

    def label(self, path: Path) -> np.ndarray:
        """The label map with dataset conventions applied (reduce_zero_label), 255 = ignore."""
        label = read_label_map(path).astype(np.int64)
        if label.ndim != 2:
            raise ValueError(f"{path}: a label map must be single-channel, got shape {label.shape}")
        if self.spec["reduce_zero_label"]:
            label = np.where(label == 0, IGNORE_INDEX, label - 1)
            label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
        return label

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, image_path: Path, label_path: Path) -> Tuple[np.ndarray, np.ndarray]:
        """The image as RGB, upright, and its label map. Raises ImageError, OSError or
        ValueError naming what cannot be read or does not fit."""
        rgb, label = load_rgb(image_path), self.label(label_path)
        if rgb.shape[:2] != label.shape:
            # images are read upright, as viewers show them; a label map drawn on the stored pixels
            # of an image with an EXIF orientation is turned against it
            turned = " (turned by 90 degrees: the image's EXIF orientation?)" if rgb.shape[1::-1] == label.shape else ""
            raise ValueError(f"the image is {rgb.shape[1]}x{rgb.shape[0]} but its label map {label_path.name} is "
                             f"{label.shape[1]}x{label.shape[0]}{turned}")
        return rgb, label

    def __iter__(self) -> Iterator["Sample"]:
        for image_path, label_path in self.pairs:
            try:
                yield Sample(image_path, *self.read(image_path, label_path))
            except (ImageError, OSError, ValueError) as err:
                yield Sample(image_path, error=str(err))


@dataclass(frozen=True)
class Sample:
    """One image of a dataset and its label map, or why they cannot be scored (`error`)."""

    image_path: Path
    rgb: Optional[np.ndarray] = None
    label: Optional[np.ndarray] = None
    error: Optional[str] = None


@dataclass
class IoUAccumulator:
    """MMSegmentation's IoUMetric, accumulated image by image."""

    num_classes: int
    intersect: np.ndarray = field(init=False)
    area_pred: np.ndarray = field(init=False)
    area_label: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.intersect = np.zeros(self.num_classes, np.int64)
        self.area_pred = np.zeros(self.num_classes, np.int64)
        self.area_label = np.zeros(self.num_classes, np.int64)

    def add(self, pred: np.ndarray, label: np.ndarray) -> None:
        if pred.shape != label.shape:
            raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
        keep = label != IGNORE_INDEX
        pred, label = pred[keep], label[keep]
        n = self.num_classes

        def histogram(values: np.ndarray) -> np.ndarray:
            values = values[(values >= 0) & (values < n)]
            return np.bincount(values, minlength=n)[:n]

        self.intersect += histogram(pred[pred == label])
        self.area_pred += histogram(pred)
        self.area_label += histogram(label)

    @property
    def union(self) -> np.ndarray:
        return self.area_pred + self.area_label - self.intersect

    def summary(self, class_names: Tuple[str, ...]) -> dict:
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = self.intersect / self.union
            acc = self.intersect / self.area_label
        return {
            # None, not NaN, where no class was seen (every image skipped): --out's JSON stays JSON
            "mIoU": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else None,
            "aAcc": float(self.intersect.sum() / max(self.area_label.sum(), 1) * 100),
            "mAcc": float(np.nanmean(acc) * 100) if np.isfinite(acc).any() else None,
            "per_class": {name: {"IoU": _percent(i), "Acc": _percent(a)}
                          for name, i, a in zip(class_names, iou, acc)},
        }


def _percent(value: float) -> Optional[float]:
    return None if not np.isfinite(value) else round(float(value) * 100, 4)


# RGB images (H, W, 3) -> their label maps (H, W), -1 unlabeled; several at once, so that their
# crops can share the encoder's batches
Predictor = Callable[[List[np.ndarray]], List[np.ndarray]]


def evaluate(predict: Predictor, dataset: SegmentationDataset, limit: Optional[int] = None,
             progress: bool = True, images_per_group: int = 1) -> dict:
    """Run `predict` over the dataset, `images_per_group` images a call, and return the metric
    summary, the count of images scored and those skipped (an image or label map that cannot
    be read, of different sizes, or an image that cannot be segmented even alone where its
    group's forward failed: each is said as it comes, and the others are still scored).
    A thread reads the next group while `predict` runs: on a GPU, decoding an image and its
    label map takes about as long as segmenting it."""
    names = dataset.vocabulary.names
    accumulator = IoUAccumulator(len(names))
    total = min(len(dataset), limit) if limit else len(dataset)
    samples = islice(dataset, total)
    groups = iter(lambda: list(islice(samples, images_per_group)), [])
    count, skipped = 0, []

    def skip(image_path: Path, why: str) -> None:
        skipped.append({"image": str(image_path), "error": why})
        tqdm.write(f"skipped: {image_path}: {why}", file=sys.stderr)

    with tqdm(total=total, unit="image", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="rfclip-read") as reader:
        ahead = reader.submit(next, groups, None)
        while (group := ahead.result()) is not None:
            ahead = reader.submit(next, groups, None)  # one thread calls the iterator, one call at a time
            readable = []
            for sample in group:
                if sample.error is None:
                    readable.append(sample)
                else:
                    skip(sample.image_path, sample.error)
            for sample, pred in zip(readable, run_isolated([sample.rgb for sample in readable], predict)):
                if isinstance(pred, BaseException):
                    skip(sample.image_path, f"cannot be segmented: {reason(pred)}")
                    continue
                if dataset.background_class is not None:
                    pred = np.where(pred < 0, dataset.background_class, pred)
                accumulator.add(pred, sample.label)
                count += 1
            bar.update(len(group))
    return {"dataset": dataset.name, "images": count, "skipped": skipped, **accumulator.summary(names)}


def format_table(summary: dict) -> str:
    rows = [f"{'class':<28} {'IoU':>8} {'Acc':>8}"]
    for name, values in summary["per_class"].items():
        rows.append(f"{name[:28]:<28} {_shown(values['IoU']):>8} {_shown(values['Acc']):>8}")
    skipped = f" ({len(summary['skipped'])} skipped, said above)" if summary["skipped"] else ""
    rows.append(f"{summary['dataset']}: {summary['images']} images{skipped}, mIoU {_shown(summary['mIoU'])}, "
                f"aAcc {summary['aAcc']:.2f}, mAcc {_shown(summary['mAcc'])}")
    return "\n".join(rows)


def _shown(percent: Optional[float]) -> str:
    return "-" if percent is None else f"{percent:.2f}"
