"""Hostile and careless input, against the real Flask app and a hostile host on loopback:
liveness, where downloads may go, what reaches the logs, and bad requests."""
import io
import ipaddress
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from backend.media import Credentials, ImageFetcher, MediaError
from backend.netguard import DestinationPolicy, DestinationRefused, reached_ipv4
from backend.redaction import SafeFormatter
from backend.settings import Settings, SettingsError
from rfclip_engine import predictor
from rfclip_engine.text import TextEmbedder

from .backend_support import BRUSH_CONFIG, make_app, png

TOKEN = "TESTTOKEN-1234567890"


def predict(client, tasks, config=BRUSH_CONFIG):
    response = client.post("/predict", json={"tasks": tasks, "label_config": config})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"]


def messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("rfclip")]


# --- liveness and time ---------------------------------------------------------------------

def test_a_batch_that_outlasts_the_budget_does_not_stop_later_requests(tiny_model, tmp_path, hostile, monkeypatch):
    original = predictor.Segmenter.logits_many
    slow = {"on": True}

    def sometimes_slow(self, rgbs, vocabulary, timer=predictor.untimed, prototypes=None):
        if slow["on"]:
            time.sleep(1.5)
        return original(self, rgbs, vocabulary, timer, prototypes)

    monkeypatch.setattr(predictor.Segmenter, "logits_many", sometimes_slow)
    client = make_app(tiny_model, tmp_path, predict_budget_s=1.0).test_client()
    tasks = [{"id": 1, "data": {"image": f"{hostile.url}/ok.png"}}]
    assert predict(client, tasks)[0]["result"]  # the first batch always runs
    slow["on"] = False
    for _ in range(3):  # the estimate (1.5 s > budget) must not turn every later request away
        assert predict(client, tasks)[0]["result"]


@pytest.mark.parametrize("path", ["/drip-headers", "/drip-body", "/endless"])
def test_one_wall_clock_deadline_per_download(tmp_path, hostile, path):
    fetcher = ImageFetcher(tmp_path, None, 10 << 30, 1.0, 10 ** 8, policy=DestinationPolicy(allow_private=True))
    started = time.monotonic()
    with pytest.raises(MediaError, match="longer than 1 s"):
        fetcher.fetch(f"{hostile.url}{path}", 1, Credentials(None, None))
    assert time.monotonic() - started < 2.5


def test_a_dripping_host_cannot_hold_predict_past_its_budget(tiny_model, tmp_path, hostile, caplog):
    caplog.set_level(logging.WARNING)
    client = make_app(tiny_model, tmp_path, predict_budget_s=2.0, fetch_timeout_s=60.0).test_client()
    tasks = [{"id": 1, "data": {"image": f"{hostile.url}/drip-headers"}},
             {"id": 2, "data": {"image": f"{hostile.url}/ok.png"}}]
    started = time.monotonic()
    results = predict(client, tasks)
    assert time.monotonic() - started < 2.0 + 5.0
    assert results[0] == [] and results[1]["result"]
    assert any(m.startswith("task 1: not predicted: its image did not arrive") for m in messages(caplog))


def test_background_text_embedding_lets_waiting_requests_in(tiny_model, tmp_path, hostile, monkeypatch):
    original = TextEmbedder._compute

    def slow(self, queries):
        time.sleep(0.3)
        return original(self, queries)

    monkeypatch.setattr(TextEmbedder, "_compute", slow)
    app = make_app(tiny_model, tmp_path, predict_budget_s=4.0)
    client = app.test_client()
    app.extensions["rfclip"]["holder"].get(30)
    huge = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
            + "".join(f'<Label value="thing {i}"/>' for i in range(200)) + "</BrushLabels></View>")
    assert client.post("/setup", json={"project": "1", "schema": huge}).status_code == 200  # ~12 s of batches
    time.sleep(0.5)
    started = time.monotonic()
    results = predict(client, [{"id": 1, "data": {"image": f"{hostile.url}/ok.png"}}])
    assert results[0]["result"] and time.monotonic() - started < 4.0


