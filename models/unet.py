"""The inpainting UNet: diffusers' UNet2DConditionModel, from the size registry
or a local pretrained directory, with `conv_in` widened when needed."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from .errors import ModelConfigError, missing_path_error
from .registry import unet_size


def widen_conv_in(unet: UNet2DConditionModel, in_channels: int) -> UNet2DConditionModel:
    """Give `conv_in` more input channels; the new ones start at zero so the
    pretrained model's function is unchanged at initialisation (as in
    Paint-by-Example and diffusers' instruct-pix2pix example)."""
    old = unet.conv_in
    if in_channels == old.in_channels:
        return unet
    if in_channels < old.in_channels:
        raise ModelConfigError(f"cannot narrow conv_in from {old.in_channels} to {in_channels} channels")
    new = torch.nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                          dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet


def add_gate_channels(unet: UNet2DConditionModel, bias: float = -4.0) -> UNet2DConditionModel:
    """`conv_out` twice as wide: one gate logit of the attention warp per latent channel
    (models/warp.py). Zero weights and a negative bias: the gates start almost closed
    (sigmoid(-4) = 0.018), so a pretrained model predicts what it did until training opens
    them where the warp helps."""
    old = unet.conv_out
    c = old.out_channels
    new = torch.nn.Conv2d(old.in_channels, 2 * c, old.kernel_size, old.stride, old.padding,
                          dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:c] = old.weight
        new.bias.fill_(bias)
        new.bias[:c] = old.bias
    unet.conv_out = new
    unet.register_to_config(out_channels=2 * c)
    return unet


def _pretrained_dir(path: Path) -> Path:
    if (path / "unet" / "config.json").is_file():  # a whole pipeline directory
        return path / "unet"
    if not (path / "config.json").is_file():
        raise missing_path_error("pretrained UNet", "model.unet.pretrained", path, "config.json")
    return path


def build_unet(size: str, in_channels: int, out_channels: int, pretrained: str | None = None,
               gates: bool = False) -> UNet2DConditionModel:
    """A UNet taking `in_channels` (noisy latent + condition) and predicting `out_channels`,
    and with `gates` as many gate logits of the attention warp after them.

    With `pretrained`, the directory's weights are loaded and checked against what
    the rest of the model needs, so a mismatch fails here, before training starts. A
    pretrained UNet without the gate channels gets them (`add_gate_channels`); one saved with
    them (a trained warp model) has them.
    """
    if pretrained is None:
        return UNet2DConditionModel(in_channels=in_channels, out_channels=out_channels * (1 + gates),
                                    **unet_size(size))

    path = _pretrained_dir(Path(pretrained))
    config = UNet2DConditionModel.load_config(path)
    problems = []
    if gates and config["out_channels"] == 2 * out_channels:
        out_channels, gates = 2 * out_channels, False  # saved with its gate channels
    if config["out_channels"] != out_channels:
        problems.append(f"out_channels={config['out_channels']} but the codec's latents have {out_channels}")
    if config["in_channels"] > in_channels:
        problems.append(f"in_channels={config['in_channels']} but the inputs (latent + condition) have {in_channels}")
    if problems:
        raise ModelConfigError(
            f"pretrained UNet at {path} does not fit the configured model: " + "; ".join(problems)
            + ". Check model.codec (latent channels) and model.unet.use_pose."
        )
    unet = widen_conv_in(UNet2DConditionModel.from_pretrained(path, local_files_only=True), in_channels)
    return add_gate_channels(unet) if gates else unet
