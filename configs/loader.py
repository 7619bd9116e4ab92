"""Parse `--config FILE key=value ...` into a validated, typed `Config`.

Errors are raised as `ConfigError` naming the offending key (and the closest
valid key for typos), before anything is built or written.
"""
from __future__ import annotations

import argparse
import difflib
import typing
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


def _schema_type(key: str) -> Any:
    """The annotated type of a dotted key in the schema, or None for an unknown key."""
    cls: Any = Config
    typ: Any = None
    for part in key.split("."):
        if not (isinstance(cls, type) and is_dataclass(cls)):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        typ = cls = hints[part]
    return typ


def _is_str_type(typ: Any) -> bool:
    """str or Optional[str]."""
    if typ is str:
        return True
    return typing.get_origin(typ) is typing.Union and set(typing.get_args(typ)) == {str, type(None)}


def _override(item: str) -> DictConfig:
    """One `key=value` as a config. The value is read as YAML (typed), except that a key the
    schema types as a string takes the text as written: YAML 1.1 would turn `no`/`off`/`yes`/`on`
    into booleans (`train.mixed_precision=no`) and `1e3` into a float. `null` still means None."""
    key, raw = item.split("=", 1)
    parsed = OmegaConf.from_dotlist([item])
    if _is_str_type(_schema_type(key)):
        value = OmegaConf.select(parsed, key, throw_on_missing=False)
        if value is not None and not isinstance(value, str):
            parsed = OmegaConf.create()
            OmegaConf.update(parsed, key, raw, merge=False)
    return parsed


def _check_yaml_booleans(loaded: Any, source: str, prefix: str = "") -> None:
    """A string-typed key given an unquoted `no`/`off`/`yes`/`on` in a YAML file: YAML reads it
    as a boolean and the text is lost, so say how to write it."""
    if not isinstance(loaded, DictConfig):
        return
    for name in loaded.keys():
        key = f"{prefix}{name}"
        node = loaded._get_node(name)
        if isinstance(node, DictConfig):
            _check_yaml_booleans(node, source, key + ".")
        elif not OmegaConf.is_missing(loaded, name) and isinstance(loaded[name], bool) \
                and _is_str_type(_schema_type(key)):
            raise ConfigError(
                f"config key '{key}' in {source} is the boolean {loaded[name]}, but it takes a string: YAML reads "
                f"unquoted no/off/yes/on/true/false as booleans; quote the value, e.g. {key.rsplit('.', 1)[-1]}: "
                f"'no'")


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
    "diffusion.prediction_type": ("epsilon", "v_prediction", "sample"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "tracker.kind": ("wandb", "tensorboard", "none"),
    "tracker.mode": ("auto", "online", "offline"),
}


# Data sets whose samples carry "garment_pos" (the position-anchored term needs it).
DATA_WITH_GARMENT_POS: tuple[str, ...] = ("synthetic",)


# The I²AM authors' CWG + TV + DCML act on their decoder layer at these (h, w) queries (losses/authors.py LEVEL).
AUTHORS_LEVEL: tuple[int, int] = (16, 12)


