from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from configs import load_config
from models import ModelConfigError, PixelCodec, build_codec, build_model, build_unet, widen_conv_in
from models.build import load_trained_model
from models.garment import ConvTokenizer
from models.tryon import mask_box_coordinates
from models.registry import unet_size


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config(overrides=["model.unet.size=test", "model.garment.width=16"])


@pytest.fixture(scope="module")
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return build_model(tiny_cfg.model).eval()


def test_pixel_codec_is_exact_and_invertible():
    codec = PixelCodec(2)
    x = torch.rand(3, 3, 32, 24) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (3, 12, 16, 12)
    assert torch.equal(codec.decode(z), x)
    # space-to-depth: latent channel c*4 + i*2 + j at (y, x) is pixel (2y+i, 2x+j) of channel c
    assert torch.equal(z[:, 1 * 4 + 1 * 2 + 0], x[:, 1, 1::2, 0::2])


def test_latent_mask_marks_any_masked_pixel():
    codec = PixelCodec(2)
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 1, 2] = 1
    lm = codec.latent_mask(mask)
    assert lm.shape == (1, 1, 2, 2) and lm[0, 0, 0, 1] == 1 and lm.sum() == 1


def test_vae_codec_shapes():
    codec = build_codec("vae")  # tiny random AutoencoderKL
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 4, 16, 12)
    assert codec.decode(z).shape == x.shape
    assert not any(p.requires_grad for p in codec.parameters())


def test_model_shapes_and_input_channels(tiny_model):
    c = tiny_model.latent_channels
    assert tiny_model.unet.config.in_channels == 2 * c + 1 + 2  # noisy, agnostic, mask, mask-box (y, x)
    batch = {"agnostic": torch.zeros(2, 3, 32, 24), "mask": torch.ones(2, 1, 32, 24)}
    cond = tiny_model.condition(batch)
    assert cond.shape == (2, c + 1 + 2, 16, 12)
    out = tiny_model(torch.randn(2, c, 16, 12), torch.tensor([10, 900]), cond, torch.zeros(2, 3, 32, 24))
    assert out.shape == (2, c, 16, 12)
    assert tiny_model.reference_grid == (8, 6) and tiny_model.extra_tokens == 16  # the default null tokens


def test_pose_adds_latent_channels():
    cfg = load_config(overrides=["model.unet.size=test"])
    cfg.model.unet.use_pose = True  # the model alone (a config also needs real data with data.use_pose)
    model = build_model(cfg.model)
    c = model.latent_channels
    assert model.unet.config.in_channels == 3 * c + 1 + 2
    batch = {"agnostic": torch.zeros(1, 3, 32, 24), "mask": torch.ones(1, 1, 32, 24), "pose": torch.zeros(1, 3, 32, 24)}
    assert model.condition(batch).shape[1] == 2 * c + 1 + 2
    with pytest.raises(KeyError, match="pose"):
        model.condition({"agnostic": batch["agnostic"], "mask": batch["mask"]})


def test_mask_box_coordinates_by_hand():
    # A 2x3 box at rows 1..2, columns 0..2 of a 4x3 grid: y = 2 (r - 1) / 1 - 1, x = 2 c / 2 - 1.
    mask = torch.zeros(2, 1, 4, 3)
    mask[0, 0, 1:3, :] = 1
    mask[0, 0, 2, 1] = 0  # a hole inside does not change the box
    coords = mask_box_coordinates(mask)
    want_y = torch.tensor([-3.0, -1.0, 1.0, 3.0]).view(4, 1).expand(4, 3)
    want_x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3).expand(4, 3)
    assert torch.equal(coords[0, 0], want_y) and torch.equal(coords[0, 1], want_x)
    assert torch.equal(coords[1], torch.zeros(2, 4, 3))  # empty mask: zeros


def test_mask_coords_add_two_input_channels():
    cfg = load_config(overrides=["model.unet.size=test", "model.unet.mask_coords=true"])
    model = build_model(cfg.model)
    c = model.latent_channels
    assert model.unet.config.in_channels == 2 * c + 1 + 2
    mask = torch.zeros(1, 1, 32, 24)
    mask[..., 8:24, 4:20] = 1  # latent rows 4..11, columns 2..9
    cond = model.condition({"agnostic": torch.zeros(1, 3, 32, 24), "mask": mask})
    assert cond.shape == (1, c + 3, 16, 12)
    y, x = cond[0, -2], cond[0, -1]
    assert y[4, 0] == -1 and y[11, 0] == 1 and x[0, 2] == -1 and x[0, 9] == 1


def test_garment_mixer_gives_tokens_a_global_view():
    """Without the mixer a token depends only on its receptive field; with it, on the whole garment."""
    torch.manual_seed(0)
    for layers, global_view in ((0, False), (1, True)):
        enc = ConvTokenizer((8, 6), dim=32, width=16, mixer_layers=layers).eval()
        g = torch.zeros(1, 3, 32, 24)
        g2 = g.clone()
        g2[..., 28:, 18:] = 1.0  # change the bottom-right corner only
        with torch.no_grad():
            moved = (enc(g2) - enc(g)).abs()[0, 0].max()  # the top-left token
        assert (moved > 1e-4) == global_view, (layers, float(moved))


