"""The `rfclip` command: `segment` images into an open vocabulary, `calibrate` a backbone.

    rfclip segment IMAGE_OR_DIR --labels "cat,dog,grass" --out OUT [--pamr] [--checkpoint PATH] [--examples DIR]
    rfclip calibrate --model NAME --checkpoint PATH --images DIR --out dims.json
    rfclip eval --dataset voc21 --root data/VOCdevkit/VOC2012 [--pamr] [--limit N] [--out results.json]

Exit status: 0 when every image was processed, 1 when some could not be read or segmented, 2 on bad usage.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .calibrate import calibrate
from .config import (
    MODES,
    PRECISIONS,
    RFCLIPConfig,
    SegmenterConfig,
    default_batch_size,
    images_per_batch,
    labelling_settings,
    resolve_precision,
)
from .evaluation import SegmentationDataset, dataset_specs, evaluate, format_table
from .files import content_digest
from .folder import RUN_RECORD, Pictures, segment_files, start_run
from .imageio import ImageError, admit_pixels, load_rgb, read_label_map
from .loading import WeightsUnavailableError, load_model, resolve_device
from .model import RFCLIPModel
from .predictor import Segmenter
from .prototypes import Example, Prototypes
from .presets import save_preset_file
from .process import INTERRUPTED, flush_subnormal_floats
from .text import FolderCache, TextEmbedder, Vocabulary
from .visualize import palette

log = logging.getLogger("rfclip")
IMAGE_SUFFIXES = {s.lower() for s, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


class UsageError(Exception):
    pass


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="ViT-B-16", help="open_clip model name or model config .json (default ViT-B-16)")
    group.add_argument("--pretrained", default="openai", help="open_clip pretrained tag, downloaded once (default openai)")
    group.add_argument("--checkpoint", help="local checkpoint file (OpenAI .pt or open_clip .pt/.bin/.safetensors); "
                                            "overrides --pretrained, needs no network")
    group.add_argument("--weights-tag", help="which released weights a local open_clip-format file holds (e.g. openai), "
                                             "to pick their preset and activation; OpenAI .pt files need no tag")
    group.add_argument("--distraction-dims", help="calibration file from `rfclip calibrate`, or comma-separated indices")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def _default_text_cache() -> Optional[str]:
    try:
        return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rfclip" / "text")
    except RuntimeError:  # no home folder (a container's user without one): nothing is kept
        return None


def _add_text_cache_arguments(parser: argparse.ArgumentParser) -> None:
    default = _default_text_cache()
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--text-cache", default=default,
                       help=f"keep the classes' text embeddings here between runs, about 2 KB a class name or "
                            f"synonym, at most 64 MB (default {default or 'none: no home folder'})")
    group.add_argument("--no-text-cache", dest="text_cache", action="store_const", const=None,
                       help="compute the text embeddings anew and keep nothing")


def _text_cache(args: argparse.Namespace) -> Optional[FolderCache]:
    return FolderCache(Path(args.text_cache)) if args.text_cache else None


def _embed_text(text: TextEmbedder, vocabulary: Vocabulary, quiet: bool) -> None:
    """Embeds the class names not cached yet, a text batch at a time, under a progress bar: 150 of
    them take a minute of CPU, which the images' bar showed as a run doing nothing, and all their
    prompts' features at once took memory in proportion to the vocabulary."""
    missing = len(text.missing(vocabulary.queries))
    with tqdm(total=missing, desc="text embeddings", unit="name",
              disable=quiet or missing <= text.queries_per_batch) as bar:
        while embedded := text.embed_next_batch(vocabulary.queries):
            bar.update(embedded)


def positive_int(raw: str) -> int:
    """argparse's type for a count; a string default (e.g. from the environment) is checked too."""
    value = int(raw)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {raw}")
    return value


