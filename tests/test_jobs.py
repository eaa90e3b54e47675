"""Selecting what `rfclip-backend preannotate` predicts (the runs themselves are in the e2e test)."""
import pytest

from backend.jobs.chunk import needs_prediction
from backend.jobs.studio import StudioTask, parse_selection


def test_task_selection_parses_ids_and_ranges():
    assert parse_selection("all") is None and parse_selection("unpredicted") is None
    assert parse_selection("1,2,5-9") == [1, 2, 5, 6, 7, 8, 9]
    for bad in ("x", "5-2", "", "1-10000000"):
        with pytest.raises(ValueError, match="--tasks"):
            parse_selection(bad, limit=1000)


@pytest.mark.parametrize("versions,mode,expected", [
    ((), "unpredicted", True),
    (("v1",), "unpredicted", False),  # another version's prediction: not "unpredicted"
    (("v2",), "unpredicted", False),  # this version's: done already
    (("v1",), "all", True),
    (("v1", "v2"), "all", False),
    (("v2",), "ids", False),
    ((), "ids", True),
])
def test_a_task_with_this_versions_prediction_is_never_predicted_again(versions, mode, expected):
    predictions = tuple((n, v) for n, v in enumerate(versions))
    assert needs_prediction(StudioTask(1, {}, predictions), "v2", mode) is expected


class FakeStudio:
    """The Label Studio calls the jobs make, in memory; `race` is a task that another run predicts
    between a chunk's prediction and its push."""

    def __init__(self, config, listed, version, race=None):
        self.config, self.version, self.race = config, version, race
        self.data = {t.id: t.data for t in listed}
        self.stored = {t.id: list(t.predictions) for t in listed}  # task -> [(prediction id, version)]
        self.next_id = 1 + max((pid for t in listed for pid, _ in t.predictions), default=0)
        self.pushes, self.deleted, self.active_version, self.lookups = [], [], None, []
        self.watch, self.seen = (lambda: len(self.pushes)), []  # what `watch` said as each task was listed

    def _store(self, task, version):
        self.stored[task].append((self.next_id, version))
        self.next_id += 1

    def versions(self, task):
        return [v for _, v in self.stored[task]]

    def label_config(self, project):
        return self.config

    def tasks(self, project, view=None):
        studio = self

        class Listing:  # page by page, as Label Studio's: the total is known, the tasks come as asked
            total = len(self.stored)

            def __iter__(self):
                for i in sorted(studio.stored):
                    studio.seen.append(studio.watch())
                    yield StudioTask(i, studio.data[i], tuple(studio.stored[i]))

        return Listing()

    def by_ids(self, project, ids, full=False):
        return iter(sorted(self.current(project, ids, full).values(), key=lambda t: t.id))

    def current(self, project, ids, full=False):
        """As Label Studio's: a light look-up has the versions but not the predictions' ids."""
        self.lookups.append(full)
        if self.race in ids and self.version not in self.versions(self.race):
            self._store(self.race, self.version)
        return {i: StudioTask(i, self.data[i], tuple(self.stored[i])) if full else
                StudioTask(i, self.data[i], versions=frozenset(self.versions(i))) for i in ids if i in self.stored}

    def push(self, project, predictions):
        self.pushes.append([p["task"] for p in predictions])
        for p in predictions:
            self._store(p["task"], p["model_version"])
        return len(predictions)

    def delete_prediction(self, prediction):
        self.deleted.append(prediction)
        for copies in self.stored.values():
            copies[:] = [c for c in copies if c[0] != prediction]

    def set_model_version(self, project, version):
        self.active_version = version


def test_the_selection_is_cut_into_chunks_keeping_what_predicting_needs():
    from backend.jobs.preannotate import Selection

    listed = [StudioTask(1, {"image": "a"}, versions=frozenset()), StudioTask(2, {"image": "b"}, versions={"v1"}),
              StudioTask(3, {"image": "c"}, versions=frozenset())]

    class Listing:
        def tasks(self, project, view=None):
            return iter(listed)

        def by_ids(self, project, ids):  # ids alone: Label Studio is asked for those tasks only
            return iter([t for t in listed if t.id in ids])

    chunks = list(Selection(Listing(), 1, "v1", "unpredicted", None, None, 2))
    # the whole selection is cut, so a rerun gets the same chunks whatever was predicted meanwhile
    assert [ids for ids, _ in chunks] == [[1, 2], [3]]
    assert [[(t.id, t.data) for t in todo] for _, todo in chunks] == [[(1, {"image": "a"})], [(3, {"image": "c"})]]
    class IdsOnly(Listing):
        def tasks(self, project, view=None):
            raise AssertionError("the whole project listed for a few ids")

    selection = Selection(IdsOnly(), 1, "v2", "all", [2, 3, 40], None, 2)
    assert [(ids, [t.id for t in todo]) for ids, todo in selection] == [([2, 3], [2, 3])]
    assert selection.total == 3  # of the ids asked for (task 40 is not in the project)


