"""The Triton kernels (CUDA's solver, key-key sum and step 4) against the eager steps, run by
Triton's interpreter on the CPU: the same kernel code, so CI checks what a GPU runs.
test_device.py checks them on CUDA."""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from rfclip_engine import RFCLIPConfig, kernels
from rfclip_engine.kernels import attention, distractors, lanczos
from rfclip_engine.steps import (
    LANCZOS_STEPS,
    attention_probs,
    bipartition,
    fiedler_vector,
    find_defocused_tokens,
    find_distraction_tokens,
    redistribute_attention,
    redistribute_embeddings,
)

from .kernels_interpreted import (
    ATTENTION_CASES,
    DISTRACTOR_CASES,
    SIGMA,
    ENCODER_CONFIG,
    SOLVER_CASES,
    clustered,
    planted_cut,
    projections,
    residual_stream,
    running_sum,
    tiny_model,
)
from .test_encoder import scene


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """The kernel's results, from a process where Triton interprets it."""
    out = tmp_path_factory.mktemp("interpreted") / "results.pt"
    subprocess.run([sys.executable, "-m", "tests.kernels_interpreted", str(out)], check=True, timeout=900,
                   cwd=Path(__file__).parents[1], env={**os.environ, "TRITON_INTERPRET": "1"})
    return torch.load(out)


