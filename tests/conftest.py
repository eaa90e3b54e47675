import logging
from pathlib import Path

import pytest
import torch

from rfclip_engine import load_model

TINY_CONFIG = str(Path(__file__).parent / "data" / "rfclip-tiny-vit.json")
TINY_DIMS = (3, 17, 40)


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    return load_model(TINY_CONFIG, pretrained=None, distraction_dims=TINY_DIMS)


@pytest.fixture(autouse=True)
def text_cache_folder(tmp_path_factory, monkeypatch):
    """The `rfclip` command's text cache of each test, in a folder of its own, never the home
    folder's (nor one that another test filled)."""
    home = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "rfclip" / "text"


@pytest.fixture(autouse=True)
def _quiet_open_clip(caplog):
    caplog.set_level(logging.ERROR, logger="root")


@pytest.fixture
def fake_ls():
    from .fakes import FakeLabelStudio

    server = FakeLabelStudio(token="TESTTOKEN-1234567890")
    yield server
    server.close()


@pytest.fixture
def redis_server():
    from .fakes import RedisServer

    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def hostile():
    from .backend_support import png
    from .fakes import HostileServer

    server = HostileServer(png(48, 64, seed=5))
    yield server
    server.close()
