"""The training objective of the try-on model, in one place.

One call per micro-batch does, in this order:

1. encode the person (the target latents) and the spatial condition;
2. draw the guidance dropout, then the noise and t (`DiffusionLoss.noised`), once;
3. give the monitor this batch's colour anchors (`i2am.dispersion.colour_anchors`),
   so every monitored layer's own attention call also returns what the
   colour-anchored term needs (they stay set through the backward, which re-runs
   the forward under gradient checkpointing);
4. run the model once;
5. the diffusion loss of the prediction, plus the stability terms read from the
   monitor's statistics of that forward (`last_attention()`) against the batch's
   targets (ground-truth colours, worn-garment mask, garment positions), with
   the same t and without the guidance-dropped samples in the anchored terms
   and the peers' recipes (Leffa's flow loss, the I²AM authors' CWG + TV + DCML).

It returns `(loss, metrics)`. Nothing travels back through closures, and the
monitor only measures: the loss lives here and in `losses/stability.py`.
The random draws are those the trainer made before (dropout, noise, t, from
one generator), so a run with every new weight at 0 computes what it did; the
placement term's garment cells come after them, from the same generators.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Mapping

import torch

from configs.schema import StabilityConfig
from i2am import AttentionMonitor
from i2am.dispersion import colour_anchors

from .diffusion import DiffusionLoss, Generators, Metrics, uniform_draws
from .stability import AttentionTargets, StabilityLoss

log = logging.getLogger("losses")


class TryOnObjective:
    """`objective(model, tryon, batch, generator, step) -> (loss, metrics)`.

    ``model`` is what runs the forward (the accelerate-prepared, possibly DDP-wrapped
    `TryOnModel`); ``tryon`` the unwrapped one, for its codec and condition. With a
    ``monitor`` (an `AttentionMonitor` with ``moments=True`` on the model's UNet) the
    stability terms of ``stability`` are added and their readings logged at every step.
    ``dataset`` names the data in messages.
    """

    def __init__(self, diffusion: DiffusionLoss, drop_prob: float, monitor: AttentionMonitor | None = None,
                 stability: StabilityConfig | None = None, dataset: str = "the data set") -> None:
        self.diffusion = diffusion
        self.drop_prob = drop_prob
        self.monitor = monitor
        self.stability = (StabilityLoss(stability or StabilityConfig(), monitored=monitor.layers)
                          if monitor is not None else None)
        self.dataset = dataset
        self._warned_worn = False

    def __call__(self, model: Any, tryon: Any, batch: Mapping[str, Any], generator: Generators = None,
                 step: int = 0) -> tuple[torch.Tensor, Metrics]:
        latents = tryon.codec.encode(batch["person"])
        cond = tryon.condition(batch)
        drop = uniform_draws(generator, latents.shape[0], latents.device) < self.drop_prob
        noised = self.diffusion.noised(latents, generator)
        with self._anchored(tryon, batch):
            pred = model(noised.noisy, noised.timesteps, cond, batch["garment"], drop)
        loss, metrics = self.diffusion.loss(pred, latents, noised)
        if self.stability is not None:
            extra, extra_metrics = self.stability(self.monitor.last_attention(),
                                                  tryon.codec.latent_mask(batch["mask"]), noised.timesteps, step,
                                                  self.targets(batch, keep=~drop), generator)
            loss = loss + extra
            metrics.update(extra_metrics)
        return loss, metrics

    @torch.no_grad()
    def readings(self, tryon: Any, batch: Mapping[str, Any], generator: torch.Generator | None = None
                 ) -> dict[str, float]:
        """The attention readings (`i2am/...` metrics: dispersion, colour variance, centre error,
        per layer and mean) of one noised forward of ``batch`` without guidance dropout, at noise
        and t drawn from ``generator``: the held-out measurement of what training logs."""
        if self.stability is None:
            raise ValueError("readings() needs the monitor (monitor.enabled=true)")
        latents = tryon.codec.encode(batch["person"])
        noised = self.diffusion.noised(latents, generator)
        with self._anchored(tryon, batch):
            tryon(noised.noisy, noised.timesteps, tryon.condition(batch), batch["garment"])
        _, metrics = self.stability(self.monitor.last_attention(), tryon.codec.latent_mask(batch["mask"]),
                                    noised.timesteps, 0, self.targets(batch))
        return {k: float(v) for k, v in metrics.items() if k.startswith("i2am/")}

    def targets(self, batch: Mapping[str, Any], keep: torch.Tensor | None = None) -> AttentionTargets:
        """The anchored terms' targets from a batch; without "worn_mask" the inpainting mask
        stands in (said once)."""
        worn = batch.get("worn_mask")
        if worn is None:
            if not self._warned_worn:
                log.warning("%s gives no 'worn_mask': the anchored attention terms use the inpainting mask "
                            "as the worn-garment region", self.dataset)
                self._warned_worn = True
            worn = batch["mask"]
        return AttentionTargets(batch["person"], worn, batch.get("garment_pos"), keep, batch["garment"])

    @contextlib.contextmanager
    def _anchored(self, tryon: Any, batch: Mapping[str, Any]) -> Iterator[None]:
        """The monitor carries this batch's colour anchors from the block on, and still after it:
        with gradient checkpointing the backward re-runs each layer's forward, and that re-run
        must compute what the first run did (the same value columns, the same saved tensors), so
        the anchors stay until the next batch's replace them, or until a sampling run clears
        them (`train.monitoring.MonitorHooks.recording`). On an error they are cleared at once."""
        if self.monitor is None:
            yield
            return
        self.monitor.set_anchors(colour_anchors(batch["garment"], tryon.reference_grid))
        try:
            yield
        except BaseException:
            self.monitor.set_anchors(None)
            raise
