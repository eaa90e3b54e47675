"""Queued pre-annotation against the model's own time: what the job machinery costs per task.

    LABEL_STUDIO_BIN=.lsvenv-ci/bin/label-studio python benchmarks/bench_jobs.py [--tasks 64] [--chunk 32]

A real Label Studio (headless, loopback), a real Redis and real `rfclip-backend worker`
processes (ViT-B-16 with random weights: time does not depend on them) pre-annotate a project of
1024x768 JPEGs served over HTTP, with 1 and then 2 workers. The job overhead is 1 - the
segmenter's time (text embeddings, model, PAMR and labels at full size: what
`Segmenter.predict_many` does, timed by the workers inside their chunks) / the run's wall time
from enqueueing to the last chunk done, per worker: listing, fetching and decoding, regions and
RLE, pushing, the queue (issue 10's list). Until 2026-12-03 labels at full size counted as
overhead too; the table prints both. The engine's own images/s (the same segmentation: logits,
then labels at each image's full size) on the same decoded images, in batches of the backend's
size, alone in this process, is measured before and after the runs (the VM drifts) and the ratio
is taken to their mean. Also measured: the size of one stored prediction and the time of one
bulk push, the inputs of the scaling estimate in RESULTS.md, for the model's prediction and for a
photo-like one (the smooth masks of real weights). With `--label-studio-core`, Label Studio gets
the last core to itself (`taskset`) and one worker and the engine share the others, as when Label
Studio runs on another machine; set RFCLIP_PUSH_PART to push a chunk in parts, each while the
next part is predicted. Label Studio runs with its import flag set (README, "big projects"),
since 2026-12-03.
Writes a JSON file beside the table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Sequence, Tuple

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend.jobs.preannotate import enqueue  # noqa: E402
from backend.jobs.queue import JobQueue, RunTracker  # noqa: E402
from backend.jobs.studio import IMPORT_FLAG, Studio  # noqa: E402
from backend.media import Credentials  # noqa: E402
from backend.runtime import build_runtime, load_segmenter  # noqa: E402
from backend.settings import Settings  # noqa: E402
from benchmarks.bench_backend import LABELS, MODEL_STAGES, jpeg, label_config  # noqa: E402
from benchmarks.bench_listing import photo_prediction  # noqa: E402
from benchmarks.common import arguments, label_studio_binary, machine, markdown_table  # noqa: E402
from rfclip_engine import load_model  # noqa: E402
from rfclip_engine.config import images_per_batch  # noqa: E402
from rfclip_engine.presets import find_preset  # noqa: E402
from rfclip_engine.text import Vocabulary  # noqa: E402
from tests.fakes import FakeLabelStudio, RedisServer, free_port  # noqa: E402
from tests.label_studio import clean_environment, start_label_studio, stop, wait_for  # noqa: E402

# the segmenter's stages inside a chunk: what the engine alone does too
SEGMENTER_STAGES = (*MODEL_STAGES, "labels at full size")
TOKEN = "bench0123456789abcdef0123456789abcdef012"
REPO = Path(__file__).resolve().parents[1]


class Stack:
    """Label Studio, Redis, the image host, and workers started on demand."""

    def __init__(self, binary: str, root: Path, env: dict, ls_prefix: Sequence[str] = (),
                 worker_prefix: Sequence[str] = ()) -> None:
        self.root, self.env, self.worker_prefix = root, env, list(worker_prefix)
        self.media = FakeLabelStudio(token="unused")
        self.redis = RedisServer()
        self.redis.start()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # with its import flag, as README recommends: one push then costs the same in a big project
        self.ls, log = start_label_studio(binary, root, port, TOKEN, ls_prefix, {IMPORT_FLAG: "true"})
        wait_for(f"{self.url}/health", 240, self.ls, log)
        self.env.update({"REDIS_URL": self.redis.url, "LABEL_STUDIO_URL": self.url, "LABEL_STUDIO_API_KEY": TOKEN})
        self.settings = Settings.from_env(self.env)
        self.studio = Studio(self.url, TOKEN)
        self.queue = JobQueue.from_url(self.redis.url)
        self.service = build_runtime(self.settings).service  # enqueues; never loads the model here
        self.projects = 0
        self.last_project = 0

    def api(self, method: str, path: str, **kwargs):
        response = requests.request(method, self.url + path, headers={"Authorization": f"Token {TOKEN}"},
                                    timeout=120, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    def project(self, count: int) -> int:
        self.projects += 1
        pid = self.api("POST", "/api/projects", json={"title": f"bench {self.projects}",
                                                      "label_config": label_config(False)})["id"]
        self.api("POST", f"/api/projects/{pid}/import",
                 json=[{"image": f"{self.media.url}/img/{i}.jpg"} for i in range(count)])
        return pid

    def worker(self, threads: int) -> subprocess.Popen:
        """One worker process, started (not waited for)."""
        name = time.time_ns()
        env = {**self.env, "RFCLIP_CACHE_DIR": str(self.root / f"cache-{name}"), "OMP_NUM_THREADS": str(threads),
               "LOG_LEVEL": "INFO"}
        return subprocess.Popen([*self.worker_prefix, sys.executable, "-m", "backend.cli", "worker"], env=env,
                                stdout=(self.root / f"worker-{name}.log").open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=REPO)

    def workers(self, count: int, threads: int) -> list:
        processes = [self.worker(threads) for _ in range(count)]
        deadline = time.monotonic() + 120
        while self.queue.workers() < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers did not register; see {self.root}")
            time.sleep(0.5)
        return processes

    def run(self, count: int, chunk: int) -> Tuple[float, Dict[str, float]]:
        """Seconds from enqueueing a fresh project of `count` tasks to its last chunk done, and
        the workers' seconds per task in each stage of a chunk."""
        pid = self.last_project = self.project(count)
        started = time.perf_counter()
        _, enqueued = enqueue(self.service, self.studio, self.queue, pid, chunk=chunk, progress=False,
                              set_version=False)
        tracker = RunTracker(self.queue, pid, self.service.model_version, enqueued.ids)
        while not (status := tracker.poll()).finished:
            time.sleep(0.2)
        seconds = time.perf_counter() - started
        if status.tasks["predicted"] != count:
            raise RuntimeError(f"only {status.tasks['predicted']} of {count} tasks predicted: {status}")
        stages: Dict[str, float] = {}
        for outcome in tracker.done.values():
            for stage, spent in outcome["stage_seconds"].items():
                stages[stage] = stages.get(stage, 0.0) + spent / count
        return seconds, stages

    def close(self) -> None:
        stop(self.ls)
        self.redis.stop()
        self.media.close()


