"""The one prediction pipeline: tasks -> images -> logits -> regions -> Label Studio entries.

/predict (with its budget) and the job workers (without one) both run tasks through here. Every
task is isolated: a task whose image cannot be fetched or read, or whose prediction fails, gets
`[]` (nothing stored, Label Studio asks again later), one log line with its id and the reason,
and the reason in `Job.failures`. A predicted task gets `{"result": [...], "score",
"model_version"}`, where the task score is the mean margin (top minus second class probability)
over all pixels the backend labeled (0 when it labeled none): low means the model hesitated
between labels, so sorting by score ascending puts the tasks to review first on top (README,
"Active learning", has the measured comparison behind this choice). A region's score is the mean
probability of its label inside it.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ContextManager, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
from label_studio_sdk.label_interface import LabelInterface

from rfclip_engine.batches import run_isolated
from rfclip_engine.config import images_per_batch
from rfclip_engine.predictor import Segmenter
from rfclip_engine.prototypes import Example, Prototypes
from rfclip_engine.text import Vocabulary

from .label_config import ControlTarget, read_label_config
from .learning.annotations import LabelKey
from .media import Credentials, ImageFetcher, MediaError
from .regions import brush_region, polygon_regions

log = logging.getLogger("rfclip.backend")
NOT_PREDICTED: list = []  # Label Studio stores nothing for this task and asks again later


@lru_cache(maxsize=64)
def parsed_config(label_config: str) -> Tuple[Tuple[ControlTarget, ...], LabelInterface]:
    targets, interface = read_label_config(label_config)
    return tuple(targets), interface


@contextmanager
def timed_into(stage_seconds: Dict[str, float], stage: str) -> Iterator[None]:
    """Adds the block's wall time to `stage_seconds[stage]`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        stage_seconds[stage] = stage_seconds.get(stage, 0.0) + time.perf_counter() - started


@dataclass
class Job:
    """Tasks on their way through the model (one /predict, or one chunk of a job), where their
    time went and why any failed. `deadline` is a time.monotonic() value (inf: none).
    `examples`: the project's learned examples per (control, label); `model_version` the
    version their entries carry (it moves with the examples)."""

    tasks: List[dict]
    groups: Dict[str, List[ControlTarget]]
    interface: LabelInterface
    segmenter: Segmenter
    credentials: Credentials
    deadline: float
    model_version: str
    examples: Mapping[LabelKey, List[Example]] = field(default_factory=dict)
    stage_seconds: Dict[str, float] = field(default_factory=lambda: defaultdict(float))
    fetches: Dict[int, Future] = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)
    failures: Dict[int, str] = field(default_factory=dict)  # task index -> reason
    late: Set[int] = field(default_factory=set)  # failed for the budget alone: images still on their way

    def fail(self, i: int, reason: str) -> None:
        log.warning("task %s: not predicted: %s", task_id(self.tasks[i]), reason)
        self.failures[i] = reason

    def cancel_fetches(self) -> None:
        for future in self.fetches.values():
            future.cancel()

    def timed(self, stage: str) -> ContextManager[None]:
        return timed_into(self.stage_seconds, stage)

    @property
    def images_per_batch(self) -> int:
        """Tasks whose crops share the encoder's batches, as the segmenter's batch size suits."""
        return images_per_batch(self.segmenter.config.batch_size)

    @property
    def queries(self) -> Tuple[str, ...]:
        """Every class query of every control, once each."""
        return config_queries(self.groups)


