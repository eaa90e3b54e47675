"""The engine on the device named by RFCLIP_TEST_DEVICE (default: cpu), against float32 on the CPU.

CI runs these on the CPU; `benchmarks/gpu_check.sh` runs the same file with
RFCLIP_TEST_DEVICE=cuda on a lent GPU, so the CUDA paths are the tested code, not a copy."""
import copy
import logging
import os

import numpy as np
import pytest
import torch

from rfclip_engine import RFCLIPConfig, Segmenter, SegmenterConfig, Vocabulary
from rfclip_engine.config import autocast_dtype
from rfclip_engine.graphs import DenseEncoder
from rfclip_engine.steps import bipartition, fiedler_vector

from .test_encoder import open_clip_tokens, scene

DEVICE = torch.device(os.environ.get("RFCLIP_TEST_DEVICE", "cpu"))
# autocast's half type there: fp16 on CUDA (the segmenter's default), bf16 on the CPU
HALF = "fp16" if DEVICE.type == "cuda" else "bf16"


@pytest.fixture(scope="module")
def models(tiny_model):
    """The tiny model on the CPU (the reference) and a copy on the device."""
    return tiny_model, copy.deepcopy(tiny_model).to(DEVICE)


@torch.no_grad()
def test_clip_mode_equals_open_clip_on_the_device(models):
    _, model = models
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    torch.testing.assert_close(model.encode_dense(pixels, RFCLIPConfig(mode="clip")),
                               open_clip_tokens(model, pixels), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["maskclip", "kk-proxy", "rfclip"])
@torch.no_grad()
def test_dense_features_on_the_device_equal_the_cpu(models, mode):
    reference, model = models
    pixels = scene(4, 64, 0)
    config = RFCLIPConfig(mode=mode, sigma=1.5)
    torch.testing.assert_close(model.encode_dense(pixels.to(DEVICE), config).cpu(),
                               reference.encode_dense(pixels, config), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("half", [False, True])
@torch.no_grad()
def test_the_triton_kernels_encode_as_the_eager_steps_on_the_device(models, half):
    """On a GPU, steps 1-4 as Triton kernels against the eager steps on the same device (float32:
    steps 1-3; under autocast also the key-key sum and step 4); on the CPU both are the eager steps."""
    _, model = models
    pixels = scene(4, 64, 2).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=autocast_dtype(HALF), enabled=half):
        fused = model.encode_dense(pixels, RFCLIPConfig(sigma=1.5)).float()
        eager = model.encode_dense(pixels, RFCLIPConfig(sigma=1.5, triton_kernels=False)).float()
    relative = (torch.linalg.vector_norm(fused - eager) / torch.linalg.vector_norm(eager)).item()
    assert relative < (5e-3 if half else 1e-4)


@torch.no_grad()
def test_the_fiedler_solvers_cut_alike_on_the_device():
    g = torch.Generator().manual_seed(3)
    # two clusters of tokens, similar inside, a little noise across
    labels = torch.rand(6, 80, generator=g) < 0.4
    similarity = 0.2 + 0.6 * (labels[:, :, None] == labels[:, None, :]).float()
    similarity = similarity + 0.05 * torch.rand(6, 80, 80, generator=g)
    similarity = ((similarity + similarity.transpose(1, 2)) / 2).to(DEVICE)
    exact = bipartition(fiedler_vector(similarity, "exact"))
    fast = bipartition(fiedler_vector(similarity, "lanczos"))
    assert torch.equal(fast, exact)
    assert torch.equal(exact.cpu(), bipartition(fiedler_vector(similarity.cpu(), "exact")))


@torch.no_grad()
def test_autocast_features_and_labels_stay_close_to_float32(models):
    _, model = models
    pixels = scene(4, 64, 1).to(DEVICE)
    config = RFCLIPConfig(sigma=1.5)
    full = model.encode_dense(pixels, config)
    dtype = autocast_dtype(HALF)
    with torch.autocast(DEVICE.type, dtype=dtype):
        half = model.encode_dense(pixels, config).float()
    assert (torch.linalg.vector_norm(half - full) / torch.linalg.vector_norm(full)).item() < 0.05
    text = torch.nn.functional.normalize(torch.randn(6, full.shape[-1], generator=torch.Generator().manual_seed(2)),
                                         dim=-1).to(DEVICE)
    agree = ((full @ text.T).argmax(-1) == (half @ text.T).argmax(-1)).float().mean().item()
    assert agree > 0.9