@pytest.mark.parametrize("total,reminded", [(20_000, True), (500, False)])
def test_a_big_selection_reminds_of_label_studio_s_import_flag(total, reminded, caplog):
    from backend.jobs.preannotate import Selection
    from backend.jobs.studio import IMPORT_FLAG

    class Listing:
        def __init__(self):
            self.total = total

        def __iter__(self):
            return iter(StudioTask(i, {}, versions=frozenset()) for i in range(1, 6))

    class Studio:
        def tasks(self, project, view=None):
            return Listing()

    with caplog.at_level("WARNING", logger="rfclip.backend.jobs"):
        assert len(list(Selection(Studio(), 1, "v1", "unpredicted", None, None, 2))) == 3
    said = [r.getMessage() for r in caplog.records if IMPORT_FLAG in r.getMessage()]
    assert said == ([f"project 1: {total} tasks selected. Unless Label Studio runs with {IMPORT_FLAG}=true in its "
                     "environment, it recounts every predicted task of the project on each push of predictions, "
                     "and pushes slow down as the project fills (README: Big projects)"] if reminded else [])


def test_tasks_by_id_are_asked_for_in_bounded_queries_in_id_order():
    import json
    from types import SimpleNamespace

    from backend.jobs.studio import IDS_PER_QUERY, Studio

    queries = []

    class Pager:
        def __init__(self, ids):
            self.ids, self.response = ids, SimpleNamespace(total=len(ids))

        def __iter__(self):
            return iter(SimpleNamespace(id=i, data={"image": f"{i}.png"}, predictions=[{"id": 1, "model_version": "v"}])
                        for i in self.ids if i % 7)  # ids divisible by 7 were deleted

    def listed(project, query, **kwargs):
        ids = json.loads(query)["selectedItems"]["included"]
        queries.append(ids)
        return Pager(ids)

    studio = Studio("http://ls.example", "token")
    studio.client = SimpleNamespace(tasks=SimpleNamespace(list=listed))
    wanted = list(range(1000, 0, -1)) + [5]
    found = list(studio.by_ids(1, wanted, full=True))
    assert [t.id for t in found] == [i for i in range(1, 1001) if i % 7]
    assert found[0].data == {"image": "1.png"} and found[0].predictions == ((1, "v"),)
    assert max(map(len, queries)) <= IDS_PER_QUERY and sorted(sum(queries, [])) == list(range(1, 1001))
    assert studio.current(1, []) == {}


@pytest.mark.parametrize("view_filters", [None, {"conjunction": "or", "items": [{"filter": "filter:tasks:id"}]}])
def test_a_light_listing_reads_model_versions_without_the_predictions(view_filters):
    import json
    from types import SimpleNamespace

    from backend.jobs.studio import VERSIONS_COLUMN, Studio

    asked = []
    shown = {1: ("", 0), 2: ("v2,rfclip-v1,other", 3), 3: ("rfclip-v1, x", 2), 4: ("", 1), 5: (None, 0)}

    class Pager:
        response = SimpleNamespace(total=len(shown))

        def __iter__(self):
            return iter(SimpleNamespace(id=i, data={}, predictions_model_versions=v, total_predictions=n)
                        for i, (v, n) in shown.items())

    def listed(project, query, fields, **kwargs):
        asked.append((json.loads(query), fields))
        return Pager()

    studio = Studio("http://ls.example", "token")
    view = SimpleNamespace(project=1, data={"filters": view_filters})
    studio.client = SimpleNamespace(tasks=SimpleNamespace(list=listed), views=SimpleNamespace(get=lambda id, **kw: view))
    versions = {t.id: t.model_versions for t in studio.tasks(1, view=None if view_filters is None else 3)}
    # Label Studio joins the versions with commas (SQLite) or comma and space (PostgreSQL); a
    # prediction without a version is counted but not shown
    assert versions == {1: set(), 2: {"v2", "rfclip-v1", "other"}, 3: {"rfclip-v1", "x"}, 4: {""}, 5: set()}
    (query, fields), = asked
    assert fields is None  # not "all": no prediction results, no annotations
    kept = (view_filters or {"items": []})["items"]
    assert query["filters"] == {"conjunction": (view_filters or {"conjunction": "and"})["conjunction"],
                                "items": [*kept, VERSIONS_COLUMN]}
    assert query["ordering"] == ["tasks:id"]


