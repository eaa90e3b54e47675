"""Listing a mostly predicted project, as a resumed `preannotate` does: light against full.

    LABEL_STUDIO_BIN=.lsvenv-ci/bin/label-studio python benchmarks/bench_listing.py [--tasks 2000]

A real Label Studio (headless, loopback) holds a project of `--tasks` tasks, `--predicted` of
them with one brush prediction each: a 1024x768 label map of a few discs, as `backend.regions`
writes it (three regions), which is the size of a plain photo's prediction, far below the
random-weight model's noise masks of bench_jobs. Each round lists the whole project both ways,
in alternating order: the full listing (`fields=all`, every prediction's result) that the
selection used before, and the light one it uses now (the model-versions column alone). Both
must find the same unpredicted tasks. Prints tasks/s, bytes per task and their ratios (median of
the rounds); writes a JSON file beside the table.
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
from backend.jobs.studio import Studio  # noqa: E402
from backend.regions import brush_region  # noqa: E402
from benchmarks.bench_backend import label_config  # noqa: E402
from benchmarks.common import arguments, label_studio_binary, machine, markdown_table  # noqa: E402
from tests.fakes import free_port  # noqa: E402
from tests.label_studio import start_label_studio, stop, wait_for  # noqa: E402

TOKEN = "bench0123456789abcdef0123456789abcdef012"
VERSION = "rfclip-bench-listing"


def photo_prediction() -> list:
    """Three brush regions of a 1024x768 label map: two discs on a background."""
    yy, xx = np.mgrid[:768, :1024]
    labels = np.zeros((768, 1024), np.uint8)
    labels[(yy - 300) ** 2 + (xx - 350) ** 2 < 180 ** 2] = 1
    labels[(yy - 500) ** 2 + (xx - 750) ** 2 < 140 ** 2] = 2
    return [brush_region(labels == k, name, "tag", "image", 0.8) for k, name in enumerate(("sky", "person", "dog"))]


class Listed:
    """Bytes of the task pages, counted as they arrive (the SDK's client is httpx)."""

    def __init__(self, studio: Studio) -> None:
        self.bytes = 0
        studio.client._client_wrapper.httpx_client.httpx_client.event_hooks["response"].append(self._count)

    def _count(self, response) -> None:
        response.read()
        self.bytes += len(response.content)


def list_once(studio: Studio, listed: Listed, project: int, full: bool) -> dict:
    before = listed.bytes
    started = time.perf_counter()
    todo = sorted(t.id for t in studio.tasks(project, full=full) if VERSION not in t.model_versions)
    return {"seconds": time.perf_counter() - started, "bytes": listed.bytes - before, "todo": todo}


def main() -> int:
    parser = arguments(__file__, __doc__)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--predicted", type=int, default=1800)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    binary = label_studio_binary()
    if not binary:
        return 2
    with tempfile.TemporaryDirectory() as root:
        url = f"http://127.0.0.1:{free_port()}"
        process, log = start_label_studio(binary, Path(root), int(url.rsplit(":", 1)[1]), TOKEN)
        try:
            wait_for(f"{url}/health", 240, process, log)
            headers = {"Authorization": f"Token {TOKEN}"}
            project = requests.post(f"{url}/api/projects", headers=headers, timeout=60,
                                    json={"title": "listing", "label_config": label_config(False)}).json()["id"]
            requests.post(f"{url}/api/projects/{project}/import", headers=headers, timeout=600,
                          json=[{"image": f"http://images.example/{i}.jpg"} for i in range(args.tasks)]).raise_for_status()
            studio = Studio(url, TOKEN)
            ids = sorted(t.id for t in studio.tasks(project))
            result = photo_prediction()
            for start in range(0, args.predicted, 100):
                studio.push(project, [{"task": t, "result": result, "score": 0.8, "model_version": VERSION}
                                      for t in ids[start:min(start + 100, args.predicted)]])
            listed = Listed(studio)
            rounds = []
            for n in range(args.rounds):
                order = (True, False) if n % 2 == 0 else (False, True)
                rounds.append({("full" if full else "light"): list_once(studio, listed, project, full) for full in order})
                if rounds[-1]["full"]["todo"] != rounds[-1]["light"]["todo"]:
                    raise RuntimeError("the light listing found other unpredicted tasks than the full one")
        finally:
            stop(process)

    def median(kind: str, key: str) -> float:
        return statistics.median(r[kind][key] for r in rounds)

    rows = [[kind, f"{args.tasks / median(kind, 'seconds'):.0f}", f"{median(kind, 'bytes') / args.tasks / 1024:.1f}"]
            for kind in ("full", "light")]
    size = len(json.dumps(result, separators=(",", ":")))  # as Label Studio sends it
    speed = statistics.median(r["full"]["seconds"] / r["light"]["seconds"] for r in rounds)
    print(markdown_table(["listing", "tasks/s", "KiB per task"], rows))
    print(f"\nlight / full: {speed:.1f}x the tasks per second, {median('light', 'bytes') / median('full', 'bytes'):.3f}x "
          f"the bytes; {args.predicted} of {args.tasks} tasks predicted, one prediction of "
          f"{size / 1024:.0f} KiB each; median of {args.rounds} rounds")
    out = {"machine": machine(), "tasks": args.tasks, "predicted": args.predicted, "prediction_bytes": size,
           "rounds": [{kind: {k: v for k, v in r[kind].items() if k != "todo"} for kind in r} for r in rounds],
           "light_speedup": speed, "unpredicted": len(rounds[-1]["light"]["todo"])}
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
