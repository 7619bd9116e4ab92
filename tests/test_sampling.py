"""The one sampler (`models.sampling.Sampler`) and the loss's forward process.

References are written out by hand here: a DDIM loop on diffusers' schedulers, and a
monitor whose batch slice the test sets itself."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch.utils.data import default_collate

from configs import load_config
from i2am import AttentionMonitor
from losses import DiffusionLoss
from models import build_model
from models.sampling import Sampler, Samples, build_train_scheduler

STEPS = 3


@pytest.fixture(scope="module")
def cfg():
    return load_config(overrides=["model.unet.size=test", "model.garment.width=16", "data.num_val=3",
                                  f"diffusion.sample_steps={STEPS}"])


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    m = build_model(cfg.model).eval()
    with torch.no_grad():  # null tokens start at zero: make the unconditional branch visibly different
        m.null_tokens.normal_(generator=torch.Generator().manual_seed(1))
    return m


@pytest.fixture(scope="module")
def batch(cfg):
    from train.data import build_dataset

    ds = build_dataset(cfg.data, "val")
    return default_collate([ds[i] for i in range(len(ds))])


@torch.no_grad()
def hand_written_ddim(model, batch, d, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """DDIM with classifier-free guidance, straight on diffusers' schedulers."""
    train = DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule,
                          prediction_type=d.prediction_type, clip_sample=False)
    sched = DDIMScheduler.from_config(train.config, timestep_spacing="trailing", clip_sample=False)
    gen = torch.Generator().manual_seed(seed)
    cond, tokens, garment = model.condition(batch), model.garment_tokens(batch["garment"]), batch["garment"]
    b, _, h, w = cond.shape
    drop = torch.zeros(b, dtype=torch.bool)  # the attention warp (on in the default) needs the garment
    if guidance != 1.0:
        cond, tokens = torch.cat([cond, cond]), torch.cat([model.null_garment_tokens(b), tokens])
        garment, drop = torch.cat([garment, garment]), torch.cat([torch.ones_like(drop), drop])
    latents = torch.randn((b, model.latent_channels, h, w), generator=gen)
    gate = model.warp_gate(cond, tokens, d.num_train_timesteps - 1)  # held for the whole run
    sched.set_timesteps(steps)
    latents = latents * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.scale_model_input(latents, t)
        if guidance != 1.0:
            x = torch.cat([x, x])
        pred = model(x, t.expand(x.shape[0]), cond, garment, drop, tokens=tokens, gate=gate)
        if guidance != 1.0:
            u, c = pred.chunk(2)
            pred = u + guidance * (c - u)
        latents = sched.step(pred, t, latents, generator=gen).prev_sample
    images = model.codec.decode(latents).float().clamp(-1, 1)
    return images * batch["mask"] + batch["agnostic"] * (1 - batch["mask"])


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampler_equals_a_hand_written_ddim_loop(model, batch, cfg, guidance):
    sampler = Sampler.from_config(cfg.diffusion, guidance_scale=guidance)
    out = sampler(model, batch, seed=7)
    assert isinstance(out, Samples) and out.maps is None
    assert torch.equal(out.images, hand_written_ddim(model, batch, cfg.diffusion, STEPS, guidance, seed=7))


def test_seed_generator_and_determinism(model, batch, cfg):
    sampler = Sampler.from_config(cfg.diffusion)
    a = sampler(model, batch, seed=3).images
    assert torch.equal(a, sampler(model, batch, generator=torch.Generator().manual_seed(3)).images)
    assert not torch.equal(a, sampler(model, batch, seed=4).images)
    # guidance changes the images (the unconditional branch differs from the conditional one)
    assert not torch.equal(a, Sampler.from_config(cfg.diffusion, guidance_scale=3.0)(model, batch, seed=3).images)
    with pytest.raises(ValueError, match="not both"):
        sampler(model, batch, seed=3, generator=torch.Generator())


def test_from_config_reads_dataclasses_and_mappings(cfg):
    d = cfg.diffusion
    s = Sampler.from_config(d)
    assert (s.steps, s.guidance_scale, s.guided) == (STEPS, d.guidance_scale, False)
    m = Sampler.from_config({**vars(d), "prediction_type": "epsilon"}, steps=5, guidance_scale=2)
    assert (m.steps, m.guidance_scale, m.guided) == (5, 2.0, True)
    assert m.train_scheduler.config.prediction_type == "epsilon"
    assert s.scheduler.config.timestep_spacing == "trailing" and not s.scheduler.config.clip_sample


