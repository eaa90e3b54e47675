"""Learning from annotations: Label Studio's webhooks (and `rfclip-backend learn`) -> the
prototype bank.

ANNOTATION_CREATED / ANNOTATION_UPDATED / ANNOTATIONS_CREATED: each annotation's masks per
(control, label), the task's image fetched under the same media rules as /predict, one forward,
each label's mean feature inside its mask stored under the annotation's id (an update replaces
it; a cancelled or emptied annotation is forgotten). ANNOTATIONS_DELETED forgets them. The
webhook answers at once (Label Studio waits 1 s): the work runs on one background thread of the
process that received it, which has the model loaded, at background priority behind /predict.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from rfclip_engine.prototypes import Example

from ..media import Credentials
from ..service import PredictionService
from .annotations import LabelKey, fit, label_masks

log = logging.getLogger("rfclip.backend.learning")
LEARNING_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
MAX_EVENTS_PER_WEBHOOK = 1000


@dataclass(frozen=True)
class Learn:
    """One annotation to learn from (or to forget, when `cancelled`)."""

    project: int
    annotation: int
    task: dict
    result: list
    label_config: str
    cancelled: bool = False


@dataclass(frozen=True)
class Forget:
    project: int
    annotations: Tuple[int, ...]


Event = Union[Learn, Forget]


def _id(value: object) -> Optional[int]:
    return value if type(value) is int and value > 0 else None


def webhook_events(body: dict, label_config: Callable[[int], Optional[str]]) -> List[Event]:
    """The learning work in a webhook body (empty for other actions). `label_config` gives a
    project's config when the body carries none. Raises ValueError naming what is malformed."""
    action = body.get("action")
    if action not in LEARNING_ACTIONS and action != "ANNOTATIONS_DELETED":
        return []
    project_body = body.get("project")
    project = _id(project_body.get("id")) if isinstance(project_body, dict) else _id(project_body)
    if project is None:
        raise ValueError(f"{action}: the body names no project id")
    if action == "ANNOTATIONS_DELETED":
        items = body.get("annotations")
        if not isinstance(items, list) or len(items) > MAX_EVENTS_PER_WEBHOOK:
            raise ValueError(f"{action}: 'annotations' must be a list of at most {MAX_EVENTS_PER_WEBHOOK}")
        ids = tuple(i for i in (_id(item.get("id")) if isinstance(item, dict) else None for item in items) if i)
        return [Forget(project, ids)] if ids else []
    config = project_body.get("label_config") if isinstance(project_body, dict) else None
    config = config if isinstance(config, str) and config else label_config(project)
    if not config:
        raise ValueError(f"{action}: no label config for project {project} (neither in the body nor from /setup)")
    annotations, tasks = body.get("annotation"), body.get("task")
    many = action == "ANNOTATIONS_CREATED"
    annotations = annotations if many else [annotations]
    tasks = tasks if many else [tasks]
    if not isinstance(annotations, list) or not isinstance(tasks, list) or len(annotations) > MAX_EVENTS_PER_WEBHOOK:
        raise ValueError(f"{action}: 'annotation' and 'task' must be {'lists' if many else 'objects'}")
    by_id = {_id(t.get("id")): t for t in tasks if isinstance(t, dict)}
    events: List[Event] = []
    for annotation in annotations:
        if not isinstance(annotation, dict) or _id(annotation.get("id")) is None:
            raise ValueError(f"{action}: an annotation without an id")
        task_id = _id(annotation.get("task"))
        task = by_id.get(task_id) or (tasks[0] if not many and isinstance(tasks[0], dict) else None)
        if task is None or not isinstance(task.get("data"), dict):
            raise ValueError(f"{action}: annotation {annotation['id']} comes without its task's data")
        result = annotation.get("result")
        events.append(Learn(project, annotation["id"], task, result if isinstance(result, list) else [], config,
                            bool(annotation.get("was_cancelled"))))
    return events


class Learner:
    """Runs learning events against the service's model and bank, on a background thread."""

    def __init__(self, service: PredictionService, credentials_for: Callable[[int], Credentials],
                 max_pending: int = 1000) -> None:
        if service.bank is None:
            raise ValueError("the service has no prototype bank (RFCLIP_PROTOTYPES=off)")
        self.service, self.bank = service, service.bank
        self.credentials_for = credentials_for
        self._pending: "queue.Queue[Event]" = queue.Queue(maxsize=max_pending)
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()

    def submit(self, events: List[Event]) -> int:
        """Queues the events for the background thread; returns how many did not fit (logged:
        `rfclip-backend learn` catches up on them)."""
        self._start()
        dropped = 0
        for event in events:
            try:
                self._pending.put_nowait(event)
            except queue.Full:
                dropped += 1
        if dropped:
            log.error("learning is %d annotations behind; %d left out (run `rfclip-backend learn --project ID` "
                      "to catch up)", self._pending.qsize(), dropped)
        return dropped

    def wait_idle(self, timeout_s: float) -> bool:
        """Whether every queued event was handled within the timeout."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._pending.join(), done.set()), daemon=True).start()
        return done.wait(timeout_s)

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                # a daemon thread: learning must never hold up the process's exit
                self._thread = threading.Thread(target=self._loop, name="rfclip-learner", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            event = self._pending.get()
            try:
                self.handle(event)
            except Exception:
                log.exception("project %s: learning failed", event.project)
            finally:
                self._pending.task_done()

    def handle(self, event: Event) -> Dict[LabelKey, Example]:
        """Applies one event now; returns what a Learn taught (empty for a Forget). Failures of
        an annotation (its image, its config, the bank) are logged and raised."""
        if isinstance(event, Forget):
            removed = self.bank.remove(event.project, event.annotations)
            log.info("project %s: %d of %d deleted annotations forgotten", event.project, removed,
                     len(event.annotations))
            return {}
        taught = {} if event.cancelled else self.examples(event)
        self.bank.put(event.project, event.annotation, _id(event.task.get("id")) or 0, taught)
        counts = self.bank.counts(event.project)
        log.info("project %s: annotation %s taught %s", event.project, event.annotation,
                 ", ".join(f"{label} ({counts.get((control, label), 0)} examples)" for control, label in taught)
                 or "nothing (no region of a predicted label)")
        return taught

    def examples(self, event: Learn) -> Dict[LabelKey, Example]:
        """Each (control, label)'s example from the annotation's masks. Raises LabelConfigError,
        MediaError or ModelUnavailable for the annotation as a whole."""
        targets = self.service.targets(event.label_config)
        masks = label_masks(event.result, targets, self.service.settings.max_image_pixels)
        taught: Dict[LabelKey, Example] = {}
        credentials = self.credentials_for(event.project)
        for data_key, per_label in masks.items():
            reference = event.task["data"].get(data_key)
            picture = self.service.fetcher.fetch(reference, _id(event.task.get("id")), credentials)
            keys = list(per_label)
            stacked = np.stack([fit(per_label[key], picture.rgb.shape[:2]) for key in keys])
            for key, example in zip(keys, self.service.learn(picture.rgb, stacked)):
                if example is not None:
                    taught[key] = example
        return taught

