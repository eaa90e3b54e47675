"""DenseEncoder on the CPU. Its graph cache: recording is CUDA's, so a stand-in records a graph
whose replay runs the forward on the graph's own input buffer into its output buffer, as a
CUDA graph does; what is checked is the rest: batches padded to a few sizes, the padding's
outputs dropped, graphs kept and evicted. Its autocast: the weights' copy in the autocast type,
and the warning where the CPU would emulate that type."""
import logging

import pytest
import torch

from rfclip_engine import RFCLIPConfig
from rfclip_engine.config import images_per_batch
from rfclip_engine import graphs
from rfclip_engine.graphs import DenseEncoder, graph_batch

from .test_encoder import scene

CONFIG = RFCLIPConfig(sigma=1.5, triton_kernels=False)


@pytest.mark.parametrize("crops, batch", [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 16), (24, 32), (32, 32)])
def test_graph_batches_are_powers_of_two_at_least_the_crops(crops, batch):
    assert graph_batch(crops) == batch


@pytest.fixture
def recorded(tiny_model, monkeypatch):
    """An encoder on the graph path, with the batch of each graph it records."""
    encoder = DenseEncoder(tiny_model, cuda_graphs=True, max_graphs=2)
    batches = []

    class Replay:
        def __init__(self, static_input, config, static_output):
            self.args = static_input, config, static_output

        def replay(self):
            static_input, config, static_output = self.args
            static_output.copy_(encoder._forward(static_input, config))

    def record(pixels, config):
        batches.append(pixels.shape[0])
        static_input = pixels.clone()
        static_output = encoder._forward(static_input, config)
        return static_input, Replay(static_input, config, static_output), static_output

    monkeypatch.setattr(encoder, "_replays", lambda pixels: True)
    monkeypatch.setattr(encoder, "_record", record)
    return encoder, batches


@torch.no_grad()
def test_partial_batches_replay_the_graph_of_their_power_of_two(tiny_model, recorded):
    encoder, batches = recorded
    for seed, crops in enumerate([3, 4, 3, 1, 2, 1, 2, 4]):
        pixels = scene(crops, 64, seed)
        features = encoder(pixels, CONFIG)
        torch.testing.assert_close(features, tiny_model.encode_dense(pixels, CONFIG), rtol=1e-5, atol=1e-5)
    # 3 crops: the 4's first use, plain; 4: recorded; 3: replayed. 1 and 2: plain, then recorded,
    # the 2's evicting the 4's (two kept), whose shape is remembered: recorded again at once
    assert batches == [4, 1, 2, 4]
    assert [key[0][0] for key in encoder._graphs] == [2, 4]


@torch.no_grad()
def test_a_shape_used_once_is_never_recorded(tiny_model, recorded, monkeypatch):
    """Whole images of many sizes: each shape runs plain, with no graph recorded for it; a shape
    comes back for recording only while it is among the last SHAPES_REMEMBERED."""
    encoder, batches = recorded
    monkeypatch.setattr(graphs, "SHAPES_REMEMBERED", 2)
    sizes = [(64, 64), (48, 64), (64, 48), (64, 64), (48, 64), (48, 64)]
    for seed, (height, width) in enumerate(sizes):
        pixels = scene(1, 64, seed)[..., :height, :width]
        torch.testing.assert_close(encoder(pixels, CONFIG), tiny_model.encode_dense(pixels, CONFIG),
                                   rtol=1e-5, atol=1e-5)
    # 64x64 and 48x64 were forgotten by their second use (two other shapes came between): plain
    # again; 48x64's third use came right after its second: recorded
    assert batches == [1] and [key[0] for key in encoder._graphs] == [(1, 3, 48, 64)]


@torch.no_grad()
def test_a_replay_returns_its_own_crops_not_the_next_ones(tiny_model, recorded):
    encoder, _ = recorded
    first = encoder(scene(3, 64, 0), CONFIG)
    kept = first.clone()
    encoder(scene(3, 64, 1), CONFIG)
    assert first.shape[0] == 3 and torch.equal(first, kept)


@pytest.mark.parametrize("batch_size", [8, 16, 32, 64, 128])
def test_a_group_of_4_3_images_pads_nothing(batch_size):
    """The backend's groups of images at its batch sizes: 6 crops per 4:3 image at the default
    short side make full batches and one power of two, so graphs pad none of them."""
    crops = 6 * images_per_batch(batch_size)
    rest = crops % batch_size
    assert crops >= batch_size and (rest == 0 or graph_batch(rest) == rest)


def test_small_batches_still_group_four_images():
    assert [images_per_batch(b) for b in (1, 8, 16, 32)] == [4, 4, 4, 8]


@pytest.mark.parametrize("mode", ["clip", "rfclip"])
def test_an_autocast_encoder_stores_its_matmul_weights_cast_and_computes_what_autocast_does(tiny_model, mode):
    config = RFCLIPConfig(mode=mode, sigma=1.5, triton_kernels=False)
    encoder = DenseEncoder(tiny_model, torch.bfloat16)
    pixels = scene(3, 64, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        expected = tiny_model.encode_dense(pixels, config)
    assert torch.equal(encoder(pixels, config), expected)

    twin, visual = encoder.model.visual, tiny_model.visual
    block, original = twin.transformer.resblocks[0], visual.transformer.resblocks[0]
    cast = [twin.proj, twin.conv1.weight, block.attn.in_proj_weight, block.attn.in_proj_bias,
            block.attn.out_proj.weight, block.mlp.c_fc.weight, block.mlp.c_proj.bias]
    assert {t.dtype for t in cast} == {torch.bfloat16}
    # the model itself is left as it was, and what autocast does not cast is shared, not copied
    assert {p.dtype for p in tiny_model.parameters()} == {torch.float32}
    assert twin.ln_pre.weight is visual.ln_pre.weight and block.ln_1.bias is original.ln_1.bias
    assert twin.positional_embedding is visual.positional_embedding
    assert encoder.model.clip.transformer is not tiny_model.clip.transformer
    assert encoder.model.clip.token_embedding.weight is tiny_model.clip.token_embedding.weight
    assert DenseEncoder(tiny_model).model is tiny_model


@pytest.mark.parametrize("amx, dtype, warned", [(False, torch.bfloat16, True), (True, torch.bfloat16, False),
                                                (False, None, False)])
def test_low_precision_on_a_cpu_that_emulates_it_is_warned_of(tiny_model, caplog, monkeypatch, amx, dtype, warned):
    caplog.set_level(logging.WARNING, logger="rfclip_engine.graphs")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    DenseEncoder(tiny_model, dtype)
    assert ("bfloat16 autocast on a CPU without AMX for it" in caplog.text) == warned
    # a torch that cannot tell says nothing
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    caplog.clear()
    DenseEncoder(tiny_model, dtype)
    assert "without AMX" not in caplog.text
