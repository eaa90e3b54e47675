"""Step 3 on CUDA, the Fiedler vector and the cut, as one Triton kernel per block.

Eagerly the Lanczos solver is some 300 small operators per block, and the symmetrization, the
degrees, the normalization and the cut around it some 30 more; even replayed from a CUDA graph each
costs a kernel's few microseconds, which on an H200 left RF-CLIP at a third of plain CLIP's speed
(benchmarks/RESULTS.md). Here one program per crop does all of it: it symmetrizes the similarity
into a scratch copy while summing the degrees, runs the Lanczos steps with the Krylov basis and the
projected matrix in registers (the normalized matrix D^-1/2 W D^-1/2 is never formed: each product
reads W against D^-1/2 q), finds the Ritz vector by the same repeated squaring as
`steps.top_eigenvector`, and cuts as `steps.bipartition` does. It computes what
`steps.find_defocused_tokens` / `steps.fiedler_vector` compute with the "lanczos" solver, in
float32, up to the order of its sums.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import triton

if triton is not None:
    import triton.language as tl


def fiedler(similarity: torch.Tensor, start: Optional[torch.Tensor], distraction: Optional[torch.Tensor],
            steps: int, squarings: int = 24, num_warps: int = 8,
            tile_rows: int = 16) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The Fiedler vector y = D^-1/2 u of the symmetrized `similarity` (B, N, N) float32, u the
    largest Ritz vector after `steps` Lanczos steps from `start` (B, N), the previous y (None: a
    ramp), kept orthogonal to the top eigenvector D^1/2 1; with `distraction` (B, N) bool, also
    the defocused tokens (B, N) bool: the oriented cut minus the distraction tokens, or every
    other token where that is empty. Sign of y arbitrary. `num_warps`: threads per program, in
    warps; `tile_rows`: rows of the matrix read at a time by each product (bench_solver.py)."""
    b, n, _ = similarity.shape
    steps = min(steps, n - 1)  # the space orthogonal to the top eigenvector has n - 1 dimensions
    padded_n = max(16, triton.next_power_of_2(n))  # tl.dot needs sides of 16 or more
    fiedler_out = similarity.new_empty((b, n))
    defocused = torch.empty((b, n), dtype=torch.bool, device=similarity.device) if distraction is not None else None
    weights = similarity.new_empty((b, n, n))  # the symmetrized similarity
    scratch = similarity.new_empty((b, padded_n))  # a vector all the program's threads read
    _fiedler_kernel[(b,)](
        similarity.contiguous(), fiedler_out if start is None else start.float().contiguous(),
        fiedler_out if distraction is None else distraction.contiguous(), weights, scratch, fiedler_out,
        fiedler_out if defocused is None else defocused, n, steps,
        HAS_START=start is not None, CUT=distraction is not None, NP=padded_n,
        SP=max(16, triton.next_power_of_2(steps)), BR=min(tile_rows, padded_n), SQUARINGS=squarings,
        num_warps=num_warps,
    )
    return fiedler_out, defocused


