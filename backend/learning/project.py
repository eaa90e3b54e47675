"""`rfclip-backend learn --project ID`: the bank built from a project's existing annotations
through the API (for a project that had labels before the backend was connected, or to catch up
on webhooks that were missed). Annotations the bank holds that the project no longer has are
forgotten, so a rerun brings the bank back in line with the project."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Dict, Optional

from tqdm import tqdm

from ..jobs.preannotate import stop_on_interrupt
from ..jobs.studio import Studio
from .learner import Forget, Learn, Learner

log = logging.getLogger("rfclip.backend.learning")


@dataclass
class LearnReport:
    annotations: int = 0  # seen in the project
    learned: int = 0  # taught at least one label
    empty: int = 0  # nothing of a predicted label in it (or cancelled)
    forgotten: int = 0  # in the bank, no longer in the project
    failed: Dict[int, str] = field(default_factory=dict)  # annotation id -> reason
    stopped: bool = False


def learn_project(learner: Learner, studio: Studio, project: int, progress: bool = True,
                  stop: Optional[threading.Event] = None) -> LearnReport:
    """Learns every annotation of the project, one at a time, with a progress bar over its
    tasks; Ctrl-C stops after the annotation in flight (a rerun redoes them all)."""
    stop = stop or threading.Event()
    label_config = studio.label_config(project)
    learner.service.targets(label_config)
    report = LearnReport()
    seen = set()
    with stop_on_interrupt(stop, "stopping after the annotation in flight; a rerun learns them again"), \
            tqdm(desc=f"project {project}", unit=" tasks", disable=not progress) as bar:
        for task in studio.tasks(project, full=True):
            for annotation in task.annotations:
                if stop.is_set():
                    report.stopped = True
                    return report
                if type(annotation["id"]) is not int:
                    continue
                seen.add(annotation["id"])
                report.annotations += 1
                event = Learn(project, annotation["id"], {"id": task.id, "data": task.data}, annotation["result"],
                              label_config, annotation["was_cancelled"])
                try:
                    taught = learner.handle(event)
                except Exception as err:  # its image, its regions: said per annotation, the rest go on
                    report.failed[annotation["id"]] = f"{type(err).__name__}: {err}"
                    continue
                if taught:
                    report.learned += 1
                else:
                    report.empty += 1
            bar.update(1)
            bar.set_postfix(learned=report.learned, failed=len(report.failed))
    stale = tuple(a for a in learner.bank.annotations(project) if a not in seen)
    if stale:
        learner.handle(Forget(project, stale))
        report.forgotten = len(stale)
    return report
