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
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

from more_itertools import chunked
from tqdm import tqdm

from ..media import Credentials
from ..service import PredictionService
from .chunk import ChunkResult, needs_prediction, predict_chunk
from .queue import Enqueued, JobQueue, RunStatus, RunTracker
from .studio import BIG_SELECTION, IMPORT_FLAG, Studio, StudioTask

log = logging.getLogger("rfclip.backend.jobs")
ENQUEUE_BATCH = 1000  # chunks per enqueue at most: bounded Redis pipelines
ENQUEUE_EVERY_S = 1.0  # while listing, what is planned goes out at least this often


@dataclass
class Report:
    selected: int = 0
    skipped: int = 0  # already hold a prediction of this model_version
    predicted: int = 0
    failed: Dict[int, str] = field(default_factory=dict)  # task id -> reason
    stopped: bool = False  # interrupted before the end

    def listed(self, tasks: int, todo: int) -> None:
        """A chunk of the selection, `todo` of its tasks without this model_version's prediction."""
        self.selected += tasks
        self.skipped += tasks - todo

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


class Selection:
    """The selected tasks of a project, listed page by page and cut into chunks as they come, so a
    run predicts (or enqueues) its first chunk at once whatever the project's size. The chunks cut
    the whole selection in the listing's id order, not what is left of it, so a rerun cuts the same
    ones. The listing is a light one (model versions, no results, no annotations), and of a
    chunk's tasks only those still to predict are kept."""

    def __init__(self, studio: Studio, project: int, version: str, mode: str, ids: Optional[List[int]],
                 view: Optional[int], size: int) -> None:
        self.studio, self.project, self.version, self.mode = studio, project, version, mode
        self.wanted = set(ids) if ids is not None else None
        self.view, self.size = view, size
        self.total: Optional[int] = None  # the selection's size (at most), once the listing knows it

    def __iter__(self) -> Iterator[Tuple[List[int], List[StudioTask]]]:
        if self.wanted is not None and self.view is None:  # those tasks alone, not the whole project
            listing = self.studio.by_ids(self.project, self.wanted)
        else:
            listing = self.studio.tasks(self.project, self.view)
        # a listing knows its size from its first page, fetched when it was made
        self.total = len(self.wanted) if self.wanted is not None else getattr(listing, "total", None)
        if (self.total or 0) >= BIG_SELECTION:
            log.warning("project %s: %d tasks selected. Unless Label Studio runs with %s=true in its "
                        "environment, it recounts every predicted task of the project on each push of "
                        "predictions, and pushes slow down as the project fills (README: Big projects)",
                        self.project, self.total, IMPORT_FLAG)
        chosen = (task for task in listing if self.wanted is None or task.id in self.wanted)
        for tasks in chunked(chosen, self.size):
            yield [t.id for t in tasks], [t for t in tasks if needs_prediction(t, self.version, self.mode)]


def preannotate(service: PredictionService, studio: Studio, project: int, credentials: Credentials,
                mode: str = "unpredicted", ids: Optional[List[int]] = None, view: Optional[int] = None,
                chunk: int = 32, progress: bool = True, stop: Optional[threading.Event] = None,
                push_part: Optional[int] = None) -> Report:
    """Predicts and pushes the selected tasks of `project` in this process, chunk by chunk as the
    listing goes; raises LabelConfigError for a config the backend cannot use."""
    stop = stop or threading.Event()
    label_config = studio.label_config(project)
    service.targets(label_config)
    selection = Selection(studio, project, service.version_for(project), mode, ids, view, chunk)
    report = Report()
    bar = tqdm(desc=f"project {project}", unit=" tasks", disable=not progress)
    with stop_on_interrupt(stop), bar:
        for listed, todo in selection:
            if stop.is_set():
                report.stopped = True
                report.selected = max(report.selected, selection.total or 0)  # the unlisted rest is left
                break
            report.listed(len(listed), len(todo))
            if todo:
                report.add(predict_chunk(service, studio, project, todo, label_config, credentials, mode, push_part))
            bar.total = selection.total
            bar.update(len(listed))
            bar.set_postfix(skipped=report.skipped, failed=len(report.failed))
    return report


def enqueue(service: PredictionService, studio: Studio, queue: JobQueue, project: int, mode: str = "unpredicted",
            ids: Optional[List[int]] = None, view: Optional[int] = None, chunk: int = 32, progress: bool = True,
            set_version: bool = True) -> Tuple[Report, Enqueued]:
    """One queue job per chunk of the selected tasks that need a prediction (chunks already
    waiting or running are left alone), enqueued as the listing goes so that workers start on the
    first chunk; the model is not loaded here. With `set_version` the workers make this model
    version the project's active one as soon as they have pushed."""
    service.targets(studio.label_config(project))
    version = service.version_for(project)
    selection = Selection(studio, project, version, mode, ids, view, chunk)
    report, enqueued, plan, flushed = Report(), Enqueued(), [], float("-inf")

    def flush() -> None:
        nonlocal plan, flushed
        if plan:
            enqueued.extend(queue.enqueue(project, version, plan, mode, set_version))
        plan, flushed = [], time.monotonic()

    with tqdm(desc="listing and enqueueing", unit=" tasks", disable=not progress, leave=False) as bar:
        for listed, todo in selection:
            report.listed(len(listed), len(todo))
            if todo:
                plan.append((listed, [t.id for t in todo]))
            if len(plan) >= ENQUEUE_BATCH or time.monotonic() - flushed >= ENQUEUE_EVERY_S:
                flush()
            bar.total = selection.total
            bar.update(len(listed))
            bar.set_postfix(chunks=len(enqueued.ids) + len(plan))
        flush()
    return report, enqueued


def follow(queue: JobQueue, project: int, version: str, job_ids: List[str], progress: bool = True,
           poll_s: float = 2.0, stop: Optional[threading.Event] = None) -> RunStatus:
    """The progress of these chunks, from the queue's state, until none is waiting or running
    (or Ctrl-C: the jobs go on). Abandoned chunks are handed back to the queue on the way."""
    stop = stop or threading.Event()
    tracker = RunTracker(queue, project, version, job_ids)
    if len(tracker.sizes) < len(job_ids):
        raise LookupError(f"no queued run of project {project} with model version {version} has those chunks")
    bar = None
    with stop_on_interrupt(stop, "no longer following; the queued chunks go on (rfclip-backend jobs shows them)"):
        while True:
            queue.reclaim_abandoned()
            status = tracker.poll()
            if bar is None:
                bar = tqdm(total=status.tasks["total"], desc=f"project {project}", unit=" tasks", disable=not progress)
            bar.n = status.tasks["total"] - status.tasks["left"]
            bar.set_postfix(failed=status.tasks["failed"], running=status.chunks["running"],
                            queued=status.chunks["queued"], refresh=False)
            bar.refresh()
            if status.finished or stop.wait(poll_s):
                bar.close()
                return status
