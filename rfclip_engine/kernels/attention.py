"""The key-key attention sum and step 4 as Triton kernels, for CUDA.

Eagerly each block writes the float32 (B, H, T, T) attention and key-key probabilities and passes
over them again and again (softmax, step 4's masses and scaling, the cast for the product with the
values, the running sum, its head mean): on an H200 at batch 128 those passes cost as much as a
whole plain CLIP block (benchmarks/RESULTS.md). A window's keys fit in one program (up to 256
patch keys, and the CLS key apart), so each program takes a range of query rows through scores,
the whole softmax and what follows, and only the outputs go back to memory: no online softmax is
needed.

They take the projections in half precision, as autocast makes them (the segmenter's default on
CUDA): scores from fp16 / bf16 products, softmax and sums in float32, the attention rounded to the
values' type for its product with them, as the eager steps do under autocast. In float32 the
products would have to run without tensor cores, and compiled for sm_90 they spill some 15 KB a
thread, so float32 keeps the eager steps.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import kernels
from . import triton

if triton is not None:
    import triton.language as tl

# Query rows per program, so that its (rows, N) float32 tiles stay in registers (at 8 warps, for
# 256 patch keys of 64 channels, compiled for sm_90: step 4 takes 150 registers with 32 rows and no
# spills; the key-key sum, which keeps three such tiles across its loop over heads, spills 8 bytes
# with 16 rows in fp16, some 300 in bf16 or on sm_80, and 500 with 32 rows). Crops (and heads) are
# the grid's first axis, which has no practical bound; the second, rows, is at most 16.
REFOCUS_ROWS = 32
KEY_KEY_ROWS = 16


HALF = (torch.float16, torch.bfloat16)


def available(projections: torch.Tensor) -> bool:
    """Whether these kernels run on the queries / keys / values (..., T, d), CLS first: in half
    precision, on a GPU from Ampere on, for up to `kernels.MAX_TOKENS` patch tokens."""
    return projections.dtype in HALF and kernels.available(projections[..., 1:, :], capability=(8, 0))


def _sizes(rows: int, *projections: torch.Tensor) -> dict:
    if any(x.stride(-1) != 1 for x in projections):
        raise ValueError("the attention kernels read rows of channels: the last axis must have unit stride")
    t, d = projections[0].shape[-2:]
    return dict(NP=max(16, triton.next_power_of_2(t - 1)), DP=max(16, triton.next_power_of_2(d)), BM=rows)


def refocused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, distraction: torch.Tensor,
                        defocused: torch.Tensor, beta: float) -> torch.Tensor:
    """`redistribute_attention(attention_probs(q, k), distraction, defocused, beta) @ v` (step 4
    and the product with the values) without writing the attention. q, k, v (B, H, T, d), each
    with unit stride along d (the projection's views); distraction / defocused (B, N) -> (B, H, T, d)
    in v's dtype."""
    b, heads, t, d = v.shape
    out = torch.empty_like(v)
    _refocus_kernel[(b * heads, triton.cdiv(t, REFOCUS_ROWS))](
        q, k, v, distraction.contiguous(), defocused.contiguous(), out, t, d, heads, d ** -0.5, beta,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        **_sizes(REFOCUS_ROWS, q, k, v), num_warps=8,
    )
    return out


def accumulate_key_key(k: torch.Tensor, key_key_sum: torch.Tensor,
                       head_mean: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Adds softmax(k k^T / sqrt(d)) of the patch rows and columns (softmax over all T keys, CLS
    included) to `key_key_sum` (B, H, N, N) float32, in place; with `head_mean`, also returns the
    updated sum's mean over heads (B, N, N). k (B, H, T, d) with unit stride along d."""
    b, heads, t, d = k.shape
    n = t - 1
    similarity = k.new_empty((b, n, n), dtype=torch.float32) if head_mean else key_key_sum
    _key_key_kernel[(b, triton.cdiv(n, KEY_KEY_ROWS))](
        k, key_key_sum, similarity, t, d, heads, d ** -0.5, *k.stride()[:3], HEAD_MEAN=head_mean,
        **_sizes(KEY_KEY_ROWS, k), num_warps=8,
    )
    return key_key_sum, similarity if head_mean else None


if triton is not None:

    @triton.jit
    def _probabilities(q, k_base, stride_kt, n, d, scale, NP: tl.constexpr, DP: tl.constexpr):
        """softmax(q k^T * scale) over the CLS key and the n patch keys after it at k_base: the
        patch keys' probabilities (rows, NP), 0 past n, and the CLS key's (rows,). The CLS key is
        kept apart so that 256 patch keys (a ViT-L/14 window) fill the NP = 256 columns."""
        keys = tl.arange(0, NP)
        dims = tl.arange(0, DP)
        k = tl.load(k_base + (keys[:, None] + 1) * stride_kt + dims[None, :],
                    mask=(keys[:, None] < n) & (dims[None, :] < d), other=0.0)
        scores = tl.where(keys[None, :] < n, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        k_cls = tl.load(k_base + dims, mask=dims < d, other=0.0).to(tl.float32)
        cls = tl.sum(q.to(tl.float32) * k_cls[None, :], axis=1) * scale
        top = tl.maximum(tl.max(scores, axis=1), cls)
        scores = tl.exp(scores - top[:, None])
        cls = tl.exp(cls - top)
        total = tl.sum(scores, axis=1) + cls
        return scores / total[:, None], cls / total

    @triton.jit
    def _refocus_kernel(q_ptr, k_ptr, v_ptr, dis_ptr, def_ptr, out_ptr, t, d, heads, scale, beta,
                        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                        NP: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr):
        item = (tl.program_id(0) // heads).to(tl.int64)
        head = tl.program_id(0) % heads
        rows = tl.program_id(1) * BM + tl.arange(0, BM)  # query tokens, CLS (row 0) included
        keys = tl.arange(0, NP)  # patch keys: key j is token j + 1
        dims = tl.arange(0, DP)
        n = t - 1
        tile = (rows[:, None] < t) & (dims[None, :] < d)
        q = tl.load(q_ptr + item * sqb + head * sqh + rows[:, None] * sqt + dims[None, :], mask=tile, other=0.0)
        attn, on_cls = _probabilities(q, k_ptr + item * skb + head * skh, skt, n, d, scale, NP, DP)
        # step 4: row i times (1 - beta) on Dis, (1 + g_i) on Def, 1 elsewhere (the CLS key too),
        # with g_i = beta (A 1_Dis)_i / (A 1_Def)_i; the CLS row keeps its attention
        dis = tl.load(dis_ptr + item * n + keys, mask=keys < n, other=0).to(tl.float32)
        dfc = tl.load(def_ptr + item * n + keys, mask=keys < n, other=0).to(tl.float32)
        # beta where the crop has defocused tokens, else 0: such a crop keeps its plain attention
        budget = tl.where(tl.max(dfc, axis=0) > 0, beta, 0.0)
        on_dis = tl.sum(attn * dis[None, :], axis=1)
        on_dfc = tl.sum(attn * dfc[None, :], axis=1)
        gain = budget * on_dis / tl.maximum(on_dfc, 1.1754943508222875e-38)
        factor = 1.0 - budget * dis[None, :] + gain[:, None] * dfc[None, :]
        attn = attn * tl.where(rows[:, None] >= 1, factor, 1.0)
        v_base = v_ptr + item * svb + head * svh
        v = tl.load(v_base + (keys[:, None] + 1) * svt + dims[None, :], mask=(keys[:, None] < n) & (dims[None, :] < d),
                    other=0.0)
        v_cls = tl.load(v_base + dims, mask=dims < d, other=0.0).to(tl.float32)
        out = tl.dot(attn.to(v.dtype), v) + on_cls[:, None] * v_cls[None, :]
        tl.store(out_ptr + item * sob + head * soh + rows[:, None] * sot + dims[None, :], out.to(v.dtype), mask=tile)

    @triton.jit
    def _key_key_kernel(k_ptr, sum_ptr, similarity_ptr, t, d, heads, scale, skb, skh, skt,
                        HEAD_MEAN: tl.constexpr, NP: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr):
        item = tl.program_id(0).to(tl.int64)
        n = t - 1
        patch = tl.program_id(1) * BM + tl.arange(0, BM)  # patch query rows: token patch + 1
        keys = tl.arange(0, NP)
        dims = tl.arange(0, DP)
        # the sum keeps the patch columns: the CLS key's probability is left out, unrenormalized
        columns = (patch[:, None] < n) & (keys[None, :] < n)
        offsets = patch[:, None] * n + keys[None, :]
        total = tl.zeros((BM, NP), dtype=tl.float32)
        for head in range(heads):
            k_base = k_ptr + item * skb + head * skh
            rows = tl.load(k_base + (patch[:, None] + 1) * skt + dims[None, :],
                           mask=(patch[:, None] < n) & (dims[None, :] < d), other=0.0)
            probs, _ = _probabilities(rows, k_base, skt, n, d, scale, NP, DP)
            place = sum_ptr + (item * heads + head) * n * n + offsets
            running = tl.load(place, mask=columns, other=0.0) + probs
            tl.store(place, running, mask=columns)
            total += running
        if HEAD_MEAN:
            tl.store(similarity_ptr + item * n * n + offsets, total / heads, mask=columns)
