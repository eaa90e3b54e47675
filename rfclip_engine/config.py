"""Configuration dataclasses: every knob of the RF-CLIP encoder and of the segmenter.

`RFCLIPConfig` is what `RFCLIPModel.encode_dense` takes; `SegmenterConfig` wraps it with the
pre/post-processing settings that `Segmenter` owns. Defaults are the algorithm page's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Tuple

import torch

from .steps import FIEDLER_SOLVERS

MODES = ("clip", "maskclip", "kk-proxy", "rfclip")
PRECISIONS = ("fp32", "fp16", "bf16")


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The dtype autocast runs a precision at; None for full precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)


def default_precision(device_type: str) -> str:
    """fp16 autocast on CUDA, full precision elsewhere."""
    return "fp16" if device_type == "cuda" else "fp32"


def resolve_precision(requested: str, device_type: str) -> str:
    """`requested` ("auto" or one of PRECISIONS) as the precision to run on this device type."""
    return default_precision(device_type) if requested == "auto" else requested


def default_batch_size(device_type: str) -> int:
    """Crops per encoder forward: 32 on CUDA, where an H200 replayed RF-CLIP's graphed forward at
    2.7 times the crops/s of batches of 8 (benchmarks/RESULTS.md); 8 elsewhere, the batch the
    CPU's targets were measured at."""
    return 32 if device_type == "cuda" else 8


