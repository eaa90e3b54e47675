"""One chunk of a project's tasks through the one prediction pipeline, the same for a local
`preannotate` and for a queue worker.

The tasks that still need this model version's prediction are predicted, checked again just
before the push (another run may have predicted some meanwhile) and pushed in one request (or in
parts, each while the next part is predicted). Then what was pushed is reconciled: if two runs
raced past the check, the newer copies are deleted, so that every task keeps exactly one
prediction of this version.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ContextManager, Dict, Iterable, List, Optional, Sequence, Tuple

from more_itertools import chunked

from ..media import Credentials
from ..pipeline import timed_into
from ..service import PredictionService
from .studio import Studio, StudioTask

log = logging.getLogger("rfclip.backend.jobs")


@dataclass
class ChunkResult:
    predicted: int = 0
    skipped: int = 0  # already held a prediction of this model version
    failed: Dict[int, str] = field(default_factory=dict)  # task id -> reason
    removed: int = 0  # extra copies deleted by the reconcile
    version: str = ""  # the model version the chunk's predictions carry (the project's examples in it)
    stage_seconds: Dict[str, float] = field(default_factory=dict)

    def timed(self, stage: str) -> ContextManager[None]:
        return timed_into(self.stage_seconds, stage)

    def to_json(self) -> dict:
        out = asdict(self)
        out["failed"] = {str(task): reason for task, reason in self.failed.items()}  # JSON keys are strings
        out["stage_seconds"] = {stage: round(seconds, 4) for stage, seconds in self.stage_seconds.items()}
        return out


def needs_prediction(task: StudioTask, version: str, mode: str) -> bool:
    """Never when it holds a prediction of `version`; in `unpredicted` mode only when it holds none."""
    if version in task.model_versions:
        return False
    return mode != "unpredicted" or not task.model_versions


def predict_chunk(service: PredictionService, studio: Studio, project: int, tasks: Sequence[StudioTask],
                  label_config: str, credentials: Credentials, mode: str, part: Optional[int] = None) -> ChunkResult:
    """Predicts the chunk's tasks in parts of `part` (None: all in one), each part checked and
    pushed in the background while the next one is predicted, so the model waits on Label Studio
    only for the last part; then reconciles what was pushed. Parts pay off when Label Studio runs
    on another machine: beside it, its import competes with the model (benchmarks/RESULTS.md)."""
    version = service.version_for(project)
    todo = [t for t in tasks if needs_prediction(t, version, mode)]
    result = ChunkResult(skipped=len(tasks) - len(todo), version=version)
    if not todo:
        return result
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rfclip-push") as pusher:
        pushes: List[Future] = []
        for tasks_part in chunked(todo, part or len(todo)):
            for push in pushes:
                if push.done():
                    push.result()  # a push that failed (Label Studio down) stops the chunk now
            predictions = _predict(service, project, tasks_part, label_config, credentials, result)
            if predictions:
                # corrections may have moved the project's version since the check above
                result.version = predictions[-1]["model_version"]
                pushes.append(pusher.submit(_check_and_push, studio, project, predictions))
        pushed = [push.result() for push in pushes]  # in order; the first error is raised here
    for fresh, skipped, deleted, seconds in pushed:
        result.predicted += len(fresh)
        result.skipped += skipped
        result.failed.update({task: "the task was deleted from the project meanwhile" for task in deleted})
        for stage, spent in seconds.items():
            result.stage_seconds[stage] = result.stage_seconds.get(stage, 0.0) + spent
    with result.timed("reconcile"):
        for version, ids in _by_version(fresh for fresh, *_ in pushed).items():
            result.removed += reconcile(studio, project, ids, version)
    return result


def _predict(service: PredictionService, project: int, tasks: Sequence[StudioTask], label_config: str,
             credentials: Credentials, result: ChunkResult) -> List[dict]:
    """The tasks' predictions through the one pipeline; their failures and stage times go to `result`."""
    with result.timed("predict"):
        outcome = service.run([{"id": t.id, "data": t.data} for t in tasks], label_config, credentials, None, project)
    for stage, seconds in outcome.stage_seconds.items():  # the pipeline's own stages inside "predict"
        result.stage_seconds[f"predict: {stage}"] = result.stage_seconds.get(f"predict: {stage}", 0.0) + seconds
    result.failed.update({tasks[n].id: reason for n, reason in outcome.failures.items()})
    return [{"task": t.id, "model_version": entry["model_version"], "result": entry["result"], "score": entry["score"]}
            for t, entry in zip(tasks, outcome.entries) if isinstance(entry, dict)]


def _check_and_push(studio: Studio, project: int,
                    predictions: List[dict]) -> Tuple[List[dict], int, List[int], Dict[str, float]]:
    """Looks the tasks up again just before the push (another run may have predicted some
    meanwhile) and pushes the rest in one request: (pushed, skipped, deleted tasks, stage seconds)."""
    seconds: Dict[str, float] = {}
    with timed_into(seconds, "check"):
        now = studio.current(project, [p["task"] for p in predictions])
    fresh, skipped, deleted = [], 0, []
    for prediction in predictions:
        task = now.get(prediction["task"])
        if task is None:
            deleted.append(prediction["task"])
        elif prediction["model_version"] in task.model_versions:
            skipped += 1
        else:
            fresh.append(prediction)
    with timed_into(seconds, "push"):
        studio.push(project, fresh)
    return fresh, skipped, deleted, seconds


def _by_version(parts: Iterable[List[dict]]) -> Dict[str, List[int]]:
    """The pushed task ids per model version (a chunk has two when corrections moved it midway)."""
    out: Dict[str, List[int]] = {}
    for fresh in parts:
        for prediction in fresh:
            out.setdefault(prediction["model_version"], []).append(prediction["task"])
    return out


def reconcile(studio: Studio, project: int, ids: Sequence[int], version: str) -> int:
    """Deletes all but the oldest prediction of `version` of each task; returns how many."""
    removed = 0
    for task in studio.current(project, ids, full=True).values():  # the copies' ids come with full tasks only
        for extra in task.copies(version)[1:]:
            studio.delete_prediction(extra)
            removed += 1
    if removed:
        log.warning("project %s: %d extra copies of %s deleted (two runs pushed the same tasks at once)",
                    project, removed, version)
    return removed
