"""Learning from annotations: masks out of Label Studio results, the webhook's events, the
prototype bank (in memory and in a real Redis), and the backend learning from its webhook."""
import io
import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend.label_config import parse_label_config
from backend.learning import annotations
from backend.learning.annotations import brush_mask, label_masks
from backend.learning.bank import MemoryBank, RedisBank, encode, fingerprint
from backend.learning.learner import Forget, Learn, webhook_events
from backend.regions import mask_to_rle
from rfclip_engine.prototypes import Example

from .backend_support import BRUSH_CONFIG, make_app

TWO_CONTROLS = ('<View><Image name="image" value="$image"/>'
                '<BrushLabels name="brush" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>'
                '<PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="sky"/></PolygonLabels>'
                '<Choices name="other" toName="image"><Choice value="x"/></Choices></View>')


def brush(mask, label, from_name="brush"):
    h, w = mask.shape
    return {"from_name": from_name, "to_name": "image", "type": "brushlabels", "original_width": w,
            "original_height": h, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}


def polygon(points, label, w, h):
    return {"from_name": "poly", "to_name": "image", "type": "polygonlabels", "original_width": w,
            "original_height": h, "value": {"points": points, "polygonlabels": [label]}}


def test_brush_rle_comes_back_as_the_mask_drawn():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) < 0.3
    assert np.array_equal(brush_mask(mask_to_rle(mask), 53, 37), mask)


def test_polygon_is_filled_at_the_image_size():
    targets = parse_label_config(TWO_CONTROLS)
    [mask] = label_masks([polygon([[10, 20], [60, 20], [60, 80], [10, 80]], "sky", 100, 50)],  # percent of 100 x 50
                         targets, 10_000)["image"].values()
    expected = np.zeros((50, 100), bool)
    expected[10:41, 10:61] = True
    assert (mask != expected).sum() <= 2 * (31 + 51)  # the outline's rounding at most


def test_many_polygons_of_a_label_are_the_union_of_each_filled_alone():
    targets = parse_label_config(TWO_CONTROLS)
    rng = np.random.default_rng(1)
    shapes = [[[float(x), float(y)] for x, y in rng.uniform(0, 100, (int(rng.integers(3, 9)), 2))] for _ in range(300)]
    masks = label_masks([polygon(points, "sky", 90, 70) for points in shapes], targets, 10_000)["image"]
    reference = np.zeros((70, 90), bool)
    for points in shapes:  # each on a canvas of its own, as the regions once were
        canvas = Image.new("1", (90, 70), 0)
        ImageDraw.Draw(canvas).polygon([(x * 90 / 100, y * 70 / 100) for x, y in points], fill=1)
        reference |= np.asarray(canvas, dtype=bool)
    assert np.array_equal(masks[("poly", "sky")], reference) and 0 < reference.mean() < 1


def test_masks_per_control_and_label_with_unions_and_unknowns_left_out(caplog):
    caplog.set_level(logging.WARNING, logger="rfclip.backend.learning")
    targets = parse_label_config(TWO_CONTROLS)
    a, b = np.zeros((20, 30), bool), np.zeros((20, 30), bool)
    a[:5], b[10:] = True, True
    result = [brush(a, "cat"), brush(b, "cat"), brush(a, "dog"), brush(a, "horse"),  # horse: not in the config
              polygon([[0, 0], [50, 0], [50, 50]], "sky", 30, 20),
              {"from_name": "other", "to_name": "image", "type": "choices", "value": {"choices": ["x"]}},
              {**brush(a, "dog"), "value": {"rle": [0, 0, 0, 9, 1], "brushlabels": ["dog"]}}]  # wrong size: left out
    masks = label_masks(result, targets, 10_000)
    assert set(masks) == {"image"}
    assert set(masks["image"]) == {("brush", "cat"), ("brush", "dog"), ("poly", "sky")}
    assert np.array_equal(masks["image"][("brush", "cat")], a | b)
    assert "rle holds 9 bytes" in caplog.text


