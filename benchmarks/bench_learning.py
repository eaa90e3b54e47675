"""What corrected masks teach the model: mIoU of text-only predictions against predictions with
visual prototypes from 1, 2, 4, 8 and 16 corrected images, and which task score ranks the
images to review best.

    python benchmarks/bench_learning.py [--model ViT-B-16] [--seeds 3] [--classes 6] [--quick]

The weights are random, so the text tower says nothing about the images; the dense features
still carry colour and texture. The set is synthetic: each class a colour and a texture
(stripes, checks, dots, noise), images a random Voronoi layout of them, with the true label map.
Per seed, 16 "corrected" images (their true masks become examples, as a webhook would learn
them) and 8 held-out images of the same classes. Reported: mIoU (mean and spread over the seeds)
for text only and after n corrected images, beside the prototypes alone (w = 1) from the same
images, and a check that can fail: one image's examples under the wrong labels. Then the Spearman correlation,
over every held-out prediction, between each candidate task score (mean top probability, mean
margin, 1 - normalized entropy) and the image's pixel accuracy: the higher, the better sorting by
it puts the worst predictions first. Last, the added cost: a prediction with prototypes against
one without, and one learned annotation against one prediction. Writes bench_learning.json.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import arguments, machine, markdown_table  # noqa: E402
from rfclip_engine import Segmenter, SegmenterConfig, Vocabulary, load_model  # noqa: E402
from rfclip_engine.evaluation import IoUAccumulator  # noqa: E402
from rfclip_engine.presets import find_preset  # noqa: E402

COLOURS = [(220, 40, 40), (40, 170, 60), (50, 80, 220), (230, 200, 40), (160, 60, 200), (40, 200, 210),
           (240, 130, 30), (120, 120, 120)]
NAMES = ["red stripes", "green checks", "blue dots", "yellow waves", "purple noise", "cyan bars",
         "orange grid", "grey speckle"]
CURVE = (1, 2, 4, 8, 16)
SIZE = 224


def texture(kind: int, rng: np.random.Generator) -> np.ndarray:
    """(SIZE, SIZE) in [0, 1]: a pattern per class, with a random phase."""
    y, x = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    y, x = y + rng.integers(0, 32), x + rng.integers(0, 32)
    patterns = [
        lambda: (y // 6) % 2,  # horizontal stripes
        lambda: ((y // 16) + (x // 16)) % 2,  # checks
        lambda: ((y % 14 < 6) & (x % 14 < 6)).astype(np.float32),  # dots
        lambda: 0.5 + 0.5 * np.sin((x + 8 * np.sin(y / 9)) / 4),  # waves
        lambda: rng.random((SIZE, SIZE)),  # noise
        lambda: (x // 10) % 2,  # vertical bars
        lambda: ((y % 20 < 3) | (x % 20 < 3)).astype(np.float32),  # grid lines
        lambda: (rng.random((SIZE, SIZE)) < 0.15).astype(np.float32),  # speckle
    ]
    return patterns[kind]().astype(np.float32)


def synthetic_image(classes: int, rng: np.random.Generator):
    """(SIZE, SIZE, 3) uint8 image and its (SIZE, SIZE) label map: a Voronoi layout of 4-7 cells."""
    cells = rng.integers(4, 8)
    points = rng.random((cells, 2)) * SIZE
    owner = rng.integers(0, classes, cells)
    owner[: min(cells, 3)] = rng.choice(classes, min(cells, 3), replace=False)  # at least 3 classes
    y, x = np.mgrid[:SIZE, :SIZE]
    nearest = np.argmin((y[..., None] - points[:, 0]) ** 2 + (x[..., None] - points[:, 1]) ** 2, axis=-1)
    labels = owner[nearest]
    image = np.zeros((SIZE, SIZE, 3), np.float32)
    for c in range(classes):
        where = labels == c
        if where.any():
            shade = 0.55 + 0.45 * texture(c, rng)
            image[where] = (np.array(COLOURS[c], np.float32) * shade[..., None])[where]
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


def learn(seg: Segmenter, images, label_maps, classes: int, names_of=None):
    """Each class's examples from the true masks of the images, oldest first; `names_of` relabels
    (the failing check)."""
    per_class = [[] for _ in range(classes)]
    for image, labels in zip(images, label_maps):
        present = [c for c in range(classes) if (labels == c).any()]
        masks = np.stack([labels == c for c in present])
        for c, example in zip(present, seg.examples(image, masks)):
            if example is not None:
                per_class[names_of[c] if names_of else c].append(example)
    return per_class


def scores(prediction) -> dict:
    probs = prediction.probs.double()
    top2 = probs.topk(2, dim=0).values
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(0) / np.log(probs.shape[0])
    return {"mean top probability": float(top2[0].mean()), "mean margin": float((top2[0] - top2[1]).mean()),
            "1 - normalized entropy": float((1 - entropy).mean())}


def evaluate(seg: Segmenter, vocabulary: Vocabulary, tests, prototypes, classes: int, ranking: list):
    accumulator = IoUAccumulator(classes)
    for image, labels in tests:
        logits = seg.logits_many([image], vocabulary, prototypes=prototypes)[0]
        prediction = seg.decide(logits, vocabulary.names, labels.shape)
        label_map = prediction.label_map.numpy().astype(np.int64)
        accumulator.add(label_map, labels)
        ranking.append({**scores(prediction), "accuracy": float((label_map == labels).mean())})
    return accumulator.summary(vocabulary.names)["mIoU"]


def run_seed(seg: Segmenter, vocabulary: Vocabulary, classes: int, seed: int, n_train: int, n_test: int, ranking):
    """{row: (mIoU with text and prototypes, mIoU of the prototypes alone)} for one seed."""
    rng = np.random.default_rng(seed)
    train = [synthetic_image(classes, rng) for _ in range(n_train)]
    tests = [synthetic_image(classes, rng) for _ in range(n_test)]
    per_image = [learn(seg, [image], [labels], classes) for image, labels in train]
    # w = 1 for every class with examples: what the prototypes achieve without the text
    alone = Segmenter(seg.model, replace(seg.config, prototype_k=1e-9, prototype_cap=1.0), seg.text.cache)
    results = {"text only": (evaluate(seg, vocabulary, tests, None, classes, ranking), None)}
    for n in (c for c in CURVE if c <= n_train):
        per_class = [[e for image in per_image[:n] for e in image[c]] for c in range(classes)]
        results[f"{n} corrected"] = (evaluate(seg, vocabulary, tests, seg.prototypes(per_class), classes, ranking),
                                     evaluate(alone, vocabulary, tests, alone.prototypes(per_class), classes, []))
    wrong = {c: (c + 1) % classes for c in range(classes)}
    relabeled = learn(seg, [train[0][0]], [train[0][1]], classes, names_of=wrong)
    results["1 corrected, wrong labels"] = (
        evaluate(seg, vocabulary, tests, seg.prototypes(relabeled), classes, []), None)
    return results, per_class, tests


def costs(seg: Segmenter, vocabulary: Vocabulary, per_class, tests, repeats: int) -> dict:
    images = [image for image, _ in tests]
    prototypes = seg.prototypes(per_class)
    seg.logits_many(images[:1], vocabulary)  # warm-up

    def best(work) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        return min(times)

    masks = np.stack([tests[0][1] == c for c in range(len(vocabulary))])
    plain = best(lambda: seg.logits_many(images[:1], vocabulary))
    with_prototypes = best(lambda: seg.logits_many(images[:1], vocabulary, prototypes=prototypes))
    learning = best(lambda: seg.examples(images[0], masks))
    return {"prediction s": plain, "with prototypes s": with_prototypes,
            "prototypes": int(prototypes.vectors.shape[0]), "learn one annotation s": learning}


def main() -> None:
    parser = arguments(__file__, __doc__)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--classes", type=int, default=6, choices=range(2, len(NAMES) + 1))
    parser.add_argument("--quick", action="store_true", help="tiny run: 4 corrected and 3 held-out images, 1 seed")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    preset = find_preset(args.model, "openai")  # random weights: the OpenAI preset's dimensions
    model = load_model(args.model, pretrained=None, distraction_dims=list(preset.dims) if preset else None)
    seg = Segmenter(model, SegmenterConfig(short_side=SIZE))
    vocabulary = Vocabulary.from_names(NAMES[: args.classes])
    n_train, n_test, seeds = (4, 3, 1) if args.quick else (16, 8, args.seeds)
    ranking, runs = [], []
    for seed in range(seeds):
        started = time.perf_counter()
        results, per_class, tests = run_seed(seg, vocabulary, args.classes, seed, n_train, n_test, ranking)
        runs.append(results)
        print(f"seed {seed}: " + ", ".join(f"{k} {v[0]:.1f}" for k, v in results.items())
              + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    rows = []
    for name in runs[0]:
        row = [name]
        for column in (0, 1):
            values = [r[name][column] for r in runs]
            if values[0] is None:
                row += ["", ""]
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            row += [f"{statistics.mean(values):.1f} ± {spread:.1f}", " / ".join(f"{v:.1f}" for v in values)]
        rows.append(row)
    print(markdown_table(["examples from", "mIoU % (text + prototypes)", "per seed", "prototypes alone", "per seed"],
                         rows))
    accuracy = [r["accuracy"] for r in ranking]
    correlations = {name: float(spearmanr([r[name] for r in ranking], accuracy).statistic)
                    for name in ("mean top probability", "mean margin", "1 - normalized entropy")}
    print(markdown_table(["task score", f"Spearman vs pixel accuracy ({len(ranking)} predictions)"],
                         [[name, f"{rho:.3f}"] for name, rho in correlations.items()]))
    cost = costs(seg, vocabulary, per_class, tests, repeats=3 if args.quick else 5)
    print(markdown_table(["cost", "seconds", "ratio"], [
        ["prediction (1 image)", f"{cost['prediction s']:.3f}", "1.00"],
        [f"with {cost['prototypes']} prototypes", f"{cost['with prototypes s']:.3f}",
         f"{cost['with prototypes s'] / cost['prediction s']:.2f}"],
        ["learn one annotation", f"{cost['learn one annotation s']:.3f}",
         f"{cost['learn one annotation s'] / cost['prediction s']:.2f}"]]))
    Path(args.json).write_text(json.dumps({"machine": machine(), "model": args.model, "classes": args.classes,
                                          "seeds": runs, "score_correlation": correlations, "cost": cost},
                                         indent=2))


if __name__ == "__main__":
    main()
