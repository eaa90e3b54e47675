"""Evaluation: the metric against a hand-built confusion matrix, every dataset layout read from
a synthetic copy, and `rfclip eval` end to end."""
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rfclip_engine import evaluation, load_model
from rfclip_engine.cli import main
from rfclip_engine.evaluation import (IGNORE_INDEX, IoUAccumulator, SegmentationDataset, dataset_specs, evaluate,
                                      format_table)

from .conftest import TINY_CONFIG


def confusion_reference(preds, labels, n):
    """IoU from a confusion matrix with an extra column for predictions outside the classes."""
    cm = np.zeros((n, n + 1), np.int64)
    for pred, label in zip(preds, labels):
        keep = label != IGNORE_INDEX
        p, t = pred[keep], label[keep]
        p = np.where((p >= 0) & (p < n), p, n)
        np.add.at(cm, (t, p), 1)
    inter = np.diag(cm[:, :n])
    union = cm.sum(1) + cm[:, :n].sum(0) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return iou, inter.sum() / cm.sum()


def test_metric_matches_confusion_matrix():
    rng = np.random.default_rng(0)
    n = 6
    preds, labels = [], []
    acc = IoUAccumulator(n)
    for _ in range(4):
        label = rng.integers(0, n - 1, (30, 40))  # class 5 never in the labels
        label[rng.random(label.shape) < 0.1] = IGNORE_INDEX
        pred = np.where(rng.random(label.shape) < 0.6, label, rng.integers(-1, n, label.shape))
        pred[label == IGNORE_INDEX] = 3  # predictions on ignored pixels never count
        acc.add(pred, label)
        preds.append(pred)
        labels.append(label)
    iou, aacc = confusion_reference(preds, labels, n)
    summary = acc.summary(tuple("abcdef"))
    got = np.array([summary["per_class"][c]["IoU"] if summary["per_class"][c]["IoU"] is not None else np.nan
                    for c in "abcdef"])
    np.testing.assert_allclose(got, np.round(iou * 100, 4), atol=1e-4)
    assert summary["mIoU"] == pytest.approx(np.nanmean(iou) * 100)
    assert summary["aAcc"] == pytest.approx(aacc * 100)


def test_class_absent_everywhere_is_nan_and_left_out_of_miou():
    acc = IoUAccumulator(3)
    acc.add(np.array([[0, 1]]), np.array([[0, 1]]))
    summary = acc.summary(("a", "b", "c"))
    assert summary["per_class"]["c"]["IoU"] is None and summary["mIoU"] == 100.0


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, format="PNG")  # PNG bytes even under .jpg: lossless


def build_dataset(root, name, raw_labels):
    """Files in the dataset's layout; each image's red channel holds its raw label values."""
    spec = dataset_specs()[name]
    stems = []
    for i, raw in enumerate(raw_labels):
        stem = f"frankfurt/img{i}" if name == "cityscapes" else f"img{i}"
        image = np.zeros((*raw.shape, 3), np.uint8)
        image[..., 0] = raw
        write_png(root / spec["images"] / f"{stem}{spec['image_suffix']}", image)
        write_png(root / spec["labels"] / f"{stem}{spec['label_suffix']}", raw)
        stems.append(stem)
    if "split" in spec:
        (root / spec["split"]).parent.mkdir(parents=True, exist_ok=True)
        (root / spec["split"]).write_text("\n".join(stems) + "\n")
    return SegmentationDataset.open(name, root)


def each(predict_one):
    """A predictor of groups from one of single images."""
    return lambda rgbs: [predict_one(rgb) for rgb in rgbs]


@pytest.mark.parametrize("name", sorted(dataset_specs()))
def test_every_layout_reads_and_scores(tmp_path, name):
    spec = dataset_specs()[name]
    n = len(build_dataset(tmp_path / "probe", name, [np.zeros((2, 2), np.uint8)]).vocabulary)
    rng = np.random.default_rng(1)
    top = n + 1 if spec["reduce_zero_label"] else n  # raw values 0..top-1 are classes (0 = ignore when reduced)
    raws = [rng.integers(0, top, (12, 17)).astype(np.uint8) for _ in range(3)]
    raws[0][0, :5] = 255  # ignored pixels
    dataset = build_dataset(tmp_path / name, name, raws)
    assert len(dataset) == 3

    def to_classes(raw):
        raw = raw.astype(np.int64)
        if spec["reduce_zero_label"]:
            return np.where((raw == 0) | (raw == 255), IGNORE_INDEX, raw - 1)
        return raw

    # an oracle that reads the label back from the red channel scores 100 on every present class
    perfect = evaluate(each(lambda rgb: np.where(to_classes(rgb[..., 0]) == 255, 0, to_classes(rgb[..., 0]))),
                       dataset, progress=False, images_per_group=2)
    present = {int(c) for raw in raws for c in np.unique(to_classes(raw)) if c != IGNORE_INDEX}
    ious = {i: v["IoU"] for i, v in enumerate(perfect["per_class"].values())}
    assert all(ious[c] == 100.0 for c in present)
    assert all(ious[c] is None for c in set(range(n)) - present)
    assert perfect["mIoU"] == 100.0 and perfect["images"] == 3

    # a constant prediction of class 0, against the hand-built reference
    const = evaluate(each(lambda rgb: np.zeros(rgb.shape[:2], np.int64)), dataset, progress=False, limit=2)
    iou, aacc = confusion_reference([np.zeros_like(r, np.int64) for r in raws[:2]], [to_classes(r) for r in raws[:2]], n)
    assert const["images"] == 2
    assert const["aAcc"] == pytest.approx(aacc * 100)
    assert const["mIoU"] == pytest.approx(np.nanmean(iou) * 100)


