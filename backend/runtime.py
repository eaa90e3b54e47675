"""What every entry point builds from the settings: the text cache, the model (loaded in the
background), the image fetcher and the prediction service. The Flask app and the job commands
both start here, so they predict exactly alike."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

import torch

from rfclip_engine import Segmenter, load_model
from rfclip_engine.imageio import admit_pixels
from rfclip_engine.loading import resolve_device
from rfclip_engine.process import flush_subnormal_floats
from rfclip_engine.text import EmbeddingCache, FolderCache

from .learning.bank import open_bank
from .media import ImageFetcher
from .netguard import DestinationPolicy
from .service import ModelHolder, PredictionService, model_version, segmenter_config
from .settings import Settings
from .text_cache import RedisEmbeddingCache

SegmenterLoader = Callable[[Settings, EmbeddingCache], Segmenter]
log = logging.getLogger("rfclip.backend")


def load_segmenter(settings: Settings, text_cache: EmbeddingCache) -> Segmenter:
    device = resolve_device(settings.device)
    model = load_model(settings.model, pretrained=settings.pretrained, device=device,
                       distraction_dims=settings.distraction_dims, weights_tag=settings.weights_tag)
    segmenter = Segmenter(model, segmenter_config(settings, device), text_cache=text_cache,
                          max_pixels=settings.max_image_pixels)
    segmenter.warm_up()  # the model is reported loaded once a first image would not wait on a compile
    # how it runs, which the settings' "auto" values leave to the machine
    log.info("the model runs on %s in %s, %d crops per forward", device, segmenter.config.precision,
             segmenter.config.batch_size)
    return segmenter


def destination_policy(settings: Settings) -> DestinationPolicy:
    """Private addresses are fetched when the operator allows them, and from LABEL_STUDIO_URL's host."""
    own = urlparse(settings.label_studio_url).hostname if settings.label_studio_url else None
    return DestinationPolicy(settings.allow_private_urls, frozenset({own.lower()} if own else ()))


@dataclass
class Runtime:
    text_cache: RedisEmbeddingCache
    holder: ModelHolder
    service: PredictionService


def build_runtime(settings: Settings, segmenter_loader: SegmenterLoader = load_segmenter) -> Runtime:
    flush_subnormal_floats()  # before the model loader's and torch's threads start: they copy the flag
    admit_pixels(settings.max_image_pixels)
    # on disk in front of Redis (and alone without it): a restarted process, or one of a project
    # with hundreds of labels, does not spend a minute of CPU on their prompts again
    text_cache = RedisEmbeddingCache(settings.redis_url, front=FolderCache(settings.cache_dir / "text"))
    holder = ModelHolder(lambda: segmenter_loader(settings, text_cache))
    fetcher = ImageFetcher(settings.cache_dir, settings.allowed_local_dir, settings.max_download_bytes,
                           settings.fetch_timeout_s, settings.max_image_pixels, settings.image_cache_mb << 20,
                           destination_policy(settings),
                           # decoding a big JPEG reduced, to twice the working size, loses nothing the model sees
                           min_short_side=2 * segmenter_config(settings, torch.device("cpu")).short_side)
    bank = open_bank(settings.redis_url, model_version(settings), settings.prototype_max_annotations,
                     settings.max_projects) \
        if settings.prototypes else None
    return Runtime(text_cache, holder, PredictionService(settings, holder, fetcher, bank=bank))
