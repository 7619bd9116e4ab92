"""The training objective: one call per micro-batch owns the noising, the forward and both losses."""
from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import default_collate

from configs import ConfigError, load_config
from configs.schema import StabilityConfig
from losses import DiffusionLoss, TryOnObjective
from tests.conftest import tiny_overrides
from train import Trainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model with the monitor attached (as the trainer builds it) and a synthetic batch."""
    # Every stability weight at 0 (the default run's position term off): the tests switch terms on.
    cfg = load_config(overrides=tiny_overrides(tmp_path_factory.mktemp("obj"), **{"train.max_steps": 1,
                                                                                  "stability.position": 0, "stability.placement": 0, "stability.sink": 0}))
    trainer = Trainer(cfg)
    batch = default_collate([trainer.train_set[i] for i in range(4)])
    yield trainer, batch
    trainer.close()


def _generator(seed=11):
    return torch.Generator().manual_seed(seed)


def test_with_zero_weights_the_loss_is_the_plain_diffusion_loss_of_the_same_draws(setup):
    """The draws the trainer made before the objective existed, by hand: guidance dropout, then
    noise and t from one generator, the model on those; the objective's loss is that loss."""
    trainer, batch = setup
    model = trainer.unwrapped
    loss, metrics = trainer.objective(trainer.model, model, batch, _generator(), step=0)
    gen = _generator()
    latents = model.codec.encode(batch["person"])
    drop = torch.rand(latents.shape[0], generator=gen) < trainer.cfg.model.cfg_drop_prob
    plain = DiffusionLoss(trainer.noise_scheduler, trainer.cfg.diffusion.snr_gamma)
    want, _ = plain(lambda x, t: model(x, t, model.condition(batch), batch["garment"], drop), latents, gen)
    assert float(loss.detach()) == float(want.detach())
    assert float(metrics["loss/stability"]) == 0
    names = {k.split("/")[-1] for k in metrics if k.startswith("i2am/colour_var/")}
    assert "mean" in names and len(names) == 1 + len(trainer.hooks.monitor.layers)
    assert {f"i2am/centre_error/{n}" for n in names} <= set(metrics)  # synthetic data: garment_pos known
    # The anchors stay for the backward (gradient checkpointing re-runs the forward there) ...
    from i2am.dispersion import colour_anchors
    assert torch.equal(trainer.hooks.monitor._anchors, colour_anchors(batch["garment"], model.reference_grid))
    # ... until a sampling run starts recording
    with trainer.hooks.recording(2):
        assert trainer.hooks.monitor._anchors is None


def test_colour_weight_adds_the_logged_colour_variance_with_gradient(setup):
    trainer, batch = setup
    model = trainer.unwrapped
    plain_loss, plain_metrics = trainer.objective(trainer.model, model, batch, _generator(), step=0)
    objective = TryOnObjective(trainer.diffusion_loss, trainer.cfg.model.cfg_drop_prob, trainer.hooks.monitor,
                               StabilityConfig(colour=0.5))
    loss, metrics = objective(trainer.model, model, batch, _generator(), step=0)
    # Same draws: the stability part is the weighted colour variance averaged over the layers.
    expected = float(plain_loss.detach()) + 0.5 * float(metrics["i2am/colour_var/mean"])
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["i2am/colour_var/mean"]) == pytest.approx(float(plain_metrics["i2am/colour_var/mean"]),
                                                                   rel=1e-6)
    # The colour term alone (diffusion loss stubbed to 0) reaches the garment tokens' positions.
    class NoDiffusion:
        def noised(self, latents, generator):
            return trainer.diffusion_loss.noised(latents, generator)

        def loss(self, pred, latents, noised):
            return pred.sum() * 0, {}

    objective.diffusion = NoDiffusion()
    colour_only, metrics = objective(trainer.model, model, batch, _generator(), step=0)
    assert float(colour_only.detach()) == pytest.approx(0.5 * float(metrics["i2am/colour_var/mean"]), rel=1e-5)
    grad, = torch.autograd.grad(colour_only, model.garment_encoder.position)
    assert grad.abs().sum() > 0


def test_anchors_are_cleared_when_the_forward_fails(setup):
    trainer, batch = setup

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        trainer.objective(broken, trainer.unwrapped, batch, _generator())
    assert trainer.hooks.monitor._anchors is None


