"""The attention warp (models/warp.py): geometry against hand-worked cases, the centres it
reads against an explicit softmax, the gate, guidance dropout, and its config errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import default_collate

from configs import ConfigError, parse_args
from i2am.dispersion import cell_centres
from models.build import build_model
from models.codec import PixelCodec
from models.unet import build_unet
from models.warp import warp_garment
from tryon_data.synthetic import SyntheticTryOn


def _identity_centres(b: int, grid: tuple[int, int], shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """(B, h*w, 2): each query looks at its own place on the garment (plus `shift`, in (y, x) units of the
    garment image)."""
    return (cell_centres(grid) + torch.tensor(shift)).expand(b, -1, -1).clone()


def test_identity_centres_copy_the_garment_pixel_for_pixel():
    # Pixel codec at factor 2: the latent is 8x6, so the query grid 8x6 is upsampled to the 16x12 image.
    # Bilinear upsampling of a linear field is exact between the outermost cell centres, so every pixel
    # but the outer ring is sampled at its own centre and must come back unchanged.
    codec, g = PixelCodec(2), torch.rand(2, 3, 16, 12) * 2 - 1
    warped = codec.decode(warp_garment(codec, g, _identity_centres(2, (8, 6)), (8, 6)))
    torch.testing.assert_close(warped[..., 1:-1, 1:-1], g[..., 1:-1, 1:-1], rtol=0, atol=1e-5)


def test_a_shift_in_x_moves_columns_not_rows():
    # Non-square image: swapping (x, y) in grid_sample's convention would move rows (or mismatch sizes).
    codec, g = PixelCodec(2), torch.rand(1, 3, 16, 12) * 2 - 1
    one_px = 1.0 / 12
    warped = codec.decode(warp_garment(codec, g, _identity_centres(1, (8, 6), (0.0, one_px)), (8, 6)))
    # pixel (r, c) now shows the garment's pixel (r, c + 1)
    torch.testing.assert_close(warped[..., 1:-1, 1:-2], g[..., 1:-1, 2:-1], rtol=0, atol=1e-5)


def test_the_true_garment_positions_rebuild_the_worn_garment():
    # The synthetic set knows where on the garment each worn pixel is: sampling the garment there must
    # give the person's garment pixels, up to the bilinear blend at pattern edges (the flat garment is
    # drawn at another scale than the worn one, so its one-pixel edges fall between the worn pixels).
    data = SyntheticTryOn(8, seed=3)
    batch = default_collate([data[i] for i in range(8)])
    pos = batch["garment_pos"]  # (B, 2, H, W), (y, x) in [0, 1]
    codec = PixelCodec(1)  # the latent is the image: the centres are given per pixel
    warped = warp_garment(codec, batch["garment"], pos.flatten(2).transpose(1, 2), (32, 24))
    worn = batch["worn_mask"][:, 0] > 0.5
    err = (warped - batch["person"]).abs().amax(1)[worn]
    assert float((err < 0.05).float().mean()) > 0.5, float((err < 0.05).float().mean())
    # against the same garment sampled at its own middle everywhere: far worse
    flat = warp_garment(codec, batch["garment"], torch.full_like(pos.flatten(2).transpose(1, 2), 0.5), (32, 24))
    assert float((flat - batch["person"]).abs().amax(1)[worn].mean()) > 2 * float(err.mean())


@pytest.fixture(scope="module")
def warp_model():
    torch.manual_seed(0)
    cfg = parse_args(["model.unet.size=test", "model.garment.width=16", "model.garment.null_tokens=2",
                      "diffusion.prediction_type=sample", "model.warp.enabled=true"])
    data = SyntheticTryOn(4, seed=1)
    batch = default_collate([data[i] for i in range(4)])
    return build_model(cfg.model).eval(), batch


def _run_spied(model, batch, drop=None):
    """One forward through the model; what the warp layer saw, the centres its reader took from
    it, and the UNet's raw output for the same inputs."""
    module = model.unet.get_submodule(model.warp.layer)
    seen = {}

    def spy(m, args, kwargs, out):  # runs after the warp's own hook (registered at build), before the warp
        seen.update(h=args[0], ctx=kwargs["encoder_hidden_states"], mu=model.warp.reader.mu.clone())

    torch.manual_seed(5)
    x, t, cond = torch.randn(4, 12, 16, 12), torch.full((4,), 300), model.condition(batch)
    hook = module.register_forward_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            seen["out"] = model(x, t, cond, batch["garment"], drop)
    finally:
        hook.remove()
    with torch.no_grad():
        tokens = model.garment_tokens(batch["garment"], drop)
        seen["raw"] = model.unet(torch.cat([x, cond], 1), t, encoder_hidden_states=tokens).sample
        model.warp.reader.take()
    return module, seen