def test_sizes_the_annotation_states_are_checked_before_decoding():
    targets = parse_label_config(BRUSH_CONFIG)
    huge = {**brush(np.ones((4, 4), bool), "cat", "tag"), "original_width": 100_000, "original_height": 100_000}
    assert label_masks([huge], targets, 1_000_000) == {}
    lying = brush(np.ones((4, 4), bool), "cat", "tag")
    lying["value"]["rle"] = list((2 ** 31).to_bytes(4, "big")) + lying["value"]["rle"][4:]
    assert label_masks([lying], targets, 1_000_000) == {}


def test_regions_past_the_limit_per_type_are_left_out_undecoded(monkeypatch, caplog):
    """What an annotation costs the learner is bounded by the region limits: brush regions are each
    decoded at the image's full size, and a webhook's body holds hundreds of thousands of them."""
    caplog.set_level(logging.WARNING, logger="rfclip.backend.learning")
    monkeypatch.setitem(annotations.MAX_REGIONS, "polygonlabels", 3)
    decoded = []
    monkeypatch.setattr(annotations, "brush_mask", lambda *args: decoded.append(args) or brush_mask(*args))
    limit = annotations.MAX_REGIONS["brushlabels"]
    pixels = np.eye(limit + 40, dtype=bool)[:, None, :].repeat(2, axis=1)  # region i: pixel column i
    horse = brush(pixels[0], "horse")  # not predicted: never counts
    result = [horse] + [brush(pixel, "dog" if i % 2 else "cat") for i, pixel in enumerate(pixels)] + \
        [polygon([[x, 0], [x + 10, 0], [x + 10, 100]], "sky", 50, 50) for x in range(0, 50, 10)]
    masks = label_masks(result, parse_label_config(TWO_CONTROLS), 10_000)["image"]
    assert len(decoded) == limit
    both = masks[("brush", "cat")] | masks[("brush", "dog")]
    assert np.array_equal(both, pixels[:limit].any(axis=0))
    columns = np.arange(limit + 40)
    assert np.array_equal(masks[("brush", "cat")][0], (columns % 2 == 0) & (columns < limit))
    assert not masks[("poly", "sky")][:, 16:].any() and masks[("poly", "sky")][:, :15].any()  # 3 of 5 triangles
    assert f"40 brushlabels regions after the first {limit} are left out" in caplog.text
    assert "2 polygonlabels regions after the first 3 are left out" in caplog.text


def test_webhook_events_of_every_learning_action():
    project = {"id": 3, "label_config": BRUSH_CONFIG}
    task = {"id": 9, "data": {"image": "x.png"}}
    created = webhook_events({"action": "ANNOTATION_CREATED", "project": project, "task": task,
                              "annotation": {"id": 5, "task": 9, "result": [{"x": 1}]}}, lambda p: None)
    assert created == [Learn(3, 5, task, [{"x": 1}], BRUSH_CONFIG)]
    updated = webhook_events({"action": "ANNOTATION_UPDATED", "project": project, "task": task,
                              "annotation": {"id": 5, "task": 9, "result": [], "was_cancelled": True}},
                             lambda p: None)
    assert updated[0].cancelled
    other = {"id": 10, "data": {"image": "y.png"}}
    bulk = webhook_events({"action": "ANNOTATIONS_CREATED", "project": {"id": 3}, "task": [task, other],
                           "annotation": [{"id": 6, "task": 10, "result": []}, {"id": 7, "task": 9, "result": []}]},
                          lambda p: BRUSH_CONFIG if p == 3 else None)
    assert [(e.annotation, e.task["id"]) for e in bulk] == [(6, 10), (7, 9)]
    deleted = webhook_events({"action": "ANNOTATIONS_DELETED", "project": project,
                              "annotations": [{"id": 5}, {"id": "bad"}, {"id": 6}]}, lambda p: None)
    assert deleted == [Forget(3, (5, 6))]
    assert webhook_events({"action": "TASKS_CREATED"}, lambda p: None) == []


