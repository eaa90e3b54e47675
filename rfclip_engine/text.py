"""Class vocabularies and their text embeddings.

A class is a list of queries (synonyms): "person, man, woman" is one class with three queries,
named by the first. Each query is embedded with the 80 OpenAI ImageNet prompt templates
(each prompt embedding L2-normalized, averaged, normalized again); a class scores the max over
its queries. Query embeddings go through an `EmbeddingCache` so a server can share them.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from open_clip import OPENAI_IMAGENET_TEMPLATES

from .model import RFCLIPModel

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
        """Each distinct query, in order, with its cached embedding or None."""
        return {q: self.cache.get(self.cache_key(q)) for q in dict.fromkeys(queries)}

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