@pytest.mark.parametrize("view,message", [(7, "view 7 does not exist"),
                                          (8, "view 8 belongs to project 2, not to project 1")])
def test_a_view_the_project_does_not_have_is_refused_before_any_listing(view, message):
    from types import SimpleNamespace

    from label_studio_sdk.core.api_error import ApiError

    from backend.jobs.studio import SelectionError, Studio

    def get(id, **kwargs):
        if id == "7":
            raise ApiError(status_code=404, body={"detail": "Not found."})
        return SimpleNamespace(project=2, data={"filters": {"conjunction": "and", "items": []}})

    def listed(**kwargs):
        raise AssertionError("listed tasks for a view that is not the project's")

    studio = Studio("http://ls.example", "token")
    studio.client = SimpleNamespace(views=SimpleNamespace(get=get), tasks=SimpleNamespace(list=listed))
    with pytest.raises(SelectionError, match=message):
        studio.tasks(1, view)


def test_a_project_label_studio_does_not_have_is_said_as_such():
    from types import SimpleNamespace

    from label_studio_sdk.core.api_error import ApiError

    from backend.jobs.studio import SelectionError, Studio

    def get(id, **kwargs):
        raise ApiError(status_code=404, body={"detail": "Not found."})

    studio = Studio("http://ls.example", "token")
    studio.client = SimpleNamespace(projects=SimpleNamespace(get=get))
    with pytest.raises(SelectionError, match="Label Studio at http://ls.example has no such project"):
        studio.label_config(7)
    studio.url = "http://admin:s3cret@ls.example"  # a password inside the URL is never said
    with pytest.raises(SelectionError) as info:
        studio.label_config(7)
    assert "s3cret" not in str(info.value) and "ls.example" in str(info.value)


@pytest.mark.parametrize("body, said", [
    ("<!DOCTYPE HTML>\n<html><head><title>502 Bad Gateway</title></head><body>" + "x" * 2000 + "</body></html>",
     "HTTP 502: an HTML page (502 Bad Gateway), not an answer of Label Studio's API"),
    ("<html><body>no title</body></html>", "HTTP 502: an HTML page, not an answer of Label Studio's API"),
    ({"detail": "Invalid token."}, "HTTP 502: {'detail': 'Invalid token.'}"),
])
def test_an_error_page_is_said_by_its_title_not_its_markup(body, said):
    from label_studio_sdk.core.api_error import ApiError

    from backend.cli import _error

    assert _error(ApiError(status_code=502, body=body)) == f"ApiError: {said}"


def make_studio(service, hostile, race=None):
    from .backend_support import BRUSH_CONFIG

    listed = [StudioTask(i, {"image": f"{hostile.url}/ok.png"}) for i in range(1, 8)]
    listed.append(StudioTask(8, {"image": f"{hostile.url}/missing.png"}))
    listed.append(StudioTask(9, {"image": f"{hostile.url}/ok.png"}, ((99, service.model_version),)))
    return FakeStudio(BRUSH_CONFIG, listed, service.model_version, race)


def test_preannotate_pushes_each_chunk_once_and_reports_failures(tiny_model, tmp_path, hostile):
    from backend.jobs.preannotate import preannotate
    from backend.media import Credentials

    from .backend_support import make_app

    service = make_app(tiny_model, tmp_path).extensions["rfclip"]["service"]
    studio = make_studio(service, hostile, race=5)
    report = preannotate(service, studio, 1, Credentials(None, None), chunk=3, progress=False)
    assert studio.pushes == [[1, 2, 3], [4, 6], [7]]  # task 5 was predicted elsewhere meanwhile
    assert studio.seen == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # each chunk pushed before the next one was listed
    assert report.predicted == 6 and report.skipped == 2 and list(report.failed) == [8]
    assert "HTTP 404" in report.failed[8] and report.left == 0
    assert all(studio.versions(i).count(service.model_version) == 1 for i in (1, 2, 3, 4, 5, 6, 7, 9))
    assert studio.lookups == [False, True] * 3  # the masks are read back only by each chunk's reconcile

    again = preannotate(service, studio, 1, Credentials(None, None), chunk=3, progress=False)
    assert again.predicted == 0 and list(again.failed) == [8] and studio.pushes[3:] == []  # nothing to push