@pytest.mark.parametrize("body", [
    {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}, "task": {"id": 1, "data": {}}},  # no project
    {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 1}, "task": {"id": 1, "data": {}}},
    {"action": "ANNOTATION_CREATED", "project": {"id": 3, "label_config": BRUSH_CONFIG}, "annotation": {"id": 1},
     "task": {"id": 1}},  # no task data
    {"action": "ANNOTATIONS_CREATED", "project": {"id": 3, "label_config": BRUSH_CONFIG}, "annotation": {"id": 1},
     "task": []},  # the bulk form needs lists
    {"action": "ANNOTATIONS_DELETED", "project": {"id": 3}, "annotations": "all"},
])
def test_malformed_webhooks_are_refused_with_a_reason(body):
    with pytest.raises(ValueError):
        webhook_events(body, lambda p: None)


def example(seed, dim=8):
    vector = torch.nn.functional.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(seed)), dim=0)
    return Example(vector, 0.8, 0.2, 100 + seed)


@pytest.fixture(params=["memory", "redis"])
def bank_factory(request):
    if request.param == "memory":
        yield lambda **kw: MemoryBank(**kw)
        return
    from .fakes import RedisServer

    server = RedisServer()
    server.start()
    yield lambda **kw: RedisBank.from_url(server.url, "rfclip-test-v1", **kw)
    server.stop()


def test_bank_put_replace_remove_and_projects_apart(bank_factory):
    bank = bank_factory(max_annotations=100)
    cat, dog = ("tag", "cat"), ("tag", "dog")
    bank.put(1, 10, 100, {cat: example(1), dog: example(2)})
    bank.put(1, 11, 101, {cat: example(3)})
    bank.put(2, 10, 500, {dog: example(4)})  # the same annotation id in another project
    assert bank.counts(1) == {cat: 2, dog: 1} and bank.counts(2) == {dog: 1}
    found = bank.examples(1)[cat]
    torch.testing.assert_close(found[0].vector, example(1).vector)  # oldest first
    assert (found[1].inside, found[1].outside, found[1].pixels) == (0.8, 0.2, 103)
    bank.put(1, 10, 100, {dog: example(5)})  # an update replaces the annotation's contribution
    assert bank.counts(1) == {cat: 1, dog: 1}
    torch.testing.assert_close(bank.examples(1)[dog][0].vector, example(5).vector)
    assert bank.remove(1, [11, 99]) == 1
    assert bank.counts(1) == {dog: 1}
    bank.put(1, 10, 100, {})  # emptied: forgotten
    assert bank.counts(1) == {} and bank.counts(2) == {dog: 1}


def test_bank_keeps_the_newest_annotations_within_its_bound(bank_factory):
    bank = bank_factory(max_annotations=3)
    for annotation in range(5):
        bank.put(1, annotation, annotation, {("tag", "cat"): example(annotation)})
        time.sleep(0.01)
    kept = bank.examples(1)[("tag", "cat")]
    assert [e.pixels for e in kept] == [102, 103, 104]


def test_memory_bank_keeps_the_most_recently_taught_projects(bank_factory):
    bank = bank_factory(max_annotations=10, max_projects=2)
    cat = ("tag", "cat")
    for project in (1, 2, 3):
        bank.put(project, 1, 1, {cat: example(project)})
    bank.examples(2)
    if isinstance(bank, MemoryBank):
        assert bank.counts(1) == {} and bank.counts(3) == {cat: 1}  # the least recently taught is gone
        assert all(bank.revision(project) == 0 for project in range(100, 1100))  # asking holds nothing
        assert len(bank._revisions) == 2
        bank.put(1, 2, 2, {cat: example(7)})  # taught again: its new state, not one decoded before
        assert [e.pixels for e in bank.examples(1)[cat]] == [example(7).pixels] and len(bank._revisions) == 2
    else:
        assert bank.counts(1) == {cat: 1}  # Redis keeps every project (each key expires on its own)
    assert len(bank._cache) <= 2  # the decoded states held in this process stay bounded too


