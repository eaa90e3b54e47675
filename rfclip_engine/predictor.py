"""`Segmenter`: image + class names -> per-pixel class probabilities, owning all pre- and
post-processing around `RFCLIPModel.encode_dense` (like segment-anything's SamPredictor).

Pipeline: read as RGB (EXIF applied) -> resize to the configured short side (the working
resolution; a stripe's long side to at most MAX_ASPECT times it), channel by channel ->
CLIP-normalize -> sliding window (or whole image) -> cosine to every query, upsampled to the crop,
max over each class's queries -> optional PAMR, at the working resolution -> at the input size, in
row tiles: softmax(logit_scale * logits) -> argmax, with pixels below `prob_threshold` left
unlabeled.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import pamr
from .config import SegmenterConfig, autocast_dtype
from .graphs import DenseEncoder, checks_kernels
from .imageio import ImageSource, load_rgb
from .model import RFCLIPModel
from .postprocess import label_map_tiled, probabilities
from .prototypes import Example, Prototypes, combine, examples_from_sums, pool_masks
from .sliding import sliding_window_many, whole_image
from .text import ClassSpec, EmbeddingCache, TextEmbedder, Vocabulary

UNLABELED = -1

# The working image's long side is at most this many times the configured short side: scaled to a
# short side of 336, a 1x3000 banner would be 336 x 1,008,000 pixels (some 18,000 crops and tens of
# GB), so a stripe thinner than 1:16 keeps that long side (5376 at 336) and a shorter short side.
# Not a config field: it changes nothing for any image of 1:16 or wider, so the settings a model
# version is keyed by stay as they were.
MAX_ASPECT = 16

# Called with a stage name ("text embeddings", "model", "PAMR"), it returns a context manager that
# times what runs inside it: the caller (the backend) decides where the times go.
StageTimer = Callable[[str], ContextManager[None]]


def untimed(stage: str) -> ContextManager[None]:
    """The StageTimer that times nothing."""
    return nullcontext()


@dataclass
class Prediction:
    """The segmentation of one image, at the input image's size.

    label_map: (H, W) int32 class index, UNLABELED (-1) where the top probability is below the
        threshold.
    confidence: (C,) mean probability of class c over the pixels labeled c (0 where none are).
    margin: (C,) mean over the pixels labeled c of their top minus second class probability.
    pixel_counts: (C,) number of pixels labeled c.
    logits: (C, h, w) class logits at the working resolution, behind `probs`.
    """

    class_names: Tuple[str, ...]
    label_map: torch.Tensor
    confidence: torch.Tensor
    margin: torch.Tensor
    pixel_counts: torch.Tensor
    logits: torch.Tensor
    logit_scale: float

    @property
    def size(self) -> Tuple[int, int]:
        return tuple(self.label_map.shape)  # type: ignore[return-value]

    @property
    def probs(self) -> torch.Tensor:
        """(C, H, W) float32 class probabilities, computed on demand (C x H x W floats: for a large
        image with many classes prefer `label_map`, `confidence` and `mask`)."""
        return probabilities(self.logits, self.size, self.logit_scale)

    def mask(self, class_index: int) -> torch.Tensor:
        """(H, W) bool mask of one class."""
        return self.label_map == class_index


class Segmenter:
    """Segments images into the classes of an open vocabulary."""

    def __init__(
        self,
        model: RFCLIPModel,
        config: SegmenterConfig = SegmenterConfig(),
        text_cache: Optional[EmbeddingCache] = None,
        max_pixels: Optional[int] = None,
    ) -> None:
        if config.window is not None and config.window % model.patch_size:
            raise ValueError(f"window {config.window} must be a multiple of the patch size {model.patch_size}")
        if config.encoder.refocuses:
            # weights without distraction dimensions, or dimensions outside the model: said now,
            # not by the first forward, after a run has started (and by every task of the backend)
            model.resolve_preset(config.encoder)
        self.model = model
        self.config = config
        self.encoder = DenseEncoder(model, autocast_dtype(config.precision), config.cuda_graphs)
        self.text = TextEmbedder(model, text_cache)
        self.max_pixels = max_pixels

    def warm_up(self) -> None:
        """One forward of a full batch of crops, so that a server's first image does not wait on
        what a GPU does once per process: Triton compiling the kernels (tens of seconds in a fresh
        container), the encoder's check of them, the device's libraries starting. Noise rather than
        a blank crop, whose tokens differ only by their position: the check should see the steps
        work on tokens that differ, as in an image. Nothing on the CPU, whose first forward is like
        any other, nor without a window (each whole image has its own shape)."""
        size, device = self.config.window, self.model.device
        if size is None:
            return
        # on the CPU the kernels are checked only where Triton's interpreter stands in for a GPU
        if device.type == "cpu" and not checks_kernels(device, (size // self.model.patch_size) ** 2,
                                                       self.config.encoder):
            return
        noise = torch.randn(self.config.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            self._crop_features(noise.to(device))

    def predict(self, image: ImageSource, class_names: Union[Vocabulary, Iterable[ClassSpec]]) -> Prediction:
        """Segment one image. `class_names`: a Vocabulary, or strings where "person, man, woman"
        is one class with synonyms."""
        return self.predict_many([image], class_names)[0]

    def predict_many(
        self, images: Sequence[ImageSource], class_names: Union[Vocabulary, Iterable[ClassSpec]]
    ) -> List[Prediction]:
        """Segment several images; their crops share the encoder's batches."""
        vocabulary = as_vocabulary(class_names)
        rgbs = [load_rgb(image, self.max_pixels) for image in images]
        logits = self.logits_many(rgbs, vocabulary)
        return [self.decide(lg, vocabulary.names, rgb.shape[:2]) for lg, rgb in zip(logits, rgbs)]

    def logits_many(
        self, rgbs: Sequence[np.ndarray], vocabulary: Vocabulary, timer: StageTimer = untimed,
        prototypes: Optional[Prototypes] = None,
    ) -> List[torch.Tensor]:
        """(C, h, w) class logits (cosine similarities, after PAMR if on) of each (H, W, 3) uint8
        image at the working resolution (short side `config.short_side`); their crops share the
        encoder's batches. `decide` takes them to the image size. `timer` times the stages.
        `prototypes` (of this vocabulary's classes) join the text in the same forward."""
        with timer("text embeddings"):
            text = self.text.embed(vocabulary)
        return self.class_logits(rgbs, text, vocabulary.query_class, len(vocabulary), timer, prototypes)

    def prototypes(self, per_class: Sequence[Sequence[Example]]) -> Optional[Prototypes]:
        """Each vocabulary class's examples (oldest first) as the prototypes of a forward, weighed
        as the config says; None when no class has any."""
        cfg = self.config
        return Prototypes.build(per_class, cfg.prototype_k, cfg.prototype_cap, cfg.prototypes_per_class)

    def examples(self, rgb: np.ndarray, masks: np.ndarray) -> List[Optional[Example]]:
        """The Example of each (H, W) bool mask of an (H, W, 3) uint8 image (masks (K, H, W)),
        measured at the working resolution; None for a mask with no pixel left there."""
        image = self.prepare(rgb)
        size = tuple(image.shape[-2:])
        # a mask at a time, as `prepare` resizes the image: 20 classes' masks of a 24-megapixel
        # photo would be 1.9 GB of floats at once
        weights = torch.stack([_resized(mask, size, image.device) for mask in masks]).clamp(0.0, 1.0)
        cfg = self.config
        sums, total = pool_masks(image, weights, self._crop_features, cfg.window, cfg.stride, cfg.batch_size,
                                 self.model.patch_size)
        pixels = weights.sum(dim=(1, 2))
        found = examples_from_sums(sums, total, pixels.clamp_min(1e-6), size[0] * size[1])
        return [example if count >= 1.0 else None for example, count in zip(found, pixels.tolist())]

    def working_size(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """(H, W) scaled so the short side is `config.short_side` (aspect ratio kept), or, for an
        image thinner than 1:MAX_ASPECT, so the long side is MAX_ASPECT times that."""
        short_side = self.config.short_side
        height, width = size
        if short_side is None:
            return height, width
        scale = min(short_side / min(height, width), MAX_ASPECT * short_side / max(height, width))
        if scale == 1:
            return height, width
        return max(1, round(height * scale)), max(1, round(width * scale))

    def prepare(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, h, w) CLIP-normalized float32 at the working size, on the
        model's device. Resized first, one channel at a time (resizing and the per-channel
        normalization commute), so a 12-megapixel photo is never three float channels at once."""
        size = self.working_size(rgb.shape[:2])
        pixels = torch.stack([_resized(rgb[..., c], size, self.model.device) for c in range(3)]) / 255.0
        mean = torch.tensor(self.model.image_mean, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.model.image_std, device=pixels.device).view(3, 1, 1)
        return (pixels - mean) / std

    def class_logits(
        self, rgbs: Sequence[np.ndarray], text: torch.Tensor, query_class: Sequence[int], n_classes: int,
        timer: StageTimer = untimed, prototypes: Optional[Prototypes] = None,
    ) -> List[torch.Tensor]:
        """(C, h, w) class logits of each image at the working resolution. PAMR, when on, runs
        there too (as the sliding-window codebases do), so its cost does not grow with the photo."""
        cfg = self.config
        index = torch.tensor(query_class, device=text.device)
        queries, outputs = text, n_classes
        if prototypes is not None:
            # each class with examples gets one more output channel: its best prototype's cosine
            prototypes = prototypes.to(text.device)
            queries = torch.cat([text, prototypes.vectors.to(text.dtype)])
            index = torch.cat([index, n_classes + prototypes.owner])
            outputs = n_classes + len(prototypes.classes)

        def encode(crops: torch.Tensor) -> torch.Tensor:
            return self._crop_logits(crops, queries, index, outputs)

        with timer("model"):
            resized = [self.prepare(rgb) for rgb in rgbs]
            if cfg.window is None:  # sizes differ, so one image per forward
                coarse = [whole_image(image, encode, self.model.patch_size) for image in resized]
            else:
                coarse = sliding_window_many(resized, encode, cfg.window, cfg.stride, cfg.batch_size)
            if prototypes is not None:
                coarse = [combine(logits[:n_classes], logits[n_classes:], prototypes) for logits in coarse]
        if cfg.pamr:
            with timer("PAMR"):
                coarse = [pamr.refine(image[None], logits[None], cfg.pamr_iterations, cfg.pamr_dilations)[0]
                          for image, logits in zip(resized, coarse)]
        return coarse

    def _crop_features(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, hp, wp, D) L2-normalized dense features of (N, 3, h, w) crops."""
        return F.normalize(self.encoder(crops, self.config.encoder).float(), dim=-1)

    def _crop_logits(self, crops: torch.Tensor, text: torch.Tensor, query_class: torch.Tensor, n_classes: int):
        features = self._crop_features(crops)
        query_logits = torch.einsum("nhwd,qd->nqhw", features, text)
        query_logits = F.interpolate(query_logits, size=crops.shape[-2:], mode="bilinear", align_corners=False)
        if len(query_class) == n_classes:
            return query_logits
        # a class scores the max over its queries, per pixel
        shape = (query_logits.shape[0], n_classes, *query_logits.shape[-2:])
        index = query_class.view(1, -1, 1, 1).expand_as(query_logits)
        return query_logits.new_full(shape, float("-inf")).scatter_reduce(1, index, query_logits, "amax")

    def decide(self, logits: torch.Tensor, names: Sequence[str], size: Optional[Tuple[int, int]] = None,
               prob_threshold: Optional[float] = None) -> Prediction:
        """Labels at `size` (default: the logits' own) from (C, h, w) logits, in row tiles;
        `prob_threshold` overrides the config's."""
        threshold = self.config.prob_threshold if prob_threshold is None else prob_threshold
        size = tuple(size) if size is not None else tuple(logits.shape[-2:])
        found = label_map_tiled(logits, size, self.config.logit_scale, threshold, UNLABELED)
        per_pixel = found.counts.clamp_min(1)
        return Prediction(tuple(names), found.label_map.cpu(), (found.top_sums / per_pixel).float().cpu(),
                          (found.margin_sums / per_pixel).float().cpu(), found.counts.long().cpu(), logits.cpu(),
                          self.config.logit_scale)


def _resized(plane: np.ndarray, size: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """One (H, W) channel or mask as float32 on `device`, resized to `size` (antialiased bilinear);
    one at a time, so that only one is ever floats at full size."""
    values = torch.from_numpy(plane).to(device).float()
    if tuple(values.shape) == tuple(size):
        return values
    return F.interpolate(values[None, None], size=size, mode="bilinear", align_corners=False, antialias=True)[0, 0]


def as_vocabulary(class_names: Union[Vocabulary, Iterable[ClassSpec]]) -> Vocabulary:
    return class_names if isinstance(class_names, Vocabulary) else Vocabulary.from_names(class_names)
