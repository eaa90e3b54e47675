"""Segmenter: sizes, inputs of every kind, synonyms, thresholds, precision, text cache."""
import io
import re
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from rfclip_engine import RFCLIPConfig, SegmenterConfig
from rfclip_engine.imageio import ImageError, load_rgb
from rfclip_engine.predictor import UNLABELED, Segmenter
from rfclip_engine.text import MemoryCache, TextEmbedder, Vocabulary

SMALL = SegmenterConfig(short_side=80, window=64, stride=32, encoder=RFCLIPConfig(sigma=1.5))


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("size", [(81, 123), (37, 29), (40, 700), (64, 64)])
@pytest.mark.parametrize("window", [64, None])
def test_output_has_input_size(tiny_model, size, window):
    config = SegmenterConfig(short_side=80, window=window, stride=32, encoder=RFCLIPConfig(sigma=1.5))
    pred = Segmenter(tiny_model, config).predict(rgb(*size), ["cat", "dog", "grass"])
    assert pred.probs.shape == (3, *size) and pred.label_map.shape == size
    torch.testing.assert_close(pred.probs.sum(0), torch.ones(size))
    assert torch.equal(pred.label_map.long(), pred.probs.argmax(0))
    assert int(pred.pixel_counts.sum()) == size[0] * size[1]


