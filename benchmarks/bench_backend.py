"""`/predict` of the real backend over HTTP, with the non-model overhead made visible.

    python benchmarks/bench_backend.py [--model ViT-B-16] [--pamr] [--polygons] [--tasks 1 8 32]

A local HTTP server serves 1024x768 JPEGs; the backend (the real Flask app on a loopback port,
ViT-B-16 with random weights: time does not depend on them) predicts 10 classes. For each request
size: tasks/s end to end. Then the stages of one task, timed alone with the same code: fetch +
decode, model, PAMR, RLE or polygon encoding, JSON; and the overhead share = 1 - model time /
end-to-end time per task. Writes a JSON file beside the table.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image
from werkzeug.serving import make_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend.app import create_app  # noqa: E402
from backend.label_config import parse_label_config  # noqa: E402
from backend.media import Credentials, ImageFetcher  # noqa: E402
from backend.regions import brush_region, polygon_regions  # noqa: E402
from backend.settings import Settings  # noqa: E402
from benchmarks.common import machine, markdown_table  # noqa: E402
from rfclip_engine import RFCLIPConfig, Segmenter, SegmenterConfig, load_model  # noqa: E402
from rfclip_engine.pamr import refine  # noqa: E402
from rfclip_engine.presets import find_preset  # noqa: E402
from tests.fakes import FakeLabelStudio  # noqa: E402

LABELS = ["person", "car", "tree", "road", "building", "sky", "dog", "bicycle", "grass", "bus"]


def label_config(polygons: bool) -> str:
    tag = "PolygonLabels" if polygons else "BrushLabels"
    labels = "".join(f'<Label value="{label}"/>' for label in LABELS)
    return f'<View><Image name="image" value="$image"/><{tag} name="tag" toName="image">{labels}</{tag}></View>'


def jpeg(seed: int) -> bytes:
    """A photo-like 1024x768 image: smooth blobs, so masks have realistic run structure."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((1024, 768), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pamr", action="store_true")
    parser.add_argument("--polygons", action="store_true")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--json", default=str(Path(__file__).with_name("bench_backend.json")))
    args = parser.parse_args()

    torch.manual_seed(0)
    preset = find_preset(args.model, "openai")
    model = load_model(args.model, pretrained=None, distraction_dims=list(preset.dims))
    config = SegmenterConfig(encoder=RFCLIPConfig(), pamr=args.pamr)
    media = FakeLabelStudio(token="unused")
    for i in range(max(args.tasks)):
        media.public[f"{i}.jpg"] = jpeg(i)
    cache = Path(tempfile.mkdtemp(prefix="rfclip-bench-"))
    settings = Settings(cache_dir=cache, pamr=args.pamr, predict_budget_s=95)
    app = create_app(settings, segmenter_loader=lambda s, text_cache: Segmenter(model, config, text_cache=text_cache))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    config_xml = label_config(args.polygons)

    def predict(n: int, offset: int = 0) -> float:
        tasks = [{"id": i, "data": {"image": f"{media.url}/img/{(offset + i) % max(args.tasks)}.jpg"}}
                 for i in range(n)]
        started = time.perf_counter()
        response = requests.post(f"{url}/predict", json={"tasks": tasks, "label_config": config_xml}, timeout=300)
        elapsed = time.perf_counter() - started
        results = response.json()["results"]
        assert len(results) == n and all(isinstance(r, dict) and r["result"] for r in results), "a task failed"
        return elapsed

    predict(1)  # warm-up: model, text embeddings, image cache of image 0
    end_to_end = {}
    for n in args.tasks:
        seconds = predict(n)
        end_to_end[n] = {"seconds": seconds, "tasks_per_s": n / seconds, "seconds_per_task": seconds / n}

    # the stages of one task, timed alone with the same code the backend runs
    fetcher = ImageFetcher(Path(tempfile.mkdtemp(prefix="rfclip-bench-fetch-")), None, 64 << 20, 20, 50_000_000)
    segmenter = Segmenter(model, SegmenterConfig(encoder=RFCLIPConfig()))
    (target,) = parse_label_config(config_xml)
    stages = {name: [] for name in ("fetch + decode", "model", "PAMR", "labels at full size",
                                    "regions (RLE/polygons)", "JSON")}
    for i in range(3):
        started = time.perf_counter()
        rgb = fetcher.fetch(f"{media.url}/img/{i}.jpg", i, Credentials(None, None))
        stages["fetch + decode"].append(time.perf_counter() - started)
        started = time.perf_counter()
        (logits,) = segmenter.logits_many([rgb], target.vocabulary)
        stages["model"].append(time.perf_counter() - started)
        if args.pamr:  # at the working resolution, as the segmenter runs it
            pixels = segmenter.resize(segmenter.normalize(rgb))[None]
            started = time.perf_counter()
            refine(pixels, logits[None], 10, (8, 16))
            stages["PAMR"].append(time.perf_counter() - started)
        started = time.perf_counter()
        prediction = segmenter.decide(logits, target.vocabulary.names, rgb.shape[:2])
        stages["labels at full size"].append(time.perf_counter() - started)
        started = time.perf_counter()
        label_map = prediction.label_map.numpy()
        regions = []
        for c, label in enumerate(target.labels):
            mask = label_map == c
            if mask.any():
                make = polygon_regions if args.polygons else (lambda *a: [brush_region(*a)])
                regions.extend(make(mask, label, "tag", "image", 0.5))
        stages["regions (RLE/polygons)"].append(time.perf_counter() - started)
        started = time.perf_counter()
        json.dumps({"results": [{"result": regions, "score": 0.5, "model_version": "x"}]})
        stages["JSON"].append(time.perf_counter() - started)
    stage_ms = {name: statistics.median(t) * 1e3 if t else 0.0 for name, t in stages.items()}
    model_ms = stage_ms["model"] + stage_ms["PAMR"]

    print(f"\n/predict, 1024x768 images, {len(LABELS)} classes, {'polygons' if args.polygons else 'brush'}"
          f"{', PAMR' if args.pamr else ''}, {args.model} on {model.device}")
    rows = []
    for n, r in end_to_end.items():
        overhead = 1 - (model_ms / 1e3) / r["seconds_per_task"]
        r["overhead_share"] = overhead
        rows.append([n, f"{r['seconds']:.2f}", f"{r['tasks_per_s']:.2f}", f"{r['seconds_per_task'] * 1e3:.0f}",
                     f"{100 * overhead:.1f} %"])
    print(markdown_table(["tasks", "s / request", "tasks/s", "ms / task", "non-model share"], rows))
    print("\nstages of one task (median of 3, ms)")
    print(markdown_table(["stage", "ms"], [[k, f"{v:.1f}"] for k, v in stage_ms.items()]))
    report = {"machine": machine(), "model": args.model, "pamr": args.pamr, "polygons": args.polygons,
              "end_to_end": end_to_end, "stages_ms": stage_ms}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    server.shutdown()
    media.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
