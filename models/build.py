"""Config -> TryOnModel."""
from __future__ import annotations

from pathlib import Path

from configs.schema import ModelConfig

from .codec import build_codec
from .garment import build_garment_encoder
from .tryon import TryOnModel
from .unet import build_unet
from .warp import AttentionWarp


def build_model(cfg: ModelConfig) -> TryOnModel:
    codec = build_codec(cfg.codec.kind, cfg.codec.pixel_factor, cfg.codec.pretrained, cfg.codec.scaling_factor)
    c = codec.latent_channels
    # noisy + agnostic + mask [+ pose] [+ mask-box coordinates]
    in_channels = c + c + 1 + (c if cfg.unet.use_pose else 0) + (2 if cfg.unet.mask_coords else 0)
    # With the warp the UNet also predicts its gates, one per latent channel (models/warp.py).
    unet = build_unet(cfg.unet.size, in_channels, c, cfg.unet.pretrained, gates=cfg.warp.enabled)
    if cfg.unet.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    garment = build_garment_encoder(
        cfg.garment.kind, unet.config.cross_attention_dim, tuple(cfg.garment.grid), cfg.garment.width,
        cfg.garment.pretrained, cfg.garment.clip_size, cfg.garment.freeze_backbone,
        cfg.garment.downsample, cfg.garment.mixer_layers, cfg.garment.null_tokens,
    )
    warp = AttentionWarp(unet, garment.reference_grid, garment.extra_tokens, cfg.warp.layer) if cfg.warp.enabled else None
    return TryOnModel(codec, unet, garment, use_pose=cfg.unet.use_pose, mask_coords=cfg.unet.mask_coords, warp=warp)


def load_trained_model(cfg: ModelConfig, weights_dir: str | Path) -> TryOnModel:
    """Rebuild from config and load weights saved by `TryOnModel.save_pretrained`."""
    model = build_model(cfg)
    model.load_pretrained(weights_dir)
    return model
