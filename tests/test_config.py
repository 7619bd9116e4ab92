from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configs import ConfigError, load_config
from configs.loader import VALID_KEYS

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_is_the_embedded_default():
    cfg = load_config()
    assert cfg.data.name == "synthetic"
    assert cfg.model.codec.kind == "pixel"
    assert cfg.diffusion.prediction_type == "sample" and cfg.diffusion.snr_gamma is None
    assert cfg.model.unet.mask_coords


def test_default_run_trains_with_the_anchored_recipe_and_the_baseline_without():
    """The default's model and stability terms are the anchored_warp arm's, so the experiment measures
    the default; the anchored arm is the same recipe on the model before the warp."""
    from dataclasses import asdict

    default, anchored = load_config(), load_config(files=["configs/experiments/anchored_warp.yaml"])
    assert asdict(default.stability) == asdict(anchored.stability)
    assert asdict(default.model) == asdict(anchored.model)  # the null tokens the sink term needs, the warp
    assert default.stability.position > 0 and default.stability.placement > 0 and default.stability.sink > 0
    assert default.model.garment.null_tokens > 0 and default.model.warp.enabled
    before = load_config(files=["configs/experiments/anchored.yaml"])
    assert asdict(before.stability) == asdict(default.stability) and not before.model.warp.enabled
    weights = ("dispersion", "atv", "concentration", "colour", "position", "placement", "sink", "flow", "cwg", "tv",
               "dcml")
    for control in ("baseline", "baseline_null", "warp"):
        baseline = asdict(load_config(files=[f"configs/experiments/{control}.yaml"]).stability)
        assert all(baseline[k] == 0 for k in weights), control


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


def _same_but_the_stability_loss(control: str, arm: str) -> tuple[dict, dict]:
    """Both arms' configs, after checking that they differ only under `stability:` (and the run
    directory): the same seed, data, model, schedule and steps."""
    from dataclasses import asdict

    base = asdict(load_config(files=[f"configs/experiments/{control}.yaml"]))
    other = asdict(load_config(files=[f"configs/experiments/{arm}.yaml"]))
    assert other["stability"] != base["stability"]
    for section in ("data", "model", "diffusion", "optim"):
        assert other[section] == base[section], section
    assert {k: v for k, v in other["train"].items() if k != "output_dir"} == \
        {k: v for k, v in base["train"].items() if k != "output_dir"}
    return base, other


@pytest.mark.parametrize("control, arm", [(c, a) for c in ("baseline",) for a in (
    "refined", "finetune", "concentration", "authors", "position", "flow", "recommended")] + [("baseline_null", "anchored"),
                                                                                    ("warp", "anchored_warp")])
def test_experiment_arms_differ_from_the_baseline_only_in_the_stability_loss(control, arm):
    """Same seed, data, model and steps in every arm: the comparison is only about the loss.
    `anchored` runs on the default model (null tokens), so its control is `baseline_null`."""
    _same_but_the_stability_loss(control, arm)


def test_the_warp_control_differs_from_baseline_null_only_in_the_warp():
    from dataclasses import asdict

    null = asdict(load_config(files=["configs/experiments/baseline_null.yaml"]))
    warp = asdict(load_config(files=["configs/experiments/warp.yaml"]))
    assert (null["model"].pop("warp")["enabled"], warp["model"].pop("warp")["enabled"]) == (False, True)
    for c in (null, warp):
        c["train"].pop("output_dir"), c.pop("tracker")
    assert null == warp


def test_the_two_baselines_differ_only_in_the_null_tokens():
    from dataclasses import asdict

    plain = asdict(load_config(files=["configs/experiments/baseline.yaml"]))
    null = asdict(load_config(files=["configs/experiments/baseline_null.yaml"]))
    assert (plain["model"]["garment"].pop("null_tokens"), null["model"]["garment"].pop("null_tokens")) == (0, 16)
    plain["train"].pop("output_dir"), null["train"].pop("output_dir")
    plain.pop("tracker"), null.pop("tracker")
    assert plain == null


