"""The `rfclip` command with a tiny checkpoint: segment files and folders, calibrate."""
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rfclip_engine import load_model
from rfclip_engine.calibrate import calibrate
from rfclip_engine.cli import main
from rfclip_engine.presets import load_preset_file
from rfclip_engine.text import TextEmbedder

from .conftest import TINY_CONFIG

FAST = ["--model", TINY_CONFIG, "--short-side", "80", "--window", "64", "--stride", "32", "--quiet"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = load_model(TINY_CONFIG, pretrained=None)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.clip.state_dict(), path)
    return str(path)


def write_image(path, size, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (*size, 3) if mode == "RGB" else size, dtype=np.uint8)
    Image.fromarray(array).save(path)


def test_segment_one_image(tmp_path, checkpoint, capsys):
    write_image(tmp_path / "scene.png", (75, 110))
    out = tmp_path / "out"
    code = main(["segment", str(tmp_path / "scene.png"), "--labels", "cat,dog|puppy,grass", "--raw", "--pamr",
                 "--checkpoint", checkpoint, "--distraction-dims", "1,2,3", "--out", str(out), *FAST])
    assert code == 0
    labels = Image.open(out / "scene_labels.png")
    assert labels.size == (110, 75) and labels.mode == "RGB"
    overlay = Image.open(out / "scene_overlay.jpg")
    assert overlay.height == 75 and overlay.width > 110  # image plus legend
    raw = np.array(Image.open(out / "scene_labelmap.png"))
    assert raw.shape == (75, 110) and set(np.unique(raw)) <= {0, 1, 2}
    classes = json.loads((out / "classes.json").read_text())
    assert [c["name"] for c in classes] == ["cat", "dog", "grass"] and classes[1]["queries"] == ["dog", "puppy"]
    colors = np.array([c["color"] for c in classes])
    assert (np.array(labels).reshape(-1, 3)[:, None] == colors[None]).all(-1).any(-1).all()
    assert "segmented 1 of 1" in capsys.readouterr().err


@pytest.mark.parametrize("flags, dtype", [([], None), (["--precision", "bf16"], torch.bfloat16),
                                          (["--precision", "fp16"], torch.float16), (["--precision", "auto"], None)])
def test_segment_runs_at_the_precision_asked(tmp_path, checkpoint, flags, dtype, monkeypatch):
    from rfclip_engine.model import RFCLIPModel

    encoders = []
    original = RFCLIPModel.autocast_copy
    monkeypatch.setattr(RFCLIPModel, "autocast_copy", lambda self, d: encoders.append(d) or original(self, d))
    write_image(tmp_path / "scene.png", (75, 110))
    assert main(["segment", str(tmp_path / "scene.png"), "--labels", "cat,dog", "--raw", "--checkpoint", checkpoint,
                 "--distraction-dims", "1,2,3", "--out", str(tmp_path / "out"), *flags, *FAST]) == 0
    assert encoders == ([dtype] if dtype else [])  # auto is full precision on the CPU
    assert set(np.unique(np.array(Image.open(tmp_path / "out" / "scene_labelmap.png")))) <= {0, 1}


@pytest.mark.parametrize("dims, why", [([], "no distraction dimensions are known for rfclip-tiny-vit"),
                                       (["--distraction-dims", "1,2,999"], "distraction dimensions [999] are outside")])
def test_weights_without_usable_distraction_dimensions_are_refused_before_the_run(tmp_path, checkpoint, capsys,
                                                                                    dims, why):
    write_image(tmp_path / "scene.png", (75, 110))
    out = tmp_path / "out"
    code = main(["segment", str(tmp_path / "scene.png"), "--labels", "cat,dog", "--checkpoint", checkpoint, *dims,
                 "--out", str(out), *FAST])
    assert code == 2 and why in capsys.readouterr().err
    assert list(out.iterdir()) == []  # no run recorded, no classes: nothing was started
    # plain CLIP needs none
    assert main(["segment", str(tmp_path / "scene.png"), "--labels", "cat,dog", "--checkpoint", checkpoint, *dims,
                 "--mode", "clip", "--out", str(out), *FAST]) == 0