def test_the_warp_reads_the_layers_head_mean_centre_over_the_grid_keys(warp_model):
    model, batch = warp_model
    module, seen = _run_spied(model, batch)
    assert model.warp.reader.mu is None  # taken by the warp
    # explicit: per head, softmax over the grid keys (the 2 null tokens dropped), centres; head mean
    with torch.no_grad():
        q = module.to_q(seen["h"]).unflatten(-1, (module.heads, -1)).transpose(1, 2)
        k = module.to_k(seen["ctx"]).unflatten(-1, (module.heads, -1)).transpose(1, 2)[:, :, model.extra_tokens:]
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        want = (probs @ cell_centres(model.reference_grid)).mean(1)
    assert want.shape == (4, 16 * 12, 2)
    torch.testing.assert_close(seen["mu"], want, rtol=0, atol=1e-5)


def test_the_prediction_blends_the_warped_garment_through_the_unets_gates(warp_model):
    model, batch = warp_model
    _, seen = _run_spied(model, batch)
    raw = seen["raw"]
    assert raw.shape[1] == 24  # 12 latent channels, then one gate logit each
    o, gate = raw[:, :12], torch.sigmoid(raw[:, 12:])
    w = warp_garment(model.codec, batch["garment"], seen["mu"], (16, 12))
    torch.testing.assert_close(seen["out"], o + gate * (w - o), rtol=1e-5, atol=1e-6)
    assert float((seen["out"] - o).abs().max()) > 1e-2  # the warp changed the prediction


def test_guidance_dropped_samples_get_no_warp(warp_model):
    model, batch = warp_model
    drop = torch.tensor([True, False, True, False])
    _, seen = _run_spied(model, batch, drop)
    torch.testing.assert_close(seen["out"][drop], seen["raw"][drop, :12], rtol=0, atol=0)
    assert float((seen["out"][~drop] - seen["raw"][~drop, :12]).abs().max()) > 1e-2


def test_the_held_gate_is_the_unets_for_a_zero_latent_and_no_sampling_step(warp_model):
    model, batch = warp_model
    cond, tokens = model.condition(batch), model.garment_tokens(batch["garment"])
    calls = []
    hook = model.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        gate = model.warp_gate(cond, tokens, 999)
    finally:
        hook.remove()
    assert calls == []  # invisible to hooks that count sampling steps (the monitor, the repairs)
    assert model.warp.reader.mu is None
    with torch.no_grad():
        raw = model.unet(torch.cat([torch.zeros(4, 12, 16, 12), cond], 1), torch.full((4,), 999),
                         encoder_hidden_states=tokens).sample
        model.warp.reader.take()
    torch.testing.assert_close(gate, torch.sigmoid(raw[:, 12:]), rtol=0, atol=0)
    # held gates replace the call's own where they are open (> 0.5); elsewhere the call's decide
    _, seen = _run_spied(model, batch)
    torch.manual_seed(5)
    x, t = torch.randn(4, 12, 16, 12), torch.full((4,), 300)
    held = torch.rand(4, 12, 16, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x, t, cond, batch["garment"], gate=held)
    o, own = seen["raw"][:, :12], torch.sigmoid(seen["raw"][:, 12:])
    w = warp_garment(model.codec, batch["garment"], seen["mu"], (16, 12))
    g = torch.tensor([[h if h > 0.5 else a for h, a in zip(hr, ar)]
                      for hr, ar in zip(held.flatten(1).tolist(), own.flatten(1).tolist())]).view_as(held)
    assert 0.3 < float((held > 0.5).float().mean()) < 0.7  # both branches are exercised
    torch.testing.assert_close(out, o + g * (w - o), rtol=1e-5, atol=1e-6)


