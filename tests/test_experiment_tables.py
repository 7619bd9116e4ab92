"""The experiment's summary and table, against hand-worked values."""
import pytest

import argparse

from apps.experiment import _seeds, results_table, summarise


def test_summarise_is_mean_and_sample_sd_over_seeds():
    s = summarise({0: {"a": 1.0, "b": 2.0}, 1: {"a": 3.0, "b": 2.0}, 2: {"a": 5.0, "b": 2.0}})
    assert s["mean"] == {"a": 3.0, "b": 2.0}
    assert s["sd"]["a"] == pytest.approx(2.0)  # sqrt(((1-3)^2 + 0 + (5-3)^2) / 2)
    assert s["sd"]["b"] == 0.0
    assert summarise({7: {"a": 0.5}})["sd"] == {"a": 0.0}  # one seed: no spread


def test_table_has_fills_then_arms_with_mean_and_sd_and_drops_empty_columns():
    results = {"anchored": {"seeds": {0: {}, 1: {}}, "mean": {"colour_error": 0.04, "pixel_error": 0.2},
                            "sd": {"colour_error": 0.001, "pixel_error": 0.01}},
               "baseline": {"seeds": {0: {}}, "mean": {"colour_error": 0.05}, "sd": {"colour_error": 0.0}}}
    table = results_table(results, {"fill: blind": {"colour_error": 0.1, "pixel_error": 0.25}})
    assert table.splitlines() == [
        "| arm | colour err ↓ | pixel err ↓ |",
        "|---|---:|---:|",
        "| fill: blind | 0.1000 | 0.2500 |",
        "| anchored (2 seeds) | 0.0400 ± 0.0010 | 0.2000 ± 0.0100 |",
        "| baseline (1 seed) | 0.0500 | n/a |",
    ]


def test_seeds_are_one_comma_separated_value():
    assert _seeds("0,1,2") == [0, 1, 2] and _seeds("7") == [7]
    for bad in ("a,b", "1,1", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            _seeds(bad)


def test_arm_config_fills_the_fine_tune_start_for_each_seed(tmp_path):
    """A fine-tune arm starts each seed from that seed's baseline run under --out."""
    from apps.experiment import arm_config

    cfg = arm_config("configs/experiments/tune_every.yaml", tmp_path / "out", 2, ["train.max_steps=7"])
    assert cfg.train.init_from == f"{tmp_path / 'out'}/baseline/seed2"
    assert cfg.train.output_dir == str(tmp_path / "out" / "tune_every" / "seed2")
    assert cfg.train.seed == 2 and cfg.train.max_steps == 7
    assert arm_config("configs/experiments/baseline.yaml", tmp_path, 0, []).train.init_from is None


def test_a_result_cached_before_the_schema_grew_is_still_found(tmp_path):
    """A new config key changes every config hash; a cached result still counts when the run's
    own config.yaml, read with today's defaults, is the config asked for, and not otherwise."""
    import json

    from apps.experiment import _cached, _config_key, arm_config
    from configs.loader import to_yaml

    cfg = arm_config("configs/experiments/baseline.yaml", tmp_path, 0, [])
    run = tmp_path / "baseline" / "seed0"
    run.mkdir(parents=True)
    (run / "heldout.json").write_text(json.dumps({"config": "an-old-hash", "eval_samples": 64,
                                                  "result": {"pixel_error": 0.5}}))
    assert _cached(run, _config_key(cfg), 64) is None  # no config to compare with
    (run / "config.yaml").write_text(to_yaml(cfg).replace("  init_from: null\n", ""))  # as an older run wrote it
    assert _cached(run, _config_key(cfg), 64, cfg) == {"pixel_error": 0.5}
    assert _cached(run, _config_key(cfg), 32, cfg) is None  # other samples
    other = arm_config("configs/experiments/baseline.yaml", tmp_path, 0, ["train.max_steps=7"])
    assert _cached(run, _config_key(other), 64, other) is None


def test_how_a_run_was_watched_does_not_make_it_another_run(tmp_path):
    """The tracker, the CPU thread count, train.resume and the run's directory do not change the
    trained model: a result cached under `tracker.kind=none train.cpu_threads=1`, trained under
    another --out, serves a request without them, by key and through config.yaml; a real
    difference (the learning rate) still misses."""
    import json

    from apps.experiment import _cached, _config_key, _plain, arm_config
    from configs.loader import to_yaml

    quiet = arm_config("configs/experiments/baseline.yaml", tmp_path / "elsewhere", 0,
                       ["tracker.kind=none", "train.cpu_threads=1"])
    plain = arm_config("configs/experiments/baseline.yaml", tmp_path, 0, ["train.resume=latest"])
    assert (quiet.train.output_dir, plain.train.output_dir) == (str(tmp_path / "elsewhere" / "baseline" / "seed0"),
                                                                str(tmp_path / "baseline" / "seed0"))
    assert _config_key(quiet) == _config_key(plain)
    run = tmp_path / "baseline" / "seed0"
    run.mkdir(parents=True)
    (run / "heldout.json").write_text(json.dumps({"config": "an-old-hash", "eval_samples": 64,
                                                  "result": {"pixel_error": 0.5}}))
    (run / "config.yaml").write_text(to_yaml(quiet))
    assert _cached(run, _config_key(plain), 64, plain) == {"pixel_error": 0.5}
    other = arm_config("configs/experiments/baseline.yaml", tmp_path, 0, ["optim.lr=0.5"])
    # The key is a hash of `_plain`: the bookkeeping is out of it, the learning rate in it.
    assert "tracker" not in _plain(plain) and _plain(plain)["train"]["cpu_threads"] is None
    assert _plain(plain)["train"]["output_dir"] is None
    assert _plain(other)["optim"]["lr"] == 0.5 and _plain(plain)["optim"]["lr"] == pytest.approx(1e-3)
    assert _cached(run, _config_key(other), 64, other) is None
