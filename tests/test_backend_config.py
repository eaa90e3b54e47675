"""Label config -> vocabulary, and settings from the environment."""
import dataclasses
import logging

import pytest

from backend.label_config import LabelConfigError, parse_label_config, targets_by_image
from backend.settings import Settings, SettingsError


def test_labels_synonyms_aliases_skip_threshold_background():
    config = """<View>
      <Image name="image" value="$image"/>
      <BrushLabels name="tag" toName="image" model_score_threshold="0.3" model_background="sky, wall , floor">
        <Label value="cat" predicted_values="cat, kitten"/>
        <Label value="Dog" alias="dog"/>
        <Label value="Airplane" alias="A"/>
        <Label value="unsure" model_skip="true"/>
      </BrushLabels>
    </View>"""
    (target,) = parse_label_config(config)
    assert target.from_name == "tag" and target.to_name == "image" and target.data_key == "image"
    assert target.region_type == "brushlabels"
    # regions name a label as Label Studio stores it (its alias); the text encoder reads its name
    assert target.labels == ("cat", "dog", "A")
    assert target.queries == (("cat", "kitten"), ("Dog",), ("Airplane",))
    assert target.background == ("sky", "wall", "floor") and target.score_threshold == 0.3
    vocab = target.vocabulary
    assert vocab.classes == (("cat", "kitten"), ("Dog",), ("Airplane",), ("sky", "wall", "floor"))


def test_several_controls_and_images():
    config = """<View>
      <Image name="photo" value="$photo"/>
      <Image name="map" value="$map"/>
      <BrushLabels name="brush" toName="photo"><Label value="road"/></BrushLabels>
      <PolygonLabels name="poly" toName="photo"><Label value="car"/><Label value="bus"/></PolygonLabels>
      <BrushLabels name="land" toName="map"><Label value="water"/></BrushLabels>
      <Choices name="weather" toName="photo"><Choice value="sunny"/></Choices>
      <RectangleLabels name="boxes" toName="photo"><Label value="car"/></RectangleLabels>
    </View>"""
    targets = parse_label_config(config)
    assert [(t.from_name, t.region_type, t.data_key) for t in targets] == [
        ("brush", "brushlabels", "photo"), ("poly", "polygonlabels", "photo"), ("land", "brushlabels", "map")]
    grouped = targets_by_image(targets)
    assert list(grouped) == ["photo", "map"] and len(grouped["photo"]) == 2


@pytest.mark.parametrize("config,message", [
    ("", "empty"),
    ("<View><Image", "not valid XML"),
    ('<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>',
     "no BrushLabels or PolygonLabels"),
    ('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i">'
     '<Label value="a" model_skip="true"/></BrushLabels></View>', "no BrushLabels or PolygonLabels"),
    ('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i" model_score_threshold="high">'
     '<Label value="a"/></BrushLabels></View>', "not a number"),
    ('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i" model_score_threshold="2">'
     '<Label value="a"/></BrushLabels></View>', "between 0 and 1"),
    # several images per task: every task would fail at its fetch of a list
    ('<View><Image name="i" valueList="$pages"/><BrushLabels name="b" toName="i"><Label value="a"/></BrushLabels>'
     '</View>', 'name="i"> takes a list of images \\(valueList\\)'),
])
def test_bad_configs_explain_what_is_needed(config, message):
    with pytest.raises(LabelConfigError, match=message) as info:
        parse_label_config(config)
    if "BrushLabels or" in message:
        assert '<BrushLabels name="tag" toName="image">' in str(info.value)  # an example to copy


def test_an_image_list_beside_a_single_image_is_left_out_with_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="rfclip.backend")
    targets = parse_label_config(
        '<View><Image name="one" value="$photo"/><Image name="many" valueList="$pages"/>'
        '<BrushLabels name="b" toName="one"><Label value="a"/></BrushLabels>'
        '<PolygonLabels name="p" toName="many"><Label value="a"/></PolygonLabels></View>')
    assert [(t.from_name, t.data_key) for t in targets] == [("b", "photo")]
    assert '<Image name="many"> takes a list of images (valueList)' in caplog.text


