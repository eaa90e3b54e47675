"""The model's lock, with /predict requests ahead of background work.

A plain Lock is not fair: a background thread that releases it and asks again at once gets it
back before a waiting request wakes up, so embedding a huge vocabulary ahead could hold every
/predict off until the budget runs out. Here background work only takes the model when no
request is waiting for it.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional


class ModelLock:
    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._held = False
        self._requests_waiting = 0

    def acquire(self, timeout: Optional[float] = None) -> bool:
        """For a request: wait at most `timeout` seconds (None: as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            self._requests_waiting += 1
            try:
                while self._held:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._condition.wait(remaining)
                self._held = True
                return True
            finally:
                self._requests_waiting -= 1

    @contextmanager
    def background(self) -> Iterator[None]:
        """Hold the model for one piece of background work, once no request waits for it."""
        with self._condition:
            while self._held or self._requests_waiting:
                self._condition.wait()
            self._held = True
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        with self._condition:
            self._held = False
            self._condition.notify_all()
