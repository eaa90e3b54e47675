"""rfclip_engine: training-free open-vocabulary segmentation with RF-CLIP on open_clip ViTs.

Public API:
    load_model(name, pretrained, device, dtype, distraction_dims) -> RFCLIPModel
    RFCLIPModel.encode_dense(pixels, RFCLIPConfig) -> (B, h, w, D) patch embeddings
    RFCLIPConfig, SegmenterConfig: every knob, with the paper's defaults
"""
from .config import MODES, RFCLIPConfig, SegmenterConfig
from .loading import WeightsUnavailableError, load_model
from .model import RFCLIPModel
from .presets import DistractionPreset

__all__ = [
    "MODES",
    "DistractionPreset",
    "RFCLIPConfig",
    "RFCLIPModel",
    "SegmenterConfig",
    "WeightsUnavailableError",
    "load_model",
]
