"""A 10,000-task project through the queue while workers and the command itself are killed.

    LABEL_STUDIO_BIN=.lsvenv-ci/bin/label-studio python benchmarks/bench_scale.py [--tasks 10000]

The "done when" of issue 10 at its own scale, on one machine: a real Label Studio, a real Redis and
real `rfclip-backend worker` processes pre-annotate a project of `--tasks` tasks. The model is the
tests' tiny random one on 64x64 images, so what is measured is the machinery (listing, queue,
locks, pushes, reconciles, reclaiming), not the model. `preannotate --queue --follow` is started,
SIGKILLed once it has enqueued part of the project, and started again to follow the run to its
end; meanwhile every `--kill-every` seconds one worker is SIGKILLed, whatever it is doing
(predicting, pushing, reconciling), and a fresh one is started. At the end Label Studio must hold
exactly one prediction of the model version for every task (read from its predictions API, not
through our listing), and the project's active model version must be that one. Prints the wall
time, tasks/s and the kills; writes a JSON file. Label Studio runs with its import flag set, as
bench_jobs' Stack starts it (the run in RESULTS.md of 2026-12-03 predates that: its defaults).
"""
from __future__ import annotations

import collections
import io
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_jobs import REPO, Stack  # noqa: E402
from benchmarks.common import arguments, label_studio_binary, machine  # noqa: E402
from rfclip_engine import load_model  # noqa: E402
from tests.conftest import TINY_CONFIG  # noqa: E402
from tests.label_studio import clean_environment, stop  # noqa: E402


def small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


def preannotate(stack: Stack, project: int, chunk: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "backend.cli", "preannotate", "--project", str(project), "--queue",
                             "--chunk", str(chunk), "--follow", "--no-progress"], env=stack.env, cwd=REPO,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def main() -> int:
    parser = arguments(__file__, __doc__)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=40.0, help="seconds between worker kills")
    args = parser.parse_args()
    binary = label_studio_binary()
    if not binary:
        return 2
    rng = random.Random(0)
    root = Path(tempfile.mkdtemp(prefix="rfclip-bench-scale-"))
    torch.manual_seed(0)
    checkpoint = root / "tiny.pt"
    torch.save(load_model(TINY_CONFIG, pretrained=None).clip.state_dict(), checkpoint)
    env = {**clean_environment(), "RFCLIP_MODEL": TINY_CONFIG, "RFCLIP_PRETRAINED": str(checkpoint),
           "RFCLIP_DISTRACTION_DIMS": "1,2,3", "RFCLIP_ALLOW_PRIVATE_URLS": "true",
           "RFCLIP_CACHE_DIR": str(root / "cache")}
    stack = Stack(binary, root, env)
    workers, kills, report = [], [], {}
    try:
        image = small_jpeg()
        for i in range(args.tasks):
            stack.media.public[f"{i}.jpg"] = image
        project = stack.project(args.tasks)
        workers = stack.workers(args.workers, 1)
        started = time.perf_counter()
        first = preannotate(stack, project, args.chunk, root / "preannotate-1.log")
        # the command dies once it has enqueued about a fifth of the project
        chunks = -(-args.tasks // args.chunk)
        version = stack.service.model_version
        while len(stack.queue.chunk_sizes(project, version)) < chunks // 5:
            if first.poll() is not None:
                raise RuntimeError(f"preannotate ended before it was killed: {(root / 'preannotate-1.log').read_text()}")
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        enqueued_before_kill = len(stack.queue.chunk_sizes(project, version))
        second = preannotate(stack, project, args.chunk, root / "preannotate-2.log")
        next_kill = time.monotonic() + args.kill_every
        while second.poll() is None:
            if time.monotonic() >= next_kill:
                victim = rng.randrange(len(workers))
                workers[victim].send_signal(signal.SIGKILL)
                workers[victim].wait()
                kills.append(round(time.perf_counter() - started, 1))
                workers[victim] = stack.worker(1)
                next_kill = time.monotonic() + args.kill_every
            time.sleep(0.2)
        seconds = time.perf_counter() - started
        output = (root / "preannotate-2.log").read_text()
        if second.returncode != 0:
            raise RuntimeError(f"the second preannotate failed ({second.returncode}):\n{output[-3000:]}")
        predictions = stack.api("GET", f"/api/predictions/?project={project}")
        per_task = collections.Counter(p["task"] for p in predictions if p["model_version"] == version)
        tasks = [t.id for t in stack.studio.tasks(project)]
        copies = collections.Counter(per_task.get(t, 0) for t in tasks)
        active = stack.api("GET", f"/api/projects/{project}")["model_version"]
        outcomes = [o for o in stack.queue.outcomes(project, version, list(stack.queue.chunk_sizes(project, version)))
                    if o]
        report = {"machine": machine(), "tasks": args.tasks, "chunk": args.chunk, "workers": args.workers,
                  "seconds": seconds, "tasks_per_s": args.tasks / seconds, "worker_kills_at_s": kills,
                  "chunks": chunks, "enqueued_before_the_command_was_killed": enqueued_before_kill,
                  "predictions_per_task": {str(k): v for k, v in sorted(copies.items())},
                  "extra_copies_removed_by_reconciles": sum(o.get("removed", 0) for o in outcomes),
                  "active_model_version_is_this": active == version,
                  "summary": output.strip().splitlines()[-3:]}
    finally:
        for process in workers:
            stop(process)
        stack.close()
    print(json.dumps(report, indent=1))
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    ok = report["predictions_per_task"] == {"1": args.tasks} and report["active_model_version_is_this"]
    print("\nexactly one prediction per task" if ok else "\nNOT exactly one prediction per task")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
