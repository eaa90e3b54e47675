"""`rfclip-backend worker`: an RQ worker that loads the model once and runs chunks in its own
process. RQ's default worker forks a child per job, which would load the model again for every
chunk and cannot carry a CUDA context; this one is a SimpleWorker: one process, one model
(several may share a GPU: README, "On RQ workers").

A running chunk sends heartbeats every lease / 4 (RFCLIP_JOB_LEASE_S, 45 s by default). A worker
that is killed stops sending them, so within the lease its chunk's entry in RQ's started registry expires, and the next maintenance
pass of any worker (every MAINTENANCE_S while it is idle) or of a `preannotate --follow` hands
the chunk to RQ's Retry: it runs again elsewhere, and the check-before-push skips what the
killed worker had pushed already.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, List, Optional, Tuple

from redis.exceptions import RedisError
from rq import get_current_job
from rq.worker import SimpleWorker

from ..media import Credentials
from ..service import PredictionService
from .chunk import predict_chunk
from .queue import JobQueue
from .studio import Studio

log = logging.getLogger("rfclip.backend.jobs")
MAINTENANCE_S = 10
WORKER_TTL_S = 40  # an idle worker wakes every WORKER_TTL_S - 15 s to do its maintenance


class VersionMismatch(RuntimeError):
    """A chunk of another model version: a mixed fleet must not write two versions into a project."""


class ChunkBusy(RuntimeError):
    """Another worker holds the chunk's lock (RQ's Retry tries again)."""


class ChunkRunner:
    """Runs one chunk job with the worker's model and Label Studio client."""

    def __init__(self, service: PredictionService, studio: Studio, credentials: Credentials, queue: JobQueue,
                 worker_name: str, lease_s: float = 45.0, push_part: Optional[int] = None) -> None:
        self.service, self.studio, self.credentials, self.queue = service, studio, credentials, queue
        self.worker_name, self.lease_s, self.push_part = worker_name, lease_s, push_part

    def run(self, spec: object, job_id: str) -> dict:
        project, version, ids, mode, set_version = parse_spec(spec)
        if not same_model(version, self.service.model_version):
            raise VersionMismatch(f"this worker predicts {self.service.model_version}, the chunk wants {version}: "
                                  "run workers of one model version per queue")
        lock = self.queue.chunk_lock(job_id, self.lease_s)
        if not lock.acquire():
            raise ChunkBusy(f"chunk {job_id} is held by another worker")
        try:
            with renewing(self.lease_s / 4, lambda: lock.extend(self.lease_s, replace_ttl=True)):
                started = time.perf_counter()
                label_config = self.studio.label_config(project)
                self.service.targets(label_config)
                tasks = self.studio.current(project, ids)
                listed = time.perf_counter() - started
                result = predict_chunk(self.service, self.studio, project, [tasks[i] for i in ids if i in tasks],
                                       label_config, self.credentials, mode, self.push_part)
                result.failed.update({i: "the task is no longer in the project" for i in ids if i not in tasks})
                result.stage_seconds["list"] = listed
                if set_version and result.predicted:
                    # only now: Label Studio refuses a version that no prediction has yet
                    self.studio.set_model_version(project, result.version)
                outcome = {**result.to_json(), "seconds": round(time.perf_counter() - started, 3),
                           "worker": self.worker_name}
                self.queue.record(project, version, job_id, outcome)
        finally:
            try:
                lock.release()
            except RedisError:
                pass  # lapsed or Redis gone: it expires by itself
        log.info("project %s: chunk %s: %d predicted, %d skipped, %d failed in %.1f s (%s)", project, job_id,
                 result.predicted, result.skipped, len(result.failed), outcome["seconds"],
                 ", ".join(f"{stage} {s:.2f} s" for stage, s in result.stage_seconds.items()))
        return outcome


def same_model(version: str, model_version: str) -> bool:
    """Whether a chunk's version is this model's, with or without a project's examples tag (the
    tag moves as annotators correct masks; the model and its settings must not)."""
    return version == model_version or version.startswith(model_version + "-p")