def test_segment_folder_with_a_corrupt_file(tmp_path, checkpoint, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "a.png", (64, 90))
    write_image(folder / "b.jpg", (50, 40), mode="L")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not an image, not listed")
    (folder / "moved.jpg").symlink_to(tmp_path / "elsewhere" / "moved.jpg")  # a dataset moved from under its links
    (folder / "loop.png").symlink_to("loop.png")
    out = tmp_path / "out"
    code = main(["segment", str(folder), "--labels", "sky,tree", "--checkpoint", checkpoint,
                 "--distraction-dims", "1,2,3", "--out", str(out), *FAST])
    assert code == 1
    err = capsys.readouterr().err
    assert "segmented 2 of 5" in err
    assert all(f"failed: {folder / name}: cannot read" in err for name in ("broken.png", "moved.jpg", "loop.png"))
    assert Image.open(out / "a_labels.png").size == (90, 64)
    assert Image.open(out / "b_overlay.jpg").height == 50
    assert not list(out.glob("broken*"))


def test_max_pixels_above_pillow_s_bomb_limit_is_the_limit(tmp_path, checkpoint, capsys, monkeypatch, recwarn):
    """Pillow refuses any image over twice its own limit (179 MP by default), whatever --max-pixels
    says: an operator who raised --max-pixels for aerial mosaics still got "decompression bomb".
    Pillow's limit is made small here, so that a small image stands for a big one."""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    write_image(tmp_path / "mosaic.png", (64, 90))  # 5760 pixels: over twice Pillow's 1000
    run = ["segment", str(tmp_path / "mosaic.png"), "--labels", "sky,tree", "--checkpoint", checkpoint,
           "--distraction-dims", "1,2,3", *FAST]
    assert main([*run, "--out", str(tmp_path / "out"), "--max-pixels", "10000"]) == 0
    assert Image.open(tmp_path / "out" / "mosaic_labels.png").size == (90, 64)
    capsys.readouterr()
    # over the operator's limit, their limit refuses it, in our words alone: Pillow's warning
    # (over its own limit, now theirs) would come a line before
    write_image(tmp_path / "wider.png", (100, 130))
    assert main([*run[:1], str(tmp_path / "wider.png"), *run[2:], "--out", str(tmp_path / "out2"),
                 "--max-pixels", "10000"]) == 1
    err = capsys.readouterr().err
    assert "wider.png: image is 130x100 = 13000 pixels, more than the limit of 10000" in err
    assert not [w for w in recwarn if w.category is PILImage.DecompressionBombWarning]
    main([*run, "--out", str(tmp_path / "out3"), "--max-pixels", "5000"])
    assert PILImage.MAX_IMAGE_PIXELS == 10000  # raised to the largest limit asked, never lowered