class Pipeline:
    """Runs jobs through the model; the caller holds the model while it does."""

    def __init__(self, fetcher: ImageFetcher, fetch_threads: int = 4) -> None:
        self.fetcher = fetcher
        self.seconds_per_batch = 0.0  # running estimate, to stop before a deadline
        self._pool = ThreadPoolExecutor(max_workers=fetch_threads, thread_name_prefix="rfclip-fetch")

    def fetch_until(self, job: Job, stop: int) -> None:
        """Start fetching the images of every task before `stop` not started yet."""
        for i in range(len(job.fetches), min(stop, len(job.tasks))):
            job.fetches[i] = self._pool.submit(self._fetch_images, job.tasks[i], job.groups, job.credentials)

    def run(self, job: Job) -> List[object]:
        """Entries for the job's tasks: in groups of its `images_per_batch` (their crops share the
        encoder's batches), the next groups' images fetched meanwhile. The first group always
        runs; later ones only while the estimate says they fit before the deadline. A task that
        fails gets NOT_PREDICTED and its reason in `job.failures`."""
        tasks = job.tasks
        entries: List[object] = [NOT_PREDICTED] * len(tasks)
        size = job.images_per_batch
        for start in range(0, len(tasks), size):
            if start and time.monotonic() + self.seconds_per_batch > job.deadline:
                job.cancel_fetches()
                log.warning("tasks %s not reached within the %.0f s budget; Label Studio will ask for them again",
                            ids(tasks[start:]), job.deadline - job.created)
                break
            self.fetch_until(job, start + 2 * size)
            ready = []
            with job.timed("waiting for images"):
                for i in range(start, min(start + size, len(tasks))):
                    image = self._fetched(job, i)
                    if image is not None:
                        ready.append((i, image))
            started = time.monotonic()
            for i, entry in self._predict_batch(job, ready):
                entries[i] = entry
            if ready:
                self._update_estimate(time.monotonic() - started)
        return entries

    @staticmethod
    def _fetched(job: Job, i: int):
        """Task i's images, waited for at most until the deadline; None (logged) when they failed."""
        try:
            wait = None if job.deadline == float("inf") else max(0.0, job.deadline - time.monotonic())
            return job.fetches[i].result(timeout=wait)
        except FutureTimeout:
            job.fail(i, f"its image did not arrive within the {job.deadline - job.created:.0f} s budget")
            job.late.add(i)
        except MediaError as err:
            job.fail(i, str(err))
        except Exception as err:
            log.exception("task %s: image could not be fetched", task_id(job.tasks[i]))
            job.failures[i] = f"image could not be fetched: {type(err).__name__}"
        return None

    def _predict_batch(self, job: Job, ready):
        """(index, entry) for each fetched task; a batch that fails is retried task by task, so
        one bad task cannot take the others down."""
        pairs = []
        for (i, _), outcome in zip(ready, run_isolated(ready, lambda items: self._predict_tasks(job, items),
                                                        (Exception,))):
            if isinstance(outcome, BaseException):
                log.error("task %s: prediction failed", task_id(job.tasks[i]), exc_info=outcome)
                job.failures[i] = "prediction failed (see the log)"
            else:
                pairs.append((i, outcome))
        return pairs

    def _update_estimate(self, seconds: float) -> None:
        previous = self.seconds_per_batch
        self.seconds_per_batch = seconds if previous == 0 else 0.7 * previous + 0.3 * seconds

    def _fetch_images(self, task: dict, groups: Dict[str, List[ControlTarget]], credentials: Credentials):
        data = task.get("data")
        if not isinstance(data, dict):
            raise MediaError("task has no data")
        images = {}
        for key in groups:
            if key not in data:
                raise MediaError(f"task data has no {key!r} field (the config's <Image value=\"${key}\">)")
            # the id goes into Label Studio's presign URL: only a real task id may
            task_id = task.get("id") if isinstance(task.get("id"), int) else None
            images[key] = self.fetcher.fetch(data[key], task_id, credentials)
        return images

    def _predict_tasks(self, job: Job, ready) -> List[dict]:
        """Entries for the fetched tasks; each image key's images go through the model together."""
        regions: List[List[dict]] = [[] for _ in ready]
        labeled_pixels = [0] * len(ready)
        margin_sums = [0.0] * len(ready)
        for key, targets in job.groups.items():
            union = Vocabulary(tuple(c for target in targets for c in target.vocabulary.classes))
            pictures = [images[key] for _, images in ready]
            prototypes = class_prototypes(job, targets)
            all_logits = job.segmenter.logits_many([p.rgb for p in pictures], union, job.timed, prototypes=prototypes)
            for n, (picture, logits) in enumerate(zip(pictures, all_logits)):
                start = 0
                for target in targets:
                    classes = len(target.vocabulary)
                    found, pixels, margin = self._target_regions(
                        job, logits[start:start + classes], picture.size, target)
                    start += classes
                    regions[n].extend(found)
                    labeled_pixels[n] += pixels
                    margin_sums[n] += margin
        entries = []
        for n, (i, _) in enumerate(ready):
            valid = []
            with job.timed("validation"):
                for region in regions[n]:
                    errors = job.interface.validate_prediction({"result": [region]}, return_errors=True)
                    if errors:
                        log.error("task %s: dropped a region that does not fit the config: %s",
                                  task_id(job.tasks[i]), errors[0])
                    else:
                        valid.append(region)
            score = margin_sums[n] / labeled_pixels[n] if labeled_pixels[n] else 0.0
            entries.append({"result": valid, "score": round(score, 4), "model_version": job.model_version})
        return entries

    def _target_regions(self, job: Job, logits, size, target: ControlTarget) -> Tuple[List[dict], int, float]:
        """One control's regions in one image, with its labeled pixel count and margin sum."""
        with job.timed("labels at full size"):
            prediction = job.segmenter.decide(logits, target.vocabulary.names, size, target.score_threshold)
            label_map = prediction.label_map.numpy()
        regions, pixels, margin = [], 0, 0.0
        with job.timed("regions"):
            for c, label in enumerate(target.labels):  # classes past the labels are background queries
                count = int(prediction.pixel_counts[c])
                if count == 0:
                    continue
                pixels += count
                margin += float(prediction.margin[c]) * count
                regions.extend(self._regions(label_map == c, label, target, float(prediction.confidence[c])))
        return regions, pixels, margin

    @staticmethod
    def _regions(mask: np.ndarray, label: str, target: ControlTarget, score: float) -> List[dict]:
        if target.region_type == "brushlabels":
            return [brush_region(mask, label, target.from_name, target.to_name, score)]
        return polygon_regions(mask, label, target.from_name, target.to_name, score)


def class_prototypes(job: Job, targets: Sequence[ControlTarget]) -> Optional[Prototypes]:
    """The prototypes of the union vocabulary of `targets` (their labels, then each one's
    background class), or None when the project has taught none of them."""
    if not job.examples:
        return None
    per_class: List[List[Example]] = []
    for target in targets:
        per_class.extend(job.examples.get((target.from_name, label), []) for label in target.labels)
        per_class.extend([] for _ in range(len(target.vocabulary) - len(target.labels)))
    return job.segmenter.prototypes(per_class)


def config_queries(groups: Dict[str, List[ControlTarget]]) -> Tuple[str, ...]:
    queries = (q for targets in groups.values() for target in targets for q in target.vocabulary.queries)
    return tuple(dict.fromkeys(queries))


def task_id(task: dict) -> str:
    """A task's id fit for a log line: an int as it is, anything else quoted and cut short."""
    value = task.get("id")
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else repr(value)[:40]


def ids(tasks: Sequence[dict]) -> str:
    """The tasks' ids for a log line, the first 20 of them."""
    shown = [task_id(t) for t in tasks]
    return ", ".join(shown[:20]) + (f" (+{len(shown) - 20} more)" if len(shown) > 20 else "")
