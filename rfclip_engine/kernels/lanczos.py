"""The Lanczos Fiedler solver of `steps.py` as one Triton kernel per call, for CUDA.

Eagerly the solver is some 300 small operators per block; even replayed from a CUDA graph each
costs a kernel's few microseconds, which on an H200 left RF-CLIP at a third of plain CLIP's speed
(benchmarks/RESULTS.md). Here one program per crop runs all the steps: the Krylov basis and the
projected matrix stay in registers, the normalized similarity is read once per step, and the Ritz
vector is found by the same repeated squaring as `steps.top_eigenvector`. It computes what
`steps._lanczos_loop` computes, in float32, up to the order of its sums.
"""
from __future__ import annotations

import torch

from . import triton

if triton is not None:
    import triton.language as tl


def lanczos_second_vector(matrix: torch.Tensor, top: torch.Tensor, start: torch.Tensor, steps: int,
                          squarings: int = 24, num_warps: int = 8, tile_rows: int = 16) -> torch.Tensor:
    """Unit eigenvector of the second-largest eigenvalue of the symmetric `matrix` (B, N, N):
    the largest Ritz vector after `steps` Lanczos steps from `start` (B, N), kept orthogonal to
    the known unit top eigenvector `top` (B, N). float32 -> (B, N), sign arbitrary. `num_warps`:
    threads per program, in warps; `tile_rows`: rows of the matrix read at a time by the product
    with it (benchmarks/bench_solver.py compares both)."""
    b, n, _ = matrix.shape
    steps = min(steps, n - 1)
    out = matrix.new_empty((b, n))
    padded_n = max(16, triton.next_power_of_2(n))  # tl.dot needs sides of 16 or more
    scratch = matrix.new_empty((b, padded_n))  # the newest basis vector, for the product with the matrix
    _lanczos_kernel[(b,)](
        matrix.contiguous(), top.contiguous(), start.contiguous(), scratch, out, n, steps,
        NP=padded_n, SP=max(16, triton.next_power_of_2(steps)), BR=min(tile_rows, padded_n), SQUARINGS=squarings,
        num_warps=num_warps,
    )
    return out


if triton is not None:

    @triton.jit
    def _lanczos_kernel(m_ptr, top_ptr, start_ptr, q_ptr, out_ptr, n, steps,
                        NP: tl.constexpr, SP: tl.constexpr, BR: tl.constexpr, SQUARINGS: tl.constexpr):
        item = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, NP)
        rows = tl.arange(0, SP)
        tile_rows = tl.arange(0, BR)
        inside = cols < n
        m_base = m_ptr + item * n * n
        q_base = q_ptr + item * NP
        # the top eigenvector apart, and the Krylov basis in rows 0..steps-1 (a power of two rows
        # for 32 steps); the rest stay zero, so sums over all rows only see the vectors made so far
        top = tl.load(top_ptr + item * n + cols, mask=inside, other=0.0)
        basis = tl.zeros((SP, NP), dtype=tl.float32)
        row = tl.load(start_ptr + item * n + cols, mask=inside, other=0.0)
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
            norm = tl.maximum(tl.sqrt(tl.sum(row * row, axis=0)), 1.1754943508222875e-38)
            row = row / norm
            basis = tl.where(rows[:, None] == j, row[None, :], basis)
            # M q by rows of M (symmetric): the tiles read q from memory, all threads' part of it;
            # a loop, not unrolled: unrolled, the tiles' loads were all issued at once and spilled
            tl.debug_barrier()
            tl.store(q_base + cols, row)
            tl.debug_barrier()
            product = tl.zeros((NP,), dtype=tl.float32)
            for start in range(0, NP, BR):
                r = start + tile_rows
                tile = tl.load(m_base + r[:, None] * n + cols[None, :], mask=(r[:, None] < n) & inside[None, :],
                               other=0.0)
                product += tl.sum(tile * tl.load(q_base + r)[:, None], axis=0)
            row = product
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
        tl.store(out_ptr + item * n + cols, tl.sum(ritz[:, None] * basis, axis=0), mask=inside)