def _add_method_arguments(parser: argparse.ArgumentParser, short_side: Optional[int],
                          prob_threshold: Optional[float]) -> None:
    """Method and pre/post-processing switches shared by `segment` and `eval` (None: the dataset's)."""
    parser.add_argument("--mode", choices=MODES, default="rfclip")
    method = parser.add_argument_group("RF-CLIP method (defaults: the paper's)")
    method.add_argument("--sigma", type=float, default=5.0, help="distraction threshold, in multiples of 1/width")
    method.add_argument("--beta", type=float, default=0.4, help="fraction of attention moved off distraction tokens")
    method.add_argument("--no-embedding-redistribution", action="store_true", help="ablation: skip step 2")
    method.add_argument("--no-attention-redistribution", action="store_true", help="ablation: skip step 4")
    method.add_argument("--no-defocus-localization", action="store_true",
                        help="ablation: give the attention to all non-distraction tokens instead of the Fiedler cut")
    per_dataset = "the dataset's"
    parser.add_argument("--pamr", action="store_true", help="refine with PAMR (slower, sharper edges)")
    parser.add_argument("--short-side", type=int, default=short_side,
                        help=f"resize so the short side has this size (default {short_side or per_dataset})")
    parser.add_argument("--window", type=int, default=224, help="sliding-window size (default 224)")
    parser.add_argument("--stride", type=int, default=112, help="sliding-window stride (default 112)")
    parser.add_argument("--whole-image", action="store_true", help="encode the whole image at once instead of windows")
    parser.add_argument("--prob-threshold", type=float, default=prob_threshold,
                        help="leave pixels below this probability unlabeled (default "
                             f"{per_dataset if prob_threshold is None else prob_threshold})")
    parser.add_argument("--batch-size", type=positive_int,
                        help="crops per forward pass (default: 32 on CUDA, 8 elsewhere)")
    parser.add_argument("--images-per-batch", type=positive_int,
                        help="images whose crops share forward passes (default: a quarter of --batch-size, at least 4)")
    parser.add_argument("--precision", choices=("auto",) + PRECISIONS, default="auto",
                        help="auto: fp16 autocast on CUDA, fp32 on CPU; bf16 autocast on a CPU with AMX "
                             "(Intel Xeon of the 4th generation and later) segments 2.4-2.7x faster than fp32 there, "
                             "and is slower than fp32 on other CPUs")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, replay the encoder's forward from recorded CUDA graphs, one per batch shape "
                             "(several times faster at small batches; default: on)")
    parser.add_argument("--triton-kernels", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, run the RF-CLIP steps as Triton kernels where they can run (default: on); "
                             "off: the eager steps, the same result up to rounding")


def segmenter_config(args: argparse.Namespace, device: torch.device) -> SegmenterConfig:
    return SegmenterConfig(
        encoder=RFCLIPConfig(
            mode=args.mode,
            sigma=args.sigma,
            beta=args.beta,
            embedding_redistribution=not args.no_embedding_redistribution,
            attention_redistribution=not args.no_attention_redistribution,
            defocus_localization=not args.no_defocus_localization,
            triton_kernels=args.triton_kernels,
        ),
        short_side=args.short_side,
        window=None if args.whole_image else args.window,
        stride=args.stride,
        pamr=args.pamr,
        prob_threshold=args.prob_threshold,
        batch_size=args.batch_size or default_batch_size(device.type),
        precision=resolve_precision(args.precision, device.type),
        cuda_graphs=args.cuda_graphs,
    )


def images_per_group(args: argparse.Namespace, config: SegmenterConfig) -> int:
    """Images whose crops share the encoder's batches: --images-per-batch, else the batch's default."""
    return args.images_per_batch or images_per_batch(config.batch_size)


def _load(args: argparse.Namespace):
    dims = args.distraction_dims
    if dims and not Path(dims).is_file():
        try:
            dims = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            raise UsageError(f"--distraction-dims: {dims!r} is neither a file nor comma-separated integers") from None
    return load_model(args.model, pretrained=args.checkpoint or args.pretrained, device=_usable_device(args.device),
                      distraction_dims=dims, weights_tag=args.weights_tag)


def _usable_device(name: str) -> torch.device:
    """--device, refused before the weights load where this process cannot use it (torch says so
    only when the loaded model is moved there, in its own words)."""
    try:
        device = resolve_device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name}: {err}") from None
    seen = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and (device.index or 0) >= seen:
        raise UsageError(f"--device {name}: " + (f"this process sees {seen} CUDA GPU(s)" if seen else
                                                  "no CUDA GPU is visible to this process (use --device cpu)"))
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: Apple's MPS is not available here (use --device cpu)")
    return device