def test_an_entry_that_does_not_decode_is_left_out(bank_factory, caplog):
    caplog.set_level(logging.WARNING, logger="rfclip.backend.learning")
    bank = bank_factory(max_annotations=10)
    bank.put(1, 1, 1, {("tag", "cat"): example(1)})
    bank._store(1, 2, b"not json")  # written by something else
    nan = Example(torch.full((8,), float("nan")), 0.8, 0.2, 100)  # would make the label's scores NaN
    bank._store(1, 3, encode(3, {("tag", "cat"): nan}, time.time()))
    bank._store(1, 4, encode(4, {("tag", "dog"): Example(example(4).vector, float("inf"), 0.2, 100)}, time.time()))
    assert bank.counts(1) == {("tag", "cat"): 1}
    torch.testing.assert_close(bank.examples(1)[("tag", "cat")][0].vector, example(1).vector)
    assert caplog.text.count("does not decode") >= 3


def test_redis_bank_keys_expire_after_the_last_change(redis_server):
    from backend.learning.bank import KEEP_S

    bank = RedisBank.from_url(redis_server.url, "model-ttl")
    bank.put(1, 10, 100, {("tag", "cat"): example(1)})
    key = bank._key(1)
    assert 0 < bank.client.ttl(key) <= KEEP_S and 0 < bank.client.ttl(key + ":revision") <= KEEP_S
    bank.client.expire(key + ":revision", 5)
    bank.remove(1, [10])
    assert bank.client.ttl(key + ":revision") > 5  # a change renews it


def test_redis_bank_is_shared_survives_restarts_and_is_keyed_by_model(redis_server, tmp_path):
    from .fakes import RedisServer

    server = RedisServer(data_dir=tmp_path / "redis")
    server.start()
    try:
        writer = RedisBank.from_url(server.url, "model-a")
        reader = RedisBank.from_url(server.url, "model-a")
        writer.put(1, 10, 100, {("tag", "cat"): example(1)})
        assert reader.counts(1) == {("tag", "cat"): 1}
        assert RedisBank.from_url(server.url, "model-b").counts(1) == {}  # another model's features never mix
        server.stop()
        import redis

        with pytest.raises(redis.RedisError):
            reader.examples(1)
        assert list(reader.last(1)) == [("tag", "cat")]  # what predictions go on with meanwhile
        server.start()
        assert RedisBank.from_url(server.url, "model-a").counts(1) == {("tag", "cat"): 1}
    finally:
        server.stop()


def test_fingerprint_moves_when_a_count_crosses_a_power_of_two():
    seen = []
    for n in range(1, 10):
        seen.append(fingerprint({("tag", "cat"): [example(0)] * n}))
    assert fingerprint({}) == ""
    assert seen[1] == seen[2] and seen[3] == seen[6] and seen[7] == seen[8]
    assert len({seen[0], seen[1], seen[3], seen[7]}) == 4


def png_of(rgb):
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def two_colour_image():
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, :48] = (220, 30, 30)
    image[:, 48:] = (30, 30, 220)
    return image


def annotation_body(annotation_id, image_url, mask, label="cat", action="ANNOTATION_CREATED", project=5):
    return {"action": action, "project": {"id": project, "label_config": BRUSH_CONFIG},
            "task": {"id": 77, "data": {"image": image_url}},
            "annotation": {"id": annotation_id, "task": 77, "result": [brush(mask, label, "tag")]}}