def test_a_chunk_pushes_each_part_while_the_next_one_is_predicted(tiny_model, tmp_path, hostile):
    import threading

    from backend.jobs.chunk import predict_chunk
    from backend.media import Credentials

    from .backend_support import BRUSH_CONFIG, make_app

    service = make_app(tiny_model, tmp_path).extensions["rfclip"]["service"]
    studio = make_studio(service, hostile, race=5)
    second_part_started, predicted, pushed = threading.Event(), [], []
    run, push = service.run, studio.push

    def predicting(tasks, *args):
        predicted.append([t["id"] for t in tasks])
        if len(predicted) == 2:
            second_part_started.set()
        return run(tasks, *args)

    def pushing(project, predictions):
        pushed.append([p["task"] for p in predictions])
        if len(pushed) == 1:  # a chunk that waited for this push before predicting on would time out here
            assert second_part_started.wait(30)
        return push(project, predictions)

    service.run, studio.push = predicting, pushing
    tasks = [StudioTask(i, studio.data[i], tuple(studio.stored[i])) for i in range(1, 10)]  # as listed
    result = predict_chunk(service, studio, 1, tasks, BRUSH_CONFIG, Credentials(None, None), "unpredicted",
                           part=3)
    assert predicted == [[1, 2, 3], [4, 5, 6], [7, 8]] and pushed == [[1, 2, 3], [4, 6], [7]]
    assert studio.pushes == [[1, 2, 3], [4, 6], [7]]  # task 5 was predicted elsewhere meanwhile
    assert result.predicted == 6 and result.skipped == 2 and list(result.failed) == [8] and result.removed == 0
    assert all(studio.versions(i).count(service.model_version) == 1 for i in (1, 2, 3, 4, 5, 6, 7, 9))


def test_preannotate_stops_after_the_chunk_in_flight(tiny_model, tmp_path, hostile):
    import threading

    from backend.jobs.preannotate import preannotate
    from backend.media import Credentials

    from .backend_support import make_app

    service = make_app(tiny_model, tmp_path).extensions["rfclip"]["service"]
    studio = make_studio(service, hostile)
    stop = threading.Event()
    original = studio.push

    def push_then_interrupt(project, predictions):
        stop.set()  # as Ctrl-C during the first chunk
        return original(project, predictions)

    studio.push = push_then_interrupt
    report = preannotate(service, studio, 1, Credentials(None, None), chunk=3, progress=False, stop=stop)
    # the rest of the listing is left (task 9's prediction is not even listed)
    assert report.stopped and studio.pushes == [[1, 2, 3]] and report.left == 6 and report.selected == 9


