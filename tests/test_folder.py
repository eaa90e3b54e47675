"""Many files through the segmenter (`rfclip segment FOLDER`): reading ahead, writing behind."""
import threading

import numpy as np
import torch
import pytest
from PIL import Image

from rfclip_engine import RFCLIPConfig, SegmenterConfig
from rfclip_engine import folder as folder_module
from rfclip_engine.folder import Pictures, segment_files
from rfclip_engine.predictor import Segmenter
from rfclip_engine.text import Vocabulary
from rfclip_engine.visualize import palette

VOCABULARY = Vocabulary.from_names(["sky", "tree", "road"])
CONFIG = SegmenterConfig(short_side=64, window=32, stride=16, batch_size=4, encoder=RFCLIPConfig(sigma=1.5))


def images(folder, sizes, broken=()):
    folder.mkdir()
    files = []
    for i, size in enumerate(sizes):
        path = folder / f"{i}.png"
        if i in broken:
            path.write_bytes(b"\x89PNG not really")
        else:
            rng = np.random.default_rng(i)
            blocks = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
            Image.fromarray(np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)).save(path)
        files.append((path, f"out{i}"))
    return files


@pytest.mark.parametrize("per_group, threads", [(1, 1), (2, 2), (3, 4)])
def test_every_file_once_with_the_labels_it_gets_alone(tmp_path, tiny_model, per_group, threads):
    """Each readable file's label map, written in a thread, equals segmenting it alone; the file
    that cannot be read is reported once, and its group goes on."""
    files = images(tmp_path / "in", [(64, 80), (48, 64), (72, 56), (64, 64), (40, 96)], broken={2})
    out = tmp_path / "out"
    out.mkdir()
    segmenter = Segmenter(tiny_model, CONFIG)
    pictures = Pictures(out, VOCABULARY.names, palette(len(VOCABULARY)), raw=True)
    done = list(segment_files(segmenter, files, VOCABULARY, pictures, per_group, threads=threads))
    assert sorted(str(path) for path, _ in done) == sorted(str(path) for path, _ in files)
    failed = {path.name: error for path, error in done if error is not None}
    assert list(failed) == ["2.png"] and failed["2.png"]
    for i, (path, stem) in enumerate(files):
        if i == 2:
            assert not list(out.glob(f"{stem}_*"))
            continue
        alone = segmenter.predict(path, VOCABULARY).label_map.numpy()
        raw = np.array(Image.open(out / f"{stem}_labelmap.png"))
        assert np.array_equal(np.where(raw == 255, -1, raw), alone)
        assert Image.open(out / f"{stem}_labels.png").size == alone.shape[::-1]
        overlay = Image.open(out / f"{stem}_overlay.jpg")
        assert overlay.width > alone.shape[1] and overlay.height >= alone.shape[0]  # the image and a legend


def test_the_next_group_is_read_and_the_last_written_while_the_model_runs(tmp_path, tiny_model, monkeypatch):
    """While the model segments group n, group n + 1 is read and group n - 1 written: the model
    call below waits for both to happen, which they could not if they ran after it."""
    files = images(tmp_path / "in", [(48, 48)] * 6)
    out = tmp_path / "out"
    out.mkdir()
    started = {path.name: threading.Event() for path, _ in files}
    read, write = folder_module.load_rgb, Pictures.write
    monkeypatch.setattr(folder_module, "load_rgb", lambda path, limit: started[path.name].set() or read(path, limit))
    written = {stem: threading.Event() for _, stem in files}
    monkeypatch.setattr(Pictures, "write", lambda self, stem, rgb, labels: (write(self, stem, rgb, labels),
                                                                            written[stem].set()))
    segmenter = Segmenter(tiny_model, CONFIG)
    logits_many = segmenter.logits_many
    groups = [files[:2], files[2:4], files[4:]]
    calls = []

    def model(rgbs, vocabulary, prototypes=None):
        n = len(calls)
        calls.append(n)
        if n + 1 < len(groups):
            assert all(started[path.name].wait(10) for path, _ in groups[n + 1]), "the next group was not read"
        if n > 0:
            assert all(written[stem].wait(10) for _, stem in groups[n - 1]), "the last group was not written"
        return logits_many(rgbs, vocabulary, prototypes=prototypes)

    monkeypatch.setattr(segmenter, "logits_many", model)
    pictures = Pictures(out, VOCABULARY.names, palette(len(VOCABULARY)))
    done = list(segment_files(segmenter, files, VOCABULARY, pictures, 2, threads=2))
    assert calls == [0, 1, 2] and [error for _, error in done] == [None] * 6
    assert all(event.is_set() for event in written.values())


