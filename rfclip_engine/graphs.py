"""The encoder's forward at a precision, replayed from recorded CUDA graphs when asked, with the
Triton kernels checked against the eager steps on their first forward.

At small batches a GPU forward of RF-CLIP is bound by kernel launches, not by arithmetic: the
Lanczos solver alone is some 300 small operators per block. A CUDA graph records the whole forward
once per input shape and replays it as one launch. Nothing in the forward synchronises with the
host (see steps.py), which is what recording needs.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch

from . import kernels
from .config import RFCLIPConfig
from .model import RFCLIPModel

_Key = Tuple[Tuple[int, ...], torch.dtype, RFCLIPConfig]
# Relative distance of the kernels' dense features from the eager steps' above which the kernels
# are not used: fp16 features stood 1.0e-3 from float32's on the H200 (tests/test_device.py holds
# them within this), and the kernels against the eager steps in one precision nearer still; a
# broken kernel lands far outside.
KERNEL_TOLERANCE = 0.05
SHAPES_REMEMBERED = 64  # batch shapes whose next use records a graph
# torch's checks for the CPU's matrix units of each autocast type (private: a torch without them
# only loses the warning below)
_CPU_MATRIX_UNITS = {torch.bfloat16: "_is_amx_tile_supported", torch.float16: "_is_amx_fp16_supported"}

log = logging.getLogger(__name__)


def checks_kernels(device: torch.device, tokens: int, config: RFCLIPConfig) -> bool:
    """Whether a DenseEncoder's first forward of crops of `tokens` patch tokens on `device`
    compiles the Triton kernels and checks them against the eager steps."""
    return config.triton_kernels and config.sums_key_key and kernels.usable(device, tokens)


def emulated_on_this_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU lacks the AMX unit that runs `dtype`'s matrix products (bf16 from Intel's
    4th Xeon generation, fp16 from the 6th), so that oneDNN emulates them: with AVX-512 BF16 but no
    AMX, bf16 autocast took 1.5x fp32's time, with AVX2 alone 9x; fp16 with AVX-512 FP16 about
    fp32's (benchmarks/RESULTS.md)."""
    check = getattr(torch.cpu, _CPU_MATRIX_UNITS.get(dtype, ""), None)
    return check is not None and not check()


def graph_batch(crops: int) -> int:
    """The batch a graph is recorded for: `crops` rounded up to a power of two. The last batch of
    each group of images is partial, of any size below the full one when image sizes vary;
    without rounding each size would record its own graph (three forwards) and push the full
    batch's out of the few kept."""
    return 1 << (crops - 1).bit_length()