def _list_images(target: Path, recursive: bool = False, leave_out: Sequence[Path] = ()) -> List[Path]:
    """The image files of a folder, sorted (with `recursive`, of its subfolders too, but for the
    folders in `leave_out`, hidden folders and linked ones), or the one file given. An image's
    name that links to nothing is listed too: reading it fails, and the run says so, where
    leaving it out would hide a dataset moved from under its links."""
    if target.is_dir():
        found = _walk(target, {p.resolve() for p in leave_out}) if recursive else target.iterdir()
        files = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or _dangling(p)))
        if not files:
            nested = not recursive and any(p.is_dir() for p in target.iterdir())
            raise UsageError(f"no image files in {target}" + (" (--recursive reads its subfolders)" if nested else ""))
        return files
    if target.is_file():
        return [target]
    # a pipe or a device would be read until it ends, if ever
    raise UsageError(f"{target} is not a file or a folder" if target.exists() else
                     f"{target} links to {os.readlink(target)}, which does not exist" if _dangling(target) else
                     f"{target} does not exist")


def _dangling(path: Path) -> bool:
    """A link whose target is missing, or a loop of links."""
    return path.is_symlink() and not path.exists()


def _walk(folder: Path, leave_out: Set[Path]) -> Iterator[Path]:
    # links to folders are not followed (a link to a parent would never end); hidden folders
    # (.git, .ipynb_checkpoints) hold no dataset; the output and examples folders hold pictures
    for parent, folders, names in os.walk(folder):
        folders[:] = sorted(f for f in folders
                            if not f.startswith(".") and (Path(parent) / f).resolve() not in leave_out)
        yield from (Path(parent) / name for name in names)


def _output_stems(files: Sequence[Path], root: Path) -> List[str]:
    """Output names: each file's path under `root` without its extension ("city/a" for
    root/city/a.png), kept where two inputs of a folder share a stem, and a number added where
    that meets another file's own stem ("a.jpg" and "a.png" beside "a_jpg.png"): one output per
    input, in time linear in the number of files."""
    relative = [path.relative_to(root) for path in files]
    shared = Counter(r.with_suffix("").as_posix() for r in relative)
    used: Set[str] = set()
    stems = []
    for r in relative:
        stem = r.with_suffix("").as_posix()
        if shared[stem] > 1:
            stem = (r.parent / r.name.replace(".", "_")).as_posix()
        unique, n = stem, 1
        while unique in used:
            n += 1
            unique = f"{stem}_{n}"
        used.add(unique)
        stems.append(unique)
    return stems


def read_vocabulary(args: argparse.Namespace) -> Vocabulary:
    """The classes of --labels or --labels-file, each given once."""
    if args.labels_file:
        try:
            # UTF-8 whatever the locale, and without the byte-order mark Windows' Notepad writes: it
            # would have been part of the first class's name, and of its prompts
            lines = Path(args.labels_file).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--labels-file {args.labels_file} cannot be read: {err}") from None
        specs = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    elif args.labels:
        specs = [spec.split("|") for spec in args.labels.split(",") if spec.strip()]
    else:
        raise UsageError("give the class names with --labels \"cat,dog,grass\" or --labels-file FILE")
    try:
        vocabulary = Vocabulary.from_names(specs)
    except ValueError as err:
        raise UsageError(str(err)) from None
    # a pixel goes to the first of two equal scores: a class named twice is never drawn the second time
    twice = [name for name, count in Counter(vocabulary.names).items() if count > 1]
    if twice:
        raise UsageError(f"class {twice[0]!r} is given twice: give each class once")
    return vocabulary


LABEL_MAP_SUFFIX = "_labelmap.png"


def _example_pairs(folder: Path) -> List[Tuple[Path, Path]]:
    """(image, label map) pairs of an examples folder: NAME_labelmap.png beside NAME.<image>."""
    if not folder.is_dir():
        raise UsageError(f"--examples {folder}: not a folder")
    images = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
              and not p.name.endswith(LABEL_MAP_SUFFIX)}
    pairs = []
    for label_map in sorted(folder.glob(f"*{LABEL_MAP_SUFFIX}")):
        stem = label_map.name[: -len(LABEL_MAP_SUFFIX)]
        if stem not in images:
            raise UsageError(f"--examples: {label_map.name} has no image {stem}.<png|jpg|...> beside it")
        pairs.append((images[stem], label_map))
    if not pairs:
        raise UsageError(f"--examples {folder}: no NAME{LABEL_MAP_SUFFIX} label maps (class indices in --labels "
                         "order, 255 unlabeled: what --raw writes)")
    return pairs


