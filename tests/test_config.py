from __future__ import annotations

import pytest

from configs import ConfigError, load_config
from configs.loader import VALID_KEYS


def test_default_config_is_the_embedded_default():
    cfg = load_config()
    assert cfg.data.name == "synthetic"
    assert cfg.model.codec.kind == "pixel"
    assert cfg.diffusion.prediction_type == "v_prediction"


def test_default_yaml_states_only_what_differs_from_the_schema():
    from omegaconf import OmegaConf

    from configs.loader import DEFAULT_CONFIG
    from configs.schema import Config

    schema = OmegaConf.structured(Config)
    stated = OmegaConf.to_container(OmegaConf.load(DEFAULT_CONFIG))

    def leaves(node, prefix=""):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    same = [key for key, value in leaves(stated) if OmegaConf.select(schema, key) == value]
    assert not same, f"default.yaml restates schema defaults: {same}"


def test_overrides_are_typed():
    cfg = load_config(overrides=["train.max_steps=7", "optim.lr=3e-4", "data.resolution=[64,48]"])
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.resolution == [64, 48]


def test_unknown_override_names_key_and_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.max_step'.*did you mean 'train\.max_steps'"):
        load_config(overrides=["train.max_step=3"])


def test_unknown_key_in_yaml_file_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(files=[f])
    assert "optim.learning_rate" in str(err.value) and str(f) in str(err.value)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"bad value for config key 'train\.batch_size'"):
        load_config(overrides=["train.batch_size=lots"])


@pytest.mark.parametrize("override, key", [
    ("diffusion.prediction_type=x0", "diffusion.prediction_type"),
    ("tracker.kind=mlflow", "tracker.kind"),
    ("model.cfg_drop_prob=1.5", "model.cfg_drop_prob"),
    ("data.resolution=[33,24]", "data.resolution"),
])
def test_bad_values_name_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config(files=["nope.yaml"])


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.max_steps"])


def test_valid_keys_cover_nested_fields():
    assert "model.unet.pretrained" in VALID_KEYS and "train.resume" in VALID_KEYS


def test_bad_key_on_command_line_exits_before_writing(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    # train.py shares its name with the train/ package, so load it by path.
    spec = importlib.util.spec_from_file_location("train_entry", Path(__file__).parents[1] / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    out = tmp_path / "run"
    code = train_script.main([f"train.output_dir={out}", "train.max_stesp=3"])
    assert code == 2
    assert "train.max_steps" in capsys.readouterr().err
    assert not out.exists()


def test_benchmark_configs_require_only_paths():
    with pytest.raises(ConfigError, match=r"required config keys not set: data\.root, model\.codec\.pretrained"):
        load_config(files=["configs/viton_hd.yaml"])
    paths = ["data.root=/d", "model.codec.pretrained=/m", "model.unet.pretrained=/m", "model.garment.pretrained=/c"]
    for name in ("viton_hd", "dresscode"):
        cfg = load_config(files=[f"configs/{name}.yaml"], overrides=paths)
        assert cfg.data.name == name and cfg.data.resolution == [512, 384]


@pytest.mark.parametrize("arm", ["refined", "finetune", "concentration"])
def test_experiment_arms_differ_from_the_baseline_only_in_the_stability_loss(arm):
    """Same seed, data, model and steps in every arm: the comparison is only about the loss."""
    from dataclasses import asdict

    base = asdict(load_config(files=["configs/experiments/baseline.yaml"]))
    other = asdict(load_config(files=[f"configs/experiments/{arm}.yaml"]))
    assert other["stability"] != base["stability"]
    for section in ("data", "model", "diffusion", "optim"):
        assert other[section] == base[section], section
    assert {k: v for k, v in other["train"].items() if k != "output_dir"} == \
        {k: v for k, v in base["train"].items() if k != "output_dir"}
