"""`load_model`: the one factory that builds an `RFCLIPModel` from open_clip.

Weights come from an open_clip pretrained tag (downloaded once into the Hugging Face cache), or
from a local file: an OpenAI checkpoint (TorchScript archive or state dict) or an open_clip state
dict (.pt / .bin / .safetensors). OpenAI weights were trained with QuickGELU; they always get it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union
from urllib.parse import urlparse

import open_clip
import torch
from safetensors import SafetensorError

from .files import content_digest
from .model import RFCLIPModel
from .presets import DistractionPreset, find_preset, load_preset_file

# Entries of OpenAI checkpoints that are not weights (a traced archive also lists the text mask).
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
OPENAI_TAG = "openai"


def resolve_device(name: Union[str, torch.device]) -> torch.device:
    """"auto" is CUDA when available, else the CPU; anything else as torch reads it."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class WeightsUnavailableError(RuntimeError):
    """The pretrained weights could not be downloaded (typically: no network). `reason` says
    why without advice, so that a caller (the CLI) can word the advice for its own users."""

    def __init__(self, model: str, tag: str, cache_dir: str, reason: str) -> None:
        self.model, self.tag, self.cache_dir, self.reason = model, tag, cache_dir, reason
        super().__init__(
            f"{reason}. On a machine without internet, copy a checkpoint file into {cache_dir} beforehand, or "
            f"pass a local checkpoint instead: load_model({model!r}, pretrained='/path/to/{model}.pt') "
            "(OpenAI .pt, or an open_clip .pt/.bin/.safetensors state dict).")


def _register_model_config(name: str) -> str:
    """A name may be a path to an open_clip model config JSON; register it and return its name."""
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"model config file not found: {path}")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(name.replace("/", "-")) is None:
        raise ValueError(f"unknown model {name!r}; open_clip knows e.g. ViT-B-16, ViT-L-14 "
                         "(all: open_clip.list_models()), or pass a model config .json")
    return name.replace("/", "-")


def _read_openai_state_dict(path: Path) -> Optional[dict]:
    """The state dict of an OpenAI-format checkpoint, or None for any other format."""
    if path.suffix == ".safetensors":
        return None
    with warnings.catch_warnings():
        # OpenAI released its weights as a TorchScript archive: torch.load says it hands one to
        # torch.jit.load, which torch deprecates; said on every run and every backend start, with
        # nothing for the user to do about either
        warnings.filterwarnings("ignore", message=r".*looks like a TorchScript archive", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # a TorchScript archive (OpenAI's release format) is not a pickle
            try:
                checkpoint = torch.jit.load(str(path), map_location="cpu").state_dict()
            except Exception as err:
                raise ValueError(f"{path} is neither a PyTorch checkpoint nor a TorchScript archive: {err}") from err
            return {k: v for k, v in checkpoint.items() if k not in _NON_WEIGHT_KEYS}
    if isinstance(checkpoint, dict) and "input_resolution" in checkpoint:
        return {k: v for k, v in checkpoint.items() if k not in _NON_WEIGHT_KEYS}
    return None


def _hub_cache_dir(cache_dir: Optional[str]) -> str:
    if cache_dir:
        return cache_dir
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _cached_hub_file(tag_cfg: dict, cache_dir: Optional[str]) -> Optional[str]:
    """The tag's weights file in the Hugging Face cache, looked up without the network (the
    files open_clip would download: its safetensors alternative first)."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

    if not tag_cfg.get("hf_hub"):
        return None
    model_id, filename = os.path.split(tag_cfg["hf_hub"])
    filename = filename or HF_WEIGHTS_NAME
    for candidate in (*_get_safe_alternatives(filename), filename):
        found = try_to_load_from_cache(model_id, candidate, cache_dir=cache_dir)
        if isinstance(found, str):
            return found
    return None


def _hub_unreachable(timeout_s: float = 3.0) -> Optional[str]:
    """Why the hub cannot be reached, from one short attempt; None when it can (or when a
    proxy is configured, which only a real request can tell)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s):
            return None
    except OSError as err:
        return f"{endpoint.hostname} cannot be reached ({err.strerror or type(err).__name__})"


def _create_from_tag(name: str, tag: str, cache_dir: Optional[str]) -> torch.nn.Module:
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    quick_gelu = bool(tag_cfg.get("quick_gelu"))
    cached = _cached_hub_file(tag_cfg, cache_dir)
    if cached is not None:  # no network at all, not even a freshness check
        return open_clip.create_model(name, pretrained=cached, force_quick_gelu=quick_gelu)
    cache = _hub_cache_dir(cache_dir)
    offline = _hub_unreachable() if tag_cfg.get("hf_hub") else None
    if offline:  # fail now rather than after a minute of the hub client's retries
        raise WeightsUnavailableError(name, tag, cache, f"the {name} '{tag}' weights are not in the cache {cache} "
                                                        f"and cannot be downloaded: {offline}")
    try:
        return open_clip.create_model(name, pretrained=tag, force_quick_gelu=quick_gelu, cache_dir=cache_dir)
    except RuntimeError as err:
        if "download" not in str(err).lower():
            raise
        raise WeightsUnavailableError(name, tag, cache, f"could not download the {name} '{tag}' weights into "
                                                        f"the cache {cache} ({err})") from err