@pytest.mark.parametrize("arm", ["tune_every", "tune_recommended"])
def test_fine_tune_arms_differ_from_their_control_only_in_the_stability_loss(arm):
    """The diagnosis experiment's fine-tune arms: same start (the baseline of the run's seed),
    steps and schedule as tune_baseline; the control has no stability term."""
    base, other = _same_but_the_stability_loss("tune_baseline", arm)
    assert base["stability"]["position"] == 0 and other["stability"]["position"] > 0
    assert base["train"]["init_from"] == "{out}/baseline/seed{seed}"


def test_the_default_recipe_fine_tune_arms_differ_only_in_where_it_acts():
    """On the default model: the recipe on every layer against the same recipe where the
    diagnosis points (its layers and t window), both from baseline_null."""
    from dataclasses import asdict

    every, recommended = _same_but_the_stability_loss("tune_anchored_every", "tune_anchored_recommended")
    assert every["train"]["init_from"] == "{out}/baseline_null/seed{seed}"
    assert {k: v for k, v in every["stability"].items() if k not in ("layers", "t_max")} == \
        {k: v for k, v in recommended["stability"].items() if k not in ("layers", "t_max")}
    assert every["stability"] == asdict(load_config().stability)  # the default run's recipe
    assert (every["stability"]["layers"], recommended["stability"]["t_max"]) == (None, 800)


# ------------------------------------------------------------------ command line and YAML spellings
def test_config_file_and_overrides_in_any_order(tmp_path):
    """`launch/slurm.sh` puts `train.resume=latest` before the user's `--config FILE key=value`."""
    from configs import parse_args

    f = tmp_path / "small.yaml"
    f.write_text("train:\n  max_steps: 11\n  batch_size: 3\n")
    g = tmp_path / "more.yaml"
    g.write_text("train:\n  batch_size: 5\n")
    orders = [
        ["train.resume=latest", "--config", str(f), "optim.lr=0.5"],
        ["--config", str(f), "train.resume=latest", "optim.lr=0.5"],
        ["train.resume=latest", "optim.lr=0.5", f"--config={f}"],
    ]
    for argv in orders:
        cfg = parse_args(argv)
        assert (cfg.train.resume, cfg.train.max_steps, cfg.train.batch_size, cfg.optim.lr) == \
            ("latest", 11, 3, 0.5), argv
    # files merge in the order given; an override beats every file, wherever it stands
    cfg = parse_args(["train.batch_size=7", "--config", str(f), "--config", str(g)])
    assert (cfg.train.max_steps, cfg.train.batch_size) == (11, 7)
    cfg = parse_args(["--config", str(g), "--config", str(f)])
    assert cfg.train.batch_size == 3
    # later overrides of the same key win (slurm.sh's train.resume=latest can be overridden)
    assert parse_args(["train.resume=latest", "--config", str(f), "train.resume=null"]).train.resume is None


def test_viton_config_with_root_after_it_parses(tmp_path):
    from configs import parse_args

    paths = [f"model.{k}.pretrained={tmp_path / k}" for k in ("codec", "unet", "garment")]
    cfg = parse_args(["train.resume=latest", "--config", str(ROOT / "configs" / "viton_hd.yaml"),
                      f"data.root={tmp_path}", *paths])
    assert cfg.data.name == "viton_hd" and cfg.data.root == str(tmp_path) and cfg.train.resume == "latest"
    assert cfg.model.unet.pretrained == str(tmp_path / "unet") and cfg.train.mixed_precision == "fp16"


@pytest.mark.parametrize("override, key, expected", [
    ("train.mixed_precision=no", "train.mixed_precision", "no"),  # the README's spelling
    ("tracker.run_name=No", "tracker.run_name", "No"),             # Optional[str]: the text, not "False"
    ("tracker.run_name=off", "tracker.run_name", "off"),
    ("tracker.project=false", "tracker.project", "false"),
])
def test_yaml_boolean_spellings_are_strings_for_string_keys(override, key, expected):
    """YAML 1.1 reads no/off/false as booleans; a string-typed key takes the text as written."""
    from omegaconf import OmegaConf

    cfg = load_config(overrides=[override])
    assert OmegaConf.select(OmegaConf.structured(cfg), key) == expected


