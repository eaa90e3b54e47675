"""Launches per block of the encoder's CUDA path, counted on any CPU (issue 12, target 2).

    TRITON_INTERPRET=1 python benchmarks/bench_launches.py [--model ViT-B-16]

On a GPU every operator that does work is at least one kernel launch, and so is every Triton
kernel. `bench_engine.py` counts the operators of the CPU path (the eager steps). This script
counts the path a GPU takes: one forward of one 224x224 crop under fp16 autocast (the
segmenter's default on CUDA), with the Triton kernels (rfclip_engine/kernels) run by Triton's
interpreter on the CPU tensors in place of CUDA. It counts, per block and per RF-CLIP step, the
operators that launch work (as bench_engine counts them) and the Triton kernels' launches. The
interpreter moves tensors in and out of numpy with `set_` / `copy_` calls of its own between the
operators; those are left out (the encoder makes no such top-level call itself).
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_engine import STEP_LABELS, _inside, launched_operators  # noqa: E402
from benchmarks.common import arguments, machine, markdown_table  # noqa: E402
from rfclip_engine import RFCLIPConfig, kernels, load_model  # noqa: E402
from rfclip_engine.kernels import attention, distractors, lanczos  # noqa: E402
from rfclip_engine.presets import find_preset  # noqa: E402

INTERPRETER_TRAFFIC = frozenset({"aten::set_", "aten::copy_"})
# the Triton kernels, by the module that launches each and the step label it runs under
KERNELS = {
    "rfclip.distractors": (distractors, "_distractor_kernel"),
    "rfclip.key_key": (attention, "_key_key_kernel"),
    "rfclip.fiedler": (lanczos, "_fiedler_kernel"),
    "rfclip.redistribution": (attention, "_refocus_kernel"),
}


class Counted:
    """A Triton kernel that counts its launches (`kernel[grid](...)`)."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def count(model, config: RFCLIPConfig, pixels: torch.Tensor) -> dict:
    counted = {label: Counted(getattr(module, name)) for label, (module, name) in KERNELS.items()}
    for label, (module, name) in KERNELS.items():
        setattr(module, name, counted[label])
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model.encode_dense(pixels, config)
    finally:
        for label, (module, name) in KERNELS.items():
            setattr(module, name, counted[label].kernel)
    launched = launched_operators(prof, INTERPRETER_TRAFFIC)
    blocks = len(model.visual.transformer.resblocks)
    steps = {label: (sum(_inside(e, label) for e in launched) + counted[label].launches) / blocks
             for label in STEP_LABELS}
    total = len(launched) + sum(c.launches for c in counted.values())
    return {"per_forward": total, "per_block": total / blocks, "per_step": steps,
            "operators": Counter(e.name for e in launched)}


def main() -> int:
    parser = arguments(__file__, __doc__)
    parser.add_argument("--model", default="ViT-B-16")
    args = parser.parse_args()
    if kernels.triton is None or os.environ.get("TRITON_INTERPRET") != "1":
        print("bench_launches needs Triton and TRITON_INTERPRET=1 (set before Python starts)", file=sys.stderr)
        return 2
    kernels.available = lambda tensor, capability=None: True  # as on a GPU from Ampere on
    torch.manual_seed(0)
    preset = find_preset(args.model, "openai")
    model = load_model(args.model, pretrained=None, distraction_dims=list(preset.dims) if preset else None)
    pixels = torch.randn(1, 3, 224, 224)
    counts = {mode: count(model, RFCLIPConfig(mode=mode), pixels) for mode in ("clip", "kk-proxy", "rfclip")}
    base = counts["clip"]["per_block"]
    print("\nlaunches per block of the CUDA path (operators that do work, and Triton kernels), one forward of one "
          "crop, fp16 autocast")
    print(markdown_table(
        ["mode", "per forward", "per block", "x clip", *(label.split(".")[1] for label in STEP_LABELS)],
        [[mode, c["per_forward"], f"{c['per_block']:.1f}", f"{c['per_block'] / base:.2f}",
          *(f"{c['per_step'][label]:.2f}" for label in STEP_LABELS)] for mode, c in counts.items()]))
    report = {"machine": machine(), "model": args.model, "counts": counts}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
