"""The I²AM monitor as the trainer sees it: four calls (and `close`).

- `step_loss(latent_mask, timesteps, step)` after each forward: the stability
  loss and per-layer dispersion from the monitor's last forward pass;
- `dispersion(latent_mask, timesteps)`: the mean dispersion of the last forward,
  as an evaluation reading;
- `recording(num_steps)`: a context yielding the monitor to pass to `models.Sampler`;
- `report(maps, batch, generated, colour_errors)`: IMACS, figures and table rows for the sampler's maps.

It holds no training state of its own (the loss's warm-up reads the step it is given),
so there is nothing of it to checkpoint.

The monitor never sees the trainer; the trainer never sees processors or maps.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import numpy as np
import torch

from configs.schema import MonitorConfig, StabilityConfig
from i2am import AttentionMonitor, AttributionMaps
from i2am.report import attribution_report, sample_rows
from losses.stability import StabilityLoss


class MonitorHooks:
    def __init__(self, model, monitor_cfg: MonitorConfig, stability_cfg: StabilityConfig) -> None:
        self.cfg = monitor_cfg
        # moments: every monitored layer computes its attention centres and dispersion inside its
        # own attention call, for the stability loss and the per-step dispersion metrics; maps are
        # only recorded inside `recording()`.
        self.monitor = AttentionMonitor(model.unet, reference_grid=model.reference_grid,
                                        extra_tokens=model.extra_tokens, layers=monitor_cfg.layers,
                                        chunk_size=monitor_cfg.chunk_size, moments=True, record=False)
        self.loss = StabilityLoss(stability_cfg, monitored=self.monitor.layers)

    def step_loss(self, latent_mask: torch.Tensor | None, timesteps: torch.Tensor | None,
                  step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(self.monitor.last_attention(), latent_mask, timesteps, step)

    def dispersion(self, latent_mask: torch.Tensor | None, timesteps: torch.Tensor | None) -> float:
        """Mean dispersion over every monitored layer of the last forward (masked, as logged in training)."""
        _, metrics = self.loss(self.monitor.last_attention(), latent_mask, timesteps)
        return float(metrics["i2am/dispersion/mean"])

    @contextlib.contextmanager
    def recording(self, num_steps: int) -> Iterator[AttentionMonitor]:
        """Record maps while inside: pass the yielded monitor to the `models.Sampler` run of
        `num_steps` steps (it chooses the samples to record: the conditional half under guidance)."""
        self.monitor.reset(num_steps=num_steps, time_groups=min(self.cfg.time_groups, num_steps))
        self.monitor.record = True
        try:
            yield self.monitor
        finally:
            self.monitor.record = False

    def report(self, maps: AttributionMaps, batch: Mapping[str, torch.Tensor], generated: torch.Tensor,
               colour_errors: list[float]) -> tuple[dict[str, float], dict[str, np.ndarray], list[dict]]:
        """IMACS, the map figures and the per-sample table rows of one recorded sampling."""
        metrics, images = attribution_report(maps, batch, generated, samples=self.cfg.samples,
                                             patches=self.cfg.patches, time_groups=self.cfg.time_groups)
        return metrics, images, sample_rows(maps, batch, generated, colour_errors)

    def close(self) -> None:
        self.monitor.close()