def test_a_picture_that_cannot_be_written_stops_the_run(tmp_path, tiny_model):
    files = images(tmp_path / "in", [(48, 48)] * 3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "out1_overlay.jpg").mkdir()  # where the second image's overlay should go
    pictures = Pictures(out, VOCABULARY.names, palette(len(VOCABULARY)))
    with pytest.raises(OSError):
        list(segment_files(Segmenter(tiny_model, CONFIG), files, VOCABULARY, pictures, 2))
    assert not list(out.glob(".*.part"))  # the picture that failed left no part of itself


@pytest.mark.parametrize("classes, dtype", [(3, np.uint8), (254, np.uint8), (255, np.uint16), (300, np.uint16)])
def test_the_raw_label_map_reads_back_with_unlabeled_at_the_dtype_maximum(tmp_path, classes, dtype):
    rng = np.random.default_rng(classes)
    labels = rng.integers(-1, classes, (30, 40))
    labels[0, :2] = [-1, classes - 1]
    folder_module.save_label_map(tmp_path / "raw.png", labels, classes)
    raw = np.array(Image.open(tmp_path / "raw.png"))
    assert raw.dtype == dtype, raw.dtype
    unlabeled = np.iinfo(dtype).max
    assert np.array_equal(raw, np.where(labels < 0, unlabeled, labels))


def test_an_image_that_cannot_be_segmented_is_reported_and_its_group_goes_on(tmp_path, tiny_model):
    """The group's forward fails (as out of memory does beside a large image): each image is tried
    alone, and only the one that fails again is lost."""
    files = images(tmp_path / "in", [(64, 80), (48, 64), (72, 56), (64, 64)])
    out = tmp_path / "out"
    out.mkdir()
    segmenter = Segmenter(tiny_model, CONFIG)
    logits_many = segmenter.logits_many
    calls = []

    def model(rgbs, vocabulary, prototypes=None):
        calls.append(len(rgbs))
        if any(rgb.shape[:2] == (72, 56) for rgb in rgbs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nSee the allocator's docs")
        return logits_many(rgbs, vocabulary, prototypes=prototypes)

    segmenter.logits_many = model
    pictures = Pictures(out, VOCABULARY.names, palette(len(VOCABULARY)), raw=True)
    done = dict(segment_files(segmenter, files, VOCABULARY, pictures, 3))
    assert calls == [3, 1, 1, 1, 1]  # the group, each of its images alone, then the last group
    assert done[files[2][0]] == "cannot be segmented: OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB"
    assert [done[path] for path, _ in files if path != files[2][0]] == [None] * 3
    assert not list(out.glob("out2_*"))
    segmenter.logits_many = logits_many
    for path, stem in files[:2] + files[3:]:
        raw = np.array(Image.open(out / f"{stem}_labelmap.png"))
        assert np.array_equal(np.where(raw == 255, -1, raw), segmenter.predict(path, VOCABULARY).label_map.numpy())


def test_a_panorama_wider_than_jpeg_allows_gets_a_scaled_overlay(tmp_path):
    """libjpeg stops at 65500 pixels a side: the overlay is scaled down to that; the maps keep every pixel."""
    rgb = np.random.default_rng(0).integers(0, 256, (16, 65600, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(65600) // 20000, 16).reshape(65600, 16).T.copy()
    pictures = Pictures(tmp_path, VOCABULARY.names + ("sea",), palette(len(VOCABULARY) + 1), raw=True)
    pictures.write("wide", rgb, labels)
    overlay = Image.open(tmp_path / "wide_overlay.jpg")
    assert overlay.width == 65500 and overlay.height >= 15
    assert Image.open(tmp_path / "wide_labels.png").size == (65600, 16)
    assert np.array_equal(np.array(Image.open(tmp_path / "wide_labelmap.png")), labels)
