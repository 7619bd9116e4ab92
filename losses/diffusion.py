"""The denoising loss (k-diffusion style: the loss owns the forward process).

The noise schedule itself (`models.sampling.build_train_scheduler`) lives with the
sampler, so that training and sampling read one definition of it."""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


Metrics = dict[str, torch.Tensor]
# One generator for the whole batch, or one per sample.
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def uniform_draws(generator: Generators, n: int, device: torch.device, *shape: int) -> torch.Tensor:
    """(n, *shape) uniforms in [0, 1): each sample's row from its own generator when given one
    each, else all from the one generator (e.g. the guidance-dropout draw, before `noised`)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"{len(generator)} generators for a batch of {n}")
        return torch.cat([torch.rand(1, *shape, generator=g, device=g.device) for g in generator]).to(device)
    draw_on = generator.device if generator is not None else device
    return torch.rand(n, *shape, generator=generator, device=draw_on).to(device)


class Noised(NamedTuple):
    noisy: torch.Tensor      # the latents at `timesteps`
    noise: torch.Tensor
    timesteps: torch.Tensor  # (B,) int64


class DiffusionLoss:
    """Sample t and noise, noise the latents, call the model, weight the MSE.

    `model(noisy, timesteps)` is any closure returning the prediction; the
    trainer binds the condition and garment. Min-SNR-γ weighting (Hang et al.)
    balances timesteps; the prototype for this project only learned garment
    colours in CPU-minutes with v-prediction + min-SNR.
    """

    def __init__(self, scheduler: DDPMScheduler, snr_gamma: float | None = None) -> None:
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.prediction_type
        self.snr_gamma = snr_gamma
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":  # x0-prediction: the clean latents themselves
            return latents
        return self.scheduler.get_velocity(latents, noise, timesteps)

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        if self.snr_gamma is None:
            return torch.ones_like(timesteps, dtype=torch.float32)
        snr = compute_snr(self.scheduler, timesteps)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        # Min-SNR weights x0-space error by min(snr, γ): v-prediction's MSE is (snr + 1) times the
        # x0-space error, epsilon's snr times; x0-prediction's is the x0-space error itself.
        if self.prediction_type == "sample":
            return clipped
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr

    def noised(self, latents: torch.Tensor, generator: Generators = None) -> Noised:
        """The forward process at random timesteps: noise and t drawn from ``generator`` (on
        its device, then moved to the latents'), the latents noised to t.

        ``generator`` is one generator for the batch, or one per sample (the trainer keys
        each sample's by its position in the data stream, so a sample's noise and t do not
        depend on which rank or batch it lands in). The noise is drawn first, then the
        timesteps, from each generator (the order resumed runs rely on)."""
        b, device = latents.shape[0], latents.device
        if isinstance(generator, (list, tuple)):
            if len(generator) != b:
                raise ValueError(f"DiffusionLoss.noised: {len(generator)} generators for a batch of {b}")
            eps, t = [], []
            for g in generator:
                eps.append(torch.randn(latents.shape[1:], generator=g, device=g.device, dtype=latents.dtype))
                t.append(torch.randint(0, self.scheduler.config.num_train_timesteps, (1,), generator=g,
                                       device=g.device))
            eps_all, t_all = torch.stack(eps).to(device), torch.cat(t).to(device)
            return Noised(self.scheduler.add_noise(latents, eps_all, t_all), eps_all, t_all)
        draw_on = generator.device if generator is not None else device

        eps = torch.randn(latents.shape, generator=generator, device=draw_on, dtype=latents.dtype).to(device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator,
                          device=draw_on).to(device)
        return Noised(self.scheduler.add_noise(latents, eps, t), eps, t)

    def loss(self, pred: torch.Tensor, latents: torch.Tensor, noised: Noised) -> tuple[torch.Tensor, Metrics]:
        """The weighted MSE of a prediction made at ``noised`` (what `noised()` returned)."""
        target = self.target(latents, noised.noise, noised.timesteps)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        loss = (per_sample * self.weights(noised.timesteps)).mean()
        return loss, {"loss/diffusion": loss.detach(), "loss/mse": per_sample.mean().detach()}

    def __call__(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], latents: torch.Tensor,
                 generator: Generators = None) -> tuple[torch.Tensor, Metrics]:
        noised = self.noised(latents, generator)
        return self.loss(model(noised.noisy, noised.timesteps), latents, noised)
