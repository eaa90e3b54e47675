"""The Triton kernels (CUDA's solver, key-key sum and step 4) against the eager steps, run by
Triton's interpreter on the CPU: the same kernel code, so CI checks what a GPU runs.
test_device.py checks them on CUDA."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rfclip_engine import RFCLIPConfig, kernels
from rfclip_engine.steps import _lanczos_loop, attention_probs, bipartition, fiedler_vector, redistribute_attention

from .kernels_interpreted import (
    ATTENTION_CASES,
    ENCODER_CONFIG,
    SOLVER_CASES,
    clustered,
    planted_cut,
    projections,
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
    """Stands for a CUDA tensor of (1, N, N) similarities: only what `available` reads of one."""

    is_cuda = True
    device = "cuda:0"

    def __init__(self, tokens: int, dtype: torch.dtype) -> None:
        self.shape = (1, tokens, tokens)
        self.dtype = dtype


@pytest.mark.parametrize("capability, tokens, dtype, expected", [
    ((6, 1), 196, torch.float32, False), ((7, 0), 196, torch.float16, True), ((7, 5), 196, torch.bfloat16, False),
    ((8, 0), 196, torch.bfloat16, True), ((9, 0), 256, torch.float32, True), ((9, 0), 257, torch.float32, False)])
def test_the_kernels_run_only_where_triton_compiles_them(monkeypatch, capability, tokens, dtype, expected):
    """Not on the CPU, nor on a GPU older than Volta (a Pascal card keeps the eager steps), nor
    with bfloat16 before Ampere, nor on more tokens than registers hold (whole images)."""
    assert not kernels.available(torch.zeros(1, 4, 4))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    assert kernels.available(OnGPU(tokens, dtype)) is expected


@pytest.mark.parametrize("case", SOLVER_CASES, ids=lambda case: "batch %d, %d tokens, %d steps, contrast %g" % case)
def test_the_kernel_equals_the_eager_loop(interpreted, case):
    batch, n, steps, contrast = case
    matrix, top, start = clustered(batch, n, n + steps, contrast)
    eager = _lanczos_loop(matrix, top, start, steps)
    fused = interpreted[case]
    assert fused.shape == (batch, n) and fused.dtype == torch.float32
    torch.testing.assert_close(aligned(fused, eager), eager, rtol=0, atol=2e-5)
    same_side = bipartition(aligned(fused, eager)) == bipartition(eager)
    assert same_side.all()


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
    tolerance = 1e-5 if case[4] == torch.float32 else 2e-2
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
    tolerance = 1e-5 if case[4] == torch.float32 else 2e-3
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
