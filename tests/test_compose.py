"""docker-compose.yml against the code it starts. No Docker daemon runs here, so the file is read
as data: every variable it gives our services is one the backend reads, every command is one the
CLI has, and the services' roles are as its header says."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from backend.cli import main
from backend.jobs.studio import IMPORT_FLAG
from backend.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
SERVE_FLAGS = {"WORKERS", "THREADS"}  # read by `serve` for its --workers / --threads defaults


@pytest.fixture(scope="module")
def services():
    return yaml.safe_load(COMPOSE.read_text())["services"]


def defaults(environment: dict) -> dict:
    """The environment as compose gives it when the shell sets nothing: ${NAME:-default} -> default."""
    return {name: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value)) for name, value in environment.items()}


class Recording(dict):
    def __init__(self, values):
        super().__init__(values)
        self.read = set()

    def get(self, name, default=None):
        self.read.add(name)
        return super().get(name, default)


@pytest.mark.parametrize("service", ["rfclip", "worker"])
def test_every_variable_given_to_our_services_is_read_and_valid(services, service):
    env = Recording(defaults(services[service]["environment"]))
    settings = Settings.from_env(env)  # a bad value raises SettingsError
    assert set(env) - env.read - SERVE_FLAGS == set()
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


def test_workers_scale_and_label_studio_is_opt_in(services):
    assert "ports" not in services["worker"]  # `--scale worker=N` would clash on a host port
    assert services["worker"]["image"] == services["rfclip"]["image"]  # the same build
    assert services["label-studio"]["profiles"] == ["studio"]
    assert services["label-studio"]["environment"][IMPORT_FLAG] == "true"  # pushes into big projects
    assert all("profiles" not in services[name] for name in ("rfclip", "worker", "redis"))
    assert "--appendonly" in services["redis"]["command"]  # queued chunks survive a Redis restart