def test_string_keys_keep_numbers_and_words_as_written():
    cfg = load_config(overrides=["tracker.run_name=on", "tracker.project=1e3", "data.root=yes",
                                 "data.category=upper_body", "train.resume=null"])
    assert (cfg.tracker.run_name, cfg.tracker.project, cfg.data.root) == ("on", "1e3", "yes")
    assert cfg.train.resume is None  # null is still "unset" for an Optional key
    # typed keys are unchanged: booleans and numbers are still parsed
    cfg = load_config(overrides=["monitor.enabled=no", "stability.position=0", "stability.placement=0", "stability.sink=0",
                                 "data.use_pose=off", "optim.lr=1e-3",
                                 "train.max_steps=9"])
    assert cfg.monitor.enabled is False and cfg.data.use_pose is False
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.train.max_steps == 9
    with pytest.raises(ConfigError, match=r"train\.mixed_precision.*'fp32'"):
        load_config(overrides=["train.mixed_precision=fp32"])


def test_unquoted_no_in_a_yaml_file_says_to_quote_it(tmp_path):
    f = tmp_path / "mp.yaml"
    f.write_text("train:\n  mixed_precision: no\n")
    with pytest.raises(ConfigError) as err:
        load_config(files=[f])
    msg = str(err.value)
    assert "train.mixed_precision" in msg and str(f) in msg and "quote" in msg and "'no'" in msg
    f.write_text("train:\n  mixed_precision: 'no'\n")
    assert load_config(files=[f]).train.mixed_precision == "no"


def test_pose_settings_must_agree(tmp_path):
    """data.use_pose loads a pose image the UNet only uses with model.unet.use_pose (and the
    reverse needs the image): a mismatch is a config error before anything is built."""
    real = ["data.name=viton_hd", f"data.root={tmp_path}", "stability.position=0", "stability.placement=0", "stability.sink=0"]
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[*real, "data.use_pose=true"])
    msg = str(err.value)
    assert "data.use_pose=true" in msg and "model.unet.use_pose=false" in msg and "model.unet.use_pose=true" in msg
    with pytest.raises(ConfigError, match=r"model\.unet\.use_pose=true.*data\.use_pose=true"):
        load_config(overrides=[*real, "model.unet.use_pose=true"])
    with pytest.raises(ConfigError, match=r"synthetic.*no pose"):
        load_config(overrides=["data.use_pose=true", "model.unet.use_pose=true"])
    cfg = load_config(overrides=[*real, "data.use_pose=true", "model.unet.use_pose=true"])
    assert cfg.data.use_pose and cfg.model.unet.use_pose


def test_pose_mismatch_stops_train_py_before_writing(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    out = tmp_path / "run"
    code = train_script.main([f"train.output_dir={out}", "data.name=dresscode", f"data.root={tmp_path}",
                              "data.use_pose=true", "stability.position=0", "stability.placement=0", "stability.sink=0"])
    assert code == 2 and "model.unet.use_pose" in capsys.readouterr().err and not out.exists()


def test_a_saved_config_from_before_a_key_existed_loads_as_that_run_behaved(tmp_path, monkeypatch):
    """A run's config.yaml is fully resolved. A key added to the schema since (here `stability.sink`,
    which today's default.yaml switches on) must come back at its schema default, the value the
    run trained with, not at today's default run's: that would even refuse the old run's model
    (no null tokens)."""
    import models.build
    from configs.loader import to_yaml
    from train.checkpoint import load_checkpoint

    old = to_yaml(load_config(overrides=["model.garment.null_tokens=0", "stability.sink=0"]))
    assert "  sink: 0.0\n" in old
    saved = tmp_path / "config.yaml"
    saved.write_text(old.replace("  sink: 0.0\n", ""))  # as a run written before the key existed
    with pytest.raises(ConfigError, match="stability.sink=0.03 .*null_tokens=0 has none"):
        load_config(files=[saved])
    cfg = load_config(files=[saved], defaults=False)
    assert cfg.stability.sink == 0 and cfg.model.garment.null_tokens == 0
    assert cfg.stability.placement == load_config().stability.placement  # the rest as saved
    # What loads checkpoints for evaluation, analysis and diagnosis reads it so (weights stubbed:
    # the config is the point here).
    (tmp_path / "model").mkdir()
    built = []
    monkeypatch.setattr(models.build, "load_trained_model",
                        lambda model_cfg, weights: built.append(model_cfg) or torch.nn.Linear(1, 1))
    loaded = load_checkpoint(tmp_path)
    assert loaded.cfg.stability.sink == 0 and built[0].garment.null_tokens == 0