def images_per_batch(batch_size: int) -> int:
    """Images whose crops share the encoder's batches, at least 4: a 4:3 image at the default short
    side is 6 crops, so a group of batch_size / 4 of them is one full batch and a half one (a
    power of two, as CUDA graphs pad to), not a full one and a few crops."""
    return max(4, batch_size // 4)


@dataclass(frozen=True)
class RFCLIPConfig:
    """How the vision encoder turns pixels into dense patch embeddings.

    mode: "clip" (plain CLIP tokens), "maskclip" (last block's values), "kk-proxy" (last block
        replaced by layer-averaged key-key attention), "rfclip" (kk-proxy plus refocusing in every
        earlier block). The step switches below only matter in "rfclip".
    sigma: a patch token is a distraction token when its largest normalized weight in the
        distraction dimensions exceeds sigma / width.
    beta: fraction of the attention on distraction tokens moved to the defocused tokens.
    distraction_dims: channel indices; None takes the model's preset (or calibrated file).
    attention_test: also require a large received-attention share (the ViT-L/14 rule);
        None takes the preset's rule.
    attention_threshold: the received-attention share above which that test passes.
    fiedler_solver: "lanczos" (only the Fiedler vector, warm-started across blocks; the default)
        or "exact" (a full eigendecomposition per block). They give the same partition unless
        the Fiedler eigenvalue is nearly degenerate, where both cuts are about equally good.
    attention_chunk_mb: the explicit attention and key-key buffers are computed for as many crops
        at a time as fit in this many MB (float32); None: on the CPU an eighth of this process's
        share of the last-level cache, at least 4 MB (they stay in cache; `model.cpu_chunk_mb`),
        the whole batch on an accelerator (fewer launches). The result does not depend on it.
    triton_kernels: on CUDA, steps 1-4 run as Triton kernels (rfclip_engine/kernels/) wherever
        they can; False keeps the eager steps everywhere. The same result up to rounding. The
        segmenter's encoder (`graphs.DenseEncoder`) checks them against the eager steps on each
        crop shape's first forward and keeps the eager steps where they fail or disagree.
    """

    mode: str = "rfclip"
    sigma: float = 5.0
    beta: float = 0.4
    distraction_dims: Optional[Tuple[int, ...]] = None
    attention_test: Optional[bool] = None
    attention_threshold: float = 0.1
    embedding_redistribution: bool = True
    attention_redistribution: bool = True
    defocus_localization: bool = True
    fiedler_solver: str = "lanczos"
    attention_chunk_mb: Optional[float] = None
    triton_kernels: bool = True

    def __post_init__(self) -> None:
        if self.fiedler_solver not in FIEDLER_SOLVERS:
            raise ValueError(f"fiedler_solver must be one of {FIEDLER_SOLVERS}, got {self.fiedler_solver!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.attention_chunk_mb is not None and self.attention_chunk_mb <= 0:
            raise ValueError(f"attention_chunk_mb must be positive or None, got {self.attention_chunk_mb}")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.distraction_dims is not None:
            object.__setattr__(self, "distraction_dims", tuple(int(d) for d in self.distraction_dims))

    @property
    def sums_key_key(self) -> bool:
        """Whether the forward keeps the running key-key attention sum (its last block reads it)."""
        return self.mode in ("kk-proxy", "rfclip")

    @property
    def refocuses(self) -> bool:
        """Whether any per-block RF-CLIP step runs."""
        return self.mode == "rfclip" and (self.embedding_redistribution or self.attention_redistribution)


@dataclass(frozen=True)
class SegmenterConfig:
    """Pre/post-processing around the encoder.

    short_side: resize so the shorter image side has this many pixels (None: keep the size).
    window / stride: sliding-window crop size and step in pixels; window=None encodes the whole
        (resized) image at once with interpolated positional embeddings.
    logit_scale: probabilities are softmax(logit_scale * cosine) over classes.
    pamr: refine the logits with PAMR at the output size before the softmax.
    prob_threshold: pixels whose top probability is below this stay unlabeled.
    batch_size: crops per encoder forward (the CLI and the backend use `default_batch_size`).
    prototype_k, prototype_cap: a class with n visual examples weighs them by
        min(prototype_cap, n / (n + prototype_k)) against its text (see prototypes.py).
    prototypes_per_class: the newest examples of a class that score pixels (all count for n).
    precision: "fp32", or "fp16" / "bf16" autocast (meant for CUDA; bf16 also works on CPU).
    cuda_graphs: on CUDA, replay each batch shape's encoder forward from a recorded CUDA graph
        (one launch instead of hundreds, several times faster at small batches on an H200; each
        recorded shape keeps its buffers; partial batches are padded to a power of two; a shape
        is recorded on its second use). No effect elsewhere.
    """

    encoder: RFCLIPConfig = field(default_factory=RFCLIPConfig)
    short_side: Optional[int] = 336
    window: Optional[int] = 224
    stride: int = 112
    logit_scale: float = 40.0
    pamr: bool = False
    pamr_iterations: int = 10
    pamr_dilations: Tuple[int, ...] = (8, 16)
    prob_threshold: float = 0.0
    batch_size: int = 8
    prototype_k: float = 0.5
    prototype_cap: float = 0.9
    prototypes_per_class: int = 32
    precision: str = "fp32"
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.short_side is not None and self.short_side <= 0:
            raise ValueError(f"short_side must be positive or None, got {self.short_side}")
        if self.window is not None and (self.window <= 0 or not 0 < self.stride <= self.window):
            raise ValueError(f"need 0 < stride <= window, got window={self.window}, stride={self.stride}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0.0 <= self.prob_threshold <= 1.0:
            raise ValueError(f"prob_threshold must be in [0, 1], got {self.prob_threshold}")
        if self.prototype_k <= 0 or not 0.0 <= self.prototype_cap <= 1.0 or self.prototypes_per_class <= 0:
            raise ValueError("need prototype_k > 0, 0 <= prototype_cap <= 1 and prototypes_per_class > 0, got "
                             f"{self.prototype_k}, {self.prototype_cap}, {self.prototypes_per_class}")
        object.__setattr__(self, "pamr_dilations", tuple(int(d) for d in self.pamr_dilations))


# How a forward is executed, not what it computes (beyond rounding): the settings a result is
# keyed by (a backend's model version, a resumed run) leave these out.
EXECUTION_FIELDS = ("batch_size", "precision", "cuda_graphs")
ENCODER_EXECUTION_FIELDS = ("attention_chunk_mb", "triton_kernels")


def labelling_settings(config: SegmenterConfig) -> dict:
    """`config` as a dict of what its labels depend on: its execution fields left out."""
    settings = asdict(config)
    for key in EXECUTION_FIELDS:
        del settings[key]
    for key in ENCODER_EXECUTION_FIELDS:
        del settings["encoder"][key]
    return settings
