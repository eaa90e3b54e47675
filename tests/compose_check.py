"""`docker compose --profile studio up` as a newcomer runs it, end to end, where a Docker daemon runs
(CI has none; tests/test_compose.py checks the file there):

    python tests/compose_check.py [--tasks 24] [--redis-image IMG] [--label-studio-image IMG] [--keep]

Builds the image from the Dockerfile (BASE_IMAGE and TORCH_INDEX_URL from the environment pass
through as build args), then, in a fresh compose project with a random ViT-B-16 checkpoint in its
./models: Label Studio, the backend, Redis and 2 workers (`--scale worker=2`, with
OMP_NUM_THREADS=1 in the shell). Through Label Studio's API it uploads JPEGs into a project (the
workers fetch them back from Label Studio, as with any upload) and connects the backend, then
checks:
- both services write their Hugging Face cache and run torch with 1 thread;
- `preannotate --queue` in the backend's container, one worker SIGKILLed (`docker kill`) while
  the chunks run, `preannotate --queue --follow` again: every task ends with exactly one
  prediction of the model version, which is the project's active one;
- `jobs` and `GET /jobs` report the run;
- `docker compose stop worker` (SIGTERM) lets the chunks in flight finish: nothing left running;
- a Data Manager "Retrieve Predictions" goes through `/predict`.
`--redis-image` / `--label-studio-image` replace the compose file's images through an override
file, for machines that cannot pull from Docker Hub. Exits 1 with the failed check's message.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import requests
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rfclip_engine import load_model  # noqa: E402
from rfclip_engine.presets import find_preset  # noqa: E402

STUDIO = "http://localhost:8080"
BACKEND = "http://localhost:9090"
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="cat"/><Label value="dog"/><Label value="grass"/></BrushLabels></View>')


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)
    print(f"ok: {message}")


class Compose:
    """docker-compose (1.29, or the v2 plugin) on the repository's file, in a project directory of its own."""

    def __init__(self, root: Path, env: Dict[str, str], override: Optional[Path] = None) -> None:
        binary = shutil.which("docker-compose")
        self.command = [binary] if binary else ["docker", "compose"]
        files = ["-f", str(REPO / "docker-compose.yml")] + (["-f", str(override)] if override else [])
        self.command += files + ["--project-directory", str(root), "--project-name", root.name.lower(),
                                 "--profile", "studio"]
        self.env = {**os.environ, **env}

    def __call__(self, *args: str, check_rc: bool = True) -> str:
        done = subprocess.run([*self.command, *args], env=self.env, capture_output=True, text=True)
        if check_rc and done.returncode:
            raise CheckFailed(f"{' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
        return done.stdout

    def cli(self, *args: str) -> str:
        """`rfclip-backend ARGS` in the running backend container."""
        return self("exec", "-T", "rfclip", "rfclip-backend", *args)


def wait(url: str, seconds: float, headers: Optional[Dict[str, str]] = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(url, headers=headers, timeout=5).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(2)
    raise CheckFailed(f"{url} did not answer within {seconds:.0f} s")


def new_project(headers: Dict[str, str], count: int) -> int:
    """A project of `count` uploaded JPEGs with the backend connected; its id."""
    made = requests.post(f"{STUDIO}/api/projects", headers=headers,
                         json={"title": "compose check", "label_config": CONFIG}, timeout=30)
    made.raise_for_status()
    project = made.json()["id"]
    rng = np.random.default_rng(project)
    files = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buffer, "JPEG")
        files.append((f"file{i}", (f"image{i}.jpg", buffer.getvalue(), "image/jpeg")))  # one field per file
    requests.post(f"{STUDIO}/api/projects/{project}/import", headers=headers, files=files,
                  timeout=120).raise_for_status()
    connected = requests.post(f"{STUDIO}/api/ml", headers=headers, timeout=120,
                              json={"url": "http://rfclip:9090", "project": project, "title": "rfclip"})
    check(connected.status_code == 201 and connected.json()["readable_state"] == "Connected",
          f"project {project}: Label Studio connected the backend at http://rfclip:9090")
    return project


def versions_per_task(headers: Dict[str, str], project: int) -> List[collections.Counter]:
    """Each task's predictions counted by model version, from Label Studio's predictions API."""
    tasks = requests.get(f"{STUDIO}/api/tasks", headers=headers, params={"project": project, "page_size": 1000},
                         timeout=60).json()["tasks"]
    return [collections.Counter(p["model_version"] for p in
                                requests.get(f"{STUDIO}/api/predictions", headers=headers,
                                             params={"task": task["id"]}, timeout=60).json())
            for task in tasks]


def run_checks(compose: Compose, headers: Dict[str, str], tasks: int) -> None:
    wait(f"{STUDIO}/api/projects", 300, headers)
    wait(f"{BACKEND}/health", 300)
    version = requests.get(f"{BACKEND}/health", timeout=10).json()["model_version"]
    for service in ("rfclip", "worker"):  # where RFCLIP_PRETRAINED=openai downloads to, as the image's user
        compose("exec", "-T", service, "python", "-c", "import os; open(os.environ['HF_HOME'] + '/probe', 'w')")
    print("ok: the backend and a worker can write their Hugging Face cache")
    for service in ("rfclip", "worker"):
        threads = compose("exec", "-T", service, "python", "-c", "import torch; print(torch.get_num_threads())")
        check(threads.strip() == "1", f"{service}: torch runs 1 thread, as OMP_NUM_THREADS=1 in the shell asks")
    deadline = time.monotonic() + 300
    while "queue rfclip: 2 workers" not in compose.cli("jobs"):  # both models loaded, both listening
        if time.monotonic() > deadline:
            raise CheckFailed("the 2 workers did not register with the queue within 300 s")
        time.sleep(3)

    project = new_project(headers, tasks)
    compose.cli("preannotate", "--project", str(project), "--queue", "--chunk", "8", "--no-progress")
    time.sleep(20)  # both workers are inside a chunk by now
    killed = compose("ps", "-q", "worker").split()[0]
    subprocess.run(["docker", "kill", killed], check=True, capture_output=True)  # SIGKILL
    print(f"killed worker container {killed[:12]}")
    compose.cli("preannotate", "--project", str(project), "--queue", "--follow", "--chunk", "8", "--no-progress")
    counts = versions_per_task(headers, project)
    check(len(counts) == tasks and all(c == {version: 1} for c in counts),
          f"project {project}: each of {tasks} tasks holds exactly one prediction, of {version}")
    active = requests.get(f"{STUDIO}/api/projects/{project}", headers=headers, timeout=30).json()["model_version"]
    check(active == version, f"project {project}: the active model version is {version}")
    status = compose.cli("jobs", "--project", str(project))
    check(f"tasks {tasks} predicted" in status and "0 left" in status, "`jobs` reports the run done")
    runs = requests.get(f"{BACKEND}/jobs", timeout=30).json()["runs"]
    check(any(run["project"] == project and run["tasks"]["left"] == 0 for run in runs), "GET /jobs reports it too")

    compose("up", "-d", "--no-build", "--scale", "worker=2")  # the killed worker back
    project = new_project(headers, 16)
    compose.cli("preannotate", "--project", str(project), "--queue", "--chunk", "8", "--no-progress")
    time.sleep(20)
    compose("stop", "worker")  # SIGTERM: the chunk in flight is finished first
    status = compose.cli("jobs", "--project", str(project))
    check("0 running" in status, f"after `stop worker`, no chunk of project {project} is left running")
    compose("up", "-d", "--no-build", "--scale", "worker=2")
    compose.cli("preannotate", "--project", str(project), "--queue", "--follow", "--chunk", "8", "--no-progress")
    check(all(c == {version: 1} for c in versions_per_task(headers, project)),
          f"project {project}: after the restart every task holds exactly one prediction")

    project = new_project(headers, 4)
    retrieved = requests.post(f"{STUDIO}/api/dm/actions", headers=headers, timeout=300,
                              params={"id": "retrieve_tasks_predictions", "project": project},
                              json={"selectedItems": {"all": True, "excluded": []}})
    retrieved.raise_for_status()
    check(all(sum(c.values()) == 1 for c in versions_per_task(headers, project)),
          f"project {project}: Retrieve Predictions stored one prediction per task through /predict")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument("--redis-image", help="instead of the compose file's redis image")
    parser.add_argument("--label-studio-image", help="instead of the compose file's Label Studio image")
    parser.add_argument("--keep", action="store_true", help="leave the containers running for a look")
    args = parser.parse_args()

    build_args = [a for name in ("BASE_IMAGE", "TORCH_INDEX_URL") if os.environ.get(name)
                  for a in ("--build-arg", f"{name}={os.environ[name]}")]
    print("building the image (docker build -t rfclip) ...")
    subprocess.run(["docker", "build", "-t", "rfclip", *build_args, str(REPO)], check=True)

    root = Path(tempfile.mkdtemp(prefix="rfclip-compose-"))
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(load_model("ViT-B-16", pretrained=None).clip.state_dict(), root / "models" / "random.pt")
    override = None
    replaced = {"redis": args.redis_image, "label-studio": args.label_studio_image}
    if any(replaced.values()):
        override = root / "images.yml"
        override.write_text(json.dumps({"services": {name: {"image": image}  # YAML is a superset of JSON
                                                     for name, image in replaced.items() if image}}))
    token = secrets.token_hex(20)  # Label Studio's legacy tokens are 40 characters
    env = {"RFCLIP_PRETRAINED": "/models/random.pt", "RFCLIP_WEIGHTS_TAG": "openai",
           "RFCLIP_DISTRACTION_DIMS": ",".join(map(str, find_preset("ViT-B-16", "openai").dims)),
           "LABEL_STUDIO_URL": "http://label-studio:8080", "LABEL_STUDIO_API_KEY": token,
           "OMP_NUM_THREADS": "1"}  # one worker per core, as README advises for CPU machines
    compose = Compose(root, env, override)
    headers = {"Authorization": f"Token {token}"}
    try:
        compose("up", "-d", "--no-build", "--scale", "worker=2")
        run_checks(compose, headers, args.tasks)
        print("all checks passed")
        return 0
    except (CheckFailed, requests.RequestException) as failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        print(compose("logs", "--tail=30", check_rc=False)[-6000:], file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            compose("down", "-v", check_rc=False)
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
