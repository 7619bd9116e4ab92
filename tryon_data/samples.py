"""The sample contract shared by every try-on data set, and helpers that only rely on it.

A sample is a dict with these entries (the trainer, the real-data loaders and the
synthetic data set agree on it). Required in every sample:

===============  ==========================  ===================================================
key              type                        meaning
===============  ==========================  ===================================================
"person"         float32 (3, H, W) [-1, 1]   the person wearing their own garment (paired: the
                                             ground truth; unpaired: still the person image)
"garment"        float32 (3, H, W) [-1, 1]   the flat garment to try on, on white
"garment_mask"   float32 (1, H, W) {0, 1}    where the garment is in "garment"
"agnostic"       float32 (3, H, W) [-1, 1]   "person" with the inpainting region set to grey (0)
"mask"           float32 (1, H, W) {0, 1}    the inpainting mask (1 = generate here)
"box"            int64 (4,)                  (y0, x0, y1, x1): rows y0..y1-1, cols x0..x1-1 of the
                                             worn garment (real data: of the inpainting mask)
"name"           str                         a unique sample name (used as an output file name)
===============  ==========================  ===================================================

Optional (a data set gives each of them in all of its samples or in none):

===============  ==========================  ===================================================
"pattern"        str                         the pattern kind of "garment" (synthetic)
"colors"         float32 (2, 3) [0, 1]       the two colours of "garment" (synthetic)
"pose"           float32 (3, H, W) [-1, 1]   a densepose rendering (real data, data.use_pose)
"worn_mask"      float32 (1, H, W) {0, 1}    where the garment is worn in the ground truth
                                             (synthetic: exact; VITON-HD: image-parse-v3 upper
                                             clothes; DressCode: the category's label_maps
                                             classes; a tree without parsing: the inpainting mask)
"garment_pos"    float32 (2, H, W) [0, 1]    for each worn-garment pixel, the (y, x) position of
                                             the same garment point in "garment", relative to
                                             the image size (the convention of the monitor's key
                                             cell centres); 0 outside "worn_mask" (synthetic)
===============  ==========================  ===================================================

"garment_pos" comes with "worn_mask", which says where it is valid. In synthetic unpaired mode both
describe the true try-on result (``SyntheticTryOn.tryon_target``), the only image in which the
given garment is worn.

"box" is required (not optional) so that box-mIoU evaluation works on every data set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

REQUIRED_KEYS: tuple[str, ...] = ("person", "garment", "garment_mask", "agnostic", "mask", "box", "name")
OPTIONAL_KEYS: tuple[str, ...] = ("pattern", "colors", "pose", "worn_mask", "garment_pos")
# Every key of a synthetic sample (the required ones plus its pattern, colours and correspondence).
SAMPLE_KEYS: tuple[str, ...] = REQUIRED_KEYS + ("pattern", "colors", "worn_mask", "garment_pos")


def check_sample(sample: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first entry that breaks the sample contract.

    Cheap enough to run on a few samples of any loader in its tests.
    """
    missing = [k for k in REQUIRED_KEYS if k not in sample]
    extra = [k for k in sample if k not in REQUIRED_KEYS + OPTIONAL_KEYS]
    if missing or extra:
        raise ValueError(f"sample keys: missing {missing}, unexpected {extra}")
    person = sample["person"]
    if not isinstance(person, torch.Tensor) or person.dim() != 3 or person.shape[0] != 3:
        raise ValueError(f"'person': expected a (3, H, W) tensor, got {_describe(person)}")
    _, h, w = person.shape
    expected = {"person": (3, h, w), "garment": (3, h, w), "agnostic": (3, h, w),
                "garment_mask": (1, h, w), "mask": (1, h, w), "colors": (2, 3), "pose": (3, h, w),
                "worn_mask": (1, h, w), "garment_pos": (2, h, w)}
    for key, shape in expected.items():
        if key not in sample:
            continue
        t = sample[key]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape:
            raise ValueError(f"{key!r}: expected float32 {shape}, got {_describe(t)}")
    for key in ("person", "garment", "agnostic", "pose"):
        if key not in sample:
            continue
        t = sample[key]
        if not bool(torch.isfinite(t).all()) or t.min() < -1 or t.max() > 1:
            raise ValueError(f"{key!r}: expected values in [-1, 1]")
    for key in ("garment_mask", "mask", "worn_mask"):
        if key in sample and not bool(((sample[key] == 0) | (sample[key] == 1)).all()):
            raise ValueError(f"{key!r}: expected values in {{0, 1}}")
    if "garment_pos" in sample:
        pos = sample["garment_pos"]
        if "worn_mask" not in sample:
            raise ValueError("'garment_pos': comes with 'worn_mask' (which says where it is valid), "
                             "but the sample has no 'worn_mask'")
        if not bool(torch.isfinite(pos).all()) or pos.min() < 0 or pos.max() > 1:
            raise ValueError("'garment_pos': expected finite values in [0, 1]")
        if bool((pos * (1 - sample["worn_mask"])).ne(0).any()):
            raise ValueError("'garment_pos': expected 0 outside 'worn_mask'")
    colors = sample.get("colors")
    if colors is not None and (colors.min() < 0 or colors.max() > 1):
        raise ValueError("'colors': expected values in [0, 1]")
    box = sample["box"]
    if not isinstance(box, torch.Tensor) or box.dtype != torch.int64 or tuple(box.shape) != (4,):
        raise ValueError(f"'box': expected int64 (4,), got {_describe(box)}")
    y0, x0, y1, x1 = box.tolist()
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise ValueError(f"'box': expected 0 <= y0 < y1 <= {h}, 0 <= x0 < x1 <= {w}, got {box.tolist()}")
    for key in ("name", "pattern"):
        if key in sample and not isinstance(sample[key], str):
            raise ValueError(f"{key!r}: expected str, got {type(sample[key]).__name__}")


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {tuple(t.shape)}"
    return type(t).__name__