def test_the_backend_learns_from_its_webhook_and_its_version_follows(tiny_model, tmp_path, fake_ls):
    app = make_app(tiny_model, tmp_path)
    client, learner = app.test_client(), app.extensions["rfclip"]["learner"]
    service = app.extensions["rfclip"]["service"]
    fake_ls.public["a.png"] = png_of(two_colour_image())
    url = f"{fake_ls.url}/img/a.png"
    before = client.post("/setup", json={"project": "5.1", "schema": BRUSH_CONFIG}).get_json()["model_version"]
    assert before == service.model_version
    left = np.zeros((64, 96), bool)
    left[:, :48] = True

    answer = client.post("/webhook", json=annotation_body(1, url, left))
    assert answer.get_json() == {"status": "queued", "events": 1, "dropped": 0}
    assert learner.wait_idle(30)
    assert service.bank.counts(5) == {("tag", "cat"): 1}
    after = client.post("/setup", json={"project": "5.2", "schema": BRUSH_CONFIG}).get_json()["model_version"]
    assert after.startswith(before + "-p") and after != before
    (entry,) = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": url}}], "project": "5.3",
                                             "label_config": BRUSH_CONFIG}).get_json()["results"]
    assert entry["model_version"] == after
    # another project is not touched
    assert client.post("/setup", json={"project": "6.1", "schema": BRUSH_CONFIG}).get_json()["model_version"] == before

    # an update replaces the annotation's examples: still one cat, now a dog too
    body = annotation_body(1, url, left, action="ANNOTATION_UPDATED")
    body["annotation"]["result"].append(brush(~left, "dog", "tag"))
    client.post("/webhook", json=body)
    assert learner.wait_idle(30)
    assert service.bank.counts(5) == {("tag", "cat"): 1, ("tag", "dog"): 1}
    client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": 5}, "annotations": [{"id": 1}]})
    assert learner.wait_idle(30)
    assert service.bank.counts(5) == {}
    assert client.post("/setup", json={"project": "5.4", "schema": BRUSH_CONFIG}).get_json()["model_version"] == before


def test_the_webhook_answers_at_once_while_learning_runs(tiny_model, tmp_path, fake_ls, monkeypatch):
    app = make_app(tiny_model, tmp_path)
    client, learner = app.test_client(), app.extensions["rfclip"]["learner"]
    service = app.extensions["rfclip"]["service"]
    original = service.learn

    def slow(rgb, masks):
        time.sleep(2.0)
        return original(rgb, masks)

    monkeypatch.setattr(service, "learn", slow)
    fake_ls.public["a.png"] = png_of(two_colour_image())
    mask = np.zeros((64, 96), bool)
    mask[:30] = True
    started = time.monotonic()
    for annotation in (1, 2):
        assert client.post("/webhook", json=annotation_body(annotation, f"{fake_ls.url}/img/a.png", mask)).status_code == 200
    assert time.monotonic() - started < 1.0
    assert service.bank.counts(5) == {}
    assert learner.wait_idle(30)
    assert service.bank.counts(5) == {("tag", "cat"): 2}


def test_an_annotation_whose_image_fails_is_logged_and_the_next_is_learned(tiny_model, tmp_path, fake_ls, caplog):
    app = make_app(tiny_model, tmp_path)
    client, learner = app.test_client(), app.extensions["rfclip"]["learner"]
    fake_ls.public["a.png"] = png_of(two_colour_image())
    mask = np.zeros((64, 96), bool)
    mask[:30] = True
    client.post("/webhook", json=annotation_body(1, f"{fake_ls.url}/img/missing.png", mask))
    client.post("/webhook", json=annotation_body(2, f"{fake_ls.url}/img/a.png", mask))
    assert learner.wait_idle(30)
    assert app.extensions["rfclip"]["service"].bank.counts(5) == {("tag", "cat"): 1}
    assert "project 5: learning failed" in caplog.text


