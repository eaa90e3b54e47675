"""Text embeddings shared through Redis by every worker and replica, with an in-process LRU (or
a folder, `FolderCache`) in front. Redis down or absent never fails a request: embeddings are
computed locally, one warning is logged, and Redis is tried again after a pause; when it answers
again it is used again."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

import numpy as np
import redis
import torch

from rfclip_engine.text import EmbeddingCache, MemoryCache

from .redaction import redact

log = logging.getLogger("rfclip.backend.cache")


class RedisEmbeddingCache:
    """`EmbeddingCache` over Redis (float32 bytes per key) behind another (a `MemoryCache` by default)."""

    def __init__(
        self,
        url: Optional[str],
        front: Optional[EmbeddingCache] = None,
        retry_after_s: float = 10.0,
        socket_timeout_s: float = 0.5,
        ttl_s: int = 30 * 24 * 3600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.front = front if front is not None else MemoryCache()
        self.url = url
        self.retry_after_s = retry_after_s
        self.ttl_s = ttl_s
        self._clock = clock
        self._client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        ) if url else None
        self._down_since: Optional[float] = None
        self._answered = False  # whether Redis ever answered this process
        self._lock = threading.Lock()
        self.hits = 0  # Redis lookups that found the key

    @property
    def state(self) -> str:
        """"disabled" (no REDIS_URL), "not tried yet", "unavailable" or "connected"."""
        if self._client is None:
            return "disabled"
        if self._down_since is None and not self._answered:
            return "not tried yet"
        return "unavailable" if self._down_since is not None else "connected"

    def get(self, key: str) -> Optional[torch.Tensor]:
        value = self.front.get(key)
        if value is not None:
            return value
        raw = self._call(lambda client: client.get(key))
        if raw is None:
            return None
        self.hits += 1
        value = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy())
        self.front.put(key, value)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        self.front.put(key, value)
        data = value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        self._call(lambda client: client.set(key, data, ex=self.ttl_s))

    def ping(self) -> str:
        """Try Redis now (for /health) and return the state."""
        self._call(lambda client: client.ping(), force=True)
        return self.state

    def _call(self, operation, force: bool = False):
        if self._client is None:
            return None
        with self._lock:
            down_since = self._down_since
        if down_since is not None and not force and self._clock() - down_since < self.retry_after_s:
            return None
        try:
            result = operation(self._client)
        except redis.RedisError as err:
            with self._lock:
                if self._down_since is None:
                    log.warning("Redis at %s is unavailable (%s); computing text embeddings locally "
                                "and retrying every %.0f s", redact(str(self.url)), type(err).__name__,
                                self.retry_after_s)
                self._down_since = self._clock()
            return None
        with self._lock:
            self._answered = True
            if self._down_since is not None:
                log.warning("Redis at %s is back; sharing text embeddings again", redact(str(self.url)))
                self._down_since = None
        return result

