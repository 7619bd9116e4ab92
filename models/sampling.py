"""The noise schedules and the one sampler of the try-on model.

:class:`Sampler` runs DDIM with classifier-free guidance on the garment. Under guidance the
UNet sees a doubled batch ordered [unconditional, conditional], as diffusers' pipelines
do; a monitor passed to the sampler records the conditional half only.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin
from tqdm.auto import tqdm

from .tryon import TryOnModel


def build_train_scheduler(num_train_timesteps: int, beta_schedule: str, prediction_type: str) -> DDPMScheduler:
    """The forward (noising) process the model is trained on."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction_type, clip_sample=False)


def build_sample_scheduler(train_scheduler: SchedulerMixin) -> DDIMScheduler:
    # "trailing" spacing starts at t = T-1, the pure-noise end the model was trained on.
    return DDIMScheduler.from_config(train_scheduler.config, timestep_spacing="trailing", clip_sample=False)


def conditional_half(batch_size: int) -> slice:
    """The conditional samples of a guided UNet batch [unconditional, conditional]."""
    return slice(batch_size // 2, None)


class Monitor(Protocol):
    """What the sampler needs of a recorder (e.g. :class:`i2am.AttentionMonitor`): which
    samples of the UNet batch to record, a fresh start, and the recording."""

    batch_slice: Any

    def reset(self) -> None: ...

    def maps(self) -> Any: ...


@dataclass
class Samples:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    maps: Any = None      # the monitor's maps() of this run (e.g. i2am.AttributionMaps); None without a monitor


class Sampler:
    """DDIM sampling of try-on images, built from the diffusion config.

    ``sampler(model, batch, seed=0)`` returns :class:`Samples`. With ``guidance_scale != 1``
    every UNet call gets the doubled batch [unconditional (null garment tokens), conditional]
    and the predictions are mixed as ``uncond + scale * (cond - uncond)``. The initial noise
    and DDIM's (eta = 0: unused) step noise come from one generator, in that order; or, with
    ``seeds=`` (one per sample), sample k's from its own generator seeded with ``seeds[k]``,
    so that a sample's noise depends neither on the batch it is in nor on its place there.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear",
                 prediction_type: str = "v_prediction", steps: int = 25, guidance_scale: float = 1.0) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.train_scheduler = build_train_scheduler(num_train_timesteps, beta_schedule, prediction_type)
        self.scheduler = build_sample_scheduler(self.train_scheduler)
        self.steps = int(steps)
        self.guidance_scale = float(guidance_scale)

    @classmethod
    def from_config(cls, diffusion: Any, *, steps: int | None = None,
                    guidance_scale: float | None = None) -> Sampler:
        """From a ``configs.DiffusionConfig`` (or a mapping with its keys); ``steps`` and
        ``guidance_scale`` override its ``sample_steps`` and ``guidance_scale``."""
        def get(key: str) -> Any:
            return diffusion[key] if isinstance(diffusion, Mapping) else getattr(diffusion, key)

        return cls(get("num_train_timesteps"), get("beta_schedule"), get("prediction_type"),
                   steps=get("sample_steps") if steps is None else steps,
                   guidance_scale=get("guidance_scale") if guidance_scale is None else guidance_scale)

    @property
    def guided(self) -> bool:
        """Whether the UNet sees the doubled [unconditional, conditional] batch."""
        return self.guidance_scale != 1.0

    @torch.no_grad()
    def __call__(self, model: TryOnModel, batch: Mapping[str, torch.Tensor], *,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 seeds: Sequence[int] | None = None, monitor: Monitor | None = None,
                 paste_back: bool = True, progress: bool = False, latents: torch.Tensor | None = None,
                 start_step: int = 0, on_step: Callable[[int, torch.Tensor], None] | None = None) -> Samples:
        """Generate the try-on images for a batch of agnostic persons, masks and garments.

        Noise comes from ``generator``, or from a new one seeded with ``seed`` on the batch's
        device (neither: torch's global generator), or with ``seeds`` from one generator per
        sample on the batch's device (sample k gets the noise ``seed=seeds[k]`` gives a batch of
        one). ``monitor`` is reset, records this run
        (the conditional half under guidance) and its ``maps()`` are returned; its
        ``batch_slice`` is restored after. ``paste_back`` keeps the person outside the
        inpainting mask, as try-on evaluations do.

        Resuming: ``on_step(k, latents)`` sees the latents that enter step k (0-based, before
        the UNet call); ``latents=`` with ``start_step=k`` starts the loop there instead of
        from noise, skipping steps 0..k-1. With DDIM's default eta = 0 the steps draw no noise,
        so resuming from latents that ``on_step`` gave reproduces the run from step k on
        (the diagnosis re-samples only the steps after an intervention starts)."""
        if sum(x is not None for x in (generator, seed, seeds)) > 1:
            raise ValueError("pass a generator, a seed or per-sample seeds, not both")
        b = batch["garment"].shape[0]
        if seeds is not None and len(seeds) != b:
            raise ValueError(f"seeds: expected one per sample ({b}), got {len(seeds)}")
        generators: torch.Generator | list[torch.Generator] | None = generator
        if seed is not None or seeds is not None:
            device = batch["garment"].device
            generators = (torch.Generator(device).manual_seed(seed) if seed is not None
                          else [torch.Generator(device).manual_seed(int(s)) for s in seeds])
        if not 0 <= start_step < self.steps or (start_step and latents is None):
            raise ValueError(f"start_step={start_step}: expected 0..{self.steps - 1}, and latents to start from "
                             "when it is > 0")
        resume = dict(latents=latents, start_step=start_step, on_step=on_step)
        if monitor is None:
            return Samples(self._sample(model, batch, generators, paste_back, progress, **resume))
        previous = monitor.batch_slice
        monitor.batch_slice = conditional_half if self.guided else None
        monitor.reset()
        try:
            images = self._sample(model, batch, generators, paste_back, progress, **resume)
            return Samples(images, monitor.maps())
        finally:
            monitor.batch_slice = previous

    def _sample(self, model: TryOnModel, batch: Mapping[str, torch.Tensor],
                generator: torch.Generator | list[torch.Generator] | None, paste_back: bool,
                progress: bool, latents: torch.Tensor | None = None, start_step: int = 0,
                on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        cond = model.condition(batch)
        garment = batch["garment"]
        tokens = model.garment_tokens(garment)
        b, _, h, w = cond.shape
        guided, scale = self.guided, self.guidance_scale
        drop = None
        if guided:
            cond = torch.cat([cond, cond])
            tokens = torch.cat([model.null_garment_tokens(b).to(tokens.dtype), tokens])
            garment = torch.cat([garment, garment])
            drop = torch.arange(2 * b, device=garment.device) < b  # the unconditional half
        shape = (b, model.latent_channels, h, w)
        scheduler = self.scheduler
        scheduler.set_timesteps(self.steps, device=cond.device)
        if latents is not None:  # resuming at start_step
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents: expected {shape} to resume from, got {tuple(latents.shape)}")
            latents = latents.to(device=cond.device, dtype=tokens.dtype)
        else:
            if isinstance(generator, list):  # one generator per sample (diffusers' randn_tensor convention)
                latents = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=cond.device,
                                                 dtype=tokens.dtype) for g in generator])
            else:
                latents = torch.randn(shape, generator=generator, device=cond.device, dtype=tokens.dtype)
            latents = latents * scheduler.init_noise_sigma
        # The warp's gates, held for the whole run (TryOnModel.warp_gate): from the noisiest step.
        gate = model.warp_gate(cond, tokens, int(scheduler.config.num_train_timesteps) - 1)
        timesteps = scheduler.timesteps[start_step:]
        for k, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False), start_step):
            if on_step is not None:
                on_step(k, latents)
            x = scheduler.scale_model_input(latents, t)
            x = torch.cat([x, x]) if guided else x
            pred = model(x, t.expand(x.shape[0]), cond, garment, drop, tokens=tokens, gate=gate)
            if guided:
                uncond, conditional = pred.chunk(2)
                pred = uncond + scale * (conditional - uncond)
            latents = scheduler.step(pred, t, latents, generator=generator).prev_sample
        images = model.codec.decode(latents).float().clamp(-1, 1)
        if paste_back:
            mask = batch["mask"].to(images.dtype)
            images = images * mask + batch["agnostic"].to(images.dtype) * (1 - mask)
        return images


__all__ = ["Monitor", "Sampler", "Samples", "build_sample_scheduler", "build_train_scheduler", "conditional_half"]