def aligned(vector: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`vector` with each row's sign turned to agree with `reference` (eigenvectors have no sign)."""
    return vector * torch.sign((vector * reference).sum(-1, keepdim=True))


class OnGPU:
    """Stands for a CUDA tensor (..., tokens, channels): only what `available` reads of one."""

    device = torch.device("cuda", 0)

    def __init__(self, tokens: int, dtype: torch.dtype) -> None:
        self.shape = (1, tokens, 64)
        self.dtype = dtype

    def __getitem__(self, index) -> "OnGPU":  # x[..., 1:, :]: the patch tokens
        return OnGPU(self.shape[-2] - 1, self.dtype)


@pytest.mark.parametrize("capability, patches, dtype, solver, attention_steps", [
    ((6, 1), 196, torch.float16, False, False), ((7, 0), 196, torch.float16, True, False),
    ((7, 5), 196, torch.float16, True, False), ((8, 0), 196, torch.bfloat16, True, True),
    ((9, 0), 256, torch.float16, True, True), ((9, 0), 196, torch.float32, True, False),
    ((9, 0), 257, torch.float16, False, False)])
def test_the_kernels_run_only_where_triton_compiles_them(monkeypatch, capability, patches, dtype, solver,
                                                         attention_steps):
    """Not on the CPU, nor on a GPU older than Volta (a Pascal card keeps the eager steps), nor
    on more patch tokens than registers hold (whole images; a ViT-L/14 window's 256 fit); the
    attention kernels only in half precision and from Ampere on."""
    assert not kernels.available(torch.zeros(1, 4, 4))
    assert not attention.available(torch.zeros(1, 1, 4, 4, dtype=torch.float16))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    assert kernels.available(OnGPU(patches, dtype)) is solver
    assert attention.available(OnGPU(patches + 1, dtype)) is attention_steps  # the CLS token besides


def solver_id(case) -> str:
    return "batch %d, %d tokens, %d steps, contrast %g, " % case[:4] + ("warm" if case[4] else "ramp")


@pytest.mark.parametrize("case", SOLVER_CASES, ids=solver_id)
def test_the_solver_kernel_equals_the_eager_steps(interpreted, case):
    """The Fiedler vector against the eager loop (through fiedler_vector, on the symmetrized
    similarities), and the defocused tokens against find_defocused_tokens: the cut minus the
    distraction tokens, and in the last crop, where they cover the cut, every other token."""
    batch, n, steps, contrast, warm = case
    weights, start, distraction = clustered(batch, n, n + steps, contrast)
    start = start if warm else None
    eager = fiedler_vector((weights + weights.transpose(1, 2)) / 2, "lanczos", start, steps)
    fused, defocused = interpreted[case]
    assert fused.shape == (batch, n) and fused.dtype == torch.float32
    torch.testing.assert_close(aligned(fused, eager), eager, rtol=0, atol=2e-5)
    assert defocused.dtype == torch.bool
    expected = bipartition(eager) & ~distraction
    if contrast > 0:  # converged, the cut is eigh's, which the last crop's distraction tokens cover
        assert not expected[-1].any()
    expected = torch.where(expected.any(dim=-1, keepdim=True), expected, ~distraction)
    assert torch.equal(defocused, expected)
    if steps == LANCZOS_STEPS:
        assert torch.equal(defocused, find_defocused_tokens(weights, distraction, "lanczos", start)[0])


def test_the_kernel_finds_the_fiedler_vector_of_a_planted_cut(interpreted):
    """Through fiedler_vector, against float64 eigh."""
    exact = fiedler_vector(planted_cut().double(), "exact").float()
    cosine = torch.nn.functional.cosine_similarity(interpreted["planted"], exact, dim=-1).abs()
    assert cosine.min().item() > 1 - 1e-5


@torch.no_grad()
def test_the_encoder_with_the_kernel_equals_the_eager_encoder(interpreted):
    """The whole RF-CLIP forward, each block's solver warm-started by the last, as on a GPU."""
    eager = tiny_model().encode_dense(scene(2, 64, 0), ENCODER_CONFIG)
    torch.testing.assert_close(interpreted["encoder"], eager, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_the_encoder_with_every_kernel_equals_the_eager_encoder_in_fp16(interpreted):
    """Under fp16 autocast the key-key and step 4 kernels run beside the solver's."""
    with torch.autocast("cpu", dtype=torch.float16):
        eager = tiny_model().encode_dense(scene(2, 64, 0), ENCODER_CONFIG)
    fused = interpreted["encoder fp16"]
    assert fused.dtype == eager.dtype
    relative = torch.linalg.vector_norm(fused.float() - eager.float()) / torch.linalg.vector_norm(eager.float())
    assert relative.item() < 5e-3
    assert not torch.equal(fused, eager)  # the kernels did run
    # triton_kernels=False: the eager steps, even where the kernels could run
    assert torch.equal(interpreted["encoder fp16, eager steps"], eager)


def test_the_segmenters_encoder_keeps_kernels_that_agree(interpreted):
    """DenseEncoder's check on its first forward, as on a GPU: the kernels, run by the
    interpreter, agree with the eager steps, so they are kept and give its features."""
    checks, features = interpreted["dense encoder"]
    assert checks == [True]
    assert torch.equal(features, interpreted["encoder fp16"])


def test_the_warm_up_checks_the_kernels_and_keeps_them(interpreted):
    """A server's warm-up runs the check on its own noise crops before any image, and the
    kernels pass it."""
    assert interpreted["warm-up"] == [((3, 64, 64), True)]


def case_id(case) -> str:
    return "batch %d, %d heads, %d tokens, head size %d, %s" % (*case[:4], str(case[4]).split(".")[1])


def eager_refocus(q, k, v, distraction, defocused, beta):
    """Step 4 and the values' product as the eager encoder runs them, in float64."""
    attn = redistribute_attention(attention_probs(q.double(), k.double()), distraction, defocused, beta)
    return attn @ v.double()


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=case_id)
def test_the_refocus_kernel_equals_the_explicit_steps(interpreted, case):
    q, k, v, distraction, defocused = projections(*case)
    fused = interpreted["refocus", case]
    assert fused.shape == v.shape and fused.dtype == v.dtype
    expected = eager_refocus(q, k, v, distraction, defocused, 0.4)
    # fp16: the attention is rounded to fp16 before the product with the values, as eagerly
    tolerance = 2e-2
    torch.testing.assert_close(fused.double(), expected, rtol=tolerance, atol=tolerance)
    plain = attention_probs(q.double(), k.double()) @ v.double()
    torch.testing.assert_close(fused[:, :, 0].double(), plain[:, :, 0], rtol=tolerance, atol=tolerance)  # CLS row
    torch.testing.assert_close(fused[-1].double(), plain[-1], rtol=tolerance, atol=tolerance)  # no defocused token
    assert (fused[0, :, 1:].double() - plain[0, :, 1:]).abs().max() > 20 * tolerance  # step 4 did move attention


@pytest.mark.parametrize("head_mean", [True, False])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=case_id)
def test_the_key_key_kernel_adds_what_the_eager_sum_adds(interpreted, case, head_mean):
    _, k, _, _, _ = projections(*case)
    total, similarity = interpreted["key_key", head_mean, case]
    probs = attention_probs(k[:, :, 1:].double(), k.double())[..., 1:]  # the CLS column left out, unrenormalized
    expected = running_sum(*case[:3]).double() + probs
    tolerance = 2e-3
    assert total.dtype == torch.float32
    torch.testing.assert_close(total.double(), expected, rtol=tolerance, atol=tolerance)
    if head_mean:
        torch.testing.assert_close(similarity.double(), expected.mean(dim=1), rtol=tolerance, atol=tolerance)
    else:
        assert similarity is None


@torch.no_grad()
def test_kk_proxy_with_the_kernel_equals_the_eager_encoder(interpreted):
    eager = tiny_model().encode_dense(scene(2, 64, 0), RFCLIPConfig(mode="kk-proxy"))
    torch.testing.assert_close(interpreted["kk-proxy"], eager, rtol=1e-4, atol=1e-4)


