"""`rfclip-backend preannotate`: every selected task of a project through the one prediction
pipeline, in chunks, each chunk's predictions pushed in bulk as soon as it is done.

Tasks that already hold a prediction of this model_version are skipped, so a rerun resumes
where a stopped one left off and never stores a task twice. A task that fails is reported with
its reason and stays unpredicted, so a rerun retries exactly those. Ctrl-C stops after the
chunk in flight.
"""
from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Tuple

from tqdm import tqdm

from ..media import Credentials
from ..service import PredictionService
from .chunk import ChunkResult, needs_prediction, predict_chunk
from .queue import Enqueued, JobQueue, RunStatus, plan_chunks
from .studio import Studio, StudioTask

log = logging.getLogger("rfclip.backend.jobs")


@dataclass
class Report:
    selected: int = 0
    skipped: int = 0  # already hold a prediction of this model_version
    predicted: int = 0
    failed: Dict[int, str] = field(default_factory=dict)  # task id -> reason
    stopped: bool = False  # interrupted before the end

    def add(self, chunk: ChunkResult) -> None:
        self.predicted += chunk.predicted
        self.skipped += chunk.skipped
        self.failed.update(chunk.failed)

    @property
    def left(self) -> int:
        return self.selected - self.skipped - self.predicted - len(self.failed)


@contextmanager
def stop_on_interrupt(stop: threading.Event, message: str = "stopping after the chunk in flight (Ctrl-C again to "
                      "stop at once); a rerun resumes") -> Iterator[None]:
    """The first Ctrl-C sets `stop` and says `message`; a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        tqdm.write(message)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def select(studio: Studio, project: int, version: str, mode: str, ids: Optional[List[int]], view: Optional[int],
           progress: bool) -> Tuple[List[int], List[StudioTask]]:
    """(the ids of the selected tasks, those of them that need a prediction), listed page by page.
    The whole selection is held until it is chunked, so only what predicting needs is kept: not
    the tasks already predicted, nor anyone's annotations."""
    listed = tqdm(studio.tasks(project, view), desc="listing tasks", unit=" tasks", disable=not progress, leave=False)
    wanted = set(ids) if ids is not None else None
    selected: List[int] = []
    todo: List[StudioTask] = []
    for task in listed:
        if wanted is not None and task.id not in wanted:
            continue
        selected.append(task.id)
        if needs_prediction(task, version, mode):
            todo.append(replace(task, annotations=()))
    return selected, todo


def preannotate(service: PredictionService, studio: Studio, project: int, credentials: Credentials,
                mode: str = "unpredicted", ids: Optional[List[int]] = None, view: Optional[int] = None,
                chunk: int = 32, progress: bool = True, stop: Optional[threading.Event] = None) -> Report:
    """Predicts and pushes the selected tasks of `project` in this process; raises
    LabelConfigError for a config the backend cannot use."""
    stop = stop or threading.Event()
    label_config = studio.label_config(project)
    service.targets(label_config)
    selected, todo = select(studio, project, service.version_for(project), mode, ids, view, progress)
    report = Report(selected=len(selected), skipped=len(selected) - len(todo))
    bar = tqdm(total=len(todo), desc=f"project {project}", unit=" tasks", disable=not progress)
    with stop_on_interrupt(stop), bar:
        for start in range(0, len(todo), chunk):
            if stop.is_set():
                report.stopped = True
                break
            part = todo[start:start + chunk]
            report.add(predict_chunk(service, studio, project, part, label_config, credentials, mode))
            bar.update(len(part))
            bar.set_postfix(failed=len(report.failed))
    return report


def enqueue(service: PredictionService, studio: Studio, queue: JobQueue, project: int, mode: str = "unpredicted",
            ids: Optional[List[int]] = None, view: Optional[int] = None, chunk: int = 32, progress: bool = True,
            set_version: bool = True) -> Tuple[Report, Enqueued]:
    """One queue job per chunk of the selected tasks that need a prediction (chunks already
    waiting or running are left alone); the model is not loaded here. With `set_version` the
    workers make this model version the project's active one as soon as they have pushed."""
    service.targets(studio.label_config(project))
    version = service.version_for(project)
    selected, todo = select(studio, project, version, mode, ids, view, progress)
    report = Report(selected=len(selected), skipped=len(selected) - len(todo))
    plan = plan_chunks(selected, [t.id for t in todo], chunk)
    return report, queue.enqueue(project, version, plan, mode, set_version)


def follow(queue: JobQueue, project: int, version: str, job_ids: List[str], progress: bool = True,
           poll_s: float = 2.0, stop: Optional[threading.Event] = None) -> RunStatus:
    """The progress of these chunks, from the queue's state, until none is waiting or running
    (or Ctrl-C: the jobs go on). Abandoned chunks are handed back to the queue on the way."""
    stop = stop or threading.Event()
    bar = None
    with stop_on_interrupt(stop, "no longer following; the queued chunks go on (rfclip-backend jobs shows them)"):
        while True:
            queue.reclaim_abandoned()
            (status,) = queue.status(project, version, job_ids) or [None]
            if status is None:
                raise LookupError(f"no queued run of project {project} with model version {version}")
            if bar is None:
                bar = tqdm(total=status.tasks["total"], desc=f"project {project}", unit=" tasks", disable=not progress)
            bar.n = status.tasks["total"] - status.tasks["left"]
            bar.set_postfix(failed=status.tasks["failed"], running=status.chunks["running"],
                            queued=status.chunks["queued"], refresh=False)
            bar.refresh()
            if status.finished or stop.wait(poll_s):
                bar.close()
                return status
