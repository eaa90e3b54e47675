"""The RF-CLIP steps as pure tensor functions, batched over images/crops.

Shapes: B batch, H heads, T = 1 + N tokens (CLS first), N patch tokens on an (h, w) grid laid
out row-major, C channels. Boolean token masks are (B, N) over patch tokens only: the CLS token
is never a distraction or defocused token. None of these functions synchronises with the host,
so they can run back to back on an accelerator.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import kernels
from .kernels import lanczos


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) over the last axis; q, k are (B, H, T, d). Key-key attention is
    `attention_probs(k, k)`."""
    # the scale rides on the product (alpha) instead of a pass over q: on the CPU that pass cost
    # as much as the softmax's add into the key-key sum. With beta=0 baddbmm ignores its input,
    # NaN included, so an uninitialized scalar stands in (no fill, no launch).
    scores = torch.baddbmm(q.new_empty(()), q.flatten(0, -3), k.flatten(0, -3).transpose(1, 2),
                           beta=0, alpha=q.shape[-1] ** -0.5)
    return torch.softmax(scores.view(*q.shape[:-1], k.shape[-2]), dim=-1)


def received_attention(attn: torch.Tensor) -> torch.Tensor:
    """Share of attention each patch token receives from the patch queries, averaged over heads:
    abar_i = mean_h (1/N) sum_{patch rows j} A[h][j, i]. attn (B, H, T, T) -> (B, N)."""
    return attn[:, :, 1:, 1:].mean(dim=2).mean(dim=1)


def find_distraction_tokens(
    patch_tokens: torch.Tensor,
    dims: torch.Tensor,
    sigma: float,
    attention_share: Optional[torch.Tensor] = None,
    attention_threshold: float = 0.1,
) -> torch.Tensor:
    """Step 1: tokens whose min-shifted, sum-normalized channel distribution puts more than
    sigma / C on some distraction dimension (and, when `attention_share` is given, that also
    receive more than `attention_threshold` of the attention).

    patch_tokens (B, N, C), dims (K,) long -> (B, N) bool.
    """
    x = patch_tokens.float()
    channels = x.shape[-1]
    low = x.amin(dim=-1, keepdim=True)
    # sum_c (x_c - min) = sum_c x_c - C min; only the distraction channels need dividing.
    mass = (x.sum(dim=-1, keepdim=True) - channels * low).clamp_min(torch.finfo(x.dtype).tiny)
    # A constant token has no over-activated channel; the clamp keeps it at p = 0 instead of NaN.
    peak = ((x.index_select(-1, dims) - low) / mass).amax(dim=-1)
    distraction = peak > sigma / channels
    if attention_share is not None:
        distraction = distraction & (attention_share > attention_threshold)
    return distraction


def redistribute_embeddings(
    patch_tokens: torch.Tensor, distraction: torch.Tensor, dims: torch.Tensor, grid: Tuple[int, int],
    in_place: bool = False,
) -> torch.Tensor:
    """Step 2: for distraction tokens only and in the distraction dimensions only, replace the
    value by the mean over the 3x3 grid neighbourhood (the token included; at the border, over
    the neighbours that exist). Every mean reads the unrepaired values. `in_place` writes the
    K repaired channels into `patch_tokens` (which may be a view of the residual stream) instead
    of copying all C.

    patch_tokens (B, N, C), distraction (B, N) -> (B, N, C).
    """
    b, n, _ = patch_tokens.shape
    h, w = grid
    selected = patch_tokens.index_select(-1, dims)  # (B, N, K)
    as_image = selected.transpose(1, 2).reshape(b, -1, h, w)
    local_mean = F.avg_pool2d(as_image, 3, stride=1, padding=1, count_include_pad=False)
    local_mean = local_mean.reshape(b, -1, n).transpose(1, 2)
    repaired = torch.where(distraction.unsqueeze(-1), local_mean.to(selected.dtype), selected)
    return patch_tokens.index_copy_(-1, dims, repaired) if in_place else patch_tokens.index_copy(-1, dims, repaired)


FIEDLER_SOLVERS = ("exact", "lanczos")
LANCZOS_STEPS = 32