def test_the_segmenter_on_the_device_labels_as_on_the_cpu(models):
    reference, model = models
    rng = np.random.default_rng(0)
    image = np.repeat(np.repeat(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), 12, axis=0), 12, axis=1)
    vocabulary = Vocabulary.from_names(["cat", "dog", "grass"])
    config = SegmenterConfig(short_side=64, window=32, stride=16, pamr=True)
    on_cpu = Segmenter(reference, config).predict(image, vocabulary)
    on_device = Segmenter(model, config).predict(image, vocabulary)
    assert on_device.label_map.shape == (72, 96)
    assert (on_device.label_map.cpu() == on_cpu.label_map).float().mean().item() > 0.99
    half = Segmenter(model, SegmenterConfig(short_side=64, window=32, stride=16, precision=HALF)).predict(
        image, vocabulary)
    assert half.label_map.shape == (72, 96) and half.pixel_counts.sum().item() == 72 * 96


@pytest.mark.parametrize("precision", ["fp32", HALF])
@torch.no_grad()
def test_cuda_graph_replays_equal_the_forward(models, precision):
    """On CUDA each batch of crops, padded to a power of two, is recorded once and replayed with
    new inputs; elsewhere the plain forward. The padded batch may take other library kernels
    than the plain one (so other rounding), hence a tolerance by precision."""
    _, model = models
    dtype = autocast_dtype(precision)
    config = RFCLIPConfig(sigma=1.5)
    graphed, plain = DenseEncoder(model, dtype, cuda_graphs=True, max_graphs=2), DenseEncoder(model, dtype)
    # the kernel check's call; each batch shape's first use, plain; recorded; replayed with new
    # pixels (3 crops in the 4's graph), another shape, back
    for seed, batch in [(0, 3), (1, 3), (2, 2), (3, 3), (4, 4), (5, 2), (6, 3)]:
        pixels = scene(batch, 64, seed).to(DEVICE)
        replayed, expected = graphed(pixels, config).float(), plain(pixels, config).float()
        assert replayed.shape == expected.shape
        relative = (torch.linalg.vector_norm(replayed - expected) / torch.linalg.vector_norm(expected)).item()
        assert relative < (5e-3 if dtype is not None else 1e-3)
    assert sorted(key[0][0] for key in graphed._graphs) == ([2, 4] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("precision", ["fp32", HALF])
@torch.no_grad()
def test_the_encoders_kernel_check_passes_on_the_device(models, precision, caplog):
    """On CUDA the segmenter's encoder checks the Triton kernels on its first forward of a crop
    shape and keeps them (they agree with the eager steps); elsewhere no kernel runs and nothing
    is checked."""
    _, model = models
    encoder = DenseEncoder(model, autocast_dtype(precision))
    encoder(scene(2, 64, 0).to(DEVICE), RFCLIPConfig(sigma=1.5))
    assert list(encoder._kernel_checks.values()) == ([True] if DEVICE.type == "cuda" else [])
    assert not [r for r in caplog.records if r.name == "rfclip_engine.graphs" and r.levelno >= logging.WARNING]


def test_the_warm_up_checks_the_kernels_on_the_device(models):
    """What a server runs while loading: on CUDA one forward of noise crops that compiles and
    checks the kernels, which pass; on the CPU nothing (a first forward there is like any other)."""
    _, model = models
    config = SegmenterConfig(short_side=64, window=32, stride=16, batch_size=4, precision=HALF,
                             encoder=RFCLIPConfig(sigma=1.5))
    segmenter = Segmenter(model, config)
    segmenter.warm_up()
    checks = [(key[0], passed) for key, passed in segmenter.encoder._kernel_checks.items()]
    assert checks == ([((3, 32, 32), True)] if DEVICE.type == "cuda" else [])
