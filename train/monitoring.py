"""The I²AM monitor as the trainer sees it: three calls (and `close`).

- `dispersion(latent_mask, timesteps)`: the mean dispersion of the last forward,
  as an evaluation reading;
- `recording(num_steps)`: a context yielding the monitor to pass to `models.Sampler`;
- `report(maps, batch, generated, colour_errors)`: IMACS, figures and table rows for the sampler's maps.

The monitor itself (`self.monitor`) goes to the training objective
(`losses.objective.TryOnObjective`), which sets its anchors and reads its statistics:
no loss lives here. It holds no training state, so there is nothing of it to checkpoint.

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
from losses.stability import dispersion_readings


class MonitorHooks:
    def __init__(self, model, monitor_cfg: MonitorConfig, stability_cfg: StabilityConfig) -> None:
        self.cfg = monitor_cfg
        # The dispersion reading gates by the loss's t window, as training logs it.
        self.t_max = stability_cfg.t_max
        # moments: every monitored layer computes its attention centres and dispersion (and the
        # objective's anchored colours) inside its own attention call, for the stability loss and
        # the per-step metrics; maps are only recorded inside `recording()`.
        self.monitor = AttentionMonitor(model.unet, reference_grid=model.reference_grid,
                                        extra_tokens=model.extra_tokens, layers=monitor_cfg.layers,
                                        chunk_size=monitor_cfg.chunk_size, moments=True, record=False)

    def dispersion(self, latent_mask: torch.Tensor | None, timesteps: torch.Tensor | None) -> float:
        """Mean dispersion over every monitored layer of the last forward (masked, as logged in training)."""
        values = dispersion_readings(self.monitor.last_attention(), latent_mask, timesteps, self.t_max)
        return float(torch.stack(list(values.values())).mean())

    @contextlib.contextmanager
    def recording(self, num_steps: int) -> Iterator[AttentionMonitor]:
        """Record maps while inside: pass the yielded monitor to the `models.Sampler` run of
        `num_steps` steps (it chooses the samples to record: the conditional half under guidance)."""
        self.monitor.reset(num_steps=num_steps, time_groups=min(self.cfg.time_groups, num_steps))
        self.monitor.set_anchors(None)  # the last training batch's (kept for its backward) are not this run's
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