def fiedler_vector(
    similarity: torch.Tensor, solver: str = "exact", start: Optional[torch.Tensor] = None,
    steps: int = LANCZOS_STEPS,
) -> torch.Tensor:
    """The generalized eigenvector y of (D - W) y = lambda D y for the second-smallest lambda,
    scaled as D^{-1/2} u with u a unit eigenvector of M = D^{-1/2} W D^{-1/2}. Sign is arbitrary.

    solver "exact": a full symmetric eigendecomposition. "lanczos": only that vector, by `steps`
    Lanczos steps with full reorthogonalization on M deflated of its known top eigenvector
    D^{1/2} 1; `start` (B, N), e.g. the previous block's result, warm-starts it. Where the second
    eigenvalue stands clear of the third, its partition is eigh's; where the two are within a
    fraction of a percent, two different cuts score almost alike and it may settle on the other.
    On CUDA one Triton kernel does it (kernels/lanczos.py), elsewhere the eager loop.

    similarity (B, N, N), symmetric and non-negative -> (B, N) float32.
    """
    with torch.autocast(similarity.device.type, enabled=False):  # eigenvectors need float32 throughout
        if solver == "lanczos" and kernels.available(similarity):
            return lanczos.fiedler(similarity.float(), start, None, steps)[0]
        return _fiedler_vector(similarity.to(torch.float32, copy=True), solver, start, steps)


def _fiedler_vector(weights: torch.Tensor, solver: str, start: Optional[torch.Tensor], steps: int) -> torch.Tensor:
    """`fiedler_vector` by the eager steps; `weights` (float32) is overwritten."""
    inv_sqrt_degree = weights.sum(dim=-1).clamp_min(torch.finfo(torch.float32).tiny).rsqrt()
    # M = D^-1/2 W D^-1/2 in W's own buffer, bit for bit the same: fresh (B, N, N) buffers for
    # the halving and the two products took 1.35x the time on the CPU, about 5x with glibc's malloc
    # defaults, which fault them in anew
    normalized = weights.mul_(inv_sqrt_degree.unsqueeze(-1)).mul_(inv_sqrt_degree.unsqueeze(-2))
    if solver == "exact":
        # The smallest eigenvalues of I - M are the largest of M; eigh sorts ascending.
        _, vectors = torch.linalg.eigh(normalized)
        return vectors[..., -2] * inv_sqrt_degree
    if solver != "lanczos":
        raise ValueError(f"fiedler solver must be one of {FIEDLER_SOLVERS}, got {solver!r}")
    return _lanczos_second_vector(normalized, inv_sqrt_degree, start, steps) * inv_sqrt_degree


def _lanczos_second_vector(matrix: torch.Tensor, inv_sqrt_degree: torch.Tensor, start: Optional[torch.Tensor],
                           steps: int) -> torch.Tensor:
    """Unit eigenvector of the second-largest eigenvalue of the normalized similarity `matrix`:
    the largest Ritz vector of its Krylov space kept orthogonal to the top eigenvector D^{1/2} 1."""
    b, n, _ = matrix.shape
    steps = min(steps, n - 1)  # the space orthogonal to the top eigenvector has n - 1 dimensions
    # Vectors are rows, so each step is a few batched matmuls on (B, 1, N) rows: the solver's cost
    # is per-op overhead, not arithmetic. Row 0 holds the top eigenvector, rows 1.. the Krylov basis.
    basis = matrix.new_empty((b, steps + 1, n))
    basis[:, 0] = F.normalize(inv_sqrt_degree.reciprocal(), dim=-1)
    if start is None:
        row = torch.linspace(-1.0, 1.0, n, device=matrix.device).expand(b, n)
    else:
        row = start.float() / inv_sqrt_degree  # back from y = D^{-1/2} u
    row = row.unsqueeze(1)
    for j in range(steps):
        done = basis[:, :j + 1]
        for _ in range(2):  # classical Gram-Schmidt twice keeps float32 Krylov vectors orthogonal
            row = torch.baddbmm(row, torch.bmm(row, done.transpose(1, 2)), done, alpha=-1)
        norm = torch.linalg.vector_norm(row, dim=-1, keepdim=True).clamp_min_(torch.finfo(row.dtype).tiny)
        row = torch.div(row, norm, out=basis[:, j + 1:j + 2])
        row = torch.bmm(row, matrix)  # M is symmetric: the row form of M u
    krylov = basis[:, 1:]
    projected = krylov @ matrix @ krylov.transpose(1, 2)
    ritz = top_eigenvector((projected + projected.transpose(1, 2)) / 2, shift=1.0)
    return (ritz.unsqueeze(1) @ krylov).squeeze(1)


def top_eigenvector(symmetric: torch.Tensor, shift: float, squarings: int = 24) -> torch.Tensor:
    """Unit eigenvector of the largest eigenvalue of small symmetric matrices (B, k, k) whose
    eigenvalues are all >= -shift, by repeated squaring of (S + shift I): after s squarings the
    ratio of the two largest eigenvalues is raised to the power 2^s (2^24 here), so any gap above
    about 1e-6 of the largest separates them. Unlike `torch.linalg.eigh` it never synchronises
    with the host (eigh checks its result on the host), so the whole encoder can run as one CUDA
    graph. Sign is arbitrary. -> (B, k)."""
    k = symmetric.shape[-1]
    power = symmetric + shift * torch.eye(k, dtype=symmetric.dtype, device=symmetric.device)
    for step in range(squarings):
        if step % 3 == 0:
            # divided by its trace (positive semi-definite: the sum of its eigenvalues), the
            # largest eigenvalue lies in [1/k, 1], so three squarings stay above 1e-12 * trace
            trace = power.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
            power = power / trace.clamp_min(torch.finfo(power.dtype).tiny)
        power = torch.bmm(power, power)
    # every column is a multiple of the eigenvector: the largest is the most accurate
    column = torch.linalg.vector_norm(power, dim=-2).argmax(dim=-1)
    vector = power.gather(-1, column[:, None, None].expand(-1, k, 1)).squeeze(-1)
    return F.normalize(vector, dim=-1)