def _learn_examples(segmenter: Segmenter, pairs: Sequence[Tuple[Path, Path]], vocabulary: Vocabulary,
                    max_pixels: int, quiet: bool) -> Optional[Prototypes]:
    """Each class's examples from the (image, label map) pairs."""
    per_class: List[List[Example]] = [[] for _ in vocabulary.names]
    for image_path, map_path in tqdm(pairs, unit="example", desc="examples", disable=quiet):
        try:
            rgb = load_rgb(image_path, max_pixels)
            labels = read_label_map(map_path, max_pixels)
        except (ImageError, OSError) as err:
            raise UsageError(f"--examples: {image_path.name} or its label map cannot be read: {err}") from None
        if labels.ndim != 2 or labels.shape != rgb.shape[:2]:
            raise UsageError(f"--examples: {map_path.name} must be a single-channel map of its image's size "
                             f"{rgb.shape[1]}x{rgb.shape[0]}, not {labels.shape}")
        unlabeled = np.iinfo(labels.dtype).max if labels.dtype.kind in "ui" else None
        values = set(np.unique(labels).tolist()) - {unlabeled}
        if any(not 0 <= v < len(vocabulary) for v in values):
            raise UsageError(f"--examples: {map_path.name} holds class indices {sorted(values)}, but --labels has "
                             f"{len(vocabulary)} classes (0 to {len(vocabulary) - 1}; {unlabeled} = unlabeled)")
        present = sorted(values)
        for c, example in zip(present, segmenter.examples(rgb, np.stack([labels == c for c in present]))):
            if example is not None:
                per_class[c].append(example)
    counts = ", ".join(f"{name} {len(found)}" for name, found in zip(vocabulary.names, per_class) if found)
    print(f"examples per class: {counts or 'none'}", file=sys.stderr)
    return segmenter.prototypes(per_class)