def test_unlabeled_pixels_become_background_where_the_dataset_has_one(tmp_path):
    raw = np.array([[0, 1], [2, 0]], np.uint8)
    dataset = build_dataset(tmp_path, "voc21", [raw])
    result = evaluate(each(lambda rgb: np.array([[-1, 1], [2, -1]])), dataset, progress=False)
    assert result["mIoU"] == 100.0


@pytest.mark.parametrize("per_group, limit", [(1, None), (2, None), (3, None), (4, 5), (8, None)])
def test_groups_score_as_single_images_and_the_next_is_read_meanwhile(tmp_path, monkeypatch, per_group, limit):
    """The predictor gets the images in groups of `per_group` (the last one shorter) and the
    metrics are those of single images; while it predicts one group, the next one's first image
    is read (the predictor below waits for it, which it could not if reading came after)."""
    rng = np.random.default_rng(3)
    raws = [rng.integers(0, 21, (6, 9)).astype(np.uint8) for _ in range(7)]
    dataset = build_dataset(tmp_path / "voc", "voc21", raws)
    read, started = evaluation.load_rgb, {}

    def load(path, *args):
        started.setdefault(path.stem, threading.Event()).set()
        return read(path, *args)

    monkeypatch.setattr(evaluation, "load_rgb", load)
    noisy = lambda rgb: np.where(rgb[..., 0] % 3 == 0, 0, rgb[..., 0]).astype(np.int64)  # noqa: E731
    groups = []

    def predict(rgbs):
        groups.append(len(rgbs))
        following = f"img{sum(groups)}"
        if sum(groups) < (limit or len(raws)):
            assert started.setdefault(following, threading.Event()).wait(10), "the next group was not read"
        return [noisy(rgb) for rgb in rgbs]

    grouped = evaluate(predict, dataset, progress=False, limit=limit, images_per_group=per_group)
    single = evaluate(each(noisy), SegmentationDataset.open("voc21", tmp_path / "voc"), progress=False, limit=limit)
    total = limit or len(raws)
    assert groups == [per_group] * (total // per_group) + ([total % per_group] if total % per_group else [])
    assert grouped == single and grouped["images"] == total


@pytest.mark.parametrize("per_group", [1, 2, 4])
def test_an_unreadable_or_unfitting_pair_is_skipped_and_said_and_the_rest_scored(tmp_path, per_group, capsys,
                                                                                    monkeypatch):
    rng = np.random.default_rng(4)
    raws = [rng.integers(0, 21, (6, 9)).astype(np.uint8) for _ in range(7)]
    dataset = build_dataset(tmp_path / "voc", "voc21", raws)
    spec = dataset_specs()["voc21"]
    images, labels = tmp_path / "voc" / spec["images"], tmp_path / "voc" / spec["labels"]
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees, so 6x9 upright against the 9x6 label map
    Image.fromarray(np.zeros((6, 9, 3), np.uint8)).save(images / "img1.jpg", format="JPEG", exif=exif)
    (images / "img2.jpg").write_bytes(b"\xff\xd8 not a whole JPEG")
    (labels / "img3.png").write_bytes(b"not a PNG")
    write_png(labels / "img4.png", raws[4][:5])
    write_png(labels / "img5.png", np.zeros((12, 18)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # img5's label map, 216 pixels, is a decompression bomb
    given = []

    def oracle(rgbs):
        given.extend(rgb.shape for rgb in rgbs)
        return [rgb[..., 0].astype(np.int64) for rgb in rgbs]

    result = evaluate(oracle, dataset, progress=False, images_per_group=per_group)
    assert result["images"] == 2 and given == [(6, 9, 3)] * 2  # a skipped image never reaches the model
    skipped = {Path(item["image"]).name: item["error"] for item in result["skipped"]}
    assert list(skipped) == ["img1.jpg", "img2.jpg", "img3.jpg", "img4.jpg", "img5.jpg"]
    assert "is 6x9 but its label map img1.png is 9x6 (turned by 90 degrees" in skipped["img1.jpg"]
    assert "cannot read" in skipped["img2.jpg"] and "img3.png" in skipped["img3.jpg"]
    assert skipped["img4.jpg"].endswith("is 9x6 but its label map img4.png is 9x5")
    assert "decompression bomb" in skipped["img5.jpg"]
    err = capsys.readouterr().err
    assert all(f"skipped: {images / name}: {reason}" in err for name, reason in skipped.items())
    # the metric is that of the two readable pairs alone
    alone = evaluate(oracle, build_dataset(tmp_path / "alone", "voc21", [raws[0], raws[6]]), progress=False)
    assert {k: v for k, v in result.items() if k != "skipped"} == {k: v for k, v in alone.items() if k != "skipped"}
    assert "2 images (5 skipped, said above)" in format_table(result)


def test_a_run_with_every_image_skipped_gives_no_mean_and_strict_json(tmp_path):
    dataset = build_dataset(tmp_path / "voc", "voc21", [np.zeros((6, 9), np.uint8)] * 2)
    for image, _ in dataset.pairs:
        image.write_bytes(b"broken")
    result = evaluate(each(lambda rgb: pytest.fail("nothing to segment")), dataset, progress=False)
    assert result["images"] == 0 and len(result["skipped"]) == 2
    assert result["mIoU"] is None and result["mAcc"] is None
    json.dumps(result, allow_nan=False)  # NaN is not JSON
    assert "0 images (2 skipped, said above), mIoU -, aAcc 0.00, mAcc -" in format_table(result)


def test_a_group_out_of_memory_is_scored_image_by_image_and_only_what_fails_alone_is_skipped(tmp_path, capsys):
    rng = np.random.default_rng(5)
    raws = [rng.integers(0, 21, (6, 9)).astype(np.uint8) for _ in range(5)]
    raws[3] = rng.integers(0, 21, (12, 18)).astype(np.uint8)  # the large one: fails even alone
    dataset = build_dataset(tmp_path / "voc", "voc21", raws)
    calls = []

    def predict(rgbs):
        calls.append(len(rgbs))
        if any(rgb.shape[0] == 12 for rgb in rgbs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB\nSee the allocator's docs")
        return [rgb[..., 0].astype(np.int64) for rgb in rgbs]

    result = evaluate(predict, dataset, progress=False, images_per_group=4)
    assert calls == [4, 1, 1, 1, 1, 1]  # the group of the large one, then each of its images alone; then img4
    assert [(Path(s["image"]).name, s["error"]) for s in result["skipped"]] == [
        ("img3.jpg", "cannot be segmented: OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB")]
    alone = evaluate(predict, build_dataset(tmp_path / "alone", "voc21", raws[:3] + raws[4:]), progress=False)
    assert {k: v for k, v in result.items() if k != "skipped"} == {k: v for k, v in alone.items() if k != "skipped"}
    assert "skipped: " in capsys.readouterr().err

    def broken(rgbs):  # not a memory error: a fault of the predictor stops the run, as it should
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        evaluate(broken, dataset, progress=False)


def test_missing_layout_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="JPEGImages/ and SegmentationClass/"):
        SegmentationDataset.open("voc21", tmp_path)


def run_eval(tmp_path, *extra):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save(load_model(TINY_CONFIG, pretrained=None).clip.state_dict(), ckpt)
    out = tmp_path / "results.json"
    code = main(["eval", "--dataset", "voc21", "--root", str(tmp_path / "voc"), "--model", TINY_CONFIG,
                 "--checkpoint", str(ckpt), "--distraction-dims", "1,2,3", "--window", "64", "--stride", "32",
                 "--short-side", "64", "--out", str(out), "--quiet", *extra])
    return code, json.loads(out.read_text())


def test_eval_command_on_a_synthetic_dataset(tmp_path, capsys):
    rng = np.random.default_rng(2)
    build_dataset(tmp_path / "voc", "voc21", [rng.integers(0, 21, (40, 60)).astype(np.uint8) for _ in range(3)])
    code, result = run_eval(tmp_path, "--limit", "2")
    assert code == 0
    assert result["images"] == 2 and len(result["per_class"]) == 21 and result["skipped"] == []
    assert result["settings"]["config"]["prob_threshold"] == 0.1  # the dataset's default
    assert 0 <= result["mIoU"] <= 100
    assert "mIoU" in capsys.readouterr().out


def test_eval_command_scores_the_rest_of_a_dataset_with_a_broken_image_and_exits_1(tmp_path, capsys):
    rng = np.random.default_rng(2)
    build_dataset(tmp_path / "voc", "voc21", [rng.integers(0, 21, (40, 60)).astype(np.uint8) for _ in range(3)])
    broken = tmp_path / "voc" / dataset_specs()["voc21"]["images"] / "img1.jpg"
    broken.write_bytes(broken.read_bytes()[:40])
    code, result = run_eval(tmp_path)
    assert code == 1
    assert result["images"] == 2 and [item["image"] for item in result["skipped"]] == [str(broken)]
    captured = capsys.readouterr()
    assert f"skipped: {broken}: cannot read" in captured.err
    assert "voc21: 2 images (1 skipped, said above), mIoU" in captured.out