STUDIO_ENV = {"LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "k"}


@pytest.mark.parametrize("env,args,message", [
    ({}, ["preannotate", "--project", "1"], "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"),
    (STUDIO_ENV, ["preannotate", "--project", "1", "--tasks", "3-1"], "--tasks: the range '3-1' is empty"),
    (STUDIO_ENV, ["preannotate", "--project", "1", "--chunk", "0"], "--chunk must be at least 1"),
    (STUDIO_ENV, ["preannotate", "--project", "1", "--queue"], "--queue needs REDIS_URL"),
    (STUDIO_ENV, ["preannotate", "--project", "1", "--follow"], "--follow goes with the queue"),
    (STUDIO_ENV, ["worker"], "set REDIS_URL"),
    ({"REDIS_URL": "redis://127.0.0.1:9/0"}, ["worker"], "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"),
    ({}, ["jobs"], "set REDIS_URL"),
])
def test_preannotate_refuses_bad_arguments_before_loading_anything(monkeypatch, capsys, env, args, message):
    from backend import cli

    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("backend.runtime.build_runtime", lambda *a: pytest.fail("nothing may be loaded"))
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_preannotate_with_label_studio_down_stops_with_a_clear_message(monkeypatch, capsys, tiny_model, tmp_path):
    from backend import cli, runtime

    from .backend_support import TEST_CONFIG
    from rfclip_engine import Segmenter

    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "secret-token-123456")
    monkeypatch.setenv("RFCLIP_CACHE_DIR", str(tmp_path))
    real = runtime.build_runtime
    monkeypatch.setattr(runtime, "build_runtime", lambda settings: real(
        settings, lambda s, cache: Segmenter(tiny_model, TEST_CONFIG, text_cache=cache)))
    monkeypatch.setattr("backend.jobs.studio.RETRIES", {"max_retries": 0})
    assert cli.main(["preannotate", "--project", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "stopped:" in err and "a rerun resumes" in err and "secret-token-123456" not in err


@pytest.mark.parametrize("queued", [False, True])
def test_a_second_ctrl_c_stops_preannotate_at_once_with_a_line(monkeypatch, capsys, tiny_model, tmp_path, queued):
    from backend import cli, runtime
    from backend.jobs import preannotate as jobs

    from .backend_support import TEST_CONFIG
    from rfclip_engine import Segmenter

    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "k")
    monkeypatch.setenv("RFCLIP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")
    real = runtime.build_runtime
    monkeypatch.setattr(runtime, "build_runtime", lambda settings: real(
        settings, lambda s, cache: Segmenter(tiny_model, TEST_CONFIG, text_cache=cache)))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "enqueue" if queued else "preannotate", interrupted)
    assert cli.main(["preannotate", "--project", "1", "--no-progress", "--queue" if queued else "--local"]) == 130
    err = capsys.readouterr().err
    assert "stopped at once: " + ("the chunks queued go on" if queued else "what was pushed stays") in err


# --- the queue: real Redis, workers in this process (the kill test with real processes is in the e2e test)

@pytest.fixture
def queue(redis_server):
    from backend.jobs.queue import JobQueue

    return JobQueue.from_url(redis_server.url, "test")


def queued_project(tiny_model, tmp_path, hostile, count, broken=()):
    from .backend_support import BRUSH_CONFIG, make_app

    service = make_app(tiny_model, tmp_path).extensions["rfclip"]["service"]
    listed = [StudioTask(i, {"image": f"{hostile.url}/{'missing' if i in broken else 'ok'}.png"})
              for i in range(1, count + 1)]
    return service, FakeStudio(BRUSH_CONFIG, listed, service.model_version)


def make_worker(service, studio, queue, name="w1", lease_s=45.0):
    from backend.jobs.worker import ChunkRunner, ChunkWorker
    from backend.media import Credentials

    return ChunkWorker(queue, ChunkRunner(service, studio, Credentials(None, None), queue, name, lease_s))


def enqueue(service, studio, queue, chunk=8, **kwargs):
    from backend.jobs.preannotate import enqueue as enqueue_project

    return enqueue_project(service, studio, queue, 1, chunk=chunk, progress=False, **kwargs)[1]


def test_queued_job_resumes_and_never_predicts_twice(tiny_model, tmp_path, hostile, queue):
    service, studio = queued_project(tiny_model, tmp_path, hostile, 40)
    studio.watch = lambda: queue.queue.count
    first = enqueue(service, studio, queue)
    assert len(first.added) == 5 and not first.pending
    assert studio.seen[8] == 1  # the first chunk was queued before the listing went on
    again = enqueue(service, studio, queue)  # enqueueing twice adds nothing
    assert not again.added and sorted(again.pending) == sorted(first.added)
    assert queue.queue.count == 5

    make_worker(service, studio, queue).work(burst=True, max_jobs=2)  # stopped after chunk 2
    (status,) = queue.status(1)
    assert status.chunks == {"queued": 3, "running": 0, "done": 2, "failed": 0}
    assert status.tasks == {"total": 40, "predicted": 16, "skipped": 0, "failed": 0, "left": 24}
    assert list(status.tasks_per_s) == ["w1"] and status.eta_s > 0

    rerun = enqueue(service, studio, queue)  # only the three chunks still waiting, and those are queued already
    assert not rerun.added and len(rerun.pending) == 3 and queue.queue.count == 3
    make_worker(service, studio, queue).work(burst=True)
    (status,) = queue.status(1)
    assert status.finished and status.tasks["predicted"] == 40 and status.tasks["left"] == 0 and status.eta_s == 0
    assert all(studio.versions(i) == [service.model_version] for i in range(1, 41))
    assert studio.active_version == service.model_version  # set by the workers once they had pushed
    assert enqueue(service, studio, queue).ids == []  # nothing left to do


