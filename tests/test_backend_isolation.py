"""Failure isolation, time budget, security and the Redis cache, end to end through the app."""
import logging
import os
import time

import pytest

from backend.media import ImageFetcher
from rfclip_engine.text import TextEmbedder

from .backend_support import BRUSH_CONFIG, make_app, png

TOKEN = "TESTTOKEN-1234567890"


def predict(client, tasks, **extra):
    response = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG, **extra}, **{})
    assert response.status_code == 200
    return response.get_json()["results"]


def test_bad_tasks_get_empty_entries_and_one_log_line_each(tiny_model, tmp_path, fake_ls, caplog):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(png(50, 60))
    (tmp_path / "secret.png").write_bytes(png(50, 60))
    fake_ls.public["good.png"] = png(70, 90)
    fake_ls.public["corrupt.png"] = b"\x89PNG\r\n\x1a\n garbage"
    fake_ls.public["large.png"] = png(400, 400)
    app = make_app(tiny_model, tmp_path, label_studio_url=fake_ls.url, label_studio_api_key=TOKEN,
                   allowed_local_dir=allowed, max_image_pixels=100_000, max_download_bytes=1_000_000)
    client = app.test_client()
    tasks = [
        {"id": 1, "data": {"image": f"{fake_ls.url}/img/good.png"}},
        {"id": 2, "data": {"image": f"{fake_ls.url}/img/corrupt.png"}},
        {"id": 3, "data": {"image": f"{fake_ls.url}/img/missing.png"}},
        {"id": 4, "data": {"image": str(tmp_path / "secret.png")}},
        {"id": 5, "data": {"image": f"{fake_ls.url}/img/large.png"}},
        {"id": 6, "data": {"image": f"{fake_ls.url}/huge"}},
        {"id": 7, "data": {"text": "no image here"}},
        {"id": 8, "data": {"image": "file:///etc/passwd"}},
        {"id": 9, "data": {"image": "ok.png"}},
        {"id": 10, "data": {"image": "/data/upload/1/nothing.png"}},
        {"id": 11, "data": {"image": "ftp://example.org/x.png"}},
        {"id": 12, "data": {"image": f"{fake_ls.url}/img/good.png"}},
        {"id": 13, "data": {"image": "http://[::1"}},  # urlparse raises on it
        {"id": 14, "data": {"image": f"{fake_ls.url}/img/{'a' * 1_000_000}.png"}},  # a megabyte of URL
    ]
    caplog.set_level(logging.INFO)
    results = predict(client, tasks)
    assert len(results) == len(tasks)
    good = {1, 9, 12}
    for task, entry in zip(tasks, results):
        if task["id"] in good:
            assert isinstance(entry, dict) and entry["result"], task
        else:
            assert entry == [], task
    reasons = {
        2: "cannot read", 3: "HTTP 404", 4: "outside the allowed folder", 5: "pixels, more than the limit",
        6: "bytes, more than the limit of 1000000", 7: "no 'image' field", 8: "outside the allowed folder", 10: "HTTP 404",
        11: "unsupported image reference scheme", 13: "http://[::1 is not a valid URL", 14: "aaa... (",
    }
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("rfclip")]
    for task_id, reason in reasons.items():
        matching = [line for line in lines if line.startswith(f"task {task_id}:")]
        assert len(matching) == 1 and reason in matching[0], (task_id, matching)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback for a bad URL
    assert max(len(line) for line in lines) < 1000


def test_a_task_that_breaks_the_model_does_not_take_its_batch_down(tiny_model, tmp_path, fake_ls, monkeypatch, caplog):
    from rfclip_engine import predictor

    original = predictor.Segmenter.logits_many
    batches = []

    def fragile(self, rgbs, vocabulary, timer=predictor.untimed, prototypes=None):
        batches.append(len(rgbs))
        if any(rgb.shape[:2] == (33, 33) for rgb in rgbs):
            raise RuntimeError("simulated model failure")
        return original(self, rgbs, vocabulary, timer, prototypes)

    monkeypatch.setattr(predictor.Segmenter, "logits_many", fragile)
    for name, size in [("a.png", (64, 64)), ("bad.png", (33, 33)), ("c.png", (50, 70))]:
        fake_ls.public[name] = png(*size)
    caplog.set_level(logging.WARNING)
    client = make_app(tiny_model, tmp_path).test_client()
    tasks = [{"id": i, "data": {"image": f"{fake_ls.url}/img/{name}"}} for i, name in enumerate(["a.png", "bad.png", "c.png"], 1)]
    results = predict(client, tasks)
    assert results[0]["result"] and results[1] == [] and results[2]["result"]
    assert batches[0] == 3  # first tried together
    assert any(r.getMessage() == "task 2: prediction failed" for r in caplog.records)