def test_guided_sampler_records_only_the_conditional_half(model, batch, cfg):
    sampler = Sampler.from_config(cfg.diffusion, guidance_scale=3.0)
    b = batch["garment"].shape[0]
    with AttentionMonitor(model.unet, model.reference_grid, model.extra_tokens, num_steps=STEPS) as mon:
        out = sampler(model, batch, seed=5, monitor=mon)
        assert mon.batch_slice is None  # restored
        # by hand: the test sets the slice, the sampler runs without the monitor
        halves = {}
        for name, part in (("cond", slice(b, None)), ("uncond", slice(0, b))):
            mon.batch_slice = part
            mon.reset()
            images = sampler(model, batch, seed=5).images
            halves[name] = mon.maps()
    assert torch.equal(images, out.images)
    r2g = out.maps.unified("r2g")
    assert r2g.shape[0] == b
    assert torch.equal(r2g, halves["cond"].unified("r2g"))
    assert torch.equal(out.maps.unified("g2r"), halves["cond"].unified("g2r"))
    assert not torch.allclose(r2g, halves["uncond"].unified("r2g"))  # the test could fail


def test_unguided_sampler_records_the_whole_batch(model, batch, cfg):
    sampler = Sampler.from_config(cfg.diffusion)
    with AttentionMonitor(model.unet, model.reference_grid, model.extra_tokens, num_steps=STEPS) as mon:
        mon.batch_slice = slice(0, 1)  # whatever was set before is replaced for the run, then restored
        out = sampler(model, batch, seed=5, monitor=mon)
        assert mon.batch_slice == slice(0, 1)
        mon.batch_slice = None
        mon.reset()
        sampler(model, batch, seed=5)
        whole = mon.maps()
    assert torch.equal(out.maps.unified("r2g"), whole.unified("r2g"))
    assert out.maps.batch_size == batch["garment"].shape[0] and len(out.maps.timesteps) == STEPS


def test_any_recorder_with_the_monitor_interface_works(model, batch, cfg):
    calls = []

    class Recorder:
        batch_slice = "before"

        def reset(self):
            calls.append(("reset", self.batch_slice))

        def maps(self):
            calls.append(("maps", self.batch_slice))
            return "the maps"

    rec = Recorder()
    out = Sampler.from_config(cfg.diffusion, guidance_scale=2.0)(model, batch, seed=0, monitor=rec)
    assert out.maps == "the maps" and rec.batch_slice == "before"
    (_, during), (_, at_end) = calls
    assert during is at_end and during(6) == slice(3, None)


# ----------------------------------------------------------------------- forward process
def test_noised_draws_in_the_documented_order():
    loss = DiffusionLoss(build_train_scheduler(1000, "scaled_linear", "v_prediction"))
    latents = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    n = loss.noised(latents, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    assert torch.equal(n.noise, noise) and torch.equal(n.timesteps, t)
    assert torch.equal(n.noisy, loss.scheduler.add_noise(latents, noise, t))


def test_the_loss_noises_with_noised():
    loss = DiffusionLoss(build_train_scheduler(1000, "scaled_linear", "epsilon"), snr_gamma=None)
    latents = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = SimpleNamespace()

    def model(noisy, t):
        seen.noisy, seen.t = noisy, t
        return torch.zeros_like(noisy)

    value, _ = loss(model, latents, torch.Generator().manual_seed(2))
    n = loss.noised(latents, torch.Generator().manual_seed(2))
    assert torch.equal(seen.noisy, n.noisy) and torch.equal(seen.t, n.timesteps)
    assert torch.allclose(value, (n.noise ** 2).mean())  # epsilon target, zero prediction


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_resuming_from_the_latents_of_a_step_reproduces_the_run(model, batch, cfg, guidance):
    sampler = Sampler.from_config(cfg.diffusion, guidance_scale=guidance)
    seen: dict[int, torch.Tensor] = {}
    full = sampler(model, batch, seeds=[5, 6, 7], on_step=lambda k, x: seen.setdefault(k, x.clone())).images
    assert sorted(seen) == list(range(STEPS))
    for k in range(1, STEPS):
        calls = []
        hook = model.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
        try:
            resumed = sampler(model, batch, seeds=[5, 6, 7], latents=seen[k], start_step=k).images
        finally:
            hook.remove()
        assert len(calls) == STEPS - k  # the steps before k are not run again
        torch.testing.assert_close(resumed, full, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="start_step"):
        sampler(model, batch, start_step=1)
