"""load_model: local checkpoints in every supported format, QuickGELU, and the offline error."""
import logging
import re
import time
import warnings

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image
from safetensors.torch import save_file

from rfclip_engine import RFCLIPConfig, WeightsUnavailableError, load_model
from rfclip_engine import loading

from .conftest import TINY_CONFIG, TINY_DIMS


def activations(model):
    return {type(block.mlp.gelu) for block in model.visual.transformer.resblocks}


def same_output(a, b):
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    config = RFCLIPConfig(sigma=1.5)
    return torch.equal(a.encode_dense(pixels, config), b.encode_dense(pixels, config))


def test_open_clip_state_dict_roundtrip(tiny_model, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_model.clip.state_dict(), path)
    loaded = load_model(TINY_CONFIG, pretrained=str(path), distraction_dims=TINY_DIMS)
    assert same_output(tiny_model, loaded)
    assert loaded.weights_tag is None


def test_safetensors_roundtrip(tiny_model, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.clip.state_dict().items()}, str(path))
    loaded = load_model(TINY_CONFIG, pretrained=str(path), distraction_dims=TINY_DIMS)
    assert same_output(tiny_model, loaded)


def openai_state_dict(model):
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.clip.state_dict().items()}
    state.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    return state


def test_openai_state_dict_gets_quickgelu(tmp_path):
    torch.manual_seed(0)
    gelu_model = load_model(TINY_CONFIG, pretrained=None, distraction_dims=TINY_DIMS)
    assert activations(gelu_model) == {torch.nn.GELU}
    path = tmp_path / "openai.pt"
    torch.save(openai_state_dict(gelu_model), path)
    loaded = load_model(TINY_CONFIG, pretrained=str(path), distraction_dims=TINY_DIMS)
    assert activations(loaded) == {QuickGELU}
    assert loaded.weights_tag == "openai"
    # same weights, other activation: the outputs must differ, or the test could not catch it
    pixels = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(loaded.encode_dense(pixels, RFCLIPConfig(mode="clip")),
                              gelu_model.encode_dense(pixels, RFCLIPConfig(mode="clip")), atol=1e-3)