def test_settings_defaults_and_parsing(tmp_path):
    settings = Settings.from_env({})
    assert settings.model == "ViT-B-16" and settings.pretrained == "openai" and settings.predict_budget_s == 80
    assert settings.basic_auth is None and settings.redis_url is None
    assert settings.push_part is None and Settings.from_env({"RFCLIP_PUSH_PART": "16"}).push_part == 16
    env = {"RFCLIP_PAMR": "true", "RFCLIP_DISTRACTION_DIMS": "1, 2,3", "REDIS_URL": "redis://localhost:6379/0",
           "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p", "RFCLIP_ALLOWED_LOCAL_DIR": str(tmp_path),
           "LABEL_STUDIO_URL": "http://ls:8080/", "LABEL_STUDIO_API_KEY": "secret", "LOG_LEVEL": "debug"}
    settings = Settings.from_env(env)
    assert settings.pamr and settings.distraction_dims == (1, 2, 3) and settings.basic_auth == ("u", "p")
    assert settings.label_studio_url == "http://ls:8080" and settings.allowed_local_dir == tmp_path.resolve()
    assert settings.log_level == "DEBUG"
    described = settings.describe()
    assert described["label_studio_api_key"] == "***" and described["basic_auth_pass"] == "***"
    assert "secret" not in repr(settings)


@pytest.mark.parametrize("env,variable", [
    ({"RFCLIP_PAMR": "maybe"}, "RFCLIP_PAMR"),
    ({"RFCLIP_PREDICT_BUDGET_S": "120"}, "RFCLIP_PREDICT_BUDGET_S"),
    ({"RFCLIP_MAX_IMAGE_PIXELS": "-5"}, "RFCLIP_MAX_IMAGE_PIXELS"),
    ({"RFCLIP_ALLOWED_LOCAL_DIR": "/no/such/dir"}, "RFCLIP_ALLOWED_LOCAL_DIR"),
    ({"LABEL_STUDIO_URL": "ls:8080"}, "LABEL_STUDIO_URL"),
    ({"REDIS_URL": "localhost"}, "REDIS_URL"),
    ({"RFCLIP_MODE": "fancy"}, "RFCLIP_MODE"),
    ({"RFCLIP_DISTRACTION_DIMS": "a,b"}, "RFCLIP_DISTRACTION_DIMS"),
    ({"BASIC_AUTH_USER": "only-user"}, "BASIC_AUTH"),
    ({"RFCLIP_QUEUE": "rq:../other queue"}, "RFCLIP_QUEUE"),
    ({"RFCLIP_QUEUE": "q" * 65}, "RFCLIP_QUEUE"),
    ({"RFCLIP_JOB_TIMEOUT_S": "0"}, "RFCLIP_JOB_TIMEOUT_S"),
    ({"RFCLIP_JOB_LEASE_S": "soon"}, "RFCLIP_JOB_LEASE_S"),
    ({"RFCLIP_PUSH_PART": "0"}, "RFCLIP_PUSH_PART"),
    ({"RFCLIP_PROTOTYPES": "maybe"}, "RFCLIP_PROTOTYPES"),
    ({"RFCLIP_PROTOTYPE_K": "0"}, "RFCLIP_PROTOTYPE_K"),
    ({"RFCLIP_PROTOTYPE_CAP": "1.5"}, "RFCLIP_PROTOTYPE_CAP"),
    ({"RFCLIP_PROTOTYPE_MAX_ANNOTATIONS": "-3"}, "RFCLIP_PROTOTYPE_MAX_ANNOTATIONS"),
])
def test_bad_settings_name_the_variable(env, variable):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


