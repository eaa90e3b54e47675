"""The prototype bank: what each annotation taught, per project, keyed by annotation id so that an
update replaces its contribution and a delete removes it.

With REDIS_URL the bank is a Redis hash per project and model (`rfclip:prototypes:<model
version>:<project>`, one field per annotation), shared by every worker and replica and kept
across restarts; a revision counter beside it lets each process reload only after a change.
Without Redis it lives in the process. The key holds the exact model version (weights and
method settings): features of another model never mix in, and a project's examples never reach
another project. An entry is JSON (vectors as base64 float32), never pickle: whoever can write
to Redis must not be able to run code here.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, defaultdict
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import redis
import torch

from rfclip_engine.prototypes import Example

from .annotations import LabelKey

log = logging.getLogger("rfclip.backend.learning")
Examples = Dict[LabelKey, List[Example]]  # oldest first
KEEP_S = 90 * 24 * 3600  # a project's bank in Redis lasts this long after its last change


def encode(task: int, examples: Mapping[LabelKey, Example], added: float) -> bytes:
    labels = [{"control": control, "label": label, "inside": e.inside, "outside": e.outside, "pixels": e.pixels,
               "vector": base64.b64encode(e.vector.to(torch.float32).numpy().tobytes()).decode()}
              for (control, label), e in examples.items()]
    return json.dumps({"task": task, "added": added, "labels": labels}).encode()


def decode(raw: bytes) -> Tuple[float, Dict[LabelKey, Example]]:
    entry = json.loads(raw)
    examples = {}
    for item in entry["labels"]:
        vector = torch.from_numpy(np.frombuffer(base64.b64decode(item["vector"]), dtype=np.float32).copy())
        example = Example(vector, float(item["inside"]), float(item["outside"]), int(item["pixels"]))
        # a NaN would make every pixel score NaN against the label: the entry is left out instead
        if not (bool(torch.isfinite(vector).all()) and math.isfinite(example.inside) and
                math.isfinite(example.outside) and example.pixels > 0):
            raise ValueError("an example that is not finite")
        examples[(item["control"], item["label"])] = example
    return float(entry["added"]), examples


def _added(raw: bytes) -> float:
    """When the entry was written; one that does not decode counts as the oldest, to go first."""
    try:
        return float(json.loads(raw)["added"])
    except (ValueError, KeyError, TypeError):
        return -math.inf


def group(entries: Iterable[bytes]) -> Examples:
    """Every annotation's examples, per label, oldest annotation first; an entry that does not
    decode (written by someone else) is left out with a warning, never fails a prediction."""
    decoded = []
    for raw in entries:
        try:
            decoded.append(decode(raw))
        except (ValueError, KeyError, TypeError) as err:
            log.warning("a prototype bank entry is left out: it does not decode (%s)", type(err).__name__)
    decoded.sort(key=lambda pair: pair[0])
    out: Examples = defaultdict(list)
    for _, examples in decoded:
        for key, example in examples.items():
            out[key].append(example)
    return dict(out)


def fingerprint(examples: Examples) -> str:
    """Changes when a label's example count crosses 1, 2, 4, 8, ... ("" with none): the model
    version moves with the bank only when the predictions would move materially."""
    buckets = sorted((control, label, int(math.log2(len(found)))) for (control, label), found in examples.items()
                     if found)
    if not buckets:
        return ""
    return hashlib.sha1(json.dumps(buckets).encode()).hexdigest()[:6]


class PrototypeBank(ABC):
    """The bank's operations; `MemoryBank` and `RedisBank` store the entries. `examples` keeps
    the last decoded state per project and decodes again only when the revision moved."""

    def __init__(self, max_annotations: int, max_projects: int) -> None:
        self.max_annotations, self.max_projects = max_annotations, max_projects
        self._cache: "OrderedDict[int, Tuple[int, Examples]]" = OrderedDict()  # the most recently used projects
        self._cache_lock = threading.Lock()

    def put(self, project: int, annotation: int, task: int, examples: Mapping[LabelKey, Example]) -> None:
        """What `annotation` teaches from now on (nothing: forget it); past `max_annotations`
        the oldest entries of the project go."""
        if not examples:
            self.remove(project, [annotation])
            return
        self._store(project, annotation, encode(task, examples, time.time()))

    def examples(self, project: int) -> Examples:
        revision = self.revision(project)
        with self._cache_lock:
            cached = self._cache.get(project)
            if cached is not None and cached[0] == revision:
                return cached[1]
        loaded = group(self._entries(project).values())
        with self._cache_lock:
            self._cache[project] = (revision, loaded)
            self._cache.move_to_end(project)
            while len(self._cache) > self.max_projects:
                self._cache.popitem(last=False)
        return loaded

    def last(self, project: int) -> Examples:
        """The state `examples` last read (empty if none): for when the store does not answer."""
        with self._cache_lock:
            cached = self._cache.get(project)
        return cached[1] if cached is not None else {}

    def counts(self, project: int) -> Dict[LabelKey, int]:
        return {key: len(found) for key, found in self.examples(project).items()}

    def annotations(self, project: int) -> List[int]:
        """Ids of the annotations the project's bank holds."""
        return sorted(self._entries(project))

    @staticmethod
    def _oldest(entries: Mapping[int, bytes], count: int) -> List[int]:
        """The `count` (may be <= 0: none) annotations added first."""
        if count <= 0:
            return []
        return [a for _, a in sorted((_added(raw), a) for a, raw in entries.items())[:count]]

    @abstractmethod
    def revision(self, project: int) -> int:
        """A number that changes whenever the project's entries do."""

    @abstractmethod
    def remove(self, project: int, annotations: Iterable[int]) -> int:
        """Forgets the annotations; returns how many were there."""

    @abstractmethod
    def _store(self, project: int, annotation: int, raw: bytes) -> None: ...

    @abstractmethod
    def _entries(self, project: int) -> Dict[int, bytes]: ...


