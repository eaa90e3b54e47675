"""Project-scale jobs on RQ: one job per chunk of task ids.

A chunk's job id is made of the project, the model version and the chunk's first and last task
id, so enqueueing the same selection twice adds only the chunks that are not already waiting or
running. What each chunk did is kept beside the queue, per run (project and model version), for
`rfclip-backend jobs`, GET /jobs and `preannotate --follow`. No token ever goes into Redis: the
workers have their own.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from redis import Redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as RedisRetry
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.worker import Worker

QUEUE = "rfclip"
CHUNK_FUNCTION = "backend.jobs.worker.run_chunk"  # by name: enqueueing never imports the model code
PENDING = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}
KEEP_S = 7 * 24 * 3600  # runs, outcomes and job results are kept a week after their last change
RETRIES = 3  # RQ reruns a chunk that raised (Label Studio down past the SDK's retries, ...) this often
MAX_LISTED_FAILURES = 100
REDIS_RETRIES = 10  # 0.5, 1, 2, 4, 8, then 10 s each: about a minute


def run_key(project: int, version: str) -> str:
    return f"{project}-{hashlib.sha1(version.encode()).hexdigest()[:12]}"


def chunk_id(project: int, version: str, ids: Sequence[int]) -> str:
    return f"rfclip-{run_key(project, version)}-{ids[0]}-{ids[-1]}"


@dataclass
class Enqueued:
    added: List[str] = field(default_factory=list)
    pending: List[str] = field(default_factory=list)  # already waiting or running: left alone

    @property
    def ids(self) -> List[str]:
        return self.added + self.pending

    def extend(self, other: "Enqueued") -> None:
        self.added += other.added
        self.pending += other.pending


@dataclass
class RunStatus:
    """One run (project, model version) of the queue, as `jobs` and GET /jobs show it."""
    project: int
    model_version: str
    chunks: Dict[str, int]  # queued / running / done / failed
    tasks: Dict[str, int]  # total / predicted / skipped / failed / left
    tasks_per_s: Dict[str, float]  # per worker
    eta_s: Optional[float]
    failed_tasks: Dict[str, str]  # task id -> reason (the first MAX_LISTED_FAILURES)
    failed_chunks: Dict[str, str]  # job id -> the error's last line

    @property
    def finished(self) -> bool:
        return not self.chunks["queued"] and not self.chunks["running"]

    def to_json(self) -> dict:
        return asdict(self)


class JobQueue:
    def __init__(self, connection: Redis, name: str = QUEUE, job_timeout_s: int = 3600) -> None:
        self.connection = connection
        self.queue = Queue(name, connection=connection)
        self.job_timeout_s = job_timeout_s

    @classmethod
    def from_url(cls, url: str, name: str = QUEUE, job_timeout_s: int = 3600,
                 retries: int = REDIS_RETRIES) -> "JobQueue":
        """A connection that rides out a Redis restart: refused or dropped commands are tried again
        with exponential backoff (`retries` times: about a minute by default) before they fail."""
        retry = RedisRetry(ExponentialWithJitterBackoff(base=0.5, cap=10), retries)
        return cls(Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30, retry=retry,
                                  retry_on_error=[RedisConnectionError, RedisTimeoutError]), name, job_timeout_s)

    def _key(self, run: str, what: str) -> str:
        return f"rfclip:jobs:{self.queue.name}:{run}:{what}"

    def enqueue(self, project: int, version: str, plan: Sequence[Tuple[List[int], List[int]]],
                mode: str, set_version: bool = False) -> Enqueued:
        """One job per planned chunk, unless that chunk's job is already waiting or running; with
        `set_version`, the chunks make their version the project's active one once they pushed."""
        run = run_key(project, version)
        chunks_key, outcomes_key = self._key(run, "chunks"), self._key(run, "outcomes")
        ids = [chunk_id(project, version, chunk) for chunk, _ in plan]
        existing = dict(zip(ids, Job.fetch_many(ids, connection=self.connection)))
        done, batch = Enqueued(), []
        with self.connection.pipeline() as pipe:
            pipe.sadd(self._runs_key(), run)
            pipe.hset(self._key(run, "meta"), mapping={"project": project, "model_version": version})
            for job_id, (_, todo) in zip(ids, plan):
                job = existing[job_id]
                if job is not None and job.get_status(refresh=False) in PENDING:
                    done.pending.append(job_id)
                    continue
                if job is not None:
                    job.delete(pipeline=pipe)  # finished or failed earlier: this is a fresh try
                pipe.hdel(outcomes_key, job_id)
                pipe.hset(chunks_key, job_id, len(todo))
                spec = {"project": project, "model_version": version, "tasks": list(todo), "mode": mode,
                        "set_version": set_version}
                batch.append(Queue.prepare_data(CHUNK_FUNCTION, [spec], job_id=job_id, timeout=self.job_timeout_s,
                                                result_ttl=KEEP_S, failure_ttl=KEEP_S, retry=Retry(max=RETRIES),
                                                description=f"project {project}: {len(todo)} tasks"))
                done.added.append(job_id)
            for what in ("meta", "chunks", "outcomes"):
                pipe.expire(self._key(run, what), KEEP_S)
            pipe.execute()
        for start in range(0, len(batch), 1000):  # bounded pipelines, even for a million tasks
            self.queue.enqueue_many(batch[start:start + 1000])
        return done

    def record(self, project: int, version: str, job_id: str, outcome: dict) -> None:
        """What a chunk did (ChunkResult.to_json() plus seconds and worker), for the status."""
        key = self._key(run_key(project, version), "outcomes")
        with self.connection.pipeline() as pipe:
            pipe.hset(key, job_id, json.dumps(outcome))
            pipe.expire(key, KEEP_S)
            pipe.execute()

    def chunk_lock(self, job_id: str, lease_s: float):
        """Held while a chunk runs, so two workers never push the same chunk at once; it lapses
        `lease_s` after its holder stops renewing it (a killed worker)."""
        # not thread-local: the heartbeat thread renews what the job's thread took
        return self.connection.lock(f"rfclip:jobs:lock:{job_id}", timeout=lease_s, blocking_timeout=lease_s + 15,
                                    thread_local=False)

    def reclaim_abandoned(self) -> None:
        """Hands chunks whose worker stopped sending heartbeats to RQ's Retry now (the workers also
        do it in their maintenance, every few seconds while idle)."""
        StartedJobRegistry(queue=self.queue).cleanup()

    def workers(self) -> int:
        return Worker.count(queue=self.queue)

    def _runs_key(self) -> str:
        return f"rfclip:jobs:{self.queue.name}:runs"

    def status(self, project: Optional[int] = None, version: Optional[str] = None) -> List[RunStatus]:
        """Every run of the queue (or of one project, or one model version of it)."""
        runs = sorted(r.decode() for r in self.connection.smembers(self._runs_key()))
        out = []
        for run in runs:
            meta = {k.decode(): v.decode() for k, v in self.connection.hgetall(self._key(run, "meta")).items()}
            if not meta or (project is not None and int(meta["project"]) != project) or \
                    (version is not None and meta["model_version"] != version):
                continue
            out.append(RunTracker(self, int(meta["project"]), meta["model_version"]).poll())
        return out

    def chunk_sizes(self, project: int, version: str) -> Dict[str, int]:
        """The run's chunks as enqueued: job id -> tasks to predict in it."""
        chunks = self.connection.hgetall(self._key(run_key(project, version), "chunks"))
        return {k.decode(): int(v) for k, v in chunks.items()}

    def outcomes(self, project: int, version: str, job_ids: Sequence[str]) -> List[Optional[dict]]:
        """What each of these chunks recorded (None: nothing yet), in one read."""
        if not job_ids:
            return []
        stored = self.connection.hmget(self._key(run_key(project, version), "outcomes"), list(job_ids))
        return [json.loads(raw) if raw else None for raw in stored]

    def states(self, job_ids: Sequence[str]) -> List[Optional[JobStatus]]:
        """Each job's status (None: gone), read alone: a run of a million tasks has 30,000 chunks."""
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(Job.key_for(job_id), "status")
            return [JobStatus(raw.decode()) if raw else None for raw in pipe.execute()]


