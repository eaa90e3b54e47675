"""Triton kernels for the RF-CLIP steps on CUDA: steps 1-2, the distraction tokens and their
repair (distractors.py); step 3, the Fiedler vector and the cut (lanczos.py); and the key-key
attention sum and step 4 with its product with the values (attention.py).

Eagerly each of these is many small operators or several passes over a (B, H, T, T) float32
buffer; a kernel here does one crop's (or one head's) whole step in one program, holding a
window's tokens in registers. Each computes what the eager step in `steps.py` / `model.py`
computes, up to the order of its sums; the tests run the same kernels through Triton's
interpreter on the CPU (tests/kernels_interpreted.py), and tests/test_device.py on a GPU.
"""
from __future__ import annotations

from typing import Tuple

import torch

try:
    import triton
except ImportError:  # no Triton (e.g. a CPU-only install): the eager steps run everywhere
    triton = None

# A program holds a window's patch tokens (padded to a power of two) in registers, the CLS token
# apart: 256 fit, a ViT-B/16 window of 224 (196) or a ViT-L/14 one (256); whole images of more
# keep the eager steps.
MAX_TOKENS = 256


def usable(device: torch.device, tokens: int, capability: Tuple[int, int] = (7, 0)) -> bool:
    """Whether a kernel can run on `device` for crops of `tokens` patch tokens: at most
    MAX_TOKENS of them, on a GPU that Triton compiles it for: ROCm's, or NVIDIA's of at least
    this compute capability (7.0, Volta, for float32 arithmetic; tensor-core products in half
    precision want 8.0, Ampere: before it Triton falls back to scalar products that spill)."""
    if triton is None or device.type != "cuda" or tokens > MAX_TOKENS:
        return False
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= capability


def available(tensor: torch.Tensor, capability: Tuple[int, int] = (7, 0)) -> bool:
    """`usable` for `tensor`, whose second-last axis counts patch tokens."""
    return usable(tensor.device, tensor.shape[-2], capability)