MODES = ("unpredicted", "all", "ids")
MAX_CHUNK_TASKS = 10_000


def parse_spec(spec: object) -> Tuple[int, str, List[int], str, bool]:
    """(project, model version, task ids, mode, set_version) of a chunk job's argument; ValueError
    naming what is wrong, so that a job someone else put on the queue fails clearly, alone."""
    if not isinstance(spec, dict):
        raise ValueError(f"a chunk job's argument must be a dict, not {type(spec).__name__}")
    project, version, ids = spec.get("project"), spec.get("model_version"), spec.get("tasks")
    mode, set_version = spec.get("mode", "all"), spec.get("set_version", False)
    if type(project) is not int or project < 1:
        raise ValueError(f"a chunk job's project must be a positive integer, not {project!r:.50}")
    if not isinstance(version, str) or not version:
        raise ValueError("a chunk job's model_version must be a non-empty string")
    if not isinstance(ids, list) or not 0 < len(ids) <= MAX_CHUNK_TASKS or \
            not all(type(i) is int and i > 0 for i in ids):
        raise ValueError(f"a chunk job's tasks must be 1 to {MAX_CHUNK_TASKS} positive integer ids")
    if mode not in MODES or not isinstance(set_version, bool):
        raise ValueError(f"a chunk job's mode must be one of {', '.join(MODES)} and set_version a boolean")
    return project, version, ids, mode, set_version


CURRENT_RUNNER: ContextVar[ChunkRunner] = ContextVar("rfclip_chunk_runner")


def run_chunk(spec: dict) -> dict:
    """The RQ job function; it runs inside a ChunkWorker, which provides the runner."""
    try:
        runner = CURRENT_RUNNER.get()
    except LookupError:
        raise RuntimeError("rfclip chunks run only in `rfclip-backend worker`, not in `rq worker`") from None
    return runner.run(spec, get_current_job().id)


@contextmanager
def renewing(interval_s: float, renew: Callable[[], object]) -> Iterator[None]:
    """Calls `renew` every `interval_s` on a thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                renew()
            except Exception as err:  # Redis restarting: the next beat tries again
                log.warning("heartbeat failed: %s: %s", type(err).__name__, err)

    thread = threading.Thread(target=loop, name="rfclip-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class ChunkWorker(SimpleWorker):
    """A SimpleWorker whose jobs see `runner`, and whose running job stays alive by heartbeats
    (the runner's lease) rather than by its whole timeout."""

    def __init__(self, queue: JobQueue, runner: ChunkRunner, **kwargs) -> None:
        super().__init__([queue.queue], connection=queue.connection, name=runner.worker_name,
                         worker_ttl=WORKER_TTL_S, maintenance_interval=MAINTENANCE_S, **kwargs)
        self.runner = runner
        self.log_job_description = False

    def get_heartbeat_ttl(self, job) -> int:
        return max(1, round(self.runner.lease_s))

    def perform_job(self, job, queue) -> bool:
        token = CURRENT_RUNNER.set(self.runner)
        try:
            with renewing(self.runner.lease_s / 4, lambda: self.maintain_heartbeats(job)):
                return super().perform_job(job, queue)
        finally:
            CURRENT_RUNNER.reset(token)


def worker_name() -> str:
    return f"{socket.gethostname()}.{os.getpid()}"


def work(service: PredictionService, studio: Studio, credentials: Credentials, queue: JobQueue,
         lease_s: float = 45.0, burst: bool = False, name: Optional[str] = None, logging_level: str = "INFO",
         push_part: Optional[int] = None) -> bool:
    """Runs chunks until stopped (SIGTERM: after the chunk in flight), or, with `burst`, until the
    queue is empty; returns whether any ran."""
    runner = ChunkRunner(service, studio, credentials, queue, name or worker_name(), lease_s, push_part)
    worker = ChunkWorker(queue, runner)
    log.info("worker %s: model version %s, queue %s", runner.worker_name, service.model_version, queue.queue.name)
    return worker.work(burst=burst, logging_level=logging_level)