def test_without_worn_mask_the_inpainting_mask_stands_in_and_it_says_so_once(setup, caplog):
    trainer, batch = setup
    objective = TryOnObjective(trainer.diffusion_loss, 0.0, trainer.hooks.monitor, StabilityConfig(),
                               dataset="data.name=mine")
    bare = {k: v for k, v in batch.items() if k not in ("worn_mask", "garment_pos")}
    with_mask = {**bare, "worn_mask": batch["mask"]}
    with caplog.at_level(logging.WARNING, logger="losses"):
        _, got = objective(trainer.model, trainer.unwrapped, bare, _generator())
        objective(trainer.model, trainer.unwrapped, bare, _generator())
    _, want = objective(trainer.model, trainer.unwrapped, with_mask, _generator())
    assert [r.getMessage().startswith("data.name=mine gives no 'worn_mask'") for r in caplog.records] == [True]
    assert float(got["i2am/colour_var/mean"]) == float(want["i2am/colour_var/mean"])
    assert not any(k.startswith("i2am/centre_error") for k in got)


def test_held_out_readings_match_the_training_metrics_of_the_same_draws(setup):
    """readings(): one forward without guidance dropout at noise and t drawn from the generator;
    its dispersion is what the trainer's held-out reading (MonitorHooks.dispersion) gives."""
    trainer, batch = setup
    readings = trainer.objective.readings(trainer.unwrapped, batch, _generator(3))
    assert {"i2am/dispersion/mean", "i2am/colour_var/mean", "i2am/centre_error/mean"} <= set(readings)
    gen = _generator(3)
    model = trainer.unwrapped
    noisy, _, t = trainer.diffusion_loss.noised(model.codec.encode(batch["person"]), gen)
    with torch.no_grad():
        model(noisy, t, model.condition(batch), batch["garment"])
    assert readings["i2am/dispersion/mean"] == pytest.approx(
        trainer.hooks.dispersion(model.codec.latent_mask(batch["mask"]), t), rel=1e-6)


def test_position_on_data_without_garment_positions_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"stability.position=0.1 needs .*garment_pos.*data.name='viton_hd'"):
        load_config(files=["configs/viton_hd.yaml"],
                    overrides=["data.root=/d", "model.codec.pretrained=/m", "model.unet.pretrained=/m",
                               "model.garment.pretrained=/c", "stability.position=0.1"])
    with pytest.raises(ConfigError, match=r"stability.placement=0.2 needs .*garment_pos.*data.name='viton_hd'"):
        load_config(files=["configs/viton_hd.yaml"],
                    overrides=["data.root=/d", "model.codec.pretrained=/m", "model.unet.pretrained=/m",
                               "model.garment.pretrained=/c", "stability.placement=0.2"])
    with pytest.raises(ConfigError, match="stability.colour=-1.0: stability weights must be >= 0"):
        load_config(overrides=["stability.colour=-1"])
    with pytest.raises(ConfigError, match="monitor.enabled=false"):
        load_config(overrides=["stability.colour=1", "monitor.enabled=false"])
    assert load_config(overrides=["stability.position=0.1"]).stability.position == 0.1  # synthetic: fine


def test_nan_attention_statistic_skips_the_step_and_names_the_layer(tmp_path, capsys):
    cfg = load_config(overrides=tiny_overrides(tmp_path, **{"train.max_steps": 3}))
    trainer = Trainer(cfg)
    real = trainer.objective.stability

    def poisoned(last, *args, **kwargs):
        if trainer.step == 1:
            name = next(iter(last))
            last[name].var = last[name].var * float("nan")
        return real(last, *args, **kwargs)

    trainer.objective.stability = poisoned
    trainer.fit()
    trainer.close()
    out = capsys.readouterr().out
    assert "non-finite loss at step 1 (non-finite attention statistic in layer(s) ['down_blocks.0.attentions.0" in out
    assert [h["step"] for h in trainer.history] == [1, 3]  # step 2 (index 1) was skipped


def test_training_logs_the_anchored_readings_every_step(tmp_path):
    cfg = load_config(overrides=tiny_overrides(tmp_path, **{"train.max_steps": 2, "stability.colour": 0.1,
                                                            "stability.position": 0.1}))
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.close()
    for h in trainer.history:
        assert {"i2am/colour_var/mean", "i2am/centre_error/mean", "loss/stability", "loss/diffusion"} <= set(h)
        assert any(k.startswith("loss/position/") for k in h)
        assert h["loss/total"] > h["loss/diffusion"]
