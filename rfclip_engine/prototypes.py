"""Visual prototypes: each class's mean RF-CLIP dense feature inside corrected masks, a second
opinion beside its text embedding (few-shot, no gradients).

The working-resolution feature map F behind the class logits is each crop's L2-normalized patch
features, bilinearly upsampled to the crop and averaged where crops overlap: a text logit is
F(x) . t. That map is linear in the patch features, so the mean of F inside a mask is every
crop's patch features weighted by the adjoint of the upsampling applied to the mask: exact, and
the D x H x W map is never held.

A prototype p scores a pixel with F(x) . p, in the same forward as the text. That cosine lives on
its own scale (image-to-image cosines are far larger than image-to-text ones), so each class maps
it to [0, 1] with what its examples measured when they were learned: 1 at the mean cosine of the
example's own pixels ("inside"), 0 at the mean cosine of the rest of its image ("outside"). The
class logit becomes (1 - w) * text + w * (lo + (hi - lo) * affinity), lo and hi the image's lowest
and highest text logits, w = min(cap, n / (n + k)) for n examples: one example already moves a
class halfway to what it looks like; classes without examples keep their text logit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .sliding import crop_boxes

FeatureEncoder = Callable[[torch.Tensor], torch.Tensor]  # (N, 3, h, w) -> (N, hp, wp, D), unit vectors


@dataclass(frozen=True)
class Example:
    """One class's mean feature inside one corrected mask.

    vector: (D,) the L2-normalized mean of F inside the mask.
    inside: mean cosine of the mask's own pixels to `vector` (the norm of the unnormalized mean).
    outside: mean cosine of the image's other pixels to `vector`.
    pixels: the mask's size at the working resolution.
    """

    vector: torch.Tensor
    inside: float
    outside: float
    pixels: int


def upsample_matrix(source: int, target: int) -> torch.Tensor:
    """(target, source) R with R @ z == F.interpolate(z, target, mode="linear",
    align_corners=False) for a 1-D signal z; bilinear upsampling is R_y @ Z @ R_x.T."""
    basis = torch.eye(source, dtype=torch.float64)[:, None, :]
    return F.interpolate(basis, size=target, mode="linear", align_corners=False)[:, 0, :].T.float()


def pool_masks(
    image: torch.Tensor, masks: torch.Tensor, encode: FeatureEncoder, window: int | None, stride: int,
    batch_size: int, patch: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sums of F over each mask and over the whole image.

    image: (3, H, W) normalized pixels at the working resolution; masks: (K, H, W) weights in
    [0, 1] there. The crops are those of `sliding_window_many` (window x window every `stride`,
    zero-padded to at least a window) or, with window=None, of `whole_image` (padded to a multiple
    of `patch`). Returns ((K, D) masked sums, (D,) whole-image sum) of F, where F at a pixel is
    the mean of its crops' upsampled features, as the class logits are made.
    """
    height, width = image.shape[-2:]
    if window is None:
        pad_h, pad_w = -height % patch, -width % patch
        boxes, crop_h, crop_w = [(0, 0)], height + pad_h, width + pad_w
    else:
        pad_h, pad_w = max(height, window) - height, max(width, window) - width
        boxes, crop_h, crop_w = crop_boxes(height + pad_h, width + pad_w, window, stride), window, window
    padded = F.pad(image, (0, pad_w, 0, pad_h))
    # one extra mask, all ones, for the whole-image sum; padding pixels weigh nothing
    weights = F.pad(torch.cat([masks.float(), masks.new_ones((1, height, width), dtype=torch.float32)]),
                    (0, pad_w, 0, pad_h))
    count = torch.zeros(padded.shape[-2:], device=image.device)
    for y, x in boxes:
        count[y:y + crop_h, x:x + crop_w] += 1
    weights = weights / count  # a pixel's crops share it: F there is their mean
    sums, r_y, r_x = None, None, None
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start:start + batch_size]
        crops = torch.stack([padded[:, y:y + crop_h, x:x + crop_w] for y, x in chunk])
        features = encode(crops).float()  # (N, hp, wp, D)
        if r_y is None:
            r_y = upsample_matrix(features.shape[1], crop_h).to(features.device)
            r_x = upsample_matrix(features.shape[2], crop_w).to(features.device)
        crop_weights = torch.stack([weights[:, y:y + crop_h, x:x + crop_w] for y, x in chunk])  # (N, K+1, h, w)
        patch_weights = torch.einsum("yi,nkyx,xj->nkij", r_y, crop_weights, r_x)  # the upsampling's adjoint
        part = torch.einsum("nkij,nijd->kd", patch_weights, features)
        sums = part if sums is None else sums + part
    return sums[:-1], sums[-1]


