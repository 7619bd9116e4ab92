"""Typed configuration (structured OmegaConf) and its YAML files."""
from .loader import ConfigError, load_config, parse_args, to_yaml
from .schema import (
    CodecConfig,
    Config,
    DataConfig,
    DiffusionConfig,
    GarmentEncoderConfig,
    ModelConfig,
    OptimConfig,
    TrackerConfig,
    TrainConfig,
    UNetConfig,
)

__all__ = [
    "CodecConfig", "Config", "ConfigError", "DataConfig", "DiffusionConfig", "GarmentEncoderConfig",
    "ModelConfig", "OptimConfig", "TrackerConfig", "TrainConfig", "UNetConfig",
    "load_config", "parse_args", "to_yaml",
]
