"""Latent codecs: images in [-1, 1] <-> the latents the UNet denoises."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import missing_path_error


class LatentCodec(nn.Module):
    """Frozen map between images (B, 3, H, W) and latents (B, C, H/f, W/f)."""

    latent_channels: int
    factor: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Inpainting mask (B, 1, H, W) -> latent grid. Max-pooling marks a latent
        cell as 'to generate' if any of its pixels is, so nothing masked leaks through."""
        return F.max_pool2d(mask, self.factor) if self.factor > 1 else mask


class PixelCodec(LatentCodec):
    """Exact, invertible space-to-depth: the embedded default needs no pretrained VAE."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.latent_channels = 3 * factor * factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.factor) if self.factor > 1 else images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.factor) if self.factor > 1 else latents


class VAECodec(LatentCodec):
    """A frozen diffusers AutoencoderKL; latents scaled by the VAE's scaling factor."""

    def __init__(self, vae: nn.Module, scaling_factor: float | None = None) -> None:
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = vae.config.latent_channels
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)

    def train(self, mode: bool = True) -> "VAECodec":  # the VAE stays in eval mode
        super().train(mode)
        self.vae.eval()
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        # The distribution's mode keeps training targets deterministic given the data.
        return self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode() * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample


def tiny_vae_config() -> dict:
    """A 2x-downsampling AutoencoderKL config for tests (random weights)."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
    )


def build_codec(kind: str, pixel_factor: int = 2, pretrained: str | None = None,
                scaling_factor: float | None = None) -> LatentCodec:
    if kind == "pixel":
        return PixelCodec(pixel_factor)
    from diffusers import AutoencoderKL

    if pretrained is None:
        return VAECodec(AutoencoderKL(**tiny_vae_config()), scaling_factor)
    path = Path(pretrained)
    if (path / "vae" / "config.json").is_file():  # a whole pipeline directory
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise missing_path_error("AutoencoderKL", "model.codec.pretrained", path, "config.json")
    return VAECodec(AutoencoderKL.from_pretrained(path, local_files_only=True), scaling_factor)