def examples_from_sums(sums: torch.Tensor, total: torch.Tensor, pixels: torch.Tensor, image_pixels: int) -> List[Example]:
    """An Example per mask from `pool_masks`' sums and each mask's pixel count (> 0)."""
    out = []
    for mask_sum, count in zip(sums, pixels.tolist()):
        inside_mean = mask_sum / count
        vector = F.normalize(inside_mean, dim=0)
        rest = image_pixels - count
        outside = float((total - mask_sum) @ vector / rest) if rest > 0 else 0.0
        out.append(Example(vector.cpu(), float(inside_mean.norm()), outside, int(round(count))))
    return out


@dataclass(frozen=True)
class Prototypes:
    """The examples of a vocabulary's classes, ready for a forward.

    vectors: (P, D) the prototypes; owner: (P,) the index, among `classes`, of each one's class.
    classes: indices (in the vocabulary) of the classes that have examples.
    weight: (len(classes),) w = min(cap, n / (n + k)); inside, outside: (len(classes),) the
    means of their examples' calibration cosines.
    """

    vectors: torch.Tensor
    owner: torch.Tensor
    classes: Tuple[int, ...]
    weight: torch.Tensor
    inside: torch.Tensor
    outside: torch.Tensor

    @classmethod
    def build(cls, per_class: Sequence[Sequence[Example]], k: float, cap: float, keep: int) -> "Prototypes | None":
        """From each vocabulary class's examples, oldest first; the newest `keep` of a class are
        its prototypes, all of them count for its weight. None when no class has any."""
        vectors, owner, classes, weight, inside, outside = [], [], [], [], [], []
        for c, examples in enumerate(per_class):
            if not examples:
                continue
            kept = list(examples)[-keep:]
            n = len(examples)
            vectors.extend(e.vector.float() for e in kept)
            owner.extend([len(classes)] * len(kept))
            classes.append(c)
            weight.append(min(cap, n / (n + k)))
            inside.append(sum(e.inside for e in kept) / len(kept))
            outside.append(sum(e.outside for e in kept) / len(kept))
        if not classes:
            return None
        return cls(torch.stack(vectors), torch.tensor(owner), tuple(classes), torch.tensor(weight),
                   torch.tensor(inside), torch.tensor(outside))

    def to(self, device: torch.device) -> "Prototypes":
        return Prototypes(self.vectors.to(device), self.owner.to(device), self.classes, self.weight.to(device),
                          self.inside.to(device), self.outside.to(device))


def affinity(cosines: torch.Tensor, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """(C', h, w) prototype cosines -> [0, 1]: 0 at or below a class's `outside`, 1 at or above
    its `inside`."""
    spread = (inside - outside).clamp_min(1e-6).view(-1, 1, 1)
    return ((cosines - outside.view(-1, 1, 1)) / spread).clamp(0.0, 1.0)


def combine(text: torch.Tensor, cosines: torch.Tensor, prototypes: Prototypes) -> torch.Tensor:
    """(C, h, w) class logits from text logits (C, h, w) and, for `prototypes.classes`, their
    best prototype cosine (C', h, w): see the module docstring."""
    lo, hi = text.amin(), text.amax()
    visual = lo + (hi - lo) * affinity(cosines, prototypes.inside, prototypes.outside)
    w = prototypes.weight.view(-1, 1, 1).to(text.dtype)
    out = text.clone()
    index = list(prototypes.classes)
    out[index] = (1 - w) * text[index] + w * visual
    return out
