"""Try-on model components and the sampler, built from `configs.ModelConfig`."""
from __future__ import annotations

from .build import build_model
from .codec import LatentCodec, PixelCodec, VAECodec, build_codec
from .errors import ModelConfigError
from .garment import ClipGarmentEncoder, ConvTokenizer, GarmentEncoder, build_garment_encoder
from .registry import UNET_SIZES
from .sampling import Sampler, Samples, build_train_scheduler
from .tryon import TryOnModel
from .unet import build_unet, widen_conv_in

__all__ = [
    "ClipGarmentEncoder", "ConvTokenizer", "GarmentEncoder", "LatentCodec", "ModelConfigError", "PixelCodec",
    "Sampler", "Samples", "TryOnModel", "UNET_SIZES", "VAECodec", "build_codec", "build_garment_encoder", "build_model",
    "build_train_scheduler", "build_unet", "widen_conv_in",
]