def engine_images_per_s(settings: Settings, stack: Stack, count: int) -> float:
    """The Segmenter alone on the images the workers see (fetched and decoded the same way)."""
    runtime = build_runtime(settings)
    segmenter = load_segmenter(settings, runtime.text_cache)
    fetcher = runtime.service.fetcher
    images = [fetcher.fetch(f"{stack.media.url}/img/{i}.jpg", i, Credentials(None, None)) for i in range(count)]
    vocabulary = Vocabulary(tuple((label,) for label in LABELS))
    per_batch = images_per_batch(segmenter.config.batch_size)  # the groups the workers' pipeline makes
    segmenter.logits_many([images[0].rgb], vocabulary)  # text embeddings and first-call costs
    started = time.perf_counter()
    for start in range(0, count, per_batch):
        batch = images[start:start + per_batch]
        for logits, image in zip(segmenter.logits_many([image.rgb for image in batch], vocabulary), batch):
            segmenter.decide(logits, vocabulary.names, image.size)  # as the pipeline: labels at full size
    return count / (time.perf_counter() - started)


def overhead_share(stages: Dict[str, float], counted: Sequence[str], tasks_per_worker: float,
                   seconds: float) -> float:
    """The share of a worker's wall time outside the `counted` stages (seconds per task each)."""
    return 1 - sum(stages.get(f"predict: {stage}", 0.0) for stage in counted) * tasks_per_worker / seconds


def push_cost(stack: Stack, chunk: int) -> dict:
    """The bytes of one stored prediction and the time of one bulk push of `chunk` of them, for the
    model's (random weights: noise masks) and for a photo-like one (bench_listing's few discs, the
    size real weights give a plain photo)."""
    predicted = stack.api("GET", f"/api/tasks?project={stack.last_project}&page_size=1")["tasks"][0]
    source = stack.api("GET", f"/api/predictions?task={predicted['id']}")[0]
    out = {"chunk": chunk}
    for kind, result in (("model", source["result"]), ("photo-like", photo_prediction())):
        pid = stack.project(chunk)
        ids = [t["id"] for t in stack.api("GET", f"/api/tasks?project={pid}&page_size=1000")["tasks"]]
        body = [{"task": t, "result": result, "score": 0.5, "model_version": "bench"} for t in ids]
        started = time.perf_counter()
        stack.studio.push(pid, body)
        out[kind] = {"prediction_bytes": len(json.dumps(result)), "push_s": time.perf_counter() - started}
    return out


