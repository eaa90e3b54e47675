"""The prediction service behind /predict: the model, its lock, the time budget, and class
names embedded ahead; the tasks themselves go through the one pipeline (`pipeline.py`).

Tasks not reached within the time budget get `[]`, and so does every task of a request whose
class names still need text embeddings when the budget runs out (those go on in the
background, as they do after every /setup, so Label Studio's next request finds them cached).
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from redis.exceptions import RedisError

from rfclip_engine import __version__ as engine_version
from rfclip_engine.config import (
    RFCLIPConfig,
    SegmenterConfig,
    default_batch_size,
    default_precision,
    labelling_settings,
    resolve_precision,
)
from rfclip_engine.predictor import Segmenter
from rfclip_engine.prototypes import Example
from rfclip_engine.text import TEMPLATE_SET, TextEmbedder

from .label_config import ControlTarget, LabelConfigError, targets_by_image
from .learning.bank import Examples, PrototypeBank, fingerprint
from .media import Credentials, ImageFetcher
from .model_lock import ModelLock
from .pipeline import NOT_PREDICTED, Job, Pipeline, config_queries, ids, parsed_config
from .settings import Settings

log = logging.getLogger("rfclip.backend")
WARM_UP_MODEL_WAIT_S = 3600.0  # a first start may download the weights


class ModelUnavailable(RuntimeError):
    pass


class ModelHolder:
    """Loads the segmenter once per process, in the background, on first use (so after any
    fork), while /health keeps answering. The loader is not a daemon: a process that ends while
    it is inside torch aborts ("terminate called without an active exception"), so an exit
    waits for the load in progress."""

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
                self._thread = threading.Thread(target=self._run, name="rfclip-model-loader")
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
    return SegmenterConfig(encoder=RFCLIPConfig(mode=settings.mode, triton_kernels=settings.triton_kernels),
                           pamr=settings.pamr,
                           precision=resolve_precision(settings.precision, device.type), prototype_k=settings.prototype_k,
                           batch_size=settings.batch_size or default_batch_size(device.type),
                           prototype_cap=settings.prototype_cap, cuda_graphs=settings.cuda_graphs)


def model_version(settings: Settings) -> str:
    """Readable and stable; changes when the model, its weights or any method setting change."""
    weights = settings.weights_tag or settings.pretrained
    weights_path = Path(settings.pretrained)
    # how the forward is executed does not change what it predicts; the batch and the precision
    # stand at the CPU's defaults, as in the versions hashed before they were left out
    cpu = torch.device("cpu")
    config = {**labelling_settings(segmenter_config(settings, cpu)), "batch_size": default_batch_size(cpu.type),
              "precision": default_precision(cpu.type)}
    identity = {"engine": engine_version, "model": settings.model, "pretrained": settings.pretrained,
                "weights_tag": settings.weights_tag, "dims": settings.distraction_dims,
                "config": config, "templates": TEMPLATE_SET}
    if weights_path.is_file() or "/" in settings.pretrained or "\\" in settings.pretrained:
        # a file's name only: the version is shown to anyone who asks /health
        weights = settings.weights_tag or weights_path.stem
    if weights_path.is_file():
        stat = weights_path.stat()
        identity["file"] = [stat.st_size, int(stat.st_mtime)]
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    suffix = "-pamr" if settings.pamr else ""
    model = Path(settings.model).stem if settings.model.endswith(".json") else settings.model  # a config file's name
    # Label Studio joins a task's versions with commas (its Data Manager column, which the job
    # listing reads), so a comma in a name would split this version in two there
    return f"rfclip-{model}-{weights}-{settings.mode}{suffix}-{digest}".replace(",", "_")


@dataclass
class Outcome:
    """What a run gives back: one entry per task, the reason for each task not predicted (by
    position), and which of those were not tried at all (the budget ran out, the model was busy
    or still loading): a job worker can still do those."""

    entries: List[object]
    failures: Dict[int, str]
    unreached: List[int] = field(default_factory=list)
    stage_seconds: Dict[str, float] = field(default_factory=dict)  # where the time went, as logged


class PredictionService:
    """Answers /predict requests with the model held by a `ModelHolder`."""

    def __init__(self, settings: Settings, holder: ModelHolder, fetcher: ImageFetcher,
                 bank: Optional[PrototypeBank] = None) -> None:
        self.settings = settings
        self.holder = holder
        self.fetcher = fetcher
        self.model_version = model_version(settings)  # without any project's examples
        self.bank = bank  # None: prototypes off
        self.pipeline = Pipeline(fetcher)
        self._seconds_per_text_batch = 0.0  # the last text-encoder batch's time, likewise
        self._lock = ModelLock()  # one request at a time through the model in this process
        self._warming: set = set()  # query tuples being embedded ahead
        self._warming_lock = threading.Lock()

    def examples_of(self, project: Optional[int]) -> Examples:
        """The project's learned examples; when the bank's Redis does not answer, the state last
        read (predictions go on without the newest corrections rather than fail)."""
        if self.bank is None or project is None:
            return {}
        try:
            return self.bank.examples(project)
        except RedisError as err:
            log.warning("project %s: the prototype bank is unreachable (%s); predicting with the examples last "
                        "read", project, type(err).__name__)
            return self.bank.last(project)

    def version_for(self, project: Optional[int], examples: Optional[Examples] = None) -> str:
        """The model version of the project's predictions: the model's, and a tag of how many
        examples each label has learned (it moves when a count crosses 1, 2, 4, 8, ...)."""
        tag = fingerprint(self.examples_of(project) if examples is None else examples)
        return f"{self.model_version}-p{tag}" if tag else self.model_version

    def learn(self, rgb: np.ndarray, masks: np.ndarray) -> List[Optional[Example]]:
        """The examples of (K, H, W) masks of one image, with the model held at background priority
        (a waiting /predict goes first)."""
        segmenter = self.holder.get(WARM_UP_MODEL_WAIT_S)
        with self._lock.background():
            return segmenter.examples(rgb, masks)

    def targets(self, label_config: str) -> Sequence[ControlTarget]:
        """The controls to predict; raises LabelConfigError with an explanation, also when the
        config asks for more text queries than RFCLIP_MAX_QUERIES."""
        targets = parsed_config(label_config)[0]
        count = len(config_queries(targets_by_image(list(targets))))
        if count > self.settings.max_queries:
            raise LabelConfigError(f"the labeling config has {count} class names and synonyms, more than the "
                                   f"limit of {self.settings.max_queries} (RFCLIP_MAX_QUERIES)")
        return targets

    def warm_up(self, label_config: str) -> None:
        """Embed the config's class queries in the background, so that the /predict that follows
        (Label Studio sends /setup before every retrieve and task open) finds them cached. One
        text batch at a time holds the model, so requests in between are not held up for long."""
        self._warm_up_queries(config_queries(targets_by_image(list(self.targets(label_config)))))

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
        started = time.monotonic()
        embedded = text.embed_next_batch(queries)
        if embedded:
            self._seconds_per_text_batch = time.monotonic() - started
        return embedded

    def _embed_text_until(self, job: Job) -> List[str]:
        """Embeds the job's uncached queries a text batch at a time while the next batch fits
        before the deadline; returns those still missing."""
        text, queries = job.segmenter.text, job.queries
        while time.monotonic() + self._seconds_per_text_batch <= job.deadline:
            if not self._embed_next_text_batch(text, queries):
                return []
        return text.missing(queries)

    def predict(self, tasks: List[object], label_config: str, credentials: Credentials,
                project: Optional[int] = None) -> Outcome:
        """A run within RFCLIP_PREDICT_BUDGET_S (for /predict)."""
        return self.run(tasks, label_config, credentials, self.settings.predict_budget_s, project)

    def run(self, tasks: List[object], label_config: str, credentials: Credentials,
            budget_s: Optional[float], project: Optional[int] = None) -> Outcome:
        """One entry per task, in order, and why each task not predicted was not. Without a
        budget (the job workers) it waits for the model and runs every task. The project's
        learned examples (if any) join the text."""
        started = time.perf_counter()
        deadline = time.monotonic() + budget_s if budget_s is not None else float("inf")
        outcome = Outcome([NOT_PREDICTED] * len(tasks), {})
        usable = []
        for n, item in enumerate(tasks):
            if isinstance(item, dict):
                usable.append(n)
            else:
                outcome.failures[n] = f"not a JSON object ({type(item).__name__})"
                log.warning("task #%d of the request: not predicted: %s", n, outcome.failures[n])
        targets, interface = parsed_config(label_config)
        job_tasks = [tasks[n] for n in usable]

        def not_predicted(reason: str) -> Outcome:
            outcome.failures.update({n: reason for n in usable})
            outcome.unreached = list(usable)
            return outcome

        try:
            segmenter = self.holder.get(deadline - time.monotonic() - 1.0 if budget_s else WARM_UP_MODEL_WAIT_S)
        except ModelUnavailable as err:
            log.error("tasks %s not predicted: %s", ids(job_tasks), err)
            return not_predicted(str(err))
        examples = self.examples_of(project)
        job = Job(job_tasks, targets_by_image(list(targets)), interface, segmenter, credentials, deadline,
                  self.version_for(project, examples), examples)
        # Images are on their way before the model is waited for: a slow host never holds it.
        self.pipeline.fetch_until(job, 2 * job.images_per_batch)
        # Another request may hold the model; waiting must not outlast the budget either.
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic()) if budget_s else None):
            job.cancel_fetches()
            log.warning("tasks %s not reached within the %.0f s budget (the model was busy); Label Studio "
                        "will ask for them again", ids(job_tasks), budget_s)
            return not_predicted("the model was busy for the whole budget")
        try:
            entries, unreached_reason = self._predict_in_order(job)
        finally:
            self._lock.release()
        for i, n in enumerate(usable):
            outcome.entries[n] = entries[i]
            if entries[i] is NOT_PREDICTED:
                outcome.failures[n] = job.failures.get(i, unreached_reason)
                if i not in job.failures or i in job.late:
                    outcome.unreached.append(n)
        seconds = time.perf_counter() - started
        outcome.stage_seconds = dict(job.stage_seconds)
        stages = ", ".join(f"{stage} {t:.2f} s" for stage, t in job.stage_seconds.items())
        log.info("tasks %s: %d of %d predicted in %.2f s (%s)", ids(job_tasks), len(tasks) - len(outcome.failures),
                 len(tasks), seconds, stages, extra={"stage_seconds": dict(job.stage_seconds), "seconds": seconds})
        return outcome

    def _predict_in_order(self, job: Job) -> Tuple[List[object], str]:
        """Tasks in groups of the job's `images_per_batch` (their crops share the encoder's
        batches), the next groups' images fetched meanwhile. Every request runs its first group;
        later groups only while the estimate says they fit before the deadline. Also says why the
        tasks that were not tried were not."""
        tasks = job.tasks
        entries: List[object] = [NOT_PREDICTED] * len(tasks)
        with job.timed("text embeddings"):
            unembedded = self._embed_text_until(job)
        if unembedded:
            job.cancel_fetches()
            log.warning("tasks %s not predicted yet: %d of %d class names still need text embeddings after the "
                        "%.0f s budget; they go on in the background and Label Studio will ask again",
                        ids(tasks), len(unembedded), len(job.queries), job.deadline - job.created)
            self._warm_up_queries(job.queries)
            return entries, "its class names still need text embeddings"
        return self.pipeline.run(job), "not reached within the budget"