def test_following_a_run_reads_each_chunk_s_outcome_once(tiny_model, tmp_path, hostile, queue):
    from backend.jobs.queue import RunTracker

    service, studio = queued_project(tiny_model, tmp_path, hostile, 24, broken={3})
    enqueued = enqueue(service, studio, queue)
    tracker = RunTracker(queue, 1, service.model_version, enqueued.ids)
    read = []
    original = queue.connection.hmget
    queue.connection.hmget = lambda key, fields: read.extend(fields) or original(key, fields)
    assert tracker.poll().chunks == {"queued": 3, "running": 0, "done": 0, "failed": 0}
    make_worker(service, studio, queue).work(burst=True, max_jobs=1)
    first = tracker.poll()
    make_worker(service, studio, queue).work(burst=True)
    last, again = tracker.poll(), tracker.poll()
    assert first.chunks["done"] == 1 and first.tasks["failed"] == 1 and "HTTP 404" in first.failed_tasks["3"]
    # three chunks waiting, then three, then the two left: never a chunk that had ended
    assert read == enqueued.ids + enqueued.ids + enqueued.ids[1:]
    assert last == again == queue.status(1)[0]  # the same as a fresh reading of the whole run
    assert last.finished and last.tasks == {"total": 24, "predicted": 23, "skipped": 0, "failed": 1, "left": 0}


def test_failed_tasks_are_reported_and_a_rerun_retries_only_their_chunk(tiny_model, tmp_path, hostile, queue):
    service, studio = queued_project(tiny_model, tmp_path, hostile, 12, broken={10})
    enqueue(service, studio, queue, chunk=4)
    make_worker(service, studio, queue).work(burst=True)
    (status,) = queue.status(1)
    assert status.chunks["done"] == 3 and status.tasks["failed"] == 1 and "HTTP 404" in status.failed_tasks["10"]
    rerun = enqueue(service, studio, queue, chunk=4)
    assert len(rerun.added) == 1 and rerun.added[0].endswith("-9-12")
    assert job_args(queue, rerun.added[0])["tasks"] == [10]


def job_args(queue, job_id):
    from rq.job import Job

    return Job.fetch(job_id, connection=queue.connection).args[0]


def test_a_chunk_that_always_fails_ends_in_the_failed_registry_and_the_rest_completes(tiny_model, tmp_path, hostile,
                                                                                    queue):
    from backend.jobs.queue import RETRIES

    service, studio = queued_project(tiny_model, tmp_path, hostile, 8)
    attempts = []
    original = studio.current

    def label_studio_down_for_task_5(project, ids, full=False):
        if 5 in ids:
            attempts.append(1)
            raise ConnectionError("Label Studio is down")
        return original(project, ids, full)

    studio.current = label_studio_down_for_task_5
    enqueue(service, studio, queue, chunk=4)
    make_worker(service, studio, queue).work(burst=True)
    (status,) = queue.status(1)
    assert len(attempts) == RETRIES + 1  # RQ's Retry, then the failed registry
    assert status.chunks == {"queued": 0, "running": 0, "done": 1, "failed": 1}
    (error,) = status.failed_chunks.values()
    assert "ConnectionError: Label Studio is down" in error
    assert queue.queue.failed_job_registry.count == 1
    assert status.tasks["predicted"] == 4 and status.tasks["left"] == 4


def test_a_worker_of_another_model_version_refuses_the_chunk(tiny_model, tmp_path, hostile, queue):
    from .backend_support import make_app

    service, studio = queued_project(tiny_model, tmp_path, hostile, 4)
    other = make_app(tiny_model, tmp_path, mode="clip").extensions["rfclip"]["service"]
    assert other.model_version != service.model_version
    enqueue(service, studio, queue)
    make_worker(other, studio, queue).work(burst=True)
    (status,) = queue.status(1)
    assert studio.pushes == [] and status.chunks["failed"] == 1
    assert f"this worker predicts {other.model_version}" in next(iter(status.failed_chunks.values()))


