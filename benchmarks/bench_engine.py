"""Speed and memory of the RF-CLIP engine per mode, as ratios to plain CLIP measured in the same run.

    python benchmarks/bench_engine.py [--model ViT-B-16] [--repeats 3] [--device auto] [--quick]
        [--batches 1 8 32 128] [--precision fp32|fp16|bf16] [--peak-tflops N] [--skip-cases]

Cases: one 336x448 image (short side 336: 6 crops), one 560x1120 image at short side 560 (the
Cityscapes setting: 36 crops), and a batch of 8 336x448 images (48 crops in shared batches), in
forwards of the backend's batch on the device (8 crops on the CPU, 32 on CUDA).
Modes: clip, maskclip, kk-proxy, rfclip, rfclip+PAMR, and on CUDA clip, rfclip and rfclip+PAMR with
each batch's encoder forward replayed from a CUDA graph; at fp16 or bf16 also clip, rfclip and
rfclip+PAMR in fp32. Weights are random (time does not depend on
them; the distraction dimensions are the OpenAI preset's). Runs are interleaved across modes and
the best run is reported, with the median and the paired median (of each round's ratio to clip:
drifts of a shared machine cancel in it). Peak memory comes from one more run of each mode, not
the timed ones: RSS growth sampled every 5 ms on the CPU, allocated device memory on CUDA. A
profile of one rfclip run shows where its extra time goes, and a 4000x3000 photo with 50 classes
and PAMR shows the peak memory above the loaded model. Runs on the CPU, then on CUDA when present
(fp16 autocast there, as the segmenter runs by default). Writes a JSON file beside the tables.

Operator launches: every forward is profiled once per mode and the operators called from Python
that do work (views left out) are counted per block: on a GPU each is at least one kernel launch,
so the count is a proxy for launch overhead that any CPU can measure.

`--batches`: the encoder alone on that many 224x224 crops per forward, clip against rfclip (on CUDA
also rfclip with its eager steps instead of the Triton kernels, `triton_kernels=False`; at fp16 or
bf16 also both in fp32, for what the precision gains): crops/s,
their ratio, the share of the device's dense peak that the physical floor (35.1 GFLOP per crop for
ViT-B/16) reaches, peak memory; where the time goes at the largest batch (device time per RF-CLIP
step, from one profiled eager forward); and how far fp16 / bf16 autocast dense features and label maps stand
from fp32's on a few images. This is the GPU check (`benchmarks/gpu_check.sh`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import arguments, machine, markdown_table, run_with_peak_memory, synchronize, timed  # noqa: E402
from rfclip_engine import RFCLIPConfig, Segmenter, SegmenterConfig, Vocabulary, load_model  # noqa: E402
from rfclip_engine.config import autocast_dtype, default_batch_size, default_precision  # noqa: E402
from rfclip_engine.graphs import DenseEncoder  # noqa: E402
from rfclip_engine.model import cpu_chunk_mb  # noqa: E402
from rfclip_engine.presets import find_preset  # noqa: E402
from rfclip_engine.process import flush_subnormal_floats  # noqa: E402
from rfclip_engine.sliding import crop_boxes  # noqa: E402

MODES = {
    "clip": dict(mode="clip"),
    "maskclip": dict(mode="maskclip"),
    "kk-proxy": dict(mode="kk-proxy"),
    "rfclip": dict(mode="rfclip"),
    "rfclip+PAMR": dict(mode="rfclip", pamr=True),
}
# on CUDA the cases also run with each batch's encoder forward replayed from a CUDA graph
GRAPHED_MODES = {
    "clip graphs": dict(mode="clip", cuda_graphs=True),
    "rfclip graphs": dict(mode="rfclip", cuda_graphs=True),
    "rfclip+PAMR graphs": dict(mode="rfclip", pamr=True, cuda_graphs=True),
}
# at fp16 or bf16 the cases also run in full precision, for what the precision gains
FULL_PRECISION_MODES = {f"{name} fp32": dict(MODES[name], precision="fp32") for name in ("clip", "rfclip", "rfclip+PAMR")}
CASES = {  # name: (image size, number of images, short side)
    "336x448": ((336, 448), 1, 336),
    "560x1120": ((560, 1120), 1, 560),
    "8 x 336x448": ((336, 448), 8, 336),
}
STEP_LABELS = ("rfclip.distractors", "rfclip.key_key", "rfclip.fiedler", "rfclip.redistribution")
# operators that only make a view or a no-op conversion: no kernel is launched for them
NO_KERNEL = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::transpose", "aten::t",
    "aten::permute", "aten::select", "aten::slice", "aten::narrow", "aten::as_strided", "aten::expand",
    "aten::expand_as", "aten::unsqueeze", "aten::squeeze", "aten::flatten", "aten::unflatten", "aten::chunk",
    "aten::split", "aten::unbind", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::view_as",
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::resolve_conj",
    "aten::contiguous", "aten::to",  # `to` and `contiguous` launch work only through a child (_to_copy, clone)
})
CROP_GFLOP = 35.1  # ViT-B/16, one 224x224 crop: the physical floor of plain CLIP's forward
DENSE_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                     "A10": 125.0, "RTX 4090": 165.0}  # dense bf16 / fp16 tensor-core peaks, by device name


def segmenter(model, mode: dict, short_side: int, precision: str) -> Segmenter:
    """At the batch the backend runs on this device (8 crops on the CPU, 32 on CUDA)."""
    config = SegmenterConfig(encoder=RFCLIPConfig(mode=mode["mode"]), short_side=short_side,
                             pamr=mode.get("pamr", False), batch_size=default_batch_size(model.device.type),
                             precision=mode.get("precision", precision), cuda_graphs=mode.get("cuda_graphs", False))
    return Segmenter(model, config)


def warm_ups(device: torch.device) -> int:
    """Untimed calls before a timed one: on CUDA a crop shape's first call checks the Triton
    kernels, a batch shape's first use runs plain and its second records the graph."""
    return 3 if device.type == "cuda" else 1