if triton is not None:

    @triton.jit
    def _fiedler_kernel(s_ptr, start_ptr, dis_ptr, w_ptr, x_ptr, y_ptr, def_ptr, n, steps,
                        HAS_START: tl.constexpr, CUT: tl.constexpr, NP: tl.constexpr, SP: tl.constexpr,
                        BR: tl.constexpr, SQUARINGS: tl.constexpr):
        item = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, NP)
        rows = tl.arange(0, SP)
        tile_rows = tl.arange(0, BR)
        inside = cols < n
        s_base = s_ptr + item * n * n
        w_base = w_ptr + item * n * n
        x_base = x_ptr + item * NP
        # W = (S + S^T) / 2 into the scratch copy, tile by tile of rows; its column sums are the
        # degrees (W is symmetric)
        degree = tl.zeros((NP,), dtype=tl.float32)
        for first in range(0, NP, BR):
            r = first + tile_rows
            tile_mask = (r[:, None] < n) & inside[None, :]
            tile = (tl.load(s_base + r[:, None] * n + cols[None, :], mask=tile_mask, other=0.0)
                    + tl.load(s_base + cols[None, :] * n + r[:, None], mask=tile_mask, other=0.0)) / 2
            tl.store(w_base + r[:, None] * n + cols[None, :], tile, mask=tile_mask)
            degree += tl.sum(tile, axis=0)
        inv_sqrt_degree = tl.where(inside, 1.0 / tl.sqrt(tl.maximum(degree, 1.1754943508222875e-38)), 0.0)
        # the top eigenvector D^1/2 1 apart, and the Krylov basis in rows 0..steps-1 (a power of two
        # rows for 32 steps); the rest stay zero, so sums over all rows only see the vectors made so far
        top = tl.where(inside, tl.sqrt(tl.maximum(degree, 1.1754943508222875e-38)), 0.0)
        top = top / tl.sqrt(tl.sum(top * top, axis=0))
        if HAS_START:
            row = tl.load(start_ptr + item * n + cols, mask=inside, other=0.0) / tl.where(inside, inv_sqrt_degree, 1.0)
        else:
            row = tl.where(inside, -1.0 + 2.0 * cols.to(tl.float32) / (n - 1), 0.0)
        basis = tl.zeros((SP, NP), dtype=tl.float32)
        # column j holds q_i . M q_j for i <= j: the upper triangle of the projected matrix K M K^T
        projected = tl.zeros((SP, SP), dtype=tl.float32)
        for j in range(steps):
            # from the second step on, row is M q_{j-1}: its coefficients are column j - 1
            coef = tl.sum(basis * row[None, :], axis=1)
            projected = tl.where(rows[None, :] == j - 1, coef[:, None], projected)
            # classical Gram-Schmidt twice keeps float32 Krylov vectors orthogonal
            row = row - tl.sum(coef[:, None] * basis, axis=0) - tl.sum(top * row, axis=0) * top
            coef = tl.sum(basis * row[None, :], axis=1)
            row = row - tl.sum(coef[:, None] * basis, axis=0) - tl.sum(top * row, axis=0) * top
            row = row / tl.maximum(tl.sqrt(tl.sum(row * row, axis=0)), 1.1754943508222875e-38)
            basis = tl.where(rows[:, None] == j, row[None, :], basis)
            # M q = D^-1/2 W (D^-1/2 q) by rows of W (symmetric): the tiles read x = D^-1/2 q from
            # memory, all threads' part of it; a loop, not unrolled: unrolled, the tiles' loads were
            # all issued at once and spilled
            tl.debug_barrier()
            tl.store(x_base + cols, row * inv_sqrt_degree)
            tl.debug_barrier()
            product = tl.zeros((NP,), dtype=tl.float32)
            for first in range(0, NP, BR):
                r = first + tile_rows
                tile = tl.load(w_base + r[:, None] * n + cols[None, :], mask=(r[:, None] < n) & inside[None, :],
                               other=0.0)
                product += tl.sum(tile * tl.load(x_base + r)[:, None], axis=0)
            row = product * inv_sqrt_degree
        coef = tl.sum(basis * row[None, :], axis=1)
        projected = tl.where(rows[None, :] == steps - 1, coef[:, None], projected)

        # the Ritz problem on rows 0..steps-1: the largest eigenvector of the projected matrix,
        # shifted by 1 (its eigenvalues are >= -1), by repeated squaring as in steps.top_eigenvector
        krylov = rows < steps
        upper = rows[:, None] <= rows[None, :]
        diagonal = rows[:, None] == rows[None, :]
        power = tl.where(upper, projected, tl.trans(projected))
        power = tl.where(krylov[:, None] & krylov[None, :], power, 0.0)
        power += tl.where(diagonal & krylov[:, None], 1.0, 0.0)
        for step in tl.static_range(SQUARINGS):
            if step % 3 == 0:
                trace = tl.sum(tl.sum(tl.where(diagonal, power, 0.0), axis=1), axis=0)
                power = power / tl.maximum(trace, 1.1754943508222875e-38)
            power = tl.dot(power, power, input_precision="ieee")
        # every column is a multiple of the eigenvector: the largest is the most accurate
        column = tl.argmax(tl.sum(power * power, axis=0), axis=0)
        ritz = tl.sum(tl.where(rows[None, :] == column, power, 0.0), axis=1)
        ritz = ritz / tl.maximum(tl.sqrt(tl.sum(ritz * ritz, axis=0)), 1e-12)
        y = tl.sum(ritz[:, None] * basis, axis=0) * inv_sqrt_degree
        tl.store(y_ptr + item * n + cols, y, mask=inside)
        if CUT:
            # steps.bipartition: the side above the mean that holds the largest |y_i| (the first on
            # ties), minus the distraction tokens; where that is empty, every other token
            mean = tl.sum(y, axis=0) / n
            seed = tl.argmax(tl.where(inside, tl.abs(y), -1.0), axis=0, tie_break_left=True)
            flip = tl.sum(tl.where(cols == seed, y, 0.0), axis=0) < mean
            oriented = tl.where(flip, -y, y)
            other = inside & (tl.load(dis_ptr + item * n + cols, mask=inside, other=1) == 0)
            cut = other & (oriented > tl.sum(oriented, axis=0) / n)
            cut = tl.where(tl.sum(cut.to(tl.int32), axis=0) > 0, cut, other)
            tl.store(def_ptr + item * n + cols, cut, mask=inside)