@pytest.mark.parametrize("batch_size, groups", [(None, [4, 4, 2]), (32, [8, 2])])
def test_tasks_are_grouped_as_the_segmenters_batch_suits(tiny_model, tmp_path, fake_ls, monkeypatch, batch_size,
                                                         groups):
    """A quarter of the batch size, at least 4: on a GPU's 32 crops, 8 images share forwards."""
    from rfclip_engine import predictor

    original = predictor.Segmenter.logits_many
    seen = []

    def counted(self, rgbs, vocabulary, timer=predictor.untimed, prototypes=None):
        seen.append(len(rgbs))
        return original(self, rgbs, vocabulary, timer, prototypes)

    monkeypatch.setattr(predictor.Segmenter, "logits_many", counted)
    fake_ls.public["a.png"] = png(40, 40)
    client = make_app(tiny_model, tmp_path, batch_size=batch_size).test_client()
    results = predict(client, [{"id": i, "data": {"image": f"{fake_ls.url}/img/a.png"}} for i in range(10)])
    assert seen == groups and all(entry["result"] for entry in results)


def test_slow_host_times_out(tiny_model, tmp_path, fake_ls, caplog):
    caplog.set_level(logging.WARNING)
    app = make_app(tiny_model, tmp_path, fetch_timeout_s=1.0)
    started = time.monotonic()
    results = predict(app.test_client(), [{"id": 1, "data": {"image": f"{fake_ls.url}/slow"}}])
    assert results == [[]] and time.monotonic() - started < 5
    assert any("longer than 1 s" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_budget_answers_unreached_tasks_with_empty_entries(tiny_model, tmp_path, fake_ls, monkeypatch, caplog):
    fake_ls.public["a.png"] = png(64, 64)
    original = ImageFetcher.fetch

    def slow_fetch(self, *args):
        time.sleep(0.6)
        return original(self, *args)

    monkeypatch.setattr(ImageFetcher, "fetch", slow_fetch)
    app = make_app(tiny_model, tmp_path, predict_budget_s=1.0)
    app.extensions["rfclip"]["holder"].get(30)
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    tasks = [{"id": i, "data": {"image": f"{fake_ls.url}/img/a.png"}} for i in range(1, 13)]
    results = predict(app.test_client(), tasks)
    assert time.monotonic() - started < 2.5
    assert len(results) == 12 and isinstance(results[0], dict) and results[-1] == []
    done = sum(isinstance(r, dict) for r in results)
    assert all(isinstance(r, dict) for r in results[:done]) and all(r == [] for r in results[done:]), results
    assert any("not reached within the 1 s budget" in r.getMessage() for r in caplog.records)


def test_basic_auth_on_every_endpoint_but_health(tiny_model, tmp_path):
    client = make_app(tiny_model, tmp_path, basic_auth_user="ls", basic_auth_pass="s3cret-pass").test_client()
    assert client.get("/health").status_code == 200
    for method, path in [("post", "/setup"), ("post", "/predict"), ("post", "/webhook"), ("get", "/versions"),
                         ("get", "/jobs")]:
        response = getattr(client, method)(path, json={})
        assert response.status_code == 401 and "Basic" in response.headers["WWW-Authenticate"]
        wrong = getattr(client, method)(path, json={}, auth=("ls", "nope"))
        assert wrong.status_code == 401
    assert client.get("/versions", auth=("ls", "s3cret-pass")).status_code == 200


def test_secrets_never_reach_the_logs(tiny_model, tmp_path, fake_ls, caplog):
    caplog.set_level(logging.DEBUG)
    app = make_app(tiny_model, tmp_path, label_studio_url=fake_ls.url, label_studio_api_key="WRONG-" + TOKEN,
                   basic_auth_user="ls", basic_auth_pass="s3cret-pass")
    client = app.test_client()
    client.post("/setup", json={"project": "1.2", "schema": BRUSH_CONFIG, "hostname": fake_ls.url,
                                "access_token": "SETUP-TOKEN-abcdef"}, auth=("ls", "s3cret-pass"))
    fake_ls.uploads["1/x.png"] = png(30, 30)
    response = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "/data/upload/1/x.png"}}],
                                             "label_config": BRUSH_CONFIG, "project": "1.2"},
                           auth=("ls", "s3cret-pass"))
    assert response.get_json()["results"] == [[]]
    logs = caplog.text
    assert "HTTP 401" in logs and "LABEL_STUDIO_API_KEY" in logs
    for secret in (TOKEN, "SETUP-TOKEN-abcdef", "s3cret-pass"):
        assert secret not in logs