def test_the_number_of_queries_per_config_is_capped(tiny_model, tmp_path):
    client = make_app(tiny_model, tmp_path, max_queries=10).test_client()
    config = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
              + "".join(f'<Label value="thing {i}"/>' for i in range(11)) + "</BrushLabels></View>")
    for response in (client.post("/setup", json={"project": "1", "schema": config}),
                     client.post("/predict", json={"tasks": [], "label_config": config})):
        assert response.status_code == 400
        assert "11 class names and synonyms, more than the limit of 10 (RFCLIP_MAX_QUERIES)" in response.get_json()["error"]


# --- secrets and network -------------------------------------------------------------------

def test_an_api_key_without_its_url_is_a_start_up_error():
    with pytest.raises(SettingsError, match="LABEL_STUDIO_API_KEY.*LABEL_STUDIO_URL"):
        Settings.from_env({"LABEL_STUDIO_API_KEY": TOKEN})


def test_the_environment_key_goes_only_to_the_environment_url(tiny_model, tmp_path, fake_ls, hostile):
    fake_ls.uploads["1/a.png"] = png(40, 40)
    client = make_app(tiny_model, tmp_path, label_studio_url=fake_ls.url, label_studio_api_key=TOKEN).test_client()
    # anyone who reaches the port can send /setup: its hostname and token are not used
    client.post("/setup", json={"project": "1", "schema": BRUSH_CONFIG, "hostname": hostile.url,
                                "access_token": "hostile-token-123456"})
    results = client.post("/predict", json={"project": "1", "label_config": BRUSH_CONFIG, "tasks": [
        {"id": 1, "data": {"image": "/data/upload/1/a.png"}},
        {"id": 2, "data": {"image": f"{hostile.url}/ok.png"}}]}).get_json()["results"]
    assert results[0]["result"] and results[1]["result"]
    assert [r["path"] for r in hostile.requests] == ["/ok.png"]
    assert all(TOKEN not in str(r["headers"]) for r in hostile.requests)


