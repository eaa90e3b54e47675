"""Selecting what `rfclip-backend preannotate` predicts (the runs themselves are in the e2e test)."""
import pytest

from backend.jobs.preannotate import needs_prediction
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
    assert needs_prediction(StudioTask(1, {}, frozenset(versions)), "v2", mode) is expected


class FakeStudio:
    """The calls preannotate makes, in memory; `race` is a task that another run predicts between
    this run's listing and its push."""

    def __init__(self, config, listed, version, race=None):
        self.config, self.listed, self.version, self.race = config, listed, version, race
        self.stored = {t.id: list(t.model_versions) for t in listed}
        self.pushes = []

    def label_config(self, project):
        return self.config

    def tasks(self, project, view=None):
        return iter([StudioTask(t.id, t.data, frozenset(self.stored[t.id])) for t in self.listed])

    def predicted_versions(self, project, ids):
        if self.race in ids and self.version not in self.stored[self.race]:
            self.stored[self.race].append(self.version)
        return {i: frozenset(self.stored[i]) for i in ids}

    def push(self, project, predictions):
        self.pushes.append([p["task"] for p in predictions])
        for p in predictions:
            self.stored[p["task"]].append(p["model_version"])
        return len(predictions)


def make_studio(service, hostile, race=None):
    from .backend_support import BRUSH_CONFIG

    listed = [StudioTask(i, {"image": f"{hostile.url}/ok.png"}, frozenset()) for i in range(1, 8)]
    listed.append(StudioTask(8, {"image": f"{hostile.url}/missing.png"}, frozenset()))
    listed.append(StudioTask(9, {"image": f"{hostile.url}/ok.png"}, frozenset({service.model_version})))
    return FakeStudio(BRUSH_CONFIG, listed, service.model_version, race)


def test_preannotate_pushes_each_chunk_once_and_reports_failures(tiny_model, tmp_path, hostile):
    from backend.jobs.preannotate import preannotate
    from backend.media import Credentials

    from .backend_support import make_app

    service = make_app(tiny_model, tmp_path).extensions["rfclip"]["service"]
    studio = make_studio(service, hostile, race=5)
    report = preannotate(service, studio, 1, Credentials(None, None), chunk=3, progress=False)
    assert studio.pushes == [[1, 2, 3], [4, 6], [7]]  # task 5 was predicted elsewhere meanwhile
    assert report.predicted == 6 and report.skipped == 2 and list(report.failed) == [8]
    assert "HTTP 404" in report.failed[8] and report.left == 0
    assert all(studio.stored[i].count(service.model_version) == 1 for i in (1, 2, 3, 4, 5, 6, 7, 9))

    again = preannotate(service, studio, 1, Credentials(None, None), chunk=3, progress=False)
    assert again.predicted == 0 and list(again.failed) == [8] and studio.pushes[3:] == [[]]


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
    assert report.stopped and studio.pushes == [[1, 2, 3]] and report.left == 5


@pytest.mark.parametrize("env,args,message", [
    ({}, ["--project", "1"], "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"),
    ({"LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "k"}, ["--project", "1", "--tasks", "3-1"],
     "--tasks: the range '3-1' is empty"),
    ({"LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "k"}, ["--project", "1", "--chunk", "0"],
     "--chunk must be at least 1"),
])
def test_preannotate_refuses_bad_arguments_before_loading_anything(monkeypatch, capsys, env, args, message):
    from backend import cli

    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("backend.runtime.build_runtime", lambda *a: pytest.fail("nothing may be loaded"))
    assert cli.main(["preannotate", *args]) == 2
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