def test_openai_torchscript_archive(tmp_path):
    torch.manual_seed(0)
    clip = open_clip.create_model(loading._register_model_config(TINY_CONFIG), pretrained=None,
                                  force_quick_gelu=True).eval()
    traced = torch.jit.trace_module(clip, {"encode_image": torch.randn(1, 3, 64, 64)}, check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(TINY_CONFIG, pretrained=str(path), distraction_dims=TINY_DIMS)
    assert not [str(w.message) for w in caught if "jit" in str(w.message)]  # OpenAI's format: nothing to do about it
    assert activations(loaded) == {QuickGELU} and loaded.weights_tag == "openai"
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        clip.visual.output_tokens = True
        _, tokens = clip.visual(pixels)
    torch.testing.assert_close(loaded.encode_dense(pixels, RFCLIPConfig(mode="clip")).reshape(1, 16, -1),
                               tokens @ clip.visual.proj, rtol=0, atol=1e-5)


def test_an_openai_checkpoint_is_not_reported_as_random_weights(tmp_path, caplog):
    # open_clip warns "initialized randomly" for the empty model that the checkpoint is loaded into
    torch.manual_seed(0)
    path = tmp_path / "openai.pt"
    torch.save(openai_state_dict(load_model(TINY_CONFIG, pretrained=None, distraction_dims=TINY_DIMS)), path)
    caplog.set_level(logging.WARNING)
    load_model(TINY_CONFIG, pretrained=str(path), distraction_dims=TINY_DIMS)
    assert not [r.getMessage() for r in caplog.records if "initialized randomly" in r.getMessage()]
    # truly random weights are still reported: the warning is dropped around the checkpoint's load only
    load_model(TINY_CONFIG, pretrained=None, distraction_dims=TINY_DIMS)
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_openai_tag_forces_quickgelu(monkeypatch):
    seen = {}
    real_create = open_clip.create_model

    def fake_create(name, pretrained=None, **kwargs):
        seen.update(kwargs, pretrained=pretrained)
        return real_create(name, pretrained=None, force_quick_gelu=kwargs.get("force_quick_gelu", False))

    monkeypatch.setattr(loading.open_clip, "create_model", fake_create)
    monkeypatch.setattr(loading, "_hub_unreachable", lambda: None)
    model = load_model("ViT-B-16", pretrained="openai")
    assert seen["pretrained"] == "openai" and seen["force_quick_gelu"] is True
    assert activations(model) == {QuickGELU}
    assert model.preset.dims[0] == 4
    # weights already in the Hugging Face cache are loaded from there, without the network
    monkeypatch.setattr(loading, "_cached_hub_file", lambda cfg, cache_dir: "/hub/open_clip_model.safetensors")
    monkeypatch.setattr(loading, "_hub_unreachable", lambda: pytest.fail("the hub must not be asked"))
    model = load_model("ViT-B-16", pretrained="openai")
    assert seen["pretrained"] == "/hub/open_clip_model.safetensors" and seen["force_quick_gelu"] is True
    assert model.weights_tag == "openai"


def test_download_failure_names_cache_and_offline_route(tmp_path, monkeypatch):
    def failing_create(name, pretrained=None, **kwargs):
        raise RuntimeError(f"Failed to download weights for tag '{pretrained}': no network")

    monkeypatch.setattr(loading.open_clip, "create_model", failing_create)
    monkeypatch.setattr(loading, "_hub_unreachable", lambda: None)  # the hub answers, the download fails
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and "pretrained='/path/to/ViT-B-16.pt'" in message


def test_offline_without_cached_weights_fails_at_once(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from rfclip_engine import cli

    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded offline")

    monkeypatch.setattr(loading.open_clip, "create_model", no_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE is set"):
        load_model("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    assert time.monotonic() - started < 2.0
    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(image)
    assert cli.main(["segment", str(image), "--labels", "cat,dog", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)) == 2
    assert "--checkpoint /path/to/ViT-B-16.pt" in err and "load_model(" not in err


def test_the_hub_is_tried_once_briefly(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://unreachable.invalid")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    assert "unreachable.invalid cannot be reached" in loading._hub_unreachable(timeout_s=1.0)
    assert time.monotonic() - started < 5.0


def test_unknown_pretrained_and_model():
    with pytest.raises(FileNotFoundError, match="neither an existing checkpoint file nor a known tag"):
        load_model(TINY_CONFIG, pretrained="/no/such/file.pt")
    with pytest.raises(ValueError, match="unknown model"):
        load_model("ViT-X-99", pretrained=None)


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="neither a PyTorch checkpoint nor a TorchScript archive"):
        load_model(TINY_CONFIG, pretrained=str(path))
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a safetensors file")):
        load_model(TINY_CONFIG, pretrained=str(path))


@pytest.mark.parametrize("form", ["open_clip", "openai"])
def test_a_checkpoint_of_another_model_is_refused_naming_both(tiny_model, tmp_path, form):
    state = tiny_model.clip.state_dict() if form == "open_clip" else openai_state_dict(tiny_model)
    wider = {k: torch.zeros(*v.shape[:-1], v.shape[-1] * 2) if v.is_floating_point() and v.dim() == 2 else v
             for k, v in state.items()}  # every matrix of another width: torch names each, one per line
    path = tmp_path / "other.pt"
    torch.save(wider, path)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {path} does not fit model rfclip-tiny-vit")) as caught:
        load_model(TINY_CONFIG, pretrained=str(path), distraction_dims=TINY_DIMS)
    message = str(caught.value)
    assert "size mismatch" in message or "width changed" in message  # torch's or open_clip's own words
    assert len(message.splitlines()) <= 5  # not the hundreds of lines of every tensor


@pytest.mark.parametrize("form", ["open_clip", "openai"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused_naming_a_tensor(tiny_model, tmp_path, form, bad):
    """A NaN weight makes every feature NaN and every pixel the first class: a damaged file would
    pass for a model that sees one thing everywhere."""
    state = tiny_model.clip.state_dict() if form == "open_clip" else openai_state_dict(tiny_model)
    state = {k: v.clone() for k, v in state.items()}
    name = next(k for k in state if k.endswith("attn.in_proj_weight"))
    state[name][0, 0] = bad
    path = tmp_path / "damaged.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=re.escape(f"the weights from {path} hold NaN or infinite values in 1 "
                                                   f"tensor(s), e.g. {name}")):
        load_model(TINY_CONFIG, pretrained=str(path), distraction_dims=TINY_DIMS)
    huge = {k: v.clone() for k, v in (tiny_model.clip.state_dict() if form == "open_clip"
                                      else openai_state_dict(tiny_model)).items()}
    huge[name].fill_(torch.finfo(huge[name].dtype).max / 2)  # finite, though its sum overflows: loaded
    torch.save(huge, path)
    load_model(TINY_CONFIG, pretrained=str(path), distraction_dims=TINY_DIMS)


def test_dims_file_and_list(tmp_path):
    from rfclip_engine.presets import DistractionPreset, save_preset_file

    path = tmp_path / "dims.json"
    save_preset_file(path, DistractionPreset((1, 2, 3), attention_test=True), model="tiny")
    model = load_model(TINY_CONFIG, pretrained=None, distraction_dims=str(path))
    assert model.preset == DistractionPreset((1, 2, 3), True)
    model = load_model(TINY_CONFIG, pretrained=None, distraction_dims=[5, 6])
    assert model.preset == DistractionPreset((5, 6), False)
    with pytest.raises(ValueError, match="outside the model width"):
        model.encode_dense(torch.randn(1, 3, 64, 64), RFCLIPConfig(distraction_dims=(64,)))


@pytest.mark.parametrize("text", ["[3, 17, 40]", '{"distraction_dims": "3,17"}', '{"distraction_dims": 3}',
                                  '{"distraction_dims": [3, "x"]}', '{"distraction_dims": [3, true]}', '{"dims": [3]}'])
def test_a_dims_file_of_another_form_is_refused_naming_it(tmp_path, text):
    path = tmp_path / "dims.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path} does not hold distraction dimensions: expected"):
        load_model(TINY_CONFIG, pretrained=None, distraction_dims=str(path))