def test_setup_credentials_are_used_only_as_a_pair(tiny_model, tmp_path, fake_ls):
    fake_ls.uploads["1/a.png"] = png(40, 40)
    client = make_app(tiny_model, tmp_path).test_client()
    client.post("/setup", json={"project": "1", "schema": BRUSH_CONFIG, "hostname": fake_ls.url, "access_token": TOKEN})
    body = {"project": "1", "label_config": BRUSH_CONFIG, "tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}]}
    assert client.post("/predict", json=body).get_json()["results"][0]["result"]


def guarded_app(tiny_model, tmp_path, **overrides):
    return make_app(tiny_model, tmp_path, **{"allow_private_urls": False, **overrides})


def test_private_and_link_local_destinations_are_refused(tiny_model, tmp_path, hostile, caplog):
    caplog.set_level(logging.WARNING)
    client = guarded_app(tiny_model, tmp_path).test_client()
    tasks = [{"id": 1, "data": {"image": f"{hostile.url}/ok.png"}},
             {"id": 2, "data": {"image": "http://169.254.169.254/latest/meta-data/"}},
             {"id": 3, "data": {"image": "http://[fe80::1]/x.png"}},
             {"id": 4, "data": {"image": f"http://localhost:{hostile.port}/ok.png"}},
             {"id": 5, "data": {"image": "http://[::ffff:169.254.169.254]/x.png"}},
             # IPv4 addresses inside IPv6 ones: what an IPv6-only subnet's NAT64 gateway (the
             # well-known prefix), a 6to4 relay or a local-use translator reaches
             {"id": 6, "data": {"image": "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/"}},
             {"id": 7, "data": {"image": "http://[64:ff9b::a00:1]/x.png"}},
             {"id": 8, "data": {"image": "http://[2002:a00:1::1]/x.png"}},
             {"id": 9, "data": {"image": "http://[64:ff9b:1::808:808]/x.png"}}]
    assert predict(client, tasks) == [[]] * 9
    assert hostile.requests == []
    lines = messages(caplog)
    for task_id in (1, 4, 7, 8, 9):
        (line,) = [m for m in lines if m.startswith(f"task {task_id}:")]
        assert "RFCLIP_ALLOW_PRIVATE_URLS=true" in line
    for task_id in (2, 3, 5, 6):
        (line,) = [m for m in lines if m.startswith(f"task {task_id}:")]
        assert "link-local" in line
    assert any(m.startswith("task 7:") and "64:ff9b::a00:1, which reaches the private or loopback address 10.0.0.1"
               in m for m in lines)


@pytest.mark.parametrize("address, reached", [
    ("64:ff9b::808:808", "8.8.8.8"), ("2002:808:808::1", "8.8.8.8"), ("::ffff:8.8.8.8", "8.8.8.8"),
    ("2606:4700::1111", "2606:4700::1111"), ("8.8.8.8", "8.8.8.8"),
])
def test_public_addresses_stay_reachable_through_translators(address, reached):
    assert str(reached_ipv4(ipaddress.ip_address(address))) == reached
    DestinationPolicy().check("public.example", ipaddress.ip_address(address))  # not refused


def test_every_redirect_hop_is_checked(tiny_model, tmp_path, hostile, caplog):
    """The Label Studio host is trusted; where it redirects to is checked again."""
    caplog.set_level(logging.WARNING)
    client = guarded_app(tiny_model, tmp_path, label_studio_url=hostile.url).test_client()
    tasks = [{"id": 1, "data": {"image": f"{hostile.url}/ok.png"}},
             {"id": 2, "data": {"image": f"{hostile.url}/redirect?to=http://localhost:{hostile.port}/ok.png"}},
             {"id": 3, "data": {"image": f"{hostile.url}/redirect?to=http://169.254.169.254/"}},
             {"id": 4, "data": {"image": f"{hostile.url}/redirect?to={hostile.url}/ok.png"}}]
    results = predict(client, tasks)
    assert results[0]["result"] and results[3]["result"] and results[1] == [] and results[2] == []
    lines = messages(caplog)
    assert any(m.startswith("task 2:") and "RFCLIP_ALLOW_PRIVATE_URLS" in m for m in lines)
    assert any(m.startswith("task 3:") and "link-local" in m for m in lines)


def test_dns_answers_are_checked_and_connected_to_as_checked(tmp_path, hostile, monkeypatch):
    real = socket.getaddrinfo
    lookups = []

    def fake_getaddrinfo(host, port, *args, **kwargs):
        if host == "mixed.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]
        if host == "rebind.example":  # answers a trusted address once, anything later is a rebind
            lookups.append(host)
            if len(lookups) > 1:
                raise socket.gaierror("a second lookup would be a chance to rebind")
            return real("127.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert DestinationPolicy().addresses("mixed.example", 80) == ["93.184.216.34"]
    with pytest.raises(DestinationRefused, match="private or loopback"):
        DestinationPolicy().addresses("rebind.example", 80)
    lookups.clear()
    fetcher = ImageFetcher(tmp_path, None, 10 << 20, 5.0, 10 ** 8,
                           policy=DestinationPolicy(trusted_hosts=frozenset({"rebind.example"})))
    rgb = fetcher.fetch(f"http://rebind.example:{hostile.port}/ok.png", 1, Credentials(None, None)).rgb
    assert rgb.shape == (48, 64, 3) and lookups == ["rebind.example"]


def safe_lines(records):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter("%(levelname)s %(name)s: %(message)s"))
    for record in records:
        handler.handle(record)
    return stream.getvalue()


def test_no_secret_and_no_forged_line_reaches_the_log():
    secrets = ["hunter2pass", "AKIAEXAMPLEKEY", "sig0123456789abcdef", TOKEN, "refresh-jwt-abcdef"]
    texts = [
        "Redis at redis://:hunter2pass@cache:6379/0 is unavailable",
        "settings: {'redis_url': 'rediss://default:hunter2pass@cache:6380/0'}",
        "File https://bucket.s3.amazonaws.com/a.png?X-Amz-Credential=AKIAEXAMPLEKEY&X-Amz-Signature=sig0123456789abcdef",
        "SSL error during requests.get('https://user:hunter2pass@host/x.png')",
        f"headers {{'Authorization': 'Token {TOKEN}'}}",
        "body {\"refresh\": \"refresh-jwt-abcdef\"}",
    ]
    records = [logging.LogRecord("label_studio_sdk", logging.DEBUG, __file__, 1, text, None, None) for text in texts]
    records.append(logging.LogRecord("rfclip.backend", logging.WARNING, __file__, 1, "task %s: not predicted: %s",
                                     ("7\nINFO rfclip.backend: forged line", "HTTP 404"), None))
    try:
        raise RuntimeError(f"failed https://h/x.png?sig=sig0123456789abcdef with Bearer {TOKEN}")
    except RuntimeError:
        import sys

        records.append(logging.LogRecord("rfclip", logging.ERROR, __file__, 1, "boom", None, sys.exc_info()))
    out = safe_lines(records)
    for secret in secrets:
        assert secret not in out
    assert "cache:6379/0" in out and "bucket.s3.amazonaws.com/a.png?***" in out
    assert sum(line.startswith(("DEBUG", "WARNING", "ERROR", "INFO")) for line in out.splitlines()) == len(records)
    assert "7\\nINFO rfclip.backend: forged line" in out


def test_a_log_line_is_bounded_and_cut_only_after_its_secrets_are_out():
    """A task's image URL can be a megabyte long, and urllib3's retry warnings name it."""
    from backend.redaction import MAX_MESSAGE

    url = "http://user:hunter2pass@host/" + "a" * 1_000_000
    cut_inside = "x" * (MAX_MESSAGE - 20) + url  # the cut would fall inside the password, unredacted
    out = safe_lines([logging.LogRecord("urllib3", logging.WARNING, __file__, 1, text, None, None)
                      for text in (url, cut_inside)])
    assert "hunter2" not in out and "hunt" not in out
    assert all(len(line) < MAX_MESSAGE + 100 for line in out.splitlines())
    assert "more characters)" in out


def test_the_start_up_settings_line_masks_the_redis_password():
    settings = Settings.from_env({"REDIS_URL": "redis://:hunter2pass@cache:6379/0",
                                  "LABEL_STUDIO_URL": "https://admin:hunter2pass@ls.example", "LABEL_STUDIO_API_KEY": TOKEN})
    text = str(settings.describe())
    assert "hunter2pass" not in text and TOKEN not in text and "cache:6379/0" in text


def test_an_allowed_folder_that_holds_the_backends_own_files_is_refused(tmp_path):
    with pytest.raises(SettingsError, match="RFCLIP_ALLOWED_LOCAL_DIR=/ contains"):
        Settings.from_env({"RFCLIP_ALLOWED_LOCAL_DIR": "/"})
    (tmp_path / "images").mkdir()
    with pytest.raises(SettingsError, match="contains RFCLIP_CACHE_DIR"):
        Settings.from_env({"RFCLIP_ALLOWED_LOCAL_DIR": str(tmp_path), "RFCLIP_CACHE_DIR": str(tmp_path / "cache")})
    settings = Settings.from_env({"RFCLIP_ALLOWED_LOCAL_DIR": str(tmp_path / "images"),
                                  "RFCLIP_CACHE_DIR": str(tmp_path / "cache")})
    assert settings.allowed_local_dir == (tmp_path / "images").resolve()


def test_the_image_cache_is_keyed_by_url_and_credentials(tmp_path, fake_ls):
    fetcher = ImageFetcher(tmp_path, None, 10 << 20, 5.0, 10 ** 8, policy=DestinationPolicy(allow_private=True))
    fake_ls.uploads["1/a.png"] = png(30, 30, seed=1)
    first = fetcher.fetch("/data/upload/1/a.png", 1, Credentials(fake_ls.url, TOKEN)).rgb
    other = ImageFetcher(tmp_path, None, 10 << 20, 5.0, 10 ** 8, policy=DestinationPolicy(allow_private=True))
    with pytest.raises(MediaError, match="HTTP 401"):  # another token: not served from the cache
        other.fetch("/data/upload/1/a.png", 1, Credentials(fake_ls.url, "another-token-123"))
    assert (fetcher.fetch("/data/upload/1/a.png", 1, Credentials(fake_ls.url, TOKEN)).rgb == first).all()
    assert all(len(f.name) == 64 for f in fetcher.cache_dir.iterdir())


def test_an_upload_is_fetched_through_label_studio_s_refusing_proxy_and_a_dropped_connection(tmp_path, fake_ls):
    """As a real Label Studio does: its upload proxy answers 400 (USE_NGINX_FOR_UPLOADS) and the
    SDK falls back to /data/upload/; a busy server drops that connection once: tried again."""
    fetcher = ImageFetcher(tmp_path, None, 10 << 20, 5.0, 10 ** 8, policy=DestinationPolicy(allow_private=True))
    fake_ls.uploads["1/a.png"] = png(30, 30, seed=1)
    fake_ls.proxy_status = 400
    fake_ls.drops["/data/upload/1/a.png"] = 1
    assert fetcher.fetch("/data/upload/1/a.png", 1, Credentials(fake_ls.url, TOKEN)).rgb.shape == (30, 30, 3)
    assert [r["path"] for r in fake_ls.requests][-2:] == ["/data/upload/1/a.png"] * 2


def test_a_failing_fallback_is_reported_as_itself(tmp_path, fake_ls):
    fetcher = ImageFetcher(tmp_path, None, 10 << 20, 5.0, 10 ** 8, policy=DestinationPolicy(allow_private=True))
    fake_ls.uploads["1/a.png"] = png(30, 30, seed=1)
    fake_ls.proxy_status = 400
    fake_ls.drops["/data/upload/1/a.png"] = 10  # more than the retries
    with pytest.raises(MediaError, match=r"^ConnectionError fetching /data/upload/1/a.png \(after HTTP 400 from "
                                         r"/storage-data/uploaded/\)$"):
        fetcher.fetch("/data/upload/1/a.png", 1, Credentials(fake_ls.url, TOKEN))
    assert fake_ls.drops["/data/upload/1/a.png"] == 7  # one try and two retries


def test_health_shows_a_short_state_and_status_the_details(tiny_model, tmp_path):
    def failing_loader(settings, cache):
        raise FileNotFoundError("/srv/secret-models/ViT-B-16.pt not found")

    from backend.app import create_app

    app = create_app(Settings(cache_dir=tmp_path, pretrained="/srv/secret-models/missing.pt",
                              redis_url="redis://127.0.0.1:1/0"), segmenter_loader=failing_loader)
    client = app.test_client()
    app.extensions["rfclip"]["holder"].start()
    time.sleep(0.2)
    started = time.monotonic()
    body = client.get("/health").get_data(as_text=True)
    assert time.monotonic() - started < 0.5
    assert "/srv" not in body and "secret-models" not in body and '"failed"' in body and "not tried yet" in body
    assert "secret-models" in client.get("/status").get_data(as_text=True)


def test_status_needs_the_basic_auth_when_set(tiny_model, tmp_path):
    client = make_app(tiny_model, tmp_path, basic_auth_user="u", basic_auth_pass="p").test_client()
    assert client.get("/health").status_code == 200
    assert client.get("/status").status_code == 401


# --- bad input -----------------------------------------------------------------------------

def test_a_task_that_is_not_an_object_gets_an_empty_entry(tiny_model, tmp_path, hostile):
    client = make_app(tiny_model, tmp_path).test_client()
    good = {"id": 1, "data": {"image": f"{hostile.url}/ok.png"}}
    results = predict(client, [good, "junk", 7, None, dict(good, id=2), ["x"]])
    assert results[0]["result"] and results[4]["result"]
    assert results[1] == results[2] == results[3] == results[5] == []


@pytest.mark.parametrize("path,body", [
    ("/predict", {"tasks": [], "label_config": 5}),
    ("/predict", {"tasks": [], "label_config": ["<View/>"]}),
    ("/setup", {"project": "1", "schema": {"a": 1}}),
    ("/setup", {"project": "1", "schema": BRUSH_CONFIG, "hostname": 5}),
    ("/webhook", {"action": "PROJECT_UPDATED", "project": "12"}),
    ("/webhook", {"action": "PROJECT_UPDATED", "project": {"id": 1, "label_config": 3}}),
])
def test_fields_of_the_wrong_type_get_a_400(tiny_model, tmp_path, path, body):
    response = make_app(tiny_model, tmp_path).test_client().post(path, json=body)
    assert response.status_code == 400 and "must be" in response.get_json()["error"]


def test_a_label_with_an_empty_value_is_skipped(tiny_model, tmp_path, hostile, caplog):
    caplog.set_level(logging.WARNING)
    config = BRUSH_CONFIG.replace('<Label value="dog"', '<Label value=""/><Label value="dog"')
    results = predict(make_app(tiny_model, tmp_path).test_client(),
                      [{"id": 1, "data": {"image": f"{hostile.url}/ok.png"}}], config)
    assert results[0]["result"]
    assert {r["value"]["brushlabels"][0] for r in results[0]["result"]} <= {"cat", "dog"}
    assert any("empty value is skipped" in m for m in messages(caplog))


def test_non_ascii_basic_auth_gets_a_401(tiny_model, tmp_path):
    import base64

    client = make_app(tiny_model, tmp_path, basic_auth_user="admin", basic_auth_pass="pässwörd").test_client()
    for user, password in [("ädmin", "x"), ("admin", "pässwort"), ("admin", "\udcff")]:
        raw = base64.b64encode(f"{user}:{password}".encode("utf-8", "surrogateescape")).decode()
        assert client.get("/versions", headers={"Authorization": f"Basic {raw}"}).status_code == 401
    raw = base64.b64encode("admin:pässwörd".encode()).decode()
    assert client.get("/versions", headers={"Authorization": f"Basic {raw}"}).status_code == 200


def test_deeply_nested_json_gets_a_400(tiny_model, tmp_path):
    client = make_app(tiny_model, tmp_path).test_client()
    body = '{"tasks": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == 400 and "nested" in response.get_json()["error"]


def test_setup_with_a_bad_schema_stores_nothing_and_the_store_is_bounded(tiny_model, tmp_path):
    app = make_app(tiny_model, tmp_path, max_projects=10)
    client = app.test_client()
    projects = app.extensions["rfclip"]["projects"]
    assert client.post("/setup", json={"project": "1", "schema": "<View>", "hostname": "http://x.example",
                                       "access_token": "t"}).status_code == 400
    assert projects.config("1") is None and projects.credentials("1") == Credentials(None, None)
    for i in range(50):
        client.post("/setup", json={"project": f"{i}.1700000000", "schema": BRUSH_CONFIG})
    assert len(projects) == 10 and projects.config("49") == BRUSH_CONFIG and projects.config("0") is None


@pytest.mark.parametrize("config", [
    '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    '<View><Image name="image" value="$image"/><BrushLabels name="t" toName="image"><Label value="&x;"/>'
    "</BrushLabels></View>",
    '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
    '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
    '<View><Image name="image" value="$image"/><BrushLabels name="t" toName="image"><Label value="&c;"/>'
    "</BrushLabels></View>",
])
def test_xml_entities_and_dtds_are_refused(tiny_model, tmp_path, config):
    response = make_app(tiny_model, tmp_path).test_client().post("/setup", json={"project": "1", "schema": config})
    assert response.status_code == 400 and "DTD or entities" in response.get_json()["error"]


# --- first run -----------------------------------------------------------------------------

def test_serve_without_the_backend_extra_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    from backend import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flask" else real(name, *a))
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'rfclip[backend]'" in err and "Flask" in err and len(err.strip().splitlines()) == 1


def test_waiting_for_the_lock_keeps_requests_ahead_of_background_work():
    from backend.model_lock import ModelLock

    lock, order = ModelLock(), []
    assert lock.acquire(timeout=1)

    def background():
        with lock.background():
            order.append("background")

    def request():
        assert lock.acquire(timeout=5)
        order.append("request")
        lock.release()

    worker = threading.Thread(target=background)
    worker.start()
    time.sleep(0.1)
    waiter = threading.Thread(target=request)
    waiter.start()
    time.sleep(0.1)
    lock.release()
    worker.join(5)
    waiter.join(5)
    assert order == ["request", "background"]


def test_a_large_jpeg_is_predicted_at_its_full_size(tiny_model, tmp_path, fake_ls):
    from label_studio_sdk.converter.brush import decode_rle
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8)).save(buf, "JPEG")
    fake_ls.public["big.jpg"] = buf.getvalue()
    app = make_app(tiny_model, tmp_path)
    app.extensions["rfclip"]["service"].fetcher.min_short_side = 150  # decoded at 1/4 (225 x 300)
    results = predict(app.test_client(), [{"id": 1, "data": {"image": f"{fake_ls.url}/img/big.jpg"}}])
    regions = results[0]["result"]
    assert regions and all((r["original_width"], r["original_height"]) == (1200, 900) for r in regions)
    masks = [decode_rle(r["value"]["rle"]).reshape(900, 1200, 4)[..., 3] > 0 for r in regions]
    assert sum(int(m.sum()) for m in masks) == 900 * 1200  # every pixel labeled once, at full size


