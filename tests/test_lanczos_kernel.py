"""The fused Lanczos kernel (CUDA's solver) against the eager loop, run by Triton's interpreter on
the CPU: the same kernel code, so CI checks what a GPU runs. test_device.py checks it on CUDA."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rfclip_engine import lanczos_kernel
from rfclip_engine.steps import _lanczos_loop, bipartition, fiedler_vector

from .lanczos_interpreted import ENCODER_CONFIG, SOLVER_CASES, clustered, planted_cut, tiny_model
from .test_encoder import scene


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """The kernel's results, from a process where Triton interprets it."""
    out = tmp_path_factory.mktemp("interpreted") / "results.pt"
    subprocess.run([sys.executable, "-m", "tests.lanczos_interpreted", str(out)], check=True, timeout=600,
                   cwd=Path(__file__).parents[1], env={**os.environ, "TRITON_INTERPRET": "1"})
    return torch.load(out)


def aligned(vector: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`vector` with each row's sign turned to agree with `reference` (eigenvectors have no sign)."""
    return vector * torch.sign((vector * reference).sum(-1, keepdim=True))


class OnGPU:
    """Stands for a CUDA tensor of (1, N, N) similarities: only what `available` reads of one."""

    is_cuda = True
    device = "cuda:0"

    def __init__(self, tokens: int) -> None:
        self.shape = (1, tokens, tokens)


@pytest.mark.parametrize("capability, tokens, expected", [
    ((6, 1), 196, False), ((7, 0), 196, True), ((9, 0), 256, True), ((9, 0), 257, False)])
def test_the_kernel_runs_only_where_triton_compiles_it(monkeypatch, capability, tokens, expected):
    """Not on the CPU, nor on a GPU older than Volta (a Pascal card keeps the eager loop), nor on
    more tokens than its registers hold (whole images)."""
    assert not lanczos_kernel.available(torch.zeros(1, 4, 4))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    assert lanczos_kernel.available(OnGPU(tokens)) is expected


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
