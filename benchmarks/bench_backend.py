"""`/predict` of the real backend over HTTP, with the non-model overhead made visible.

    python benchmarks/bench_backend.py [--model ViT-B-16] [--pamr] [--polygons] [--tasks 1 8 32]
        [--precision fp32|bf16]

A local HTTP server serves 1024x768 JPEGs; the backend (the real Flask app on a loopback port,
ViT-B-16 with random weights: time does not depend on them) predicts 10 classes. For each request
size: tasks/s end to end, and the overhead share = 1 - the model's time in that request / the
request's time, where the backend itself times its stages (waiting for images, text embeddings,
model, PAMR, labels at full size, RLE or polygon encoding, validation; logged with each request)
and HTTP + JSON is the rest. The model's time is text embeddings + model + PAMR. Writes a JSON
file beside the table.
"""
from __future__ import annotations

import io
import json
import logging
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
from backend.media import Credentials, ImageFetcher  # noqa: E402
from backend.runtime import destination_policy  # noqa: E402
from backend.settings import Settings  # noqa: E402
from benchmarks.common import arguments, machine, markdown_table  # noqa: E402
from rfclip_engine import RFCLIPConfig, Segmenter, SegmenterConfig, load_model  # noqa: E402
from rfclip_engine.config import PRECISIONS  # noqa: E402
from rfclip_engine.presets import find_preset  # noqa: E402
from tests.fakes import FakeLabelStudio  # noqa: E402

LABELS = ["person", "car", "tree", "road", "building", "sky", "dog", "bicycle", "grass", "bus"]
MODEL_STAGES = ("text embeddings", "model", "PAMR")  # stage names the Segmenter times


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
    parser = arguments(__file__, __doc__)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pamr", action="store_true")
    parser.add_argument("--polygons", action="store_true")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16: a CPU with AMX")
    args = parser.parse_args()

    torch.manual_seed(0)
    preset = find_preset(args.model, "openai")
    model = load_model(args.model, pretrained=None, distraction_dims=list(preset.dims))
    config = SegmenterConfig(encoder=RFCLIPConfig(), pamr=args.pamr, precision=args.precision)
    media = FakeLabelStudio(token="unused")
    for i in range(max(args.tasks)):
        media.public[f"{i}.jpg"] = jpeg(i)
    cache = Path(tempfile.mkdtemp(prefix="rfclip-bench-"))
    # the images are served on loopback, which the backend refuses unless the operator allows it
    settings = Settings(cache_dir=cache, pamr=args.pamr, predict_budget_s=95, allow_private_urls=True)
    app = create_app(settings, segmenter_loader=lambda s, text_cache: Segmenter(model, config, text_cache=text_cache))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    config_xml = label_config(args.polygons)

    timings: list = []  # the backend's own log record of each request: its stage times

    class StageTimes(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if hasattr(record, "stage_seconds"):
                timings.append((record.seconds, record.stage_seconds))

    backend_log = logging.getLogger("rfclip.backend")
    backend_log.setLevel(logging.INFO)
    backend_log.addHandler(StageTimes())

    def predict(n: int) -> float:
        tasks = [{"id": i, "data": {"image": f"{media.url}/img/{i % max(args.tasks)}.jpg"}} for i in range(n)]
        started = time.perf_counter()
        response = requests.post(f"{url}/predict", json={"tasks": tasks, "label_config": config_xml}, timeout=300)
        elapsed = time.perf_counter() - started
        results = response.json()["results"]
        assert len(results) == n and all(isinstance(r, dict) and r["result"] for r in results), "a task failed"
        return elapsed

    predict(1)  # warm-up: model, text embeddings, image cache of image 0
    new_names_s = timings[-1][1].get("text embeddings", 0.0)
    end_to_end = {}
    for n in args.tasks:
        seconds = predict(n)
        server_seconds, stages = timings[-1]
        # the model's share is measured inside this very request, so machine noise cancels out
        stages = {**stages, "HTTP + JSON": seconds - server_seconds}
        end_to_end[n] = {"seconds": seconds, "tasks_per_s": n / seconds, "seconds_per_task": seconds / n,
                         "overhead_share": 1 - sum(stages.get(s, 0.0) for s in MODEL_STAGES) / seconds,
                         "stage_ms_per_task": {k: 1e3 * v / n for k, v in stages.items()}}

    # fetching runs in background threads while the model works; here is its cost alone
    fetcher = ImageFetcher(Path(tempfile.mkdtemp(prefix="rfclip-bench-fetch-")), None, 64 << 20, 20, 50_000_000,
                           policy=destination_policy(settings))
    fetch_s = []
    for i in range(3):
        started = time.perf_counter()
        fetcher.fetch(f"{media.url}/img/{i}.jpg", i, Credentials(None, None))
        fetch_s.append(time.perf_counter() - started)
    fetch_ms = statistics.median(fetch_s) * 1e3

    print(f"\n/predict, 1024x768 images, {len(LABELS)} classes, {'polygons' if args.polygons else 'brush'}"
          f"{', PAMR' if args.pamr else ''}, {args.model} on {model.device}")
    print(markdown_table(["tasks", "s / request", "tasks/s", "ms / task", "non-model share"],
                         [[n, f"{r['seconds']:.2f}", f"{r['tasks_per_s']:.2f}", f"{r['seconds_per_task'] * 1e3:.0f}",
                           f"{100 * r['overhead_share']:.1f} %"] for n, r in end_to_end.items()]))
    largest = end_to_end[max(end_to_end)]["stage_ms_per_task"]
    print(f"\nstages inside the {max(end_to_end)}-task request (ms per task)")
    print(markdown_table(["stage", "ms / task"], [[k, f"{v:.1f}"] for k, v in largest.items()]))
    print(f"\nfetch + decode of one image, alone: {fetch_ms:.1f} ms (in a request it overlaps the model)")
    print(f"text embeddings of the {len(LABELS)} class names, new to the backend (first request): {new_names_s:.1f} s")
    report = {"machine": machine(), "model": args.model, "pamr": args.pamr, "polygons": args.polygons,
              "end_to_end": end_to_end, "fetch_decode_ms_alone": fetch_ms, "new_class_names_s": new_names_s}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    server.shutdown()
    media.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
