"""The encoder's forward at a precision, replayed from recorded CUDA graphs when asked.

At small batches a GPU forward of RF-CLIP is bound by kernel launches, not by arithmetic: the
Lanczos solver alone is some 300 small operators per block. A CUDA graph records the whole forward
once per input shape and replays it as one launch. Nothing in the forward synchronises with the
host (see steps.py), which is what recording needs.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional, Tuple

import torch

from .config import RFCLIPConfig
from .model import RFCLIPModel

_Key = Tuple[Tuple[int, ...], torch.dtype, RFCLIPConfig]


class DenseEncoder:
    """`model.encode_dense(pixels, config)` under autocast to `dtype` (None: full precision).

    With `cuda_graphs`, a CUDA input runs as the replay of a graph recorded for its shape and
    config, the `max_graphs` most recently used kept (each holds its forward's buffers); other
    devices run the plain forward.
    """

    def __init__(self, model: RFCLIPModel, dtype: Optional[torch.dtype] = None, cuda_graphs: bool = False,
                 max_graphs: int = 4) -> None:
        self.model = model
        self.dtype = dtype
        self.cuda_graphs = cuda_graphs
        self.max_graphs = max_graphs
        self._graphs: "OrderedDict[_Key, Tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]]" = OrderedDict()
        self._lock = threading.Lock()  # one replay at a time: the graph's buffers are shared

    def __call__(self, pixels: torch.Tensor, config: RFCLIPConfig) -> torch.Tensor:
        # the exact Fiedler solver's eigh checks its result on the host, which recording forbids
        exact = config.refocuses and config.defocus_localization and config.fiedler_solver == "exact"
        if not (self.cuda_graphs and pixels.device.type == "cuda") or exact:
            return self._forward(pixels, config)
        key = (tuple(pixels.shape), pixels.dtype, config)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._graphs[key] = self._record(pixels, config)
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            static_input, graph, static_output = entry
            static_input.copy_(pixels)
            graph.replay()
            return static_output.clone()  # the next replay overwrites the graph's output

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
