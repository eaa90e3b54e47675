"""`rfclip segment` over a folder, against the engine alone on the same images in the same run.

    python benchmarks/bench_segment.py [--images 16] [--rounds 3] [--device cpu] [--json ...]

A folder of photo-like 1024x768 JPEGs (smooth blobs with a grain of noise, as photos have), 10
classes, ViT-B/16 with random weights saved as a checkpoint (time does not depend on them). Each
round times, interleaved:
- the engine alone: each group of images read, their logits (`Segmenter.logits_many`) and labels at
  full size (`Segmenter.decide`), nothing written: what the command cannot do without;
- the command, `rfclip segment FOLDER --out OUT --checkpoint ...` in this process, less the time its
  model takes to load (measured in the same round), so that both sides count the same images.
The ratio engine images/s / command images/s is what the command's reading and writing cost on
top of the model; the host's own work per image is the command's time less the engine's.
"""
from __future__ import annotations

import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import arguments, machine, markdown_table, synchronize  # noqa: E402
from rfclip_engine import Segmenter, Vocabulary, load_model  # noqa: E402
from rfclip_engine.cli import _images_per_group, _segmenter_config, build_parser  # noqa: E402
from rfclip_engine.cli import main as rfclip  # noqa: E402
from rfclip_engine.imageio import load_rgb  # noqa: E402
from rfclip_engine.loading import resolve_device  # noqa: E402

LABELS = ["person", "car", "tree", "road", "building", "sky", "dog", "bicycle", "grass", "bus"]


def photo(seed: int) -> bytes:
    """1024x768 JPEG: smooth blobs (regions like a photo's) with grain (its texture, which PNG
    cannot compress away)."""
    rng = np.random.default_rng(seed)
    blobs = np.asarray(Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
        (1024, 768), Image.BICUBIC), dtype=np.float32)
    grain = rng.normal(0.0, 8.0, blobs.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(blobs + grain, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> int:
    parser = arguments(__file__, __doc__)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="rfclip-bench-segment-"))
    folder = work / "images"
    folder.mkdir()
    for i in range(args.images):
        (folder / f"{i:04d}.jpg").write_bytes(photo(i))
    torch.manual_seed(0)
    checkpoint = work / "ViT-B-16.pt"
    torch.save(load_model("ViT-B-16", pretrained=None).clip.state_dict(), checkpoint)
    command = ["segment", str(folder), "--labels", ",".join(LABELS), "--checkpoint", str(checkpoint),
               "--weights-tag", "openai", "--device", args.device, "--quiet"]

    # the command's own config and groups, from its own parser: both sides segment alike
    parsed = build_parser().parse_args([*command, "--out", str(work / "unused")])
    config = _segmenter_config(parsed, device)
    group = _images_per_group(parsed, config)
    files = sorted(folder.iterdir())
    vocabulary = Vocabulary.from_names(LABELS)

    def engine(segmenter: Segmenter) -> float:
        synchronize(device)
        started = time.perf_counter()
        for start in range(0, len(files), group):
            rgbs = [load_rgb(path) for path in files[start:start + group]]
            for rgb, logits in zip(rgbs, segmenter.logits_many(rgbs, vocabulary)):
                segmenter.decide(logits, vocabulary.names, rgb.shape[:2]).label_map.numpy()
        synchronize(device)
        return time.perf_counter() - started

    rounds = []
    for n in range(args.rounds + 1):  # the first round warms up (and checks the kernels on a GPU)
        started = time.perf_counter()
        model = load_model("ViT-B-16", pretrained=str(checkpoint), device=device, weights_tag="openai")
        load_s = time.perf_counter() - started
        engine_s = engine(Segmenter(model, config))
        del model
        started = time.perf_counter()
        assert rfclip([*command, "--out", str(work / f"out{n}")]) == 0
        command_s = time.perf_counter() - started - load_s
        written = sorted(p.name for p in (work / f"out{n}").iterdir())
        assert len(written) == 2 * len(files) + 1, written  # labels and overlay per image, classes.json
        if n:
            rounds.append({"engine_s": engine_s, "command_s": command_s, "load_s": load_s})
        print(f"round {n}: engine {engine_s:.2f} s, command {command_s:.2f} s (+ {load_s:.2f} s to load)",
              file=sys.stderr)

    engine_s = statistics.median(r["engine_s"] for r in rounds)
    command_s = statistics.median(r["command_s"] for r in rounds)
    ratio = statistics.median(r["command_s"] / r["engine_s"] for r in rounds)
    host_ms = statistics.median((r["command_s"] - r["engine_s"]) / len(files) * 1e3 for r in rounds)
    print(markdown_table(
        ["images", "engine images/s", "command images/s", "command / engine time, paired median",
         "host work per image, ms"],
        [[len(files), f"{len(files) / engine_s:.2f}", f"{len(files) / command_s:.2f}", f"{ratio:.3f}x",
          f"{host_ms:.0f}"]]))
    Path(args.json).write_text(json.dumps({"machine": machine(), "device": str(device), "images": len(files),
                                           "group": group, "rounds": rounds, "ratio": ratio,
                                           "host_ms_per_image": host_ms}, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
