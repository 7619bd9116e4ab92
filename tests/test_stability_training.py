"""The stability loss inside the real training loop."""
from __future__ import annotations

import pytest
import torch

from configs import load_config
from tests.conftest import tiny_overrides
from train import Trainer


def _fixed_batch_dispersion(trainer: Trainer) -> float:
    """Mean dispersion over all monitored layers on a fixed batch, noise and timesteps."""
    from apps.experiment import held_out_readings

    batch = torch.utils.data.default_collate([trainer.val_set[i] for i in range(len(trainer.val_set))])
    return held_out_readings(trainer, batch, torch.Generator().manual_seed(0))["dispersion"]


@pytest.mark.slow
def test_stability_loss_lowers_dispersion_against_the_same_run_without(tmp_path):
    common = {"train.max_steps": 30, "optim.lr": 2e-3, "data.num_val": 8}
    runs = {}
    for weight in (0.0, 5.0):
        cfg = load_config(overrides=tiny_overrides(tmp_path / str(weight), **common,
                                                   **{"stability.dispersion": weight}))
        trainer = Trainer(cfg)
        trainer.fit()
        runs[weight] = _fixed_batch_dispersion(trainer)
        # Dispersion is logged every step, also with weight 0 (watch before regularising).
        assert all("i2am/dispersion/mean" in h for h in trainer.history)
        assert any(k.startswith("i2am/dispersion/down") for k in trainer.history[-1])
        trainer.close()
    assert runs[5.0] < 0.8 * runs[0.0], runs


def test_validation_logs_imacs_and_map_figures(tmp_path):
    cfg = load_config(overrides=tiny_overrides(tmp_path, **{"train.max_steps": 1}))
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.close()
    val = trainer.val_history[-1]
    assert {"i2am/imacs_g", "i2am/imacs_r"} <= set(val)
    images = {p.name.rsplit("_", 1)[0] for p in (tmp_path / "run" / "images").glob("*.png")}
    assert {"i2am_r2g", "i2am_g2r", "i2am_head_level", "i2am_time_level", "i2am_layer_level",
            "i2am_specific_reference", "val_samples"} <= images


def test_monitor_leaves_training_loss_unchanged(tmp_path):
    """Attaching the monitor (weight 0) must not change what the model computes."""
    losses = {}
    for enabled in (True, False):
        cfg = load_config(overrides=tiny_overrides(tmp_path / str(enabled), **{"train.max_steps": 2,
                                                                              "monitor.enabled": enabled,
                                                                              "stability.position": 0, "stability.placement": 0, "stability.sink": 0}))
        trainer = Trainer(cfg)
        trainer.fit()
        trainer.close()
        losses[enabled] = [h["loss/diffusion"] for h in trainer.history]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.slow
def test_experiment_runner_writes_one_table_for_both_arms(tmp_path):
    import json

    from apps.experiment import main

    overrides = [o for o in tiny_overrides(tmp_path, **{"train.max_steps": 2}) if not o.startswith("train.output_dir")]
    code = main(["configs/experiments/baseline.yaml", "configs/experiments/refined.yaml", "--out", str(tmp_path / "exp"),
                 "--eval-samples", "4", "--seeds", "0,1", *overrides])
    assert code == 0
    table = (tmp_path / "exp" / "results.md").read_text()
    assert "| baseline (2 seeds) |" in table and "| refined (2 seeds) |" in table and "±" in table
    assert "| fill: garment-blind |" in table and "| fill: garment's mean colour |" in table
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    per_seed_baseline = results["arms"]["baseline"]["seeds"]["0"]
    for arm in ("baseline", "refined"):
        per_seed = results["arms"][arm]["seeds"]
        assert sorted(per_seed) == ["0", "1"] and all(r["steps"] == 2 for r in per_seed.values())
        colour = [r["colour_error"] for r in per_seed.values()]
        assert results["arms"][arm]["mean"]["colour_error"] == pytest.approx(sum(colour) / 2)
        assert results["arms"][arm]["sd"]["colour_error"] == pytest.approx(abs(colour[0] - colour[1]) / 2 ** 0.5)
        assert all(0 <= r["miou"] <= 1 and 0 <= r["pixel_error"] <= 1 for r in per_seed.values())
        for seed in (0, 1):
            assert (tmp_path / "exp" / arm / f"seed{seed}" / "checkpoints").is_dir()
    for name in ("maps.png", "samples.png"):
        assert (tmp_path / "exp" / name).stat().st_size > 0

    # A second invocation with the same config reuses each finished run's heldout.json: the seed-1
    # runs are not trained again (their checkpoints stay untouched), and the table is the same.
    ckpt = tmp_path / "exp" / "baseline" / "seed1" / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    (tmp_path / "exp" / "baseline" / "seed1" / "heldout.json").write_text(json.dumps({
        **json.loads((tmp_path / "exp" / "baseline" / "seed1" / "heldout.json").read_text()),
        "result": {**results["arms"]["baseline"]["seeds"]["1"], "colour_error": 0.5}}))  # marks the cache
    assert main(["configs/experiments/baseline.yaml", "--out", str(tmp_path / "exp"), "--eval-samples", "4",
                 "--seeds", "0,1", *overrides]) == 0
    again = json.loads((tmp_path / "exp" / "results.json").read_text())["arms"]["baseline"]["seeds"]
    assert again["1"]["colour_error"] == 0.5 and {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before
    assert again["0"] == per_seed_baseline

    # A fine-tune arm starts from the same seed's baseline under --out; --report keeps its table apart.
    first_table = (tmp_path / "exp" / "results.md").read_text()
    assert main(["configs/experiments/tune_every.yaml", "--out", str(tmp_path / "exp"), "--eval-samples", "4",
                 "--seeds", "1", "--report", "tune", *overrides]) == 0
    assert (tmp_path / "exp" / "results.md").read_text() == first_table
    assert "| tune_every (1 seed) |" in (tmp_path / "exp" / "tune.md").read_text()
    assert (tmp_path / "exp" / "tune_maps.png").is_file() and (tmp_path / "exp" / "tune_samples.png").is_file()
    tuned = load_config(files=[tmp_path / "exp" / "tune_every" / "seed1" / "config.yaml"])
    assert tuned.train.init_from == str(tmp_path / "exp" / "baseline" / "seed1")