def test_synonyms_take_the_max_over_queries(tiny_model):
    # one crop, so the per-pixel max is not mixed with overlap averaging
    seg = Segmenter(tiny_model, SegmenterConfig(short_side=None, window=64, stride=32, encoder=RFCLIPConfig(sigma=1.5)))
    image = rgb(64, 64)
    vocab = Vocabulary.from_names(["cat, kitten", "dog"])
    assert vocab.names == ("cat", "dog") and vocab.queries == ("cat", "kitten", "dog")
    separate = Vocabulary.from_names(["cat", "kitten", "dog"])
    text = seg.text.embed(separate)
    (per_query,) = seg.class_logits([image], text, separate.query_class, 3)
    (grouped,) = seg.class_logits([image], text, vocab.query_class, 2)
    torch.testing.assert_close(grouped[0], torch.maximum(per_query[0], per_query[1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped[1], per_query[2])


@pytest.mark.parametrize("window", [64, None])
def test_many_images_in_shared_batches_equal_one_by_one(tiny_model, window, monkeypatch):
    config = SegmenterConfig(short_side=80, window=window, stride=32, batch_size=5, encoder=RFCLIPConfig(sigma=1.5))
    seg = Segmenter(tiny_model, config)
    images = [rgb(81, 123, seed=1), rgb(40, 40, seed=2), rgb(64, 300, seed=3)]
    together = seg.predict_many(images, ["cat", "dog"])
    for image, joint in zip(images, together):
        alone = seg.predict(image, ["cat", "dog"])
        torch.testing.assert_close(joint.probs, alone.probs, rtol=1e-4, atol=1e-5)
    sizes = []
    original = tiny_model.encode_dense

    def counting(pixels, config):
        sizes.append(pixels.shape[0])
        return original(pixels, config)

    monkeypatch.setattr(tiny_model, "encode_dense", counting)
    seg.predict_many(images, ["cat", "dog"])
    if window is not None:
        assert max(sizes) == 5 and sum(sizes) > 5  # crops of different images share a forward


def test_probability_threshold_leaves_pixels_unlabeled(tiny_model):
    image = rgb(64, 64)
    low = Segmenter(tiny_model, SMALL).predict(image, ["a", "b", "c"])
    config = SegmenterConfig(**{**SMALL.__dict__, "prob_threshold": 0.999})
    high = Segmenter(tiny_model, config).predict(image, ["a", "b", "c"])
    top = low.probs.max(0).values
    assert torch.equal(high.label_map == UNLABELED, top < 0.999)
    assert (low.label_map != UNLABELED).all()
    for c in range(3):
        inside = low.label_map == c
        expected = top[inside].mean() if inside.any() else torch.tensor(0.0)
        torch.testing.assert_close(low.confidence[c], expected)


def test_pamr_changes_logits_and_keeps_size(tiny_model):
    config = SegmenterConfig(**{**SMALL.__dict__, "pamr": True, "pamr_dilations": (2, 4), "pamr_iterations": 3})
    image = rgb(70, 90)
    seg, plain = Segmenter(tiny_model, config), Segmenter(tiny_model, SMALL)
    text = seg.text.embed(Vocabulary.from_names(["a", "b"]))
    (refined,) = seg.class_logits([image], text, (0, 1), 2)
    (unrefined,) = plain.class_logits([image], text, (0, 1), 2)
    assert refined.shape == unrefined.shape == (2, 80, 103)  # the working resolution (short side 80)
    assert not torch.allclose(refined, unrefined)


@pytest.mark.parametrize("use_pamr", [False, True])
def test_stage_timer_sees_each_stage_and_changes_nothing(tiny_model, use_pamr):
    config = SegmenterConfig(**{**SMALL.__dict__, "pamr": use_pamr, "pamr_dilations": (2,), "pamr_iterations": 2})
    seg = Segmenter(tiny_model, config)
    images, vocab = [rgb(70, 90), rgb(64, 64)], Vocabulary.from_names(["a", "b"])
    entered, running = [], []

    @contextmanager
    def timer(stage):
        entered.append(stage)
        running.append(stage)
        yield
        running.remove(stage)

    timed = seg.logits_many(images, vocab, timer)
    assert entered == ["text embeddings", "model"] + (["PAMR"] if use_pamr else []) and not running
    for got, expected in zip(timed, seg.logits_many(images, vocab)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_close_to_fp32(tiny_model, precision):
    """The CUDA mixed-precision path, run on the CPU."""
    image = rgb(64, 80)
    fp32 = Segmenter(tiny_model, SMALL).predict(image, ["a", "b"])
    half = Segmenter(tiny_model, SegmenterConfig(**{**SMALL.__dict__, "precision": precision})).predict(image, ["a", "b"])
    assert half.probs.dtype == torch.float32
    assert (fp32.probs - half.probs).abs().max() < 0.2
    assert (fp32.label_map == half.label_map).float().mean() > 0.8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(dtype):
    from rfclip_engine import load_model

    from .conftest import TINY_CONFIG, TINY_DIMS

    torch.manual_seed(0)
    full = load_model(TINY_CONFIG, pretrained=None, distraction_dims=TINY_DIMS)
    half = load_model(TINY_CONFIG, pretrained=None, distraction_dims=TINY_DIMS, dtype=dtype)
    half.clip.load_state_dict(full.clip.state_dict())
    pixels = torch.randn(1, 3, 64, 64)
    a = full.encode_dense(pixels, RFCLIPConfig(sigma=1.5))
    b = half.encode_dense(pixels, RFCLIPConfig(sigma=1.5))
    assert b.dtype == dtype
    cos = torch.nn.functional.cosine_similarity(a, b.float(), dim=-1)
    assert cos.min() > 0.95


def encode(image, fmt, **kwargs):
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_image_kinds_become_rgb():
    gray = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20)
    assert load_rgb(gray).shape == (3, 4, 3)
    sixteen = np.full((3, 4), 65535, dtype=np.uint16)
    sixteen[0, 0] = 0
    out = load_rgb(Image.fromarray(sixteen))
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = [10, 20, 30, 255]
    out = load_rgb(rgba)  # transparent pixels show as white
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 1].tolist() == [255, 255, 255]
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    assert load_rgb(encode(palette, "PNG"))[0, 1].tolist() == [0, 0, 255]
    assert load_rgb(np.ones((2, 3), np.float32) * 0.5)[0, 0].tolist() == [128, 128, 128]


def test_exif_orientation_is_applied():
    image = Image.fromarray(rgb(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    data = encode(image, "JPEG", exif=exif.tobytes())
    assert load_rgb(data).shape == (40, 20, 3)


def test_bad_images():
    with pytest.raises(ImageError, match="cannot read"):
        load_rgb(b"definitely not an image")
    with pytest.raises(ImageError, match="more than the limit"):
        load_rgb(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=5000)
    with pytest.raises(ImageError, match="shape"):
        load_rgb(np.zeros((2, 2, 5), np.uint8))


def test_empty_vocabulary(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        Segmenter(tiny_model, SMALL).predict(rgb(64, 64), [])
    with pytest.raises(ValueError, match="class 2 has no name"):
        Vocabulary.from_names(["cat", " , "])
    with pytest.raises(ValueError, match=re.escape("class 2 ('dog|') has an empty name or synonym")):
        Vocabulary((("cat",), ("dog", "")))


def test_text_embeddings_are_cached_and_normalized(tiny_model, monkeypatch):
    cache = MemoryCache()
    embedder = TextEmbedder(tiny_model, cache)
    calls = []
    original = tiny_model.encode_text
    monkeypatch.setattr(tiny_model, "encode_text", lambda prompts: calls.append(len(prompts)) or original(prompts))
    first = embedder.embed_queries(["cat", "dog", "cat"])
    assert calls == [160] and len(cache) == 2  # 80 templates, each query once
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(3))
    assert torch.equal(first[0], first[2])
    second = embedder.embed_queries(["dog", "bird"])
    assert calls == [160, 80]
    assert torch.equal(second[0], first[1])
    # the average of normalized template embeddings, normalized again
    prompts = [t("bird") for t in embedder.templates]
    expected = torch.nn.functional.normalize(original(prompts).mean(0), dim=-1)
    torch.testing.assert_close(second[1], expected)


@pytest.mark.parametrize("damaged", ["nan", "inf", "narrow", "matrix"])
def test_a_damaged_cached_embedding_is_computed_again(tiny_model, damaged):
    """A cache shared through Redis or a folder may hold a foreign or damaged entry: a NaN one
    would make every pixel score NaN against its class, silently. Only that entry: the good ones
    beside it are checked in the same pass and kept."""
    width = tiny_model.visual.output_dim
    fresh = TextEmbedder(tiny_model, MemoryCache()).embed_queries(["cat"])[0]
    cache = MemoryCache()
    embedder = TextEmbedder(tiny_model, cache)
    embedder.embed_queries(["dog", "bird"])
    cache.put(embedder.cache_key("cat"), {"nan": torch.full((width,), float("nan")),
                                          "inf": torch.full((width,), float("inf")),
                                          "narrow": torch.ones(width - 1), "matrix": torch.ones(2, width)}[damaged])
    assert embedder.missing(["dog", "cat", "bird"]) == ["cat"]
    torch.testing.assert_close(embedder.embed_queries(["cat"])[0], fresh)
    torch.testing.assert_close(cache.get(embedder.cache_key("cat")), fresh.cpu())  # written again
    assert embedder.missing(["cat"]) == []


def test_text_embedder_names_what_it_still_has_to_compute(tiny_model):
    embedder = TextEmbedder(tiny_model, MemoryCache(), prompts_per_batch=400)
    assert embedder.queries_per_batch == 5  # 400 prompts, 80 templates each
    assert TextEmbedder(tiny_model, prompts_per_batch=10).queries_per_batch == 1
    embedder.embed_queries(["dog"])
    assert embedder.missing(["cat", "dog", "bird", "cat"]) == ["cat", "bird"]
    embedder.embed_queries(["cat", "bird"])
    assert embedder.missing(["cat", "dog", "bird"]) == []


def test_memory_cache_is_lru():
    cache = MemoryCache(max_entries=2)
    cache.put("a", torch.zeros(1))
    cache.put("b", torch.ones(1))
    cache.get("a")
    cache.put("c", torch.ones(1))
    assert cache.get("b") is None and cache.get("a") is not None


@pytest.mark.parametrize("size, expected", [((90, 130), (64, 92)), ((40, 30), (85, 64)), ((64, 70), (64, 70))])
def test_prepare_equals_normalizing_at_full_size_then_resizing(tiny_model, size, expected):
    image = rgb(*size, seed=5)
    got = Segmenter(tiny_model, SegmenterConfig(short_side=64)).prepare(image)
    assert got.shape == (3, *expected) and got.dtype == torch.float32
    full = torch.from_numpy(image).permute(2, 0, 1).double() / 255.0
    mean = torch.tensor(tiny_model.image_mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(tiny_model.image_std, dtype=torch.float64).view(3, 1, 1)
    reference = (full - mean) / std
    if expected != size:
        reference = torch.nn.functional.interpolate(reference[None], size=expected, mode="bilinear",
                                                    align_corners=False, antialias=True)[0]
    torch.testing.assert_close(got.double(), reference, rtol=0, atol=5e-5)  # float32 arithmetic


@pytest.mark.parametrize("size, expected", [
    ((3000, 4000), (336, 448)),  # a photo: short side 336
    ((100, 1600), (336, 5376)),  # 1:16, the thinnest kept at short side 336
    ((336, 5376), (336, 5376)),
    ((100, 3200), (168, 5376)),  # 1:32: long side 16 x 336, short side less
    ((1, 3000), (2, 5376)),  # a banner's row: 336 x 1,008,000 at short side 336
    ((3000, 1), (5376, 2)),
    ((20, 400_000), (1, 5376)),  # within --max-pixels; a short side of at least one pixel
])
def test_working_size_keeps_the_short_side_unless_the_long_one_passes_16_times_it(tiny_model, size, expected):
    assert Segmenter(tiny_model, SegmenterConfig(short_side=336)).working_size(size) == expected
    assert Segmenter(tiny_model, SegmenterConfig(short_side=None)).working_size(size) == size


@pytest.mark.parametrize("window", [64, None])
def test_a_stripe_is_segmented_from_a_bounded_number_of_crops(tiny_model, monkeypatch, window):
    # at short side 80 this 2x400 stripe would be 80 x 16,000 pixels: 499 crops of 64
    config = SegmenterConfig(short_side=80, window=window, stride=32, batch_size=64, encoder=RFCLIPConfig(sigma=1.5))
    crops, original = [], tiny_model.encode_dense

    def counting(pixels, config):
        crops.append(tuple(pixels.shape))
        return original(pixels, config)

    monkeypatch.setattr(tiny_model, "encode_dense", counting)
    pred = Segmenter(tiny_model, config).predict(rgb(2, 400), ["cat", "dog"])
    assert pred.label_map.shape == (2, 400) and int(pred.pixel_counts.sum()) == 800
    assert pred.logits.shape[-2:] == (6, 1280)  # long side 16 x 80
    if window is None:
        assert crops == [(1, 3, 16, 1280)]  # padded to the patch size
    else:
        assert sum(n for n, *_ in crops) == 39  # one row of windows of 64 every 32 along 1280


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and header only: enough to open, nothing to decode."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return header + struct.pack(">I", 0) + b"IDAT" + struct.pack(">I", zlib.crc32(b"IDAT"))  # Pillow stops here


def test_transparency_is_composited_exactly_in_integers():
    rng = np.random.default_rng(3)
    for channels in (2, 4):
        array = rng.integers(0, 256, (600, 7, channels), dtype=np.uint8)  # more rows than one band
        alpha = array[..., -1:].astype(np.float64) / 255.0
        color = array[..., :1].repeat(3, -1) if channels == 2 else array[..., :3]
        expected = np.round(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        assert np.array_equal(load_rgb(array), expected)


def test_pixel_limits_are_checked_from_the_header():
    with pytest.raises(ImageError, match="more than the limit of 50000000"):
        load_rgb(png_header(10_000, 6_000), max_pixels=50_000_000)  # 60 MP: below Pillow's own guard
    with pytest.raises(ImageError, match="decompression-bomb limit"):
        load_rgb(png_header(20_000, 20_000), max_pixels=None)


def test_a_large_jpeg_is_decoded_reduced_with_its_full_size():
    from rfclip_engine.imageio import read_rgb

    big = encode(Image.fromarray(rgb(1500, 2000)), "JPEG", quality=90)
    reduced, size = read_rgb(big, min_short_side=336)
    assert size == (1500, 2000) and reduced.shape == (375, 500, 3)  # 1/4 in the decoder
    full, size = read_rgb(big)
    assert size == (1500, 2000) and full.shape == (1500, 2000, 3)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = encode(Image.fromarray(rgb(1500, 2000)), "JPEG", exif=exif.tobytes())
    reduced, size = read_rgb(turned, min_short_side=336)
    assert size == (2000, 1500) and reduced.shape == (500, 375, 3)
    small, size = read_rgb(encode(Image.fromarray(rgb(600, 800)), "JPEG"), min_short_side=336)
    assert size == (600, 800) and small.shape == (600, 800, 3)  # less than twice the working size: as it is


@pytest.mark.parametrize("window", [64, None])
@pytest.mark.parametrize("kernels_checked", [True, False])
def test_warm_up_runs_one_full_batch_of_crops_where_a_first_forward_does_more(tiny_model, monkeypatch, window,
                                                                                 kernels_checked):
    """What a server runs once after loading, where the first forward compiles and checks the
    kernels (as on a GPU; here `kernels.usable` stands in for one): a forward of `batch_size`
    crops of the window's size (whole images have no fixed shape, so none then), without
    autograd. On the CPU a first forward is like any other: none."""
    from rfclip_engine import kernels

    monkeypatch.setattr(kernels, "usable", lambda device, tokens, capability=None: kernels_checked)
    config = SegmenterConfig(short_side=80, window=window, stride=32, batch_size=3, encoder=RFCLIPConfig(sigma=1.5))
    segmenter = Segmenter(tiny_model, config)
    seen = []
    monkeypatch.setattr(segmenter, "encoder", lambda pixels, cfg: seen.append(
        (tuple(pixels.shape), torch.is_inference_mode_enabled(), cfg)) or torch.zeros(pixels.shape[0], 16, 32))
    segmenter.warm_up()
    assert seen == ([((3, 3, 64, 64), True, config.encoder)] if window and kernels_checked else [])
