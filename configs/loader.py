"""Parse `--config FILE key=value ...` into a validated, typed `Config`.

Errors are raised as `ConfigError` naming the offending key (and the closest
valid key for typos), before anything is built or written.
"""
from __future__ import annotations

import argparse
import difflib
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .schema import Config

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says what and where."""


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_all_keys(type(default), key + "."))
    return keys


VALID_KEYS = _all_keys(Config)


def _closest(key: str) -> str:
    matches = difflib.get_close_matches(key, VALID_KEYS, n=1, cutoff=0.5)
    if not matches:  # a typo in the leaf name only: compare leaves under the same parent
        leaf = key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in VALID_KEYS}
        leaf_match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        matches = [leaves[leaf_match[0]]] if leaf_match else []
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def _explain(err: OmegaConfBaseException, source: str, key_hint: str | None = None) -> ConfigError:
    key = key_hint or getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in str(err):
        return ConfigError(f"unknown config key '{key}' in {source}{_closest(key)}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"bad value for config key '{key}' in {source}: {msg}")
    return ConfigError(f"config error in {source} at '{key}': {str(err).splitlines()[0]}")


def _merge(base: DictConfig, other: Any, source: str, key_hint: str | None = None) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _explain(err, source, key_hint) from None


CHOICES: dict[str, Iterable[str]] = {
    "data.name": ("synthetic", "viton_hd", "dresscode"),
    "model.codec.kind": ("pixel", "vae"),
    "model.garment.kind": ("conv", "clip"),
    "diffusion.prediction_type": ("epsilon", "v_prediction"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "tracker.kind": ("wandb", "tensorboard", "none"),
    "tracker.mode": ("auto", "online", "offline"),
}


# Data sets whose samples carry "garment_pos" (the position-anchored term needs it).
DATA_WITH_GARMENT_POS: tuple[str, ...] = ("synthetic",)


def validate(cfg: Config) -> None:
    """Checks the schema cannot express: choices, ranges, shapes."""
    node = OmegaConf.structured(cfg)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(node, key)
        if value not in tuple(allowed):
            raise ConfigError(f"config key '{key}' is {value!r}; expected one of {list(allowed)}")
    checks = [
        ("data.resolution", len(cfg.data.resolution) == 2 and min(cfg.data.resolution) > 0, "two positive ints [H, W]"),
        ("model.garment.grid", len(cfg.model.garment.grid) == 2 and min(cfg.model.garment.grid) > 0, "two positive ints [h_r, w_r]"),
        ("model.cfg_drop_prob", 0.0 <= cfg.model.cfg_drop_prob < 1.0, "a probability in [0, 1)"),
        ("train.max_steps", cfg.train.max_steps > 0, "> 0"),
        ("train.batch_size", cfg.train.batch_size > 0, "> 0"),
        ("train.grad_accum", cfg.train.grad_accum > 0, "> 0"),
        ("train.checkpoint_limit", cfg.train.checkpoint_limit >= 1, ">= 1 (the newest checkpoint is always kept)"),
        ("optim.lr", cfg.optim.lr > 0, "> 0"),
        ("diffusion.sample_steps", 0 < cfg.diffusion.sample_steps <= cfg.diffusion.num_train_timesteps, "in [1, num_train_timesteps]"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' is {OmegaConf.select(node, key)!r}; expected {expected}")
    factor = cfg.model.codec.pixel_factor
    if cfg.model.codec.kind == "pixel" and any(r % factor for r in cfg.data.resolution):
        raise ConfigError(
            f"data.resolution {list(cfg.data.resolution)} is not divisible by model.codec.pixel_factor={factor}"
        )
    st = cfg.stability
    weights = {k: getattr(st, k) for k in ("dispersion", "atv", "concentration", "colour", "position")}
    negative = [f"stability.{k}={v}" for k, v in weights.items() if v < 0]
    if negative:
        raise ConfigError(f"{', '.join(negative)}: stability weights must be >= 0")
    if any(weights.values()) and not cfg.monitor.enabled:
        raise ConfigError("stability loss weights are set but monitor.enabled=false: the loss needs the monitor")
    if st.position and cfg.data.name not in DATA_WITH_GARMENT_POS:
        raise ConfigError(
            f"stability.position={st.position} needs each worn pixel's true garment position (sample key "
            f"'garment_pos'), which data.name={cfg.data.name!r} does not give (only {list(DATA_WITH_GARMENT_POS)} "
            f"does); set stability.position=0, or use stability.colour, which every data set supports")
    if cfg.data.name != "synthetic" and not cfg.data.root:
        raise ConfigError(f"data.name={cfg.data.name!r} needs data.root=<dataset directory>")


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """Schema defaults <- default.yaml <- each file <- dotted overrides, validated."""
    cfg: DictConfig = OmegaConf.structured(Config)
    for path in [DEFAULT_CONFIG, *files]:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (looked for it relative to {Path.cwd()})")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors
            raise ConfigError(f"cannot parse config file {path}: {err}") from None
        cfg = _merge(cfg, loaded, str(path))
        # Merging "???" keeps the old value, so re-mark the file's required keys as missing.
        for key in OmegaConf.missing_keys(loaded):
            OmegaConf.update(cfg, key, "???", merge=False)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=50)")
        key = item.split("=", 1)[0]
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"command-line override {item!r}", key)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"required config keys not set: {', '.join(missing)} "
                          f"(marked ??? in the config files; set them on the command line, e.g. {missing[0]}=...)")
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(obj)
    return obj


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        description="Train a try-on latent diffusion model with the I²AM monitor.",
        epilog="Overrides are dotted keys, e.g.: train.max_steps=50 model.unet.size=tiny",
    )
    parser.add_argument("--config", action="append", default=[], help="YAML file(s), merged in order")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