def crops(size, count, short_side) -> int:
    scale = short_side / min(size)
    h, w = round(size[0] * scale), round(size[1] * scale)
    return count * len(crop_boxes(h, w, 224, 112))


def main() -> int:
    flushed = flush_subnormal_floats()  # as every entry point does, before torch starts a thread
    parser = arguments(__file__, __doc__)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, or auto: the CPU, then CUDA when present (default)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"),
                        help="default: fp32 on the CPU, fp16 autocast on CUDA (as the segmenter runs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="only the 336x448 case")
    parser.add_argument("--skip-cases", action="store_true",
                        help="leave out the segmenter cases and the big photo (launches and --batches only)")
    parser.add_argument("--batches", type=int, nargs="*", default=[],
                        help="crops per forward for the encoder-only throughput and precision check")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's dense bf16/fp16 peak; default: from the device's name")
    args = parser.parse_args()

    if args.device == "auto":
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(args.device)]
    # the CPU's default range of crops for the explicit attention follows the cache
    report = {"machine": {**machine(), "cpu_attention_range_mb": cpu_chunk_mb()}, "subnormals_flushed": flushed,
              "model": args.model, "classes": args.classes, "devices": {}}
    for device in devices:
        precision = args.precision or default_precision(device.type)
        print(f"\n## {device} ({precision})")
        if device.type == "cpu" and not any(report["machine"]["malloc"].values()):
            print("glibc's malloc defaults: CPU times include page faults that depend on the heap's history "
                  "(README, Benchmarks: the Docker image's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_)")
        report["devices"][str(device)] = {"precision": precision, **bench_device(device, precision, args)}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


def bench_device(device: torch.device, precision: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    preset = find_preset(args.model, "openai")
    model = load_model(args.model, pretrained=None, device=device,
                       distraction_dims=list(preset.dims) if preset else None)
    memory = "peak RSS MB" if device.type == "cpu" else "peak device MB"
    vocabulary = Vocabulary.from_names([f"class {i}" for i in range(args.classes)])
    report = {"launches": launch_counts(model, device)}
    if args.batches:
        report["batches"] = bench_batches(model, device, precision, args)
    if not args.skip_cases:
        report.update(bench_cases(model, device, precision, vocabulary, memory, args))
    return report


def launch_counts(model, device: torch.device) -> dict:
    """Operators that launch work, per block, in one forward of 2 crops per mode."""
    pixels = torch.randn(2, 3, 224, 224, device=device)
    blocks = len(model.visual.transformer.resblocks)
    counts = {}
    for mode in ("clip", "kk-proxy", "rfclip"):
        config = RFCLIPConfig(mode=mode)
        model.encode_dense(pixels, config)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.encode_dense(pixels, config)
        launched = launched_operators(prof)
        steps = {label: sum(_inside(e, label) for e in launched) for label in STEP_LABELS}
        counts[mode] = {"per_forward": len(launched), "per_block": len(launched) / blocks, "per_step": steps}
    base = counts["clip"]["per_block"]
    print(f"\noperator launches per block ({blocks} blocks, one forward; views and no-op conversions left out)")
    print(markdown_table(
        ["mode", "per forward", "per block", "x clip", *(label.split(".")[1] for label in STEP_LABELS)],
        [[mode, c["per_forward"], f"{c['per_block']:.1f}", f"{c['per_block'] / base:.1f}",
          *(f"{c['per_step'][label] / blocks:.1f}" for label in STEP_LABELS)] for mode, c in counts.items()]))
    return counts


def launched_operators(prof, ignored: frozenset = frozenset()) -> list:
    """The profiled operators, called from Python, that launch work: views, no-op conversions,
    `ignored` and whatever runs inside another operator left out."""
    return [e for e in prof.events() if e.name.startswith("aten::") and e.name not in NO_KERNEL
            and e.name not in ignored and not _inside_operator(e)]


def _ancestors(event) -> Iterator[str]:
    """Names of the profiler events that enclose `event`, innermost first."""
    parent = event.cpu_parent
    while parent is not None:
        yield parent.name
        parent = parent.cpu_parent


def _inside_operator(event) -> bool:
    return any(name.startswith("aten::") for name in _ancestors(event))


def _inside(event, label: str) -> bool:
    return label in _ancestors(event)


def peak_tflops(device: torch.device, given: Optional[float] = None) -> float:
    if given or device.type != "cuda":
        return given or float("nan")
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DENSE_PEAK_TFLOPS.items() if key in name), float("nan"))


