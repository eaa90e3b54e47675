"""Step 3 alone (the Fiedler vector and the cut): the eager steps against the Triton kernel, on CUDA.

    python benchmarks/bench_solver.py [--batches 1 8 32 128] [--tokens 196] [--warps 8 16] [--tile-rows 16 32]
        [--repeats 50]
    TRITON_INTERPRET=1 python benchmarks/bench_solver.py --device cpu --batches 1 --warps 8 --repeats 2

One block's step 3 on (B, N, N) similarities of ViT-B/16's 196 patch tokens, as the encoder runs it
(32 Lanczos steps, warm-started): the eager steps plain and replayed from a CUDA graph, and the
kernel with each number of warps per program and of matrix rows its products read at a time,
milliseconds per call (median after warm-up, the device synchronised around each), how far the
kernel's Fiedler vector stands from the eager one, and whether their cuts agree; first, how long
Triton takes to compile each variant. The kernel runs on CUDA; the second line tries the script on
the CPU through Triton's interpreter (its times mean nothing).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import arguments, machine, markdown_table, synchronize, timed  # noqa: E402
from rfclip_engine import kernels  # noqa: E402
from rfclip_engine.kernels import lanczos  # noqa: E402
from rfclip_engine.steps import LANCZOS_STEPS, _find_defocused_tokens  # noqa: E402
from tests.kernels_interpreted import clustered  # noqa: E402


def problem(batch: int, n: int, device: torch.device):
    """Similarities of two noisy clusters (as RF-CLIP's key-key attention gives), start vectors and
    distraction tokens: the kernel tests' problems."""
    return [t.to(device) for t in clustered(batch, n, seed=batch)]


def milliseconds(call, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        call()
    return 1e3 * statistics.median(timed(call, device) for _ in range(repeats))


def graphed(call):
    """`call` recorded once as a CUDA graph; returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def main() -> int:
    parser = arguments(__file__, __doc__)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32, 128])
    parser.add_argument("--tokens", type=int, default=196)
    parser.add_argument("--warps", type=int, nargs="*", default=[8, 16])
    parser.add_argument("--tile-rows", type=int, nargs="*", default=[16, 32],
                        help="rows of the matrix the kernel's product reads at a time")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cuda",
                        help="cuda; or cpu with TRITON_INTERPRET=1, to try the script where there is no GPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    if kernels.triton is None or (device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"):
        print("bench_solver needs Triton, and CUDA or TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    report = {"machine": machine(), "tokens": args.tokens, "steps": LANCZOS_STEPS, "compile_s": {}, "rows": {}}
    # Triton compiles the kernel on its first call for each shape and number of warps (then caches
    # it on disk): timed here apart, and printed as it goes, so a cut-off run still says something
    variants = {f"{warps} warps, {rows} rows": dict(num_warps=warps, tile_rows=rows)
                for warps in args.warps for rows in args.tile_rows}
    weights, start, distraction = problem(1, args.tokens, device)
    for name, options in variants.items():
        begin = time.perf_counter()
        lanczos.fiedler(weights, start, distraction, LANCZOS_STEPS, **options)
        synchronize(device)
        report["compile_s"][name] = time.perf_counter() - begin
        print(f"kernel with {name}: first call (compiling) {report['compile_s'][name]:.1f} s", flush=True)
    print(f"\nstep 3, one block: {args.tokens} tokens, {LANCZOS_STEPS} Lanczos steps, ms per call (median of "
          f"{args.repeats}), the kernel's largest distance from the eager vector, and whether the cuts agree",
          flush=True)
    header_printed = False
    for batch in args.batches:
        weights, start, distraction = problem(batch, args.tokens, device)

        def eager_step():
            return _find_defocused_tokens(weights, distraction, "lanczos", start)

        cut, eager = eager_step()
        row = {"eager": milliseconds(eager_step, device, args.repeats)}
        if device.type == "cuda":
            row["eager graph"] = milliseconds(graphed(eager_step), device, args.repeats)
        for name, options in variants.items():
            fused, fused_cut = lanczos.fiedler(weights, start, distraction, LANCZOS_STEPS, **options)
            distance = (fused * torch.sign((fused * eager).sum(-1, keepdim=True)) - eager).abs().max().item()
            row[f"kernel, {name}"] = milliseconds(
                lambda o=options: lanczos.fiedler(weights, start, distraction, LANCZOS_STEPS, **o),
                device, args.repeats)
            row[f"{name}: max distance"] = distance
            row[f"{name}: same cut"] = float(torch.equal(fused_cut, cut))
        report["rows"][batch] = row
        table = markdown_table(["batch", *row], [[batch, *(f"{v:.1e}" if "distance" in k else
                                                           ("yes" if v else "no") if "same cut" in k else f"{v:.3f}"
                                                           for k, v in row.items())]]).split("\n")
        print("\n".join(table if not header_printed else table[2:]), flush=True)
        header_printed = True
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
