"""The ready-to-paste configs in label_config/ parse into what their comments promise."""
from pathlib import Path

import pytest

from backend.label_config import parse_label_config

CONFIGS = sorted((Path(__file__).parents[1] / "label_config").glob("*.xml"))


def test_every_config_is_tested():
    assert [p.name for p in CONFIGS] == ["brush_synonyms_background.xml", "polygon.xml", "several_controls.xml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_parse(path):
    targets = parse_label_config(path.read_text())
    assert targets and all(t.labels for t in targets)


def test_brush_config():
    (target,) = parse_label_config(CONFIGS[0].read_text())
    assert target.labels == ("Person", "Dog", "Cat") and target.score_threshold == 0.5
    assert target.queries[0] == ("person", "man", "woman", "child") and "sky" in target.background


def test_several_controls_config():
    brush, polygon = parse_label_config(CONFIGS[2].read_text())
    assert (brush.region_type, polygon.region_type) == ("brushlabels", "polygonlabels")
    assert brush.data_key == polygon.data_key == "image"
