"""End to end with a real Label Studio 1.23.2 and the real `rfclip-backend serve` (gunicorn).

Label Studio lives in its own venv (~1 GB); `.ci/run` installs it and sets LABEL_STUDIO_BIN.
Outside CI, without LABEL_STUDIO_BIN, this test is skipped with that reason; in CI it fails.
"""
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from rfclip_engine import load_model

from .conftest import TINY_CONFIG
from .fakes import FakeLabelStudio, RedisServer, free_port
from .label_studio import clean_environment, start_label_studio, stop, wait_for

LS_BIN = os.environ.get("LABEL_STUDIO_BIN")
REPO = Path(__file__).parents[1]
TOKEN = "e2e0123456789abcdef0123456789abcdef0123"
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="cat" background="#ff0000"/><Label value="dog" background="#0000ff"/>'
          '</BrushLabels></View>')

if not LS_BIN:
    if os.environ.get("CI"):
        raise RuntimeError("LABEL_STUDIO_BIN is not set: .ci/run must install Label Studio for the end-to-end test")
    pytest.skip("set LABEL_STUDIO_BIN to a label-studio 1.23.2 executable (bash .ci/run does)", allow_module_level=True)


def png_bytes(height, width, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    media = FakeLabelStudio(token="unused")  # serves the URL-imported image
    ls_port, backend_port = free_port(), free_port()
    ls_url, backend_url = f"http://127.0.0.1:{ls_port}", f"http://127.0.0.1:{backend_port}"

    torch.manual_seed(0)
    checkpoint = root / "tiny.pt"
    torch.save(load_model(TINY_CONFIG, pretrained=None).clip.state_dict(), checkpoint)

    ls, ls_log = start_label_studio(LS_BIN, root, ls_port, TOKEN)
    clean = clean_environment()

    backend_env = {**clean, "RFCLIP_MODEL": TINY_CONFIG, "RFCLIP_PRETRAINED": str(checkpoint),
                   "RFCLIP_DISTRACTION_DIMS": "1,2,3", "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN,
                   "RFCLIP_CACHE_DIR": str(root / "cache"), "LOG_LEVEL": "INFO"}
    backend_log = root / "backend.log"
    backend = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(backend_port),
         "--workers", "1", "--threads", "4"],
        env=backend_env, stdout=backend_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        cwd=REPO)
    try:
        wait_for(f"{backend_url}/health", 60, backend, backend_log)
        wait_for(f"{ls_url}/health", 240, ls, ls_log)
        yield {"ls": ls_url, "backend": backend_url, "media": media, "backend_log": backend_log,
               "backend_env": backend_env, "root": root}
    finally:
        stop(backend)
        stop(ls)
        media.close()


def api(stack, method, path, **kwargs):
    response = requests.request(method, stack["ls"] + path, headers={"Authorization": f"Token {TOKEN}"},
                                timeout=120, **kwargs)
    assert response.status_code < 300, (method, path, response.status_code, response.text[:500])
    return response.json() if response.content else None


def check_predictions(stack, task, sizes):
    predictions = api(stack, "GET", f"/api/predictions?task={task['id']}")
    assert len(predictions) == 1, predictions
    (prediction,) = predictions
    assert prediction["model_version"].startswith("rfclip-")
    height, width = sizes
    assert prediction["result"]
    covered = np.zeros((height, width), bool)
    for region in prediction["result"]:
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"][0] in ("cat", "dog")
        assert (region["original_width"], region["original_height"]) == (width, height)
        mask = np.reshape(decode_rle(region["value"]["rle"]), (height, width, 4))[:, :, 3] == 255
        assert mask.any() and not (covered & mask).any()
        covered |= mask
    assert covered.all()