def ptxas_report(fn, types: dict, constexprs: dict, capability: int, warps: int = 8) -> dict:
    """The kernel compiled ahead of time for an NVIDIA GPU of this compute capability, as Triton
    compiles it on one (no GPU needed): ptxas's registers and spill bytes per thread."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    kernel = kernels.triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                    target=GPUTarget("cuda", capability, 32), options={"num_warps": warps})
    ptx = Path(tempfile.mkdtemp()) / "kernel.ptx"
    ptx.write_text(kernel.asm["ptx"])
    ptxas = Path(kernels.triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    log = subprocess.run([str(ptxas), f"-arch={arch}", "-v", str(ptx), "-o", os.devnull], check=True,
                         capture_output=True, text=True).stderr
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", log).group(1))}


def attention_builds(dtype: str):
    """(kernel, argument types, constexprs, spill budget) of the attention kernels as they launch."""
    pointers = {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    floats = {"dis_ptr": "*i1", "def_ptr": "*i1", "sum_ptr": "*fp32", "similarity_ptr": "*fp32",
              "scale": "fp32", "beta": "fp32"}
    window = {"NP": 256, "DP": 64}  # up to 256 patch keys (a ViT-L/14 window), heads of 64 channels
    yield (attention._refocus_kernel, {**pointers, **floats}, {**window, "BM": attention.REFOCUS_ROWS}, 0)
    for head_mean in (True, False):
        yield (attention._key_key_kernel, {**pointers, **floats},
               {**window, "BM": attention.KEY_KEY_ROWS, "HEAD_MEAN": head_mean}, 512)


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_the_attention_kernels_compile_for_ampere_and_hopper_within_their_registers(capability, dtype):
    """Compiled as a GPU would compile them: step 4 keeps its tiles in registers; the key-key sum,
    which carries its head mean across the loop over heads, spills a few hundred bytes at most."""
    for kernel, types, constexprs, budget in attention_builds(dtype):
        report = ptxas_report(kernel, types, constexprs, capability)
        assert report["spill_bytes"] <= budget, (kernel.__name__, constexprs, report)


@pytest.mark.parametrize("capability", [70, 80, 90])
def test_the_distractor_kernel_compiles_from_volta_on_without_spilling(capability):
    """Windows of up to 256 tokens of up to 1024 channels (ViT-B/16's 768 are padded to 1024, as
    ViT-L/14's are), 8 distraction dimensions, with and without the attention test."""
    types = {"x_ptr": "*fp32", "dims_ptr": "*i64", "share_ptr": "*fp32", "dis_ptr": "*i1", "threshold": "fp32",
             "attention_threshold": "fp32"}
    for attention_test in (False, True):
        constexprs = {"HAS_SHARE": attention_test, "REPAIR": True, "NP": 256, "CP": 1024, "KP": 8,
                      "BT": distractors.TOKENS_PER_TILE}
        report = ptxas_report(distractors._distractor_kernel, types, constexprs, capability)
        assert report["spill_bytes"] == 0, (constexprs, report)


@pytest.mark.parametrize("capability", [70, 80, 90])
def test_the_solver_kernel_compiles_from_volta_on_without_spilling(capability):
    """The 32-row Krylov basis and the product's tiles stay in registers (the first kernel, a
    64-row basis with an unrolled product, spilled 4 KB a thread on sm_90 and took 197 s to compile)."""
    types = {name: "*fp32" for name in ("s_ptr", "start_ptr", "w_ptr", "x_ptr", "y_ptr")}
    types.update(dis_ptr="*i1", def_ptr="*i1")
    constexprs = {"HAS_START": True, "CUT": True, "NP": 256, "SP": 32, "BR": 16, "SQUARINGS": 24}
    report = ptxas_report(lanczos._fiedler_kernel, types, constexprs, capability)
    assert report["spill_bytes"] == 0, report


def distractor_id(case) -> str:
    batch, grid, channels, k, attention_test, repair = case
    return (f"batch {batch}, grid {grid[0]}x{grid[1]}, {channels} channels, {k} dims"
            + (", attention test" if attention_test else "") + ("" if repair else ", no repair"))


@pytest.mark.parametrize("case", DISTRACTOR_CASES, ids=distractor_id)
def test_the_distractor_kernel_finds_and_repairs_as_the_eager_steps(interpreted, case):
    """The same distraction tokens, and the residual stream repaired in place exactly where the
    eager steps repair it: the distraction dimensions of the distraction tokens, from unrepaired
    3x3 neighbourhoods; the CLS token and every other channel untouched."""
    batch, grid, channels, k, attention_test, repair = case
    x, dims, share = residual_stream(batch, grid, channels, k)
    expected = find_distraction_tokens(x[:, 1:], dims, SIGMA, share if attention_test else None, 0.1)
    flags, repaired = interpreted["distractors", case]
    assert flags.dtype == torch.bool and torch.equal(flags, expected)
    assert 0 < expected.sum() < expected.numel()  # both kinds of token occur
    if repair:
        redistribute_embeddings(x[:, 1:], expected, dims, grid, in_place=True)
    torch.testing.assert_close(repaired, x, rtol=1e-6, atol=1e-6)
    if repair:
        assert not torch.equal(repaired, residual_stream(batch, grid, channels, k)[0])  # the repair did happen


def test_the_attention_kernels_refuse_projections_without_unit_stride_channels():
    """They read each token's channels as one row: a transposed view would be read wrong."""
    q = torch.zeros(1, 2, 8, 17, dtype=torch.float16).transpose(-1, -2)  # (1, 2, 17, 8), channels strided
    masks = torch.zeros(1, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="unit stride"):
        attention.refocused_attention(q, q, q, masks, masks, 0.4)
    with pytest.raises(ValueError, match="unit stride"):
        attention.accumulate_key_key(q, torch.zeros(1, 2, 16, 16), head_mean=True)
