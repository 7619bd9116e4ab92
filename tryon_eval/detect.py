"""``python -m tryon_eval.detect``: the box-mIoU detection experiment with a trained model.

Two sources of ground-truth boxes:

* ``--synthetic``: the synthetic test set, whose samples know the worn garment's box; the
  model repaints each sample's inpainting mask from its garment.
* ``--images DIR --annotations FILE``: a COCO-style folder. Per image the first object
  covering 10-30 % of the image is the region to repaint and its crop is the reference
  (the paper's Paint-by-Example setting on COCO val2017).

The R2G map recorded while generating gives the box (see :mod:`tryon_eval.boxes`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from common.images import from_uint8

from .boxes import Box, coco_box_miou, score_boxes, summarise


class R2GMapper:
    """Runs the sampler under an :class:`i2am.AttentionMonitor` and returns the unified R2G
    maps (B, h, w) on the latent grid."""

    def __init__(self, model: Any, diffusion: Any, steps: int, guidance_scale: float, seed: int,
                 device: torch.device) -> None:
        from i2am import AttentionMonitor
        from models.sampling import Sampler

        self.model, self.seed, self.device = model, seed, device
        self.sampler = Sampler.from_config(diffusion, steps=steps, guidance_scale=guidance_scale)
        self.monitor = AttentionMonitor(model.unet, reference_grid=model.reference_grid,
                                        extra_tokens=model.extra_tokens, num_steps=steps, pair_layers=False)
        self.calls = 0

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        seed = self.seed * 1_000_003 + self.calls
        self.calls += 1
        return self.sampler(self.model, batch, seed=seed, monitor=self.monitor).maps.unified("r2g").float().cpu()

    def close(self) -> None:
        self.monitor.close()

    def coco_map_fn(self, resolution: Sequence[int]):
        """``map_fn(image, box)`` for :func:`coco_box_miou`: the image resized to the model's
        resolution, the box greyed as the inpainting mask, its crop (resized) as the reference."""
        h, w = int(resolution[0]), int(resolution[1])

        def map_fn(image: np.ndarray, box: Box) -> torch.Tensor:
            img = from_uint8(image)[None]
            ih, iw = image.shape[:2]
            y0, x0, y1, x1 = box
            crop = F.interpolate(img[:, :, y0:y1, x0:x1], size=(h, w), mode="bicubic", align_corners=False,
                                 antialias=True).clamp(-1, 1)
            person = F.interpolate(img, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
            mask = torch.zeros(1, 1, h, w)
            mask[..., int(y0 * h / ih):max(int(y0 * h / ih) + 1, round(y1 * h / ih)),
                 int(x0 * w / iw):max(int(x0 * w / iw) + 1, round(x1 * w / iw))] = 1
            batch = {"person": person, "agnostic": person * (1 - mask), "mask": mask, "garment": crop,
                     "garment_mask": torch.ones(1, 1, h, w)}
            return self(batch)[0]

        return map_fn


def dataset_box_miou(mapper: R2GMapper, dataset: Dataset, batch_size: int = 8, limit: int | None = None,
                     seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Box mIoU over a data set whose samples carry their ground-truth "box"."""
    from tqdm.auto import tqdm

    n = len(dataset) if limit is None else min(limit, len(dataset))
    rows: list[dict[str, Any]] = []
    for start in tqdm(range(0, n, batch_size), desc="box mIoU", disable=not progress):
        samples = [dataset[i] for i in range(start, min(n, start + batch_size))]
        batch = default_collate(samples)
        maps = mapper(batch)
        scored = score_boxes(list(maps), batch["box"].tolist(), batch["person"].shape[-2:], seed=seed, offset=start)
        rows += [{"name": s["name"], **r} for s, r in zip(samples, scored)]
    return {**summarise(rows), "per_image": rows}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tryon_eval.detect",
                                description="Box mIoU of I²AM R2G maps (the paper's detection experiment).")
    p.add_argument("checkpoint", help="run directory or checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", action="store_true", help="the synthetic test set (boxes known)")
    src.add_argument("--images", help="folder of images (with --annotations: COCO-style JSON)")
    p.add_argument("--annotations", help="COCO-style JSON: images[{id,file_name,width,height}], "
                                         "annotations[{image_id,bbox:[x,y,w,h]}]")
    p.add_argument("--limit", type=int)
    p.add_argument("--num-synthetic", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--out", help="write the results (with per-image rows) to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.images and not args.annotations:
        p.error("--images needs --annotations")
    from train.checkpoint import CheckpointError, load_checkpoint

    from .generate import build_eval_dataset

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        loaded = load_checkpoint(args.checkpoint, device=dev)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = loaded.cfg
    steps = args.steps or cfg.diffusion.sample_steps
    guidance = cfg.diffusion.guidance_scale if args.guidance_scale is None else args.guidance_scale
    mapper = R2GMapper(loaded.model, cfg.diffusion, steps, guidance, args.seed, dev)
    try:
        if args.synthetic:
            if cfg.data.name != "synthetic":
                cfg.data.name, cfg.data.root = "synthetic", None
            dataset = build_eval_dataset(cfg, "test", "paired", args.limit, args.num_synthetic)
            result = dataset_box_miou(mapper, dataset, args.batch_size, args.limit, args.seed, not args.no_progress)
        else:
            result = coco_box_miou(args.images, args.annotations, mapper.coco_map_fn(cfg.data.resolution),
                                   args.limit, args.seed, not args.no_progress)
    finally:
        mapper.close()
    summary = {k: v for k, v in result.items() if k != "per_image"}
    print(json.dumps({"checkpoint": str(loaded.path), **summary}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": str(loaded.path), **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