def test_label_studio_end_to_end(stack):
    project = api(stack, "POST", "/api/projects", json={"title": "rfclip e2e", "label_config": CONFIG})
    pid = project["id"]
    uploaded = png_bytes(120, 160, seed=1)
    api(stack, "POST", f"/api/projects/{pid}/import", files={"file": ("cat.png", uploaded, "image/png")})
    stack["media"].public["dog.png"] = png_bytes(90, 130, seed=2)
    api(stack, "POST", f"/api/projects/{pid}/import", json=[{"image": f"{stack['media'].url}/img/dog.png"}])
    tasks = api(stack, "GET", f"/api/tasks?project={pid}")["tasks"]
    assert len(tasks) == 2

    ml = api(stack, "POST", "/api/ml", json={"url": stack["backend"], "project": pid, "title": "rfclip",
                                             "is_interactive": False})
    assert ml["id"]

    api(stack, "POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
        json={"selectedItems": {"all": True, "excluded": []}})
    by_image = {t["data"]["image"].rsplit("/", 1)[-1]: t for t in tasks}
    upload_task = next(t for name, t in by_image.items() if name.endswith("cat.png"))
    url_task = by_image["dog.png"]
    check_predictions(stack, upload_task, (120, 160))
    check_predictions(stack, url_task, (90, 130))

    # a task imported later is predicted when an annotator opens it
    stack["media"].public["late.png"] = png_bytes(64, 100, seed=3)
    api(stack, "POST", f"/api/projects/{pid}/import", json=[{"image": f"{stack['media'].url}/img/late.png"}])
    late = next(t for t in api(stack, "GET", f"/api/tasks?project={pid}")["tasks"]
                if t["data"]["image"].endswith("late.png"))
    api(stack, "GET", f"/api/tasks/{late['id']}")
    check_predictions(stack, late, (64, 100))
    assert TOKEN not in stack["backend_log"].read_text()


def preannotate(stack, project, *args, env=None):
    done = backend_command(stack, "preannotate", "--project", str(project), "--chunk", "4", "--no-progress", *args,
                           env=env)
    return done.returncode, done.stdout + done.stderr


def backend_command(stack, *args, env=None):
    env = {**stack["backend_env"], "LOG_LEVEL": "WARNING", **(env or {})}
    done = subprocess.run([sys.executable, "-m", "backend.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert TOKEN not in done.stdout + done.stderr
    return done


def test_preannotate_a_whole_project_resumes_and_never_predicts_twice(stack):
    project = api(stack, "POST", "/api/projects", json={"title": "rfclip preannotate", "label_config": CONFIG})
    pid = project["id"]
    for i in range(10):
        stack["media"].public[f"pre{i}.png"] = png_bytes(60, 80, seed=10 + i)
    api(stack, "POST", f"/api/projects/{pid}/import",
        json=[{"image": f"{stack['media'].url}/img/pre{i}.png"} for i in range(10)]
        + [{"image": f"{stack['media'].url}/img/missing.png"}])
    tasks = api(stack, "GET", f"/api/tasks?project={pid}&page_size=100")["tasks"]
    ids = sorted(t["id"] for t in tasks)
    missing = next(t["id"] for t in tasks if t["data"]["image"].endswith("missing.png"))
    good = [i for i in ids if i != missing]
    # "Connect Model" first, as a user would: the project's active model version becomes its title
    ml = api(stack, "POST", "/api/ml", json={"url": stack["backend"], "project": pid, "title": "rfclip",
                                             "is_interactive": False})
    assert api(stack, "GET", f"/api/projects/{pid}")["model_version"] == "rfclip"

    # first, partial runs: a Data Manager view's filters (whatever it sorts by), then task ids
    view = api(stack, "POST", "/api/dm/views", json={"project": pid, "data": {
        "filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:id", "operator": "less_or_equal", "type": "Number", "value": good[2]}]},
        "ordering": ["-tasks:id"]}})
    code, out = preannotate(stack, pid, "--view", str(view["id"]), "--chunk", "2")
    assert code == 0 and "3 predicted, 0 skipped" in out, out
    assert [len(api(stack, "GET", f"/api/predictions?task={task}")) for task in good[:4]] == [1, 1, 1, 0]
    code, out = preannotate(stack, pid, "--view", str(view["id"] + 1000))
    assert code == 2 and f"view {view['id'] + 1000} does not exist" in out, out
    code, out = preannotate(stack, pid + 1000)
    assert code == 2 and f"project {pid + 1000}: Label Studio at {stack['ls']} has no such project" in out, out
    code, out = preannotate(stack, pid, "--tasks", str(good[3]))
    assert code == 0 and "1 predicted, 0 skipped" in out, out
    # the rerun resumes: the rest, the broken image reported with its reason
    code, out = preannotate(stack, pid)
    assert code == 1 and "6 predicted, 4 skipped" in out and f"task {missing}: HTTP 404" in out
    # and again: only the failed task is tried
    code, out = preannotate(stack, pid)
    assert code == 1 and "0 predicted, 10 skipped, 1 failed" in out.replace(" (already predicted)", "")

    version = out.rsplit("model version ", 1)[1].split()[0]
    for task in good:
        predictions = api(stack, "GET", f"/api/predictions?task={task}")
        assert [p["model_version"] for p in predictions] == [version]
        assert predictions[0]["result"] and 0 <= predictions[0]["score"] <= 1
    assert api(stack, "GET", f"/api/predictions?task={missing}") == []
    # the active version is the one written, and the connected backend's title went along with it ...
    assert api(stack, "GET", f"/api/projects/{pid}")["model_version"] == version
    assert api(stack, "GET", f"/api/ml/{ml['id']}")["title"] == version
    # ... so "Label All Tasks" still asks the backend for a task that has no prediction
    stack["media"].public["stream.png"] = png_bytes(50, 70, seed=40)
    api(stack, "POST", f"/api/projects/{pid}/import", json=[{"image": f"{stack['media'].url}/img/stream.png"}])
    for task in ids:  # labeled: out of the stream
        api(stack, "POST", f"/api/tasks/{task}/annotations", json={"result": [], "was_cancelled": False})
    streamed = api(stack, "GET", f"/api/projects/{pid}/next")
    assert streamed["data"]["image"].endswith("stream.png")
    assert [p["model_version"] for p in streamed["predictions"]] == [version] and streamed["predictions"][0]["result"]


