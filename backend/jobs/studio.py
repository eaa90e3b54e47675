"""The Label Studio API calls a job makes, through the SDK: the project's label config, its
tasks (all pages), and predictions pushed in bulk."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

from label_studio_sdk.client import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.core.pagination import SyncPager
from more_itertools import chunked

from ..redaction import redact

log = logging.getLogger("rfclip.backend.jobs")
T = TypeVar("T")

PAGE_SIZE = 100
IDS_PER_QUERY = 200  # about 2 KB of URL: well under the request-line limits of the usual servers
# Without `fields=all` a listed task carries no predictions, but Label Studio still computes every
# column a filter names: this one names the model-versions column and keeps every task (an empty
# `contains` adds no condition, whether the other filters are joined by "and" or by "or").
VERSIONS_COLUMN = {"filter": "filter:tasks:predictions_model_versions", "operator": "contains", "type": "List",
                   "value": ""}
# Label Studio 1.23 recounts every predicted task of the project on each import of predictions
# unless this feature flag is true in its environment (benchmarks/RESULTS.md, "Pushing into big
# projects"): a push then grows with the project.
IMPORT_FLAG = "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"
BIG_SELECTION = 10_000  # tasks from which preannotate reminds of the flag (a push costs ~10 s there without it)
RETRIES = {"max_retries": 5}  # the SDK's own backoff (1, 2, 4, 8, 16 s) on refused connections, 429 and 5xx


class SelectionError(ValueError):
    """A selection of tasks that names what the project does not have."""


@dataclass(frozen=True)
class StudioTask:
    id: int
    data: dict
    predictions: Tuple[Tuple[int, str], ...] = ()  # (id, model_version) of those it holds
    annotations: Tuple[dict, ...] = ()  # {"id", "result", "was_cancelled"} of those it holds
    versions: Optional[FrozenSet[str]] = None  # a light listing's: its predictions' versions, no ids

    @property
    def model_versions(self) -> FrozenSet[str]:
        if self.versions is not None:
            return self.versions
        return frozenset(version for _, version in self.predictions)

    def copies(self, version: str) -> List[int]:
        """Ids of its predictions of `version`, oldest first."""
        return sorted(pid for pid, v in self.predictions if v == version)


def _found(get: Callable[[], T], missing: str) -> T:
    """`get()`, with Label Studio's 404 said as `missing`, a SelectionError."""
    try:
        return get()
    except ApiError as err:
        if err.status_code == 404:
            raise SelectionError(missing) from None
        raise


