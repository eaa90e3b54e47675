"""The Triton kernels (rfclip_engine/kernels) run by Triton's interpreter on the CPU, for test_kernels.py.

Triton reads TRITON_INTERPRET when it is first imported, so this runs in a process of its own:
    TRITON_INTERPRET=1 python -m tests.kernels_interpreted OUT.pt
It saves the kernels' results for the cases below; the test computes the eager ones and compares.
"""
import sys

import torch

from rfclip_engine import RFCLIPConfig, SegmenterConfig, kernels, load_model
from rfclip_engine.graphs import DenseEncoder
from rfclip_engine.kernels import attention, distractors, lanczos
from rfclip_engine.predictor import Segmenter
from rfclip_engine.steps import bipartition, fiedler_vector

from .conftest import TINY_CONFIG, TINY_DIMS
from .test_encoder import scene

# (batch, tokens, steps, cluster contrast, warm start): ViT-B/16's 196 tokens, fewer tokens than
# steps, and short runs on noise alone, where the Krylov space is far from converged: the Ritz
# vector then depends on every entry of the projected matrix; from the previous block's vector,
# or from the ramp of the first block
SOLVER_CASES = [(3, 40, 32, 0.6, True), (2, 196, 32, 0.6, True), (2, 196, 32, 0.6, False), (2, 10, 32, 0.6, True),
                (2, 24, 8, 0.6, False), (3, 60, 4, 0.0, True), (3, 60, 8, 0.0, True)]
ENCODER_CONFIG = RFCLIPConfig(sigma=1.5)
# (batch, heads, tokens, head size, dtype): a tiny model's window, ViT-B/16's, ViT-L/14's (256
# patch tokens and CLS), and a head size that is no power of two; in fp16, autocast's type on CUDA (the interpreter computes bfloat16
# products from the raw bits, so bfloat16 is checked on a GPU alone, by test_device.py)
ATTENTION_CASES = [(2, 3, 17, 16, torch.float16), (2, 2, 197, 64, torch.float16), (2, 2, 257, 64, torch.float16),
                   (2, 2, 30, 12, torch.float16)]


# (batch, grid, channels, distraction dimensions, attention test, repair): a ViT-B/16 window, a
# ViT-L/14 one, a grid that is not square, and a 3x3 grid where every token is on the border
DISTRACTOR_CASES = [(2, (14, 14), 768, 8, False, True), (2, (16, 16), 1024, 8, True, True), (3, (4, 5), 64, 3, True, True), (2, (3, 3), 48, 2, False, True),
                    (2, (4, 5), 64, 3, False, False)]
SIGMA = 5.0


def residual_stream(batch: int, grid, channels: int, k: int, seed: int = 0):
    """A residual stream (B, 1 + N, C) where about a fifth of the patch tokens spike in some of
    the distraction dimensions, those dimensions, and a received-attention share per token."""
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    x = torch.randn(batch, 1 + n, channels, generator=g)
    dims = torch.randperm(channels, generator=g)[:k]
    spikes = (torch.rand(batch, 1 + n, k, generator=g) < 0.2) * 40.0 * torch.rand(batch, 1 + n, k, generator=g)
    x[:, :, dims] += spikes
    return x, dims, torch.rand(batch, n, generator=g) * 0.2


def projections(batch: int, heads: int, t: int, d: int, dtype: torch.dtype, seed: int = 0):
    """q, k, v as the encoder's strided views of one (B, T, 3, H, d) projection, and masks of
    distraction and defocused tokens (disjoint; the last crop has no defocused token)."""
    g = torch.Generator().manual_seed(seed)
    projected = (2 * torch.randn(batch, t, 3, heads, d, generator=g)).to(dtype)
    q, k, v = projected.permute(2, 0, 3, 1, 4).unbind(0)
    draw = torch.rand(batch, t - 1, generator=g)
    distraction = draw < 0.15
    defocused = (draw > 0.5) & (torch.arange(batch)[:, None] < batch - 1)
    return q, k, v, distraction, defocused


def running_sum(batch: int, heads: int, t: int, seed: int = 1) -> torch.Tensor:
    """A key-key running sum as earlier blocks leave it."""
    return torch.rand(batch, heads, t - 1, t - 1, generator=torch.Generator().manual_seed(seed))


