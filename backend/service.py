"""The prediction service behind /predict: tasks in, one Label Studio entry per task out.

Every task is isolated: a task whose image cannot be fetched or read gets `[]` (nothing stored,
Label Studio asks again later) and one log line with its id and the reason. Tasks not reached
within the time budget also get `[]`, and so does every task of a request whose class names
still need text embeddings when the budget runs out (those go on in the background, as they do
after every /setup, so Label Studio's next request finds them cached). A predicted task gets
`{"result": [...], "score", "model_version"}`, where the task score is the mean top-class
probability over all pixels the backend labeled (0 when it labeled none): low means the model
was unsure, so reviewers can sort by it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from label_studio_sdk.label_interface import LabelInterface

from rfclip_engine import __version__ as engine_version
from rfclip_engine.config import RFCLIPConfig, SegmenterConfig, default_precision
from rfclip_engine.predictor import Segmenter
from rfclip_engine.text import TEMPLATE_SET, TextEmbedder, Vocabulary

from .label_config import ControlTarget, LabelConfigError, read_label_config, targets_by_image
from .media import Credentials, ImageFetcher, MediaError
from .model_lock import ModelLock
from .regions import brush_region, polygon_regions
from .settings import Settings

log = logging.getLogger("rfclip.backend")
NOT_PREDICTED: list = []  # Label Studio stores nothing for this task and asks again later
WARM_UP_MODEL_WAIT_S = 3600.0  # a first start may download the weights


class ModelUnavailable(RuntimeError):
    pass


class ModelHolder:
    """Loads the segmenter once per process, in the background, on first use (so after any
    fork), while /health keeps answering."""

    def __init__(self, load: Callable[[], Segmenter]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._segmenter: Optional[Segmenter] = None
        self.error: Optional[str] = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rfclip-model-loader", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self._segmenter = self._load()
            log.info("model loaded in %.1f s", time.monotonic() - started)
        except Exception as err:  # reported by /health and every /predict
            self.error = f"{type(err).__name__}: {err}"
            log.error("model could not be loaded: %s", self.error)
        finally:
            self._ready.set()

    @property
    def state(self) -> str:
        if self._thread is None:
            return "not loaded"
        if not self._ready.is_set():
            return "loading"
        return "failed" if self.error else "ready"

    def get(self, timeout_s: float) -> Segmenter:
        self.start()
        if not self._ready.wait(max(0.0, timeout_s)):
            raise ModelUnavailable("the model is still loading")
        if self._segmenter is None:
            raise ModelUnavailable(f"the model could not be loaded: {self.error}")
        return self._segmenter


def segmenter_config(settings: Settings, device: torch.device) -> SegmenterConfig:
    return SegmenterConfig(encoder=RFCLIPConfig(mode=settings.mode), pamr=settings.pamr,
                           precision=default_precision(device.type))


def model_version(settings: Settings) -> str:
    """Readable and stable; changes when the model, its weights or any method setting change."""
    weights = settings.weights_tag or settings.pretrained
    weights_path = Path(settings.pretrained)
    identity = {"engine": engine_version, "model": settings.model, "pretrained": settings.pretrained,
                "weights_tag": settings.weights_tag, "dims": settings.distraction_dims,
                "config": asdict(segmenter_config(settings, torch.device("cpu"))), "templates": TEMPLATE_SET}
    if weights_path.is_file() or "/" in settings.pretrained or "\\" in settings.pretrained:
        # a file's name only: the version is shown to anyone who asks /health
        weights = settings.weights_tag or weights_path.stem
    if weights_path.is_file():
        stat = weights_path.stat()
        identity["file"] = [stat.st_size, int(stat.st_mtime)]
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    suffix = "-pamr" if settings.pamr else ""
    return f"rfclip-{settings.model}-{weights}-{settings.mode}{suffix}-{digest}"


@lru_cache(maxsize=64)
def _parsed_config(label_config: str) -> Tuple[Tuple[ControlTarget, ...], LabelInterface]:
    targets, interface = read_label_config(label_config)
    return tuple(targets), interface


@dataclass
class _Job:
    """One /predict request on its way through the model, and where its time went."""

    tasks: List[dict]
    groups: Dict[str, List[ControlTarget]]
    interface: LabelInterface
    segmenter: Segmenter
    credentials: Credentials
    deadline: float
    stage_seconds: Dict[str, float] = field(default_factory=lambda: defaultdict(float))
    fetches: Dict[int, Future] = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)

    def fetch_until(self, stop: int, pool: ThreadPoolExecutor, fetch: Callable) -> None:
        """Start fetching the images of every task before `stop` not started yet."""
        for i in range(len(self.fetches), min(stop, len(self.tasks))):
            self.fetches[i] = pool.submit(fetch, self.tasks[i], self.groups, self.credentials)

    def cancel_fetches(self) -> None:
        for future in self.fetches.values():
            future.cancel()

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[stage] += time.perf_counter() - started

    @property
    def queries(self) -> Tuple[str, ...]:
        """Every class query of every control, once each."""
        return _config_queries(self.groups)


class PredictionService:
    """Answers /predict requests with the model held by a `ModelHolder`."""

    def __init__(self, settings: Settings, holder: ModelHolder, fetcher: ImageFetcher, images_per_batch: int = 4) -> None:
        self.settings = settings
        self.holder = holder
        self.fetcher = fetcher
        self.model_version = model_version(settings)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rfclip-fetch")
        self._images_per_batch = images_per_batch
        self._seconds_per_batch = 0.0  # running estimate, to stop before the budget runs out
        self._seconds_per_text_batch = 0.0  # the last text-encoder batch's time, likewise
        self._lock = ModelLock()  # one request at a time through the model in this process
        self._warming: set = set()  # query tuples being embedded ahead
        self._warming_lock = threading.Lock()

    def targets(self, label_config: str) -> Sequence[ControlTarget]:
        """The controls to predict; raises LabelConfigError with an explanation, also when the
        config asks for more text queries than RFCLIP_MAX_QUERIES."""
        targets = _parsed_config(label_config)[0]
        count = len(_config_queries(targets_by_image(list(targets))))
        if count > self.settings.max_queries:
            raise LabelConfigError(f"the labeling config has {count} class names and synonyms, more than the "
                                   f"limit of {self.settings.max_queries} (RFCLIP_MAX_QUERIES)")
        return targets

    def warm_up(self, label_config: str) -> None:
        """Embed the config's class queries in the background, so that the /predict that follows
        (Label Studio sends /setup before every retrieve and task open) finds them cached. One
        text batch at a time holds the model, so requests in between are not held up for long."""
        self._warm_up_queries(_config_queries(targets_by_image(list(self.targets(label_config)))))

    def _warm_up_queries(self, queries: Tuple[str, ...]) -> None:
        with self._warming_lock:
            if queries in self._warming:
                return
            self._warming.add(queries)
        # a daemon thread: work ahead of time must never hold up the process's exit
        threading.Thread(target=self._warm, args=(queries,), name="rfclip-text-warm-up", daemon=True).start()

    def _warm(self, queries: Tuple[str, ...]) -> None:
        try:
            text = self.holder.get(WARM_UP_MODEL_WAIT_S).text
            started, computed = time.monotonic(), 0
            while True:
                with self._lock.background():  # one batch at a time; a waiting /predict goes first
                    embedded = self._embed_next_text_batch(text, queries)
                if not embedded:
                    break
                computed += embedded
            if computed:
                log.info("text embeddings of %d class names computed ahead in %.1f s",
                         computed, time.monotonic() - started)
        except ModelUnavailable as err:
            log.warning("class names not embedded ahead: %s", err)
        except Exception:
            log.exception("class names could not be embedded ahead")
        finally:
            with self._warming_lock:
                self._warming.discard(queries)

    def _embed_next_text_batch(self, text: TextEmbedder, queries: Sequence[str]) -> int:
        """Embeds and caches one text batch of the `queries` not cached yet, looked up now (another
        thread may have done some); returns how many. The caller holds the model."""
        batch = text.missing(queries)[:text.queries_per_batch]
        if batch:
            started = time.monotonic()
            text.embed_queries(batch)
            self._seconds_per_text_batch = time.monotonic() - started
        return len(batch)

    def _embed_text_until(self, job: _Job) -> List[str]:
        """Embeds the job's uncached queries a text batch at a time while the next batch fits
        before the deadline; returns those still missing."""
        text, queries = job.segmenter.text, job.queries
        while time.monotonic() + self._seconds_per_text_batch <= job.deadline:
            if not self._embed_next_text_batch(text, queries):
                return []
        return text.missing(queries)

    def predict(self, tasks: List[object], label_config: str, credentials: Credentials) -> List[object]:
        """One entry per task, in order; a task that is not a JSON object gets `[]`."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.settings.predict_budget_s
        entries: List[object] = [NOT_PREDICTED] * len(tasks)
        usable = []
        for n, item in enumerate(tasks):
            if isinstance(item, dict):
                usable.append(n)
            else:
                log.warning("task #%d of the request: not predicted: not a JSON object (%s)", n, type(item).__name__)
        targets, interface = _parsed_config(label_config)
        job_tasks = [tasks[n] for n in usable]
        try:
            segmenter = self.holder.get(deadline - time.monotonic() - 1.0)
        except ModelUnavailable as err:
            log.error("tasks %s not predicted: %s", _ids(job_tasks), err)
            return entries
        job = _Job(job_tasks, targets_by_image(list(targets)), interface, segmenter, credentials, deadline)
        # Images are on their way before the model is waited for: a slow host never holds it.
        job.fetch_until(2 * self._images_per_batch, self._pool, self._fetch_images)
        # Another request may hold the model; waiting must not outlast the budget either.
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            job.cancel_fetches()
            log.warning("tasks %s not reached within the %.0f s budget (the model was busy); Label Studio "
                        "will ask for them again", _ids(job_tasks), self.settings.predict_budget_s)
            return entries
        try:
            for n, entry in zip(usable, self._predict_in_order(job)):
                entries[n] = entry
        finally:
            self._lock.release()
        seconds = time.perf_counter() - started
        stages = ", ".join(f"{stage} {t:.2f} s" for stage, t in job.stage_seconds.items())
        log.info("tasks %s: %d of %d predicted in %.2f s (%s)", _ids(job_tasks), sum(e is not NOT_PREDICTED for e in entries),
                 len(tasks), seconds, stages, extra={"stage_seconds": dict(job.stage_seconds), "seconds": seconds})
        return entries

    def _predict_in_order(self, job: _Job) -> List[object]:
        """Tasks in groups of `images_per_batch` (their crops share the encoder's batches), the next
        groups' images fetched meanwhile. Every request runs its first group; later groups only
        while the estimate says they fit before the deadline."""
        tasks = job.tasks
        entries: List[object] = [NOT_PREDICTED] * len(tasks)
        with job.timed("text embeddings"):
            unembedded = self._embed_text_until(job)
        if unembedded:
            job.cancel_fetches()
            log.warning("tasks %s not predicted yet: %d of %d class names still need text embeddings after the "
                        "%.0f s budget; they go on in the background and Label Studio will ask again",
                        _ids(tasks), len(unembedded), len(job.queries), self.settings.predict_budget_s)
            self._warm_up_queries(job.queries)
            return entries
        size = self._images_per_batch
        for start in range(0, len(tasks), size):
            if start and time.monotonic() + self._seconds_per_batch > job.deadline:
                job.cancel_fetches()
                log.warning("tasks %s not reached within the %.0f s budget; Label Studio will ask for them again",
                            _ids(tasks[start:]), self.settings.predict_budget_s)
                break
            job.fetch_until(start + 2 * size, self._pool, self._fetch_images)
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
    def _fetched(job: _Job, i: int):
        """Task i's images, waited for at most until the deadline; None (logged) when they failed."""
        try:
            return job.fetches[i].result(timeout=max(0.0, job.deadline - time.monotonic()))
        except FutureTimeout:
            log.warning("task %s: not predicted: its image did not arrive within the %.0f s budget",
                        _task_id(job.tasks[i]), job.deadline - job.created)
        except MediaError as err:
            log.warning("task %s: not predicted: %s", _task_id(job.tasks[i]), err)
        except Exception:
            log.exception("task %s: image could not be fetched", _task_id(job.tasks[i]))
        return None

    def _predict_batch(self, job: _Job, ready):
        """(index, entry) for each fetched task; a batch that fails is retried task by task, so
        one bad task cannot take the others down."""
        if not ready:
            return []
        try:
            return list(zip((i for i, _ in ready), self._predict_tasks(job, ready)))
        except Exception:
            if len(ready) == 1:
                log.exception("task %s: prediction failed", _task_id(job.tasks[ready[0][0]]))
                return []
        return [pair for item in ready for pair in self._predict_batch(job, [item])]

    def _update_estimate(self, seconds: float) -> None:
        previous = self._seconds_per_batch
        self._seconds_per_batch = seconds if previous == 0 else 0.7 * previous + 0.3 * seconds

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

    def _predict_tasks(self, job: _Job, ready) -> List[dict]:
        """Entries for the fetched tasks; each image key's images go through the model together."""
        regions: List[List[dict]] = [[] for _ in ready]
        labeled_pixels = [0] * len(ready)
        probability_sums = [0.0] * len(ready)
        for key, targets in job.groups.items():
            union = Vocabulary(tuple(c for target in targets for c in target.vocabulary.classes))
            pictures = [images[key] for _, images in ready]
            all_logits = job.segmenter.logits_many([p.rgb for p in pictures], union, job.timed)
            for n, (picture, logits) in enumerate(zip(pictures, all_logits)):
                start = 0
                for target in targets:
                    classes = len(target.vocabulary)
                    found, pixels, probability = self._target_regions(
                        job, logits[start:start + classes], picture.size, target)
                    start += classes
                    regions[n].extend(found)
                    labeled_pixels[n] += pixels
                    probability_sums[n] += probability
        entries = []
        for n, (i, _) in enumerate(ready):
            valid = []
            with job.timed("validation"):
                for region in regions[n]:
                    errors = job.interface.validate_prediction({"result": [region]}, return_errors=True)
                    if errors:
                        log.error("task %s: dropped a region that does not fit the config: %s",
                                  _task_id(job.tasks[i]), errors[0])
                    else:
                        valid.append(region)
            score = probability_sums[n] / labeled_pixels[n] if labeled_pixels[n] else 0.0
            entries.append({"result": valid, "score": round(score, 4), "model_version": self.model_version})
        return entries

    def _target_regions(self, job: _Job, logits, size, target: ControlTarget) -> Tuple[List[dict], int, float]:
        """One control's regions in one image, with its labeled pixel count and probability sum.
        A region's score is the mean probability of its label inside it (its pixels' top one)."""
        with job.timed("labels at full size"):
            prediction = job.segmenter.decide(logits, target.vocabulary.names, size, target.score_threshold)
            label_map = prediction.label_map.numpy()
        regions, pixels, probability = [], 0, 0.0
        with job.timed("regions"):
            for c, label in enumerate(target.labels):  # classes past the labels are background queries
                count = int(prediction.pixel_counts[c])
                if count == 0:
                    continue
                score = float(prediction.confidence[c])
                pixels += count
                probability += score * count
                regions.extend(self._regions(label_map == c, label, target, score))
        return regions, pixels, probability

    @staticmethod
    def _regions(mask: np.ndarray, label: str, target: ControlTarget, score: float) -> List[dict]:
        if target.region_type == "brushlabels":
            return [brush_region(mask, label, target.from_name, target.to_name, score)]
        return polygon_regions(mask, label, target.from_name, target.to_name, score)


def _config_queries(groups: Dict[str, List[ControlTarget]]) -> Tuple[str, ...]:
    queries = (q for targets in groups.values() for target in targets for q in target.vocabulary.queries)
    return tuple(dict.fromkeys(queries))


def _task_id(task: dict) -> str:
    """A task's id fit for a log line: an int as it is, anything else quoted and cut short."""
    value = task.get("id")
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else repr(value)[:40]


def _ids(tasks: Sequence[dict]) -> str:
    ids = [_task_id(t) for t in tasks]
    shown = ", ".join(ids[:20])
    return shown + (f" (+{len(ids) - 20} more)" if len(ids) > 20 else "")