def test_setup_credentials_are_the_fallback(tiny_model, tmp_path, fake_ls):
    client = make_app(tiny_model, tmp_path).test_client()  # no LABEL_STUDIO_URL / API key in the env
    fake_ls.uploads["1/x.png"] = png(30, 30)
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/x.png"}}]
    assert predict(client, tasks, project="1.5") == [[]]  # nothing known yet
    client.post("/setup", json={"project": "1.5", "schema": BRUSH_CONFIG, "hostname": fake_ls.url,
                                "access_token": TOKEN})
    (entry,) = predict(client, tasks, project="1.6")
    assert entry["result"]


def test_personal_access_token_is_exchanged(tiny_model, tmp_path):
    import jwt

    from .fakes import FakeLabelStudio

    now = int(time.time())
    pat = jwt.encode({"token_type": "refresh", "exp": now + 3600, "user_id": 1}, "a-test-signing-key-of-32-bytes-or-more", algorithm="HS256")
    access = jwt.encode({"token_type": "access", "exp": now + 300, "user_id": 1}, "a-test-signing-key-of-32-bytes-or-more", algorithm="HS256")
    server = FakeLabelStudio(token="legacy-not-used", personal_access_token=pat, access_token=access)
    try:
        server.uploads["1/x.png"] = png(30, 40)
        client = make_app(tiny_model, tmp_path, label_studio_url=server.url, label_studio_api_key=pat).test_client()
        (entry,) = predict(client, [{"id": 1, "data": {"image": "/data/upload/1/x.png"}}])
        assert entry["result"]
        media = [r for r in server.requests if "upload" in r["path"]]
        assert media and all(r["headers"]["Authorization"] == f"Bearer {access}" for r in media)
        assert any(r["path"].startswith("/api/token/refresh") for r in server.requests)
    finally:
        server.close()


def test_local_paths_stay_inside_the_allowed_folder(tiny_model, tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "in.png").write_bytes(png(40, 40))
    outside = tmp_path / "outside.png"
    outside.write_bytes(png(40, 40))
    os.symlink(outside, allowed / "link.png")
    client = make_app(tiny_model, tmp_path, allowed_local_dir=allowed).test_client()
    refs = {
        "sub/in.png": True, str(allowed / "sub" / "in.png"): True, f"file://{allowed}/sub/in.png": True,
        "/data/local-files/?d=sub/in.png": True,
        "../outside.png": False, "sub/../../outside.png": False, "link.png": False, str(outside): False,
        f"file://{outside}": False, "/data/local-files/?d=../outside.png": False,
    }
    tasks = [{"id": i, "data": {"image": ref}} for i, ref in enumerate(refs)]
    results = predict(client, tasks)
    for (ref, allowed_ref), entry in zip(refs.items(), results):
        assert (entry != []) == allowed_ref, ref


def test_request_size_limit(tiny_model, tmp_path):
    client = make_app(tiny_model, tmp_path, max_request_bytes=1000).test_client()
    response = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": "x" * 5000}}]})
    assert response.status_code == 413


