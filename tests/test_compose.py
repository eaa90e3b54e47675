"""docker-compose.yml, as Docker Compose itself reads it, against the code it starts.

No Docker daemon runs here, but `docker-compose config` (Debian's docker-compose 1.29.2, which
.ci/run installs) needs none: it validates the file against the Compose schema, checks that every
dependency names a service, and resolves `${NAME:-default}` and YAML anchors the way `docker
compose up` does. The tests then check the resolved file: every variable it gives our services is
one the backend reads, every command is one the CLI has, and the services' roles are as its
header says."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Optional, Sequence

import pytest
import yaml

from backend.cli import main
from backend.jobs.studio import IMPORT_FLAG
from backend.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
GPU_COMPOSE = REPO / "docker-compose.gpu.yml"  # layered on COMPOSE on a GPU machine
SERVE_FLAGS = {"WORKERS", "THREADS"}  # read by `serve` for its --workers / --threads defaults
TORCH_FLAGS = {"OMP_NUM_THREADS"}  # read by torch itself


def compose(*args: str, files: Sequence[Path] = (COMPOSE,),
            shell: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """`docker-compose -f FILE... ARGS` with nothing of this shell's environment to interpolate but
    `shell`, so the files' own defaults are what it resolves to."""
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose not found: install Debian's docker-compose (.ci/run does)"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **(shell or {})}
    named = [arg for path in files for arg in ("-f", str(path))]
    return subprocess.run([binary, *named, "--project-directory", str(REPO), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def resolved(shell: Optional[Dict[str, str]] = None, files: Sequence[Path] = (COMPOSE,)) -> dict:
    done = compose("config", files=files, shell=shell)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.fixture(scope="module")
def services():
    return resolved()["services"]


def test_label_studio_is_opt_in(services):
    # compose 1.29's `config` lists every service whatever the profile; `up` starts only these
    assert sorted(name for name, service in services.items() if "profiles" not in service) == [
        "redis", "rfclip", "worker"]
    assert services["label-studio"]["profiles"] == ["studio"]


def test_compose_would_refuse_a_mistake(tmp_path):
    """The check bites: a misspelt option or a dependency on no service fails `config`."""
    text = COMPOSE.read_text()
    for broken in (text.replace("stop_grace_period:", "stop_grace_perod:"),
                   text.replace("      - redis\n", "      - rediss\n", 1)):
        assert broken != text
        path = tmp_path / "docker-compose.yml"
        path.write_text(broken)
        done = compose("config", "-q", files=(path,))
        assert done.returncode != 0 and ("invalid" in done.stderr or "undefined" in done.stderr), done.stderr


class Recording(dict):
    def __init__(self, values):
        super().__init__(values)
        self.read = set()

    def get(self, name, default=None):
        self.read.add(name)
        return super().get(name, default)


@pytest.mark.parametrize("service", ["rfclip", "worker"])
def test_every_variable_given_to_our_services_is_read_and_valid(services, service):
    env = Recording(services[service]["environment"])
    settings = Settings.from_env(env)  # a bad value raises SettingsError
    assert set(env) - env.read - SERVE_FLAGS - TORCH_FLAGS == set()
    assert settings.redis_url == "redis://redis:6379/0"  # the compose Redis, for texts and the queue


@pytest.mark.parametrize("service", ["rfclip", "worker"])
def test_every_command_is_one_the_cli_has(services, service, capsys):
    (image_default,) = [json.loads(line[4:]) for line in (REPO / "Dockerfile").read_text().splitlines()
                        if line.startswith("CMD ")]
    command = services[service].get("command", image_default)
    assert command[0] == "rfclip-backend"
    with pytest.raises(SystemExit) as done:
        main([*command[1:], "--help"])
    assert done.value.code == 0 and "usage" in capsys.readouterr().out


@pytest.mark.parametrize("shell, threads", [({}, None), ({"OMP_NUM_THREADS": "1"}, "1")])
def test_torch_threads_come_from_the_shell_or_stay_unset(shell, threads):
    """One worker per core on a CPU machine wants OMP_NUM_THREADS=1; unset, torch picks its own
    (an empty value would make libgomp complain in every container)."""
    services = resolved(shell)["services"]
    assert services["worker"]["environment"]["OMP_NUM_THREADS"] == threads
    assert services["rfclip"]["environment"]["OMP_NUM_THREADS"] == threads


def test_workers_scale(services):
    worker = services["worker"]
    # `--scale worker=N` would clash on a host port or a fixed container name
    assert "ports" not in worker and "container_name" not in worker
    assert worker["image"] == services["rfclip"]["image"]  # the same build
    assert worker["healthcheck"]["test"] == ["NONE"]  # the image's check asks the web backend's port
    assert worker["stop_grace_period"] == "5m"  # SIGTERM: the chunk in flight is finished


@pytest.mark.parametrize("variable", ["HF_HOME", "TRITON_CACHE_DIR"])
def test_what_is_made_once_goes_to_one_named_volume(services, variable):
    """The image's user writes the Hugging Face cache (downloaded weights) and Triton's (kernels
    compiled on a GPU): in a host directory Docker made for root it could not (RFCLIP_PRETRAINED=
    openai would fail to download), in a named volume it can, once for every container."""
    (path,) = re.findall(rf"{variable}=(\S+)", (REPO / "Dockerfile").read_text())
    sources = set()
    for name in ("rfclip", "worker"):
        (mount,) = [v for v in services[name]["volumes"]
                    if path == v.split(":")[1] or path.startswith(v.split(":")[1] + "/")]
        sources.add(mount.split(":")[0])
    (source,) = sources  # the backend and the workers download once, for all
    assert not source.startswith(("/", ".")), f"{source} is a host path, not a named volume"


def test_label_studio_and_redis_as_the_jobs_need_them(services):
    assert services["label-studio"]["environment"][IMPORT_FLAG] == "true"  # pushes into big projects
    assert "--appendonly" in services["redis"]["command"]  # queued chunks survive a Redis restart


def test_the_gpu_file_builds_the_cuda_image_and_gives_every_model_the_gpu(services):
    """docker-compose.gpu.yml on top of the CPU file: the image is built with the torch index the
    Dockerfile names for CUDA, and the backend and the workers (all from that one image) each get
    GPU 0; nothing else changes, so RFCLIP_DEVICE=auto picks CUDA there."""
    (cuda_index,) = re.findall(r"CUDA:.*--build-arg TORCH_INDEX_URL=(\S+)", (REPO / "Dockerfile").read_text())
    on_gpu = resolved(files=(COMPOSE, GPU_COMPOSE))["services"]
    assert on_gpu["rfclip"]["build"]["args"] == {"TORCH_INDEX_URL": cuda_index}
    assert on_gpu["worker"]["image"] == on_gpu["rfclip"]["image"] != services["rfclip"]["image"]
    for name in ("rfclip", "worker"):
        (device,) = on_gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}
        assert "deploy" not in services[name]  # the CPU file alone reserves no GPU
        assert on_gpu[name]["environment"] == services[name]["environment"]
        assert on_gpu[name]["environment"]["RFCLIP_DEVICE"] == "auto"
    assert sorted(on_gpu) == sorted(services)


def apt_installs(index_url: str, stubs: Path) -> str:
    """What the Dockerfile's apt-get step installs for a torch index: its RUN line, run by `sh`
    with stand-ins for apt-get (it prints what it is asked) and rm (it removes nothing) first on
    the PATH."""
    stubs.mkdir(exist_ok=True)
    for name, body in (("apt-get", 'echo "$@"'), ("rm", "true")):
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    (run,) = [line[4:] for line in text.splitlines() if line.startswith("RUN apt-get")]
    done = subprocess.run(["/bin/sh", "-c", run], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{stubs}:/usr/bin:/bin", "TORCH_INDEX_URL": index_url})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_cuda_image_gets_the_c_compiler_triton_builds_its_launcher_with(tmp_path):
    """Triton compiles its CUDA launcher with the system's C compiler when a kernel first runs:
    without one in the CUDA image every kernel would fail its check. The CPU image needs none."""
    (cpu_index,) = re.findall(r"^ARG TORCH_INDEX_URL=(\S+)", (REPO / "Dockerfile").read_text(), re.M)
    (cuda_index,) = re.findall(r"CUDA:.*--build-arg TORCH_INDEX_URL=(\S+)", (REPO / "Dockerfile").read_text())
    for index, compiler in ((cpu_index, False), (cuda_index, True),
                            ("https://download.pytorch.org/whl/cu128", True)):
        installed = apt_installs(index, tmp_path / "bin").split()
        assert "libglib2.0-0" in installed
        assert ("gcc" in installed and "libc6-dev" in installed) == compiler, (index, installed)