def paired_ratio(times: dict, name: str) -> float:
    """Median over rounds of a mode's time over clip's in the same round: each round runs every
    mode back to back, so the machine's slow drifts cancel, as they do not between best runs."""
    return statistics.median(t / base for t, base in zip(times[name], times["clip"]))


def bench_batches(model, device: torch.device, precision: str, args: argparse.Namespace) -> dict:
    """Encoder-only crops/s of clip and rfclip at each batch (on CUDA also replayed from CUDA
    graphs), and the autocast precision check."""
    dtype = autocast_dtype(precision)
    peak = peak_tflops(device, args.peak_tflops)
    clip, rfclip, eager_steps = RFCLIPConfig(mode="clip"), RFCLIPConfig(), RFCLIPConfig(triton_kernels=False)
    runs = {"clip": (clip, False, dtype), "rfclip": (rfclip, False, dtype)}
    if device.type == "cuda":  # the eager steps against the Triton kernels, plain and graphed
        runs.update({"rfclip eager steps": (eager_steps, False, dtype), "clip graphs": (clip, True, dtype),
                     "rfclip graphs": (rfclip, True, dtype), "rfclip eager steps graphs": (eager_steps, True, dtype)})
    if dtype is not None:  # what the autocast precision gains over full precision, in the same run
        runs.update({"clip fp32": (clip, False, None), "rfclip fp32": (rfclip, False, None)})
    encoders = {name: (DenseEncoder(model, run_dtype, cuda_graphs=graphs), config)
                for name, (config, graphs, run_dtype) in runs.items()}
    out = {"precision": precision, "peak_tflops": peak, "rows": {}}
    for batch in args.batches:
        pixels = torch.randn(batch, 3, 224, 224, device=device)
        calls = {name: (lambda e=encoder, c=config: e(pixels, c)) for name, (encoder, config) in encoders.items()}
        times = {name: [] for name in calls}
        for call in calls.values():
            for _ in range(warm_ups(device)):
                call()
        for _ in range(args.repeats):
            for name, call in calls.items():
                times[name].append(timed(call, device))
        row = {}
        for name, call in calls.items():
            _, peak_bytes = run_with_peak_memory(call, device)
            crops_per_s = batch / min(times[name])
            row[name] = {"crops_per_s": crops_per_s, "median_crops_per_s": batch / statistics.median(times[name]),
                         "paired_ratio_to_clip": paired_ratio(times, name),
                         "floor_share_of_peak": crops_per_s * CROP_GFLOP / (peak * 1e3),
                         "peak_memory_mb": peak_bytes / 2 ** 20}
        out["rows"][batch] = row
    names = list(runs)
    print(f"\nencoder alone, 224x224 crops, {precision}, best of {args.repeats}: crops/s (x clip), "
          f"% of the dense peak that {CROP_GFLOP} GFLOP per crop reach at that rate ({peak:g} TFLOPS), "
          "peak memory above the start")
    print(markdown_table(
        ["batch", *names, "rfclip / clip time, paired median", *(f"{n} % of peak" for n in names),
         *(f"{n} MB" for n in names)],
        [[b, *(f"{r[n]['crops_per_s']:.1f} ({r[n]['crops_per_s'] / r['clip']['crops_per_s']:.2f}x)" for n in names),
          f"{r['rfclip']['paired_ratio_to_clip']:.3f}x",
          *(f"{100 * r[n]['floor_share_of_peak']:.1f}" for n in names),
          *(f"{r[n]['peak_memory_mb']:.0f}" for n in names)] for b, r in out["rows"].items()]))
    out["profile"] = step_times(model, device, dtype, max(args.batches))
    if dtype is not None:
        out["agreement"] = precision_agreement(model, device, dtype)
    return out