def segment_command(args: argparse.Namespace) -> int:
    admit_pixels(args.max_pixels)
    vocabulary = read_vocabulary(args)
    source, out = Path(args.input), Path(args.out)
    pairs_folder = Path(args.examples) if args.examples else None
    files = _list_images(source, args.recursive, [out] + ([pairs_folder] if pairs_folder else []))
    pairs = _example_pairs(pairs_folder) if pairs_folder else []  # bad usage is said before the model loads
    if source.is_dir() and out.resolve() == source.resolve():
        raise UsageError(f"--out {out} is the input folder: the next run (or --resume) would read its pictures "
                         "as images to segment; give another folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a folder for the pictures")
    out.mkdir(parents=True, exist_ok=True)
    model = _load(args)
    config = segmenter_config(args, model.device)
    segmenter = Segmenter(model, config, max_pixels=args.max_pixels, text_cache=_text_cache(args))
    _embed_text(segmenter.text, vocabulary, args.quiet)
    prototypes = _learn_examples(segmenter, pairs, vocabulary, args.max_pixels, args.quiet) if pairs else None
    colors = palette(len(vocabulary))
    classes = [{"index": i, "name": n, "queries": list(q), "color": colors[i].tolist()}
               for i, (n, q) in enumerate(zip(vocabulary.names, vocabulary.classes))]
    started, resumed = start_run(out, _run_settings(model, config, classes, pairs), args.resume)
    (out / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")

    pictures = Pictures(out, vocabulary.names, colors, args.raw)
    stems = _output_stems(files, source if source.is_dir() else source.parent)
    # a million images on a network file system are minutes of file times to read: shown past a second
    checked = tqdm(zip(files, stems), total=len(files), desc="finding what was segmented", unit="image", delay=1,
                   disable=not resumed or args.quiet)
    todo = [(path, stem) for path, stem in checked if not (resumed and pictures.written_since(stem, started))]
    checked.close()
    if resumed:
        print(f"resuming: {len(files) - len(todo)} of {len(files)} image(s) were segmented into {out} before",
              file=sys.stderr)
    elif args.resume:
        print(f"resuming: no run is recorded in {out} ({RUN_RECORD}): segmenting every image", file=sys.stderr)
    failed: List[Tuple[Path, str]] = []
    progress = tqdm(total=len(todo), unit="image", disable=len(todo) <= 1 or args.quiet)
    group = images_per_group(args, config)
    # the threads mostly wait on the model on the CPU; on a GPU's host they are the run's pace
    threads = min(8, os.cpu_count() or 2)
    done = 0
    try:
        for path, error in segment_files(segmenter, todo, vocabulary, pictures, group, args.max_pixels, prototypes,
                                         threads):
            done += 1
            if error is not None:
                failed.append((path, error))
                tqdm.write(f"error: {path}: {error}", file=sys.stderr)
            progress.set_postfix_str(path.name)
            progress.update(1)
    except KeyboardInterrupt:
        # the pictures being written were finished before the threads stopped: each is whole
        progress.close()
        print(f"interrupted after {done} of {len(todo)} image(s): the same command with --resume segments "
              "the rest", file=sys.stderr)
        return INTERRUPTED
    progress.close()

    print(f"segmented {len(todo) - len(failed)} of {len(todo)} image(s) into {out}", file=sys.stderr)
    for path, reason in failed:
        print(f"  failed: {path}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def _run_settings(model: RFCLIPModel, config: SegmenterConfig, classes: list,
                  example_pairs: Sequence[Tuple[Path, Path]]) -> dict:
    """What a run's labels depend on, which a resumed run must share: how forwards are executed
    (device, batch, precision, graphs, kernels) may change, as it moves labels by rounding only.
    The examples count by their names and contents, not by their folder's path."""
    return {"model": model.model_name, "weights": model.weights_id,
            "distraction": model.preset.to_json() if model.preset else None, "config": labelling_settings(config),
            "classes": [{key: c[key] for key in ("name", "queries")} for c in classes],
            "examples": {path.name: content_digest(path) for pair in example_pairs for path in pair} or None}


def _readable_images(files: Sequence[Path], max_pixels: Optional[int]) -> Iterator[np.ndarray]:
    for path in tqdm(files, unit="image"):
        try:
            yield load_rgb(path, max_pixels)
        except (ImageError, OSError) as err:
            tqdm.write(f"skipped: {path}: {err}", file=sys.stderr)


def calibrate_command(args: argparse.Namespace) -> int:
    admit_pixels(args.max_pixels)
    found = _list_images(Path(args.images), args.recursive)
    # spread over the sorted list, so that every subfolder of a big tree takes its share, not the
    # first few; a few hundred images are enough, and a whole dataset would take days
    files = found
    if len(found) > args.limit:
        files = [found[i * len(found) // args.limit] for i in range(args.limit)]
        print(f"calibrating on {len(files)} of the {len(found)} images, spread over the folder (--limit to change)",
              file=sys.stderr)
    args.distraction_dims = None
    model = _load(args)
    result = calibrate(model, _readable_images(files, args.max_pixels), factor=args.factor)
    ratios = result.ratios
    print(f"{model.model_name} ({model.weights_id}), {result.images} images; channels above "
          f"{args.factor:g}x the median channel:")
    for d in result.dims:
        print(f"  {d:5d}  {ratios[d]:.1f}x")
    top = torch.topk(ratios, k=min(10, len(ratios)))
    print("strongest channels: " + ", ".join(f"{int(i)} ({v:.1f}x)" for v, i in zip(top.values, top.indices)))
    if not result.dims:
        print("no channel stands out; try more images or a lower --factor", file=sys.stderr)
        return 1
    save_preset_file(args.out, result.preset(args.attention_test), model=model.model_name,
                     weights=model.weights_id, images=result.images, factor=args.factor)
    print(f"wrote {args.out}; use it with --distraction-dims {args.out}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    dataset = SegmentationDataset.open(args.dataset, Path(args.root))
    if args.short_side is None:
        args.short_side = dataset.spec["short_side"]
    if args.prob_threshold is None:
        args.prob_threshold = dataset.spec["prob_threshold"]
    model = _load(args)
    config = segmenter_config(args, model.device)
    segmenter = Segmenter(model, config, text_cache=_text_cache(args))
    vocabulary = dataset.vocabulary
    _embed_text(segmenter.text, vocabulary, args.quiet)

    def predict(rgbs: List[np.ndarray]) -> List[np.ndarray]:
        return [found.label_map.numpy() for found in segmenter.predict_many(rgbs, vocabulary)]

    summary = evaluate(predict, dataset, args.limit, progress=not args.quiet,
                       images_per_group=images_per_group(args, config))
    print(format_table(summary))
    if args.out:
        summary["settings"] = {"model": model.model_name, "weights": model.weights_id,
                               "config": dataclasses.asdict(config)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 1 if summary["skipped"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rfclip", description="Training-free open-vocabulary segmentation with RF-CLIP")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment an image or a folder of images",
                         description="Writes per image NAME_labels.png (colour label map), NAME_overlay.jpg "
                                     "(image + legend), with --raw NAME_labelmap.png (class indices), and classes.json.")
    seg.add_argument("input", help="an image file or a folder of images")
    seg.add_argument("--labels", help='comma-separated classes; synonyms with "|": "person|man|woman,dog,grass"')
    seg.add_argument("--labels-file", help="one class per line, synonyms comma-separated: person, man, woman")
    seg.add_argument("--out", required=True, help="output folder")
    _add_method_arguments(seg, short_side=336, prob_threshold=0.0)
    seg.add_argument("--recursive", action="store_true",
                     help="also segment the images in the input folder's subfolders, their pictures in the same "
                          "subfolders of --out (hidden folders, linked folders, --out and --examples left out)")
    seg.add_argument("--raw", action="store_true", help="also write the raw label map")
    seg.add_argument("--resume", action="store_true",
                     help="go on with an interrupted run into the same --out: images whose pictures it wrote are "
                          "skipped (refused if its classes, method settings or examples differ)")
    seg.add_argument("--examples", help="a folder of corrected examples: NAME.png (or .jpg, ...) with "
                                        "NAME_labelmap.png (class indices in --labels order, 255 unlabeled, as --raw "
                                        "writes); each class's mean feature inside its pixels joins its text")
    seg.add_argument("--max-pixels", type=positive_int, default=100_000_000, help="refuse larger images (default 1e8)")
    seg.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_text_cache_arguments(seg)
    _add_model_arguments(seg)
    seg.set_defaults(run=segment_command)

    ev = sub.add_parser("eval", help="mIoU on a standard benchmark",
                        description="Per-class IoU, mIoU and aAcc (MMSegmentation's IoUMetric) on a dataset in its "
                                    "standard layout; --root is the dataset folder (e.g. data/VOCdevkit/VOC2012).")
    ev.add_argument("--dataset", required=True, choices=sorted(dataset_specs()))
    ev.add_argument("--root", required=True, help="the dataset folder")
    ev.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N images only")
    ev.add_argument("--out", help="write the results as JSON here")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_text_cache_arguments(ev)
    _add_method_arguments(ev, short_side=None, prob_threshold=None)
    _add_model_arguments(ev)
    ev.set_defaults(run=eval_command)

    cal = sub.add_parser("calibrate", help="find the distraction dimensions of a backbone without a preset")
    cal.add_argument("--images", required=True, help="a folder of images (a few hundred of any kind)")
    cal.add_argument("--out", required=True, help="JSON file to write")
    cal.add_argument("--recursive", action="store_true", help="also read the images of its subfolders")
    cal.add_argument("--limit", type=positive_int, default=1000,
                     help="use at most this many images, spread over the folder (default 1000)")
    cal.add_argument("--factor", type=float, default=5.0, help="a channel is a distraction dimension above this "
                                                               "multiple of the median channel (default 5)")
    cal.add_argument("--attention-test", action="store_true", help="also require the attention test (as for ViT-L/14)")
    cal.add_argument("--max-pixels", type=positive_int, default=100_000_000)
    _add_model_arguments(cal)
    cal.set_defaults(run=calibrate_command)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    flush_subnormal_floats()  # before torch starts a thread: threads copy the flag when created
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("huggingface_hub").propagate = False  # it prints its lines itself: once is enough
    try:
        return args.run(args)
    except UsageError as err:
        parser.error(str(err))
    except WeightsUnavailableError as err:
        print(f"error: {err.reason}.\nOffline, pass a checkpoint file instead: --checkpoint /path/to/{err.model}.pt "
              f"(OpenAI's release file, or an open_clip state dict with --weights-tag {err.tag}), "
              f"or copy the weights into {err.cache_dir} beforehand.", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as err:  # OSError: an output that cannot be written, too
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback through torch
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
