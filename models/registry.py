"""Model sizes, keyed by name (DiT-style): `model.unet.size=tiny` picks a row.

Each entry holds `UNet2DConditionModel` keyword arguments except the channel
counts that follow from the codec and the conditioning (in/out channels).
"""
from __future__ import annotations

from typing import Any

UNET_SIZES: dict[str, dict[str, Any]] = {
    # 2.4M parameters (2.5M with the default conv garment tokenizer): trains on a
    # 2-core CPU in minutes at 32x24 pixels.
    "tiny": dict(
        block_out_channels=(48, 96),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers quirk: this is the number of heads
        norm_num_groups=16,
    ),
    # Smallest config that exercises the code paths; for fast tests.
    "test": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    ),
    # Stable Diffusion 1.5 shapes (860M parameters), for GPUs.
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
}

# Tiny CLIP vision configs for `model.garment.kind=clip` without pretrained weights.
CLIP_VISION_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=32, patch_size=4),
    "vit-l-14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14),
}


def unet_size(name: str) -> dict[str, Any]:
    if name not in UNET_SIZES:
        raise KeyError(f"unknown model.unet.size {name!r}; known sizes: {sorted(UNET_SIZES)}")
    return dict(UNET_SIZES[name])
