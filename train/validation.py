"""Validation: DDIM-sample a fixed batch with the EMA weights, measure the colour
error inside the inpainting mask, and render agnostic | garment | generated | truth."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from models.sampling import Sampler
from models.tryon import TryOnModel
from tryon_data.samples import colour_error, masked_mean_colour, pixel_error


@dataclass
class ValidationResult:
    colour_error: float
    images: dict[str, np.ndarray]
    generated: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)


class Validator:
    def __init__(self, val_set: Dataset, train_set: Dataset, sampler: Sampler, seed: int = 0,
                 baseline_samples: int = 512) -> None:
        self.batch = default_collate([val_set[i] for i in range(len(val_set))])
        self.sampler, self.seed = sampler, seed
        # Garment-blind baseline: paint the mask with the training set's mean garment colour.
        mean = masked_mean_colour(train_set, num=min(baseline_samples, len(train_set)))
        mask = self.batch["mask"]
        blind = self.batch["agnostic"] * (1 - mask) + mean.view(1, 3, 1, 1) * mask
        self.baseline_error = float(colour_error(blind, self.batch["person"], mask).mean())
        self.baseline_pixel_error = float(pixel_error(blind, self.batch["person"], mask).mean())

    @torch.no_grad()
    def run(self, model: TryOnModel, device: torch.device, hooks=None) -> ValidationResult:
        """Sample the fixed batch; with `hooks` (the trainer's MonitorHooks) also record
        the sampling and add IMACS and attribution-map figures."""
        from i2am.render import sample_grid

        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.batch.items()}
        was_training = model.training
        model.eval()
        recording = hooks.recording(self.sampler.steps) if hooks else contextlib.nullcontext()
        with recording as monitor:  # the same noise every validation
            samples = self.sampler(model, batch, seed=self.seed, monitor=monitor)
        model.train(was_training)
        generated = samples.images
        errors = colour_error(generated, batch["person"], batch["mask"])
        err = float(errors.mean())
        pix = float(pixel_error(generated, batch["person"], batch["mask"]).mean())
        grid = sample_grid({
            "agnostic": self.batch["agnostic"], "garment": self.batch["garment"],
            "generated": generated.cpu(), "ground truth": self.batch["person"],
        })
        images, metrics, table = {"val/samples": grid}, {"val/pixel_error": pix}, []
        if hooks is not None:
            map_metrics, maps_images, table = hooks.report(samples.maps, self.batch, generated.cpu(), errors.tolist())
            metrics.update(map_metrics)
            images.update(maps_images)
        return ValidationResult(err, images, generated.cpu(), metrics, table)
