"""End to end with a real Label Studio 1.23.2 and the real `rfclip-backend serve` (gunicorn).

Label Studio lives in its own venv (~1 GB); `.ci/run` installs it and sets LABEL_STUDIO_BIN.
Outside CI, without LABEL_STUDIO_BIN, this test is skipped with that reason; in CI it fails.
"""
import io
import os
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
from .fakes import FakeLabelStudio, free_port

LS_BIN = os.environ.get("LABEL_STUDIO_BIN")
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


def wait_for(url, seconds, process, log_path):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited early:\n{Path(log_path).read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {seconds} s:\n{Path(log_path).read_text()[-3000:]}")


def stop(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    media = FakeLabelStudio(token="unused")  # serves the URL-imported image
    ls_port, backend_port = free_port(), free_port()
    ls_url, backend_url = f"http://127.0.0.1:{ls_port}", f"http://127.0.0.1:{backend_port}"

    torch.manual_seed(0)
    checkpoint = root / "tiny.pt"
    torch.save(load_model(TINY_CONFIG, pretrained=None).clip.state_dict(), checkpoint)

    clean = {k: v for k, v in os.environ.items()
             if k not in ("HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN")}
    ls_env = {**clean, "LABEL_STUDIO_BASE_DATA_DIR": str(root / "ls-data"), "HOME": str(root / "ls-home"),
              "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false",
              "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false"}
    (root / "ls-home").mkdir()
    ls_log = root / "ls.log"
    ls = subprocess.Popen(
        [LS_BIN, "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(ls_port),
         "--username=e2e@example.com", "--password=e2e-password-123", f"--user-token={TOKEN}",
         "--enable-legacy-api-token"],
        env=ls_env, stdout=ls_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    backend_env = {**clean, "RFCLIP_MODEL": TINY_CONFIG, "RFCLIP_PRETRAINED": str(checkpoint),
                   "RFCLIP_DISTRACTION_DIMS": "1,2,3", "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN,
                   "RFCLIP_CACHE_DIR": str(root / "cache"), "LOG_LEVEL": "INFO"}
    backend_log = root / "backend.log"
    backend = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(backend_port),
         "--workers", "1", "--threads", "4"],
        env=backend_env, stdout=backend_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        cwd=Path(__file__).parents[1])
    try:
        wait_for(f"{backend_url}/health", 60, backend, backend_log)
        wait_for(f"{ls_url}/health", 240, ls, ls_log)
        yield {"ls": ls_url, "backend": backend_url, "media": media, "backend_log": backend_log,
               "backend_env": backend_env}
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


def preannotate(stack, project, *args):
    env = {**stack["backend_env"], "LOG_LEVEL": "WARNING"}
    done = subprocess.run([sys.executable, "-m", "backend.cli", "preannotate", "--project", str(project),
                           "--chunk", "4", "--no-progress", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parents[1])
    assert TOKEN not in done.stdout + done.stderr
    return done.returncode, done.stdout


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

    # a first, partial run (as if stopped after three tasks)
    code, out = preannotate(stack, pid, "--tasks", ",".join(map(str, good[:3])))
    assert code == 0 and "3 predicted, 0 skipped" in out
    # the rerun resumes: the rest, the broken image reported with its reason
    code, out = preannotate(stack, pid)
    assert code == 1 and "7 predicted, 3 skipped" in out and f"task {missing}: HTTP 404" in out
    # and again: only the failed task is tried
    code, out = preannotate(stack, pid)
    assert code == 1 and "0 predicted, 10 skipped, 1 failed" in out.replace(" (already predicted)", "")

    version = out.rsplit("model version ", 1)[1].split()[0]
    for task in good:
        predictions = api(stack, "GET", f"/api/predictions?task={task}")
        assert [p["model_version"] for p in predictions] == [version]
        assert predictions[0]["result"] and 0 <= predictions[0]["score"] <= 1
    assert api(stack, "GET", f"/api/predictions?task={missing}") == []
    assert api(stack, "GET", f"/api/projects/{pid}")["model_version"] == version