def test_serve_refuses_bad_settings(monkeypatch, capsys):
    from backend.cli import main

    monkeypatch.setenv("RFCLIP_PREDICT_BUDGET_S", "500")
    assert main(["serve"]) == 2
    assert "RFCLIP_PREDICT_BUDGET_S" in capsys.readouterr().err


@pytest.mark.parametrize("variable, value", [("WORKERS", "abc"), ("WORKERS", "0"), ("THREADS", "-2")])
def test_serve_refuses_a_bad_process_or_thread_count(monkeypatch, capsys, variable, value):
    """$WORKERS / $THREADS are --workers / --threads' defaults: a bad one is refused by its flag,
    before anything starts, not with a traceback."""
    from backend.cli import main

    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as stopped:
        main(["serve"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --{variable.lower()}" in err and value in err and "Traceback" not in err


@pytest.mark.parametrize("workers, env, warned", [
    (2, {}, True), (1, {}, False), (2, {"REDIS_URL": "redis://127.0.0.1:9/0"}, False),
    (2, {"RFCLIP_PROTOTYPES": "off"}, False)])
def test_several_processes_without_redis_are_warned_that_learning_splits(monkeypatch, caplog, workers, env, warned):
    from gunicorn.app.base import BaseApplication

    from backend.cli import serve

    monkeypatch.setattr(BaseApplication, "run", lambda self: None)  # nothing is served
    caplog.set_level(logging.WARNING, logger="rfclip.backend")
    serve(Settings.from_env(env), "127.0.0.1", 0, workers, 1, 30, dev=False)
    assert ("each keeps its own prototypes" in caplog.text) == warned


def test_model_version_follows_the_method_not_how_it_runs():
    from backend.service import model_version

    base = model_version(Settings.from_env({}))
    assert model_version(Settings.from_env({"RFCLIP_CUDA_GRAPHS": "false"})) == base
    assert model_version(Settings.from_env({"RFCLIP_TRITON_KERNELS": "false"})) == base
    assert Settings.from_env({}).triton_kernels
    assert not Settings.from_env({"RFCLIP_TRITON_KERNELS": "false"}).triton_kernels
    assert Settings.from_env({}).cuda_graphs  # on by default: several times faster on a GPU
    assert not Settings.from_env({"RFCLIP_CUDA_GRAPHS": "false"}).cuda_graphs
    assert model_version(Settings.from_env({"RFCLIP_PAMR": "true"})) != base
    with pytest.raises(SettingsError, match="RFCLIP_CUDA_GRAPHS"):
        Settings.from_env({"RFCLIP_CUDA_GRAPHS": "sometimes"})
    with pytest.raises(SettingsError, match="RFCLIP_TRITON_KERNELS"):
        Settings.from_env({"RFCLIP_TRITON_KERNELS": "sometimes"})
    # Label Studio's model-versions column joins versions with commas
    tagged = model_version(Settings.from_env({"RFCLIP_WEIGHTS_TAG": "laion,2b"}))
    assert "," not in tagged and "laion_2b" in tagged


def test_model_versions_stay_what_they_were(monkeypatch):
    """The identity behind a version, pinned: if it moved, every task of every project would look
    unpredicted and be predicted again. (The engine's release is part of it on purpose.)"""
    from backend import service

    monkeypatch.setattr(service, "engine_version", "0")
    assert service.model_version(Settings.from_env({})) == "rfclip-ViT-B-16-openai-rfclip-16b2d525"
    assert service.model_version(Settings.from_env({"RFCLIP_PAMR": "true", "RFCLIP_MODE": "kk-proxy"})) == \
        "rfclip-ViT-B-16-openai-kk-proxy-pamr-3de307e1"


def test_the_backends_segmenter_is_warmed_up_when_loaded(tmp_path, monkeypatch, caplog):
    """The loader the server and workers use runs the warm-up, so that on a GPU the kernels are
    compiled and checked before the model is reported loaded, not inside a first /predict."""
    import torch

    from backend import runtime
    from rfclip_engine import load_model
    from rfclip_engine.predictor import Segmenter
    from rfclip_engine.text import MemoryCache

    from .conftest import TINY_CONFIG

    checkpoint = tmp_path / "tiny.pt"
    torch.save(load_model(TINY_CONFIG, pretrained=None).clip.state_dict(), checkpoint)
    warmed = []
    monkeypatch.setattr(Segmenter, "warm_up", lambda self: warmed.append(self))
    settings = Settings(model=TINY_CONFIG, pretrained=str(checkpoint), distraction_dims=(1, 2, 3),
                        cache_dir=tmp_path / "cache")
    caplog.set_level(logging.INFO, logger="rfclip.backend")
    segmenter = runtime.load_segmenter(settings, MemoryCache())
    assert warmed == [segmenter]
    # what "auto" came to on this machine
    assert "the model runs on cpu in fp32, 8 crops per forward" in caplog.text
    caplog.clear()
    runtime.load_segmenter(dataclasses.replace(settings, precision="bf16", batch_size=4), MemoryCache())
    assert "the model runs on cpu in bf16, 4 crops per forward" in caplog.text


def test_weights_without_distraction_dimensions_fail_the_load_not_each_task(tmp_path):
    """Said once, by /health and each /predict, as the model's state: before, the model loaded
    and then every task failed alike on its first forward."""
    import torch

    from backend import runtime
    from backend.service import ModelHolder, ModelUnavailable
    from rfclip_engine import load_model
    from rfclip_engine.text import MemoryCache

    from .conftest import TINY_CONFIG

    checkpoint = tmp_path / "tiny.pt"
    torch.save(load_model(TINY_CONFIG, pretrained=None).clip.state_dict(), checkpoint)
    settings = Settings(model=TINY_CONFIG, pretrained=str(checkpoint), cache_dir=tmp_path / "cache")
    holder = ModelHolder(lambda: runtime.load_segmenter(settings, MemoryCache()))
    with pytest.raises(ModelUnavailable, match="no distraction dimensions are known for rfclip-tiny-vit"):
        holder.get(60)
    assert holder.state == "failed"


def test_the_batch_size_defaults_by_device_and_does_not_change_the_version():
    import torch

    from backend.service import model_version, segmenter_config

    default, chosen = Settings.from_env({}), Settings.from_env({"RFCLIP_BATCH_SIZE": "16"})
    assert segmenter_config(default, torch.device("cuda")).batch_size == 32
    assert segmenter_config(default, torch.device("cpu")).batch_size == 8
    assert segmenter_config(chosen, torch.device("cuda")).batch_size == 16
    assert segmenter_config(chosen, torch.device("cpu")).batch_size == 16
    assert model_version(chosen) == model_version(default)  # crops are encoded independently
    for bad in ("0", "-4", "eight"):
        with pytest.raises(SettingsError, match="RFCLIP_BATCH_SIZE"):
            Settings.from_env({"RFCLIP_BATCH_SIZE": bad})


def test_the_precision_defaults_by_device_and_does_not_change_the_version():
    import torch

    from backend.service import model_version, segmenter_config

    default, chosen = Settings.from_env({}), Settings.from_env({"RFCLIP_PRECISION": "bf16"})
    assert segmenter_config(default, torch.device("cuda")).precision == "fp16"
    assert segmenter_config(default, torch.device("cpu")).precision == "fp32"
    assert segmenter_config(chosen, torch.device("cpu")).precision == "bf16"
    assert segmenter_config(chosen, torch.device("cuda")).precision == "bf16"
    assert model_version(chosen) == model_version(default)  # it moves labels by rounding only
    with pytest.raises(SettingsError, match="RFCLIP_PRECISION='half': expected one of auto, fp32, fp16, bf16"):
        Settings.from_env({"RFCLIP_PRECISION": "half"})
