"""Box mIoU: the I²AM paper's detection experiment on attribution maps.

A reference→generated (R2G) map says where the reference went in the generated image.
Turned into a box (65th-percentile threshold, open, close, dilate with a 5x5 square,
largest connected component, bounding box) it can be scored against ground-truth boxes
like a detector. Baselines: a random box (area fraction U(0.1, 0.3), aspect U(0.5, 2),
uniform position) and the whole image ("Overall").

Boxes are (y0, x0, y1, x1) in pixels, half-open: rows y0..y1-1, columns x0..x1-1 (the
sample contract's convention). COCO boxes ([x, y, w, h]) are converted on reading.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]
PERCENTILE = 65.0
KERNEL = np.ones((5, 5), dtype=bool)


def upsample_map(m: np.ndarray | torch.Tensor, size: Sequence[int]) -> np.ndarray:
    """A map on a coarse grid -> image size: bicubic, align_corners=False, clamped at 0
    (the I²AM aggregation's resampling)."""
    t = torch.as_tensor(np.asarray(m, dtype=np.float32) if not isinstance(m, torch.Tensor) else m).float()
    if tuple(t.shape) == tuple(size):
        return t.numpy()
    t = F.interpolate(t[None, None], size=(int(size[0]), int(size[1])), mode="bicubic", align_corners=False)
    return t[0, 0].clamp(min=0).numpy()


def box_from_map(m: np.ndarray | torch.Tensor, image_size: Sequence[int] | None = None) -> Box:
    """The detection box of an R2G map (optionally upsampled to ``image_size`` first).

    Threshold: cells strictly above the 65th percentile (all cells at the maximum when
    that leaves none, e.g. a map that is mostly one value). Morphology with one 5x5 square:
    open (drop specks), close (fill gaps), dilate; 8-connected components; the largest one's
    bounding box. If opening removes everything (a map finer than 5 cells), the unopened
    threshold is used, so there is always a box.
    """
    from scipy import ndimage

    a = upsample_map(m, image_size) if image_size is not None else np.asarray(m, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"box_from_map expects a 2-D map, got shape {a.shape}")
    fg = a > np.percentile(a, PERCENTILE)
    if not fg.any():
        fg = a >= a.max()
    opened = ndimage.binary_opening(fg, structure=KERNEL)
    if opened.any():
        fg = opened
    fg = ndimage.binary_closing(fg, structure=KERNEL)
    fg = ndimage.binary_dilation(fg, structure=KERNEL)
    labels, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        fg = labels == (int(np.argmax(sizes)) + 1)
    rows, cols = np.flatnonzero(fg.any(1)), np.flatnonzero(fg.any(0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def iou(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection over union of two half-open (y0, x0, y1, x1) boxes."""
    iy = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ix = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iy * ix
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def random_box(size: Sequence[int], rng: np.random.Generator) -> Box:
    """Area fraction U(0.1, 0.3), aspect w/h U(0.5, 2), position uniform inside the image."""
    h, w = int(size[0]), int(size[1])
    area = rng.uniform(0.1, 0.3) * h * w
    aspect = rng.uniform(0.5, 2.0)
    bh = int(round(min(h, max(1.0, np.sqrt(area / aspect)))))
    bw = int(round(min(w, max(1.0, np.sqrt(area * aspect)))))
    y0 = int(rng.integers(0, h - bh + 1))
    x0 = int(rng.integers(0, w - bw + 1))
    return y0, x0, y0 + bh, x0 + bw


def whole_box(size: Sequence[int]) -> Box:
    return 0, 0, int(size[0]), int(size[1])


def score_boxes(maps: Sequence[np.ndarray | torch.Tensor], truths: Sequence[Sequence[int]],
                image_size: Sequence[int], seed: int = 0, offset: int = 0) -> list[dict[str, Any]]:
    """Per sample: the map's box and the IoUs of it, a random box and the whole image with
    the ground truth. The random box of sample k is drawn from ``default_rng((seed, offset + k))``,
    so it doesn't depend on batching."""
    out = []
    for k, (m, truth) in enumerate(zip(maps, truths)):
        truth = tuple(int(v) for v in truth)
        box = box_from_map(m, image_size)
        rnd = random_box(image_size, np.random.default_rng((seed, offset + k)))
        out.append({"box": list(box), "truth": list(truth), "iou": iou(box, truth),
                    "iou_random": iou(rnd, truth), "iou_whole": iou(whole_box(image_size), truth)})
    return out


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, float | int | None]:
    """mIoU of the maps and of both baselines."""
    def mean(key: str) -> float | None:
        return float(np.mean([r[key] for r in rows])) if rows else None

    return {"n": len(rows), "miou": mean("iou"), "miou_random": mean("iou_random"), "miou_whole": mean("iou_whole")}


# -------------------------------------------------------------------------- COCO-style runner
def select_coco_boxes(annotations: dict[str, Any], lo: float = 0.1, hi: float = 0.3
                      ) -> tuple[list[tuple[dict[str, Any], Box]], int]:
    """Per image (in the JSON's order) the first annotation whose box covers lo..hi of the
    image, as (image record, (y0, x0, y1, x1)); and the number of images without one."""
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in annotations.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)
    chosen, skipped = [], 0
    for img in annotations["images"]:
        h, w = int(img["height"]), int(img["width"])
        pick = None
        for ann in by_image.get(img["id"], []):
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            if lo <= (bw * bh) / (h * w) <= hi:
                pick = (int(round(y)), int(round(x)), int(round(y + bh)), int(round(x + bw)))
                break
        if pick is None:
            skipped += 1
        else:
            chosen.append((img, pick))
    return chosen, skipped


MapFn = Callable[[np.ndarray, Box], "np.ndarray | torch.Tensor"]


def coco_box_miou(images_dir: str | Path, annotations: str | Path | dict[str, Any], map_fn: MapFn,
                  limit: int | None = None, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Box mIoU over a folder of images with COCO-style boxes.

    ``map_fn(image, box)`` gets the uint8 (H, W, 3) image and the chosen ground-truth box
    (the inpainting region of the experiment: the model repaints it from its own crop) and
    returns the R2G map (any grid; upsampled to the image). Returns the summary, the number
    of images without a 10-30 % box, and per-image rows.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    data = annotations if isinstance(annotations, dict) else json.loads(Path(annotations).read_text())
    chosen, skipped = select_coco_boxes(data)
    if limit is not None:
        chosen = chosen[:limit]
    rows = []
    for k, (img, truth) in enumerate(tqdm(chosen, desc="box mIoU", disable=not progress)):
        with Image.open(Path(images_dir) / img["file_name"]) as im:
            image = np.asarray(im.convert("RGB"))
        row = score_boxes([map_fn(image, truth)], [truth], image.shape[:2], seed=seed, offset=k)[0]
        rows.append({"file_name": img["file_name"], **row})
    return {**summarise(rows), "skipped_no_box": skipped, "per_image": rows}
