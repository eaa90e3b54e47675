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
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

from tqdm import tqdm

from ..media import Credentials
from ..service import PredictionService
from .studio import Studio, StudioTask

log = logging.getLogger("rfclip.backend.jobs")


@dataclass
class Report:
    selected: int = 0
    skipped: int = 0  # already hold a prediction of this model_version
    predicted: int = 0
    failed: Dict[int, str] = field(default_factory=dict)  # task id -> reason
    stopped: bool = False  # interrupted before the end

    @property
    def left(self) -> int:
        return self.selected - self.skipped - self.predicted - len(self.failed)


def needs_prediction(task: StudioTask, version: str, mode: str) -> bool:
    """Never when it holds a prediction of `version`; in `unpredicted` mode only when it holds none."""
    if version in task.model_versions:
        return False
    return mode != "unpredicted" or not task.model_versions


@contextmanager
def stop_on_interrupt(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C asks to stop after the chunk in flight; a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        tqdm.write("stopping after the chunk in flight (Ctrl-C again to stop at once); a rerun resumes")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def preannotate(service: PredictionService, studio: Studio, project: int, credentials: Credentials,
                mode: str = "unpredicted", ids: Optional[List[int]] = None, view: Optional[int] = None,
                chunk: int = 32, progress: bool = True, stop: Optional[threading.Event] = None) -> Report:
    """Predicts and pushes the selected tasks of `project`; raises LabelConfigError for a config
    the backend cannot use."""
    stop = stop or threading.Event()
    version = service.model_version
    label_config = studio.label_config(project)
    service.targets(label_config)
    listed = list(tqdm(studio.tasks(project, view), desc="listing tasks", unit=" tasks", disable=not progress,
                       leave=False))
    wanted = set(ids) if ids is not None else None
    selected = [t for t in listed if wanted is None or t.id in wanted]
    todo = [t for t in selected if needs_prediction(t, version, mode)]
    report = Report(selected=len(selected), skipped=len(selected) - len(todo))
    bar = tqdm(total=len(todo), desc=f"project {project}", unit=" tasks", disable=not progress)
    with stop_on_interrupt(stop), bar:
        for start in range(0, len(todo), chunk):
            if stop.is_set():
                report.stopped = True
                break
            part = todo[start:start + chunk]
            outcome = service.run([{"id": t.id, "data": t.data} for t in part], label_config, credentials, None)
            predictions = [{"task": t.id, "model_version": version, "result": entry["result"], "score": entry["score"]}
                           for t, entry in zip(part, outcome.entries) if isinstance(entry, dict)]
            # checked again just before storing: another run may have predicted some meanwhile
            now = studio.predicted_versions(project, [p["task"] for p in predictions]) if predictions else {}
            fresh = [p for p in predictions if version not in now.get(p["task"], frozenset())]
            studio.push(project, fresh)
            report.predicted += len(fresh)
            report.skipped += len(predictions) - len(fresh)
            report.failed.update({part[n].id: reason for n, reason in outcome.failures.items()})
            bar.update(len(part))
            bar.set_postfix(failed=len(report.failed))
    return report
