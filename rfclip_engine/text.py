"""Class vocabularies and their text embeddings.

A class is a list of queries (synonyms): "person, man, woman" is one class with three queries,
named by the first. Each query is embedded with the 80 OpenAI ImageNet prompt templates
(each prompt embedding L2-normalized, averaged, normalized again); a class scores the max over
its queries. Query embeddings go through an `EmbeddingCache` so a server can share them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import OPENAI_IMAGENET_TEMPLATES

from .files import prune_cache, write_whole
from .model import RFCLIPModel

log = logging.getLogger(__name__)

TEMPLATE_SET = "openai-imagenet-80"
ClassSpec = Union[str, Sequence[str]]


@dataclass(frozen=True)
class Vocabulary:
    """Classes, each a tuple of queries; the first query is the class's display name."""

    classes: Tuple[Tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("the vocabulary is empty: give at least one class name")
        for number, queries in enumerate(self.classes, 1):
            if not queries:
                raise ValueError(f"class {number} has no name")
            if not all(queries):
                raise ValueError(f"class {number} ({'|'.join(queries)!r}) has an empty name or synonym")

    @classmethod
    def from_names(cls, names: Iterable[ClassSpec]) -> "Vocabulary":
        """From strings ("person, man, woman" = one class with synonyms) or query sequences."""
        classes = []
        for spec in names:
            parts = spec.split(",") if isinstance(spec, str) else list(spec)
            classes.append(tuple(p.strip() for p in parts if p.strip()))
        return cls(tuple(classes))

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(queries[0] for queries in self.classes)

    @property
    def queries(self) -> Tuple[str, ...]:
        return tuple(q for queries in self.classes for q in queries)

    @property
    def query_class(self) -> Tuple[int, ...]:
        """For every query, the index of its class."""
        return tuple(i for i, queries in enumerate(self.classes) for _ in queries)

    def __len__(self) -> int:
        return len(self.classes)


class EmbeddingCache(Protocol):
    """Where query embeddings are kept between calls (in memory, Redis, ...)."""

    def get(self, key: str) -> Optional[torch.Tensor]: ...

    def put(self, key: str, value: torch.Tensor) -> None: ...


class MemoryCache:
    """An in-process LRU cache of embeddings."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self.max_entries = max_entries
        self._entries: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def get(self, key: str) -> Optional[torch.Tensor]:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class FolderCache:
    """Embeddings kept in a folder between runs of the `rfclip` command and restarts of the backend,
    one float32 `.npy` file per key (read without pickle), behind a `MemoryCache`: on the CPU the 80
    prompts of each query cost about 0.35 s, so 150 classes took a minute before the first image of
    every run. Processes may share the folder. A file that
    cannot be read, or holds anything but a float32 vector, is a miss and is written again. Past
    `max_bytes` the least recently used files go. A folder that cannot be written is warned
    about once, and the run goes on computing what it lacks."""

    PRUNE_EVERY = 1000  # writes between two checks of the folder's size (the first write checks)

    def __init__(self, folder: Path, max_bytes: int = 64 * 2 ** 20) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.front = MemoryCache()
        self._writes = 0
        self._writable = True

    def get(self, key: str) -> Optional[torch.Tensor]:
        value = self.front.get(key)
        if value is not None:
            return value
        path = self._path(key)
        try:
            array = np.load(path, allow_pickle=False)
            os.utime(path)  # used now: the last to go
        except (OSError, ValueError, EOFError):
            return None
        if array.ndim != 1 or array.dtype != np.float32:
            return None
        value = torch.from_numpy(array)
        self.front.put(key, value)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        self.front.put(key, value)
        if not self._writable:
            return
        array = value.detach().to("cpu", torch.float32).contiguous().numpy()
        path = self._path(key)
        # runs sharing the folder may write one key at once: each writes its own part
        part = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.part")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_whole(path, lambda p: _save_npy(p, array), part)
            if self._writes % self.PRUNE_EVERY == 0:
                prune_cache(self.folder, self.max_bytes)
        except OSError as err:
            self._writable = False
            log.warning("text embeddings cannot be kept in %s (%s): this process computes them for itself",
                        self.folder, err)
            return
        self._writes += 1

    def _path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.npy"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # np.save given a name would add ".npy" to the part's
        np.save(f, array, allow_pickle=False)


class TextEmbedder:
    """Embeds queries with prompt templates, through a cache.

    The cache key holds the model, its weights, the template set and the query, so one cache
    can serve several models.
    """

    def __init__(
        self,
        model: RFCLIPModel,
        cache: Optional[EmbeddingCache] = None,
        templates: Sequence[Callable[[str], str]] = OPENAI_IMAGENET_TEMPLATES,
        template_set: str = TEMPLATE_SET,
        prompts_per_batch: int = 400,
    ) -> None:
        self.model = model
        self.cache = cache if cache is not None else MemoryCache()
        self.templates = tuple(templates)
        self.template_set = template_set
        self.prompts_per_batch = prompts_per_batch

    def cache_key(self, query: str) -> str:
        return f"rfclip:text:{self.model.model_name}:{self.model.weights_id}:{self.template_set}:{query}"

    @property
    def queries_per_batch(self) -> int:
        """How many queries' prompts fill one text-encoder batch."""
        return max(1, self.prompts_per_batch // len(self.templates))

    def missing(self, queries: Iterable[str]) -> List[str]:
        """The distinct queries with no cached embedding yet, in order."""
        return [q for q, value in self._cached(queries).items() if value is None]

    def embed_next_batch(self, queries: Iterable[str]) -> int:
        """Embeds and caches one text batch of the `queries` not cached yet, looked up now (another
        thread may have done some); returns how many (0: all were cached). Callers that embed a
        big vocabulary ahead go a batch at a time: to show progress, or to let others use the model
        in between."""
        batch = self.missing(queries)[:self.queries_per_batch]
        if batch:
            self.embed_queries(batch)
        return len(batch)

    def embed_queries(self, queries: Sequence[str]) -> torch.Tensor:
        """(len(queries), D) float32 unit vectors on the model's device."""
        found = self._cached(queries)
        missing = [q for q, v in found.items() if v is None]
        for q, value in zip(missing, self._compute(missing)):
            found[q] = value
            self.cache.put(self.cache_key(q), value)
        return torch.stack([found[q] for q in queries]).to(self.model.device, torch.float32)

    def embed(self, vocabulary: Vocabulary) -> torch.Tensor:
        """Embeddings of all the vocabulary's queries, in `vocabulary.queries` order."""
        return self.embed_queries(vocabulary.queries)

    def _cached(self, queries: Iterable[str]) -> Dict[str, Optional[torch.Tensor]]:
        """Each distinct query, in order, with its cached embedding or None. A cache shared with
        other processes (Redis, a folder) may hold a damaged entry: one that is not a finite
        vector of the model's width is a miss, computed and written again, not a class every
        pixel scores NaN against."""
        width = self.model.visual.output_dim
        found = {q: self.cache.get(self.cache_key(q)) for q in dict.fromkeys(queries)}
        shaped = [q for q, v in found.items() if v is not None and v.shape == (width,)]
        # one check over all of them: a check per vector was 20 ms of each request at 2000 queries
        finite = torch.isfinite(torch.stack([found[q].float() for q in shaped])).all(dim=1).tolist() if shaped else []
        good = {q for q, ok in zip(shaped, finite) if ok}
        return {q: v if q in good else None for q, v in found.items()}

    def _compute(self, queries: List[str]) -> List[torch.Tensor]:
        if not queries:
            return []
        prompts = [template(q) for q in queries for template in self.templates]
        per_prompt = torch.cat([
            self.model.encode_text(prompts[i:i + self.prompts_per_batch])
            for i in range(0, len(prompts), self.prompts_per_batch)
        ])
        averaged = F.normalize(per_prompt.reshape(len(queries), len(self.templates), -1).mean(dim=1), dim=-1)
        return list(averaged.cpu())