def count_text_computations(monkeypatch):
    calls = []
    original = TextEmbedder._compute

    def counting(self, queries):
        calls.extend(queries)
        return original(self, queries)

    monkeypatch.setattr(TextEmbedder, "_compute", counting)
    return calls


def test_redis_shares_embeddings_and_survives_outages(tiny_model, tmp_path, fake_ls, redis_server, monkeypatch, caplog):
    fake_ls.public["a.png"] = png(64, 64)
    tasks = [{"id": 1, "data": {"image": f"{fake_ls.url}/img/a.png"}}]
    computed = count_text_computations(monkeypatch)

    # each worker on a machine of its own: its own disk cache in front of Redis
    first = make_app(tiny_model, tmp_path / "one", redis_url=redis_server.url)
    assert predict(first.test_client(), tasks)[0]["result"]
    assert sorted(computed) == ["cat", "dog"]
    assert first.test_client().get("/health").get_json()["redis"] == "connected"

    # another worker (a fresh in-process cache) finds them in Redis
    second = make_app(tiny_model, tmp_path / "two", redis_url=redis_server.url)
    assert predict(second.test_client(), tasks)[0]["result"]
    cache = second.extensions["rfclip"]["text_cache"]
    assert cache.hits == 2 and sorted(computed) == ["cat", "dog"]

    # Redis dies: requests still succeed, computed locally, one warning
    redis_server.stop()
    caplog.set_level(logging.WARNING)
    third = make_app(tiny_model, tmp_path / "three", redis_url=redis_server.url)
    client = third.test_client()
    assert predict(client, tasks)[0]["result"]
    assert predict(client, [{"id": 2, "data": {"image": f"{fake_ls.url}/img/a.png"}}])[0]["result"]
    assert client.get("/status").get_json()["redis"] == "unavailable"
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert computed.count("cat") == 2

    # Redis is back: used again
    redis_server.start()
    assert client.get("/status").get_json()["redis"] == "connected"
    assert client.get("/health").get_json()["redis"] == "connected"
    config = BRUSH_CONFIG.replace('value="dog"', 'value="horse"')
    client.post("/predict", json={"tasks": tasks, "label_config": config})
    fourth = make_app(tiny_model, tmp_path / "four", redis_url=redis_server.url)
    fourth.test_client().post("/predict", json={"tasks": tasks, "label_config": config})
    assert fourth.extensions["rfclip"]["text_cache"].hits >= 1
    assert computed.count("horse") == 1


def test_a_restarted_backend_without_redis_finds_its_text_embeddings_on_disk(tiny_model, tmp_path, fake_ls,
                                                                            monkeypatch):
    fake_ls.public["a.png"] = png(64, 64)
    tasks = [{"id": 1, "data": {"image": f"{fake_ls.url}/img/a.png"}}]
    computed = count_text_computations(monkeypatch)
    first = predict(make_app(tiny_model, tmp_path).test_client(), tasks)[0]
    assert sorted(computed) == ["cat", "dog"] and len(list((tmp_path / "cache" / "text").glob("*.npy"))) == 2
    again = predict(make_app(tiny_model, tmp_path).test_client(), tasks)[0]  # restarted: memory lost
    assert sorted(computed) == ["cat", "dog"]
    assert [r["value"] for r in again["result"]] == [r["value"] for r in first["result"]]


def test_image_cache_keeps_recent_files_within_its_size(tmp_path, fake_ls):
    from backend.media import Credentials
    from rfclip_engine.files import prune_cache
    from backend.netguard import DestinationPolicy

    fetcher = ImageFetcher(tmp_path, None, 10 << 20, 10, 10 ** 8, cache_bytes=60_000,
                           policy=DestinationPolicy(allow_private=True))
    fetcher.PRUNE_EVERY = 1
    for i in range(12):
        fake_ls.public[f"{i}.png"] = png(64, 64, seed=i)  # ~12 KB each
    names = []
    for i in range(12):
        fetcher.fetch(f"{fake_ls.url}/img/{i}.png", i, Credentials(None, None))
        names.append(max(fetcher.cache_dir.iterdir(), key=lambda f: f.stat().st_mtime_ns).name)
        time.sleep(0.01)
    files = {f.name: f for f in fetcher.cache_dir.iterdir()}
    assert sum(f.stat().st_size for f in files.values()) <= 60_000
    assert names[-1] in files  # the newest stays
    assert names[0] not in files  # the oldest went
    assert prune_cache(fetcher.cache_dir, 10 ** 9) == 0


