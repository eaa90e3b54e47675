"""Labels at full size (`Segmenter.decide`'s work, the backend's "labels at full size" stage):
the tiled label map with its per-class statistics, against the straightforward computation in the
same run (full-size softmax, then topk over the classes, then the statistics), paired rounds.

    python benchmarks/bench_labels.py [--classes 10] [--rounds 7] [--json benchmarks/bench_labels.json]

Logits are random at the working resolution of each image size (short side 336), so every pixel
is labeled; the time does not depend on their values.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import arguments, machine, markdown_table  # noqa: E402
from rfclip_engine.postprocess import label_map_tiled, probabilities  # noqa: E402

SIZES = [(768, 1024), (1080, 1920), (3000, 4000)]
SCALE = 40.0


def baseline(logits: torch.Tensor, size) -> tuple:
    probs = probabilities(logits, size, SCALE)
    best = probs.topk(2, dim=0)
    index = best.indices[0].flatten()
    top, margin = best.values[0].flatten(), (best.values[0] - best.values[1]).flatten()
    n = logits.shape[0]
    return (index.to(torch.int32), torch.bincount(index, minlength=n).double(),
            torch.bincount(index, weights=top.double(), minlength=n),
            torch.bincount(index, weights=margin.double(), minlength=n))


def seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = arguments(__file__, __doc__)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, raw = [], []
    for height, width in SIZES:
        short = 336 / min(height, width)
        coarse = (round(height * short), round(width * short))
        logits = torch.randn(args.classes, *coarse, generator=torch.Generator().manual_seed(0)) * 0.05
        labels = label_map_tiled(logits, (height, width), SCALE, 0.0, -1)
        expected = baseline(logits, (height, width))
        agree = (labels.label_map.flatten() == expected[0]).double().mean().item()
        pairs = [(seconds(lambda: baseline(logits, (height, width))),
                  seconds(lambda: label_map_tiled(logits, (height, width), SCALE, 0.0, -1)))
                 for _ in range(args.rounds)]
        base = statistics.median(b for b, _ in pairs)
        tiled = statistics.median(t for _, t in pairs)
        ratio = statistics.median(t / b for b, t in pairs)
        rows.append([f"{width}x{height}", f"{base * 1e3:.0f}", f"{tiled * 1e3:.0f}", f"{ratio:.2f}", f"{agree:.6f}"])
        raw.append({"size": [height, width], "classes": args.classes, "baseline_s": base, "tiled_s": tiled,
                    "ratio": ratio, "agreement": agree})
    print(markdown_table(["image", "softmax + topk ms", "decide ms", "decide / baseline", "same labels"], rows))
    Path(args.json).write_text(json.dumps({"machine": machine(), "runs": raw}, indent=2) + "\n")


if __name__ == "__main__":
    main()
