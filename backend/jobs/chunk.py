"""One chunk of a project's tasks through the one prediction pipeline, the same for a local
`preannotate` and for a queue worker.

The tasks that still need this model version's prediction are predicted, checked again just
before the push (another run may have predicted some meanwhile), pushed in one request, then
reconciled: if two runs raced past the check, the newer copies are deleted, so that every task
keeps exactly one prediction of this version.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import ContextManager, Dict, Sequence

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
                  label_config: str, credentials: Credentials, mode: str) -> ChunkResult:
    version = service.version_for(project)
    todo = [t for t in tasks if needs_prediction(t, version, mode)]
    result = ChunkResult(skipped=len(tasks) - len(todo), version=version)
    if not todo:
        return result
    with result.timed("predict"):
        outcome = service.run([{"id": t.id, "data": t.data} for t in todo], label_config, credentials, None, project)
    for stage, seconds in outcome.stage_seconds.items():  # the pipeline's own stages inside "predict"
        result.stage_seconds[f"predict: {stage}"] = seconds
    result.failed = {todo[n].id: reason for n, reason in outcome.failures.items()}
    predictions = [{"task": t.id, "model_version": entry["model_version"], "result": entry["result"],
                    "score": entry["score"]} for t, entry in zip(todo, outcome.entries) if isinstance(entry, dict)]
    # new corrections may have moved the project's version since the check above
    version = result.version = predictions[0]["model_version"] if predictions else version
    with result.timed("check"):
        now = studio.current(project, [p["task"] for p in predictions])
    fresh = []
    for prediction in predictions:
        task = now.get(prediction["task"])
        if task is None:
            result.failed[prediction["task"]] = "the task was deleted from the project meanwhile"
        elif version in task.model_versions:
            result.skipped += 1
        else:
            fresh.append(prediction)
    with result.timed("push"):
        studio.push(project, fresh)
    result.predicted = len(fresh)
    with result.timed("reconcile"):
        result.removed = reconcile(studio, project, [p["task"] for p in fresh], version)
    return result


def reconcile(studio: Studio, project: int, ids: Sequence[int], version: str) -> int:
    """Deletes all but the oldest prediction of `version` of each task; returns how many."""
    removed = 0
    for task in studio.current(project, ids).values():
        for extra in task.copies(version)[1:]:
            studio.delete_prediction(extra)
            removed += 1
    if removed:
        log.warning("project %s: %d extra copies of %s deleted (two runs pushed the same tasks at once)",
                    project, removed, version)
    return removed