def _does_not_fit(path: Path, name: str, err: Exception) -> ValueError:
    """The error for weights of another model (ViT-L-14's given for the default ViT-B-16): torch
    lists every tensor that differs, a few hundred lines; the first few say enough."""
    lines = (str(err) or type(err).__name__).strip().splitlines()
    shown = "\n".join(lines[:4]) + (f"\n... ({len(lines) - 4} more lines)" if len(lines) > 4 else "")
    return ValueError(f"checkpoint {path} does not fit model {name} (are they the weights of another model? "
                      f"name that one as the model): {shown}")


def _is_not_random_init_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _weights_loaded_afterwards() -> Iterator[None]:
    """Drops open_clip's warning that the model it builds is "initialized randomly": it says so
    for any model built without its own weights, also when OpenAI's checkpoint is loaded into it
    right after, and the user who passed that checkpoint would read that it was ignored."""
    root = logging.getLogger()  # open_clip warns through logging.warning, the root logger
    root.addFilter(_is_not_random_init_warning)
    try:
        yield
    finally:
        root.removeFilter(_is_not_random_init_warning)


def _weights_id(pretrained: Optional[str]) -> str:
    """A name for the exact weights: the tag, a content hash of a file, or a fresh id for random
    weights (which must never share cached embeddings)."""
    if pretrained is None:
        return f"random-{uuid.uuid4().hex}"
    path = Path(pretrained)
    return content_digest(path) if path.is_file() else pretrained


def _check_finite(clip: torch.nn.Module, source: str) -> None:
    """A weight that is NaN or infinite makes every feature NaN, and every pixel then the first
    class: a damaged file would look like a model that sees one thing everywhere."""
    # a NaN or an infinity always makes the sum non-finite; a sum that overflows is looked at
    # element by element (the sums take a tenth of the elementwise test's 0.35 s for ViT-B/16)
    broken = [name for name, tensor in clip.state_dict().items() if tensor.is_floating_point()
              and not (torch.isfinite(tensor.sum()) or torch.isfinite(tensor).all())]
    if broken:
        raise ValueError(f"the weights from {source} hold NaN or infinite values in {len(broken)} tensor(s), "
                         f"e.g. {broken[0]}: the file is damaged (download or copy it again)")


def load_model(
    name: str = "ViT-B-16",
    pretrained: Optional[str] = OPENAI_TAG,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    distraction_dims: Union[None, str, os.PathLike, Sequence[int]] = None,
    weights_tag: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> RFCLIPModel:
    """Build an RF-CLIP model on open_clip.

    name: an open_clip model name (ViT-B-16, ViT-L-14, ...) or the path of a model config JSON.
    pretrained: an open_clip pretrained tag ("openai"), a local checkpoint path, or None for
        random weights (tests).
    distraction_dims: overrides the preset: a list of channel indices or a file written by
        `rfclip calibrate`.
    weights_tag: which released weights a local open_clip-format file holds (e.g. "openai"),
        to pick their preset and activation; OpenAI-format files are recognised by themselves.
    """
    name = _register_model_config(name)
    if pretrained is None:
        clip = open_clip.create_model(name, pretrained=None)
    elif Path(pretrained).is_file():
        path = Path(pretrained)
        openai_state = _read_openai_state_dict(path)
        if openai_state is not None:
            weights_tag = weights_tag or OPENAI_TAG
            with _weights_loaded_afterwards():
                clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=True)
            try:
                clip.load_state_dict(openai_state, strict=True)
            except RuntimeError as err:
                raise _does_not_fit(path, name, err) from err
        else:
            quick_gelu = weights_tag is not None and bool(
                (open_clip.get_pretrained_cfg(name, weights_tag) or {}).get("quick_gelu"))
            try:
                clip = open_clip.create_model(name, pretrained=str(path), force_quick_gelu=quick_gelu)
            except SafetensorError as err:
                raise ValueError(f"{path} is not a safetensors file: {err}") from err
            except (RuntimeError, AssertionError, KeyError, ValueError) as err:  # open_clip asserts some shapes
                raise _does_not_fit(path, name, err) from err
    elif open_clip.get_pretrained_cfg(name, pretrained):
        weights_tag = pretrained
        clip = _create_from_tag(name, pretrained, cache_dir)
    else:
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is neither an existing checkpoint file nor a known tag for {name} "
            f"(known tags: {open_clip.list_pretrained_tags_by_model(name)})"
        )

    if pretrained is not None:
        _check_finite(clip, pretrained)
    if distraction_dims is None:
        preset = find_preset(name, weights_tag)
    elif isinstance(distraction_dims, (str, os.PathLike)):
        preset = load_preset_file(distraction_dims)
    else:
        base = find_preset(name, weights_tag)
        preset = DistractionPreset(tuple(distraction_dims), base.attention_test if base else False)

    tokenizer = open_clip.get_tokenizer(name)
    model = RFCLIPModel(clip, tokenizer, name, weights_tag, _weights_id(pretrained), preset)
    return model.to(device=device, dtype=dtype)