class Studio:
    def __init__(self, url: str, token: str, timeout_s: float = 60.0) -> None:
        self.url = url
        self.client = LabelStudio(base_url=url, api_key=token, timeout=timeout_s)

    def label_config(self, project: int) -> str:
        """The project's label config: the first request of every command, so a project that is
        not there is said as such, before anything else is done."""
        found = _found(lambda: self.client.projects.get(id=project, request_options=RETRIES),
                       f"Label Studio at {redact(self.url)} has no such project (HTTP 404; or that address is not "
                       "Label Studio's: LABEL_STUDIO_URL)")
        return found.label_config or ""

    def tasks(self, project: int, view: Optional[int] = None, full: bool = False) -> "Listing":
        """Every task of the project (or those a Data Manager view's filters keep), page by page, in
        id order whatever the view sorts by: predictions landing meanwhile then move no task across
        pages, and chunks cut from the listing are the same on every run. `full`: with each task's
        predictions (ids and versions) and annotations, results included; otherwise with its
        predictions' model versions alone, which leaves out what is most of the bytes of a
        mostly predicted project (a prediction's masks)."""
        filters = self._view_filters(project, view) if view is not None else None
        return self._list(project, {"filters": filters, "ordering": ["tasks:id"]}, full)

    def _list(self, project: int, query: dict, full: bool) -> "Listing":
        if not full:
            filters = query.get("filters") or {"conjunction": "and", "items": []}
            query = {**query, "filters": {**filters, "items": [*filters.get("items", []), VERSIONS_COLUMN]}}
        return Listing(self.client.tasks.list(project=project, query=json.dumps(query), fields="all" if full else None,
                                              page_size=PAGE_SIZE, request_options=RETRIES), full)

    def _view_filters(self, project: int, view: int) -> Optional[dict]:
        found = _found(lambda: self.client.views.get(id=str(view), request_options=RETRIES),
                       f"view {view} does not exist")
        if found.project != project:
            raise SelectionError(f"view {view} belongs to project {found.project}, not to project {project}")
        return (found.data or {}).get("filters")

    def by_ids(self, project: int, ids: Iterable[int], full: bool = False) -> Iterator[StudioTask]:
        """These tasks as they are now, in id order, `IDS_PER_QUERY` ids a query (the ids travel in
        the URL); ids the project does not have are absent. `full` as for `tasks`."""
        for batch in chunked(sorted(set(ids)), IDS_PER_QUERY):
            yield from self._list(project, {"selectedItems": {"all": False, "included": batch},
                                            "ordering": ["tasks:id"]}, full)

    def current(self, project: int, ids: Iterable[int], full: bool = False) -> Dict[int, StudioTask]:
        """These tasks as they are now; deleted ones are absent. `full` as for `tasks`: only a full
        look-up has the predictions' ids, and it reads their masks too."""
        return {t.id: t for t in self.by_ids(project, ids, full)}

    def push(self, project: int, predictions: Sequence[dict]) -> int:
        """Stores the predictions ({"task", "result", "score", "model_version"}) in one request."""
        if not predictions:
            return 0
        response = self.client.projects.import_predictions(id=project, request=list(predictions),
                                                           request_options=RETRIES)
        return int(getattr(response, "created", len(predictions)) or 0)

    def delete_prediction(self, prediction: int) -> None:
        self.client.predictions.delete(id=prediction, request_options=RETRIES)

    def _rename(self, backend: object, project: int, version: str) -> None:
        try:
            # Label Studio 1.23 checks the backend again on every PATCH and answers 500 without
            # these fields; the password, left out, stays as it is
            self.client.ml.update(id=backend.id, title=version, url=backend.url, project=project,
                                  auth_method=backend.auth_method, basic_auth_user=backend.basic_auth_user,
                                  request_options={"max_retries": 0})
        except ApiError as err:  # a backend behind a password Label Studio wants to be sent again, ...
            log.warning("the connected model %r could not be renamed to %s (HTTP %s); until its title is that "
                        "(project Settings > Model), Label All Tasks shows only stored predictions", backend.title,
                        version, err.status_code)

    def set_model_version(self, project: int, version: str) -> None:
        """The project's active model version: the Data Manager shows prediction scores of that one
        only. Label Studio asks a connected backend for predictions in "Label All Tasks" only while
        the active version is that backend's title ("Connect Model" sets it so), so the backend
        whose title it was is renamed along (Label Studio then moves the active version itself)."""
        active = self.client.projects.get(id=project, request_options=RETRIES).model_version or ""
        if active == version:
            return
        for backend in self.client.ml.list(project=project, request_options=RETRIES):
            if active and backend.title == active:
                self._rename(backend, project, version)
        self.client.projects.update(id=project, model_version=version, request_options=RETRIES)


class Listing:
    """The tasks of a listing as they come, page by page; `total` is its size (the first page, in
    already, says so). The SDK's pager ends at Label Studio's 404 past the last page."""

    def __init__(self, pager: SyncPager, full: bool) -> None:
        self.pager, self.full, self.total = pager, full, int(getattr(pager.response, "total", 0) or 0)

    def __iter__(self) -> Iterator[StudioTask]:
        for task in self.pager:
            if not self.full:
                yield StudioTask(task.id, dict(task.data or {}), versions=_listed_versions(task))
                continue
            predictions = tuple((int(_field(p, "id") or 0), str(_field(p, "model_version") or ""))
                                for p in (task.predictions or []))
            annotations = tuple({"id": _field(a, "id"), "result": _field(a, "result") or [],
                                 "was_cancelled": bool(_field(a, "was_cancelled"))}
                                for a in (getattr(task, "annotations", None) or []))
            yield StudioTask(task.id, dict(task.data or {}), predictions, annotations)


def _listed_versions(task: object) -> FrozenSet[str]:
    """A light listing's model versions of a task, from the column Label Studio shows: joined by
    commas (and a space, on PostgreSQL), cut at 500 characters. A version with a comma in it, or
    past the cut, then looks absent, so the task looks unpredicted in that version: it is predicted
    and pushed again, and the chunk's reconcile (a full look-up) deletes the new copy."""
    shown = str(getattr(task, "predictions_model_versions", None) or "")
    versions = frozenset(v.strip() for v in shown.split(",") if v.strip())
    if not versions and getattr(task, "total_predictions", 0):  # predictions that have no version
        return frozenset({""})
    return versions


def _field(item: object, name: str) -> object:
    """A listed prediction's or annotation's field: the SDK gives objects, or dicts for fields it
    does not model."""
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


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
