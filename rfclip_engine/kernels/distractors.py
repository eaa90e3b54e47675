"""Steps 1 and 2 on CUDA, finding the distraction tokens and repairing their embeddings, as one
Triton kernel per block.

Eagerly they are 14 small operators per block (a min, a sum, two gathers, the threshold, a 3x3
average pool, a scatter, ...), each a launch. Here one program per crop reads its patch tokens once
for the test, then averages the distraction dimensions over each token's 3x3 neighbourhood and
writes them back for the distraction tokens only. Every mean reads the unrepaired values: all of
them are taken before any is written. It computes what `steps.find_distraction_tokens` and
`steps.redistribute_embeddings(..., in_place=True)` compute, up to the order of the sums.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import triton

if triton is not None:
    import triton.language as tl

# patch tokens read at a time for the test, each with all its channels (16 tokens of 1024 channels
# spilled a little on sm_80)
TOKENS_PER_TILE = 8


def find_and_repair(patch_tokens: torch.Tensor, dims: torch.Tensor, grid: Tuple[int, int], sigma: float,
                    attention_share: Optional[torch.Tensor], attention_threshold: float,
                    repair: bool) -> torch.Tensor:
    """The distraction tokens (B, N) bool of `patch_tokens` (B, N, C) (a view of the residual
    stream, channels contiguous), as `steps.find_distraction_tokens` finds them; with `repair`,
    their distraction dimensions `dims` (K,) replaced in place by the 3x3 means on the (h, w)
    `grid`, as `steps.redistribute_embeddings(..., in_place=True)` does."""
    b, n, channels = patch_tokens.shape
    distraction = torch.empty((b, n), dtype=torch.bool, device=patch_tokens.device)
    share = attention_share.float().contiguous() if attention_share is not None else distraction
    _distractor_kernel[(b,)](
        patch_tokens, dims, share, distraction, n, channels, dims.numel(), grid[1], patch_tokens.stride(0),
        patch_tokens.stride(1), sigma / channels, attention_threshold,
        HAS_SHARE=attention_share is not None, REPAIR=repair, NP=triton.next_power_of_2(n),
        CP=triton.next_power_of_2(channels), KP=max(2, triton.next_power_of_2(dims.numel())),
        BT=TOKENS_PER_TILE, num_warps=8,
    )
    return distraction


if triton is not None:

    @triton.jit
    def _distractor_kernel(x_ptr, dims_ptr, share_ptr, dis_ptr, n, channels, k, width, stride_b, stride_n,
                           threshold, attention_threshold, HAS_SHARE: tl.constexpr, REPAIR: tl.constexpr,
                           NP: tl.constexpr, CP: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr):
        item = tl.program_id(0).to(tl.int64)
        x_base = x_ptr + item * stride_b
        channel = tl.arange(0, CP)
        slot = tl.arange(0, KP)
        dims = tl.load(dims_ptr + slot, mask=slot < k, other=0)
        # step 1, a tile of tokens at a time: the min-shifted, sum-normalized weight of each
        # distraction dimension, against sigma / C
        for first in range(0, NP, BT):
            token = first + tl.arange(0, BT)
            valid = token < n
            real = channel[None, :] < channels
            x = tl.load(x_base + token[:, None] * stride_n + channel[None, :], mask=valid[:, None] & real,
                        other=0.0).to(tl.float32)
            low = tl.min(tl.where(real, x, float("inf")), axis=1)
            # sum_c (x_c - min) = sum_c x_c - C min
            mass = tl.sum(x, axis=1) - channels * low
            mass = tl.maximum(mass, 1.1754943508222875e-38)
            selected = tl.load(x_base + token[:, None] * stride_n + dims[None, :],
                               mask=valid[:, None] & (slot[None, :] < k), other=0.0).to(tl.float32)
            weight = tl.where(slot[None, :] < k, (selected - low[:, None]) / mass[:, None], float("-inf"))
            flag = tl.max(weight, axis=1) > threshold
            if HAS_SHARE:
                flag = flag & (tl.load(share_ptr + item * n + token, mask=valid, other=0.0) > attention_threshold)
            tl.store(dis_ptr + item * n + token, flag, mask=valid)
        if REPAIR:
            # step 2, all tokens at once: every 3x3 mean is read before any is written
            tl.debug_barrier()
            token = tl.arange(0, NP)
            valid = token < n
            row = token // width
            col = token % width
            height = (n + width - 1) // width
            total = tl.zeros((NP, KP), dtype=tl.float32)
            count = tl.zeros((NP,), dtype=tl.float32)
            for dy in tl.static_range(-1, 2):
                for dx in tl.static_range(-1, 2):
                    inside = valid & (row + dy >= 0) & (row + dy < height) & (col + dx >= 0) & (col + dx < width)
                    neighbour = token + dy * width + dx
                    total += tl.load(x_base + neighbour[:, None] * stride_n + dims[None, :],
                                     mask=inside[:, None] & (slot[None, :] < k), other=0.0).to(tl.float32)
                    count += inside.to(tl.float32)
            mean = total / tl.maximum(count, 1.0)[:, None]
            flag = tl.load(dis_ptr + item * n + token, mask=valid, other=0) != 0
            tl.debug_barrier()
            tl.store(x_base + token[:, None] * stride_n + dims[None, :], mean.to(x_ptr.dtype.element_ty),
                     mask=(valid & flag)[:, None] & (slot[None, :] < k))