def test_an_abandoned_chunk_runs_again_and_every_task_ends_with_one_prediction(tiny_model, tmp_path, hostile, queue):
    import time

    from rq import Queue

    service, studio = queued_project(tiny_model, tmp_path, hostile, 6)
    enqueue(service, studio, queue)
    # a worker takes the chunk, pushes half of it, and dies without a word
    job, _ = Queue.dequeue_any([queue.queue], None, connection=queue.connection)
    dead = make_worker(service, studio, queue, name="dead", lease_s=1.0)
    dead.prepare_execution(job)
    dead.prepare_job_execution(job)
    studio.push(1, [{"task": i, "model_version": service.model_version} for i in (1, 2, 3)])
    (status,) = queue.status(1)
    assert status.chunks["running"] == 1

    time.sleep(1.5)  # its lease lapses: no heartbeat came
    queue.reclaim_abandoned()
    (status,) = queue.status(1)
    assert status.chunks["queued"] == 1
    make_worker(service, studio, queue, name="alive").work(burst=True)
    (status,) = queue.status(1)
    assert status.finished and status.tasks["predicted"] == 3 and status.tasks["skipped"] == 3
    assert all(studio.versions(i) == [service.model_version] for i in range(1, 7))


def test_two_workers_never_push_one_chunk_at_once(tiny_model, tmp_path, hostile, queue):
    import threading

    from backend.jobs.queue import chunk_id

    service, studio = queued_project(tiny_model, tmp_path, hostile, 3)
    held = queue.chunk_lock(chunk_id(1, service.model_version, [1, 2, 3]), 30)
    assert held.acquire()
    threading.Timer(1.0, held.release).start()  # as the other worker finishing
    pushed_while_held = []
    original = studio.push
    studio.push = lambda project, predictions: (pushed_while_held.append(held.owned()), original(project, predictions))
    enqueue(service, studio, queue)
    make_worker(service, studio, queue).work(burst=True)
    assert pushed_while_held == [False] and all(studio.versions(i) == [service.model_version] for i in (1, 2, 3))


def test_reconcile_deletes_extra_copies_keeping_the_oldest():
    from backend.jobs.chunk import reconcile

    studio = FakeStudio("", [StudioTask(1, {}, ((1, "v"), (2, "v"), (3, "old"))), StudioTask(2, {}, ((4, "v"),))],
                        "v")
    assert reconcile(studio, 1, [1, 2], "v") == 1 and studio.deleted == [2]
    assert studio.versions(1) == ["v", "old"] and studio.versions(2) == ["v"]


def test_predict_overflow_goes_to_the_queue_when_workers_listen(tiny_model, tmp_path, hostile, redis_server,
                                                                monkeypatch):
    import time

    from backend.jobs.queue import JobQueue
    from backend.media import ImageFetcher

    from .backend_support import BRUSH_CONFIG, make_app

    original = ImageFetcher.fetch

    def slow_fetch(self, *args):
        time.sleep(0.6)
        return original(self, *args)

    monkeypatch.setattr(ImageFetcher, "fetch", slow_fetch)
    app = make_app(tiny_model, tmp_path, predict_budget_s=1.0, redis_url=redis_server.url, queue_name="test",
                   label_studio_url=hostile.url)
    service = app.extensions["rfclip"]["service"]
    service.holder.get(30)
    client = app.test_client()
    tasks = [{"id": i, "data": {"image": f"{hostile.url}/ok.png"}} for i in range(1, 11)]
    queue = JobQueue.from_url(redis_server.url, "test")

    def retrieve():
        response = client.post("/predict", json={"tasks": tasks, "project": "7.1700000000", "label_config": BRUSH_CONFIG})
        return response.get_json()["results"]

    answered = retrieve()  # no worker listens: nothing is queued
    assert answered[-1] == [] and queue.queue.count == 0 and client.get("/jobs").get_json()["runs"] == []

    studio = FakeStudio(BRUSH_CONFIG, [StudioTask(t["id"], t["data"]) for t in tasks], service.model_version)
    worker = make_worker(service, studio, queue)
    worker.register_birth()
    app.extensions["rfclip"]["overflow"]._counted = float("-inf")  # count the workers again now
    answered = retrieve()
    answered_ids = [t["id"] for t, entry in zip(tasks, answered) if entry != []]
    (run,) = client.get("/jobs?project=7").get_json()["runs"]
    assert run["project"] == 7 and run["tasks"]["total"] == 10 - len(answered_ids) > 0
    assert client.get("/jobs?project=x").status_code == 400

    worker.register_death()  # and back as it starts working
    worker.work(burst=True)  # pushes what /predict did not answer
    assert sorted(t for push in studio.pushes for t in push) == [i for i in range(1, 11) if i not in answered_ids]
    (run,) = client.get("/jobs").get_json()["runs"]
    assert run["chunks"]["done"] == run["chunks"]["queued"] + run["chunks"]["done"] and run["tasks"]["left"] == 0
    redis_server.stop()
    down = client.get("/jobs")
    assert down.status_code == 503 and "unreachable" in down.get_json()["error"]


