"""`RFCLIPModel`: an open_clip CLIP model whose vision tower is run by the RF-CLIP encoder.

The encoder reads the weights of open_clip's `VisionTransformer` (conv1, class and positional
embeddings, ln_pre, each block's ln_1 / attn.in_proj_* / attn.out_proj / ls_* / ln_2 / mlp,
ln_post, proj) and runs its own forward, so attention probabilities are explicit tensors that
the RF-CLIP steps can modify; open_clip's modules are never patched or hooked.
"""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from open_clip import CLIP
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import nn
from torch.profiler import record_function

from . import kernels
from .config import RFCLIPConfig
from .kernels import attention, distractors
from .presets import DistractionPreset
from .steps import (
    attention_probs,
    find_defocused_tokens,
    find_distraction_tokens,
    received_attention,
    redistribute_attention,
    redistribute_embeddings,
)

BlockObserver = Callable[[int, torch.Tensor], None]


def _check_vision_tower(visual: nn.Module) -> None:
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"RF-CLIP needs an open_clip VisionTransformer image tower, got {type(visual).__name__}")
    if visual.attn_pool is not None:
        raise ValueError("vision towers with attentional pooling are not supported")
    for block in visual.transformer.resblocks:
        if not isinstance(block.attn, nn.MultiheadAttention) or hasattr(block, "ln_1_kv"):
            raise ValueError(f"unsupported transformer block {type(block).__name__}: RF-CLIP reads "
                             "nn.MultiheadAttention self-attention blocks")


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def _qkv(block: nn.Module, x: torch.Tensor, queries: bool = True, contiguous: bool = False,
         triton_kernels: bool = False) -> Tuple[Optional[torch.Tensor], ...]:
    """The block's queries, keys and values, each (B, H, T, d), from ln_1 of its input; without
    `queries` (the dense head's last block reads none) their third of the projection is not made.
    `contiguous`: each head's rows together in memory, made by one copy. The explicit attention
    products want that: given the strided views, `matmul` copies them for every range of crops,
    and k twice (as k and as k^T); SDPA and the Triton kernels read the views as they are, so
    where `triton_kernels` will run on them it is not made."""
    attn = block.attn
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if not queries:
        width = x.shape[-1]
        weight, bias = weight[width:], (bias[width:] if bias is not None else None)
    projected = F.linear(block.ln_1(x), weight, bias)
    b, t, width = projected.shape
    n = 3 if queries else 2
    split = projected.view(b, t, n, attn.num_heads, width // (n * attn.num_heads)).permute(2, 0, 3, 1, 4)
    if contiguous and not (triton_kernels and attention.available(projected)):
        split = split.contiguous()
    heads = split.unbind(0)
    return heads if queries else (None, *heads)


def _project_heads(block: nn.Module, heads: torch.Tensor) -> torch.Tensor:
    """out_proj of per-head outputs (B, H, T, d)."""
    return block.attn.out_proj(_merge_heads(heads))


def _encode_text_to_end_of_text(clip: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """`clip.encode_text` with the context cut after the last end-of-text token. Under the causal
    mask no position sees the padding after it, and the pooled token is the end-of-text (the
    highest id), so the result is the same up to rounding; the prompt templates then run about 13
    positions instead of 77, some 6x less text-tower work."""
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, clip.text_pool_type)
    return clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection


def crop_parts(batch: int, tokens: int, heads: int, device: torch.device, chunk_mb: Optional[float]) -> List[slice]:
    """Ranges of crops whose float32 (H, T, T) attention fits in `chunk_mb` (None: the whole batch
    on an accelerator, `cpu_chunk_mb()` on the CPU). On the CPU the explicit attention and key-key
    buffers of a large batch do not fit in the cache between the ops that read them; a range of
    crops at a time does, and the extra ops cost little there. On a GPU every op is a launch: one range."""
    if chunk_mb is None and device.type in ("cuda", "mps", "xpu"):
        return [slice(0, batch)]
    per_crop = heads * tokens * tokens * 4
    step = max(1, int((chunk_mb or cpu_chunk_mb()) * 2 ** 20 // per_crop))
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


def cpu_chunk_mb() -> float:
    """The CPU's default range of attention, in MB: an eighth of this process's share of the
    last-level cache (its intra-op threads over the machine's CPUs), and no less than 4 MB. A range
    works on about four buffers of that size (scores, probabilities, step 4's factor, the key-key
    sum), which then stay in that cache; smaller ranges only add operators. On a 32 MB L3 that is
    4 MB, which beat one range there (run E of benchmarks/RESULTS.md); on the 260 MB L3 of runs
    G-K's Xeon, 32 MB: one range for the backend's 8 crops, about 1 % faster there than 4 MB."""
    threads = torch.get_num_threads()
    share = min(1.0, threads / (os.cpu_count() or threads))
    return max(4.0, _last_level_cache_bytes() * share / 8 / 2 ** 20)


_SIZE_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}


@functools.lru_cache(maxsize=1)
def _last_level_cache_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The size of the first CPU's highest-level cache as Linux's sysfs reports it; 0 where it
    does not (another OS, a container that hides it)."""
    best = (0, 0)
    for entry in cache_dir.glob("index*"):
        try:
            level = int((entry / "level").read_text())
            size = (entry / "size").read_text().strip().upper()
            best = max(best, (level, int(size.rstrip("KMG")) * _SIZE_UNITS[size.lstrip("0123456789")]))
        except (OSError, ValueError, KeyError):
            continue
    return best[1]


def _accumulate_key_key(
    k: torch.Tensor, key_key_sum: Optional[torch.Tensor], parts: Sequence[slice], head_mean: bool,
    triton_kernels: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Adds this block's key-key attention of the patch rows and columns (softmax over all keys,
    CLS included) to the running sum (B, H, N, N), float32; with `head_mean`, also returns the
    sum's mean over heads (B, N, N), taken while each range of crops is still in cache. On CUDA
    one kernel does it in half precision (kernels/attention.py)."""
    b, heads, t, _ = k.shape
    if key_key_sum is None:
        key_key_sum = k.new_zeros((b, heads, t - 1, t - 1), dtype=torch.float32)
    if triton_kernels and attention.available(k):
        return attention.accumulate_key_key(k, key_key_sum, head_mean)
    similarity = k.new_empty((b, t - 1, t - 1), dtype=torch.float32) if head_mean else None
    for part in parts:
        key_key_sum[part].add_(attention_probs(k[part, :, 1:], k[part])[..., 1:])
        if similarity is not None:
            torch.mean(key_key_sum[part], dim=1, out=similarity[part])
    return key_key_sum, similarity


def _refocused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, distraction: torch.Tensor, defocused: torch.Tensor,
    beta: float, parts: Sequence[slice], triton_kernels: bool,
) -> torch.Tensor:
    """Per-head outputs (B, H, T, d) of the redistributed attention, a range of crops at a time;
    on CUDA in half precision, one kernel that never writes the attention (kernels/attention.py)."""
    if triton_kernels and attention.available(v):
        return attention.refocused_attention(q, k, v, distraction, defocused, beta)
    heads = torch.empty_like(v)
    for part in parts:
        attn = redistribute_attention(attention_probs(q[part], k[part]), distraction[part], defocused[part], beta,
                                      in_place=True)
        torch.matmul(attn.to(v.dtype), v[part], out=heads[part])
    return heads


class RFCLIPModel(nn.Module):
    """An open_clip CLIP model plus what RF-CLIP needs to know about its weights.

    Build it with `rfclip_engine.load_model`. `encode_dense` is the dense image encoder;
    `encode_text` embeds already-formatted prompts.
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Callable,
        model_name: str,
        weights_tag: Optional[str],
        weights_id: str,
        preset: Optional[DistractionPreset] = None,
    ) -> None:
        super().__init__()
        _check_vision_tower(clip.visual)
        self.clip = clip.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.weights_tag = weights_tag
        self.weights_id = weights_id  # identifies the exact weights, for caches keyed by model
        self.preset = preset
        self._dims_cache: Dict[Tuple[Tuple[int, ...], torch.device], torch.Tensor] = {}
        cfg = getattr(clip.visual, "preprocess_cfg", {}) or {}
        self.image_mean: Tuple[float, ...] = tuple(cfg.get("mean", OPENAI_DATASET_MEAN))
        self.image_std: Tuple[float, ...] = tuple(cfg.get("std", OPENAI_DATASET_STD))

    def autocast_copy(self, dtype: torch.dtype) -> "RFCLIPModel":
        """This model with its vision tower's matrix-product tensors (the weights and biases of
        its linear layers, attention projections and patch convolution, and `proj`) stored in
        `dtype`, every other tensor shared with this one. Meant to run under autocast to `dtype`,
        where it computes exactly what this model computes: autocast casts those tensors to
        `dtype` on every use (its cache keeps casts only of tensors that require grad), which on
        an AMX CPU was 8 % of a bf16 forward of 8 crops, and which a CUDA graph replayed each
        time. Costs the cast tensors' memory (172 MB for ViT-B/16 in bf16)."""
        visual = self.visual
        cast = [visual.proj]
        for module in visual.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                cast += [module.weight, module.bias]
            elif isinstance(module, nn.MultiheadAttention):
                cast += [module.in_proj_weight, module.in_proj_bias]
        # deepcopy takes whatever its memo already holds as the copy: every tensor maps to itself
        # (shared) but the cast ones, so only the modules and the cast tensors are new
        memo = {id(t): t for t in [*self.clip.parameters(), *self.clip.buffers()]}
        memo.update({id(t): nn.Parameter(t.detach().to(dtype), requires_grad=False) for t in cast if t is not None})
        return RFCLIPModel(copy.deepcopy(self.clip, memo), self.tokenizer, self.model_name, self.weights_tag,
                           self.weights_id, self.preset)

    @property
    def visual(self) -> VisionTransformer:
        return self.clip.visual

    @property
    def patch_size(self) -> int:
        return int(self.visual.patch_size[0])

    @property
    def width(self) -> int:
        return int(self.visual.conv1.out_channels)

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    def resolve_preset(self, config: RFCLIPConfig) -> DistractionPreset:
        """The distraction dimensions and attention rule this config runs with."""
        if config.distraction_dims is not None:
            base_test = self.preset.attention_test if self.preset else False
            preset = DistractionPreset(config.distraction_dims, base_test)
        elif self.preset is not None:
            preset = self.preset
        else:
            raise ValueError(
                f"no distraction dimensions are known for {self.model_name} with weights "
                f"{self.weights_tag or 'unknown'}: run `rfclip calibrate` on a few hundred images and pass "
                "the file it writes (load_model(..., distraction_dims=FILE) / --distraction-dims FILE), "
                "or pass the indices yourself"
            )
        if config.attention_test is not None:
            preset = DistractionPreset(preset.dims, config.attention_test)
        bad = [d for d in preset.dims if not 0 <= d < self.width]
        if bad:
            raise ValueError(f"distraction dimensions {bad} are outside the model width {self.width}")
        return preset

    def _dims_on(self, dims: Tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The dimensions as an index tensor on `device`, made once: a copy from the host inside
        the forward would stop it from being recorded as a CUDA graph."""
        key = (tuple(dims), device)
        if key not in self._dims_cache:
            self._dims_cache[key] = torch.tensor(dims, device=device)
        return self._dims_cache[key]

    def _embed(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        visual = self.visual
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
        p = self.patch_size
        if pixels.shape[-2] % p or pixels.shape[-1] % p:
            raise ValueError(f"H and W must be multiples of the patch size {p}, got {tuple(pixels.shape[-2:])}")
        x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._positional_embedding(grid).to(x.dtype)
        return visual.ln_pre(x), grid

    def _positional_embedding(self, grid: Tuple[int, int]) -> torch.Tensor:
        pos = self.visual.positional_embedding
        model_grid = tuple(self.visual.grid_size)
        if tuple(grid) == model_grid:
            return pos
        patch = pos[1:].reshape(1, *model_grid, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch.float(), size=grid, mode="bicubic", align_corners=False, antialias=False)
        patch = patch.to(pos.dtype).permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])
        return torch.cat([pos[:1], patch], dim=0)

    @torch.no_grad()
    def encode_dense(
        self,
        pixels: torch.Tensor,
        config: RFCLIPConfig = RFCLIPConfig(),
        on_block_input: Optional[BlockObserver] = None,
    ) -> torch.Tensor:
        """Dense patch embeddings `ln_post(z) @ proj`, before L2 normalization.

        pixels: (B, 3, H, W), CLIP-normalized, H and W multiples of the patch size.
        on_block_input: called with (block index, residual stream entering the block) before
            any repair; calibration uses it. The tensor is repaired in place after the call:
            clone it to keep it. It and its clones are inference tensors (the blocks run in
            inference mode): anything can read them, but only code under inference mode may
            modify them in place.
        Returns (B, h, w, D) on the patch grid.
        """
        # The blocks run in inference mode: no_grad still keeps a version counter and view
        # record for every op, and with the RF-CLIP steps' some 370 small ops a block that was
        # about 1 % of a CPU forward. The projection runs outside it, so callers get an ordinary
        # tensor, which they may modify in place.
        with torch.inference_mode():
            z, grid = self._encode_tokens(pixels, config, on_block_input)
        return self._project(z, grid)

    def _encode_tokens(
        self, pixels: torch.Tensor, config: RFCLIPConfig, on_block_input: Optional[BlockObserver],
    ) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """The patch tokens z before ln_post and proj, and the patch grid."""
        preset = self.resolve_preset(config) if config.refocuses else None
        dims = self._dims_on(preset.dims, pixels.device) if preset else None
        x, grid = self._embed(pixels)
        blocks = self.visual.transformer.resblocks
        parts = crop_parts(x.shape[0], x.shape[1], blocks[0].attn.num_heads, x.device, config.attention_chunk_mb)
        n_blocks = len(blocks)
        key_key_sum: Optional[torch.Tensor] = None  # running sum of K_j[:, :, 1:, 1:] over blocks
        fiedler: Optional[torch.Tensor] = None  # the previous block's, to warm-start the solver

        for index, block in enumerate(blocks):
            if on_block_input is not None:
                on_block_input(index, x)
            distraction = None
            if preset is not None:
                with record_function("rfclip.distractors"):
                    distraction = self._repair(block, x, grid, dims, preset, config)
            q, k, v = _qkv(block, x, queries=index < n_blocks - 1 or config.mode == "clip",
                           contiguous=config.sums_key_key, triton_kernels=config.triton_kernels)
            refocus = distraction is not None and config.attention_redistribution and index < n_blocks - 1
            localize = refocus and config.defocus_localization
            similarity = None
            if config.sums_key_key:
                with record_function("rfclip.key_key"):
                    key_key_sum, similarity = _accumulate_key_key(k, key_key_sum, parts, localize,
                                                                  config.triton_kernels)
            if index == n_blocks - 1 and config.mode != "clip":
                return self._dense_head(block, v, key_key_sum, n_blocks, config.mode), grid
            if refocus:
                if localize:
                    with record_function("rfclip.fiedler"):
                        # the running sum stands for the running mean W_l: scaling W leaves
                        # D^-1/2 W D^-1/2, and so the cut, as they are
                        defocused, fiedler = find_defocused_tokens(similarity, distraction, config.fiedler_solver,
                                                                   fiedler, config.triton_kernels)
                else:
                    defocused = ~distraction
                with record_function("rfclip.redistribution"):
                    heads = _refocused_attention(q, k, v, distraction, defocused, config.beta, parts,
                                                 config.triton_kernels)
            else:
                heads = F.scaled_dot_product_attention(q, k, v)
            x = x + block.ls_1(_project_heads(block, heads))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x[:, 1:], grid

    def _repair(self, block, x, grid, dims, preset: DistractionPreset, config: RFCLIPConfig):
        """Steps 1-2 on the block input: find the distraction tokens (returned), repair their
        embeddings in x in place."""
        share = None
        if preset.attention_test:
            q, k, _ = _qkv(block, x, contiguous=True)
            share = received_attention(attention_probs(q, k))
        if config.triton_kernels and kernels.available(x[:, 1:]):  # one kernel for both (kernels/distractors.py)
            return distractors.find_and_repair(x[:, 1:], dims, grid, config.sigma, share, config.attention_threshold,
                                               repair=config.embedding_redistribution)
        distraction = find_distraction_tokens(x[:, 1:], dims, config.sigma, share, config.attention_threshold)
        if config.embedding_redistribution:  # x is this forward's own residual stream
            redistribute_embeddings(x[:, 1:], distraction, dims, grid, in_place=True)
        return distraction

    def _dense_head(self, block, v, key_key_sum, n_blocks: int, mode: str) -> torch.Tensor:
        """The last block without residual or MLP: values through out_proj (maskclip), or
        mixed by the layer-averaged key-key attention first (kk-proxy, rfclip)."""
        values = v[:, :, 1:]
        if mode == "maskclip":
            return block.attn.out_proj(_merge_heads(values))
        return _project_heads(block, (key_key_sum / n_blocks).to(values.dtype) @ values)

    def _project(self, patch_tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        out = self.visual.ln_post(patch_tokens) @ self.visual.proj
        return out.reshape(out.shape[0], grid[0], grid[1], -1)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalized text embeddings (len(prompts), D) of the given prompt strings."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        clip = self.clip
        if not (isinstance(clip, CLIP) and clip.attn_mask is not None and clip.text_pool_type == "argmax"):
            return F.normalize(clip.encode_text(tokens).float(), dim=-1)
        return F.normalize(_encode_text_to_end_of_text(clip, tokens).float(), dim=-1)
