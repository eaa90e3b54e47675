"""What subnormal floats cost the CPU path, and what flushing them to zero gives back.

    python benchmarks/bench_subnormal.py [--key-scales 1 3 4 5] [--crops 6] [--repeats 5]

A softmax row whose logits span more than ln(2^126) = 87.3 underflows into subnormal floats, and
x86 arithmetic on those takes a microcode assist. Random weights do not reach that regime; real
ones may, where keys have large norms (the key-key attention's diagonal is |k_i|^2 / sqrt(d)). So
the keys of a random ViT-B/16 (the OpenAI preset's distraction dimensions) are scaled by each of
`--key-scales`, and the encoder alone runs clip and rfclip, interleaved, on `--crops` 224x224
crops, in two fresh processes per scale: one as it starts, one that flushes subnormals to zero
first (`rfclip_engine.process.flush_subnormal_floats`, which every entry point calls; the flag
reaches only threads started after it, hence the processes). Reported: the share of key-key rows
(every block, head and patch row) whose logits span more than 87.3, each mode's best time, and
rfclip over clip, best and paired median. Writes a JSON file beside the table.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_engine import paired_ratio  # noqa: E402
from benchmarks.common import arguments, machine, markdown_table, timed  # noqa: E402
from rfclip_engine import RFCLIPConfig, load_model  # noqa: E402
from rfclip_engine.model import _qkv  # noqa: E402
from rfclip_engine.presets import find_preset  # noqa: E402
from rfclip_engine.process import flush_subnormal_floats  # noqa: E402

UNDERFLOW_SPAN = 126 * math.log(2)  # exp(-span) is below float32's smallest normal number
MODES = {"clip": RFCLIPConfig(mode="clip"), "rfclip": RFCLIPConfig()}


def main() -> int:
    parser = arguments(__file__, __doc__)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--key-scales", type=float, nargs="+", default=[1.0, 3.0, 4.0, 5.0])
    parser.add_argument("--crops", type=int, default=6, help="crops per forward (6: one 336x448 image)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", choices=("kept", "flushed"), help=argparse.SUPPRESS)
    parser.add_argument("--key-scale", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return 0

    runs = []
    for scale in args.key_scales:
        for subnormals in ("kept", "flushed"):
            command = [sys.executable, __file__, "--child", subnormals, "--key-scale", str(scale),
                       "--model", args.model, "--crops", str(args.crops), "--repeats", str(args.repeats)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"key scale {scale:g}, subnormals {subnormals}: done", file=sys.stderr)
    print(f"\n{args.model} encoder alone, random weights with keys scaled, {args.crops} crops, fp32, "
          f"best of {args.repeats} (clip and rfclip interleaved; each row a fresh process)")
    print(markdown_table(
        ["key scale", "key-key rows spanning > 87.3", "subnormals", "clip s", "rfclip s", "rfclip / clip",
         "paired median"],
        [[f"{r['key_scale']:g}", f"{100 * r['underflowing_rows']:.1f} %", r["subnormals"],
          f"{r['clip_s']:.3f}", f"{r['rfclip_s']:.3f}", f"{r['ratio']:.3f}x", f"{r['paired_ratio']:.3f}x"]
         for r in runs]))
    Path(args.json).write_text(json.dumps({"machine": machine(), "model": args.model, "crops": args.crops,
                                           "repeats": args.repeats, "runs": runs}, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


def measure(args) -> dict:
    if args.child == "flushed":
        flush_subnormal_floats()  # before torch starts its threads
    torch.manual_seed(0)
    preset = find_preset(args.model, "openai")
    model = load_model(args.model, pretrained=None, distraction_dims=list(preset.dims) if preset else None)
    scale_keys(model, args.key_scale)
    pixels = torch.randn(args.crops, 3, 224, 224)
    underflowing = key_key_underflow(model, pixels)
    device = torch.device("cpu")
    for config in MODES.values():
        for _ in range(2):  # a fresh process page-faults through its first forwards
            model.encode_dense(pixels, config)
    times = {name: [] for name in MODES}
    for _ in range(args.repeats):
        for name, config in MODES.items():
            times[name].append(timed(lambda c=config: model.encode_dense(pixels, c), device))
    return {"key_scale": args.key_scale, "subnormals": args.child, "underflowing_rows": underflowing,
            "clip_s": min(times["clip"]), "rfclip_s": min(times["rfclip"]),
            "ratio": min(times["rfclip"]) / min(times["clip"]), "paired_ratio": paired_ratio(times, "rfclip"),
            "median_ratio": statistics.median(times["rfclip"]) / statistics.median(times["clip"]), "runs": times}


@torch.no_grad()
def scale_keys(model, scale: float) -> None:
    for block in model.visual.transformer.resblocks:
        width = block.attn.embed_dim
        block.attn.in_proj_weight[width:2 * width] *= scale
        if block.attn.in_proj_bias is not None:
            block.attn.in_proj_bias[width:2 * width] *= scale


def key_key_underflow(model, pixels: torch.Tensor) -> float:
    """Share of key-key rows (blocks, heads, patch rows) whose logits span more than 87.3, in one
    clip forward: their softmax reaches below float32's normal range."""
    counts = []

    def observe(index: int, x: torch.Tensor) -> None:
        _, k, _ = _qkv(model.visual.transformer.resblocks[index], x, queries=False)  # (B, H, T, d)
        logits = k[:, :, 1:] @ k.transpose(-1, -2) / math.sqrt(k.shape[-1])
        span = logits.amax(-1) - logits.amin(-1)
        counts.append(((span > UNDERFLOW_SPAN).sum().item(), span.numel()))

    model.encode_dense(pixels, MODES["clip"], on_block_input=observe)
    return sum(c for c, _ in counts) / sum(n for _, n in counts)


if __name__ == "__main__":
    sys.exit(main())