def test_a_busy_model_does_not_outlast_the_budget(tiny_model, tmp_path, fake_ls):
    fake_ls.public["a.png"] = png(64, 64)
    app = make_app(tiny_model, tmp_path, predict_budget_s=1.0)
    app.extensions["rfclip"]["holder"].get(30)
    service = app.extensions["rfclip"]["service"]
    service._lock.acquire()  # another request is using the model
    try:
        started = time.monotonic()
        results = predict(app.test_client(), [{"id": 1, "data": {"image": f"{fake_ls.url}/img/a.png"}}])
        assert results == [[]] and time.monotonic() - started < 2.0
    finally:
        service._lock.release()


MANY_CLASSES = [f"class {i}" for i in range(12)]
MANY_CLASSES_CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                       + "".join(f'<Label value="{name}"/>' for name in MANY_CLASSES) + '</BrushLabels></View>')


def wait_until_embedded(app, queries, timeout_s=60.0):
    text = app.extensions["rfclip"]["holder"].get(30).text
    deadline = time.monotonic() + timeout_s
    while text.missing(queries):
        assert time.monotonic() < deadline, f"still not embedded: {text.missing(queries)}"
        time.sleep(0.05)


def test_setup_embeds_the_class_names_ahead(tiny_model, tmp_path, fake_ls, monkeypatch, caplog):
    """Label Studio sends /setup before every retrieve and task open, with a 3 s timeout."""
    computed = count_text_computations(monkeypatch)
    caplog.set_level(logging.INFO, logger="rfclip.backend")
    app = make_app(tiny_model, tmp_path)
    client = app.test_client()
    started = time.monotonic()
    assert client.post("/setup", json={"project": "3.1", "schema": MANY_CLASSES_CONFIG}).status_code == 200
    assert time.monotonic() - started < 3
    wait_until_embedded(app, MANY_CLASSES)
    assert sorted(computed) == sorted(MANY_CLASSES)
    assert any("text embeddings of 12 class names computed ahead" in r.getMessage() for r in caplog.records)
    client.post("/setup", json={"project": "3.1", "schema": MANY_CLASSES_CONFIG})  # nothing left to compute
    fake_ls.public["a.png"] = png(64, 64)
    response = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": f"{fake_ls.url}/img/a.png"}}],
                                             "label_config": MANY_CLASSES_CONFIG})
    assert response.get_json()["results"][0]["result"]
    assert sorted(computed) == sorted(MANY_CLASSES)  # /predict found every class name cached


def test_class_names_that_outlast_the_budget_finish_in_the_background(tiny_model, tmp_path, fake_ls, monkeypatch,
                                                                      caplog):
    fake_ls.public["a.png"] = png(64, 64)
    original = TextEmbedder._compute

    def slow(self, queries):
        time.sleep(0.5)  # a text batch of 5 class names on a slow CPU
        return original(self, queries)

    monkeypatch.setattr(TextEmbedder, "_compute", slow)
    caplog.set_level(logging.WARNING)
    app = make_app(tiny_model, tmp_path, predict_budget_s=0.8)
    app.extensions["rfclip"]["holder"].get(30)
    client = app.test_client()
    body = {"tasks": [{"id": i, "data": {"image": f"{fake_ls.url}/img/a.png"}} for i in (1, 2)],
            "label_config": MANY_CLASSES_CONFIG}
    started = time.monotonic()
    assert client.post("/predict", json=body).get_json()["results"] == [[], []]
    assert time.monotonic() - started < 1.5  # one text batch fitted, the second would not have
    (line,) = [r.getMessage() for r in caplog.records if "still need text embeddings" in r.getMessage()]
    assert line.startswith("tasks 1, 2 not predicted yet: 7 of 12 class names")
    wait_until_embedded(app, MANY_CLASSES)
    results = client.post("/predict", json=body).get_json()["results"]
    assert all(r["result"] for r in results)