def test_sampling_with_the_warp_records_one_map_step_per_sampling_step(warp_model):
    from i2am import AttentionMonitor
    from models.sampling import Sampler

    model, batch = warp_model
    sampler = Sampler(prediction_type="sample", steps=3)
    with AttentionMonitor(model.unet, model.reference_grid, model.extra_tokens, num_steps=3) as mon:
        out = sampler(model, batch, seed=0, monitor=mon)
    assert mon.recorded_steps == 3 and out.images.shape == batch["person"].shape


def test_pretrained_unet_gets_closed_gates_and_keeps_its_prediction(tmp_path):
    torch.manual_seed(0)
    unet = build_unet("test", 25, 12)
    unet.save_pretrained(tmp_path / "unet")
    x, t, ctx = torch.randn(1, 25, 16, 12), torch.tensor([10]), torch.randn(1, 5, 32)
    gated = build_unet("test", 25, 12, pretrained=str(tmp_path / "unet"), gates=True)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=ctx).sample
        after = gated(x, t, encoder_hidden_states=ctx).sample
    assert gated.config.out_channels == 24
    torch.testing.assert_close(after[:, :12], before, rtol=0, atol=0)
    closed = 1 / (1 + math.exp(4))  # sigmoid(-4): the warp starts at 1.8 %
    torch.testing.assert_close(torch.sigmoid(after[:, 12:]), torch.full_like(after[:, 12:], closed), rtol=1e-5, atol=0)
    # a UNet saved with its gates (a trained warp model) loads as it is
    gated.save_pretrained(tmp_path / "gated")
    again = build_unet("test", 25, 12, pretrained=str(tmp_path / "gated"), gates=True)
    assert again.config.out_channels == 24


def test_saved_warp_model_round_trips(warp_model, tmp_path):
    model, batch = warp_model
    model.save_pretrained(tmp_path / "m")
    cfg = parse_args(["model.unet.size=test", "model.garment.width=16", "model.garment.null_tokens=2",
                      "diffusion.prediction_type=sample", "model.warp.enabled=true"])
    again = build_model(cfg.model).eval()
    again.load_pretrained(tmp_path / "m")
    x, t = torch.randn(4, 12, 16, 12), torch.full((4,), 300)
    with torch.no_grad():
        a = model(x, t, model.condition(batch), batch["garment"])
        b = again(x, t, again.condition(batch), batch["garment"])
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_warp_needs_the_clean_image_prediction():
    with pytest.raises(ConfigError, match="model.warp.enabled=true.*prediction_type='v_prediction'"):
        parse_args(["model.warp.enabled=true", "diffusion.prediction_type=v_prediction"])


def test_warp_layer_must_be_a_cross_attention_layer():
    from models.errors import ModelConfigError

    cfg = parse_args(["model.unet.size=test", "diffusion.prediction_type=sample", "model.warp.enabled=true",
                      "model.warp.layer=up_blocks.1.attentions.1.transformer_blocks.0.attn1"])
    with pytest.raises(ModelConfigError, match="not a cross-attention layer"):
        build_model(cfg.model)
    cfg.model.warp.layer = "up_blocks.9.attn2"
    with pytest.raises(ModelConfigError, match="is not a module of the UNet; its last cross-attention layer is "
                                               "'up_blocks.1.attentions.1.transformer_blocks.0.attn2'"):
        build_model(cfg.model)