class MemoryBank(PrototypeBank):
    """The bank of one process (no REDIS_URL): the `max_projects` most recently taught projects."""

    def __init__(self, max_annotations: int = 2000, max_projects: int = 1000) -> None:
        super().__init__(max_annotations, max_projects)
        self._lock = threading.Lock()
        self._data: "OrderedDict[int, Dict[int, bytes]]" = OrderedDict()
        # of the projects held only; stamps from one counter, so a project evicted and taught
        # again never reads as a state decoded before
        self._revisions: Dict[int, int] = {}
        self._stamps = itertools.count(1)

    def revision(self, project: int) -> int:
        with self._lock:
            return self._revisions.get(project, 0)

    def remove(self, project: int, annotations: Iterable[int]) -> int:
        with self._lock:
            removed = sum(self._data.get(project, {}).pop(a, None) is not None for a in annotations)
            if removed:
                self._revisions[project] = next(self._stamps)
            return removed

    def _store(self, project: int, annotation: int, raw: bytes) -> None:
        with self._lock:
            entries = self._data.setdefault(project, {})
            self._data.move_to_end(project)
            entries[annotation] = raw
            for old in self._oldest(entries, len(entries) - self.max_annotations):
                del entries[old]
            self._revisions[project] = next(self._stamps)
            while len(self._data) > self.max_projects:
                evicted, _ = self._data.popitem(last=False)
                del self._revisions[evicted]

    def _entries(self, project: int) -> Dict[int, bytes]:
        with self._lock:
            return dict(self._data.get(project, {}))


class RedisBank(PrototypeBank):
    """The bank in Redis, shared by every process of this model version. Raises RedisError
    when Redis does not answer: the caller decides (learning fails visibly, predictions go on
    with the last state they read)."""

    def __init__(self, client: redis.Redis, model_version: str, max_annotations: int = 2000,
                 max_projects: int = 1000) -> None:
        super().__init__(max_annotations, max_projects)
        self.client = client
        self.prefix = f"rfclip:prototypes:{model_version}"

    @classmethod
    def from_url(cls, url: str, model_version: str, max_annotations: int = 2000,
                 max_projects: int = 1000) -> "RedisBank":
        return cls(redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0), model_version,
                   max_annotations, max_projects)

    def _key(self, project: int) -> str:
        return f"{self.prefix}:{project}"

    def revision(self, project: int) -> int:
        return int(self.client.get(self._key(project) + ":revision") or 0)

    def remove(self, project: int, annotations: Iterable[int]) -> int:
        fields = [str(a) for a in annotations]
        if not fields:
            return 0
        pipe = self.client.pipeline()
        pipe.hdel(self._key(project), *fields)
        pipe.incr(self._key(project) + ":revision")
        pipe.expire(self._key(project) + ":revision", KEEP_S)
        removed = pipe.execute()[0]
        return int(removed)

    def _store(self, project: int, annotation: int, raw: bytes) -> None:
        key = self._key(project)
        pipe = self.client.pipeline()
        pipe.hset(key, str(annotation), raw)
        pipe.hlen(key)
        pipe.incr(key + ":revision")
        for name in (key, key + ":revision"):
            pipe.expire(name, KEEP_S)
        size = pipe.execute()[1]
        if size > self.max_annotations:
            self.remove(project, self._oldest(self._entries(project), size - self.max_annotations))

    def _entries(self, project: int) -> Dict[int, bytes]:
        return {int(a): raw for a, raw in self.client.hgetall(self._key(project)).items()}


def open_bank(redis_url: Optional[str], model_version: str, max_annotations: int, max_projects: int) -> PrototypeBank:
    if redis_url:
        return RedisBank.from_url(redis_url, model_version, max_annotations, max_projects)
    return MemoryBank(max_annotations, max_projects)
