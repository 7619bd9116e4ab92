"""Sampling paths a user hits that `test_sampling.py` leaves out: classifier-free guidance
against two separate model calls worked through one DDIM step by hand, and per-sample
noise (`Sampler(..., seeds=)`, what the resumable evaluation relies on)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from configs import load_config
from models import build_model
from models.sampling import Sampler


@pytest.fixture(scope="module")
def cfg():
    return load_config(overrides=["model.unet.size=test", "model.garment.width=16", "data.num_val=3",
                                  "diffusion.prediction_type=v_prediction", "model.warp.enabled=false"])


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


def alpha_bar(t: int, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> float:
    """ᾱ_t of the "scaled_linear" schedule (betas linear in sqrt), DDPMScheduler's default ends,
    in float64: prod over s <= t of (1 - beta_s)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    return float(torch.prod(1 - betas[: t + 1]))


@torch.no_grad()
def test_guidance_mixes_two_separate_model_calls(model, batch, cfg):
    """One DDIM step (trailing spacing: t = 999 straight to x0, ᾱ_prev = 1) for v-prediction:
    x0 = sqrt(ᾱ)·x_T − sqrt(1−ᾱ)·v with v = u + s·(c − u), u and c from two separate calls."""
    assert cfg.diffusion.prediction_type == "v_prediction" and cfg.diffusion.beta_schedule == "scaled_linear"
    s, seed = 3.0, 11
    guided = Sampler.from_config(cfg.diffusion, steps=1, guidance_scale=s)
    plain = Sampler.from_config(cfg.diffusion, steps=1, guidance_scale=1.0)
    out_s = guided(model, batch, seed=seed, paste_back=False).images
    assert [int(t) for t in guided.scheduler.timesteps] == [999]  # set by the run
    out_1 = plain(model, batch, seed=seed, paste_back=False).images

    cond = model.condition(batch)
    b, _, h, w = cond.shape
    x_t = torch.randn((b, model.latent_channels, h, w), generator=torch.Generator().manual_seed(seed))
    t = torch.full((b,), 999)
    c = model(x_t, t, cond, tokens=model.garment_tokens(batch["garment"]))
    u = model(x_t, t, cond, tokens=model.null_garment_tokens(b))
    ab = alpha_bar(999)

    def x0(v: torch.Tensor) -> torch.Tensor:
        return ab ** 0.5 * x_t - (1 - ab) ** 0.5 * v

    factor = cfg.model.codec.pixel_factor  # the pixel codec: depth-to-space, a permutation
    want_s = torch.pixel_shuffle(x0(u + s * (c - u)), factor).clamp(-1, 1)
    want_1 = torch.pixel_shuffle(x0(c), factor).clamp(-1, 1)
    torch.testing.assert_close(out_s, want_s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_1, want_1, rtol=1e-4, atol=1e-5)
    # Guidance moves the result by −sqrt(1−ᾱ)·(s−1)·(c−u), wherever neither image is clamped.
    shift = torch.pixel_shuffle(-(1 - ab) ** 0.5 * (s - 1) * (c - u), factor)
    free = (want_s.abs() < 0.999) & (want_1.abs() < 0.999)
    assert free.float().mean() > 0.5
    torch.testing.assert_close((out_s - out_1)[free], shift[free], rtol=1e-4, atol=1e-5)
    assert shift[free].abs().mean() > 1e-2  # the unconditional branch really differs


@torch.no_grad()
def test_per_sample_seeds_give_each_sample_its_own_noise(model, batch, cfg):
    """With `seeds`, sample k starts from the noise `seed=seeds[k]` gives a batch of one, in
    any batch and at any position: reversing the batch and its seeds reverses the output."""
    sampler = Sampler.from_config(cfg.diffusion, steps=2)
    first_inputs: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        if not first_inputs or first_inputs[-1] is None:
            first_inputs[-1:] = [args[0].clone()]

    seeds = [5, 123456789, 2**63 + 7]  # up to 64-bit seeds (the evaluation's SeedSequence values)
    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        first_inputs.append(None)
        together = sampler(model, batch, seeds=seeds).images
        flipped_batch = {k: v.flip(0) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        first_inputs.append(None)
        flipped = sampler(model, flipped_batch, seeds=seeds[::-1]).images
        alone = []
        for k, sd in enumerate(seeds):
            one = {key: v[k:k + 1] for key, v in batch.items() if isinstance(v, torch.Tensor)}
            first_inputs.append(None)
            alone.append(sampler(model, one, seed=sd).images)
    finally:
        handle.remove()
    c, h, w = first_inputs[0].shape[1:]
    noise = torch.cat([torch.randn((1, c, h, w), generator=torch.Generator().manual_seed(sd)) for sd in seeds])
    assert torch.equal(first_inputs[0], noise)  # DDIM's init_noise_sigma is 1: the raw noise
    assert torch.equal(first_inputs[1], noise.flip(0))
    for k in range(3):
        assert torch.equal(first_inputs[2 + k], noise[k:k + 1])
    torch.testing.assert_close(flipped, together.flip(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(alone), together, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one per sample"):
        sampler(model, batch, seeds=seeds[:2])
    with pytest.raises(ValueError, match="not both"):
        sampler(model, batch, seed=1, seeds=seeds)