def colour_error(generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample error of the mean colour inside the mask: did the try-on take the garment's colours?

    With images mapped to [0, 1] and ``m`` the mask, the mean colours
    ``mu_g[c] = sum(g[c] m) / sum(m)`` and ``mu_t`` likewise; the error is
    ``mean_c |mu_g[c] - mu_t[c]|``, a number in [0, 1] per sample (0 for an empty mask).
    Pixel-level detail (pattern placement, residual noise) is what :func:`pixel_error` measures.
    """
    g, t, m = _prepare(generated, target, mask)
    area = m.sum(dim=(2, 3)).clamp(min=1)
    mean_g = (g * m).sum(dim=(2, 3)) / area
    mean_t = (t * m).sum(dim=(2, 3)) / area
    return ((mean_g - mean_t).abs() / 2).mean(dim=1)


def pixel_error(generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean absolute colour error inside the mask, pixel by pixel.

    Definition: with ``g = (generated + 1) / 2`` and ``t = (target + 1) / 2`` (images in
    [-1, 1] mapped to [0, 1]) and ``m`` the {0, 1} mask,

        error[b] = sum_{c, y, x} |g - t|[b, c, y, x] * m[b, y, x] / (C * sum_{y, x} m[b, y, x])

    i.e. the mean over the mask pixels and over the channels. A sample with an empty mask
    gets 0 (nothing to get wrong). Shapes: images (B, C, H, W) or (C, H, W); mask
    (B, 1, H, W), (B, H, W), (1, H, W) or (H, W). Returns a float tensor (B,) (B = 1 for
    unbatched input), a number in [0, 1].
    """
    g, t, m = _prepare(generated, target, mask)
    diff = ((g - t).abs() / 2) * m
    denom = (m.sum(dim=(1, 2, 3)) * g.shape[1]).clamp(min=1)
    return diff.sum(dim=(1, 2, 3)) / denom


def _prepare(generated: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images as float (B, C, H, W), the mask as float (B, 1, H, W), shapes checked."""
    if generated.shape != target.shape or generated.dim() not in (3, 4):
        raise ValueError(f"generated and target: expected equal (B, C, H, W) or (C, H, W) shapes, "
                         f"got {tuple(generated.shape)} and {tuple(target.shape)}")
    if generated.dim() == 3:
        generated, target = generated[None], target[None]
    b, c, h, w = generated.shape
    m = mask
    if m.dim() == 2:
        m = m[None, None]
    elif m.dim() == 3:
        m = m[:, None] if m.shape[0] == b and b != 1 else m[None]
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[2:] != (h, w) or m.shape[0] not in (1, b):
        raise ValueError(f"mask: expected (B, 1, H, W) = ({b}, 1, {h}, {w}) or (H, W), got {tuple(mask.shape)}")
    return generated.float(), target.float(), m.to(torch.float32).expand(b, 1, h, w)


def masked_mean_colour(dataset: Sequence[Mapping[str, Any]], num: int | None = None) -> torch.Tensor:
    """Mean colour (3,) in [-1, 1] of ``person`` over all ``mask`` pixels of the first ``num``
    samples (all when None): one pooled mean over pixels, not a mean of per-sample means.

    Filling the mask with this colour is the "garment-blind" baseline: it is what a model
    that ignores the garment and predicts the data set's average would do best in L2.
    In paired data ``person`` is the ground truth; in unpaired data it is the person's own
    garment (still a valid data-set statistic).
    """
    n = len(dataset) if num is None else min(int(num), len(dataset))
    if n <= 0:
        raise ValueError(f"masked_mean_colour: expected at least one sample, got num={num}, len={len(dataset)}")
    total = torch.zeros(3, dtype=torch.float64)
    count = 0.0
    for i in range(n):
        s = dataset[i]
        m = s["mask"].to(torch.float64)
        total += (s["person"].to(torch.float64) * m).sum(dim=(1, 2))
        count += float(m.sum())
    if count == 0:
        raise ValueError("masked_mean_colour: every mask is empty")
    return (total / count).to(torch.float32)
