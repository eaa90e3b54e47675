"""Shared helpers of the benchmark scripts: peak-RSS sampling, machine facts, tables."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def run_with_peak_rss(work: Callable[[], object], interval_s: float = 0.005) -> Tuple[float, int]:
    """(seconds, peak RSS above the RSS at the start in bytes) of one call, sampled in a thread."""
    start_rss = rss_bytes()
    peak = start_rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        work()
    finally:
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    return seconds, max(peak, rss_bytes()) - start_rss


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, with the device's queued work finished on both sides."""
    synchronize(device)
    started = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - started


def run_with_peak_memory(work: Callable[[], object], device: torch.device) -> Tuple[float, int]:
    """(seconds, peak memory above the start in bytes) of one call: process RSS on the CPU,
    allocated device memory on CUDA."""
    if device.type != "cuda":
        return run_with_peak_rss(work)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    seconds = timed(work, device)
    return seconds, torch.cuda.max_memory_allocated(device) - start


MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # glibc's malloc thresholds decide whether CPU times include page faults (the Docker image sets them)
        "malloc": {name: os.environ.get(name) for name in MALLOC_SETTINGS},
    }


def markdown_table(header: Sequence[str], rows: List[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def label_studio_binary() -> Optional[str]:
    """The label-studio executable the benchmarks that need one start (None, said, when unset)."""
    binary = os.environ.get("LABEL_STUDIO_BIN")
    if not binary:
        print("set LABEL_STUDIO_BIN to a label-studio 1.23.2 executable (bash .ci/run installs one)", file=sys.stderr)
    return binary


def arguments(script: str, doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring's first line, and `--json` beside the script."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--json", default=str(Path(script).with_suffix(".json")), help="where the results go")
    return parser
