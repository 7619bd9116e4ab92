"""Garment encoders: a garment image -> a grid of reference tokens for cross-attention.

Every encoder records `reference_grid` (h_r, w_r) and `extra_tokens` (tokens
before the grid, e.g. CLIP's CLS) so the I²AM monitor can lay the keys out on
the garment. The contract is `forward(garment) -> (B, extra_tokens + h_r*w_r, dim)`;
a StableVITON-style spatial encoder (multi-scale features feeding extra
cross-attention blocks in the decoder) fits behind the same attributes by also
exposing its per-resolution feature maps.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import missing_path_error
from .registry import CLIP_VISION_SIZES

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class GarmentEncoder(nn.Module):
    reference_grid: tuple[int, int]
    extra_tokens: int
    dim: int

    @property
    def num_tokens(self) -> int:
        return self.extra_tokens + self.reference_grid[0] * self.reference_grid[1]


class ConvTokenizer(GarmentEncoder):
    """A small CNN trained from scratch: `downsample` stride-2 convolutions, pooled to the
    token grid, plus a learned position embedding so tokens know where on the garment they
    are, then `mixer_layers` transformer layers over the tokens.

    Why the mixer: a token's convolutional receptive field covers a few pixels, so it cannot
    tell where on the garment (relative to collar and hem) it sits, which a torso patch
    needs to find "its" cell; self-attention over the whole grid gives every token that
    global view (real try-on models encode the garment with a whole UNet or ViT).

    Why `null_tokens`: under the softmax every query takes a full unit of attention from
    the garment, so arms, neck and background inside the inpainting mask must mix in some
    garment colour. Learned content-free tokens before the grid (like CLIP's CLS or a
    text encoder's start token) give those queries somewhere else to look; the monitor
    treats them as extra tokens."""

    def __init__(self, grid: tuple[int, int], dim: int, width: int = 64, downsample: int = 2,
                 mixer_layers: int = 0, null_tokens: int = 0) -> None:
        super().__init__()
        if null_tokens < 0:
            raise ValueError(f"model.garment.null_tokens must be >= 0, got {null_tokens}")
        self.reference_grid = (int(grid[0]), int(grid[1]))
        self.extra_tokens = int(null_tokens)
        self.dim = dim
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.SiLU()]
        for _ in range(downsample):
            layers += [nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU()]
        self.features = nn.Sequential(*layers, nn.Conv2d(width, dim, 1))
        n = self.reference_grid[0] * self.reference_grid[1]
        self.position = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.mixer = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(mixer_layers))
        self.null = nn.Parameter(torch.randn(1, null_tokens, dim) * 0.02) if null_tokens else None

    def forward(self, garment: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(garment), self.reference_grid)
        tokens = x.flatten(2).transpose(1, 2) + self.position  # (B, h_r*w_r, dim), row-major like the grid
        for layer in self.mixer:
            tokens = layer(tokens)
        if self.null is not None:  # after the mixer: they must not become garment summaries
            tokens = torch.cat([self.null.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.norm(tokens)


class ClipGarmentEncoder(GarmentEncoder):
    """CLIP vision patch tokens (CLS first) projected to the UNet's cross-attention width."""

    def __init__(self, dim: int, pretrained: str | None = None, size: str = "tiny", freeze_backbone: bool = True) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if pretrained is None:
            if size not in CLIP_VISION_SIZES:
                raise KeyError(f"unknown model.garment.clip_size {size!r}; known: {sorted(CLIP_VISION_SIZES)}")
            self.backbone = CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION_SIZES[size]))
        else:
            path = Path(pretrained)
            if (path / "image_encoder" / "config.json").is_file():
                path = path / "image_encoder"
            if not (path / "config.json").is_file():
                raise missing_path_error("CLIP vision model", "model.garment.pretrained", path, "config.json")
            self.backbone = CLIPVisionModel.from_pretrained(path, local_files_only=True)
        cfg = self.backbone.config
        side = cfg.image_size // cfg.patch_size
        self.reference_grid = (side, side)
        self.extra_tokens = 1
        self.dim = dim
        self.image_size = cfg.image_size
        self.proj = nn.Linear(cfg.hidden_size, dim)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, garment: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(garment, (self.image_size, self.image_size), mode="bicubic", align_corners=False, antialias=True)
        x = ((x + 1) / 2 - self.mean) / self.std
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            hidden = self.backbone(pixel_values=x).last_hidden_state
        return self.proj(hidden)


def build_garment_encoder(kind: str, dim: int, grid: tuple[int, int], width: int = 64,
                          pretrained: str | None = None, clip_size: str = "tiny",
                          freeze_backbone: bool = True, downsample: int = 2, mixer_layers: int = 0,
                          null_tokens: int = 0) -> GarmentEncoder:
    if kind == "conv":
        return ConvTokenizer(grid, dim, width, downsample, mixer_layers, null_tokens)
    if kind == "clip":
        return ClipGarmentEncoder(dim, pretrained, clip_size, freeze_backbone)
    raise ValueError(f"unknown model.garment.kind {kind!r}; expected 'conv' or 'clip'")
