"""`rfclip segment` over a folder, against the engine alone on the same images in the same run.

    python benchmarks/bench_segment.py [--images 16] [--rounds 3] [--device cpu] [--precision auto]
        [--labels-file F] [--json ...]

Photo-like 1024x768 JPEGs (smooth blobs with a grain of noise, as photos have), 10 classes (or
one per line of --labels-file, e.g. rfclip_engine/data/classes/ade20k.txt's 150), ViT-B/16 with
random weights saved as a checkpoint (time does not depend on them). Each round times,
interleaved:
- the engine alone on 2 x IMAGES images: each group read, their logits (`Segmenter.logits_many`)
  and labels at full size (`Segmenter.decide`), nothing written: what the command cannot do
  without. Its segmenter is built once and warmed up by the first round, as a long run's is;
- the command, `rfclip segment FOLDER --out OUT --checkpoint ...` in this process, once on those
  2 x IMAGES images and once on the first IMAGES of them. The difference of the two is what
  IMAGES more images cost a running command: its start (loading the model and, on a GPU, checking
  the kernels and recording the graphs, which a short folder would be all about) cancels in it.
  Its text embeddings come from its own cache, as a user's second run's do: the first round,
  which warms up, fills it. One more run of the short folder with --no-text-cache, after the
  rounds, gives the start of a first run, whose text is embedded afresh.
The ratio of the command's time per image to the engine's is what its reading and writing cost
on top of the model; the host's own work per image is their difference. The start is the short
run's time less its images.
"""
from __future__ import annotations

import io
import json
import shutil
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
from rfclip_engine import Segmenter, load_model  # noqa: E402
from rfclip_engine.cli import build_parser, images_per_group, read_vocabulary, segmenter_config  # noqa: E402
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
    parser.add_argument("--images", type=int, default=16, help="the short run's images; the long one has twice as many")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", help="the command's --precision (bf16: a CPU with AMX)")
    parser.add_argument("--labels-file", help="one class per line (default: 10 classes)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="rfclip-bench-segment-"))
    folders = {"all": work / "all", "half": work / "half"}
    for folder in folders.values():
        folder.mkdir()
    for i in range(2 * args.images):
        jpeg = photo(i)
        for name in ("all", "half") if i < args.images else ("all",):
            (folders[name] / f"{i:04d}.jpg").write_bytes(jpeg)
    torch.manual_seed(0)
    checkpoint = work / "ViT-B-16.pt"
    torch.save(load_model("ViT-B-16", pretrained=None).clip.state_dict(), checkpoint)

    labels = ["--labels-file", args.labels_file] if args.labels_file else ["--labels", ",".join(LABELS)]

    def command(folder: Path, out: Path, text_cache: bool = True) -> list:
        return ["segment", str(folder), "--out", str(out), *labels, "--checkpoint", str(checkpoint),
                "--weights-tag", "openai", "--device", args.device, "--precision", args.precision, "--quiet",
                *(["--text-cache", str(work / "text")] if text_cache else ["--no-text-cache"])]

    # the command's own config and groups, from its own parser: both sides segment alike
    parsed = build_parser().parse_args(command(folders["all"], work / "unused"))
    config = segmenter_config(parsed, device)
    group = images_per_group(parsed, config)
    files = sorted(folders["all"].iterdir())
    vocabulary = read_vocabulary(parsed)
    segmenter = Segmenter(load_model("ViT-B-16", pretrained=str(checkpoint), device=device, weights_tag="openai"),
                          config)

    def engine() -> float:
        synchronize(device)
        started = time.perf_counter()
        for start in range(0, len(files), group):
            rgbs = [load_rgb(path) for path in files[start:start + group]]
            for rgb, logits in zip(rgbs, segmenter.logits_many(rgbs, vocabulary)):
                segmenter.decide(logits, vocabulary.names, rgb.shape[:2]).label_map.numpy()
        synchronize(device)
        return time.perf_counter() - started

    def segment(name: str, n: int, text_cache: bool = True) -> float:
        out = work / f"out-{name}-{n}"
        started = time.perf_counter()
        assert rfclip(command(folders[name], out, text_cache)) == 0
        seconds = time.perf_counter() - started
        written = sorted(p.name for p in out.iterdir() if p.suffix in (".png", ".jpg"))
        images = len(list(folders[name].iterdir()))
        assert len(written) == 2 * images, written  # labels and overlay per image
        shutil.rmtree(out)
        return seconds

    rounds = []
    for n in range(args.rounds + 1):  # the first round warms up (and checks the kernels on a GPU)
        engine_s = engine()
        order = ("all", "half") if n % 2 else ("half", "all")  # alternating: a drift does not favour one
        command_s = {name: segment(name, n) for name in order}
        per_image = (command_s["all"] - command_s["half"]) / args.images
        if n:
            rounds.append({"engine_s_per_image": engine_s / len(files), "command_s_per_image": per_image,
                           "start_s": command_s["half"] - args.images * per_image, **{
                               f"command_s_{name}": seconds for name, seconds in command_s.items()}})
        print(f"round {n}: engine {engine_s:.2f} s for {len(files)} images; command {command_s['all']:.2f} s for "
              f"{len(files)}, {command_s['half']:.2f} s for {args.images}", file=sys.stderr)

    engine_s = statistics.median(r["engine_s_per_image"] for r in rounds)
    command_s = statistics.median(r["command_s_per_image"] for r in rounds)
    ratio = statistics.median(r["command_s_per_image"] / r["engine_s_per_image"] for r in rounds)
    host_ms = statistics.median((r["command_s_per_image"] - r["engine_s_per_image"]) * 1e3 for r in rounds)
    start_s = statistics.median(r["start_s"] for r in rounds)
    cold_start_s = segment("half", args.rounds + 1, text_cache=False) - args.images * command_s
    print(markdown_table(
        ["images", "classes", "engine images/s", "command images/s", "command / engine time, paired median",
         "host work per image, ms", "command's start, s: text cached / embedded afresh"],
        [[f"{args.images} more", len(vocabulary), f"{1 / engine_s:.2f}", f"{1 / command_s:.2f}", f"{ratio:.3f}x",
          f"{host_ms:.0f}", f"{start_s:.2f} / {cold_start_s:.2f}"]]))
    Path(args.json).write_text(json.dumps({"machine": machine(), "device": str(device), "images": args.images,
                                           "classes": len(vocabulary), "group": group, "rounds": rounds,
                                           "ratio": ratio, "host_ms_per_image": host_ms, "start_s": start_s,
                                           "cold_start_s": cold_start_s}, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
