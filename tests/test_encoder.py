"""The encoder against open_clip's own forward and hand computations from the block weights."""
import pytest
import torch

from rfclip_engine import RFCLIPConfig, load_model
from rfclip_engine import model as rfclip_model
from rfclip_engine.presets import find_preset
from rfclip_engine.steps import bipartition, fiedler_vector, find_defocused_tokens

from .conftest import TINY_DIMS


def open_clip_tokens(model, pixels):
    """open_clip's own vision forward: ln_post(tokens) @ proj on the patch grid."""
    visual = model.visual
    visual.output_tokens = True
    try:
        _, tokens = visual(pixels)
    finally:
        visual.output_tokens = False
    g = pixels.shape[-1] // model.patch_size
    return (tokens @ visual.proj).reshape(pixels.shape[0], pixels.shape[-2] // model.patch_size, g, -1)


@torch.no_grad()
def test_clip_mode_equals_open_clip_tiny(tiny_model):
    pixels = torch.randn(3, 3, 64, 64)
    ours = tiny_model.encode_dense(pixels, RFCLIPConfig(mode="clip"))
    torch.testing.assert_close(ours, open_clip_tokens(tiny_model, pixels), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-L-14"])
@torch.no_grad()
def test_clip_mode_equals_open_clip_full_size(name):
    torch.manual_seed(0)
    model = load_model(name, pretrained=None)
    pixels = torch.randn(1, 3, 224, 224)
    ours = model.encode_dense(pixels, RFCLIPConfig(mode="clip"))
    assert ours.shape == (1, 224 // model.patch_size, 224 // model.patch_size, model.visual.output_dim)
    torch.testing.assert_close(ours, open_clip_tokens(model, pixels), rtol=0, atol=1e-5)


def reference_stream(model, pixels):
    """Inputs of every block, run by open_clip's own embedding and blocks, in float64."""
    visual = model.visual.double()
    try:
        x = visual._embeds(pixels.double())
        inputs = []
        for block in visual.transformer.resblocks:
            inputs.append(x)
            x = block(x)
        return inputs
    finally:
        model.visual.float()


def hand_qkv(block, x):
    c = x.shape[-1]
    heads = block.attn.num_heads
    a = torch.nn.functional.layer_norm(x, (c,), block.ln_1.weight.double(), block.ln_1.bias.double(), block.ln_1.eps)
    w, b = block.attn.in_proj_weight.double(), block.attn.in_proj_bias.double()
    parts = [a @ w[i * c:(i + 1) * c].T + b[i * c:(i + 1) * c] for i in range(3)]
    return [p.reshape(x.shape[0], x.shape[1], heads, -1).permute(0, 2, 1, 3) for p in parts]


def hand_head(model, mixed, grid):
    """The last block's output projection on the per-head mixed patch values, then ln_post and proj."""
    visual = model.visual
    out_proj = visual.transformer.resblocks[-1].attn.out_proj
    mixed = mixed.permute(0, 2, 1, 3).reshape(mixed.shape[0], mixed.shape[2], -1)
    z = mixed @ out_proj.weight.double().T + out_proj.bias.double()
    c = z.shape[-1]
    z = torch.nn.functional.layer_norm(z, (c,), visual.ln_post.weight.double(), visual.ln_post.bias.double(),
                                       visual.ln_post.eps)
    return (z @ visual.proj.double()).reshape(z.shape[0], *grid, -1).float()


@torch.no_grad()
def test_maskclip_equals_hand_computation(tiny_model):
    pixels = torch.randn(2, 3, 64, 64)
    x_last = reference_stream(tiny_model, pixels)[-1]
    block = tiny_model.visual.transformer.resblocks[-1]
    _, _, v = hand_qkv(block, x_last)
    expected = hand_head(tiny_model, v[:, :, 1:], (4, 4))
    ours = tiny_model.encode_dense(pixels, RFCLIPConfig(mode="maskclip"))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_kk_proxy_equals_hand_computation(tiny_model):
    pixels = torch.randn(2, 3, 64, 64)
    inputs = reference_stream(tiny_model, pixels)
    blocks = tiny_model.visual.transformer.resblocks
    kk = []
    for block, x in zip(blocks, inputs):
        _, k, _ = hand_qkv(block, x)
        d = k.shape[-1]
        kk.append(torch.softmax(k @ k.transpose(-1, -2) / d ** 0.5, dim=-1)[:, :, 1:, 1:])  # no renormalization
    mean_kk = torch.stack(kk).mean(0)
    _, _, v = hand_qkv(blocks[-1], inputs[-1])
    expected = hand_head(tiny_model, mean_kk @ v[:, :, 1:], (4, 4))
    ours = tiny_model.encode_dense(pixels, RFCLIPConfig(mode="kk-proxy"))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_rfclip_without_distraction_tokens_is_kk_proxy(tiny_model):
    pixels = torch.randn(2, 3, 64, 64)
    kk = tiny_model.encode_dense(pixels, RFCLIPConfig(mode="kk-proxy"))
    rf = tiny_model.encode_dense(pixels, RFCLIPConfig(mode="rfclip", sigma=1e9))
    # the same arithmetic up to GEMM blocking: rfclip's attention is explicit, kk-proxy's fused
    torch.testing.assert_close(rf, kk, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_each_step_switch_changes_the_output(tiny_model):
    pixels = torch.randn(1, 3, 64, 64)
    base = dict(mode="rfclip", sigma=1.5)
    outputs = {
        name: tiny_model.encode_dense(pixels, RFCLIPConfig(**base, **switches))
        for name, switches in {
            "all": {},
            "no-embed": {"embedding_redistribution": False},
            "no-attn": {"attention_redistribution": False},
            "no-defocus": {"defocus_localization": False},
        }.items()
    }
    kk = tiny_model.encode_dense(pixels, RFCLIPConfig(mode="kk-proxy"))
    names = list(outputs) + ["kk"]
    values = list(outputs.values()) + [kk]
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            assert not torch.allclose(values[i], values[j]), (names[i], names[j])
    off = RFCLIPConfig(**base, embedding_redistribution=False, attention_redistribution=False)
    assert torch.equal(tiny_model.encode_dense(pixels, off), kk)


@torch.no_grad()
def test_embedding_repair_persists_in_the_residual_stream(tiny_model):
    """Reading 2: block l runs on the repaired input, and its output carries the repair on."""
    from rfclip_engine.steps import find_distraction_tokens, redistribute_embeddings

    pixels = torch.randn(1, 3, 64, 64)
    seen = {}
    config = RFCLIPConfig(mode="rfclip", sigma=1.5, attention_redistribution=False)
    tiny_model.encode_dense(pixels, config, on_block_input=lambda i, x: seen.setdefault(i, x.clone()))
    dims = torch.tensor(TINY_DIMS)
    x0 = seen[0]
    dis = find_distraction_tokens(x0[:, 1:], dims, 1.5)
    assert dis.any()
    repaired = torch.cat([x0[:, :1], redistribute_embeddings(x0[:, 1:], dis, dims, (4, 4))], dim=1)
    expected_next = tiny_model.visual.transformer.resblocks[0](repaired)
    torch.testing.assert_close(seen[1], expected_next, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_attention_test_wiring(tiny_model):
    pixels = torch.randn(1, 3, 64, 64)
    kk = tiny_model.encode_dense(pixels, RFCLIPConfig(mode="kk-proxy"))
    # no token can receive more than all of the attention: nothing is a distraction token
    gated = RFCLIPConfig(mode="rfclip", sigma=1.5, attention_test=True, attention_threshold=1.0)
    torch.testing.assert_close(tiny_model.encode_dense(pixels, gated), kk, rtol=1e-5, atol=1e-5)
    ungated = RFCLIPConfig(mode="rfclip", sigma=1.5, attention_test=False)
    assert not torch.allclose(tiny_model.encode_dense(pixels, ungated), kk)


def test_presets():
    b16, l14 = find_preset("ViT-B-16", "openai"), find_preset("ViT-L-14-quickgelu", "openai")
    assert b16.dims == (4, 162, 189, 326, 429, 474, 633, 713) and not b16.attention_test
    assert l14.dims == (250, 261, 437, 650, 720, 779, 936, 1005) and l14.attention_test
    assert find_preset("ViT-B-16", "laion2b_s34b_b88k") is None


def test_missing_dims_is_a_clear_error():
    from .conftest import TINY_CONFIG

    model = load_model(TINY_CONFIG, pretrained=None)
    with pytest.raises(ValueError, match="rfclip calibrate"):
        model.encode_dense(torch.randn(1, 3, 64, 64), RFCLIPConfig())
    # modes without refocusing need no dimensions
    assert model.encode_dense(torch.randn(1, 3, 64, 64), RFCLIPConfig(mode="kk-proxy")).shape == (1, 4, 4, 32)


@torch.no_grad()
def test_positional_embedding_interpolation(tiny_model):
    grid = (3, 5)
    pos = tiny_model._positional_embedding(grid)
    model_pos = tiny_model.visual.positional_embedding
    assert torch.equal(pos[0], model_pos[0])
    patch = model_pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos[1:], expected.permute(0, 2, 3, 1).reshape(15, -1))


@pytest.mark.parametrize("mode", ["clip", "rfclip"])
def test_output_is_an_ordinary_tensor(mode, tiny_model):
    """The blocks run in inference mode; what a caller gets back must not be an inference tensor,
    which could not be modified in place outside it."""
    dense = tiny_model.encode_dense(torch.randn(2, 3, 64, 64), RFCLIPConfig(mode=mode))
    assert not dense.is_inference()
    before = dense.clone()
    dense.mul_(2)
    torch.testing.assert_close(dense, 2 * before)


def test_bad_pixels_shape(tiny_model):
    with pytest.raises(ValueError, match="multiples of the patch size"):
        tiny_model.encode_dense(torch.randn(1, 3, 60, 64))


def preset_vit_b16():
    torch.manual_seed(0)
    return load_model("ViT-B-16", pretrained=None, distraction_dims=list(find_preset("ViT-B-16", "openai").dims))


def scene(batch, size, seed):
    """A flat background with a disc of another colour in each image, plus a little noise: an
    image with a foreground to cut. Through random ViT-B/16 weights the similarity's lambda2 then
    stands at least 2 % (of 1 - lambda2) clear of lambda3 in every block."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 1, 1, generator=g).expand(-1, -1, size, size).clone()
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for image in images:
        cy, cx, r = torch.randint(size // 4, 3 * size // 4, (3,), generator=g).tolist()
        image[:, (yy - cy) ** 2 + (xx - cx) ** 2 < (0.8 * r) ** 2] = torch.randn(3, 1, generator=g)
    return images + 0.1 * torch.randn(images.shape, generator=g)


@pytest.mark.parametrize("model_name, size", [
    ("ViT-B-16", 224),
    ("tiny", 64),  # a 4x4 grid has fewer tokens than the solver has steps
])
@pytest.mark.parametrize("seed", [0, 1])
@torch.no_grad()
def test_lanczos_and_exact_solvers_encode_alike(model_name, size, seed, tiny_model):
    model = tiny_model if model_name == "tiny" else preset_vit_b16()
    pixels = scene(3, size, seed)
    fast = model.encode_dense(pixels, RFCLIPConfig(sigma=1.5))
    exact = model.encode_dense(pixels, RFCLIPConfig(sigma=1.5, fiedler_solver="exact"))
    torch.testing.assert_close(fast, exact, rtol=0, atol=1e-6)
    unfocused = model.encode_dense(pixels, RFCLIPConfig(sigma=1.5, defocus_localization=False))
    assert not torch.allclose(fast, unfocused)  # the partition does shape the output


@pytest.mark.parametrize("mode", ["kk-proxy", "rfclip"])
@torch.no_grad()
def test_crop_ranges_do_not_change_the_result(mode, tiny_model):
    model = preset_vit_b16()
    pixels = scene(5, 224, 0)
    whole = model.encode_dense(pixels, RFCLIPConfig(mode=mode, sigma=1.5, attention_chunk_mb=1e6))
    for chunk_mb in (0.1, 4.0):  # one crop at a time; two, then the odd one
        ranged = model.encode_dense(pixels, RFCLIPConfig(mode=mode, sigma=1.5, attention_chunk_mb=chunk_mb))
        # the same arithmetic up to GEMM blocking, which depends on the batch
        torch.testing.assert_close(ranged, whole, rtol=1e-5, atol=1e-5)


def test_crop_ranges_cover_the_batch_once():
    from rfclip_engine.model import crop_parts

    assert crop_parts(5, 197, 12, torch.device("cpu"), 4.0) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert crop_parts(5, 197, 12, torch.device("cpu"), 0.01) == [slice(i, i + 1) for i in range(5)]
    assert crop_parts(5, 197, 12, torch.device("cuda"), None) == [slice(0, 5)]
    with pytest.raises(ValueError, match="attention_chunk_mb"):
        RFCLIPConfig(attention_chunk_mb=0)


def fake_sysfs_cache(root, levels):
    root.mkdir()
    for index, (level, size) in enumerate(levels):
        entry = root / f"index{index}"
        entry.mkdir()
        (entry / "level").write_text(f"{level}\n")
        (entry / "size").write_text(f"{size}\n")
    return root


def test_last_level_cache_read_from_sysfs(tmp_path):
    read = rfclip_model._last_level_cache_bytes.__wrapped__  # uncached
    xeon = fake_sysfs_cache(tmp_path / "xeon", [(1, "48K"), (1, "32K"), (2, "2048K"), (3, "266240K")])
    assert read(xeon) == 266240 * 2 ** 10
    assert read(fake_sysfs_cache(tmp_path / "m", [(2, "1M"), (3, "32M")])) == 32 * 2 ** 20
    assert read(fake_sysfs_cache(tmp_path / "odd", [(2, "512K"), (3, "unknown")])) == 512 * 2 ** 10
    assert read(tmp_path / "missing") == 0


@pytest.mark.parametrize("cache_mb, cpus, threads, chunk_mb, parts_of_8", [
    (260, 2, 2, 32.5, 1),  # the Xeon of benchmarks/RESULTS.md: the backend's 8 crops in one range
    (260, 2, 1, 16.25, 1),  # one of two single-thread workers there
    (260, 64, 4, 4.0, 4),  # one of many workers on a big host: its share is small
    (32, 2, 2, 4.0, 4),  # the EPYC VM of run E, where ranges of 2 crops measured best
    (0, 2, 2, 4.0, 4),  # cache size unknown
])
def test_cpu_range_of_attention_follows_the_cache_share(cache_mb, cpus, threads, chunk_mb, parts_of_8, monkeypatch):
    monkeypatch.setattr(rfclip_model, "_last_level_cache_bytes", lambda: cache_mb * 2 ** 20)
    monkeypatch.setattr(rfclip_model.os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(rfclip_model.torch, "get_num_threads", lambda: threads)
    assert rfclip_model.cpu_chunk_mb() == pytest.approx(chunk_mb)
    assert len(rfclip_model.crop_parts(8, 197, 12, torch.device("cpu"), None)) == parts_of_8


def normalized_cut(weights, part):
    """Shi and Malik's Ncut(A, B) = cut/assoc(A) + cut/assoc(B), in float64."""
    a = part.double()
    cut = torch.einsum("bi,bij,bj->b", a, weights, 1 - a)
    degree = weights.sum(-1)
    return cut / (a * degree).sum(-1) + cut / ((1 - a) * degree).sum(-1)


@torch.no_grad()
def test_lanczos_cuts_as_well_as_exact_on_near_degenerate_spectra(monkeypatch):
    """Noise through random weights leaves no foreground: lambda2 and lambda3 come within 0.05 %
    (of 1 - lambda2) of each other, and two quite different cuts are almost equally good. There the
    warm-started solver may pick the other one (here it does, in block 1 of the first image), but
    its cut scores as well as eigh's, and its vector reaches lambda2."""
    model = preset_vit_b16()
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 336, 336)
    solves = []

    def spy(similarity, distraction, solver, start, triton_kernel):
        solves.append(((similarity + similarity.transpose(-1, -2)) / 2, start))
        return find_defocused_tokens(similarity, distraction, solver, start, triton_kernel)

    monkeypatch.setattr(rfclip_model, "find_defocused_tokens", spy)
    model.encode_dense(pixels, RFCLIPConfig(sigma=1.5))
    assert len(solves) == len(model.visual.transformer.resblocks) - 1
    differs = 0
    for weights, start in solves:
        fast = fiedler_vector(weights, "lanczos", start)
        exact = fiedler_vector(weights, "exact")
        differs += int((bipartition(fast) != bipartition(exact)).sum())
        w = weights.double()
        inv_sqrt_degree = w.sum(-1).rsqrt()
        normalized = inv_sqrt_degree[:, :, None] * w * inv_sqrt_degree[:, None, :]
        eigenvalues = torch.linalg.eigvalsh(normalized)
        u = torch.nn.functional.normalize(fast.double() / inv_sqrt_degree, dim=-1)
        ritz = torch.einsum("bi,bij,bj->b", u, normalized, u)
        lambda2 = eigenvalues[:, -2]
        assert ((lambda2 - ritz) / (1 - lambda2)).max() < 1e-2
        ratio = normalized_cut(w, bipartition(fast)) / normalized_cut(w, bipartition(exact))
        assert ratio.max() < 1.01
    assert differs > 0  # the case this test is about did occur


@pytest.mark.parametrize("model_name", ["tiny", "ViT-B-16"])
@torch.no_grad()
def test_text_encoding_cut_at_end_of_text_equals_open_clip(model_name, tiny_model):
    model = tiny_model if model_name == "tiny" else preset_vit_b16()
    prompts = ["a photo of a cat.", "a bad photo of the traffic light, stop light.", "dog",
               " ".join(["a very long prompt"] * 30)]  # past the 77-token context: cut by the tokenizer
    tokens = model.tokenizer(prompts)
    assert tokens.argmax(dim=-1).max() == model.clip.context_length - 1
    expected = torch.nn.functional.normalize(model.clip.encode_text(tokens), dim=-1)
    torch.testing.assert_close(model.encode_text(prompts), expected, rtol=0, atol=2e-6)
    # short prompts alone run a much shorter context, with the same result
    torch.testing.assert_close(model.encode_text(prompts[:3]), expected[:3], rtol=0, atol=2e-6)