def test_an_output_that_cannot_be_written_is_an_error(tmp_path, checkpoint, capsys):
    write_image(tmp_path / "scene.png", (64, 64))
    out = tmp_path / "out"
    (out / "scene_overlay.jpg").mkdir(parents=True)  # a folder where the overlay should go
    code = main(["segment", str(tmp_path / "scene.png"), "--labels", "sky,tree", "--checkpoint", checkpoint,
                 "--distraction-dims", "1,2,3", "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "scene_overlay.jpg" in err and "Traceback" not in err


def test_usage_errors(tmp_path, checkpoint, capsys):
    write_image(tmp_path / "x.png", (64, 64))
    with pytest.raises(SystemExit) as info:
        main(["segment", str(tmp_path / "x.png"), "--out", str(tmp_path / "o"), "--checkpoint", checkpoint, *FAST])
    assert info.value.code == 2 and "--labels" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["segment", str(tmp_path / "missing.png"), "--labels", "a", "--out", str(tmp_path / "o"), *FAST])
    assert info.value.code == 2 and "missing.png does not exist" in capsys.readouterr().err
    os.mkfifo(tmp_path / "pipe.png")  # read as an image, it would block until a writer came
    with pytest.raises(SystemExit) as info:
        main(["segment", str(tmp_path / "pipe.png"), "--labels", "a", "--out", str(tmp_path / "o"), *FAST])
    assert info.value.code == 2 and "pipe.png is not a file or a folder" in capsys.readouterr().err
    (tmp_path / "pipe.png").unlink()
    (tmp_path / "moved.png").symlink_to(tmp_path / "gone" / "moved.png")
    with pytest.raises(SystemExit) as info:
        main(["segment", str(tmp_path / "moved.png"), "--labels", "a", "--out", str(tmp_path / "o"), *FAST])
    assert info.value.code == 2 and f"moved.png links to {tmp_path / 'gone' / 'moved.png'}, which does not exist" \
        in capsys.readouterr().err
    (tmp_path / "moved.png").unlink()
    with pytest.raises(SystemExit) as info:  # pictures written among the images would be read as images
        main(["segment", str(tmp_path), "--labels", "a", "--out", str(tmp_path / "." / "sub" / ".."), *FAST])
    assert info.value.code == 2 and "is the input folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["segment", str(tmp_path / "x.png"), "--labels", "a", "--out", str(tmp_path / "x.png"), *FAST])
    assert info.value.code == 2 and "x.png is a file: give a folder" in capsys.readouterr().err
    for labels_file in (tmp_path / "missing.txt", tmp_path / "x.png"):  # not there; not text
        with pytest.raises(SystemExit) as info:
            main(["segment", str(tmp_path / "x.png"), "--labels-file", str(labels_file), "--out", str(tmp_path / "o"),
                  *FAST])
        assert info.value.code == 2 and f"--labels-file {labels_file} cannot be read" in capsys.readouterr().err
    segment = ["segment", str(tmp_path / "x.png"), "--labels", "a", "--out", str(tmp_path / "o"), *FAST]
    calibrate, evaluate = ["calibrate", "--images", str(tmp_path)], ["eval", "--dataset", "voc21", "--root", str(tmp_path)]
    # counts of 0 or less: nothing read at all, or a negative slice's traceback
    for command, flag in ((segment, "--max-pixels"), (calibrate, "--max-pixels"), (calibrate, "--limit"),
                          (evaluate, "--limit")):
        with pytest.raises(SystemExit) as info:
            main([*command, flag, "0"])
        assert info.value.code == 2 and f"{flag}: must be a positive integer, got 0" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    # a backbone without preset and without calibration: a clear error naming the fix
    code = main(["segment", str(tmp_path / "x.png"), "--labels", "a,b", "--out", str(tmp_path / "o"),
                 "--checkpoint", checkpoint, *FAST])
    assert code == 2 and "rfclip calibrate" in capsys.readouterr().err


def test_a_labels_file_from_windows_reads_as_its_names(tmp_path):
    from rfclip_engine.cli import build_parser, read_vocabulary

    def vocabulary(content: bytes):
        path = tmp_path / "classes.txt"
        path.write_bytes(content)
        return read_vocabulary(build_parser().parse_args(["segment", "x", "--labels-file", str(path), "--out", "o"]))

    expected = vocabulary("café, coffee\ndog\n".encode())
    assert expected.names == ("café", "dog") and expected.classes[0] == ("café", "coffee")
    # Notepad's UTF-8: a byte-order mark and CRLF line ends
    assert vocabulary(b"\xef\xbb\xbf" + "café, coffee\r\n\r\ndog\r\n".encode()) == expected


@pytest.mark.parametrize("labels, why", [("cat,dog,cat", "class 'cat' is given twice"),
                                         ("cat|kitty,dog,cat|puss", "class 'cat' is given twice"),
                                         ("cat, | ,dog", "class 2 has no name"), (" , ", "the vocabulary is empty")])
def test_a_class_given_twice_or_without_a_name_is_refused_before_the_model_loads(tmp_path, capsys, labels, why):
    write_image(tmp_path / "x.png", (64, 64))
    # no weights given: a usage error must come first, before any download is tried
    with pytest.raises(SystemExit) as info:
        main(["segment", str(tmp_path / "x.png"), "--labels", labels, "--out", str(tmp_path / "o"), *FAST])
    assert info.value.code == 2 and why in capsys.readouterr().err
    labels_file = tmp_path / "classes.txt"
    labels_file.write_text("# one class per line\ncat, kitty\ndog\ncat\n")
    with pytest.raises(SystemExit) as info:
        main(["segment", str(tmp_path / "x.png"), "--labels-file", str(labels_file), "--out", str(tmp_path / "o"),
              *FAST])
    assert info.value.code == 2 and "class 'cat' is given twice" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def planted_model(channel):
    """A tiny model whose residual stream over-activates one channel in every token."""
    torch.manual_seed(0)
    model = load_model(TINY_CONFIG, pretrained=None)
    with torch.no_grad():
        model.visual.ln_pre.bias[channel] = 30.0
    return model


def test_calibration_finds_planted_channel():
    model = planted_model(7)
    images = [np.random.default_rng(i).integers(0, 256, (50, 70, 3), dtype=np.uint8) for i in range(3)]
    result = calibrate(model, images, factor=5.0)
    assert result.dims == (7,) and result.images == 3
    # the reference: p averaged over patch tokens of every block input
    assert result.ratios[7] > 5 and (result.ratios[torch.arange(64) != 7] < 5).all()


def test_calibration_resizes_only_the_centre_square(tiny_model, monkeypatch):
    from rfclip_engine import calibrate as calibration

    size = tiny_model.visual.image_size[0]
    mean = torch.tensor(tiny_model.image_mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(tiny_model.image_std, dtype=torch.float64).view(3, 1, 1)
    rgb = np.random.default_rng(0).integers(0, 256, (size, size + 37, 3), dtype=np.uint8)
    # at the model's size already: the centre square as it is, normalized (float64 reference)
    square = torch.from_numpy(rgb[:, 18:18 + size]).permute(2, 0, 1).double() / 255
    torch.testing.assert_close(calibration._model_input(tiny_model, rgb)[0].double(), (square - mean) / std,
                               rtol=0, atol=1e-5)
    resized, interpolate = [], calibration.F.interpolate

    def spy(pixels, **kwargs):
        resized.append(tuple(pixels.shape))
        return interpolate(pixels, **kwargs)

    monkeypatch.setattr(calibration.F, "interpolate", spy)
    stripe = np.random.default_rng(1).integers(0, 256, (3, 200_000, 3), dtype=np.uint8)
    assert calibration._model_input(tiny_model, stripe).shape == (1, 3, size, size)
    assert resized == [(1, 3, 3, 3)]  # resized whole, it was 64 x 4.3 million floats a channel


def test_calibrate_command_writes_a_usable_file(tmp_path, capsys):
    model = planted_model(11)
    ckpt = tmp_path / "planted.pt"
    torch.save(model.clip.state_dict(), ckpt)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        write_image(folder / f"{i}.png", (60, 80), seed=i)
    (folder / "bad.png").write_bytes(b"nope")
    out = tmp_path / "dims.json"
    code = main(["calibrate", "--model", TINY_CONFIG, "--checkpoint", str(ckpt), "--images", str(folder),
                 "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "bad.png" in captured.err and "11" in captured.out
    assert load_preset_file(out).dims == (11,)
    loaded = load_model(TINY_CONFIG, pretrained=str(ckpt), distraction_dims=str(out))
    assert loaded.preset.dims == (11,)


def test_calibrate_reads_subfolders_with_recursive(tmp_path, capsys):
    ckpt = tmp_path / "planted.pt"
    torch.save(planted_model(11).clip.state_dict(), ckpt)
    for i, sub in enumerate(("a", "b", "b/c")):
        (tmp_path / "images" / sub).mkdir(parents=True)
        write_image(tmp_path / "images" / sub / f"{i}.png", (60, 80), seed=i)
    command = ["calibrate", "--model", TINY_CONFIG, "--checkpoint", str(ckpt), "--images", str(tmp_path / "images"),
               "--out", str(tmp_path / "dims.json")]
    with pytest.raises(SystemExit):
        main(command)
    assert "--recursive reads its subfolders" in capsys.readouterr().err
    assert main([*command, "--recursive"]) == 0
    assert ", 3 images;" in capsys.readouterr().out and load_preset_file(tmp_path / "dims.json").dims == (11,)


def test_calibrate_reads_at_most_its_limit_spread_over_the_folder(tmp_path, capsys, monkeypatch):
    from rfclip_engine import cli

    ckpt = tmp_path / "planted.pt"
    torch.save(planted_model(11).clip.state_dict(), ckpt)
    for i, sub in enumerate(["a"] * 4 + ["b"] * 3):  # sorted: a/0..a/3, b/4..b/6
        (tmp_path / "images" / sub).mkdir(parents=True, exist_ok=True)
        write_image(tmp_path / "images" / sub / f"{i}.png", (60, 80), seed=i)
    read = []
    readable = cli._readable_images
    monkeypatch.setattr(cli, "_readable_images", lambda files, *a: read.extend(files) or readable(files, *a))
    assert main(["calibrate", "--model", TINY_CONFIG, "--checkpoint", str(ckpt), "--images", str(tmp_path / "images"),
                 "--out", str(tmp_path / "dims.json"), "--recursive", "--limit", "3"]) == 0
    assert [p.relative_to(tmp_path / "images").as_posix() for p in read] == ["a/0.png", "a/2.png", "b/4.png"]
    assert "calibrating on 3 of the 7 images, spread over the folder" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["calibrate", "--images", "x", "--out", "y"]).limit == 1000


def halves(path, size, left, right):
    image = np.zeros((*size, 3), np.uint8)
    image[:, : size[1] // 2], image[:, size[1] // 2:] = left, right
    Image.fromarray(image).save(path)


def test_segment_with_examples_follows_their_labels(tmp_path, checkpoint, capsys):
    red, blue = (230, 20, 20), (20, 20, 230)
    halves(tmp_path / "scene.png", (64, 96), red, blue)
    truth = np.zeros((64, 96), np.uint8)
    truth[:, 48:] = 1
    agreement = {}
    for name, first in (("right", 0), ("swapped", 1)):
        examples = tmp_path / f"examples-{name}"
        examples.mkdir()
        halves(examples / "one.png", (80, 80), red, blue)
        label_map = np.full((80, 80), first, np.uint8)
        label_map[:, 40:] = 1 - first
        label_map[:5] = 255  # unlabeled pixels teach nothing
        Image.fromarray(label_map).save(examples / "one_labelmap.png")
        out = tmp_path / f"out-{name}"
        code = main(["segment", str(tmp_path / "scene.png"), "--labels", "red,blue", "--raw", "--examples",
                     str(examples), "--checkpoint", checkpoint, "--distraction-dims", "1,2,3", "--out", str(out),
                     *FAST])
        err = capsys.readouterr().err
        assert code == 0 and "examples per class: red 1, blue 1" in err
        assert "examples:" not in err  # --quiet: no progress bar for them either
        agreement[name] = (np.array(Image.open(out / "scene_labelmap.png")) == truth).mean()
    assert agreement["right"] > 0.9 and agreement["swapped"] < 0.1


@pytest.mark.parametrize("device, gpus, why", [
    ("cuda", 0, "--device cuda: no CUDA GPU is visible to this process (use --device cpu)"),
    ("cuda:3", 2, "--device cuda:3: this process sees 2 CUDA GPU(s)"),
    ("gpu", 0, "--device gpu: Expected one of cpu, cuda"),
])
def test_a_device_this_process_cannot_use_is_refused_before_the_weights_load(tmp_path, checkpoint, capsys,
                                                                           monkeypatch, device, gpus, why):
    from rfclip_engine import cli

    write_image(tmp_path / "x.png", (64, 64))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    with pytest.raises(SystemExit) as info:
        main(["segment", str(tmp_path / "x.png"), "--labels", "a", "--out", str(tmp_path / "o"), "--checkpoint",
              checkpoint, "--device", device, *FAST])
    assert info.value.code == 2 and why in capsys.readouterr().err


def test_examples_usage_errors(tmp_path, checkpoint, capsys):
    write_image(tmp_path / "x.png", (64, 64))
    examples = tmp_path / "examples"
    examples.mkdir()
    args = ["segment", str(tmp_path / "x.png"), "--labels", "a,b", "--examples", str(examples), "--checkpoint",
            checkpoint, "--distraction-dims", "1,2,3", "--out", str(tmp_path / "o"), *FAST]

    def refused(expected):
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2 and expected in capsys.readouterr().err

    refused("no NAME_labelmap.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(examples / "lone_labelmap.png")
    refused("has no image lone")
    write_image(examples / "lone.png", (64, 64))
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(examples / "lone_labelmap.png")
    refused("holds class indices [7]")
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(examples / "lone_labelmap.png")
    refused("image's size 64x64")
    Image.fromarray(np.zeros((200, 200), np.uint8)).save(examples / "lone_labelmap.png")
    args += ["--max-pixels", "10000"]  # the label map, not its 64x64 image, is over the limit: refused undecoded
    refused("lone.png or its label map cannot be read: image is 200x200 = 40000 pixels, more than the limit of 10000")


def test_cuda_graphs_and_triton_kernels_are_on_unless_turned_off():
    from rfclip_engine.cli import segmenter_config, build_parser

    def config(*flags):
        args = build_parser().parse_args(["segment", "x.png", "--labels", "a", "--out", "o", *flags])
        return segmenter_config(args, torch.device("cuda"))

    assert config().cuda_graphs
    assert not config("--no-cuda-graphs").cuda_graphs
    assert config("--no-cuda-graphs", "--cuda-graphs").cuda_graphs
    assert config().encoder.triton_kernels
    assert not config("--no-triton-kernels").encoder.triton_kernels


@pytest.mark.parametrize("device, batch", [("cuda", 32), ("cpu", 8)])
def test_the_batch_size_defaults_by_device(device, batch):
    from rfclip_engine.cli import segmenter_config, build_parser

    def config(*flags):
        args = build_parser().parse_args(["segment", "x.png", "--labels", "a", "--out", "o", *flags])
        return segmenter_config(args, torch.device(device))

    assert config().batch_size == batch
    assert config("--batch-size", "3").batch_size == 3


def test_output_stems_are_one_per_input_even_where_names_meet():
    from rfclip_engine.cli import _output_stems
    root = Path("/data")
    files = [root / name for name in ("a.jpg", "a.png", "a_jpg.png", "b.jpg", "c.d.png")]
    assert _output_stems(files, root) == ["a_jpg", "a_png", "a_jpg_2", "b", "c.d"]
    # in subfolders (--recursive): a name meets only the names of its own folder
    files = [root / name for name in ("e.png", "x/e.png", "x/e.jpg", "x/y/e.png", "x/e_png.png")]
    assert _output_stems(files, root) == ["e", "x/e_png", "x/e_jpg", "x/y/e", "x/e_png_2"]
    many = [root / f"{i:06d}.jpg" for i in range(100_000)]  # a quadratic count would take minutes here
    assert _output_stems(many, root) == [p.stem for p in many]


def segment_folder(folder, out, checkpoint, *extra, labels="sky,tree"):
    return main(["segment", str(folder), "--labels", labels, "--checkpoint", checkpoint, "--distraction-dims", "1,2,3",
                 "--raw", "--out", str(out), *FAST, *extra])


def image_folder(path, count):
    path.mkdir()
    for i in range(count):
        write_image(path / f"{i}.png", (48, 64), seed=i)
    return path


def test_recursive_mirrors_the_subfolders_and_leaves_out_its_own_pictures(tmp_path, checkpoint, capsys):
    data = image_folder(tmp_path / "data", 1)
    for sub, count in (("city_a", 2), ("city_b", 1), ("city_b/night", 1), (".cache", 1), ("examples", 0)):
        image_folder(data / sub, count)
    write_image(data / "city_a" / "0.jpg", (48, 64), seed=9)  # beside city_a/0.png
    (data / "city_b" / "loop").symlink_to(data, target_is_directory=True)  # never walked
    out = data / "labels"  # inside the tree: its pictures must not become inputs of the next run
    examples = data / "examples"  # the same
    write_image(examples / "ex.png", (48, 64), seed=1)
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(examples / "ex_labelmap.png")

    assert segment_folder(data, out, checkpoint) == 0  # without --recursive, the folder's own image only
    assert "segmented 1 of 1" in capsys.readouterr().err and not [p for p in out.iterdir() if p.is_dir()]
    nested = image_folder(tmp_path / "nested", 0)
    image_folder(nested / "sub", 1)
    with pytest.raises(SystemExit):
        segment_folder(nested, tmp_path / "o", checkpoint)
    assert "no image files in" in (err := capsys.readouterr().err) and "--recursive reads its subfolders" in err

    for _ in range(2):  # the second run meets the first's pictures inside the tree and leaves them out
        assert segment_folder(data, out, checkpoint, "--recursive", "--examples", str(examples)) == 0
        assert "segmented 6 of 6" in capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*_labelmap.png")) == [
        "0_labelmap.png", "city_a/0_jpg_labelmap.png", "city_a/0_png_labelmap.png", "city_a/1_labelmap.png",
        "city_b/0_labelmap.png", "city_b/night/0_labelmap.png"]
    # a picture is its own image's, as segmented alone
    alone = tmp_path / "alone"
    assert segment_folder(data / "city_b" / "night" / "0.png", alone, checkpoint, "--examples", str(examples)) == 0
    assert (out / "city_b" / "night" / "0_labelmap.png").read_bytes() == (alone / "0_labelmap.png").read_bytes()
    assert (out / "city_a" / "0_jpg_labelmap.png").read_bytes() != (out / "city_a" / "0_png_labelmap.png").read_bytes()
    capsys.readouterr()
    assert segment_folder(data, out, checkpoint, "--recursive", "--examples", str(examples), "--resume") == 0
    assert "resuming: 6 of 6 image(s) were segmented" in capsys.readouterr().err


def test_the_text_embeddings_of_one_run_serve_the_next(tmp_path, checkpoint, capsys, monkeypatch, text_cache_folder):
    folder = image_folder(tmp_path / "in", 1)
    assert segment_folder(folder, tmp_path / "first", checkpoint, labels="sky|heaven,tree") == 0
    assert len(list(text_cache_folder.glob("*.npy"))) == 3  # one per class name or synonym
    computed = []
    original = TextEmbedder._compute
    monkeypatch.setattr(TextEmbedder, "_compute", lambda self, queries: computed.extend(queries) or
                        original(self, queries))
    assert segment_folder(folder, tmp_path / "again", checkpoint, labels="tree,sky|heaven,road") == 0
    assert computed == ["road"]
    assert segment_folder(folder, tmp_path / "second", checkpoint, labels="sky|heaven,tree") == 0
    assert computed == ["road"]  # nothing more
    first, second = (tmp_path / "first" / "0_labelmap.png", tmp_path / "second" / "0_labelmap.png")
    assert first.read_bytes() == second.read_bytes()
    other = tmp_path / "other-cache"
    assert segment_folder(folder, tmp_path / "no", checkpoint, "--no-text-cache", labels="sky|heaven,tree") == 0
    assert segment_folder(folder, tmp_path / "elsewhere", checkpoint, "--text-cache", str(other)) == 0
    assert computed == ["road", "sky", "heaven", "tree", "sky", "tree"]
    assert len(list(other.glob("*.npy"))) == 2 and len(list(text_cache_folder.glob("*.npy"))) == 4


def test_the_text_embeddings_show_their_progress_and_are_computed_a_batch_at_a_time(tmp_path, checkpoint, capsys,
                                                                                      monkeypatch):
    computed, compute = [], TextEmbedder._compute

    def counted(self, queries):
        if queries:
            computed.append(len(queries))
        return compute(self, queries)

    monkeypatch.setattr(TextEmbedder, "_compute", counted)
    folder = image_folder(tmp_path / "in", 1)
    labels = ",".join(f"class {i}" for i in range(12))
    loud = [arg for arg in FAST if arg != "--quiet"]
    run = ["segment", str(folder), "--labels", labels, "--checkpoint", checkpoint, "--distraction-dims", "1,2,3", *loud]
    assert main([*run, "--out", str(tmp_path / "first")]) == 0
    err = capsys.readouterr().err
    assert "text embeddings: 100%" in err and "12/12" in err
    assert computed == [5, 5, 2]  # 80 prompts each, 400 prompts a batch
    assert main([*run, "--out", str(tmp_path / "second")]) == 0
    assert "text embeddings" not in capsys.readouterr().err and computed == [5, 5, 2]  # kept from the first run


def test_without_a_home_folder_nothing_is_kept(tmp_path, checkpoint, monkeypatch, text_cache_folder):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(Path, "home", no_home)  # a container's user that has none
    assert segment_folder(image_folder(tmp_path / "in", 1), tmp_path / "out", checkpoint) == 0
    assert not text_cache_folder.exists()


def test_a_slow_resume_check_shows_its_progress(tmp_path, checkpoint, capsys, monkeypatch):
    """Reading the pictures' file times of a million images on a network file system takes
    minutes: past a second, a bar shows it."""
    from rfclip_engine.folder import Pictures

    folder, out = image_folder(tmp_path / "in", 3), tmp_path / "out"
    assert segment_folder(folder, out, checkpoint) == 0
    assert "finding what was segmented" not in capsys.readouterr().err  # not a resume
    written_since = Pictures.written_since
    monkeypatch.setattr(Pictures, "written_since", lambda *args: time.sleep(0.5) or written_since(*args))
    loud = [arg for arg in FAST if arg != "--quiet"]
    assert main(["segment", str(folder), "--labels", "sky,tree", "--checkpoint", checkpoint, "--distraction-dims",
                 "1,2,3", "--raw", "--out", str(out), *loud, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "finding what was segmented" in err and "3/3" in err and "resuming: 3 of 3" in err


def test_resume_segments_what_an_interrupted_run_left_and_nothing_twice(tmp_path, checkpoint, capsys):
    folder, out = image_folder(tmp_path / "in", 4), tmp_path / "out"
    assert segment_folder(folder, out, checkpoint) == 0
    whole = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "run.json"}
    # cut off: image 1 not written at all, image 2 in the middle of its raw label map
    for name in ("1_labels.png", "1_overlay.jpg", "1_labelmap.png", "2_labelmap.png"):
        (out / name).unlink()
    (out / ".2_labelmap.png.part").write_bytes(b"\x89PNG trunc")
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("[03]_*")}
    capsys.readouterr()
    assert segment_folder(folder, out, checkpoint, "--resume") == 0
    err = capsys.readouterr().err
    assert "resuming: 2 of 4 image(s) were segmented" in err and "segmented 2 of 2" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("[03]_*")} == kept  # not segmented twice
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "run.json"} == whole  # no part file left


def test_resume_takes_the_examples_by_their_contents_not_their_folder(tmp_path, checkpoint, capsys):
    folder, out = image_folder(tmp_path / "in", 2), tmp_path / "out"
    examples = image_folder(tmp_path / "examples", 0)
    write_image(examples / "ex.png", (48, 64), seed=1)
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(examples / "ex_labelmap.png")
    assert segment_folder(folder, out, checkpoint, "--examples", str(examples)) == 0
    moved = tmp_path / "moved"
    examples.rename(moved)  # the same files elsewhere: the same run
    assert segment_folder(folder, out, checkpoint, "--examples", str(moved), "--resume") == 0
    assert "resuming: 2 of 2" in capsys.readouterr().err
    Image.fromarray(np.ones((48, 64), np.uint8)).save(moved / "ex_labelmap.png")  # corrected: other prototypes
    assert segment_folder(folder, out, checkpoint, "--examples", str(moved), "--resume") == 2
    assert "holds a run with other settings (examples)" in capsys.readouterr().err
    assert segment_folder(folder, out, checkpoint, "--resume") == 2  # none at all
    assert "holds a run with other settings (examples)" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume_and_leaves_every_picture_whole(tmp_path, checkpoint, capsys, monkeypatch):
    from rfclip_engine.predictor import Segmenter

    folder, out = image_folder(tmp_path / "in", 5), tmp_path / "out"
    assert segment_folder(folder, tmp_path / "whole", checkpoint) == 0
    groups, logits_many = [], Segmenter.logits_many

    def interrupted_in_the_third_group(self, *args, **kwargs):
        groups.append(len(args[0]))
        if len(groups) == 3:
            raise KeyboardInterrupt
        return logits_many(self, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "logits_many", interrupted_in_the_third_group)
    capsys.readouterr()
    assert segment_folder(folder, out, checkpoint, "--images-per-batch", "2") == 130
    err = capsys.readouterr().err
    assert "interrupted after 2 of 5 image(s): the same command with --resume segments the rest" in err
    assert "Traceback" not in err
    # the first group's pictures and the second's, which were being written, are whole
    assert sorted(p.name for p in out.glob("*_*")) == sorted(p.name for p in (tmp_path / "whole").glob("[0-3]_*"))
    assert not list(out.glob(".*.part"))
    monkeypatch.setattr(Segmenter, "logits_many", logits_many)
    assert segment_folder(folder, out, checkpoint, "--resume") == 0
    assert "resuming: 4 of 5 image(s)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.glob("*_*")} == \
        {p.name: p.read_bytes() for p in (tmp_path / "whole").glob("*_*")}

    def interrupted_while_loading(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("rfclip_engine.cli.load_model", interrupted_while_loading)
    assert segment_folder(folder, tmp_path / "never", checkpoint) == 130
    err = capsys.readouterr().err
    assert err.strip().endswith("interrupted") and "Traceback" not in err


def test_resume_refuses_other_settings_and_takes_only_the_recorded_runs_pictures(tmp_path, checkpoint, capsys):
    folder, out = image_folder(tmp_path / "in", 3), tmp_path / "out"
    assert segment_folder(folder, out, checkpoint, "--resume") == 0  # nothing to resume: a fresh run
    assert "no run is recorded" in capsys.readouterr().err
    for extra, labels, differing in [((), "sky,road", "classes"), (("--beta", "0.6"), "sky,tree", "config")]:
        capsys.readouterr()
        assert segment_folder(folder, out, checkpoint, "--resume", *extra, labels=labels) == 2
        err = capsys.readouterr().err
        assert f"holds a run with other settings ({differing})" in err and "Traceback" not in err
    assert json.loads((out / "classes.json").read_text())[1]["name"] == "tree"  # the refused runs wrote nothing
    record, written = (out / "run.json").read_text(), (out / "run.json").stat().st_mtime_ns
    for broken in ("{not json", "[]", '{"settings": ["a list"]}'):
        (out / "run.json").write_text(broken)
        assert segment_folder(folder, out, checkpoint, "--resume") == 2
        err = capsys.readouterr().err
        assert "run.json cannot be read" in err and "Traceback" not in err
    (out / "run.json").write_text(record)
    os.utime(out / "run.json", ns=(written, written))  # the run's start is the record's file time
    # how forwards run is not a setting of the labels: another batch resumes, and finds all done
    assert segment_folder(folder, out, checkpoint, "--resume", "--batch-size", "3") == 0
    assert "resuming: 3 of 3" in capsys.readouterr().err

    # a fresh run with other classes, cut off after its first image: the earlier run's pictures of
    # the other two are not this run's, so resuming it segments them again
    single = tmp_path / "single"
    single.mkdir()
    (single / "0.png").write_bytes((folder / "0.png").read_bytes())
    assert segment_folder(single, out, checkpoint, labels="sky,road") == 0
    capsys.readouterr()
    assert segment_folder(folder, out, checkpoint, "--resume", labels="sky,road") == 0
    err = capsys.readouterr().err
    assert "resuming: 1 of 3" in err and "segmented 2 of 2" in err
    assert [c["name"] for c in json.loads((out / "classes.json").read_text())] == ["sky", "road"]