def bipartition(fiedler: torch.Tensor) -> torch.Tensor:
    """Foreground side of a Fiedler vector: {i : y_i > mean(y)}, oriented so that it holds the
    token with the largest |y_i| (the first such on ties). (B, N) -> (B, N) bool."""
    mean = fiedler.mean(dim=-1, keepdim=True)
    seed = fiedler.abs().argmax(dim=-1, keepdim=True)
    flip = fiedler.gather(-1, seed) < mean
    oriented = torch.where(flip, -fiedler, fiedler)
    return oriented > oriented.mean(dim=-1, keepdim=True)


def find_defocused_tokens(
    similarity: torch.Tensor, distraction: torch.Tensor, solver: str = "exact", start: Optional[torch.Tensor] = None,
    triton_kernel: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 3: the normalized-cut foreground of the (symmetrized) patch similarity, minus the
    distraction tokens; where that is empty, every non-distraction token.

    similarity (B, N, N), distraction (B, N) -> defocused (B, N) bool, and the Fiedler vector
    (B, N) (to warm-start the next block's solver). On CUDA, with the "lanczos" solver, one Triton
    kernel does all of it (kernels/lanczos.py), unless `triton_kernel` is False.
    """
    with torch.autocast(similarity.device.type, enabled=False):  # eigenvectors need float32 throughout
        if solver == "lanczos" and triton_kernel and kernels.available(similarity):
            fiedler, defocused = lanczos.fiedler(similarity.float(), start, distraction, LANCZOS_STEPS)
            return defocused, fiedler
        return _find_defocused_tokens(similarity.float(), distraction, solver, start)


def _find_defocused_tokens(similarity: torch.Tensor, distraction: torch.Tensor, solver: str,
                           start: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """`find_defocused_tokens` by the eager steps, on any device; similarity in float32."""
    symmetric = (similarity + similarity.transpose(-1, -2)).div_(2)
    fiedler = _fiedler_vector(symmetric, solver, start, LANCZOS_STEPS)
    defocused = bipartition(fiedler) & ~distraction
    return torch.where(defocused.any(dim=-1, keepdim=True), defocused, ~distraction), fiedler


def redistribute_attention(
    attn: torch.Tensor, distraction: torch.Tensor, defocused: torch.Tensor, beta: float, in_place: bool = False,
) -> torch.Tensor:
    """Step 4: in every head and every patch query row, scale the attention on distraction
    tokens by (1 - beta) and give the removed mass to the defocused tokens in proportion to
    their attention. The CLS row and column are untouched; rows keep their sums. A batch item
    with no defocused token is left unchanged. `defocused` must not overlap `distraction`.

    Row i is multiplied entrywise by (1 - beta) on Dis, (1 + g_i) on Def and 1 elsewhere, with
    g_i = beta (A 1_Dis)_i / (A 1_Def)_i. `in_place` writes into `attn` (the encoder owns its
    freshly computed attention: a second (B, H, T, T) buffer would cost more than the arithmetic).

    attn (B, H, T, T), distraction / defocused (B, N) -> (B, H, T, T).
    """
    out = attn if in_place else attn.clone()
    b, heads, t, _ = out.shape
    keys = F.pad(torch.stack([distraction, defocused], dim=1), (1, 0)).to(attn.dtype)  # (B, 2, T): CLS in neither
    applies = defocused.any(dim=-1).to(attn.dtype)[:, None, None, None]
    # one matmul per crop over all its rows: batched per head and over the patch rows only (a
    # strided slice), the same product runs 2-3x slower on the CPU, as slow as the rest of step 4
    masses = torch.bmm(out.reshape(b, heads * t, t), keys.transpose(1, 2)).view(b, heads, t, 2)[:, :, 1:]
    gain = beta * applies * masses[..., :1] / masses[..., 1:].clamp_min(torch.finfo(attn.dtype).tiny)
    dis, dfc = keys[:, None, :1], keys[:, None, 1:]
    out[:, :, 1:].mul_(torch.addcmul(1 - beta * applies * dis, gain, dfc))
    return out