class RunTracker:
    """The status of one run's chunks (all of them, or `job_ids`), polled. A chunk that has ended
    (done or failed) is read once: each poll costs only the chunks still waiting or running, so
    following a run of a million tasks reads each chunk's outcome once, not on every poll."""

    def __init__(self, queue: JobQueue, project: int, version: str, job_ids: Optional[Sequence[str]] = None) -> None:
        self.queue, self.project, self.version = queue, project, version
        sizes = queue.chunk_sizes(project, version)
        self.sizes = sizes if job_ids is None else {j: sizes[j] for j in job_ids if j in sizes}
        self.done: Dict[str, dict] = {}  # job id -> its outcome
        self.failed: Dict[str, str] = {}  # job id -> the error's last line

    def poll(self) -> RunStatus:
        open_ids = [j for j in self.sizes if j not in self.done and j not in self.failed]
        states = self.queue.states(open_ids)
        stored = self.queue.outcomes(self.project, self.version, open_ids)
        chunks = {"queued": 0, "running": 0}
        for job_id, state, outcome in zip(open_ids, states, stored):
            if state == JobStatus.FINISHED or (state is None and outcome):
                self.done[job_id] = outcome or _NO_OUTCOME
            elif state == JobStatus.STARTED:
                chunks["running"] += 1
            elif state in PENDING:
                chunks["queued"] += 1
            else:  # failed, stopped, canceled, or expired without an outcome
                self.failed[job_id] = _last_error(self.queue.queue.fetch_job(job_id))
        chunks.update(done=len(self.done), failed=len(self.failed))
        return self._status(chunks)

    def _status(self, chunks: Dict[str, int]) -> RunStatus:
        tasks = {"total": sum(self.sizes.values()), "predicted": 0, "skipped": 0, "failed": 0}
        failed_tasks: Dict[str, str] = {}
        work: Dict[str, List[float]] = {}
        for outcome in self.done.values():
            for what in ("predicted", "skipped"):
                tasks[what] += outcome[what]
            tasks["failed"] += len(outcome["failed"])
            for task, reason in outcome["failed"].items():
                if len(failed_tasks) < MAX_LISTED_FAILURES:
                    failed_tasks[task] = reason
            if outcome["worker"]:
                done = work.setdefault(outcome["worker"], [0.0, 0.0])
                done[0] += outcome["predicted"] + outcome["skipped"] + len(outcome["failed"])
                done[1] += outcome["seconds"]
        tasks["left"] = tasks["total"] - tasks["predicted"] - tasks["skipped"] - tasks["failed"]
        rates = {worker: round(n / s, 3) if s > 0 else 0.0 for worker, (n, s) in sorted(work.items())}
        pending_tasks = sum(size for job_id, size in self.sizes.items()
                            if job_id not in self.done and job_id not in self.failed)
        speed = sum(rates.values())
        eta = round(pending_tasks / speed, 1) if speed > 0 and pending_tasks else (0.0 if not pending_tasks else None)
        return RunStatus(self.project, self.version, chunks, tasks, rates, eta, failed_tasks, dict(self.failed))


# a chunk that finished without recording what it did (its outcome expired): done, nothing counted
_NO_OUTCOME = {"predicted": 0, "skipped": 0, "failed": {}, "worker": "", "seconds": 0.0}


def _last_error(job: Optional[Job]) -> str:
    if job is None:
        return "the job expired"
    result = job.latest_result()
    text = (getattr(result, "exc_string", None) or "").strip()
    return text.splitlines()[-1][:300] if text else str(job.get_status(refresh=False) or "unknown")
