"""Process-wide settings for the CPU path, applied once by every entry point before torch starts
any thread (the `rfclip` CLI, the backend's runtime, bench_engine)."""
from __future__ import annotations

import numpy as np
import torch

INTERRUPTED = 130  # a command's exit status after Ctrl-C, as shells give it (128 + SIGINT)


def flush_subnormal_floats() -> bool:
    """Treat subnormal floats (under 1.2e-38 in float32) as zero: in this thread, and in every
    thread started after it (torch's intra-op pools, request threads, the model loader).

    A softmax row whose logits span more than about 87 underflows into subnormals, and x86 takes
    a microcode assist for each arithmetic operation on one, about a hundred times the normal
    cost. RF-CLIP makes many such rows where keys have large norms: the key-key attention's
    diagonal is |k_i|^2 / sqrt(d), and its running sum and the last block's product then carry
    the subnormals on. With keys of a random ViT-B/16 scaled 5x, rfclip took 1.40x clip's time
    instead of 1.09x (benchmarks/bench_subnormal.py, RESULTS run L). Zero instead of a subnormal changes no
    probability by more than 1.2e-38.

    The flag is per thread and copied to a thread when it is created, so called after torch's
    pools exist it covers only the calling thread. False where the CPU has no such mode."""
    # numpy works out a float type's limits on its first use and, under the flag, warns that the
    # smallest subnormal is zero (reading a float TIFF did, in the middle of the progress bar):
    # worked out now, they are kept
    for dtype in (np.float16, np.float32, np.float64, np.longdouble):
        np.finfo(dtype)
    return torch.set_flush_denormal(True)