# --- the job queue: real workers, a real Redis, the real Label Studio

@pytest.fixture(scope="module")
def queue_redis():
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def image_project(stack, title, count, prefix, delay_s=0.0):
    pid = api(stack, "POST", "/api/projects", json={"title": title, "label_config": CONFIG})["id"]
    for i in range(count):
        stack["media"].public[f"{prefix}{i}.png"] = png_bytes(60, 80, seed=100 + i)
        stack["media"].delay_s[f"{prefix}{i}.png"] = delay_s
    api(stack, "POST", f"/api/projects/{pid}/import",
        json=[{"image": f"{stack['media'].url}/img/{prefix}{i}.png"} for i in range(count)])
    ids = sorted(t["id"] for t in api(stack, "GET", f"/api/tasks?project={pid}&page_size=1000")["tasks"])
    assert len(ids) == count
    return pid, ids


def start_worker(stack, queue_redis, name, faulty=False):
    env = {**stack["backend_env"], "REDIS_URL": queue_redis.url, "RFCLIP_JOB_LEASE_S": "4"}
    command = ["tests.fault_worker"] if faulty else ["backend.cli", "worker"]
    log = stack["root"] / f"{name}.log"
    process = subprocess.Popen([sys.executable, "-m", *command], env=env, stdout=log.open("w"),
                               stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    return process, log


def wait_until(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} within {seconds} s")


def workers_listening(stack, queue_redis):
    out = backend_command(stack, "jobs", "--json", env={"REDIS_URL": queue_redis.url}).stdout
    return json.loads(out)["workers"]


def one_prediction_each(stack, ids, version):
    for task in ids:
        predictions = api(stack, "GET", f"/api/predictions?task={task}")
        assert [p["model_version"] for p in predictions] == [version], (task, predictions)
        assert predictions[0]["result"]


def test_preannotate_through_the_queue_with_two_workers(stack, queue_redis):
    pid, ids = image_project(stack, "rfclip queue", 60, "q")
    workers = [start_worker(stack, queue_redis, f"worker{n}") for n in (1, 2)]
    queue_env = {"REDIS_URL": queue_redis.url}
    try:
        wait_until(lambda: workers_listening(stack, queue_redis) == 2, 120, "two workers listening")
        code, out = preannotate(stack, pid, "--chunk", "8", "--follow", env=queue_env)
        assert code == 0 and "60 tasks to predict in 8 chunks (8 enqueued" in out, out
        assert "60 predicted, 0 skipped (already predicted), 0 failed, 0 left" in out, out
        version = out.rsplit("model version ", 1)[1].split()[0]
        one_prediction_each(stack, ids, version)
        assert api(stack, "GET", f"/api/projects/{pid}")["model_version"] == version
        code, out = preannotate(stack, pid, "--chunk", "8", env=queue_env)  # nothing left: nothing enqueued
        assert code == 0 and "0 tasks to predict in 0 chunks" in out and "60 skipped" in out, out
        jobs = backend_command(stack, "jobs", "--project", str(pid), env=queue_env).stdout
        assert "8 done, 0 failed; tasks 60 predicted" in jobs and "tasks/s" in jobs, jobs
        per_worker = json.loads(backend_command(stack, "jobs", "--json", env=queue_env).stdout)
        (run,) = [r for r in per_worker["runs"] if r["project"] == pid]
        assert len(run["tasks_per_s"]) == 2  # both workers took chunks
    finally:
        for process, _ in workers:
            stop(process)


def test_a_killed_worker_s_chunk_runs_again_on_the_other_and_nothing_is_twice(stack, queue_redis):
    pid, ids = image_project(stack, "rfclip kill", 40, "k")
    queue_env = {"REDIS_URL": queue_redis.url}
    dying, dying_log = start_worker(stack, queue_redis, "dying", faulty=True)
    survivor = None
    try:
        wait_until(lambda: workers_listening(stack, queue_redis) >= 1, 120, "the dying worker listening")
        code, out = preannotate(stack, pid, "--chunk", "8", env=queue_env)
        assert code == 0 and "5 enqueued" in out, out
        wait_until(lambda: dying.poll() is not None, 120, "the dying worker's SIGKILL")
        assert dying.returncode == -signal.SIGKILL, dying_log.read_text()[-2000:]
        pushed = [t for t in ids if api(stack, "GET", f"/api/predictions?task={t}")]
        assert len(pushed) == 4  # half of its first chunk, then it died
        survivor, _ = start_worker(stack, queue_redis, "survivor")
        # enqueueing again adds nothing (all five chunks are waiting or "running"); following
        # reclaims the dead worker's chunk once its lease lapses
        code, out = preannotate(stack, pid, "--chunk", "8", "--follow", env=queue_env)
        # how many chunks the survivor has finished by the time this run lists the tasks varies
        assert code == 0 and re.search(r"\(0 enqueued, [1-5] already queued or running\)", out), out
        assert "0 failed, 0 left" in out, out
        one_prediction_each(stack, ids, out.rsplit("model version ", 1)[1].split()[0])
    finally:
        stop(dying)
        if survivor is not None:
            stop(survivor)


def test_a_retrieve_beyond_the_budget_overflows_into_the_queue(stack, queue_redis):
    pid, ids = image_project(stack, "rfclip overflow", 60, "o", delay_s=2.0)  # a slow image host
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**stack["backend_env"], "REDIS_URL": queue_redis.url, "RFCLIP_PREDICT_BUDGET_S": "10"}
    log = stack["root"] / "overflow-backend.log"
    backend = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port",
                                str(port)], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True, cwd=REPO)
    worker, _ = start_worker(stack, queue_redis, "overflow-worker")
    try:
        wait_for(f"{url}/health", 60, backend, log)
        wait_until(lambda: workers_listening(stack, queue_redis) >= 1, 120, "a worker listening")
        api(stack, "POST", "/api/ml", json={"url": url, "project": pid, "title": "rfclip", "is_interactive": False})
        started = time.monotonic()
        api(stack, "POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
            json={"selectedItems": {"all": True, "excluded": []}})
        answered = [t for t in ids if api(stack, "GET", f"/api/predictions?task={t}")]
        assert 0 < len(answered) < 60 and time.monotonic() - started < 60  # the budget cut the answer short
        jobs = requests.get(f"{url}/jobs?project={pid}", timeout=10).json()
        (run,) = jobs["runs"]
        assert run["tasks"]["total"] == 60 - len(answered)
        wait_until(lambda: all(api(stack, "GET", f"/api/predictions?task={t}") for t in ids), 240,
                   "the overflow's predictions")
        version = requests.get(f"{url}/health", timeout=10).json()["model_version"]
        one_prediction_each(stack, ids, version)
        assert "queued in" in log.read_text()
    finally:
        stop(worker)
        stop(backend)


