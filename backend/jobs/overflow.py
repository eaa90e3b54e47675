"""/predict overflow: the tasks of a Retrieve that the time budget did not reach go to the job
queue instead of being dropped, when workers listen on it; they push their predictions through
the API when done, so one click on 10,000 tasks pre-annotates all of them."""
from __future__ import annotations

import logging
import time
from typing import Callable, List, Optional

from more_itertools import chunked
from redis.exceptions import RedisError

from .queue import JobQueue

log = logging.getLogger("rfclip.backend.jobs")
WORKERS_SEEN_S = 10.0  # how long a count of the queue's workers is trusted


class Overflow:
    """`version_for(project)`: the model version of a project's predictions (PredictionService's)."""

    def __init__(self, queue: JobQueue, version_for: Callable[[int], str], chunk: int = 32) -> None:
        self.queue, self.version_for, self.chunk = queue, version_for, chunk
        self._workers, self._counted = 0, float("-inf")

    def _has_workers(self) -> bool:
        if time.monotonic() - self._counted > WORKERS_SEEN_S:
            self._workers, self._counted = self.queue.workers(), time.monotonic()
        return self._workers > 0

    def submit(self, project: Optional[int], tasks: List[object], unreached: List[int]) -> int:
        """Enqueues the unreached tasks (positions in `tasks`); returns how many went."""
        ids = sorted({task["id"] for n in unreached if isinstance(task := tasks[n], dict)
                      and type(task.get("id")) is int and task["id"] > 0})  # not true, not -1
        if project is None or not ids:
            return 0
        try:
            if not self._has_workers():
                log.info("project %s: %d tasks not reached within the budget; no worker listens on queue %s, so "
                         "Label Studio will ask again", project, len(ids), self.queue.queue.name)
                return 0
            plan = [(part, part) for part in chunked(ids, self.chunk)]
            enqueued = self.queue.enqueue(project, self.version_for(project), plan, "all")
        except RedisError as err:
            log.warning("project %s: %d tasks not reached within the budget could not be queued: %s", project,
                        len(ids), err)
            return 0
        log.info("project %s: %d tasks not reached within the budget queued in %d chunks for the workers", project,
                 len(ids), len(enqueued.ids))
        return len(ids)
