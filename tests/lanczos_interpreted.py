"""The fused Lanczos kernel run by Triton's interpreter on the CPU, for test_lanczos_kernel.py.

Triton reads TRITON_INTERPRET when it is first imported, so this runs in a process of its own:
    TRITON_INTERPRET=1 python -m tests.lanczos_interpreted OUT.pt
It saves the kernel's results for the cases below; the test computes the eager ones and compares.
"""
import sys

import torch

from rfclip_engine import RFCLIPConfig, lanczos_kernel, load_model
from rfclip_engine.steps import fiedler_vector

from .conftest import TINY_CONFIG, TINY_DIMS
from .test_encoder import scene

# (batch, tokens, steps, cluster contrast): ViT-B/16's 196 tokens, fewer tokens than steps, and
# short runs on noise alone, where the Krylov space is far from converged: the Ritz vector then
# depends on every entry of the projected matrix
SOLVER_CASES = [(3, 40, 32, 0.6), (2, 196, 32, 0.6), (2, 10, 32, 0.6), (2, 24, 8, 0.6), (3, 60, 4, 0.0),
                (3, 60, 8, 0.0)]
ENCODER_CONFIG = RFCLIPConfig(sigma=1.5)


def clustered(batch: int, n: int, seed: int, contrast: float = 0.6):
    """Normalized similarities M = D^-1/2 W D^-1/2 of two clusters and noise, their unit top
    eigenvectors D^1/2 1, and a start vector."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(batch, n, generator=g) < 0.4
    weights = 0.2 + contrast * (labels[:, :, None] == labels[:, None, :]).float()
    weights = weights + 0.05 * torch.rand(batch, n, n, generator=g)
    weights = (weights + weights.transpose(1, 2)) / 2
    inv_sqrt_degree = weights.sum(-1).rsqrt()
    matrix = inv_sqrt_degree[:, :, None] * weights * inv_sqrt_degree[:, None, :]
    top = torch.nn.functional.normalize(inv_sqrt_degree.reciprocal(), dim=-1)
    return matrix, top, torch.randn(batch, n, generator=g)


def planted_cut() -> torch.Tensor:
    """Similarities of two blocks with weak links between them."""
    matrix, _, _ = clustered(4, 50, seed=7)
    return torch.where(matrix > 0.5 / 50, matrix, matrix * 0.1)


def tiny_model():
    torch.manual_seed(0)  # as conftest's fixture makes it
    return load_model(TINY_CONFIG, pretrained=None, distraction_dims=TINY_DIMS)


@torch.no_grad()
def main(out: str) -> None:
    lanczos_kernel.available = lambda tensor: True  # the interpreter runs it on CPU tensors
    results = {(batch, n, steps, contrast): lanczos_kernel.lanczos_second_vector(
        *clustered(batch, n, n + steps, contrast), steps) for batch, n, steps, contrast in SOLVER_CASES}
    results["planted"] = fiedler_vector(planted_cut(), "lanczos")
    results["encoder"] = tiny_model().encode_dense(scene(2, 64, 0), ENCODER_CONFIG)
    torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