def step_times(model, device: torch.device, dtype: Optional[torch.dtype], batch: int, top: int = 12) -> dict:
    """Where the encoder's time goes at `batch` crops, from one profiled eager forward per mode:
    device time (CPU time on the CPU) inside each RF-CLIP step and in the rest of the forward,
    and rfclip's costliest kernels. A replayed graph hides its kernels, so this is eager."""
    pixels = torch.randn(batch, 3, 224, 224, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    kind = "device" if device.type == "cuda" else "cpu"
    out = {}
    configs = {"clip": RFCLIPConfig(mode="clip"), "rfclip": RFCLIPConfig()}
    if device.type == "cuda":
        configs["rfclip eager steps"] = RFCLIPConfig(triton_kernels=False)
    for name, config in configs.items():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            model.encode_dense(pixels, config)  # warm-up
            with profile(activities=activities) as prof:
                model.encode_dense(pixels, config)
                synchronize(device)
        # a step's label holds the time of everything inside it, kernels a Triton launch made too;
        # the whole forward is the sum of the kernels' times (of every operator's own, on the CPU),
        # as the profiler's table sums it: an operator's device time and its kernels' are the same
        averages = prof.key_averages()
        totals = {label: 0.0 for label in STEP_LABELS}
        totals.update({e.key: getattr(e, f"{kind}_time_total") / 1e3 for e in averages if e.key in STEP_LABELS})
        if device.type == "cuda":
            forward = sum(e.self_device_time_total for e in prof.events()
                          if e.device_type != DeviceType.CPU and not e.is_user_annotation) / 1e3
        else:
            forward = sum(e.self_cpu_time_total for e in prof.events()) / 1e3
        out[name] = {**totals, "rest": forward - sum(totals.values())}
        if name == "rfclip":
            print(f"\nrfclip's {top} costliest operators or kernels at batch {batch}, one eager forward")
            print(averages.table(sort_by=f"self_{kind}_time_total", row_limit=top, max_name_column_width=60))
    clip_ms = sum(out["clip"].values())
    print(f"\nwhere the time goes at batch {batch}, ms of one eager forward "
          f"({'device' if device.type == 'cuda' else 'CPU'} time, profiled)")
    columns = [*(label.split(".")[1] for label in STEP_LABELS), "rest", "total", "x clip"]
    print(markdown_table(["mode", *columns],
                         [[name, *(f"{v:.2f}" for v in totals.values()), f"{sum(totals.values()):.2f}",
                           f"{sum(totals.values()) / clip_ms:.2f}"] for name, totals in out.items()]))
    return {"batch": batch, "ms": out}


def precision_agreement(model, device: torch.device, dtype: torch.dtype, images: int = 4, classes: int = 10) -> dict:
    """Dense rfclip features under autocast against fp32, and the label maps they give for random
    class embeddings: relative error, and the share of patches whose label agrees."""
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(images, 3, 224, 224, generator=generator).to(device)
    text = torch.nn.functional.normalize(torch.randn(classes, model.visual.output_dim, generator=generator), dim=-1)
    reference = model.encode_dense(pixels, RFCLIPConfig()).float()
    with torch.autocast(device.type, dtype=dtype):
        low = model.encode_dense(pixels, RFCLIPConfig()).float()
    relative = (torch.linalg.vector_norm(low - reference) / torch.linalg.vector_norm(reference)).item()
    labels = [torch.nn.functional.normalize(f, dim=-1) @ text.to(device).T for f in (reference, low)]
    agree = (labels[0].argmax(-1) == labels[1].argmax(-1)).float().mean().item()
    print(f"\n{dtype} autocast vs fp32, rfclip, {images} crops: dense features relative error {relative:.2e}, "
          f"patch labels agree {100 * agree:.2f} %")
    return {"relative_error": relative, "label_agreement": agree}


def bench_cases(model, device: torch.device, precision: str, vocabulary, memory: str,
                args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    cases = {"336x448": CASES["336x448"]} if args.quick else CASES
    modes = {**MODES, **(GRAPHED_MODES if device.type == "cuda" else {}),
             **(FULL_PRECISION_MODES if precision != "fp32" else {})}
    repeats = args.repeats

    results = {}
    for case, (size, count, short_side) in cases.items():
        images = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]
        runners = {name: segmenter(model, mode, short_side, precision) for name, mode in modes.items()}
        for runner in runners.values():
            runner.logits_many(images[:1], vocabulary)  # text embeddings cached
            for _ in range(warm_ups(device) - 1):
                runner.logits_many(images, vocabulary)
        times = {name: [] for name in modes}
        for _ in range(repeats):
            for name, runner in runners.items():
                times[name].append(timed(lambda r=runner: r.logits_many(images, vocabulary), device))
        # memory in runs of their own: the RSS sampling thread competes for the GIL and would tax
        # the modes with more, smaller ops in the timed runs
        peaks = {name: run_with_peak_memory(lambda r=runner: r.logits_many(images, vocabulary), device)[1]
                 for name, runner in runners.items()}
        n_crops = crops(size, count, short_side)
        # The fastest of the interleaved runs estimates the cost best on a shared, noisy machine;
        # the median is kept beside it.
        base = min(times["clip"])
        results[case] = {
            name: {"seconds": min(t), "median_seconds": statistics.median(t), "images_per_s": count / min(t),
                   "crops_per_s": n_crops / min(t), "ratio_to_clip": min(t) / base,
                   "median_ratio_to_clip": statistics.median(t) / statistics.median(times["clip"]),
                   "paired_ratio_to_clip": paired_ratio(times, name),
                   "peak_memory_mb": peaks[name] / 2 ** 20, "runs": t}
            for name, t in times.items()
        }
        print(f"\n{case} ({count} image(s), {n_crops} crops, {args.classes} classes, best of {repeats} runs)")
        print(markdown_table(
            ["mode", "s / batch", "images/s", "crops/s", "x clip", "x clip (median)", "x clip (paired median)",
             memory],
            [[name, f"{r['seconds']:.3f}", f"{r['images_per_s']:.2f}", f"{r['crops_per_s']:.1f}",
              f"{r['ratio_to_clip']:.2f}", f"{r['median_ratio_to_clip']:.2f}", f"{r['paired_ratio_to_clip']:.2f}",
              f"{r['peak_memory_mb']:.0f}"]
             for name, r in results[case].items()]))

    # a 12-megapixel photo, 50 classes, PAMR: peak memory above the loaded model
    big_vocabulary = Vocabulary.from_names([f"class {i}" for i in range(50)])
    photo = np.asarray(torch.nn.functional.interpolate(
        torch.from_numpy(rng.integers(0, 256, (3, 60, 80)).astype(np.float32))[None], size=(3000, 4000),
        mode="bilinear")[0].permute(1, 2, 0).clamp(0, 255).to(torch.uint8))
    big = segmenter(model, MODES["rfclip+PAMR"], 336, precision)
    big.predict(photo[:400, :400], big_vocabulary)  # text embeddings of 50 classes cached
    seconds, peak = run_with_peak_memory(lambda: big.predict(photo, big_vocabulary), device)
    big_image = {"size": [3000, 4000], "classes": 50, "mode": "rfclip+PAMR", "seconds": seconds,
                 "peak_memory_above_loaded_model_mb": peak / 2 ** 20}
    print(f"\n4000x3000 photo, 50 classes, rfclip+PAMR: {seconds:.2f} s, {memory} above the loaded model: "
          f"{peak / 2 ** 20:.0f}")

    size, count, short_side = CASES["336x448"]
    image = [rng.integers(0, 256, (*size, 3), dtype=np.uint8)]
    runner = segmenter(model, MODES["rfclip"], short_side, precision)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        runner.logits_many(image, vocabulary)
        synchronize(device)
    # on CUDA a step's cost is its kernels' time, not the time spent launching them
    attribute = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    totals = {e.key: getattr(e, attribute) / 1e3 for e in prof.key_averages() if e.key in STEP_LABELS}
    clip_ms = results["336x448"]["clip"]["seconds"] * 1e3
    breakdown = {label: {"ms": totals.get(label, 0.0), "percent_of_clip": 100 * totals.get(label, 0.0) / clip_ms}
                 for label in STEP_LABELS}
    print("\nwhere rfclip's extra time goes (one 336x448 image, profiled, so slower than above; "
          "redistribution includes the explicit attention it needs)")
    print(markdown_table(["step", "ms", "% of a clip run"],
                         [[k, f"{v['ms']:.1f}", f"{v['percent_of_clip']:.1f}"] for k, v in breakdown.items()]))
    return {"results": results, "big_image": big_image, "rfclip_breakdown": breakdown}


if __name__ == "__main__":
    sys.exit(main())
