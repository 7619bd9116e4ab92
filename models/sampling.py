"""DDIM sampling for the try-on model, with classifier-free guidance on the garment.

Under guidance the UNet sees a doubled batch ordered [unconditional, conditional],
as diffusers' pipelines do; the I²AM monitor records the conditional half.
"""
from __future__ import annotations

from typing import Mapping

import torch
from diffusers import DDIMScheduler, SchedulerMixin
from tqdm.auto import tqdm

from .tryon import TryOnModel


def build_sample_scheduler(train_scheduler: SchedulerMixin) -> DDIMScheduler:
    # "trailing" spacing starts at t = T-1, the pure-noise end the model was trained on.
    return DDIMScheduler.from_config(train_scheduler.config, timestep_spacing="trailing", clip_sample=False)


@torch.no_grad()
def sample_tryon(model: TryOnModel, batch: Mapping[str, torch.Tensor], scheduler: DDIMScheduler, steps: int,
                 guidance_scale: float = 1.0, generator: torch.Generator | None = None,
                 paste_back: bool = True, progress: bool = False) -> torch.Tensor:
    """Generate the try-on images (B, 3, H, W) in [-1, 1] for a batch of
    agnostic persons, masks and garments."""
    cond = model.condition(batch)
    tokens = model.garment_tokens(batch["garment"])
    b, _, h, w = cond.shape
    use_cfg = guidance_scale != 1.0
    if use_cfg:
        cond = torch.cat([cond, cond])
        tokens = torch.cat([model.null_garment_tokens(b).to(tokens.dtype), tokens])
    latents = torch.randn((b, model.latent_channels, h, w), generator=generator, device=cond.device, dtype=tokens.dtype)
    scheduler.set_timesteps(steps, device=cond.device)
    latents = latents * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        x = scheduler.scale_model_input(latents, t)
        x = torch.cat([x, x]) if use_cfg else x
        pred = model(x, t.expand(x.shape[0]), cond, tokens=tokens)
        if use_cfg:
            uncond, conditional = pred.chunk(2)
            pred = uncond + guidance_scale * (conditional - uncond)
        latents = scheduler.step(pred, t, latents, generator=generator).prev_sample
    images = model.codec.decode(latents).float().clamp(-1, 1)
    if paste_back:  # keep the person outside the inpainting region, as try-on evaluations do
        mask = batch["mask"].to(images.dtype)
        images = images * mask + batch["agnostic"].to(images.dtype) * (1 - mask)
    return images
