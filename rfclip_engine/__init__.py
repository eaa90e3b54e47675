"""rfclip_engine: training-free open-vocabulary segmentation with RF-CLIP on open_clip ViTs.

Public API:
    load_model(name, pretrained, device, dtype, distraction_dims) -> RFCLIPModel
    RFCLIPModel.encode_dense(pixels, RFCLIPConfig) -> (B, h, w, D) patch embeddings
    RFCLIPConfig, SegmenterConfig: every knob, with the paper's defaults
    Segmenter(model, SegmenterConfig).predict(image, class_names) -> Prediction
"""
__version__ = "0.1.0"

from .config import MODES, RFCLIPConfig, SegmenterConfig
from .loading import WeightsUnavailableError, load_model
from .model import RFCLIPModel
from .predictor import UNLABELED, Prediction, Segmenter
from .presets import DistractionPreset
from .text import Vocabulary

__all__ = [
    "MODES",
    "DistractionPreset",
    "Prediction",
    "RFCLIPConfig",
    "RFCLIPModel",
    "Segmenter",
    "SegmenterConfig",
    "UNLABELED",
    "Vocabulary",
    "WeightsUnavailableError",
    "load_model",
]
