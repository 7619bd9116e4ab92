"""Generate a test set from a trained checkpoint, resumably, recording I²AM maps.

Per mode the output folder holds ``images/<name>.png`` and ``samples.json``: the settings
the images were made with, and per sample what needs the attribution maps (IMACS_g,
IMACS_r, the R2G box and its IoUs) or the tensors (colour error). A sample counts as done
when both its PNG and its entry exist, so a rerun only generates what is missing and never
needs the maps of earlier runs again.

A sample's result depends only on (seed, its index): its initial noise comes from its own
generator (`sample_seed`) and its random baseline box from ``default_rng((seed, index))``;
batches are fixed by index. So an evaluation killed and resumed writes the same images and
numbers as one uninterrupted run; at another batch size only the last float bits of the
batched arithmetic differ (see docs/evaluation.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from common.images import TEMP_GLOB, from_uint8, save_png, to_uint8
from configs.schema import Config


class EvalError(ValueError):
    """An evaluation that can't run as asked; the message says what to change. (A path that
    is no checkpoint raises `train.checkpoint.CheckpointError`, which `evaluate` turns into this.)"""


def build_eval_dataset(cfg: Config, split: str, mode: str, limit: int | None, num_synthetic: int) -> Dataset:
    """The test set of the checkpoint's data config; the synthetic set has no fixed size, so
    it gets ``num_synthetic`` samples (its samples depend only on their index)."""
    from train.data import build_dataset

    if cfg.data.name == "synthetic":
        n = num_synthetic if limit is None else min(limit, num_synthetic)
        return build_dataset(cfg.data, split, mode, num_samples=n)
    return build_dataset(cfg.data, split, mode, num_samples=limit)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``'s noise generator: numpy's SeedSequence of (seed, index),
    so that distinct pairs get unrelated streams (``seed * K + index`` would collide)."""
    return int(np.random.SeedSequence((seed, index)).generate_state(1, np.uint64)[0])


def sample_name(dataset: Dataset, index: int) -> str:
    if hasattr(dataset, "sample_name"):
        return dataset.sample_name(index)  # real data: no file read
    return dataset[index]["name"]


# ----------------------------------------------------------------------------------- files
# PNGs are written with common.images.save_png (atomically: a killed run never leaves a
# half-written PNG that looks done).
def write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def load_sidecar(path: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("settings") != settings:
        raise EvalError(
            f"{path.parent} holds outputs made with other settings:\n  there: {data.get('settings')}\n"
            f"  now:   {settings}\nUse another --out, or delete that folder to regenerate.")
    return data.get("samples", {})


def write_reference(dataset: Dataset, folder: Path, progress: bool = False) -> list[Path]:
    """The test persons as PNGs at the configured resolution (FID/KID reference and paired
    ground truth), written once: existing files are kept."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in tqdm(range(len(dataset)), desc="reference images", disable=not progress, leave=False):
        path = folder / f"{sample_name(dataset, i)}.png"
        if not path.is_file():
            sample = dataset[i]
            save_png(sample["person"], folder / f"{sample['name']}.png")
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------ generation
@torch.no_grad()
def generate(model: Any, dataset: Dataset, out: Path, *, steps: int, guidance_scale: float, batch_size: int,
             seed: int, device: torch.device, settings: dict[str, Any], paired: bool,
             progress: bool = False) -> dict[str, Any]:
    """Generate the samples of ``dataset`` missing from ``out``; returns
    {"names": all names, "samples": per-sample stats, "generated": how many were written now}."""
    from tqdm.auto import tqdm

    from i2am import AttentionMonitor
    from models.sampling import Sampler

    from .boxes import score_boxes
    from .metrics import sample_scores

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for stale in images.glob(TEMP_GLOB):  # save_png's temporary files, left by a killed run
        stale.unlink(missing_ok=True)
    sidecar_path = out / "samples.json"
    stats = load_sidecar(sidecar_path, settings)
    names = [sample_name(dataset, i) for i in range(len(dataset))]
    todo = [i for i, n in enumerate(names) if not ((images / f"{n}.png").is_file() and n in stats)]
    if todo:
        sampler = Sampler.from_config(settings["diffusion"], steps=steps, guidance_scale=guidance_scale)
        monitor = AttentionMonitor(model.unet, reference_grid=model.reference_grid, extra_tokens=model.extra_tokens,
                                   num_steps=steps, pair_layers=False)
        try:
            # Batches are fixed by index (0..b-1, b..2b-1, ...) and a batch with anything missing
            # is generated whole, so a resumed run computes every sample in the batch an
            # uninterrupted one did: bitwise the same floats, not just the same noise.
            missing = set(todo)
            chunks = [c for k in range(0, len(names), batch_size)
                      if missing.intersection(c := list(range(k, min(k + batch_size, len(names)))))]
            for chunk in tqdm(chunks, desc=f"generate {out.name}", disable=not progress):
                samples = [dataset[i] for i in chunk]
                batch = default_collate(samples)
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                # per-sample noise: a sample's image doesn't depend on which others are missing
                run = sampler(model, batch, seeds=[sample_seed(seed, i) for i in chunk], monitor=monitor)
                # score what is saved, the 8-bit image, as FID/LPIPS/SSIM do: the scores then
                # depend on the PNG's bytes, not on float bits below them
                result = from_uint8(to_uint8(run.images))
                scores = sample_scores(result, batch, run.maps, target=_targets(dataset, chunk, batch, paired))
                # the random baseline box of sample i: default_rng((seed, i)), whatever the batching
                boxes = [score_boxes([m], [truth], result.shape[-2:], seed=seed, offset=i)[0]
                         for i, m, truth in zip(chunk, run.maps.unified("r2g").float().cpu(),
                                                batch["box"].cpu().tolist())]
                for k, s in enumerate(samples):
                    if chunk[k] not in missing:  # done before: kept as it is
                        continue
                    save_png(result[k], images / f"{s['name']}.png")
                    stats[s["name"]] = {**{key: scores[key][k] for key in ("imacs_g", "imacs_r", "colour_error",
                                                                           "pixel_error")},
                                        **{key: boxes[k][key] for key in ("box", "iou", "iou_random", "iou_whole")}}
                write_json({"settings": settings, "samples": stats}, sidecar_path)
        finally:
            monitor.close()
    return {"names": names, "samples": stats, "generated": len(todo)}


def _targets(dataset: Dataset, chunk: list[int], batch: dict[str, Any], paired: bool) -> torch.Tensor | None:
    """What the generated images should equal inside the mask: the person in paired mode;
    in unpaired mode only synthetic data knows it (``tryon_target``)."""
    if paired:
        return batch["person"].cpu()
    if hasattr(dataset, "tryon_target"):
        return torch.stack([dataset.tryon_target(i) for i in chunk])
    return None