def test_null_tokens_come_first_and_carry_no_garment():
    """`model.garment.null_tokens=2`: two extra tokens before the grid, the same for every
    garment (they see none of it), recorded as extra tokens for the monitor; the grid
    tokens after them are still the garment's."""
    torch.manual_seed(0)
    enc = ConvTokenizer((8, 6), dim=32, width=16, null_tokens=2).eval()
    assert enc.extra_tokens == 2 and enc.num_tokens == 2 + 48
    g = torch.rand(2, 3, 32, 24) * 2 - 1
    with torch.no_grad():
        out = enc(g)
    assert out.shape == (2, 50, 32)
    torch.testing.assert_close(out[0, :2], out[1, :2])  # independent of the garment
    expected_null = torch.nn.functional.layer_norm(enc.null[0], (32,), enc.norm.weight, enc.norm.bias)
    torch.testing.assert_close(out[0, :2], expected_null)
    assert (out[0, 2:] - out[1, 2:]).abs().max() > 1e-3  # the grid still depends on the garment
    cfg = load_config(overrides=["model.unet.size=test", "model.garment.null_tokens=1"])
    model = build_model(cfg.model)
    assert model.extra_tokens == 1 and model.null_tokens.shape[1] == 1 + 48
    with pytest.raises(ValueError, match="null_tokens"):
        ConvTokenizer((8, 6), dim=32, null_tokens=-1)


def test_dropped_garments_get_null_tokens(tiny_model):
    with torch.no_grad():
        tiny_model.null_tokens.normal_()
    g = torch.rand(3, 3, 32, 24)
    tokens = tiny_model.garment_tokens(g, drop=torch.tensor([False, True, False]))
    assert torch.equal(tokens[1], tiny_model.null_tokens[0])
    assert torch.allclose(tokens[0], tiny_model.garment_encoder(g)[0])


def test_clip_garment_encoder_records_cls_and_grid():
    cfg = load_config(overrides=["model.unet.size=test", "model.garment.kind=clip"])
    model = build_model(cfg.model)
    assert model.extra_tokens == 1 and model.reference_grid == (8, 8)
    tokens = model.garment_tokens(torch.zeros(2, 3, 32, 24))
    assert tokens.shape == (2, 1 + 64, model.unet.config.cross_attention_dim)


def test_widen_conv_in_keeps_function():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **unet_size("test"))
    x, t, ctx = torch.randn(1, 4, 16, 12), torch.tensor([5]), torch.randn(1, 3, 32)
    before = unet(x, t, encoder_hidden_states=ctx).sample
    widen_conv_in(unet, 9)
    assert unet.config.in_channels == 9 and unet.conv_in.weight.shape[1] == 9
    assert torch.count_nonzero(unet.conv_in.weight[:, 4:]) == 0
    after = unet(torch.cat([x, torch.randn(1, 5, 16, 12)], 1), t, encoder_hidden_states=ctx).sample
    assert torch.allclose(before, after, atol=1e-6)


def test_pretrained_unet_loads_from_local_dir_and_widens(tmp_path, tiny_cfg):
    """A user's real weights go through the same config key: model.unet.pretrained."""
    torch.manual_seed(1)
    saved = UNet2DConditionModel(in_channels=12, out_channels=12, **unet_size("test"))
    saved.save_pretrained(tmp_path / "unet")
    cfg = load_config(overrides=["model.unet.size=test", "model.garment.width=16",
                                 f"model.unet.pretrained={tmp_path / 'unet'}"])
    model = build_model(cfg.model)
    assert model.unet.config.in_channels == 27  # 12 noisy + 12 agnostic + mask + 2 mask-box coordinates
    assert torch.equal(model.unet.conv_in.weight[:, :12], saved.conv_in.weight)
    assert torch.count_nonzero(model.unet.conv_in.weight[:, 12:]) == 0
    assert torch.equal(model.unet.mid_block.resnets[0].conv1.weight, saved.mid_block.resnets[0].conv1.weight)


def test_missing_pretrained_dir_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelConfigError) as err:
        build_unet("test", 25, 12, pretrained=str(missing))
    msg = str(err.value)
    assert str(missing / "config.json") in msg and "model.unet.pretrained" in msg and "save_pretrained" in msg


def test_pretrained_unet_contradicting_config_fails_before_loading(tmp_path):
    UNet2DConditionModel(in_channels=9, out_channels=4, **unet_size("test")).save_pretrained(tmp_path / "sd")
    with pytest.raises(ModelConfigError, match=r"out_channels=4 but the codec's latents have 12"):
        build_unet("test", 25, 12, pretrained=str(tmp_path / "sd"))


def test_save_and_load_trained_model_roundtrip(tmp_path, tiny_cfg, tiny_model):
    tiny_model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    torch.manual_seed(123)  # a differently initialised model
    loaded = load_trained_model(tiny_cfg.model, tmp_path / "model")
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_weights_dir_is_a_clear_error(tmp_path, tiny_cfg):
    with pytest.raises(ModelConfigError, match="garment_encoder.safetensors|diffusion_pytorch_model.safetensors"):
        load_trained_model(tiny_cfg.model, tmp_path)
