"""Peak memory of decoding one big image the way the backend does, each case in a fresh process.

Cases: a 50 MP RGBA PNG (transparency composited: today's uint16 bands vs the float32 formula
the backend used before, measured in the same run as the baseline), and a 48 MP JPEG decoded in
full vs reduced to twice the working size (what the backend's fetcher does). Each case reads
the file and prepares the model's input (resize to the working size, normalize), which is all
the backend holds of an image beyond the model. Prints peak RSS above the start and the ratio.

    python benchmarks/bench_decode.py [--megapixels 50] [--json benchmarks/bench_decode.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import arguments, run_with_peak_rss  # noqa: E402


def make_images(folder: Path, megapixels: float) -> dict:
    from PIL import Image

    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(megapixels * 1e6 / width)
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (512, 512, 4), dtype=np.uint8)  # noise tiles: fast to encode
    rgba = np.tile(tile, (height // 512 + 1, width // 512 + 1, 1))[:height, :width]
    paths = {"png": folder / "big_rgba.png", "jpeg": folder / "big.jpg"}
    Image.fromarray(rgba, "RGBA").save(paths["png"], compress_level=1)
    Image.fromarray(np.ascontiguousarray(rgba[..., :3])).save(paths["jpeg"], quality=90)
    return {"size": [height, width], **{k: str(v) for k, v in paths.items()}}


def child(case: str, path: str) -> None:
    """One case in this (fresh) process; prints its peak RSS above the start in bytes."""
    from PIL import Image

    from rfclip_engine import RFCLIPConfig, SegmenterConfig
    from rfclip_engine.imageio import read_rgb
    from rfclip_engine.predictor import Segmenter

    import torch

    class NoModel:  # what prepare() reads of the model
        device = torch.device("cpu")
        image_mean = (0.48145466, 0.4578275, 0.40821073)
        image_std = (0.26862954, 0.26130258, 0.27577711)

    segmenter = Segmenter.__new__(Segmenter)
    segmenter.config = SegmenterConfig(encoder=RFCLIPConfig())
    segmenter.model = NoModel()

    def float32_composite() -> np.ndarray:  # the formula used before, as the baseline
        with Image.open(path) as image:
            array = np.array(image)
        alpha = array[..., -1:].astype(np.float32) / 255.0
        return (array[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)

    work = {
        "rgba-float32 (before)": float32_composite,
        "rgba-uint16 (now)": lambda: read_rgb(path, 10 ** 9)[0],
        "jpeg-full": lambda: read_rgb(path, 10 ** 9)[0],
        "jpeg-reduced (now)": lambda: read_rgb(path, 10 ** 9, 2 * segmenter.config.short_side)[0],
    }[case]
    seconds, peak = run_with_peak_rss(lambda: segmenter.prepare(work()))
    print(json.dumps({"seconds": seconds, "peak_bytes": peak}))


def main() -> None:
    parser = arguments(__file__, __doc__)
    parser.add_argument("--megapixels", type=float, default=50.0)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as folder:
        images = make_images(Path(folder), args.megapixels)
        results = {}
        for case, kind in [("rgba-float32 (before)", "png"), ("rgba-uint16 (now)", "png"),
                           ("jpeg-full", "jpeg"), ("jpeg-reduced (now)", "jpeg")]:
            done = subprocess.run([sys.executable, __file__, "--child", case, images[kind]],
                                  capture_output=True, text=True, cwd=ROOT)
            if done.returncode:
                raise SystemExit(f"case {case} failed:\n{done.stderr}")
            results[case] = json.loads(done.stdout.strip().splitlines()[-1])
    mb = {case: r["peak_bytes"] / 2 ** 20 for case, r in results.items()}
    print(f"image {images['size'][1]}x{images['size'][0]} ({args.megapixels:g} MP)")
    for case, r in results.items():
        print(f"  {case:24s} peak RSS {mb[case]:7.0f} MB  {r['seconds']:6.2f} s")
    print(f"  RGBA: now {mb['rgba-uint16 (now)'] / mb['rgba-float32 (before)']:.2f}x the float32 path; "
          f"JPEG: reduced {mb['jpeg-reduced (now)'] / mb['jpeg-full']:.2f}x the full decode")
    Path(args.json).write_text(json.dumps({"size": images["size"], "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