def test_rfclip_max_image_pixels_above_pillow_s_bomb_limit_is_the_limit(tiny_model, tmp_path, fake_ls, monkeypatch):
    """Pillow refuses images over twice its own limit whatever RFCLIP_MAX_IMAGE_PIXELS says; made
    small here, so that a small image stands for a 200 MP one."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    fake_ls.public["mosaic.png"] = png(60, 80)  # 4800 pixels: over twice Pillow's 1000
    client = make_app(tiny_model, tmp_path, max_image_pixels=10_000).test_client()
    results = predict(client, [{"id": 1, "data": {"image": f"{fake_ls.url}/img/mosaic.png"}}])
    assert results[0]["result"] and results[0]["result"][0]["original_width"] == 80
    assert Image.MAX_IMAGE_PIXELS == 10_000


def test_a_setup_hostname_on_a_private_address_gets_no_token_exchange(tiny_model, tmp_path, hostile, caplog):
    caplog.set_level(logging.WARNING)
    client = guarded_app(tiny_model, tmp_path).test_client()
    import jwt

    jwt_like = jwt.encode({"token_type": "refresh", "exp": time.time() + 3600, "user_id": 1},
                          "a-test-signing-key-of-32-bytes-or-more", algorithm="HS256")  # a personal access token
    client.post("/setup", json={"project": "1", "schema": BRUSH_CONFIG, "hostname": hostile.url,
                                "access_token": jwt_like})
    body = {"project": "1", "label_config": BRUSH_CONFIG, "tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}]}
    assert client.post("/predict", json=body).get_json()["results"] == [[]]
    assert hostile.requests == []
    assert any(m.startswith("task 1:") and "RFCLIP_ALLOW_PRIVATE_URLS" in m for m in messages(caplog))


def test_https_goes_through_the_guard_and_checks_the_certificate_by_name(tmp_path):
    """The guard connects to the address it checked; TLS still verifies the host's name."""
    import ssl
    import subprocess

    import requests

    from backend.netguard import GuardedSession

    from .fakes import HostileServer

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    image = png(20, 30)
    server = HostileServer(image, tls=tls)
    try:
        trusted = GuardedSession(DestinationPolicy(trusted_hosts=frozenset({"localhost", "127.0.0.1"})), 1 << 20, 5.0)
        assert trusted.get(f"https://localhost:{server.port}/ok.png", verify=str(cert)).content == image
        with pytest.raises(requests.exceptions.SSLError):  # the certificate names localhost, not the address
            trusted.get(f"https://127.0.0.1:{server.port}/ok.png", verify=str(cert))
        with pytest.raises(DestinationRefused, match="RFCLIP_ALLOW_PRIVATE_URLS"):
            GuardedSession(DestinationPolicy(), 1 << 20, 5.0).get(f"https://localhost:{server.port}/ok.png",
                                                                  verify=str(cert))
        assert [r["path"] for r in server.requests] == ["/ok.png"]
    finally:
        server.close()


def test_a_command_that_exits_while_the_model_loads_exits_cleanly():
    """A command that fails early (a wrong project, Label Studio down) exits while the loader is
    still inside torch: a daemon loader made the process abort there ("terminate called without
    an active exception", status -6) instead of exiting with its own status."""
    code = textwrap.dedent("""
        import sys, time, torch
        from backend.service import ModelHolder
        def load():
            x = torch.randn(512, 512)
            for _ in range(400):
                x = torch.tanh(x @ x)
            return x
        ModelHolder(load).start()
        time.sleep(0.3)
        sys.exit(3)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 3, done.stderr[-2000:]