def test_a_redis_restart_during_a_chunk_loses_nothing_and_predicts_nothing_twice(tiny_model, tmp_path, hostile):
    import threading

    from backend.jobs.queue import JobQueue

    from .fakes import RedisServer

    server = RedisServer(data_dir=tmp_path / "redis")  # a Redis that keeps its data, as docker-compose's does
    server.start()
    try:
        queue = JobQueue.from_url(server.url, "test")
        service, studio = queued_project(tiny_model, tmp_path, hostile, 8)
        enqueue(service, studio, queue, chunk=4)
        original = studio.push

        def push_while_redis_restarts(project, predictions):
            if len(studio.pushes) == 0:
                server.stop()  # down for a second, in the middle of the first chunk
                threading.Timer(1.0, server.start).start()
            return original(project, predictions)

        studio.push = push_while_redis_restarts
        make_worker(service, studio, queue).work(burst=True)
        make_worker(service, studio, queue, name="w2").work(burst=True)  # whatever the first left over
        (status,) = queue.status(1)
        assert status.finished and status.tasks["left"] == 0 and not status.failed_chunks, status
        assert all(studio.versions(i) == [service.model_version] for i in range(1, 9))
    finally:
        server.stop()


@pytest.mark.parametrize("spec,message", [
    ("not a dict", "must be a dict"),
    ({"project": "1; drop", "model_version": "v", "tasks": [1]}, "project must be a positive integer"),
    ({"project": True, "model_version": "v", "tasks": [1]}, "project must be a positive integer"),
    ({"project": 1, "model_version": "", "tasks": [1]}, "model_version must be a non-empty string"),
    ({"project": 1, "model_version": "v", "tasks": []}, "tasks must be 1 to"),
    ({"project": 1, "model_version": "v", "tasks": [1, "2"]}, "tasks must be 1 to"),
    ({"project": 1, "model_version": "v", "tasks": list(range(1, 10_002))}, "tasks must be 1 to"),
    ({"project": 1, "model_version": "v", "tasks": [1], "mode": "everything"}, "mode must be one of"),
])
def test_a_malformed_chunk_job_fails_alone_with_a_clear_error(tiny_model, tmp_path, hostile, queue, spec, message):
    from backend.jobs.queue import CHUNK_FUNCTION

    service, studio = queued_project(tiny_model, tmp_path, hostile, 4)
    queue.queue.enqueue(CHUNK_FUNCTION, spec, job_id="hostile")  # put there by someone else
    enqueue(service, studio, queue)
    make_worker(service, studio, queue).work(burst=True)
    failed = queue.queue.fetch_job("hostile")
    assert failed.get_status() == "failed" and message in failed.latest_result().exc_string
    (status,) = queue.status(1)
    assert status.finished and status.tasks["predicted"] == 4 and studio.pushes == [[1, 2, 3, 4]]


def test_overflow_takes_only_real_task_ids():
    from backend.jobs.overflow import Overflow

    class Recorder:
        def __init__(self):
            self.planned = []
            self.queue = type("Q", (), {"name": "test"})()

        def workers(self):
            return 1

        def enqueue(self, project, version, plan, mode):
            from backend.jobs.queue import Enqueued

            self.planned.append((project, plan, mode))
            return Enqueued(added=["x"])

    recorder = Recorder()
    tasks = [{"id": True}, {"id": -3}, {"id": "7"}, "junk", {"id": 5}, {"id": 2}]
    assert Overflow(recorder, lambda project: "v").submit(3, tasks, list(range(len(tasks)))) == 2
    assert recorder.planned == [(3, [([2, 5], [2, 5])], "all")]
    assert Overflow(recorder, lambda project: "v").submit(None, tasks, [4]) == 0  # no usable project id: nothing queued