class DenseEncoder:
    """`model.encode_dense(pixels, config)` under autocast to `dtype` (None: full precision).

    With `cuda_graphs`, a CUDA input runs as the replay of a graph recorded for its shape and
    config, its batch padded to `graph_batch` (crops are encoded independently, so the padding's
    outputs are dropped); a shape's first use runs the plain forward and its second records the
    graph; the `max_graphs` most recently used are kept (each holds its forward's buffers). Other
    devices run the plain forward.

    Where the Triton kernels would run (`config.triton_kernels` on a GPU), the first forward of
    each crop shape and config runs with the kernels and with the eager steps: a kernel that
    fails to compile or launch on this GPU, or features more than KERNEL_TOLERANCE from the eager
    steps', and this encoder keeps the eager steps for that crop shape, with a warning. That first
    call returns the features of the path kept, so the check costs one forward. The kernels are
    checked in tests through Triton's interpreter, not on every GPU and Triton release.
    """

    def __init__(self, model: RFCLIPModel, dtype: Optional[torch.dtype] = None, cuda_graphs: bool = False,
                 max_graphs: int = 8) -> None:
        # the matrix products' weights stored in the autocast dtype: the same result without a
        # cast of every weight in every forward (or in every replay of a graph)
        self.model = model if dtype is None else model.autocast_copy(dtype)
        if dtype is not None and model.device.type == "cpu" and emulated_on_this_cpu(dtype):
            log.warning("%s autocast on a CPU without AMX for it: its matrix products are emulated, no faster "
                        "than fp32 and up to 9x slower (benchmarks/RESULTS.md); use fp32 here (--precision fp32, "
                        "RFCLIP_PRECISION=fp32)", str(dtype).removeprefix("torch."))
        self.dtype = dtype
        self.cuda_graphs = cuda_graphs
        self.max_graphs = max_graphs
        self._graphs: "OrderedDict[_Key, Tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]]" = OrderedDict()
        self._lock = threading.Lock()  # one replay at a time: the graph's buffers are shared
        self._kernel_checks: Dict[_Key, bool] = {}  # whether the kernels passed, per crop shape and config
        self._seen: "OrderedDict[_Key, None]" = OrderedDict()  # the shapes last run, whether recorded or not

    def __call__(self, pixels: torch.Tensor, config: RFCLIPConfig) -> torch.Tensor:
        tokens = (pixels.shape[-2] // self.model.patch_size) * (pixels.shape[-1] // self.model.patch_size)
        if checks_kernels(pixels.device, tokens, config):
            config, features = self._checked(pixels, config)
            if features is not None:  # the check's forward was this input's: no other is needed
                return features
        # the exact Fiedler solver's eigh checks its result on the host, which recording forbids
        exact = config.refocuses and config.defocus_localization and config.fiedler_solver == "exact"
        if not self._replays(pixels) or exact:
            return self._forward(pixels, config)
        crops, padded = pixels.shape[0], graph_batch(pixels.shape[0])
        key = ((padded, *pixels.shape[1:]), pixels.dtype, config)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None and key not in self._seen:
                # recorded on its second use: a shape used once (whole images of many sizes) would
                # pay three forwards for a graph never replayed
                self._seen[key] = None
                while len(self._seen) > SHAPES_REMEMBERED:
                    self._seen.popitem(last=False)
                return self._forward(pixels, config)
            if padded != crops:
                pixels = torch.cat([pixels, pixels.new_zeros((padded - crops, *pixels.shape[1:]))])
            if entry is None:
                entry = self._graphs[key] = self._record(pixels, config)
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            static_input, graph, static_output = entry
            static_input.copy_(pixels)
            graph.replay()
            return static_output[:crops].clone()  # the next replay overwrites the graph's output

    def _replays(self, pixels: torch.Tensor) -> bool:
        return self.cuda_graphs and pixels.device.type == "cuda"

    def _checked(self, pixels: torch.Tensor, config: RFCLIPConfig) -> Tuple[RFCLIPConfig, Optional[torch.Tensor]]:
        """`config`, or the same with the eager steps where the kernels failed their check; and,
        where this call ran the check, the features it gave for `pixels` (else None)."""
        key = (tuple(pixels.shape[1:]), pixels.dtype, config)  # a kernel is compiled per crop size, not batch
        features = None
        with self._lock:
            passed = self._kernel_checks.get(key)
            if passed is None:
                failure, features = self._check_kernels(pixels, config)
                if failure:
                    log.warning("the Triton kernels %s on %s for crops %s: this encoder keeps the eager RF-CLIP "
                                "steps for them (RFCLIP_TRITON_KERNELS=false or --no-triton-kernels skips the "
                                "kernels and this check)", failure, pixels.device, tuple(pixels.shape[1:]))
                passed = self._kernel_checks[key] = failure is None
        return (config if passed else dataclasses.replace(config, triton_kernels=False)), features

    def _check_kernels(self, pixels: torch.Tensor, config: RFCLIPConfig) -> Tuple[Optional[str], torch.Tensor]:
        """None and the kernels' features where they match the eager steps', else what went wrong
        and the eager steps' features."""
        eager = self._forward(pixels, dataclasses.replace(config, triton_kernels=False))
        try:
            fused = self._forward(pixels, config)
        except Exception as err:  # Triton's compile and launch errors have no common type
            return f"failed ({type(err).__name__}: {err})", eager
        if not torch.isfinite(fused).all():
            return "gave features that are not finite", eager
        difference = torch.linalg.vector_norm(fused.float() - eager.float())
        distance = (difference / torch.linalg.vector_norm(eager.float())).item()
        if not distance <= KERNEL_TOLERANCE:
            return f"gave features {distance:.3g} from the eager steps' (more than {KERNEL_TOLERANCE})", eager
        log.info("the Triton kernels passed their check on %s for crops %s: features %.3g from the eager steps'",
                 pixels.device, tuple(pixels.shape[1:]), distance)
        return None, fused

    def _forward(self, pixels: torch.Tensor, config: RFCLIPConfig) -> torch.Tensor:
        # autocast's cache of cast weights is off: a recorded graph would read casts freed after it
        with torch.autocast(pixels.device.type, dtype=self.dtype, enabled=self.dtype is not None,
                            cache_enabled=False):
            return self.model.encode_dense(pixels, config)

    def _record(self, pixels: torch.Tensor, config: RFCLIPConfig):
        static_input = pixels.clone()
        # warm-up on a side stream, as recording requires: library handles and workspaces exist first
        side = torch.cuda.Stream(device=pixels.device)
        side.wait_stream(torch.cuda.current_stream(pixels.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(static_input, config)
        torch.cuda.current_stream(pixels.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self._forward(static_input, config)
        return static_input, graph, static_output
