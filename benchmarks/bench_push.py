"""One chunk's bulk push into projects of growing size: Label Studio's default against its flag.

    LABEL_STUDIO_BIN=.lsvenv-ci/bin/label-studio python benchmarks/bench_push.py [--sizes 1000 5000 20000]

A chunk stores its predictions with one `projects.import_predictions` request. Label Studio 1.23.2
(Community) then recounts the predictions and annotations of every task of the project that has
any (its legacy import path), so one push costs more the more of the project is predicted: at a
million tasks that is every push. Its feature flag
`fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short`, set to true in Label
Studio's environment, recounts only the pushed tasks. For each size, a project whose tasks all
hold a prediction but 96 gets 3 pushes of 32 small predictions (median), first from a Label
Studio with its defaults, then from one with the flag set; prints seconds per push and their
ratio; writes a JSON file.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend.jobs.studio import IMPORT_FLAG, Studio  # noqa: E402
from backend.regions import brush_region  # noqa: E402
from benchmarks.bench_backend import label_config  # noqa: E402
from benchmarks.common import arguments, label_studio_binary, machine, markdown_table  # noqa: E402
from tests.fakes import free_port  # noqa: E402
from tests.label_studio import start_label_studio, stop, wait_for  # noqa: E402

TOKEN = "bench0123456789abcdef0123456789abcdef012"
LEFT = 96  # tasks left unpredicted: 3 pushes of 32


def pushes(binary: str, root: Path, sizes: list, flag: bool) -> dict:
    """Seconds of each timed push, per project size, from one Label Studio."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process, log = start_label_studio(binary, root, port, TOKEN, settings={IMPORT_FLAG: "true"} if flag else None)
    mask = np.zeros((64, 64), bool)
    mask[8:40, 16:48] = True
    result = [brush_region(mask, "person", "tag", "image", 0.9)]
    out = {}
    try:
        wait_for(f"{url}/health", 240, process, log)
        headers = {"Authorization": f"Token {TOKEN}"}
        studio = Studio(url, TOKEN, timeout_s=600)
        for size in sizes:
            project = requests.post(f"{url}/api/projects", headers=headers, timeout=60,
                                    json={"title": f"push {size}", "label_config": label_config(False)}).json()["id"]
            requests.post(f"{url}/api/projects/{project}/import", headers=headers, timeout=600,
                          json=[{"image": f"http://images.example/{i}.jpg"} for i in range(size)]).raise_for_status()
            ids = sorted(t.id for t in studio.tasks(project))
            studio.push(project, [{"task": t, "result": result, "score": 0.9, "model_version": "before"}
                                  for t in ids[:-LEFT]])
            seconds = []
            for start in range(len(ids) - LEFT, len(ids), 32):
                began = time.perf_counter()
                studio.push(project, [{"task": t, "result": result, "score": 0.9, "model_version": "now"}
                                      for t in ids[start:start + 32]])
                seconds.append(time.perf_counter() - began)
            out[size] = seconds
            print(f"{'flag' if flag else 'default'}: {size} tasks, pushes of 32 took "
                  + ", ".join(f"{s:.2f}" for s in seconds) + " s", flush=True)
    finally:
        stop(process)
    return out


def main() -> int:
    parser = arguments(__file__, __doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    args = parser.parse_args()
    binary = label_studio_binary()
    if not binary:
        return 2
    with tempfile.TemporaryDirectory() as default_root, tempfile.TemporaryDirectory() as flag_root:
        default = pushes(binary, Path(default_root), args.sizes, flag=False)
        flagged = pushes(binary, Path(flag_root), args.sizes, flag=True)
    rows = []
    for size in args.sizes:
        before, after = statistics.median(default[size]), statistics.median(flagged[size])
        rows.append([size, f"{before:.2f}", f"{after:.2f}", f"{before / after:.1f}x"])
    print(markdown_table(["project tasks (all but 96 predicted)", "default s / push of 32", "with the flag",
                          "default / flag"], rows))
    Path(args.json).write_text(json.dumps({"machine": machine(), "flag": IMPORT_FLAG, "default": default,
                                           "flag_set": flagged}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