def _query_grids(cfg: Config) -> list[tuple[int, int]]:
    """Every query grid a UNet can have at this resolution: the latent grid and its halvings (each
    down-sampling rounds up). The latent is the image divided by the pixel codec's factor; a VAE
    divides by a power of two, which the halvings of the image cover. Necessary, not sufficient:
    how deep the UNet goes is the model's business."""
    h, w = cfg.data.resolution
    if cfg.model.codec.kind == "pixel":
        h, w = -(-h // cfg.model.codec.pixel_factor), -(-w // cfg.model.codec.pixel_factor)
    grids = [(h, w)]
    while h > 1 or w > 1:
        h, w = -(-h // 2), -(-w // 2)
        grids.append((h, w))
    return grids


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
        ("train.cpu_threads", cfg.train.cpu_threads is None or cfg.train.cpu_threads >= 1, ">= 1, or null (auto)"),
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
    if cfg.model.warp.enabled and cfg.diffusion.prediction_type != "sample":
        raise ConfigError(
            f"model.warp.enabled=true blends the warped garment into the clean-image prediction, but "
            f"diffusion.prediction_type={cfg.diffusion.prediction_type!r}; set diffusion.prediction_type=sample "
            f"or model.warp.enabled=false")
    st = cfg.stability
    weights = {k: getattr(st, k) for k in ("dispersion", "atv", "concentration", "colour", "position",
                                                    "placement", "sink", "flow", "cwg", "tv", "dcml")}
    negative = [f"stability.{k}={v}" for k, v in weights.items() if v < 0]
    if negative:
        raise ConfigError(f"{', '.join(negative)}: stability weights must be >= 0")
    if st.placement_cells < 0:
        raise ConfigError(f"stability.placement_cells={st.placement_cells}: the garment cells the placement term "
                          f"samples per layer and step must be >= 0 (0 = every cell)")
    if any(weights.values()) and not cfg.monitor.enabled:
        on = " ".join(f"stability.{k}={v}" for k, v in weights.items() if v)
        off = " ".join(f"stability.{k}=0" for k, v in weights.items() if v)
        raise ConfigError(f"stability loss weights are set ({on}) but monitor.enabled=false: the loss reads the "
                          f"monitor's statistics; to train without both, also pass {off}")
    for key in ("position", "placement"):
        if getattr(st, key) and cfg.data.name not in DATA_WITH_GARMENT_POS:
            raise ConfigError(
                f"stability.{key}={getattr(st, key)} needs each worn pixel's true garment position (sample key "
                f"'garment_pos'), which data.name={cfg.data.name!r} does not give (only {list(DATA_WITH_GARMENT_POS)} "
                f"does); set stability.{key}=0, or use stability.colour, which every data set supports")
    if st.sink and cfg.model.garment.kind != "clip" and not cfg.model.garment.null_tokens:
        raise ConfigError(
            f"stability.sink={st.sink} moves the attention of queries that show no garment onto extra tokens, "
            f"and model.garment.kind={cfg.model.garment.kind!r} with model.garment.null_tokens=0 has none; set "
            f"model.garment.null_tokens (e.g. 16), or stability.sink=0")
    authors = [f"stability.{k}={getattr(st, k)}" for k in ("cwg", "tv", "dcml") if getattr(st, k)]
    if authors and st.authors_layers is None:
        grids = _query_grids(cfg)
        if tuple(AUTHORS_LEVEL) not in grids:
            raise ConfigError(
                f"{', '.join(authors)}: the authors' terms act on their decoder layer at "
                f"{AUTHORS_LEVEL[0]}x{AUTHORS_LEVEL[1]} queries, which data.resolution={list(cfg.data.resolution)} "
                f"cannot have (its query grids: {[f'{h}x{w}' for h, w in grids]}); set stability.authors_layers "
                f"to layer names or a level that exists, or use a resolution with a 16x12 level (the default "
                f"[32, 24] with the pixel codec, or [512, 384] with a VAE)")
    if cfg.data.name != "synthetic" and not cfg.data.root:
        raise ConfigError(f"data.name={cfg.data.name!r} needs data.root=<dataset directory>")
    if cfg.data.use_pose and cfg.data.name == "synthetic":
        raise ConfigError("data.use_pose=true: the synthetic data set has no pose images "
                          "(pose needs data.name=viton_hd or dresscode)")
    if cfg.data.use_pose and not cfg.model.unet.use_pose:
        raise ConfigError("data.use_pose=true loads a pose image per sample, but model.unet.use_pose=false: the UNet "
                          "would ignore it. Set model.unet.use_pose=true (the UNet gets a pose input) or "
                          "data.use_pose=false")
    if cfg.model.unet.use_pose and not cfg.data.use_pose:
        raise ConfigError("model.unet.use_pose=true gives the UNet a pose input, which needs a pose image per sample: "
                          "set data.use_pose=true (viton_hd / dresscode), or model.unet.use_pose=false")


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = (), defaults: bool = True) -> Config:
    """Schema defaults <- default.yaml <- each file <- dotted overrides, validated.

    ``defaults=False`` leaves default.yaml out: for a run's saved, fully resolved config, where a
    key it lacks was added to the schema since and the run behaved as that key's schema default
    (not as today's default run, which may have switched it on)."""
    cfg: DictConfig = OmegaConf.structured(Config)
    for path in [DEFAULT_CONFIG, *files] if defaults else list(files):
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (looked for it relative to {Path.cwd()})")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors
            raise ConfigError(f"cannot parse config file {path}: {err}") from None
        _check_yaml_booleans(loaded, str(path))
        cfg = _merge(cfg, loaded, str(path))
        # Merging "???" keeps the old value, so re-mark the file's required keys as missing.
        for key in OmegaConf.missing_keys(loaded):
            OmegaConf.update(cfg, key, "???", merge=False)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=50)")
        key = item.split("=", 1)[0]
        cfg = _merge(cfg, _override(item), f"command-line override {item!r}", key)
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
    parser.add_argument("overrides", nargs="*", help="key=value overrides (applied after every --config file, "
                                                     "in the order given; --config may come anywhere)")
    # Intermixed: `train.py train.resume=latest --config FILE data.root=...` (launch/slurm.sh) parses
    # like `train.py --config FILE train.resume=latest data.root=...`.
    args = parser.parse_intermixed_args(argv)
    return load_config(args.config, args.overrides)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