# --- active learning: an annotation through the API, its webhook, the next Retrieve

def brush_result(mask, label):
    from backend.regions import mask_to_rle

    height, width = mask.shape
    return {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": width,
            "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}


def backend_version(stack, project):
    answer = requests.post(f"{stack['backend']}/setup", json={"project": f"{project}.1", "schema": CONFIG}, timeout=10)
    return answer.json()["model_version"]


def test_a_corrected_mask_is_learned_and_used_by_the_next_retrieve(stack):
    pid, (first, second) = image_project(stack, "rfclip learning", 2, "learn")
    api(stack, "POST", "/api/ml", json={"url": stack["backend"], "project": pid, "title": "rfclip",
                                        "is_interactive": False})  # registers the backend's /webhook
    base = backend_version(stack, pid)
    left = np.zeros((60, 80), bool)
    left[:, :40] = True
    annotation = api(stack, "POST", f"/api/tasks/{first}/annotations",
                     json={"result": [brush_result(left, "cat"), brush_result(~left, "dog")]})
    wait_until(lambda: backend_version(stack, pid) != base, 60, "the annotation's webhook learned")
    learned = backend_version(stack, pid)
    assert learned.startswith(base + "-p")
    assert f"project {pid}: annotation {annotation['id']} taught cat (1 examples), dog (1 examples)" in \
        stack["backend_log"].read_text()

    api(stack, "POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}",
        json={"selectedItems": {"all": False, "included": [second]}})
    (prediction,) = api(stack, "GET", f"/api/predictions?task={second}")
    assert prediction["model_version"] == learned and prediction["result"]

    # the annotator takes the dog back: the update replaces what the annotation taught
    api(stack, "PATCH", f"/api/annotations/{annotation['id']}", json={"result": [brush_result(left, "cat")]})
    wait_until(lambda: backend_version(stack, pid) not in (base, learned), 60, "the update learned")
    api(stack, "DELETE", f"/api/annotations/{annotation['id']}")
    wait_until(lambda: backend_version(stack, pid) == base, 60, "the deleted annotation forgotten")
    assert backend_version(stack, pid + 1000) == base  # nothing reached another project


# --- a real browser: Debian's chromium driven by Playwright (never a browser download)

ARTIFACTS = Path(os.environ.get("RFCLIP_TEST_ARTIFACTS", REPO / "test-artifacts")) / "browser"
CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
# no background networking: this machine's closed network refuses it, many connections at a time
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def test_reviewers_sort_by_prediction_score_and_find_the_regions(stack):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    pid = api(stack, "POST", "/api/projects", json={"title": "rfclip browser", "label_config": CONFIG})["id"]
    # uploads, so that Label Studio itself serves the images to the browser
    api(stack, "POST", f"/api/projects/{pid}/import",
        files={f"file{i}": (f"browse{i}.png", png_bytes(120, 160, seed=200 + i), "image/png") for i in range(4)})
    ids = sorted(t["id"] for t in api(stack, "GET", f"/api/tasks?project={pid}")["tasks"])
    assert len(ids) == 4
    code, out = preannotate(stack, pid)
    assert code == 0 and "4 predicted" in out, out
    scores = {t: api(stack, "GET", f"/api/predictions?task={t}")[0]["score"] for t in ids}
    ascending = sorted(scores, key=lambda t: (scores[t], t))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 800})
        step = 0

        def shot(name):
            nonlocal step
            step += 1
            page.screenshot(path=str(ARTIFACTS / f"{step:02d}-{name}.png"))

        try:
            page.goto(f"{stack['ls']}/user/login/")
            page.fill("input[name=email]", "e2e@example.com")
            page.fill("input[name=password]", "e2e-password-123")
            page.click("button[type=submit]")
            page.wait_for_load_state("networkidle")
            page.goto(f"{stack['ls']}/projects/{pid}/data")
            page.wait_for_load_state("networkidle")
            shot("data-manager")
            page.get_by_role("button", name="Columns").click()
            page.get_by_text("Prediction score", exact=True).click()
            page.keyboard.press("Escape")
            page.get_by_role("button", name="Order by").click()
            page.get_by_text("Prediction score", exact=True).last.click()
            page.keyboard.press("Escape")
            page.wait_for_timeout(1500)
            shot("sorted-by-score")
            shown = [float(line) for line in page.locator("body").inner_text().split("\n")
                     if re.fullmatch(r"[01]\.\d{3}", line.strip())]
            assert shown == [round(scores[t], 3) for t in ascending], (shown, scores)
            page.locator("[class*=row-wrapper]").first.click()
            page.get_by_text("Regions", exact=True).first.wait_for()
            page.wait_for_timeout(1500)
            shot("least-certain-task")
            assert "issue loading URL" not in page.locator("body").inner_text()  # the image is there too
            first = api(stack, "GET", f"/api/predictions?task={ascending[0]}")[0]
            outliner = page.locator("body").inner_text().split("Regions", 1)[1]
            for region in first["result"]:
                assert region["value"]["brushlabels"][0] in outliner
                assert f"{region['score']:.2f}" in outliner
        except Exception:
            shot("failure")
            raise
        finally:
            browser.close()