def main() -> int:
    parser = arguments(__file__, __doc__)
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=32, help="as preannotate's default")
    parser.add_argument("--label-studio-core", action="store_true",
                        help="Label Studio on the last core alone, one worker and the engine on the others: as if "
                             "Label Studio ran on another machine")
    args = parser.parse_args()
    binary = label_studio_binary()
    if not binary:
        return 2

    root = Path(tempfile.mkdtemp(prefix="rfclip-bench-jobs-"))
    torch.manual_seed(0)
    checkpoint = root / "vit-b-16-random.pt"
    torch.save(load_model("ViT-B-16", pretrained=None).clip.state_dict(), checkpoint)
    dims = ",".join(str(d) for d in find_preset("ViT-B-16", "openai").dims)
    env = {**clean_environment(), "RFCLIP_MODEL": "ViT-B-16", "RFCLIP_PRETRAINED": str(checkpoint),
           "RFCLIP_WEIGHTS_TAG": "openai", "RFCLIP_DISTRACTION_DIMS": dims, "RFCLIP_ALLOW_PRIVATE_URLS": "true",
           "RFCLIP_CACHE_DIR": str(root / "cache-bench")}
    cores = os.cpu_count() or 1
    ls_prefix, worker_prefix, runs = (), (), (1, 2)
    if args.label_studio_core:
        if cores < 2:
            print("--label-studio-core needs 2 cores or more", file=sys.stderr)
            return 2
        model_cores = set(range(cores - 1))
        ls_prefix = ("taskset", "-c", str(cores - 1))
        worker_prefix = ("taskset", "-c", ",".join(map(str, sorted(model_cores))))
        os.sched_setaffinity(0, model_cores)  # the engine alone runs here, on the same cores
        torch.set_num_threads(len(model_cores))
        cores, runs = len(model_cores), (1,)
    stack = Stack(binary, root, env, ls_prefix, worker_prefix)
    try:
        for i in range(args.tasks):
            stack.media.public[f"{i}.jpg"] = jpeg(i)
        before = engine_images_per_s(stack.settings, stack, args.tasks)
        results = {}
        for workers in runs:
            processes = stack.workers(workers, max(1, cores // workers))
            try:
                stack.run(2 * workers, 2)  # every worker: model loaded, text embeddings cached in Redis
                seconds, stages = stack.run(args.tasks, args.chunk)
            finally:
                for process in processes:
                    stop(process)
            results[workers] = (seconds, stages)
        # the engine again after the runs: this shared VM drifts by 10 % within minutes, so the
        # ratio is taken to the mean of both and the two are kept beside it
        after = engine_images_per_s(stack.settings, stack, args.tasks)
        engine = (before + after) / 2
        rows, report = [], {"machine": machine(), "tasks": args.tasks, "chunk": args.chunk,
                            "label_studio_core": args.label_studio_core, "engine_images_per_s": engine,
                            "engine_images_per_s_before_and_after": [before, after], "runs": {}}
        for workers, (seconds, stages) in results.items():
            rate = args.tasks / seconds
            overhead = overhead_share(stages, SEGMENTER_STAGES, args.tasks / workers, seconds)
            with_labels = overhead_share(stages, MODEL_STAGES, args.tasks / workers, seconds)
            report["runs"][workers] = {"seconds": seconds, "tasks_per_s": rate, "worker_s_per_task": stages,
                                       "overhead_share": overhead, "overhead_share_with_labels": with_labels}
            rows.append([workers, max(1, cores // workers), f"{seconds:.1f}", f"{rate:.3f}",
                         f"{100 * overhead:.1f} % ({100 * with_labels:.1f} %)", f"{before:.3f} / {after:.3f}",
                         f"{rate / engine:.2f}"])
        report["push"] = push_cost(stack, 32)
    finally:
        stack.close()
    print(f"\nqueued pre-annotation, {args.tasks} tasks of 1024x768, {len(LABELS)} classes, chunks of {args.chunk}, "
          f"ViT-B-16 (random weights), {cores} cores for the model"
          f"{', Label Studio on a core of its own' if args.label_studio_core else ', Label Studio on the same cores'}")
    print(markdown_table(["workers", "threads each", "s", "tasks/s", "job overhead (labels at full size counted too)",
                          "engine images/s alone, before / after", "tasks/s / engine (their mean)"], rows))
    for workers, run in report["runs"].items():
        print(f"\n{workers} worker(s): worker seconds per task by stage")
        print(markdown_table(["stage", "s / task"], [[k, f"{v:.3f}"] for k, v in run["worker_s_per_task"].items()]))
    push = report["push"]
    for kind in ("model", "photo-like"):
        print(f"\none {kind} prediction: {push[kind]['prediction_bytes'] / 1024:.1f} KiB of JSON; one bulk push of "
              f"{push['chunk']}: {push[kind]['push_s'] * 1e3:.0f} ms")
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
