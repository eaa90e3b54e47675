"""Subnormal floats flushed to zero, in every thread that runs the model, by every entry point."""
import subprocess
import sys
import textwrap

import pytest

from rfclip_engine import Segmenter

from .backend_support import TEST_CONFIG

# Multiplies a tensor of subnormals, big enough to be split across two intra-op threads, once
# on the main thread and once on a thread started later; prints how many stayed non-zero.
PROBE = textwrap.dedent("""
    import sys, threading, torch
    if sys.argv[1] == "flush":
        from rfclip_engine.process import flush_subnormal_floats
        assert flush_subnormal_floats()
    torch.set_num_threads(2)

    def survivors():
        tiny = torch.full((1 << 21,), torch.finfo(torch.float32).tiny / 4)
        print(int((tiny * 1.0 != 0).sum()))

    survivors()
    thread = threading.Thread(target=survivors)
    thread.start()
    thread.join()
""")


def survivors(mode: str) -> list:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [int(line) for line in done.stdout.split()]


def test_subnormals_are_flushed_in_the_threads_started_after():
    assert survivors("keep") == [1 << 21, 1 << 21]  # the probe does see subnormals
    assert survivors("flush") == [0, 0]


# numpy works out a float type's limits on first use, as reading a float TIFF does in an I/O thread
LIMITS_PROBE = textwrap.dedent("""
    import threading, warnings
    import numpy as np
    from rfclip_engine.process import flush_subnormal_floats
    assert flush_subnormal_floats()

    def first_use():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for dtype in (np.float16, np.float32, np.float64):
                np.nan_to_num(np.ones(2, dtype))
        print(len(caught))

    thread = threading.Thread(target=first_use)
    thread.start()
    thread.join()
""")


def test_numpy_does_not_warn_of_the_flushed_subnormals():
    # it did, once per process, in the middle of the progress bar: "The value of the smallest
    # subnormal for <class 'numpy.float64'> type is zero."
    done = subprocess.run([sys.executable, "-c", LIMITS_PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0"], done.stderr


def test_the_rfclip_command_flushes_before_anything_else(monkeypatch):
    from rfclip_engine import cli

    calls = []
    monkeypatch.setattr(cli, "flush_subnormal_floats", lambda: calls.append("flush"))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert calls == ["flush"]


def test_the_backend_flushes_before_the_model_loader_starts(monkeypatch, tiny_model, tmp_path):
    from backend import runtime
    from backend.settings import Settings

    calls = []
    monkeypatch.setattr(runtime, "flush_subnormal_floats", lambda: calls.append("flush"))

    def loader(settings, cache):
        calls.append("load")
        return Segmenter(tiny_model, TEST_CONFIG, text_cache=cache)

    built = runtime.build_runtime(Settings(cache_dir=tmp_path), segmenter_loader=loader)
    built.holder.get(10)
    assert calls == ["flush", "load"]