def test_learning_is_shared_through_redis(tiny_model, tmp_path, fake_ls, redis_server):
    first = make_app(tiny_model, tmp_path / "a", redis_url=redis_server.url)
    second = make_app(tiny_model, tmp_path / "b", redis_url=redis_server.url)
    fake_ls.public["a.png"] = png_of(two_colour_image())
    mask = np.zeros((64, 96), bool)
    mask[:, :48] = True
    first.test_client().post("/webhook", json=annotation_body(1, f"{fake_ls.url}/img/a.png", mask))
    assert first.extensions["rfclip"]["learner"].wait_idle(30)
    versions = [app.test_client().post("/setup", json={"project": "5.1", "schema": BRUSH_CONFIG}).get_json()
                ["model_version"] for app in (first, second)]
    assert versions[0] == versions[1] and "-p" in versions[0]


def test_prototypes_off_ignores_annotations(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path, prototypes=False)
    answer = app.test_client().post("/webhook", json=annotation_body(1, "x.png", np.ones((4, 4), bool))).get_json()
    assert answer["status"] == "ignored" and "RFCLIP_PROTOTYPES" in answer["reason"]


class AnnotatedStudio:
    """A project's tasks with their annotations, in memory."""

    def __init__(self, tasks):
        self.listed = tasks

    def label_config(self, project):
        return BRUSH_CONFIG

    def tasks(self, project, view=None, full=False):
        assert full, "a light listing has no annotations"
        return iter(self.listed)


def test_learn_project_learns_every_annotation_and_forgets_the_stale(tiny_model, tmp_path, fake_ls):
    from backend.jobs.studio import StudioTask
    from backend.learning.project import learn_project

    app = make_app(tiny_model, tmp_path)
    learner, service = app.extensions["rfclip"]["learner"], app.extensions["rfclip"]["service"]
    fake_ls.public["a.png"] = png_of(two_colour_image())
    left = np.zeros((64, 96), bool)
    left[:, :48] = True
    good = {"image": f"{fake_ls.url}/img/a.png"}

    def annotation(i, result, cancelled=False):
        return {"id": i, "result": result, "was_cancelled": cancelled}

    studio = AnnotatedStudio([
        StudioTask(1, good, (), (annotation(11, [brush(left, "cat", "tag")]), annotation(12, [brush(~left, "dog", "tag")]))),
        StudioTask(2, {"image": f"{fake_ls.url}/img/missing.png"}, (), (annotation(13, [brush(left, "cat", "tag")]),)),
        StudioTask(3, good, (), (annotation(14, []), annotation(15, [brush(left, "cat", "tag")], cancelled=True))),
        StudioTask(4, good, ()),
    ])
    service.bank.put(5, 99, 1, {("tag", "cat"): example(1)})  # learned once, deleted since in Label Studio
    report = learn_project(learner, studio, 5, progress=False)
    assert (report.annotations, report.learned, report.empty, report.forgotten) == (5, 2, 2, 1)
    assert list(report.failed) == [13] and report.failed[13].startswith("MediaError")  # its image: 404
    assert service.bank.counts(5) == {("tag", "cat"): 1, ("tag", "dog"): 1}
    assert service.bank.annotations(5) == [11, 12]


def test_learn_command_needs_the_shared_bank(monkeypatch, capsys):
    from backend import cli

    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "k")
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert cli.main(["learn", "--project", "1"]) == 2
    assert "set REDIS_URL" in capsys.readouterr().err


def test_workers_take_chunks_of_their_model_with_any_examples_tag():
    from backend.jobs.worker import same_model

    assert same_model("rfclip-m-1a2b", "rfclip-m-1a2b")
    assert same_model("rfclip-m-1a2b-p0c0ffe", "rfclip-m-1a2b")
    assert not same_model("rfclip-m-9999-p0c0ffe", "rfclip-m-1a2b")
    assert not same_model("rfclip-m-1a2bc", "rfclip-m-1a2b")
