"""The Label Studio API calls a job makes, through the SDK: the project's label config, its
tasks (all pages), and predictions pushed in bulk."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterator, List, Optional, Sequence

from label_studio_sdk.client import LabelStudio

PAGE_SIZE = 100
RETRIES = {"max_retries": 5}  # the SDK's own backoff on 429 and 5xx answers


@dataclass(frozen=True)
class StudioTask:
    id: int
    data: dict
    model_versions: FrozenSet[str]  # of the predictions it already holds


class Studio:
    def __init__(self, url: str, token: str, timeout_s: float = 60.0) -> None:
        self.client = LabelStudio(base_url=url, api_key=token, timeout=timeout_s)

    def label_config(self, project: int) -> str:
        return self.client.projects.get(id=project, request_options=RETRIES).label_config or ""

    def tasks(self, project: int, view: Optional[int] = None) -> Iterator[StudioTask]:
        """Every task of the project (or of a Data Manager view, with its filters), page by page."""
        return self._listed(project, view, None)

    def _listed(self, project: int, view: Optional[int], query: Optional[str]) -> Iterator[StudioTask]:
        pager = self.client.tasks.list(project=project, view=view, query=query, fields="all", page_size=PAGE_SIZE,
                                       request_options=RETRIES)
        for task in pager:
            versions = frozenset(_model_version(p) for p in (task.predictions or []))
            yield StudioTask(task.id, dict(task.data or {}), versions)

    def predicted_versions(self, project: int, ids: Sequence[int]) -> Dict[int, FrozenSet[str]]:
        """The model versions each of these tasks holds predictions of, as of now."""
        query = json.dumps({"selectedItems": {"all": False, "included": list(ids)}})
        return {t.id: t.model_versions for t in self._listed(project, None, query)}

    def push(self, project: int, predictions: Sequence[dict]) -> int:
        """Stores the predictions ({"task", "result", "score", "model_version"}) in one request."""
        if not predictions:
            return 0
        response = self.client.projects.import_predictions(id=project, request=list(predictions),
                                                           request_options=RETRIES)
        return int(getattr(response, "created", len(predictions)) or 0)

    def set_model_version(self, project: int, version: str) -> None:
        """The project's active model version: the Data Manager shows prediction scores of that one."""
        self.client.projects.update(id=project, model_version=version, request_options=RETRIES)


def _model_version(prediction: object) -> str:
    """A listed prediction's model_version: the SDK gives objects, or dicts for fields it does not model."""
    value = prediction.get("model_version") if isinstance(prediction, dict) else getattr(prediction, "model_version", None)
    return str(value or "")


def parse_selection(raw: str, limit: int = 1_000_000) -> Optional[List[int]]:
    """`all` / `unpredicted` -> None; "1,2,5-9" -> the ids, at most `limit` of them."""
    if raw in ("all", "unpredicted"):
        return None
    ids: List[int] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            start, stop = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"--tasks: {part!r} is not an id or a range like 5-9") from None
        if stop < start or len(ids) + stop - start + 1 > limit:
            raise ValueError(f"--tasks: the range {part!r} is empty or selects more than {limit} tasks")
        ids.extend(range(start, stop + 1))
    if not ids:
        raise ValueError("--tasks: expected all, unpredicted or task ids like 1,2,5-9")
    return ids