def clustered(batch: int, n: int, seed: int, contrast: float = 0.6):
    """Similarities of two clusters and noise, not quite symmetric (as the running key-key mean
    is), a start vector, and distraction tokens; in the last crop the distraction tokens cover
    the whole cut, so that its defocused tokens fall back to every other token."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(batch, n, generator=g) < 0.4
    weights = 0.2 + contrast * (labels[:, :, None] == labels[:, None, :]).float()
    weights = weights + 0.05 * torch.rand(batch, n, n, generator=g)
    start = torch.randn(batch, n, generator=g)
    distraction = torch.rand(batch, n, generator=g) < 0.1
    cut = bipartition(fiedler_vector((weights + weights.transpose(1, 2)) / 2, "exact"))
    distraction[-1] |= cut[-1]
    return weights, start, distraction


def normalized(weights: torch.Tensor):
    """M = D^-1/2 W D^-1/2 of the symmetrized similarities, and its unit top eigenvectors D^1/2 1."""
    weights = (weights + weights.transpose(1, 2)) / 2
    inv_sqrt_degree = weights.sum(-1).rsqrt()
    matrix = inv_sqrt_degree[:, :, None] * weights * inv_sqrt_degree[:, None, :]
    return matrix, torch.nn.functional.normalize(inv_sqrt_degree.reciprocal(), dim=-1)


def planted_cut() -> torch.Tensor:
    """Similarities of two blocks with weak links between them."""
    matrix, _ = normalized(clustered(4, 50, seed=7)[0])
    return torch.where(matrix > 0.5 / 50, matrix, matrix * 0.1)


def tiny_model():
    torch.manual_seed(0)  # as conftest's fixture makes it
    return load_model(TINY_CONFIG, pretrained=None, distraction_dims=TINY_DIMS)


@torch.no_grad()
def main(out: str) -> None:
    kernels.available = lambda tensor, capability=None: True  # the interpreter runs them on CPU tensors
    kernels.usable = lambda device, tokens, capability=None: True
    results = {}
    for batch, n, steps, contrast, warm in SOLVER_CASES:
        weights, start, distraction = clustered(batch, n, n + steps, contrast)
        results[batch, n, steps, contrast, warm] = lanczos.fiedler(weights, start if warm else None, distraction,
                                                                   steps)
    results["planted"] = fiedler_vector(planted_cut(), "lanczos")
    for case in DISTRACTOR_CASES:
        batch, grid, channels, k, attention_test, repair = case
        x, dims, share = residual_stream(batch, grid, channels, k)
        flags = distractors.find_and_repair(x[:, 1:], dims, grid, SIGMA, share if attention_test else None, 0.1,
                                            repair)
        results["distractors", case] = flags, x
    for case in ATTENTION_CASES:
        q, k, v, distraction, defocused = projections(*case)
        results["refocus", case] = attention.refocused_attention(q, k, v, distraction, defocused, 0.4)
        for head_mean in (True, False):
            results["key_key", head_mean, case] = attention.accumulate_key_key(
                k, running_sum(*case[:3]), head_mean)
    results["encoder"] = tiny_model().encode_dense(scene(2, 64, 0), ENCODER_CONFIG)
    with torch.autocast("cpu", dtype=torch.float16):  # half precision: the attention kernels run too
        results["encoder fp16"] = tiny_model().encode_dense(scene(2, 64, 0), ENCODER_CONFIG)
        results["encoder fp16, eager steps"] = tiny_model().encode_dense(
            scene(2, 64, 0), RFCLIPConfig(sigma=1.5, triton_kernels=False))
    results["kk-proxy"] = tiny_model().encode_dense(scene(2, 64, 0), RFCLIPConfig(mode="kk-proxy"))
    encoder = DenseEncoder(tiny_model(), torch.float16)  # as the segmenter's on a GPU: it checks the kernels
    features = encoder(scene(2, 64, 0), ENCODER_CONFIG)
    results["dense encoder"] = list(encoder._kernel_checks.values()), features
    # a server's warm-up, on the noise it runs: the kernels are checked on it, and kept
    segmenter = Segmenter(tiny_model(), SegmenterConfig(encoder=ENCODER_CONFIG, window=64, stride=32, batch_size=2,
                                                        precision="fp16"))
    segmenter.warm_up()
    results["warm-up"] = [(key[0], passed) for key, passed in segmenter.encoder._kernel_checks.items()]
    torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
